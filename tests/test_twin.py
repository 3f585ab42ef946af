"""models.estimate.twin: the camera fitted to a site recovers a known condition, leaves a
clean site alone, and measures its residual in resampling spreads."""

from __future__ import annotations

import numpy as np
import pytest

from models.estimate.twin import TwinConfig, descriptors, fit_twin, resampling_spread, stat_matrix
from models.sim.camera import NEUTRAL, CameraParams, apply_camera

FAST = TwinConfig(grid=48, fit_images=24, names=("gain", "saturation", "blur", "noise_read"),
                  design=4, restarts=1, sweeps=4, points=7, resamples=30)


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


def test_a_clean_sample_is_about_one_resampling_spread_away():
    held, site = _photos(60, 0), _photos(30, 1)
    st = stat_matrix(held)
    scale = resampling_spread(st, None, len(site), 60, np.random.default_rng(0))
    z = (descriptors(stat_matrix(site), None) - descriptors(st, None)) / scale
    assert 0.3 < float(np.sqrt(np.mean(z ** 2))) < 2.0


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


def test_twin_accuracy_known_answers_and_a_wider_interval_for_a_poor_fit():
    from models.estimate.twin import TwinFit, twin_accuracy

    imgs = _photos(40, 3)
    bright = np.array([im.mean() / 255 for im in imgs])
    labels = (bright > np.median(bright)).astype(int)  # "class 1" = the brighter half

    def predict(batch):  # a model that reads brightness against the training threshold
        return np.array([int(im.mean() / 255 > np.median(bright)) for im in batch])

    def fit_of(p, d):
        return TwinFit(p, d, d, 0.0, 0)

    clean = twin_accuracy(predict, imgs, labels, fit_of(CameraParams(), 0.8), grid=48, draws=1)
    assert clean.accuracy >= 0.95 and clean.low <= clean.accuracy <= clean.high
    dark = twin_accuracy(predict, imgs, labels, fit_of(CameraParams(gain=0.3), 0.8), grid=48)
    assert dark.accuracy == pytest.approx(0.5, abs=0.05)  # everything reads as class 0
    noisy = CameraParams(noise_read=0.08)
    a = twin_accuracy(predict, imgs, labels, fit_of(noisy, 1.0), grid=48, seed=1)
    b = twin_accuracy(predict, imgs, labels, fit_of(noisy, 3.0), grid=48, seed=1)
    assert a.accuracy == b.accuracy and b.widened_by == 3.0
    assert (b.high - b.low) > 2.0 * (a.high - a.low) - 1e-9 or b.low == 0.0 or b.high == 1.0
    with pytest.raises(ValueError, match="one label per"):
        twin_accuracy(predict, imgs, labels[:5], fit_of(noisy, 1.0), grid=48)
