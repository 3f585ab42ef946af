"""Drift detectors: is a site's current batch drawn from the same distribution as the reference?

One small protocol (alibi-detect style) for every detector:

    det = MMDDrift(config).fit(z_ref)        # or MMDDrift(config, x_ref=z_ref)
    stat, p, details = det.score(z_cur)      # raw test
    res = det.predict(z_cur)                 # DriftResult: decision, p-value, threshold, ...

* ``MMDDrift``      – kernel two-sample test on the bottleneck features z (B, D), permutation
                       p-value, all permutations in a few matrix products.
* ``BBSDDrift``     – black-box shift detection (Lipton et al. 2018; Rabanser et al. 2019):
                       per-class Kolmogorov–Smirnov tests on the softmax outputs, Bonferroni.
* ``CombinedDrift`` – both of the above on ``(z, probs)`` pairs, Bonferroni for testing twice;
                       ``decide(...)`` is the one-call form the pipeline uses.

Below ``min_samples`` current images every detector answers ``insufficient_data`` (never
``no_drift``): a test on 10 images has almost no power, and "no drift" would be a false comfort.
"""

from __future__ import annotations

import dataclasses
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
    # Fewer current images than this -> "insufficient_data". At 30 images the MMD test already
    # detects a strong whole-batch shift (bench/drift.py); below it power collapses.
    min_samples: int = 30
    # 500 permutations resolve p down to 1/501 ~ 0.002 and the Monte-Carlo error of p at
    # p=0.05 to ~+-0.01 (binomial sd), enough for alpha >= 0.01; costs < 0.2 s at 1000 vs 500.
    n_permutations: int = 500
    # Gaussian kernel bandwidths as multiples of the median inter-point distance of the
    # reference. A mixture (sum) of three scales is still one characteristic kernel, so the
    # permutation test stays exact; it keeps power both for shifts that move a few images far
    # (small bandwidths) and for shifts that move all images a little (large bandwidths).
    # bench/drift.py compares it with the plain median heuristic (1.0,).
    bandwidth_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0)
    # Reference points kept for the test. The cost is O(P * (n_ref + n_cur)^2); beyond ~2000
    # reference points power is limited by n_cur anyway, so a random (seeded) subsample of
    # the reference loses almost nothing and keeps 5000-vs-5000 checks to seconds.
    max_ref: int | None = 2000
    # Points used to estimate the median distance (a 1000-point sample gives the median of
    # ~500k distances: plenty, and O(1000^2) work however big the reference is).
    bandwidth_sample: int = 1000
    # Seed of the reference subsample and of the permutations: same inputs -> same p-value.
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.min_samples < 2:
            raise ValueError(f"min_samples must be >= 2, got {self.min_samples}")
        if self.n_permutations < 1:
            raise ValueError(f"n_permutations must be >= 1, got {self.n_permutations}")
        if not self.bandwidth_multipliers or min(self.bandwidth_multipliers) <= 0:
            raise ValueError("bandwidth_multipliers must be a non-empty tuple of positive floats")
        if self.max_ref is not None and self.max_ref < 2:
            raise ValueError(f"max_ref must be >= 2 or None, got {self.max_ref}")


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

    def fit(self, x_ref: Any):
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
        return self._score(x_cur)

    def predict(self, x_cur: Any) -> DriftResult:
        self._check_fitted()
        n, a = self._n(x_cur), self.config.alpha
        if n < self.config.min_samples:
            return DriftResult(None, "insufficient_data", None, None, a, self.method, self.n_ref, n,
                               {"min_samples": self.config.min_samples})
        stat, p, details = self._score(x_cur)
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


class MMDDrift(_Detector):
    """Kernel MMD two-sample test on feature vectors (B, D), permutation p-value.

    * Kernel: mean of Gaussians with bandwidths ``median * multiplier``, where ``median`` is
      the median pairwise Euclidean distance within the REFERENCE (a seeded subsample of
      ``bandwidth_sample`` points). Fixing it at fit time (as alibi-detect does by default)
      keeps the test exact -- the kernel does not depend on the data being tested -- and lets
      the reference block of the kernel matrix be computed once.
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
        sub = self._x_ref
        if len(sub) > cfg.bandwidth_sample:
            sub = sub[rng.choice(len(sub), cfg.bandwidth_sample, replace=False)]
        d2 = _sq_dists(sub.astype(np.float64), sub.astype(np.float64))
        med = float(np.sqrt(np.median(d2[np.triu_indices(len(sub), 1)])))
        if med <= 0:
            raise ValueError("x_ref: all reference points are identical; cannot set a kernel bandwidth")
        self.median_distance = med
        self._bw = np.asarray([med * mlt for mlt in cfg.bandwidth_multipliers], np.float64)
        k_xx = _kernel(_sq_dists(self._x_ref, self._x_ref), self._bw)  # (n,n) float32
        # The unbiased MMD^2 is unchanged by adding a constant to the kernel (its weights sum to
        # 0); subtracting the mean reference value keeps float32 sums away from cancellation.
        np.fill_diagonal(k_xx, 0.0)
        self._shift = np.float32(k_xx.sum(dtype=np.float64) / (len(k_xx) * (len(k_xx) - 1)))
        k_xx -= self._shift
        np.fill_diagonal(k_xx, 0.0)
        self._k_xx = k_xx
        return self.n_ref_given

    def _n(self, x_cur: Any) -> int:
        return len(_as_matrix(x_cur, "x_cur", self.dim))

    def _score(self, x_cur: Any) -> tuple[float, float, dict[str, Any]]:
        y = np.ascontiguousarray(_as_matrix(x_cur, "x_cur", self.dim), dtype=np.float32)
        k_xy = _kernel(_sq_dists(self._x_ref, y), self._bw) - self._shift  # (n,m)
        k_yy = _kernel(_sq_dists(y, y), self._bw) - self._shift  # (m,m)
        np.fill_diagonal(k_yy, 0.0)
        n, m = k_xy.shape
        cfg = self.config
        masks = permutation_masks(np.random.default_rng(cfg.seed + 1), n + m, n, cfg.n_permutations)
        mmd2 = mmd2_permutations(self._k_xx, k_xy, k_yy, masks)  # (1+P,)
        obs, null = float(mmd2[0]), mmd2[1:]
        p = (1.0 + float(np.count_nonzero(null >= obs))) / (1.0 + len(null))
        details = {
            "kernel": "gaussian-mixture",
            "bandwidths": [float(b) for b in self._bw],
            "bandwidth_multipliers": [float(b) for b in cfg.bandwidth_multipliers],
            "median_distance": self.median_distance,
            "n_permutations": int(len(null)),
            "null_mean": float(null.mean()),
            "null_std": float(null.std()),
            "n_ref_used": int(n),
        }
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


# --- combined ----------------------------------------------------------------------------------
class CombinedDrift(_Detector):
    """MMD on features and BBSD on softmax outputs; drift if min(p_mmd, p_bbsd) * 2 <= alpha.

    Input is the pair ``(z, probs)`` with z (B, D) and probs (B, K). Testing twice at alpha
    each would double the false-alarm rate; Bonferroni (p = min(1, 2 min p)) keeps it <= alpha
    whatever the dependence between the two tests. Each sub-test's record is in ``details``.
    """

    method = "mmd+bbsd"

    def __init__(
        self,
        config: DriftConfig | None = None,
        x_ref: tuple[Any, Any] | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        self.mmd = MMDDrift(config)
        self.bbsd = BBSDDrift(config, class_names=class_names)
        super().__init__(config, x_ref)

    @staticmethod
    def _split(x: Any, name: str) -> tuple[Any, Any]:
        if not (isinstance(x, tuple | list) and len(x) == 2):
            raise ValueError(f"{name} must be a pair (features (B,D), probs (B,K))")
        z, p = x
        if len(z) != len(p):
            raise ValueError(f"{name}: {len(z)} feature rows but {len(p)} probability rows")
        return z, p

    def _fit(self, x_ref: Any) -> int:
        z, p = self._split(x_ref, "x_ref")
        self.mmd.fit(z)
        self.bbsd.fit(p)
        return self.mmd.n_ref

    def _n(self, x_cur: Any) -> int:
        z, p = self._split(x_cur, "x_cur")
        self.bbsd._n(p)  # validates the probabilities' shape
        return self.mmd._n(z)

    def _score(self, x_cur: Any) -> tuple[float, float, dict[str, Any]]:
        z, p = self._split(x_cur, "x_cur")
        half = dataclasses.replace(self.config, alpha=self.config.alpha / 2)
        subs = {}
        for name, det in (("mmd", self.mmd), ("bbsd", self.bbsd)):
            stat, pv, det_details = det._score(z if name == "mmd" else p)
            subs[name] = DriftResult(
                bool(pv <= half.alpha), "drift" if pv <= half.alpha else "no_drift", float(pv),
                float(stat), half.alpha, det.method, det.n_ref, len(z), det_details,
            ).to_dict()
        ps = {k: v["p_value"] for k, v in subs.items()}
        first = min(ps, key=ps.get)
        p_comb = min(1.0, 2.0 * ps[first])
        details = {"correction": "bonferroni x2", "triggered_by": first, **subs}
        return subs[first]["statistic"], p_comb, details


def decide(
    z_ref: Any,
    probs_ref: Any,
    z_cur: Any,
    probs_cur: Any,
    config: DriftConfig | None = None,
    class_names: list[str] | None = None,
) -> DriftResult:
    """One-call combined check (fits the reference each call; keep a CombinedDrift to reuse)."""
    det = CombinedDrift(config, (z_ref, probs_ref), class_names=class_names)
    return det.predict((z_cur, probs_cur))
