"""The ``mmd`` drift detector: kernel MMD two-sample test on bottleneck features (B, D), with a
permutation p-value computed for all permutations in a few matrix products."""

from __future__ import annotations

from typing import Any

import numpy as np

from models.drift.base import Detector, as_matrix


def sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,D),(m,D) -> (n,m) squared Euclidean distances (clipped at 0 against rounding)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


def gaussian_kernel(d2: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    """Mean of Gaussian kernels exp(-d^2 / (2 s^2)) over the bandwidths s; same shape as d2."""
    out = np.zeros_like(d2)
    for s in bandwidths:  # 1-3 scales: a loop over scales, not over samples
        out += np.exp(d2 * float(-0.5 / (s * s)))  # python float: keeps d2's dtype
    out /= len(bandwidths)
    return out


def permutation_masks(rng: np.random.Generator, n_total: int, n_x: int, n_perm: int) -> np.ndarray:
    """(1 + n_perm, n_total) bool: row 0 is the observed split (first n_x are X), the other
    rows are uniformly random n_x-subsets (each row one permutation of the pooled sample)."""
    u = rng.random((n_perm, n_total))
    kth = np.partition(u, n_x - 1, axis=1)[:, n_x - 1 : n_x]  # (P,1) n_x-th smallest
    obs = np.zeros((1, n_total), dtype=bool)
    obs[0, :n_x] = True
    return np.concatenate([obs, u <= kth], axis=0)


def mmd2_permutations(
    k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray, masks: np.ndarray
) -> np.ndarray:
    """Unbiased MMD^2 for every split in ``masks``, without forming any permuted sample.

    k_xx (n,n), k_xy (n,m), k_yy (m,m): blocks of the pooled kernel matrix K with ZERO diagonal.
    masks (R, n+m) bool: True = the point is in group X (size n) for that split.

    For an indicator a of group X and b = 1 - a:  S_XX = a'Ka, S_XY = a'Kb = a'K1 - S_XX,
    S_YY = 1'K1 - S_XX - 2 S_XY. a'Ka for all R splits costs R * (n^2 + nm + m^2) multiply-adds
    (a matrix product per block, using the symmetry of K), instead of R Python-level re-indexings.
    """
    n, m = k_xy.shape
    a_x = masks[:, :n].astype(k_xx.dtype)  # (R,n)
    a_y = masks[:, n:].astype(k_xx.dtype)  # (R,m)
    row_x = k_xx.sum(1, dtype=np.float64) + k_xy.sum(1, dtype=np.float64)  # (n,) K1 on X rows
    row_y = k_xy.sum(0, dtype=np.float64) + k_yy.sum(1, dtype=np.float64)  # (m,)
    total = row_x.sum() + row_y.sum()  # 1'K1
    s_xx = (
        np.einsum("rn,rn->r", a_x @ k_xx, a_x, dtype=np.float64)
        + 2.0 * np.einsum("rm,rm->r", a_x @ k_xy, a_y, dtype=np.float64)
        + np.einsum("rm,rm->r", a_y @ k_yy, a_y, dtype=np.float64)
    )  # (R,)
    a_k_1 = a_x.astype(np.float64) @ row_x + a_y.astype(np.float64) @ row_y  # (R,)
    s_xy = a_k_1 - s_xx
    s_yy = total - s_xx - 2.0 * s_xy
    return s_xx / (n * (n - 1)) + s_yy / (m * (m - 1)) - 2.0 * s_xy / (n * m)


def _median_distance(x: np.ndarray, rng: np.random.Generator, max_points: int) -> float:
    """Median pairwise Euclidean distance of (a random subsample of) the rows of x."""
    if len(x) > max_points:
        x = x[rng.choice(len(x), max_points, replace=False)]
    x = x.astype(np.float64)
    d2 = sq_dists(x, x)
    return float(np.sqrt(np.median(d2[np.triu_indices(len(x), 1)])))


def _ref_block(x: np.ndarray, bw: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """K_xx with zero diagonal minus its mean off-diagonal value c; returns (block, c).

    The unbiased MMD^2 is unchanged by adding a constant to the kernel (its weights sum to 0);
    subtracting the typical value keeps the float32 sums away from cancellation.
    """
    k = gaussian_kernel(sq_dists(x, x), bw)  # (n,n)
    np.fill_diagonal(k, 0.0)
    c = np.float32(k.sum(dtype=np.float64) / (len(k) * (len(k) - 1)))
    k -= c
    np.fill_diagonal(k, 0.0)
    return k, c


def _centred_blocks(
    x: np.ndarray, y: np.ndarray, bw: np.ndarray,
    ref_block: tuple[np.ndarray, np.float32] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K_xx, K_xy, K_yy) with zero diagonals, all minus the same constant (see _ref_block)."""
    k_xx, c = ref_block if ref_block is not None else _ref_block(x, bw)
    k_xy = gaussian_kernel(sq_dists(x, y), bw) - c  # (n,m)
    k_yy = gaussian_kernel(sq_dists(y, y), bw) - c  # (m,m)
    np.fill_diagonal(k_yy, 0.0)
    return k_xx, k_xy, k_yy


class MMDDrift(Detector):
    """Kernel MMD two-sample test on feature vectors (B, D), permutation p-value.

    * Feature space (``whiten_components=k``, default 32): at each check the pooled sample
      (reference + current) is projected on its top-k principal components, each scaled to
      unit variance. The projection is a symmetric function of the pooled sample, so the
      permutation test is exact. With ``None`` the raw features are used.
    * Kernel: mean of Gaussians with bandwidths ``median * multiplier``; ``median`` is the median
      pairwise distance of the pooled sample (whitened) or of the reference (raw: fixed at fit
      time as alibi-detect does by default, so the reference kernel block is computed once).
      Both choices are invariant to permuting the pooled sample: the test stays exact. Medians
      use at most ``bandwidth_sample`` points, drawn at random positions independent of the data.
    * Statistic: unbiased MMD^2 (Gretton et al. 2012, eq. 3).
    * p-value: (1 + #{permuted MMD^2 >= observed}) / (1 + P): the observed split counts as one
      of the permutations, so p >= 1/(P+1) and the test is valid at any P.
    """

    method = "mmd"

    def _fit(self, x_ref: Any) -> int:
        x = as_matrix(x_ref, "x_ref")
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        self.n_ref_given = len(x)
        if cfg.max_ref is not None and len(x) > cfg.max_ref:
            x = x[np.sort(rng.choice(len(x), cfg.max_ref, replace=False))]
        self._x_ref = np.ascontiguousarray(x, dtype=np.float32)  # (n,D)
        self.dim = x.shape[1]
        if len(x) < 2:
            return len(x)
        if cfg.whiten_components is None:
            med = _median_distance(self._x_ref, rng, cfg.bandwidth_sample)
            if med <= 0:
                raise ValueError("x_ref: all reference points are identical; cannot set a bandwidth")
            self._median = med
            self._bw = np.asarray([med * mlt for mlt in cfg.bandwidth_multipliers], np.float64)
            self._ref = _ref_block(self._x_ref, self._bw)  # computed once per reference
        else:
            # Sufficient statistics of the reference for the pooled covariance.
            xd = self._x_ref.astype(np.float64)
            self._sum_ref, self._scatter_ref = xd.sum(0), xd.T @ xd  # (D,), (D,D)
        return self.n_ref_given

    def _n(self, x_cur: Any) -> int:
        return len(as_matrix(x_cur, "x_cur", self.dim))

    def _whiten(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Project reference and current on the pooled top-k PCs at unit variance."""
        yd = y.astype(np.float64)
        n_tot = len(self._x_ref) + len(y)
        mean = (self._sum_ref + yd.sum(0)) / n_tot
        cov = (self._scatter_ref + yd.T @ yd) / n_tot - np.outer(mean, mean)  # (D,D)
        w, v = np.linalg.eigh(cov)  # ascending
        k = min(self.config.whiten_components, self.dim, n_tot - 1)
        w, v = w[::-1][:k], v[:, ::-1][:, :k]
        keep = w > max(w[0], 0.0) * 1e-9  # drop numerically null directions
        proj = (v[:, keep] / np.sqrt(w[keep])).astype(np.float32)  # (D,k')
        mean32 = mean.astype(np.float32)
        return (self._x_ref - mean32) @ proj, (y - mean32) @ proj, int(keep.sum())

    def _score(self, x_cur: Any) -> tuple[float, float, dict[str, Any]]:
        y = np.ascontiguousarray(as_matrix(x_cur, "x_cur", self.dim), dtype=np.float32)
        cfg = self.config
        details: dict[str, Any] = {}
        if cfg.whiten_components is None:
            med, bw = self._median, self._bw
            k_xx, k_xy, k_yy = _centred_blocks(self._x_ref, y, bw, self._ref)
            details["feature_space"] = "raw"
        else:
            xw, yw, k = self._whiten(y)
            pooled = np.concatenate([xw, yw])
            med = _median_distance(pooled, np.random.default_rng(cfg.seed + 2), cfg.bandwidth_sample)
            if med <= 0:
                raise ValueError("all reference and current points are identical")
            bw = np.asarray([med * mlt for mlt in cfg.bandwidth_multipliers], np.float64)
            k_xx, k_xy, k_yy = _centred_blocks(xw, yw, bw)
            details["feature_space"] = f"pooled PCA, {k} components, unit variance"
        n, m = k_xy.shape
        masks = permutation_masks(np.random.default_rng(cfg.seed + 1), n + m, n, cfg.n_permutations)
        mmd2 = mmd2_permutations(k_xx, k_xy, k_yy, masks)  # (1+P,)
        obs, null = float(mmd2[0]), mmd2[1:]
        p = (1.0 + float(np.count_nonzero(null >= obs))) / (1.0 + len(null))
        details.update({
            "kernel": "gaussian" if len(bw) == 1 else "gaussian-mixture",
            "bandwidths": [float(b) for b in bw],
            "bandwidth_multipliers": [float(b) for b in cfg.bandwidth_multipliers],
            "median_distance": float(med),
            "n_permutations": int(len(null)),
            "null_mean": float(null.mean()),
            "null_std": float(null.std()),
            "n_ref_used": int(n),
        })
        return obs, p, details


__all__ = ["MMDDrift", "gaussian_kernel", "mmd2_permutations", "permutation_masks", "sq_dists"]


def witness(ref: np.ndarray, cur: np.ndarray, max_points: int = 500, seed: int = 0) -> np.ndarray:
    """The MMD witness function at each row of ``cur``: mean k(x, cur) - mean k(x, ref) with a
    Gaussian kernel at the median distance of the pooled rows. Large values are the current
    points that are most unlike the reference (what the MMD test saw); ~0 or negative: typical
    of the reference. Self-similarity is left out of the current mean."""
    ref = np.asarray(ref, dtype=np.float64)
    cur = np.asarray(cur, dtype=np.float64)
    if len(ref) < 2 or len(cur) < 2:
        raise ValueError("the witness needs at least 2 reference and 2 current rows")
    rng = np.random.default_rng(seed)
    bw = np.asarray([_median_distance(np.concatenate([ref, cur]), rng, max_points) or 1.0])
    k_cc = gaussian_kernel(sq_dists(cur, cur), bw)
    np.fill_diagonal(k_cc, 0.0)
    k_cr = gaussian_kernel(sq_dists(cur, ref), bw)
    return k_cc.sum(1) / (len(cur) - 1) - k_cr.mean(1)
