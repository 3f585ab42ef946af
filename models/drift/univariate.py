"""Per-column drift detectors: ``bbsd`` (per-class Kolmogorov-Smirnov on softmax outputs) and
``quality`` (Anderson-Darling on image-quality statistics), each Bonferroni over its columns."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import stats

from models.drift.base import Detector, DriftConfig, as_matrix


class BBSDDrift(Detector):
    """Black-box shift detection on softmax outputs (B, K): K two-sample KS tests, Bonferroni.

    p = min(1, K * min_k p_k); the statistic is the KS distance of that most-shifted class.
    Detects label-prior shift and any shift that changes the model's confidence profile;
    blind to shifts the classifier's outputs do not feel.
    """

    method = "bbsd"
    input_kind = "probs"

    def _fit(self, x_ref: Any) -> int:
        p = as_matrix(x_ref, "probs_ref")
        if self.class_names is not None and len(self.class_names) != p.shape[1]:
            raise ValueError(f"{len(self.class_names)} class names for {p.shape[1]} columns")
        self._p_ref = p.astype(np.float64)
        self.dim = p.shape[1]
        return len(p)

    def _n(self, x_cur: Any) -> int:
        return len(as_matrix(x_cur, "probs_cur", self.dim))

    def _score(self, x_cur: Any) -> tuple[float, float, dict[str, Any]]:
        q = as_matrix(x_cur, "probs_cur", self.dim).astype(np.float64)
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


class QualityDrift(Detector):
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
    input_kind = "quality"

    def __init__(
        self, config: DriftConfig | None = None, x_ref: Any = None,
        class_names: list[str] | None = None, stats: tuple[str, ...] = QUALITY_TEST_STATS,
    ) -> None:
        self.stats = tuple(stats)
        super().__init__(config, x_ref, class_names)

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
        # per-statistic level, as one of ``share`` tests of CombinedDrift (conservative)
        level = self.config.alpha / (self.share * len(self.stats))
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


__all__ = ["QUALITY_TEST_STATS", "BBSDDrift", "QualityDrift"]
