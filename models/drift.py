"""Drift detectors: is a site's current batch drawn from the same distribution as the reference?

One small protocol (alibi-detect style) for every detector:

    det = MMDDrift(config).fit(z_ref)        # or MMDDrift(config, x_ref=z_ref)
    stat, p, details = det.score(z_cur)      # raw test
    res = det.predict(z_cur)                 # DriftResult: decision, p-value, threshold, ...

* ``MMDDrift``      – kernel two-sample test on the bottleneck features z (B, D), permutation
                       p-value, all permutations in a few matrix products.
* ``BBSDDrift``     – black-box shift detection (Lipton et al. 2018; Rabanser et al. 2019):
                       per-class Kolmogorov–Smirnov tests on the softmax outputs, Bonferroni.
* ``QualityDrift``  – Anderson-Darling tests on image-quality statistics (models.quality), Bonferroni.
* ``CombinedDrift`` – MMD + BBSD on ``(z, probs)`` (+ quality on ``(z, probs, quality)``),
                       Bonferroni for testing 2 (3) times; ``decide(...)`` is the one-call form.

Below ``min_samples`` current images every detector answers ``insufficient_data`` (never
``no_drift``): a test on 10 images has almost no power, and "no drift" would be a false comfort.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from scipy import stats

Decision = Literal["drift", "no_drift", "insufficient_data"]


@dataclass(frozen=True)
class DriftResult:
    """One test's outcome as plain Python values (safe to JSON-encode and store)."""

    is_drift: bool | None  # None when there was not enough data to test
    decision: Decision
    p_value: float | None
    statistic: float | None
    threshold: float  # the significance level alpha the p-value was compared with
    method: str
    n_ref: int
    n_cur: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@runtime_checkable
class DriftDetector(Protocol):
    method: str

    def fit(self, x_ref: Any) -> DriftDetector: ...

    def score(self, x_cur: Any) -> tuple[float, float, dict[str, Any]]: ...

    def predict(self, x_cur: Any) -> DriftResult: ...


@dataclass
class DriftConfig:
    # The false-alarm rate a site accepts per check: 5% is the usual convention; with daily
    # checks that is ~1.5 false alarms a month per site, so deployments may prefer 0.01.
    alpha: float = 0.05
    # Fewer current images than this -> "insufficient_data". A whole batch under any of the
    # bench conditions is already detected at 20 images (bench/drift.py), but a batch where 30%
    # of the images changed is caught only ~10-70% of the time at 20; 30 keeps a margin.
    min_samples: int = 30
    # 500 permutations resolve p down to 1/501 ~ 0.002 and the Monte-Carlo error of p at
    # p=0.05 to ~+-0.01 (binomial sd), enough for alpha >= 0.01; costs < 0.2 s at 1000 vs 500.
    n_permutations: int = 500
    # MMD feature space: project the pooled sample (reference + current) on its top-k
    # principal components and scale each to unit variance (a Mahalanobis-type kernel).
    # Why: the bottleneck's variance is dominated by class (semantic) directions, while site
    # conditions (dark, blurred, compressed) move images along low-variance directions that a
    # raw Euclidean kernel barely sees. Emotion6, 30% of the batch affected (bench/drift.py):
    # blur sev. 1 at n=50 0.06 -> 0.40, at n=100 0.14 -> 0.74; JPEG sev. 2 at n=100 0.08 -> 0.52;
    # false-alarm rate still within alpha's CI (200 trials per n).
    # Fitted on the POOLED sample, the projection does not depend on which images are
    # "current", so the permutation test stays exact. None: raw features, reference-fixed kernel.
    whiten_components: int | None = 32
    # Gaussian kernel bandwidths as multiples of the median inter-point distance (reference
    # when whiten_components is None, pooled sample otherwise). Several values = a mixture
    # (sum) of Gaussians, still a characteristic kernel and an exact test; on our data
    # (0.5, 1, 2) never beat the plain median heuristic (bench/drift.py), hence (1.0,).
    bandwidth_multipliers: tuple[float, ...] = (1.0,)
    # Reference points kept for the test. The cost is O(P * (n_ref + n_cur)^2); beyond ~2000
    # reference points power is limited by n_cur anyway, so a random (seeded) subsample of
    # the reference loses almost nothing and keeps 5000-vs-5000 checks to seconds.
    max_ref: int | None = 2000
    # Points used to estimate the median distance (a 1000-point sample gives the median of
    # ~500k distances: plenty, and O(1000^2) work however big the reference is).
    bandwidth_sample: int = 1000
    # Seed of the reference subsample and of the permutations: same inputs -> same p-value.
    seed: int = 0
    # BLAS threads during one check (None: leave the process setting). The matrices are small
    # and checks run beside other work (several sites, a worker pool); multi-threaded OpenBLAS
    # on busy cores was 25-50x SLOWER than one thread here (a 256x256 eigh: 0.8 s vs 0.03 s on
    # a loaded 2-core machine). Large checks on idle cores lose up to ~2x with 1 thread.
    blas_threads: int | None = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.min_samples < 2:
            raise ValueError(f"min_samples must be >= 2, got {self.min_samples}")
        if self.n_permutations < 1:
            raise ValueError(f"n_permutations must be >= 1, got {self.n_permutations}")
        if not self.bandwidth_multipliers or min(self.bandwidth_multipliers) <= 0:
            raise ValueError("bandwidth_multipliers must be a non-empty tuple of positive floats")
        if self.blas_threads is not None and self.blas_threads < 1:
            raise ValueError(f"blas_threads must be >= 1 or None, got {self.blas_threads}")
        if self.max_ref is not None and self.max_ref < 2:
            raise ValueError(f"max_ref must be >= 2 or None, got {self.max_ref}")
        if self.whiten_components is not None and self.whiten_components < 1:
            raise ValueError(f"whiten_components must be >= 1 or None, got {self.whiten_components}")


# --- shared plumbing -------------------------------------------------------------------------
def _as_matrix(x: Any, name: str, dim: int | None = None) -> np.ndarray:
    """Array-like (incl. CPU torch tensors) -> finite float (N, D) array; clear errors."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name} has {a.shape[1]} columns but the reference has {dim}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


class _Detector:
    """Validation, min_samples handling and the DriftResult record; subclasses compute."""

    method = "base"

    def __init__(self, config: DriftConfig | None = None, x_ref: Any = None) -> None:
        self.config = config or DriftConfig()
        self.n_ref = 0
        self._fitted = False
        if x_ref is not None:
            self.fit(x_ref)

    def _blas_limits(self) -> contextlib.AbstractContextManager:
        """``config.blas_threads`` BLAS threads for the duration (no limit when None)."""
        if self.config.blas_threads is None:
            return contextlib.nullcontext()
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        return threadpool_limits(limits=self.config.blas_threads, user_api="blas")

    def fit(self, x_ref: Any):
        with self._blas_limits():
            n = self._fit(x_ref)
        if n < self.config.min_samples:
            raise ValueError(
                f"reference has {n} samples; at least min_samples={self.config.min_samples} "
                "are needed to build a reference profile"
            )
        self.n_ref, self._fitted = n, True
        return self

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise ValueError(f"{type(self).__name__} has no reference yet: call fit(x_ref) first")

    def score(self, x_cur: Any) -> tuple[float, float, dict[str, Any]]:
        """(statistic, p-value, details) of the test; needs >= 2 current samples."""
        self._check_fitted()
        n = self._n(x_cur)
        if n < 2:
            raise ValueError(f"need at least 2 current samples to compute a test, got {n}")
        return self._limited_score(x_cur)

    def _limited_score(self, x_cur: Any) -> tuple[float, float, dict[str, Any]]:
        with self._blas_limits():
            return self._score(x_cur)

    def predict(self, x_cur: Any) -> DriftResult:
        self._check_fitted()
        n, a = self._n(x_cur), self.config.alpha
        if n < self.config.min_samples:
            return DriftResult(None, "insufficient_data", None, None, a, self.method, self.n_ref, n,
                               {"min_samples": self.config.min_samples})
        stat, p, details = self._limited_score(x_cur)
        drift = bool(p <= a)
        return DriftResult(drift, "drift" if drift else "no_drift", float(p), float(stat), a,
                           self.method, self.n_ref, n, details)

    # subclasses
    def _fit(self, x_ref: Any) -> int:
        raise NotImplementedError

    def _n(self, x_cur: Any) -> int:
        raise NotImplementedError

    def _score(self, x_cur: Any) -> tuple[float, float, dict[str, Any]]:
        raise NotImplementedError


# --- MMD ---------------------------------------------------------------------------------------
def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,D),(m,D) -> (n,m) squared Euclidean distances (clipped at 0 against rounding)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


def _kernel(d2: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
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
    d2 = _sq_dists(x, x)
    return float(np.sqrt(np.median(d2[np.triu_indices(len(x), 1)])))


def _ref_block(x: np.ndarray, bw: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """K_xx with zero diagonal minus its mean off-diagonal value c; returns (block, c).

    The unbiased MMD^2 is unchanged by adding a constant to the kernel (its weights sum to 0);
    subtracting the typical value keeps the float32 sums away from cancellation.
    """
    k = _kernel(_sq_dists(x, x), bw)  # (n,n)
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
    k_xy = _kernel(_sq_dists(x, y), bw) - c  # (n,m)
    k_yy = _kernel(_sq_dists(y, y), bw) - c  # (m,m)
    np.fill_diagonal(k_yy, 0.0)
    return k_xx, k_xy, k_yy


class MMDDrift(_Detector):
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
        x = _as_matrix(x_ref, "x_ref")
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
        return len(_as_matrix(x_cur, "x_cur", self.dim))

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
        y = np.ascontiguousarray(_as_matrix(x_cur, "x_cur", self.dim), dtype=np.float32)
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


# --- BBSD --------------------------------------------------------------------------------------
class BBSDDrift(_Detector):
    """Black-box shift detection on softmax outputs (B, K): K two-sample KS tests, Bonferroni.

    p = min(1, K * min_k p_k); the statistic is the KS distance of that most-shifted class.
    Detects label-prior shift and any shift that changes the model's confidence profile;
    blind to shifts the classifier's outputs do not feel.
    """

    method = "bbsd"

    def __init__(
        self,
        config: DriftConfig | None = None,
        x_ref: Any = None,
        class_names: list[str] | None = None,
    ) -> None:
        self.class_names = class_names
        super().__init__(config, x_ref)

    def _fit(self, x_ref: Any) -> int:
        p = _as_matrix(x_ref, "probs_ref")
        if self.class_names is not None and len(self.class_names) != p.shape[1]:
            raise ValueError(f"{len(self.class_names)} class names for {p.shape[1]} columns")
        self._p_ref = p.astype(np.float64)
        self.dim = p.shape[1]
        return len(p)

    def _n(self, x_cur: Any) -> int:
        return len(_as_matrix(x_cur, "probs_cur", self.dim))

    def _score(self, x_cur: Any) -> tuple[float, float, dict[str, Any]]:
        q = _as_matrix(x_cur, "probs_cur", self.dim).astype(np.float64)
        res = stats.ks_2samp(self._p_ref, q, axis=0)  # K tests at once
        ps, ds = np.atleast_1d(res.pvalue), np.atleast_1d(res.statistic)
        k = int(np.argmin(ps))
        names = self.class_names or [str(i) for i in range(self.dim)]
        p = min(1.0, self.dim * float(ps[k]))
        details = {
            "per_class_p": {names[i]: float(ps[i]) for i in range(self.dim)},
            "per_class_ks": {names[i]: float(ds[i]) for i in range(self.dim)},
            "worst_class": names[k],
            "correction": f"bonferroni x{self.dim}",
            "pred_share_ref": _shares(self._p_ref, names),
            "pred_share_cur": _shares(q, names),
        }
        return float(ds[k]), p, details


def _shares(probs: np.ndarray, names: list[str]) -> dict[str, float]:
    """Share of predicted classes (argmax), for the report."""
    counts = np.bincount(probs.argmax(1), minlength=probs.shape[1])
    return {names[i]: float(c / len(probs)) for i, c in enumerate(counts)}


# --- image quality ---------------------------------------------------------------------------
# Statistics tested by QualityDrift. Width/height/aspect are left out on purpose: every image is
# resized for the model, so a new camera resolution alone is not a reason to re-adapt (it is
# still *described* by models.quality.describe_shift). The grey-world ``warmth`` is left out
# too: the illuminant estimate measures the same thing with far less scene dependence, and
# every extra statistic costs power through the Bonferroni correction.
QUALITY_TEST_STATS: tuple[str, ...] = (
    "brightness", "contrast", "sharpness", "colourfulness", "illuminant_rg", "illuminant_bg",
    "blockiness",
)
# scipy's Anderson-Darling p-values are interpolated from a table and clipped to this range.
_AD_P_FLOOR = 0.001


def _ad_pvalue(r: np.ndarray, c: np.ndarray, level: float) -> tuple[float, float]:
    """Two-sample Anderson-Darling (statistic, p). Where the tabulated p hits its floor and the
    level asked for is below it, the p-value comes from permutations instead."""
    with warnings.catch_warnings():  # "p-value capped/floored": expected, handled below
        warnings.simplefilter("ignore", UserWarning)
        res = stats.anderson_ksamp([r, c])
    p = float(res.pvalue)
    if p <= _AD_P_FLOOR and level < _AD_P_FLOOR:
        n_res = int(min(100_000, math.ceil(20.0 / level)))
        res = stats.anderson_ksamp([r, c], method=stats.PermutationMethod(
            n_resamples=n_res, random_state=0))
        p = float(res.pvalue)
    return float(res.statistic), p


class QualityDrift(_Detector):
    """Two-sample Anderson-Darling test per image-quality statistic (models.quality),
    Bonferroni over them.

    Anderson-Darling rather than Kolmogorov-Smirnov: a site where only part of the images
    changed (30% of a batch from a camera that went bad) moves the tail of a statistic's
    distribution, where KS is weakest. bench/drift.py compares them.

    Input: a mapping name -> (N,) values (a dict from ``models.quality.batch_stats`` or a
    DataFrame) or an (N, S) array whose columns are ``models.quality.STAT_NAMES``. Catches
    what a colour- or blur-invariant model's features do not show (greyscale, colour casts,
    JPEG blocks), which is worth knowing even when accuracy holds.
    """

    method = "quality"

    def __init__(
        self, config: DriftConfig | None = None, x_ref: Any = None,
        stats: tuple[str, ...] = QUALITY_TEST_STATS,
    ) -> None:
        self.stats = tuple(stats)
        super().__init__(config, x_ref)

    def _columns(self, x: Any, name: str, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        from models.quality import STAT_NAMES

        if isinstance(x, np.ndarray):
            if x.ndim != 2 or x.shape[1] != len(STAT_NAMES):
                raise ValueError(f"{name} array must be (N, {len(STAT_NAMES)}) in "
                                 f"models.quality.STAT_NAMES order, got shape {x.shape}")
            x = {k: x[:, i] for i, k in enumerate(STAT_NAMES)}
        if not hasattr(x, "__getitem__"):
            raise ValueError(f"{name} must give the quality statistics {list(self.stats)}")
        # A reference saved before a statistic existed lacks it: test what both sides have.
        names = [k for k in self.stats if k in x]
        if not names or any(k not in x for k in required):
            raise ValueError(f"{name} must give the quality statistics {list(required or self.stats)}")
        cols = {k: np.asarray(x[k], dtype=np.float64).ravel() for k in names}
        lengths = {len(v) for v in cols.values()}
        if len(lengths) != 1:
            raise ValueError(f"{name}: quality statistics have different lengths {sorted(lengths)}")
        return cols

    def _fit(self, x_ref: Any) -> int:
        self._ref = self._columns(x_ref, "quality_ref")
        return len(next(iter(self._ref.values())))

    def _n(self, x_cur: Any) -> int:
        return len(next(iter(self._columns(x_cur, "quality_cur", tuple(self._ref)).values())))

    def _score(self, x_cur: Any) -> tuple[float, float, dict[str, Any]]:
        cur = self._columns(x_cur, "quality_cur", tuple(self._ref))
        # per-statistic level if this test is one of the three of CombinedDrift (conservative)
        level = self.config.alpha / (3 * len(self.stats))
        ps, ds = {}, {}
        for k in self._ref:  # ``cur`` has every one of them (checked by _columns)
            r, c = self._ref[k], cur[k]
            r, c = r[np.isfinite(r)], c[np.isfinite(c)]
            if len(r) < 2 or len(c) < 2:
                continue  # e.g. blockiness of images under 16 px
            if np.unique(np.concatenate([r, c])).size < 2:
                ps[k], ds[k] = 1.0, 0.0  # one value on both sides: nothing moved
                continue
            ds[k], ps[k] = _ad_pvalue(r, c, level)
        if not ps:
            return 0.0, 1.0, {"per_stat_p": {}, "note": "no statistic had 2 finite values"}
        worst = min(ps, key=ps.get)
        p = min(1.0, len(ps) * ps[worst])
        return ds[worst], p, {"per_stat_p": ps, "per_stat_ad": ds, "worst_stat": worst,
                              "test": "anderson-darling", "correction": f"bonferroni x{len(ps)}"}


# --- combined ----------------------------------------------------------------------------------
class CombinedDrift(_Detector):
    """MMD on features + BBSD on softmax outputs (+ quality Anderson-Darling when given), Bonferroni.

    Input: ``(z, probs)`` or ``(z, probs, quality)`` with z (B, D), probs (B, K) and quality as
    QualityDrift takes it; the reference fixes which form is used. With T sub-tests, drift when
    T * min p <= alpha (p = min(1, T min p)): testing T times at alpha would multiply the
    false-alarm rate, and Bonferroni keeps it <= alpha whatever the dependence between tests.
    Each sub-test's record (compared with alpha / T) is in ``details``.
    """

    method = "mmd+bbsd"

    def __init__(
        self,
        config: DriftConfig | None = None,
        x_ref: tuple[Any, ...] | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        self.mmd = MMDDrift(config)
        self.bbsd = BBSDDrift(config, class_names=class_names)
        self.quality: QualityDrift | None = None
        super().__init__(config, x_ref)

    def _split(self, x: Any, name: str) -> tuple[Any, ...]:
        if not (isinstance(x, tuple | list) and len(x) in (2, 3)):
            raise ValueError(f"{name} must be (features (B,D), probs (B,K)[, quality])")
        if len(x[0]) != len(x[1]):
            raise ValueError(f"{name}: {len(x[0])} feature rows but {len(x[1])} probability rows")
        if self._fitted and (len(x) == 3) != (self.quality is not None):
            raise ValueError(f"{name} must have {3 if self.quality else 2} parts, as the reference")
        return tuple(x)

    def _fit(self, x_ref: Any) -> int:
        parts = self._split(x_ref, "x_ref")
        self.mmd.fit(parts[0])
        self.bbsd.fit(parts[1])
        if len(parts) == 3:
            self.quality = QualityDrift(self.config).fit(parts[2])
            self.method = "mmd+bbsd+quality"
        return self.mmd.n_ref

    def _subtests(self) -> list[tuple[str, _Detector]]:
        subs: list[tuple[str, _Detector]] = [("mmd", self.mmd), ("bbsd", self.bbsd)]
        return subs + ([("quality", self.quality)] if self.quality is not None else [])

    def _n(self, x_cur: Any) -> int:
        parts = self._split(x_cur, "x_cur")
        ns = {det._n(part) for (_, det), part in zip(self._subtests(), parts, strict=True)}
        if len(ns) != 1:
            raise ValueError(f"x_cur parts have different numbers of images: {sorted(ns)}")
        return ns.pop()

    def _score(self, x_cur: Any) -> tuple[float, float, dict[str, Any]]:
        parts = self._split(x_cur, "x_cur")
        tests = self._subtests()
        a = self.config.alpha / len(tests)
        subs = {}
        for (name, det), part in zip(tests, parts, strict=True):
            stat, pv, det_details = det._score(part)
            subs[name] = DriftResult(
                bool(pv <= a), "drift" if pv <= a else "no_drift", float(pv), float(stat), a,
                det.method, det.n_ref, len(parts[0]), det_details,
            ).to_dict()
        ps = {k: v["p_value"] for k, v in subs.items()}
        first = min(ps, key=ps.get)
        p_comb = min(1.0, len(tests) * ps[first])
        details = {"correction": f"bonferroni x{len(tests)}", "triggered_by": first, **subs}
        return subs[first]["statistic"], p_comb, details


def decide(
    z_ref: Any,
    probs_ref: Any,
    z_cur: Any,
    probs_cur: Any,
    config: DriftConfig | None = None,
    class_names: list[str] | None = None,
    quality_ref: Any = None,
    quality_cur: Any = None,
) -> DriftResult:
    """One-call combined check (fits the reference each call; keep a CombinedDrift to reuse).

    Pass both quality_ref and quality_cur to add the image-quality test.
    """
    if (quality_ref is None) != (quality_cur is None):
        raise ValueError("pass both quality_ref and quality_cur, or neither")
    ref: tuple[Any, ...] = (z_ref, probs_ref)
    cur: tuple[Any, ...] = (z_cur, probs_cur)
    if quality_ref is not None:
        ref, cur = (*ref, quality_ref), (*cur, quality_cur)
    return CombinedDrift(config, ref, class_names=class_names).predict(cur)
