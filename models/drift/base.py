"""Drift detectors: is a site's current batch drawn from the same distribution as the reference?

One small protocol (alibi-detect style) for every detector:

    det = MMDDrift(config).fit(z_ref)        # or MMDDrift(config, x_ref=z_ref)
    stat, p, details = det.score(z_cur)      # raw test
    res = det.predict(z_cur)                 # DriftResult: decision, p-value, threshold, ...

The detectors (registered in ``models.catalog.DETECTORS``):

* ``mmd``      (models.drift.mmd)              kernel two-sample test on the bottleneck features z,
                                          permutation p-value, all permutations in a few matrix
                                          products.
* ``bbsd``     (models.drift.univariate) black-box shift detection (Lipton et al. 2018;
                                          Rabanser et al. 2019): per-class KS tests on softmax.
* ``quality``  (models.drift.univariate) Anderson-Darling tests on image-quality statistics.

``CombinedDrift`` runs a list of them (default ``models.catalog.DEFAULT_DETECTORS``) on the views
of a batch, Bonferroni for testing T times; ``decide(...)`` is the one-call form.

Below ``min_samples`` current images every detector answers ``insufficient_data`` (never
``no_drift``): a test on 10 images has almost no power, and "no drift" would be a false comfort.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

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
    input_kind: str

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
def as_matrix(x: Any, name: str, dim: int | None = None) -> np.ndarray:
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


class Detector:
    """Validation, min_samples handling and the DriftResult record; subclasses compute.

    A detector is a subclass with a ``method`` name, the ``input_kind`` of the batch view it
    tests ("features" (N, D), "probs" (N, K) or "quality": a mapping of per-image statistics),
    ``_fit``, ``_n`` and ``_score``; its registration is one line in ``models.catalog.DETECTORS``.
    Every detector takes ``(config, x_ref, class_names)``."""

    method = "base"
    input_kind = "features"
    # how many tests this one shares alpha with (CombinedDrift sets it; 3 = the default trio)
    share = 3

    def __init__(self, config: DriftConfig | None = None, x_ref: Any = None,
                 class_names: list[str] | None = None) -> None:
        self.class_names = class_names
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


# --- combined ----------------------------------------------------------------------------------
# The views of a batch, in the order of the tuple form (z, probs[, quality]).
VIEWS = ("features", "probs", "quality")


def as_views(x: Any, name: str) -> dict[str, Any]:
    """A batch as {view: data}: a mapping with keys of :data:`VIEWS`, or the tuple form
    ``(features (B,D), probs (B,K)[, quality])``."""
    if isinstance(x, Mapping):
        unknown = set(x) - set(VIEWS)
        if unknown:
            raise ValueError(f"{name}: unknown views {sorted(unknown)} (known: {list(VIEWS)})")
        return {k: v for k, v in x.items() if v is not None}
    if isinstance(x, tuple | list) and len(x) in (2, 3):
        return dict(zip(VIEWS, x, strict=False))
    raise ValueError(f"{name} must be (features (B,D), probs (B,K)[, quality]) or a mapping "
                     f"of {list(VIEWS)}")


class CombinedDrift(Detector):
    """Several detectors on the views of one batch, Bonferroni.

    Input: the tuple form ``(z, probs)`` / ``(z, probs, quality)`` or a mapping
    ``{"features": z, "probs": p, "quality": q}``. ``detectors`` names entries of
    ``models.catalog.DETECTORS``; those whose view the reference lacks are left out (a profile
    saved without quality statistics tests features and probabilities only). With T tests,
    drift when T * min p <= alpha (p = min(1, T min p)): testing T times at alpha would multiply
    the false-alarm rate, and Bonferroni keeps it <= alpha whatever the dependence between
    tests. Each sub-test's record (compared with alpha / T) is in ``details``.
    """

    method = "combined"
    input_kind = "views"

    def __init__(self, config: DriftConfig | None = None, x_ref: Any = None,
                 class_names: list[str] | None = None,
                 detectors: Sequence[str] | None = None) -> None:
        from models.catalog import DEFAULT_DETECTORS

        self.names = list(DEFAULT_DETECTORS if detectors is None else detectors)
        if not self.names:
            raise ValueError("CombinedDrift needs at least one detector")
        self.subs: list[tuple[str, Detector]] = []
        super().__init__(config, x_ref, class_names)

    def _fit(self, x_ref: Any) -> int:
        from models.catalog import load

        views = as_views(x_ref, "x_ref")
        n = {len(next(iter(v.values()))) if isinstance(v, Mapping) else len(v)
             for v in views.values()}
        if len(n) != 1:
            raise ValueError(f"x_ref views have different numbers of images: {sorted(n)}")
        self.subs = []
        for name in self.names:
            cls = load("detector", name)
            if cls.input_kind not in views:
                continue
            det = cls(self.config, class_names=self.class_names)
            det.share = len(self.names)
            self.subs.append((name, det.fit(views[cls.input_kind])))
        if not self.subs:
            raise ValueError(f"x_ref has none of the views the detectors {self.names} test")
        for _, det in self.subs:
            det.share = len(self.subs)
        self.method = "+".join(name for name, _ in self.subs)
        self.views = [det.input_kind for _, det in self.subs]
        return self.subs[0][1].n_ref

    def _parts(self, x_cur: Any, name: str) -> list[Any]:
        views = as_views(x_cur, name)
        missing = [v for v in self.views if v not in views]
        if missing:
            raise ValueError(f"{name} lacks the views {missing} that the reference has")
        return [views[v] for v in self.views]

    def _n(self, x_cur: Any) -> int:
        parts = self._parts(x_cur, "x_cur")
        ns = {det._n(part) for (_, det), part in zip(self.subs, parts, strict=True)}
        if len(ns) != 1:
            raise ValueError(f"x_cur parts have different numbers of images: {sorted(ns)}")
        return ns.pop()

    def _score(self, x_cur: Any) -> tuple[float, float, dict[str, Any]]:
        parts = self._parts(x_cur, "x_cur")
        a = self.config.alpha / len(self.subs)
        n_cur = self._n(x_cur)
        subs = {}
        for (name, det), part in zip(self.subs, parts, strict=True):
            stat, pv, det_details = det._score(part)
            subs[name] = DriftResult(
                bool(pv <= a), "drift" if pv <= a else "no_drift", float(pv), float(stat), a,
                det.method, det.n_ref, n_cur, det_details,
            ).to_dict()
        ps = {k: v["p_value"] for k, v in subs.items()}
        first = min(ps, key=ps.get)
        p_comb = min(1.0, len(self.subs) * ps[first])
        details = {"correction": f"bonferroni x{len(self.subs)}", "triggered_by": first, **subs}
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
    ref = {"features": z_ref, "probs": probs_ref, "quality": quality_ref}
    cur = {"features": z_cur, "probs": probs_cur, "quality": quality_cur}
    return CombinedDrift(config, ref, class_names=class_names).predict(cur)


__all__ = [
    "VIEWS", "CombinedDrift", "Decision", "Detector", "DriftConfig", "DriftDetector",
    "DriftResult", "as_matrix", "as_views", "decide",
]
