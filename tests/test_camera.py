"""models.sim.camera: each stage with a known answer, the identity, the vector form, words."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.sim.camera import BOUNDS, NAMES, NEUTRAL, CameraParams, apply_camera, apply_camera_batch


def _scene(h: int = 64, w: int = 80, seed: int = 0) -> np.ndarray:
    """A textured colour image: smooth gradients plus fine detail."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([0.3 + 0.4 * xx, 0.5 + 0.2 * yy, 0.6 - 0.3 * xx], -1)
    detail = 0.15 * (rng.random((h, w, 1)) - 0.5)
    return np.clip(np.rint(255 * (base + detail)), 0, 255).astype(np.uint8)


def _flat(value: int, h: int = 96, w: int = 96) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def _highfreq(a: np.ndarray) -> float:
    g = a.astype(np.float64).mean(2)
    return float(np.abs(np.diff(g, axis=1)).mean() + np.abs(np.diff(g, axis=0)).mean())


def test_neutral_is_the_identity_byte_for_byte():
    img = _scene()
    assert NEUTRAL.is_neutral and np.array_equal(apply_camera(img, NEUTRAL, rng=0), img)
    pil = Image.fromarray(img)
    assert np.array_equal(apply_camera(pil, CameraParams(), rng=1), img)


def test_exposure_gain_and_gamma_known_answers():
    out = apply_camera(_flat(100), CameraParams(gain=0.5), rng=0)
    assert np.all(out == 50)  # 100/255 * 0.5 -> 50
    out = apply_camera(_flat(200), CameraParams(gain=3.0), rng=0)
    assert np.all(out == 255)  # clipped
    out = apply_camera(_flat(128), CameraParams(gamma=2.0), rng=0)
    assert np.all(out == round(255 * (128 / 255) ** 2))


def test_colour_gains_and_greyscale():
    img = _scene()
    grey = apply_camera(img, CameraParams(saturation=0.0), rng=0).astype(int)
    assert np.abs(grey[..., 0] - grey[..., 1]).max() <= 1 and np.abs(grey[..., 1] - grey[..., 2]).max() <= 1
    luma = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(grey[..., 0] - luma).max() <= 1.0  # greyscale keeps the luma
    warm = apply_camera(_flat(100), CameraParams(r_gain=1.2, b_gain=0.8), rng=0)
    assert tuple(warm[0, 0]) == (120, 100, 80)


def test_blur_and_resolution_remove_detail_and_keep_the_mean():
    img = _scene()
    for p in (CameraParams(blur=0.02), CameraParams(scale=0.25)):
        out = apply_camera(img, p, rng=0)
        assert out.shape == img.shape
        assert _highfreq(out) < 0.5 * _highfreq(img)
        assert abs(out.mean() - img.mean()) < 2.0


def test_vignetting_darkens_the_corners_not_the_centre():
    out = apply_camera(_flat(200, 65, 65), CameraParams(vignette=0.5), rng=0).astype(int)
    assert out[32, 32, 0] == 200 and out[0, 0, 0] == 100  # 1 - 0.5 * 1 at the corner


def test_noise_has_the_model_std_and_is_seeded():
    p = CameraParams(noise_shot=0.02, noise_read=0.05)
    a = apply_camera(_flat(128, 200, 200), p, rng=3).astype(np.float64) / 255
    x = 128 / 255
    assert a.std() == pytest.approx(np.sqrt(0.02 * x + 0.05 ** 2), rel=0.05)
    assert np.array_equal(apply_camera(_flat(128), p, rng=3), apply_camera(_flat(128), p, rng=3))
    b1, b2 = apply_camera_batch([_flat(128)] * 2, p, rng=4)
    assert not np.array_equal(b1, b2)  # one draw per image


def test_jpeg_adds_block_artefacts():
    img = _scene(64, 64)
    out = apply_camera(img, CameraParams(jpeg_quality=10), rng=0)
    assert out.shape == img.shape and not np.array_equal(out, img)
    assert np.abs(out.astype(int) - img.astype(int)).mean() > 1.0


def test_vector_round_trip_bounds_and_partial_names():
    p = CameraParams(gain=0.4, saturation=0.2, blur=0.01, jpeg_quality=40)
    u = p.to_vector()
    assert u.shape == (len(NAMES),) and np.all((u >= 0) & (u <= 1))
    back = CameraParams.from_vector(u)
    assert all(getattr(back, n) == pytest.approx(getattr(p, n)) for n in NAMES)
    only = CameraParams.from_vector([0.0, 1.0], names=["gain", "noise_read"])
    assert only.gain == BOUNDS["gain"][1] and only.noise_read == BOUNDS["noise_read"][2]
    assert only.saturation == 1.0  # the rest neutral
    with pytest.raises(ValueError, match="gain"):
        CameraParams(gain=10.0)


def test_the_condition_in_words():
    assert NEUTRAL.describe() == "as the training camera"
    assert CameraParams(gain=0.4, saturation=0.0, noise_read=0.06).describe() == (
        "darker x0.40, greyscale, noise sigma 0.06")
    words = CameraParams(blur=0.01, scale=0.5, jpeg_quality=30, b_gain=1.3).describe()
    assert "blue cast" in words and "blurred" in words and "low resolution x0.50" in words
    assert "JPEG quality 30" in words
    assert CameraParams(b_gain=0.63, g_gain=1.09).describe().startswith("yellow (warm) cast")


def test_noise_and_jpeg_act_at_the_cameras_own_photo_size():
    """A camera whose photos are twice the grid: its sensor noise, drawn on its own pixels and
    then resized to the grid, is smoothed (weaker on the grid than the same sigma drawn there)
    and still lifts the shadows where it was clipped at black; without noise or JPEG the size
    changes nothing."""
    from models.sim.camera import CameraParams, apply_camera, native_size

    dark = np.full((64, 64, 3), 4, np.uint8)
    p = CameraParams(noise_read=0.05)
    on_grid = apply_camera(dark, p, 0).astype(float)
    native = apply_camera(dark, p, 0, native=(128, 128)).astype(float)
    assert native.shape == on_grid.shape == dark.shape
    assert native.std() < 0.7 * on_grid.std()
    assert native.mean() > dark.mean() + 1  # clipped at black before the resize: lifted
    exposure = CameraParams(gain=0.5)
    assert np.array_equal(apply_camera(dark, exposure, native=(128, 128)),
                          apply_camera(dark, exposure))
    assert np.array_equal(apply_camera(dark, CameraParams(), native=(128, 128)), dark)
    assert native_size([(320, 240), (300, 225), (640, 480)], 224) == (320, 240)
    assert native_size([(4000, 3000)], 224) == (896, 672)  # at most 4x the grid
    assert native_size([], 224) is None


def test_the_trip_to_the_cameras_size_and_back_does_not_blur_the_twin():
    """Noise or JPEG at the camera's own size change the grid image by what they do there,
    not by the resize there and back (a blur the site's photos, resized once, do not have):
    barely-there JPEG leaves a detailed image's sharpness alone, and more JPEG lowers it
    step by step."""
    from models.quality import image_stats
    from models.sim.camera import CameraParams, apply_camera

    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(128, 40, (96, 96, 3)), 0, 255).astype(np.uint8)  # fine detail
    sharp = [image_stats(apply_camera(img, CameraParams(jpeg_quality=q), native=(150, 120)))
             ["sharpness"] for q in (100, 97, 60, 20)]
    assert sharp[1] > 0.9 * sharp[0], sharp  # the round trip alone had lowered it a lot
    assert sharp[1] > sharp[2] > sharp[3], sharp


def test_seeded_camera_is_the_same_on_any_number_of_threads():
    """Each image's noise draw is seeded by its index, so spreading the images over threads
    changes nothing (the twin's proxies and the estimate's draws are reproducible)."""
    from models.sim.camera import apply_camera_seeded

    p = CameraParams(gain=0.5, noise_shot=0.01, noise_read=0.02, jpeg_quality=60)
    imgs = [_flat(v, 64, 64) for v in (60, 120, 200)]
    one = apply_camera_seeded(imgs, p, [3, 1], workers=1)
    two = apply_camera_seeded(imgs, p, [3, 1], workers=2)
    assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))
    assert not np.array_equal(one[0], apply_camera_seeded(imgs, p, [3, 2])[0])  # another draw
    assert np.array_equal(one[1], apply_camera(imgs[1], p, np.random.default_rng([3, 1, 1])))
