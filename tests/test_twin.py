"""models.estimate.twin: the camera fitted to a site recovers a known condition, leaves a
clean site alone, and measures its residual in resampling spreads."""

from __future__ import annotations

import numpy as np
import pytest

from models.estimate.twin import TwinConfig, fit_twin, gap_scale, set_moments, stat_matrix
from models.sim.camera import NEUTRAL, CameraParams, apply_camera

FAST = TwinConfig(grid=48, fit_images=24, names=("gain", "saturation", "blur", "noise_read"),
                  sweeps=3, points=7)


def _photos(n: int, seed: int) -> list[np.ndarray]:
    """Varied textured colour images: a random smooth colour field, shapes, fine detail."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:48, 0:48] / 48.0
    for _ in range(n):
        c0, c1 = rng.uniform(0.15, 0.85, 3), rng.uniform(0.15, 0.85, 3)
        t = rng.uniform(0, 1) * xx + rng.uniform(0, 1) * yy
        img = c0 + (c1 - c0) * (t / max(t.max(), 1e-6))[..., None]
        cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        img[disc] = rng.uniform(0.1, 0.9, 3)
        img = img + 0.08 * (rng.random((48, 48, 1)) - 0.5)
        out.append(np.clip(np.rint(255 * img), 0, 255).astype(np.uint8))
    return out


def test_two_samples_of_one_camera_are_about_one_standard_error_apart():
    rng = np.random.default_rng(0)
    ds = []
    for seed in range(20):  # pairs of samples of one camera: d^2 averages ~1
        a, b = _photos(60, 2 * seed), _photos(30, 2 * seed + 1)
        ma, mb = set_moments(stat_matrix(a), None), set_moments(stat_matrix(b), None)
        z = (ma[0] - mb[0]) / gap_scale(mb, len(b), len(a), 0)
        ds.append(float(np.mean(z ** 2)))
    assert 0.5 < float(np.mean(ds)) < 1.6, ds
    # a darker camera is many standard errors away
    dark = [apply_camera(im, CameraParams(gain=0.5), rng) for im in _photos(30, 99)]
    ma, mb = set_moments(stat_matrix(_photos(60, 0)), None), set_moments(stat_matrix(dark), None)
    z = (ma[0] - mb[0]) / gap_scale(mb, 30, 60, 0)
    assert float(np.sqrt(np.mean(z ** 2))) > 4


def test_the_twin_recovers_a_dark_noisy_camera():
    held, rest = _photos(60, 0), _photos(30, 1)
    truth = CameraParams(gain=0.45, noise_read=0.06)
    rng = np.random.default_rng(5)
    site = [apply_camera(im, truth, rng) for im in rest]
    fit = fit_twin(held, site, FAST)
    assert fit.params.gain == pytest.approx(0.45, abs=0.12)
    assert fit.params.noise_read == pytest.approx(0.06, abs=0.025)
    assert fit.params.blur < 0.005 and fit.params.saturation > 0.7
    assert fit.distance < 2.0 < fit.neutral_distance  # explained, where neutral is far off
    assert fit.describe().startswith("darker") and "noise sigma" in fit.describe()
    d = fit.to_dict()
    assert d["condition"] == fit.describe() and d["evaluations"] > 0 and d["seconds"] > 0


def test_a_clean_site_keeps_the_neutral_camera():
    held, site = _photos(60, 0), _photos(30, 2)
    fit = fit_twin(held, site, FAST)
    # at most a nudge (sampling noise), never a condition: within 1/10 of every range
    assert np.abs(fit.params.to_vector() - NEUTRAL.to_vector()).max() < 0.1, fit.params
    assert "darker" not in fit.describe() and "noise" not in fit.describe()
    assert fit.distance < 2.0 and fit.neutral_distance < 2.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="held-out"):
        fit_twin(_photos(2, 0), _photos(5, 1), FAST)
    with pytest.raises(ValueError, match="unknown camera parameter"):
        fit_twin(_photos(8, 0), _photos(5, 1), TwinConfig(names=("exposure",)))


def test_a_poor_fit_widens_the_interval_by_its_residual():
    from models.estimate.twin import TwinFit
    from models.estimate.twin_estimator import TwinEstimator

    imgs = _photos(40, 3)
    bright = np.array([im.mean() / 255 for im in imgs])
    labels = (bright > np.median(bright)).astype(int)  # "class 1" = the brighter half

    def predict(batch):  # a model that reads brightness against the training threshold
        return np.array([int(im.mean() / 255 > np.median(bright)) for im in batch])

    def fit_of(p, d):
        return TwinFit(p, d, d, 0.0, 0)

    twin = TwinEstimator(config=FAST)
    noisy = CameraParams(noise_read=0.08)
    a, _ = twin.estimate_images(predict, imgs, labels, imgs, fit=fit_of(noisy, 1.0), seed=1)
    b, _ = twin.estimate_images(predict, imgs, labels, imgs, fit=fit_of(noisy, 2.9), seed=1)
    # a residual within what a twin of the training camera reads widens nothing
    c, _ = twin.estimate_images(predict, imgs, labels, imgs,
                                fit=fit_of(noisy, twin.null_distance), seed=1)
    assert a.accuracy == b.accuracy and a.verifiable and b.verifiable
    k = 2.9 / twin.null_distance  # beyond it, the interval grows with the residual
    assert (b.high - b.low) > k * (a.high - a.low) - 1e-9 or b.low == 0.0 or b.high == 1.0
    assert (b.drop_high - b.drop_low) > k * (a.drop_high - a.drop_low) - 1e-9
    assert (c.drop_low, c.drop_high) == (a.drop_low, a.drop_high)
    with pytest.raises(ValueError, match="one label per"):
        twin.estimate_images(predict, imgs, labels[:5], imgs, fit=fit_of(noisy, 1.0))


def test_the_twin_estimator_measures_the_version_on_the_fitted_camera():
    """Known answers: a model that reads brightness is perfect on its own camera and at chance
    on a darker one; the estimator fits the darker camera to the site, reports the drop paired
    with the untouched images, calls it harmful, and a content change is not verifiable."""
    from models.estimate.base import Estimate, impact
    from models.estimate.twin_estimator import TwinEstimator

    held = _photos(60, 3)
    bright = np.array([im.mean() / 255 for im in held])
    thr = float(np.median(bright))
    labels = (bright > thr).astype(int)

    def predict(batch):
        return np.array([int(im.mean() / 255 > thr) for im in batch])

    twin = TwinEstimator(config=FAST, draws=2)
    rng = np.random.default_rng(4)
    dark_site = [apply_camera(im, CameraParams(gain=0.45), rng) for im in _photos(30, 4)]
    est, fit = twin.estimate_images(predict, held, labels, dark_site)
    assert isinstance(est, Estimate) and est.method == "twin" and est.verifiable
    assert fit.params.gain < 0.7 and est.twin["condition"].startswith("darker")
    assert est.source_accuracy >= 0.95 and est.accuracy == pytest.approx(0.5, abs=0.1)
    assert est.drop == pytest.approx(est.source_accuracy - est.accuracy)
    assert est.drop_low <= est.drop <= est.drop_high and est.low <= est.accuracy <= est.high
    assert impact(est, 0.05) == "harmful" and est.n == 30
    assert Estimate.from_json(est.to_json()) == est  # the stored form keeps the twin
    same, fit0 = twin.estimate_images(predict, held, labels, _photos(30, 5))
    assert fit0.params.is_neutral and same.drop == 0.0 and impact(same, 0.05) == "harmless"
    # a site the camera cannot make: stripes (content) where the training images have none
    stripes = [np.where((np.arange(48) // 3 % 2)[None, :, None] == 1, 250, 5).astype(np.uint8)
               * np.ones((48, 1, 3), np.uint8) for _ in range(30)]
    other, _ = twin.estimate_images(predict, held, labels, stripes)
    assert not other.verifiable and "residual" in other.reason and impact(other, 0.05) == "unknown"


def _png_files(images: list[np.ndarray]) -> list[bytes]:
    """Images as the bytes of PNG files (what a profile keeps: the original files)."""
    import io

    from PIL import Image

    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def test_profiles_keep_the_twin_images_and_older_ones_still_load(tmp_path):
    from models.network import Preprocessing
    from models.profile import ReferenceProfile

    files = _png_files(_photos(5, 6))
    prof = ReferenceProfile.from_arrays(np.zeros((3, 4)), np.full((3, 2), 0.5), ["a", "b"])
    prof.to_npz(tmp_path / "old.npz")  # a profile saved before the twin existed
    old = ReferenceProfile.from_npz(tmp_path / "old.npz")
    assert old.twin is None and old.twin_images(Preprocessing(img_size=32)) is None
    prof.set_twin_images(files, [0, 1, 0, 1, 1])
    prof.to_npz(tmp_path / "p.npz")
    back = ReferenceProfile.from_npz(tmp_path / "p.npz")
    images, labels = back.twin_images(Preprocessing(img_size=48))
    assert labels.tolist() == [0, 1, 0, 1, 1] and len(images) == 5
    assert all(np.array_equal(a, b) for a, b in zip(images, _photos(5, 6), strict=True))
    with pytest.raises(ValueError, match="labels"):
        prof.set_twin_images(files, [0])


def test_the_twin_is_shown_training_image_its_twin_and_a_site_image(tmp_path):
    from PIL import Image

    from models.profile import ReferenceProfile
    from tasks.reports.pages import twin_strip, write_twin_picture

    files = _png_files(_photos(3, 7))
    prof = ReferenceProfile.from_arrays(np.zeros((3, 4)), np.full((3, 2), 0.5), ["a", "b"])
    site = tmp_path / "site.png"
    Image.fromarray(_photos(1, 8)[0]).save(site)
    twin = {"params": CameraParams(gain=0.4).to_dict(), "grid": 48, "condition": "darker x0.40"}
    assert twin_strip(prof, twin, [str(site)]) == []  # a profile without the twin's images
    prof.set_twin_images(files, [0, 1, 0])
    strip = twin_strip(prof, twin, [str(site)])
    assert [s["name"] for s in strip] == ["training 1", "its twin 1", "training 2", "its twin 2",
                                          "site 1"]
    assert all(s["uri"].startswith("data:image/jpeg;base64,") for s in strip)
    out = write_twin_picture(tmp_path / "twin.jpg", prof, twin, [str(site)])
    with Image.open(out) as im:
        assert im.size == (3 * 48, 48)
        a = np.asarray(im.convert("L"), np.float64)
    assert a[:, 48:96].mean() < 0.6 * a[:, :48].mean()  # the twin is the darker camera
    assert write_twin_picture(tmp_path / "none.jpg", prof, None, [str(site)]) is None


def test_a_site_keeps_its_camera_while_it_fits_and_is_searched_again_when_it_changes():
    held, rest = _photos(60, 0), _photos(30, 1)
    rng = np.random.default_rng(5)
    dark = CameraParams(gain=0.45, noise_read=0.06)
    site = [apply_camera(im, dark, rng) for im in rest]
    first = fit_twin(held, site, FAST)
    assert not first.reused and first.evaluations > 20
    again = fit_twin(held, site, FAST, previous=first.params, previous_residual=first.distance)
    assert again.reused and again.evaluations == 1 and again.params == first.params
    assert again.distance == pytest.approx(first.distance, rel=0.3)
    # the camera changed (blur instead of darkness): the old one no longer fits, search again
    blurred = [apply_camera(im, CameraParams(blur=0.02), rng) for im in rest]
    other = fit_twin(held, blurred, FAST, previous=first.params,
                     previous_residual=first.distance)
    assert not other.reused and other.params.blur > 0.01 and other.params.gain > 0.8


def test_feature_distance_is_about_one_between_samples_and_large_for_another_population():
    from models.estimate.twin_estimator import feature_distance

    rng = np.random.default_rng(0)
    cov = rng.normal(size=(16, 16))
    same = [feature_distance(rng.normal(size=(240, 16)) @ cov, rng.normal(size=(120, 16)) @ cov)
            for _ in range(20)]
    assert 0.6 < float(np.mean(same)) < 1.6, same
    moved = rng.normal(size=(120, 16)) @ cov + 3.0  # every feature of every image moved
    assert feature_distance(rng.normal(size=(240, 16)) @ cov, moved) > 4
    assert np.isnan(feature_distance(np.zeros((1, 16)), np.zeros((5, 16))))


def test_a_twin_the_model_sees_far_from_the_site_is_not_verifiable():
    """Image statistics alike, the model's features apart (a change of content the camera
    statistics miss): not verifiable, and intervals widened by the feature distance."""
    from models.estimate.base import impact
    from models.estimate.twin import TwinFit
    from models.estimate.twin_estimator import TwinEstimator

    imgs = _photos(40, 3)
    labels = np.zeros(40, int)
    twin = TwinEstimator(config=FAST)
    fit = TwinFit(CameraParams(gain=0.8), 1.0, 5.0, 0.0, 0)
    rng = np.random.default_rng(0)

    def predict(batch):  # features: a cloud around 0 for every image the twin makes
        return np.zeros(len(batch), int), rng.normal(size=(len(batch), 8))

    near, _ = twin.estimate_images(predict, imgs, labels, imgs, fit=fit,
                                   site_features=rng.normal(size=(30, 8)))
    far, _ = twin.estimate_images(predict, imgs, labels, imgs, fit=fit,
                                  site_features=rng.normal(size=(30, 8)) + 5.0)
    assert near.verifiable and near.twin["feature_distance"] < 3
    assert not far.verifiable and far.twin["feature_distance"] > 12
    assert "the model sees the twin" in far.reason and impact(far, 0.05) == "unknown"


def test_a_failing_twin_leaves_the_check_an_unavailable_estimate_with_the_reason(tmp_path):
    from PIL import Image

    from models.network import Preprocessing
    from models.profile import ReferenceProfile
    from tasks.impact import twin_estimate

    class Broken:  # a version whose forward pass fails
        preprocessing = Preprocessing(img_size=48)

    prof = ReferenceProfile.from_arrays(np.zeros((3, 4)), np.full((3, 2), 0.5), ["a", "b"])
    prof.set_twin_images(_png_files(_photos(6, 1)), [0, 1, 0, 1, 0, 1])
    paths = []
    for i, im in enumerate(_photos(4, 2)):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    est = twin_estimate(prof, Broken(), paths + [str(tmp_path / "missing.png")])
    assert not est.available and est.reason.startswith("the site twin failed") and est.n == 4


def test_a_sites_previous_camera_is_reused_only_for_the_same_grid_and_photo_size():
    from models.estimate.twin import previous_camera

    rec = {"params": CameraParams(gain=0.5).to_dict(), "grid": 224, "native": [320, 240],
           "distance": 1.2}
    cam, residual = previous_camera(rec, 224, (320, 240))
    assert cam == CameraParams(gain=0.5) and residual == 1.2
    assert previous_camera(rec, 96, (320, 240)) == (None, 0.0)
    assert previous_camera(rec, 224, None) == (None, 0.0)
    assert previous_camera({**rec, "params": {"focus": 3}}, 224, (320, 240)) == (None, 0.0)
    assert previous_camera(None, 224) == (None, 0.0)


def test_a_fit_is_the_same_with_or_without_threads():
    """The held-out images are spread over threads; each image keeps its own noise draw, so
    the fit does not depend on how many threads ran it."""
    import dataclasses

    held, rest = _photos(40, 3), _photos(24, 4)
    site = [apply_camera(im, CameraParams(gain=0.6, noise_read=0.05), np.random.default_rng(2))
            for im in rest]
    one = fit_twin(held, site, dataclasses.replace(FAST, workers=1))
    two = fit_twin(held, site, dataclasses.replace(FAST, workers=2))
    assert one.params == two.params and one.distance == pytest.approx(two.distance, rel=1e-9)
    assert one.evaluations == two.evaluations


def test_a_given_normal_draw_is_the_noise_apply_camera_would_draw():
    from models.sim.camera import noise_shape

    img = _photos(1, 7)[0]
    p = CameraParams(gain=0.7, noise_shot=0.02, noise_read=0.03, jpeg_quality=60)
    for native in (None, (96, 72)):
        z = np.random.default_rng(11).standard_normal(noise_shape(img.shape, native),
                                                      dtype=np.float32)
        drawn = apply_camera(img, p, np.random.default_rng(11), native)
        given = apply_camera(img, p, None, native, normal=z)
        assert np.array_equal(drawn, given)


def test_the_scans_stop_past_a_minimum_and_still_find_it():
    """Forward selection with scans that stop once the objective rises twice in a row: on a
    separable bowl (one parameter matters) it finds the minimum with fewer evaluations than
    every scan point would take."""
    from models.estimate.search import scan_points, stepwise_search

    target = np.array([0.5, 0.5, 0.5, 0.5])
    target[1] = 0.8
    calls = []

    def f(u: np.ndarray) -> float:
        calls.append(1)
        return float(40 * np.sum((np.asarray(u) - target) ** 2))

    neutral = np.full(4, 0.5)
    u, best = stepwise_search(f, neutral, points=7, sweeps=3, price=0.1, max_changes=4)
    assert u[1] == pytest.approx(0.8, abs=0.03) and np.allclose(u[[0, 2, 3]], 0.5)
    full_scan = sum(len(scan_points(0.5, 7)) for _ in range(4)) * 2  # two forward steps
    assert len(calls) < full_scan and best < 0.05


def test_a_memo_runs_no_model_pass_for_a_kept_camera_and_changes_nothing():
    """The warm worker's memo (per version and held-out set): the next check of a site whose
    camera is kept runs the model on nothing, with the same estimate."""
    from models.estimate.twin_estimator import TwinEstimator

    held = _photos(40, 6)
    labels = (np.array([im.mean() for im in held]) > np.median([im.mean() for im in held])
              ).astype(int)
    thr = float(np.median([im.mean() for im in held]))
    calls: list[int] = []

    def predict(batch):
        calls.append(len(batch))
        return np.array([int(im.mean() > thr) for im in batch])

    twin = TwinEstimator(config=FAST, draws=2)
    site = [apply_camera(im, CameraParams(gain=0.5, noise_read=0.04), np.random.default_rng(1))
            for im in _photos(24, 7)]
    plain, fit = twin.estimate_images(predict, held, labels, site)
    memo: dict = {}
    first, _ = twin.estimate_images(predict, held, labels, site, fit=fit, memo=memo)
    calls.clear()
    again, _ = twin.estimate_images(predict, held, labels, site, fit=fit, memo=memo)
    assert calls == [] and again == first == plain


def test_the_search_runs_on_a_few_images_that_stand_for_all_of_them():
    from models.estimate.twin import representative

    rng = np.random.default_rng(3)
    stats = np.column_stack([rng.lognormal(0, 1, 240), rng.normal(5, 2, 240),
                             rng.uniform(0, 1, 240)])
    sd = stats.std(0)

    def gap(idx: np.ndarray) -> float:  # the subset's means and spreads against the whole set
        s = stats[idx]
        return float(np.sum(((s.mean(0) - stats.mean(0)) / sd) ** 2)
                     + np.sum((s.std(0) / sd - 1) ** 2))

    chosen = representative(stats, 8, np.random.default_rng(0))
    assert len(set(chosen.tolist())) == 8 and list(chosen) == sorted(chosen)
    randoms = [gap(np.random.default_rng(s).choice(240, 8, replace=False)) for s in range(200)]
    assert gap(chosen) < 0.1 * float(np.median(randoms)), (gap(chosen), np.median(randoms))
    assert np.array_equal(chosen, representative(stats, 8, np.random.default_rng(0)))
    assert np.array_equal(representative(stats[:5], 8, rng), np.arange(5))  # too few: all


def test_eight_standing_images_recover_the_dark_noisy_camera_as_twenty_four_do():
    import dataclasses

    held, rest = _photos(60, 0), _photos(30, 1)
    site = [apply_camera(im, CameraParams(gain=0.45, noise_read=0.06), np.random.default_rng(5))
            for im in rest]
    few = fit_twin(held, site, dataclasses.replace(FAST, fit_images=8))
    many = fit_twin(held, site, FAST)
    assert few.params.gain == pytest.approx(0.45, abs=0.12)
    assert few.params.noise_read == pytest.approx(0.06, abs=0.025)
    assert few.distance < many.distance + 0.3
