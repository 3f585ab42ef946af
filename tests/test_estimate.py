"""The label-free accuracy estimators (models/estimate*) on synthetic outputs with known
accuracy: descriptors, the meta-set targets, a regression that must learn a known drop, the
saved state, the novelty check, and the impact / notification rules."""

from __future__ import annotations

import io

import numpy as np
import pytest

from models.estimate.bank import MetaBank
from models.estimate.base import Estimate, Estimator, estimator_from_state, impact, unavailable
from models.estimate.describe import STAT_SCALE, Batch, RefView, describe, pca_basis

K = 3
S = len(STAT_SCALE)


def _calibrated(rng, n: int, conf_lo: float, conf_hi: float):
    """Softmax outputs whose max-confidence IS the probability of being right (a calibrated
    toy): returns (probs (n, K), labels (n,))."""
    conf = rng.uniform(conf_lo, conf_hi, n)
    pred = rng.integers(0, K, n)
    probs = np.full((n, K), 0.0)
    probs[np.arange(n), pred] = conf
    for i in range(n):  # the rest of the mass on the other classes
        others = [c for c in range(K) if c != pred[i]]
        probs[i, others] = (1 - conf[i]) / (K - 1)
    right = rng.random(n) < conf
    labels = np.where(right, pred, (pred + 1 + rng.integers(0, K - 1, n)) % K)
    return probs, labels


def _batch(rng, probs, z_shift: float = 0.0, bright: float = 0.0) -> Batch:
    n = len(probs)
    z = rng.normal(size=(n, 16)) + z_shift
    stats = np.abs(rng.normal(1.0, 0.1, size=(n, S)))
    stats[:, list(STAT_SCALE).index("brightness")] = rng.normal(0.5 + bright, 0.05, n)
    return Batch(z, probs, stats)


def _ref(rng, n=4000):
    probs, y = _calibrated(rng, n, 0.4, 1.0)
    b = _batch(rng, probs)
    return b, y, RefView(b, y, pca_basis(b.z))


# --- descriptors --------------------------------------------------------------------------------
def test_atc_and_doc_are_exact_on_a_calibrated_toy():
    rng = np.random.default_rng(0)
    ref_b, y, ref = _ref(rng, 3000)
    # ATC on the reference itself: the threshold is defined so that the fraction above it is
    # the accuracy, so its estimate is the accuracy (up to ties of the quantile).
    d = describe(ref, ref_b)
    assert abs(d["o_atc_mc"]) < 1e-3 and abs(d["o_dconf"]) < 1e-12
    # A calibrated site with lower confidence: accuracy = mean confidence, so DoC (drop =
    # the fall of the mean confidence) is exact in expectation.
    probs, ys = _calibrated(rng, 3000, 0.3, 0.8)
    site_acc = float((probs.argmax(1) == ys).mean())
    d = describe(ref, _batch(rng, probs))
    doc = ref.acc + d["o_dconf"]
    assert ref.acc - site_acc > 0.1  # the site is really worse ...
    assert abs(doc - site_acc) < 0.03  # ... and DoC says by how much (binomial noise ~0.01)


def test_descriptors_see_a_feature_and_a_quality_shift():
    rng = np.random.default_rng(1)
    _, _, ref = _ref(rng, 2000)
    probs, _ = _calibrated(rng, 400, 0.4, 1.0)
    same = describe(ref, _batch(rng, probs))
    moved = describe(ref, _batch(rng, probs, z_shift=1.0, bright=-0.2))
    assert abs(same["f_mean2"]) < 0.3 and moved["f_mean2"] > 5  # de-biased: ~0 when equal
    assert moved["f_mmd2"] > same["f_mmd2"] + 0.05
    assert moved["q_brightness_mean"] < -3 and abs(same["q_brightness_mean"]) < 0.3


# --- the meta-sets and a regression that must learn a known drop ------------------------------------
def _world(seed: int = 0, n: int = 240):
    """A toy domain where a shift of severity s darkens the images by s/4, moves the features
    by s and makes a fraction s/2 of the correct predictions wrong: true drop = acc * s / 2."""
    rng = np.random.default_rng(seed)
    probs, y = _calibrated(rng, n, 0.5, 1.0)
    ref = _batch(rng, probs)

    def shifted(s: float, r: np.random.Generator) -> Batch:
        p = probs.copy()
        right = p.argmax(1) == y
        flip = right & (r.random(n) < s / 2)
        p[flip] = np.roll(p[flip], 1, axis=1)  # now predicts another class
        b = _batch(r, p, z_shift=s, bright=-s / 4)
        return b

    return ref, y, shifted


def test_meta_set_targets_are_the_paired_population_drop():
    ref, y, shifted = _world()
    rng = np.random.default_rng(3)
    bank = [shifted(s, rng) for s in (0.0, 0.4)]
    meta = MetaBank.build(ref, y, bank, [frozenset(), frozenset({"x"})], seed=0)
    acc_ref = float((ref.probs.argmax(1) == y).mean())
    for j, b in enumerate(bank):
        want = acc_ref - float((b.probs.argmax(1) == y).mean())
        assert meta.spec_drop[j] == pytest.approx(want)
        uniform = (meta.spec == j) & ~meta.prior_shift
        assert np.allclose(meta.D[uniform], want)  # every uniform draw carries the spec's drop
    assert set(meta.half) == {0, 1} and meta.prior_shift.any()


@pytest.fixture(scope="module")
def fitted():
    from models.estimate.meta import MetaGBM

    ref, y, shifted = _world()
    rng = np.random.default_rng(5)
    grid = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85] * 2
    bank = [shifted(s, rng) for s in grid]
    meta = MetaBank.build(ref, y, bank, [frozenset({f"s{i}"}) for i in range(len(bank))], seed=0)
    est = MetaGBM(n_estimators=150).fit(meta)
    return est, shifted, float((ref.probs.argmax(1) == y).mean()), y


def test_the_regression_learns_a_drop_it_was_not_fitted_on(fitted):
    est, shifted, acc_ref, y = fitted
    rng = np.random.default_rng(11)
    for s in (0.3, 0.6):  # severities between the bank's
        site = shifted(s, rng)
        e = est.estimate(site)
        true_drop = acc_ref - float((site.probs.argmax(1) == y).mean())
        assert e.verifiable, e.reason
        assert abs(e.drop - true_drop) < 0.05, (s, e.drop, true_drop)
        assert e.drop_low - 0.02 <= true_drop <= e.drop_high + 0.02
        assert e.low <= e.accuracy <= e.high and e.source_accuracy == pytest.approx(acc_ref)
    clean = est.estimate(shifted(0.0, rng))
    assert abs(clean.drop) < 0.05 and clean.method == "meta-gbm"


def test_the_state_is_plain_arrays_and_gives_the_same_estimates(fitted):
    from models.estimate.meta import gbm_predict_arrays

    est, shifted, _, _ = fitted
    buf = io.BytesIO()
    np.savez(buf, **est.state())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:  # no object arrays anywhere
        back = estimator_from_state({k: z[k] for k in z.files})
    site = shifted(0.4, np.random.default_rng(2))
    assert back.estimate(site) == est.estimate(site)
    # the exported trees predict what scikit-learn's model predicts
    X = est._std(est.describe(site))  # noqa: SLF001 -- checking the export itself
    assert np.allclose(gbm_predict_arrays(est.trees, X), est._reg.predict(X))  # noqa: SLF001


def test_a_content_change_is_not_verifiable(fitted):
    """Features and outputs move far while the image statistics stay: not a camera change."""
    est, _, _, _ = fitted
    rng = np.random.default_rng(4)
    probs = np.full((240, K), 1 / K)  # a model that no longer knows anything
    probs[:, 0] += 0.01
    probs /= probs.sum(1, keepdims=True)
    e = est.estimate(_batch(rng, probs, z_shift=6.0))
    assert not e.verifiable and "not explained by the image statistics" in e.reason


def test_every_baseline_fits_and_estimates(fitted):
    from models.catalog import ESTIMATORS, load

    est, shifted, _, _ = fitted
    ref, y, _ = _world()
    rng = np.random.default_rng(8)
    meta = MetaBank.build(ref, y, [shifted(s, rng) for s in (0.0, 0.3, 0.6)],
                          [frozenset({"a"}), frozenset({"b"}), frozenset({"c"})], seed=0)
    site = shifted(0.3, rng)
    for name in ESTIMATORS:
        if name == "meta-gbm" or getattr(load("estimator", name), "needs_images", False):
            continue  # (the twin is given images: tests/test_twin.py)
        e = load("estimator", name)().fit(meta)
        out = estimator_from_state(e.state()).estimate(site)
        assert isinstance(out, Estimate) and out.method == name and out.verifiable


class HalfConf(Estimator):
    """A new (toy) estimator: half of the drop in average confidence."""

    name = "half-conf"

    def _point(self, X):
        return -0.5 * X[:, self.names.index("o_dconf")]


def test_a_new_estimator_is_one_class_and_one_catalog_line(fitted, monkeypatch):
    from models import catalog

    monkeypatch.setitem(catalog.ESTIMATORS, "half-conf", "tests.test_estimate:HalfConf")
    est, shifted, _, _ = fitted
    ref, y, _ = _world()
    rng = np.random.default_rng(9)
    meta = MetaBank.build(ref, y, [shifted(s, rng) for s in (0.0, 0.3, 0.6)],
                          [frozenset({"a"}), frozenset({"b"}), frozenset({"c"})], seed=0)
    e = catalog.load("estimator", "half-conf")().fit(meta)
    back = estimator_from_state(e.state())  # saved with a model version, found by name
    out = back.estimate(shifted(0.3, rng))
    assert isinstance(back, HalfConf) and out.method == "half-conf"
    assert out.to_dict()["method"] == "half-conf"


# --- impact and who hears about it ----------------------------------------------------------------
def _est(lo, hi, verifiable=True):
    return {"drop_low": lo, "drop_high": hi, "verifiable": verifiable}


def test_impact_rule():
    assert impact(_est(0.05, 0.20), 0.03) == "harmful"
    assert impact(_est(-0.02, 0.02), 0.03) == "harmless"
    assert impact(_est(0.00, 0.08), 0.03) == "unknown"  # straddles the tolerance
    assert impact(_est(0.05, 0.20, verifiable=False), 0.03) == "unknown"
    assert impact(unavailable("old profile"), 0.03) == "unknown"
    assert impact(_est(0.05, 0.20), 0.10) == "unknown"  # the site's own tolerance


def test_who_hears_follows_alert_on(tmp_path):
    from emowatch.sites import Site
    from tasks.impact import should_notify

    harmful = Site(name="a", inbox=tmp_path)
    every = Site.model_validate({"name": "b", "inbox": tmp_path, "drift": {"alert_on": "drift"}})
    assert harmful.drift.alert_on == "harmful" and harmful.drift.max_accuracy_drop == 0.03
    cases = [("drift", "harmless"), ("drift", "unknown"), ("drift", "harmful"),
             ("no_drift", "harmful"), ("no_drift", "unknown"), ("no_drift", "harmless")]
    assert [should_notify(harmful, d, i) for d, i in cases] == [False, True, True, True, False,
                                                               False]
    assert [should_notify(every, d, i) for d, i in cases] == [True, True, True, False, False,
                                                             False]


def test_an_old_profile_loads_and_has_no_estimate(tmp_path):
    from models.profile import ReferenceProfile
    from tasks.featurize import FeatureSet
    from tasks.impact import NO_ESTIMATOR, estimate_accuracy

    old = tmp_path / "old.npz"
    ReferenceProfile.from_arrays(np.zeros((4, 8)), np.full((4, 3), 1 / 3), ["a", "b", "c"]).to_npz(old)
    prof = ReferenceProfile.from_npz(old)
    assert prof.estimator is None and prof.accuracy_estimator() is None
    fs = FeatureSet(["x", "y"], np.zeros((2, 8), np.float32), np.full((2, 3), 1 / 3, np.float32), {})
    e = estimate_accuracy(prof, fs)
    assert e.accuracy is None and not e.verifiable and e.reason == NO_ESTIMATOR
    assert impact(e, 0.03) == "unknown"


def test_a_profile_keeps_its_estimator(fitted, tmp_path):
    from models.profile import ReferenceProfile

    est, shifted, _, _ = fitted
    p = ReferenceProfile.from_arrays(np.zeros((4, 16)), np.full((4, K), 1 / K), ["a", "b", "c"])
    p.estimator = est.state()
    p.to_npz(tmp_path / "p.npz")
    back = ReferenceProfile.from_npz(tmp_path / "p.npz")
    site = shifted(0.2, np.random.default_rng(1))
    assert back.accuracy_estimator().estimate(site) == est.estimate(site)


# --- fitting on a real (tiny) network -------------------------------------------------------------
def test_fit_estimator_runs_the_bank_through_the_model():
    import torch

    from models.estimate.fit import EstimatorConfig, fit_estimator, shifted_batches
    from models.network import Checkpoint, EmotionNet, NetConfig, preprocessing_for
    from models.sim.shifts import bank_specs

    torch.manual_seed(0)
    cfg = NetConfig(backbone="tiny", img_size=32, pretrained=False, num_classes=3)
    ckpt = Checkpoint(EmotionNet(cfg).eval(), ["a", "b", "c"], preprocessing_for(cfg))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(24)]
    labels = [i % 3 for i in range(24)]
    specs = bank_specs(2, 1, 7)
    events = []
    ref, bank = shifted_batches(ckpt, images, specs, progress=events.append)
    assert len(bank) == 3 and len(ref) == 24 and ref.stats.shape == (24, S)
    assert [e["done"] for e in events] == [1, 2, 3]
    est, info = fit_estimator(ckpt, images, labels, EstimatorConfig(specs_mild=2, specs_severe=1,
                                                                    max_images=16))
    assert info["n_images"] == 16 and info["n_specs"] == 3 and info["seconds"] >= 0
    assert est.estimate(ref.take(np.arange(10))).method == "meta-gbm"
    with pytest.raises(ValueError, match="unknown estimator"):
        EstimatorConfig(method="magic").validate()
