"""Synthetic face-like drawings whose class is carried ONLY by known regions.

Used to test explainers (a model that learnt these images must point at the brows/mouth) and
the explanation gate (a challenger that reads another region must be rejected). Pure numpy +
PIL ``ImageDraw`` in memory; deterministic given ``seed``.

Each image: random background colour, a face oval (random skin tone, position and scale), two
eyes, two brows, a mouth, a small corner marker and pixel noise. The class decides only

* the brow style: ``neutral`` (flat), ``angry`` (inner ends down), ``sad`` (inner ends up),
  ``raised`` (flat and high), and
* the mouth style: ``flat``, ``smile``, ``frown``, ``open`` (an 'o'),

when ``cue="face"`` (default). With ``cue="marker"`` the label is carried by the shape of the
corner marker instead and the expression is random; with ``cue="both"`` both agree. The marker
is always drawn (with a random shape under ``cue="face"``) so that a face-cue model learns to
ignore it and a marker-cue model learns to ignore the face.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

# (brow style, mouth style) per class: every pair is unique, so the class is a function of the
# two regions and of nothing else. Toy signs, loosely after FACS prototypes.
EXPRESSIONS: dict[str, tuple[str, str]] = {
    "anger": ("angry", "flat"),
    "happy": ("neutral", "smile"),
    "joy": ("neutral", "smile"),
    "sadness": ("sad", "frown"),
    "surprise": ("raised", "open"),
    "fear": ("sad", "open"),
    "disgust": ("angry", "frown"),
    "neutral": ("neutral", "flat"),
    "contempt": ("raised", "flat"),
}
DEFAULT_CLASSES = ["anger", "happy", "sadness", "surprise"]
BROWS = ("neutral", "angry", "sad", "raised")
MOUTHS = ("flat", "smile", "frown", "open")
MARKERS = ("hbar", "vbar", "ring", "dot", "slash", "backslash", "plus", "cross")

# Drawing at 4x and downsampling anti-aliases thin strokes (brows are ~2 px at 64 px).
_SS = 4


@dataclass
class SyntheticFaces:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    masks: np.ndarray  # (N, S, S) bool: the regions that carry the label (ground truth)
    # "brows", "mouth", "marker", "face": (N, S, S) bool each. Brow/mouth boxes are the same
    # size for every class (they cover all styles), so the mask itself leaks no label.
    region_masks: dict[str, np.ndarray] = field(default_factory=dict)
    cue: str = "face"

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def make_faces(
    n: int,
    size: int = 64,
    seed: int = 0,
    classes: list[str] | None = None,
    cue: Literal["face", "marker", "both"] = "face",
    noise: float = 8.0,
) -> SyntheticFaces:
    """``n`` drawings of ``size`` px; labels balanced (``n % K`` extra go to the first classes)."""
    classes = list(DEFAULT_CLASSES if classes is None else classes)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < 32:
        raise ValueError(f"size must be >= 32 px (brows vanish below), got {size}")
    if cue not in ("face", "marker", "both"):
        raise ValueError(f"cue must be 'face', 'marker' or 'both', got {cue!r}")
    unknown = [c for c in classes if c not in EXPRESSIONS]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; known: {sorted(EXPRESSIONS)}")
    exprs = [EXPRESSIONS[c] for c in classes]
    if len(set(exprs)) != len(exprs):
        raise ValueError(f"classes {classes} share an expression (e.g. happy/joy): pick one")
    if len(classes) < 2 or len(classes) > len(MARKERS):
        raise ValueError(f"need 2..{len(MARKERS)} classes, got {len(classes)}")

    rng = np.random.default_rng(seed)
    k = len(classes)
    labels = rng.permutation(np.arange(n) % k).astype(np.int64)
    images = np.empty((n, size, size, 3), np.uint8)
    regions = {r: np.zeros((n, size, size), bool) for r in ("brows", "mouth", "marker", "face")}
    for i in range(n):
        y = int(labels[i])
        if cue == "marker":  # expression is noise, marker is the label
            brow, mouth = BROWS[rng.integers(4)], MOUTHS[rng.integers(4)]
            marker = MARKERS[y]
        else:
            brow, mouth = exprs[y]
            marker = MARKERS[y] if cue == "both" else MARKERS[rng.integers(k)]
        img, boxes = _draw(rng, size, brow, mouth, marker, noise)
        images[i] = img
        for r, bxs in boxes.items():
            for x0, y0, x1, y1 in bxs:
                regions[r][i, max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    if cue == "face":
        masks = regions["brows"] | regions["mouth"]
    elif cue == "marker":
        masks = regions["marker"].copy()
    else:
        masks = regions["brows"] | regions["mouth"] | regions["marker"]
    return SyntheticFaces(images, labels, classes, masks, regions, cue)


def _draw(
    rng: np.random.Generator, size: int, brow: str, mouth: str, marker: str, noise: float
) -> tuple[np.ndarray, dict[str, list[tuple[int, int, int, int]]]]:
    s = size * _SS
    # background never near-black, so the (darker) marker is always visible
    bg = tuple(int(v) for v in rng.integers(40, 256, 3))
    skin = _skin(rng)
    dark = tuple(int(c * rng.uniform(0.1, 0.3)) for c in skin)  # features darker than skin
    im = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(im)
    # face: centre jitter +-6%, half-width 26-32%, half-height 33-40% of the side
    cx = s * (0.55 + rng.uniform(-0.06, 0.06))
    cy = s * (0.55 + rng.uniform(-0.06, 0.06))
    a = s * rng.uniform(0.26, 0.32)
    b = s * rng.uniform(0.33, 0.40)
    d.ellipse([cx - a, cy - b, cx + a, cy + b], fill=skin)
    w = max(_SS, round(s / 24))  # stroke width: ~2.7 px at 64 px

    # eyes (nuisance: radius jitter)
    er = a * rng.uniform(0.09, 0.14)
    ey = cy - 0.2 * b
    for sx in (-1, 1):
        ex = cx + sx * 0.4 * a
        d.ellipse([ex - er, ey - er * 0.8, ex + er, ey + er * 0.8], fill=dark)

    # brows: inner end at 0.15a from the centre line, outer end at 0.7a
    base = ey - 0.30 * b
    tilt = 0.13 * b
    inner_dy, outer_dy = {
        "neutral": (0.0, 0.0),
        "angry": (tilt, -tilt),  # inner ends down (y grows downwards)
        "sad": (-tilt, tilt),
        "raised": (-1.2 * tilt, -1.2 * tilt),
    }[brow]
    for sx in (-1, 1):
        d.line([(cx + sx * 0.12 * a, base + inner_dy), (cx + sx * 0.68 * a, base + outer_dy)],
               fill=dark, width=w)
    brow_box = (cx - 0.8 * a, base - 1.2 * tilt - 0.10 * b, cx + 0.8 * a, base + tilt + 0.08 * b)

    # mouth: centred at 0.5b below the face centre, half-width 0.4a
    my, mw, mh = cy + 0.5 * b, 0.4 * a, 0.14 * b
    if mouth == "flat":
        d.line([(cx - mw, my), (cx + mw, my)], fill=dark, width=w)
    elif mouth == "smile":  # lower half of an ellipse: corners up
        d.arc([cx - mw, my - 2 * mh, cx + mw, my + mh], 0, 180, fill=dark, width=w)
    elif mouth == "frown":
        d.arc([cx - mw, my - mh, cx + mw, my + 2 * mh], 180, 360, fill=dark, width=w)
    else:  # open 'o'
        d.ellipse([cx - 0.55 * mw, my - 1.3 * mh, cx + 0.55 * mw, my + 1.3 * mh],
                  outline=dark, width=w, fill=tuple(int(0.5 * c) for c in skin))
    mouth_box = (cx - 0.5 * a, my - 2.2 * mh, cx + 0.5 * a, my + 2.2 * mh)

    # marker: a small dark shape in the top-left corner
    mc = tuple(int(c * rng.uniform(0.0, 0.3)) for c in bg)  # darker than the background
    m0 = s * (0.04 + rng.uniform(0, 0.03))
    m1 = m0 + s * 0.18
    mm = (m0 + m1) / 2
    mw2 = max(w, round(s / 16))
    if marker == "hbar":
        d.line([(m0, mm), (m1, mm)], fill=mc, width=mw2)
    elif marker == "vbar":
        d.line([(mm, m0), (mm, m1)], fill=mc, width=mw2)
    elif marker == "slash":
        d.line([(m0, m1), (m1, m0)], fill=mc, width=mw2)
    elif marker == "backslash":
        d.line([(m0, m0), (m1, m1)], fill=mc, width=mw2)
    elif marker == "plus":
        d.line([(m0, mm), (m1, mm)], fill=mc, width=mw2)
        d.line([(mm, m0), (mm, m1)], fill=mc, width=mw2)
    elif marker == "ring":
        d.ellipse([m0, m0, m1, m1], outline=mc, width=mw2)
    elif marker == "cross":
        d.line([(m0, m0), (m1, m1)], fill=mc, width=mw2)
        d.line([(m0, m1), (m1, m0)], fill=mc, width=mw2)
    else:
        r = (m1 - m0) * 0.3
        d.ellipse([mm - r, mm - r, mm + r, mm + r], fill=mc)
    pad = s * 0.01
    marker_box = (m0 - pad, m0 - pad, m1 + pad, m1 + pad)

    arr = np.asarray(im.resize((size, size), Image.BOX), dtype=np.float32)
    if noise > 0:
        arr = arr + rng.normal(0.0, noise, arr.shape).astype(np.float32)
    arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)

    def px(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = box
        return (int(np.floor(x0 / _SS)), int(np.floor(y0 / _SS)),
                int(np.ceil(x1 / _SS)), int(np.ceil(y1 / _SS)))

    face_box = (cx - a, cy - b, cx + a, cy + b)
    return arr, {"brows": [px(brow_box)], "mouth": [px(mouth_box)],
                 "marker": [px(marker_box)], "face": [px(face_box)]}


def _skin(rng: np.random.Generator) -> tuple[int, int, int]:
    # a range of skin tones from dark to light, with some hue jitter
    t = rng.uniform(0.15, 1.0)
    base = np.array([90, 55, 35]) * (1 - t) + np.array([250, 215, 190]) * t
    return tuple(int(v) for v in np.clip(base + rng.normal(0, 12, 3), 0, 255))
