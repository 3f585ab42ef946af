from __future__ import annotations

import json
import math

import numpy as np
import pytest

from models.drift.base import (
    CombinedDrift,
    Detector,
    DriftConfig,
    DriftDetector,
    DriftResult,
    decide,
)
from models.drift.mmd import (
    MMDDrift,
    gaussian_kernel,
    mmd2_permutations,
    permutation_masks,
    sq_dists,
)
from models.drift.univariate import BBSDDrift, QualityDrift


def _gauss(rng, n, d=8, shift=0.0):
    return (rng.normal(size=(n, d)) + shift).astype(np.float32)


def _wilson(k: int, n: int, z: float = 2.576) -> tuple[float, float]:
    """99% Wilson interval for k successes in n trials."""
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return c - h, c + h


def _naive_mmd2(x: np.ndarray, y: np.ndarray, bw: np.ndarray) -> float:
    """Textbook unbiased MMD^2 with explicit loops over the three blocks' off-diagonals."""
    def k(a, b):
        return float(np.mean([math.exp(-float(((a - b) ** 2).sum()) / (2 * s * s)) for s in bw]))

    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)


def test_vectorised_permutations_equal_naive_loop():
    rng = np.random.default_rng(0)
    x, y = _gauss(rng, 12, 3).astype(np.float64), _gauss(rng, 9, 3, 0.5).astype(np.float64)
    bw = np.array([1.0, 2.5])
    pooled = np.concatenate([x, y])
    masks = permutation_masks(np.random.default_rng(1), 21, 12, 15)
    assert masks.shape == (16, 21) and np.all(masks.sum(1) == 12)
    assert masks[0, :12].all() and not masks[0, 12:].any()  # row 0 = the observed split
    k = gaussian_kernel(sq_dists(pooled, pooled), bw)
    np.fill_diagonal(k, 0.0)
    fast = mmd2_permutations(k[:12, :12], k[:12, 12:], k[12:, 12:], masks)
    for r in range(len(masks)):
        naive = _naive_mmd2(pooled[masks[r]], pooled[~masks[r]], bw)
        assert fast[r] == pytest.approx(naive, abs=1e-10)


def test_detector_statistic_equals_naive_mmd2_float32_path():
    rng = np.random.default_rng(2)
    x, y = _gauss(rng, 40, 5), _gauss(rng, 30, 5, 0.3)
    det = MMDDrift(DriftConfig(n_permutations=20, whiten_components=None)).fit(x)
    stat, p, d = det.score(y)
    assert d["feature_space"] == "raw"
    naive = _naive_mmd2(x.astype(np.float64), y.astype(np.float64), np.array(d["bandwidths"]))
    assert stat == pytest.approx(naive, abs=2e-6)


def test_whitened_statistic_equals_naive_on_pooled_pca():
    rng = np.random.default_rng(12)
    x = _gauss(rng, 40, 6) * np.array([5, 3, 1, 1, 0.5, 0.2], np.float32)
    y = _gauss(rng, 30, 6, 0.2)
    stat, _, d = MMDDrift(DriftConfig(n_permutations=20, whiten_components=3), x).score(y)
    pooled = np.concatenate([x, y]).astype(np.float64)
    mean = pooled.mean(0)
    w, v = np.linalg.eigh(np.cov(pooled.T, bias=True))
    proj = v[:, ::-1][:, :3] / np.sqrt(w[::-1][:3])
    xw, yw = (x - mean) @ proj, (y - mean) @ proj
    assert d["feature_space"].startswith("pooled PCA, 3 components")
    np.testing.assert_allclose(np.cov(np.concatenate([xw, yw]).T, bias=True), np.eye(3), atol=1e-8)
    assert stat == pytest.approx(_naive_mmd2(xw, yw, np.array(d["bandwidths"])), abs=2e-6)


@pytest.mark.parametrize("whiten", [None, 4])
def test_mmd_null_calibration_false_alarm_rate_within_ci(whiten):
    alpha, trials = 0.05, 200
    cfg = DriftConfig(alpha=alpha, n_permutations=99, min_samples=10, whiten_components=whiten)
    rng = np.random.default_rng(3)
    det = MMDDrift(cfg).fit(_gauss(rng, 60))
    alarms = sum(det.predict(_gauss(rng, 30)).is_drift for _ in range(trials))
    lo, hi = _wilson(alarms, trials)
    assert lo <= alpha <= hi, (alarms, lo, hi)


@pytest.mark.parametrize("whiten", [None, 4])
def test_mmd_detects_mean_shift(whiten):
    cfg = DriftConfig(n_permutations=199, min_samples=10, whiten_components=whiten)
    rng = np.random.default_rng(4)
    det = MMDDrift(cfg).fit(_gauss(rng, 100))
    hits = sum(det.predict(_gauss(rng, 40, shift=0.5)).is_drift for _ in range(20))
    assert hits >= 18


def test_p_value_counts_the_observed_statistic():
    rng = np.random.default_rng(5)
    det = MMDDrift(DriftConfig(n_permutations=19, min_samples=10)).fit(_gauss(rng, 50))
    stat, p, _ = det.score(_gauss(rng, 50, shift=5.0))  # hopelessly different
    assert p == pytest.approx(1 / 20)  # never 0: the observed split is one of the 20
    _, p_null, _ = det.score(_gauss(rng, 50))
    assert 1 / 20 <= p_null <= 1.0
    # and the p-value is a multiple of 1/(P+1)
    assert (p_null * 20) == pytest.approx(round(p_null * 20))


def test_seeded_reproducible():
    rng = np.random.default_rng(6)
    ref, cur = _gauss(rng, 50), _gauss(rng, 40, shift=0.2)
    a = MMDDrift(DriftConfig(seed=7)).fit(ref).score(cur)
    b = MMDDrift(DriftConfig(seed=7)).fit(ref).score(cur)
    assert a[:2] == b[:2]


def test_insufficient_data_below_min_samples_never_no_drift():
    rng = np.random.default_rng(7)
    for det, cur in (
        (MMDDrift(x_ref=_gauss(rng, 50)), _gauss(rng, 29, shift=3.0)),
        (BBSDDrift(x_ref=rng.dirichlet(np.ones(4), 50)), rng.dirichlet(np.ones(4), 29)),
    ):
        r = det.predict(cur)
        assert r.decision == "insufficient_data" and r.is_drift is None and r.p_value is None
        assert r.n_cur == 29 and r.threshold == 0.05
    r = decide(_gauss(rng, 50), rng.dirichlet(np.ones(4), 50),
               _gauss(rng, 5), rng.dirichlet(np.ones(4), 5))
    assert r.decision == "insufficient_data"


def test_bbsd_detects_prior_shift_and_not_null():
    rng = np.random.default_rng(8)

    def probs(labels):  # a confident-ish classifier: the true class gets most mass
        logits = rng.normal(size=(len(labels), 4))
        logits[np.arange(len(labels)), labels] += 2.5
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True)

    det = BBSDDrift(x_ref=probs(rng.integers(0, 4, 400)), class_names=list("abcd"))
    shifted = det.predict(probs(np.r_[np.zeros(60, int), rng.integers(0, 4, 40)]))  # 75% class a
    assert shifted.is_drift and shifted.details["worst_class"] == "a"
    assert shifted.details["pred_share_cur"]["a"] > 0.5
    assert det.predict(probs(rng.integers(0, 4, 100))).p_value > 0.01


def test_combined_records_both_and_bonferroni():
    rng = np.random.default_rng(9)
    z_ref, p_ref = _gauss(rng, 80), rng.dirichlet(np.ones(3), 80)
    det = CombinedDrift(DriftConfig(n_permutations=99), (z_ref, p_ref), class_names=["x", "y", "z"])
    assert isinstance(det, DriftDetector)
    r = det.predict((_gauss(rng, 40, shift=1.0), rng.dirichlet(np.ones(3), 40)))
    assert r.method == "mmd+bbsd" and r.is_drift
    assert set(r.details) >= {"mmd", "bbsd", "correction"}
    sub = {k: r.details[k]["p_value"] for k in ("mmd", "bbsd")}
    assert r.p_value == pytest.approx(min(1.0, 2 * min(sub.values())))
    assert r.details["mmd"]["threshold"] == pytest.approx(0.025)


def test_result_record_is_plain_json():
    rng = np.random.default_rng(10)
    r = MMDDrift(DriftConfig(n_permutations=9), _gauss(rng, 40)).predict(_gauss(rng, 40))
    assert isinstance(r, DriftResult)
    d = r.to_dict()
    assert set(d) == {"is_drift", "decision", "p_value", "statistic", "threshold", "method",
                      "n_ref", "n_cur", "details"}
    assert type(d["p_value"]) is float and type(d["statistic"]) is float
    assert type(d["is_drift"]) is bool and d["decision"] in ("drift", "no_drift")
    json.dumps(d)  # no numpy scalars / arrays anywhere


def test_reference_subsample_and_clear_errors():
    rng = np.random.default_rng(11)
    det = MMDDrift(DriftConfig(max_ref=100, n_permutations=9), _gauss(rng, 300))
    r = det.predict(_gauss(rng, 40))
    assert r.n_ref == 300 and r.details["n_ref_used"] == 100
    with pytest.raises(ValueError, match="columns"):
        det.predict(_gauss(rng, 40, d=3))
    with pytest.raises(ValueError, match="NaN"):
        det.predict(np.full((40, 8), np.nan))
    with pytest.raises(ValueError, match="2-D"):
        det.predict(np.zeros(40))
    with pytest.raises(ValueError, match="fit"):
        MMDDrift().predict(_gauss(rng, 40))
    with pytest.raises(ValueError, match="min_samples"):
        MMDDrift(x_ref=_gauss(rng, 10))
    with pytest.raises(ValueError, match="alpha"):
        DriftConfig(alpha=1.5)
    with pytest.raises(ValueError, match="features"):
        CombinedDrift(x_ref=_gauss(rng, 40))


def _quality(rng, n, brightness=0.45):
    from models.quality import STAT_NAMES

    q = {k: rng.normal(1.0, 0.1, n) for k in STAT_NAMES}
    q["brightness"] = rng.normal(brightness, 0.08, n)
    q["blockiness"][:3] = np.nan  # tiny images have no blockiness: ignored, not an error
    return q


def test_quality_drift_detects_darkening_and_accepts_arrays():
    from models.quality import STAT_NAMES

    rng = np.random.default_rng(13)
    det = QualityDrift(x_ref=_quality(rng, 200))
    dark = det.predict(_quality(rng, 40, brightness=0.3))
    assert dark.is_drift and dark.details["worst_stat"] == "brightness"
    assert dark.details["correction"] == "bonferroni x7"
    same = _quality(rng, 40)
    arr = np.stack([same[k] for k in STAT_NAMES], axis=1)
    assert det.predict(arr).p_value == pytest.approx(det.predict(same).p_value)
    with pytest.raises(ValueError, match="quality statistics"):
        det.predict({"brightness": np.ones(40)})
    # a reference saved before a statistic existed: the others are still tested
    old_ref = {k: v for k, v in _quality(rng, 200).items() if not k.startswith("illuminant")}
    old = QualityDrift(x_ref=old_ref).predict(_quality(rng, 40, brightness=0.3))
    assert old.is_drift and old.details["correction"] == "bonferroni x5"


def test_quality_drift_catches_a_partly_affected_batch_tail():
    """30% of the batch far out in one statistic: Anderson-Darling weighs the tail."""
    rng = np.random.default_rng(21)
    det = QualityDrift(x_ref=_quality(rng, 300))
    hits = 0
    for _ in range(20):
        cur = _quality(rng, 50)
        cur["sharpness"][:15] = rng.normal(0.6, 0.05, 15)  # 30% blurred
        hits += det.predict(cur).is_drift
    assert hits >= 18
    # false alarms, over fresh references too (the guarantee is marginal: conditional on one
    # reference draw the rate varies, 1-11% over draws)
    nulls = 0
    for _ in range(10):
        ref_det = QualityDrift(x_ref=_quality(rng, 300))
        nulls += sum(ref_det.predict(_quality(rng, 50)).is_drift for _ in range(40))
    assert nulls <= 32  # of 400 at alpha 0.05: 20 expected (binomial sd 4.4)


def test_combined_with_quality_uses_three_way_bonferroni():
    rng = np.random.default_rng(14)
    ref = (_gauss(rng, 80), rng.dirichlet(np.ones(3), 80), _quality(rng, 80))
    det = CombinedDrift(DriftConfig(n_permutations=99), ref)
    r = det.predict((_gauss(rng, 40), rng.dirichlet(np.ones(3), 40), _quality(rng, 40, 0.25)))
    assert r.method == "mmd+bbsd+quality" and r.is_drift and r.details["triggered_by"] == "quality"
    assert r.details["quality"]["threshold"] == pytest.approx(0.05 / 3)
    sub = [r.details[k]["p_value"] for k in ("mmd", "bbsd", "quality")]
    assert r.p_value == pytest.approx(min(1.0, 3 * min(sub)))
    with pytest.raises(ValueError, match=r"lacks the views \['quality'\]"):
        det.predict((_gauss(rng, 40), rng.dirichlet(np.ones(3), 40)))
    q = _quality(rng, 40)
    r2 = decide(*ref[:2], _gauss(rng, 40), rng.dirichlet(np.ones(3), 40),
                quality_ref=ref[2], quality_cur=q)
    assert r2.details["correction"] == "bonferroni x3"


# --- adding a detector, as docs/extending.md says: one class + one catalog line ------
class ConfidenceDrift(Detector):
    """A new detector: has the mean top-class confidence moved? (Welch's t-test)."""

    method = "confidence"
    input_kind = "probs"

    def _fit(self, x_ref):
        self._ref = np.asarray(x_ref, dtype=np.float64).max(1)
        return len(self._ref)

    def _n(self, x_cur):
        return len(x_cur)

    def _score(self, x_cur):
        from scipy import stats

        res = stats.ttest_ind(self._ref, np.asarray(x_cur, dtype=np.float64).max(1),
                              equal_var=False)
        return float(abs(res.statistic)), float(res.pvalue), {}


def test_a_new_detector_is_one_class_and_one_catalog_line(monkeypatch):
    from models import catalog

    monkeypatch.setitem(catalog.DETECTORS, "confidence", "tests.test_drift:ConfidenceDrift")
    rng = np.random.default_rng(21)
    ref = (_gauss(rng, 100), rng.dirichlet(np.ones(3), 100))
    det = CombinedDrift(DriftConfig(n_permutations=49), ref, detectors=["mmd", "confidence"])
    sure = np.eye(3)[rng.integers(0, 3, 60)] * 0.97 + 0.01  # over-confident predictions
    r = det.predict((_gauss(rng, 60), sure))
    assert r.method == "mmd+confidence" and r.details["triggered_by"] == "confidence"
    assert r.is_drift and r.details["correction"] == "bonferroni x2"
