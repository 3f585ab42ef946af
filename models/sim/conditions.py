"""Site conditions: deterministic image corruptions that mimic what changes at a deployment site.

Every transform takes a PIL image or a uint8 array ((H,W,3) RGB or (H,W) grey) and returns the
same kind of object (PIL in -> PIL out, array in -> (H,W,3) uint8 array out), always RGB, same
size. Randomness (sensor noise, which images of a batch are hit) comes only from the ``rng``
argument, so a condition is reproducible given a seed.

Severities are calibrated to be *visible but plausible*: 1 is "a worse camera / bad evening",
2 is "clearly degraded", 3 is "barely usable". Blur radii are relative to the image size, so a
severity means the same after the model resizes a 320 px photo or a 48 px face to 224 px.

    >>> rng = np.random.default_rng(0)
    >>> dark = apply_condition(img, "night", 2, rng)
    >>> batch, hit = apply_to_fraction(images, "blur", 2, fraction=0.3, rng=rng)
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from models.images import ImageLike, rgb_array

RngLike = np.random.Generator | int | None


# --- helpers ---------------------------------------------------------------------------------
def _like(out: np.ndarray, original: ImageLike) -> ImageLike:
    """Return ``out`` (H,W,3 uint8) as the same kind of object as ``original``."""
    return Image.fromarray(out, "RGB") if isinstance(original, Image.Image) else out


def _rng(rng: RngLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check_severity(name: str, severity: int, table: dict[int, object]) -> None:
    if severity not in table:
        raise ValueError(
            f"condition {name!r} has severities {sorted(table)}, got {severity!r}"
        )


# --- the conditions --------------------------------------------------------------------------
# (brightness gain, gamma, noise std in 0..255 units). Gamma > 1 crushes the shadows the way a
# camera's auto-exposure does at dusk; the noise is what high ISO adds when it does.
_NIGHT = {1: (0.55, 1.4, 5.0), 2: (0.35, 1.8, 9.0), 3: (0.2, 2.2, 14.0)}


def night(img: ImageLike, severity: int = 1, rng: RngLike = None) -> ImageLike:
    """Darken, crush shadows (gamma) and add sensor noise (Gaussian, per pixel and channel)."""
    _check_severity("night", severity, _NIGHT)
    gain, gamma, sigma = _NIGHT[severity]
    x = rgb_array(img).astype(np.float32) / 255.0  # (H,W,3)
    x = 255.0 * gain * np.power(x, gamma)
    x += _rng(rng).normal(0.0, sigma, size=x.shape).astype(np.float32)
    return _like(np.clip(np.rint(x), 0, 255).astype(np.uint8), img)


# Gaussian sigma as a fraction of the longer side: 1/160 is ~2 px on a 320 px photo (a soft
# lens), 1/80 ~4 px (focus missed), 1/40 ~8 px (motion/defocus, barely usable).
_BLUR = {1: 1 / 160, 2: 1 / 80, 3: 1 / 40}


def blur(img: ImageLike, severity: int = 1, rng: RngLike = None) -> ImageLike:
    """Gaussian blur with a radius proportional to the image size (rng unused)."""
    _check_severity("blur", severity, _BLUR)
    a = rgb_array(img)
    radius = max(0.5, _BLUR[severity] * max(a.shape[:2]))
    out = Image.fromarray(a, "RGB").filter(ImageFilter.GaussianBlur(radius))
    return _like(np.asarray(out, dtype=np.uint8), img)


# JPEG quality: 20 is a cheap webcam/CCTV stream, 8 shows clear 8x8 blocks, 3 is mush.
_JPEG = {1: 20, 2: 8, 3: 3}


def jpeg(img: ImageLike, severity: int = 1, rng: RngLike = None) -> ImageLike:
    """Re-encode as JPEG at low quality, in memory (rng unused)."""
    _check_severity("jpeg", severity, _JPEG)
    buf = io.BytesIO()
    Image.fromarray(rgb_array(img), "RGB").save(buf, format="JPEG", quality=_JPEG[severity])
    buf.seek(0)
    with Image.open(buf) as decoded:
        out = np.asarray(decoded.convert("RGB"), dtype=np.uint8)
    return _like(out, img)


# Per-channel (R,G,B) gains: a warm tungsten / sodium-lamp cast, stronger with severity. A
# fixed direction (not random per image) because a site's lighting is the same for every image.
_CAST = {1: (1.15, 1.0, 0.8), 2: (1.3, 1.0, 0.6), 3: (1.45, 0.95, 0.4)}


def colour_cast(img: ImageLike, severity: int = 1, rng: RngLike = None) -> ImageLike:
    """Multiply the R,G,B channels by fixed gains (a warm cast; rng unused)."""
    _check_severity("colour_cast", severity, _CAST)
    x = rgb_array(img).astype(np.float32) * np.asarray(_CAST[severity], np.float32)
    return _like(np.clip(np.rint(x), 0, 255).astype(np.uint8), img)


# Fraction of colour removed: 1 is a washed-out camera, 2 a true greyscale (IR/CCTV) camera.
_GREY = {1: 0.7, 2: 1.0}


def greyscale(img: ImageLike, severity: int = 2, rng: RngLike = None) -> ImageLike:
    """Desaturate towards ITU-R 601 luma (severity 2: fully grey, still 3 channels)."""
    _check_severity("greyscale", severity, _GREY)
    x = rgb_array(img).astype(np.float32)
    luma = x @ np.asarray([0.299, 0.587, 0.114], np.float32)  # (H,W)
    t = _GREY[severity]
    x = (1.0 - t) * x + t * luma[:, :, None]
    return _like(np.clip(np.rint(x), 0, 255).astype(np.uint8), img)


# --- registry --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    name: str
    description: str
    severities: tuple[int, ...]
    fn: Callable[[ImageLike, int, RngLike], ImageLike]


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition("night", "darker, crushed shadows, sensor noise", tuple(_NIGHT), night),
        Condition("blur", "Gaussian blur (size-relative radius)", tuple(_BLUR), blur),
        Condition("jpeg", "low-quality JPEG re-encoding", tuple(_JPEG), jpeg),
        Condition("colour_cast", "warm colour cast (channel gains)", tuple(_CAST), colour_cast),
        Condition("greyscale", "colour removed", tuple(_GREY), greyscale),
    )
}


def apply_condition(img: ImageLike, name: str, severity: int = 1, rng: RngLike = None) -> ImageLike:
    """Apply the condition ``name`` at ``severity``; same kind of object back (PIL or array)."""
    if name not in CONDITIONS:
        raise ValueError(f"unknown condition {name!r}; known: {', '.join(CONDITIONS)}")
    return CONDITIONS[name].fn(img, severity, _rng(rng))


def apply_to_fraction(
    images: Sequence[ImageLike],
    name: str,
    severity: int = 1,
    fraction: float = 1.0,
    rng: RngLike = None,
) -> tuple[list[ImageLike], np.ndarray]:
    """Apply a condition to ``round(fraction * n)`` randomly chosen images of a batch.

    Returns (new list, bool mask (n,) of the images that were changed). The others are
    returned as they are (same objects). Used to model a site where only some cameras / some
    hours are affected.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    g = _rng(rng)
    n = len(images)
    k = int(round(fraction * n))
    hit = np.zeros(n, dtype=bool)
    hit[g.choice(n, size=k, replace=False)] = True
    out = [apply_condition(im, name, severity, g) if h else im for im, h in zip(images, hit, strict=True)]
    return out, hit
