from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.sim.conditions import CONDITIONS, apply_condition, apply_to_fraction


def _photo(seed: int = 0, h: int = 48, w: int = 64) -> np.ndarray:
    """A smooth colourful image with some edges (so blur/JPEG have something to destroy)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + 1), np.cos(5 * yy), np.sin(4 * (xx + yy))], axis=-1)
    img = 128 + 80 * base + 30 * (g.random((h, w, 1)) > 0.8)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(CONDITIONS))
def test_every_condition_and_severity_keeps_shape_and_changes_image(name):
    img = _photo()
    for sev in CONDITIONS[name].severities:
        out = apply_condition(img, name, sev, np.random.default_rng(1))
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - img.astype(int)).mean() > 1.0, (name, sev)


@pytest.mark.parametrize("name", list(CONDITIONS))
def test_deterministic_given_seed_and_pil_in_pil_out(name):
    img = _photo()
    a = apply_condition(img, name, 1, 123)
    b = apply_condition(img, name, 1, 123)
    np.testing.assert_array_equal(a, b)
    pil = apply_condition(Image.fromarray(img), name, 1, 123)
    assert isinstance(pil, Image.Image) and pil.mode == "RGB" and pil.size == (64, 48)
    np.testing.assert_array_equal(np.asarray(pil), a)


def test_severity_orders_the_damage():
    img = _photo()
    night = [apply_condition(img, "night", s, 0).mean() for s in (1, 2, 3)]
    assert img.mean() > night[0] > night[1] > night[2]
    lap = []
    for s in (1, 2, 3):
        x = apply_condition(img, "blur", s).astype(float).mean(-1)
        lap.append(np.abs(np.diff(x, axis=1)).mean())
    assert lap[0] > lap[1] > lap[2]
    grey = apply_condition(img, "greyscale", 2)
    assert np.all(grey[..., 0] == grey[..., 1]) and np.all(grey[..., 1] == grey[..., 2])
    cast = apply_condition(img, "colour_cast", 2).astype(float)
    assert cast[..., 0].mean() / cast[..., 2].mean() > img[..., 0].mean() / img[..., 2].mean()


def test_grey_2d_input_becomes_rgb():
    out = apply_condition(_photo()[..., 0], "jpeg", 1)
    assert out.shape == (48, 64, 3)


def test_fraction_hits_exactly_that_many_and_leaves_the_rest():
    imgs = [_photo(i) for i in range(10)]
    out, hit = apply_to_fraction(imgs, "night", 2, fraction=0.3, rng=5)
    assert hit.sum() == 3 and len(out) == 10
    for o, i, h in zip(out, imgs, hit, strict=True):
        assert (o is i) != bool(h)
    out2, hit2 = apply_to_fraction(imgs, "night", 2, fraction=0.3, rng=5)
    np.testing.assert_array_equal(hit, hit2)
    np.testing.assert_array_equal(np.stack(out), np.stack(out2))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown condition"):
        apply_condition(_photo(), "fog", 1)
    with pytest.raises(ValueError, match="severities"):
        apply_condition(_photo(), "blur", 7)
    with pytest.raises(ValueError, match="uint8"):
        apply_condition(_photo().astype(np.float32), "blur", 1)
    with pytest.raises(ValueError, match="fraction"):
        apply_to_fraction([_photo()], "blur", 1, fraction=1.5)
