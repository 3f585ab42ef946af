"""Synthetic faces: deterministic, balanced, label carried only by the declared regions."""

from __future__ import annotations

import numpy as np
import pytest

from models.sim.synthetic import DEFAULT_CLASSES, make_faces


def test_shapes_and_determinism():
    a = make_faces(40, size=48, seed=3)
    b = make_faces(40, size=48, seed=3)
    c = make_faces(40, size=48, seed=4)
    assert a.images.shape == (40, 48, 48, 3) and a.images.dtype == np.uint8
    assert a.labels.dtype == np.int64 and a.masks.shape == (40, 48, 48) and a.masks.dtype == bool
    assert a.classes == DEFAULT_CLASSES
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert np.bincount(a.labels, minlength=4).tolist() == [10, 10, 10, 10]


def test_masks_are_the_declared_regions():
    f = make_faces(30, size=64, seed=0)
    np.testing.assert_array_equal(f.masks, f.region_masks["brows"] | f.region_masks["mouth"])
    share = f.masks.mean(axis=(1, 2))
    assert (share > 0.03).all() and (share < 0.35).all()  # small, non-empty salient areas
    # salient regions lie inside the face; the marker lies outside the face box
    assert (f.masks & ~f.region_masks["face"]).sum() == 0
    assert (f.region_masks["marker"] & f.region_masks["face"]).mean() < 0.002
    m = make_faces(30, size=64, seed=0, cue="marker")
    np.testing.assert_array_equal(m.masks, m.region_masks["marker"])


def test_label_only_changes_salient_regions():
    """Pixels outside the label regions are independent of the label: class means agree there."""
    f = make_faces(800, size=32, seed=1, noise=0.0)
    outside = ~(f.region_masks["brows"] | f.region_masks["mouth"]).any(0)  # (S, S)
    inside = f.masks.all(0) | (f.masks.mean(0) > 0.9)
    grey = f.images.astype(np.float32).mean(-1)  # (N, S, S)
    means = np.stack([grey[f.labels == k].mean(0) for k in range(4)])  # (K, S, S)
    spread = means.max(0) - means.min(0)
    assert spread[outside].mean() < spread[inside].mean() / 2


def test_bad_input():
    with pytest.raises(ValueError, match="unknown classes"):
        make_faces(4, classes=["anger", "boredom"])
    with pytest.raises(ValueError, match="share an expression"):
        make_faces(4, classes=["happy", "joy"])
    with pytest.raises(ValueError, match="size"):
        make_faces(4, size=16)
    with pytest.raises(ValueError, match="cue"):
        make_faces(4, cue="mouth")
