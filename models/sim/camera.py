"""A camera model: degradations with continuous parameters, in the order a camera applies them.

The site twin (issue: "a labelled stand-in fitted to each site") passes the held-out labelled
images of the training domain through this model with parameters fitted to a site, so most
camera conditions must be reachable by a few continuous numbers (Real-ESRGAN's degradation
chain -- blur, resize, noise, JPEG -- plus exposure and colour; ``shared/RESEARCH.md`` §2):

    1. exposure      x <- clip(gain * x) ** gamma                 (linear in [0, 1])
    2. colour        per-channel gains (white balance), then saturation s: x <- Y + s (x - Y)
                     (Y = Rec.601 luma; s = 0 is greyscale)
    3. optics        Gaussian blur of sigma = blur * short side; vignetting: darker towards the
                     corners by 1 - vignette * (r / r_corner)^2
    4. resolution    down-scaled to ``scale`` of the size, then back up (bilinear)
    5. sensor noise  Gaussian, std sqrt(shot * x + read^2): signal-dependent (photon) and
                     independent (read) parts
    6. compression   JPEG at ``jpeg_quality`` (100: none)

Neutral parameters (:data:`NEUTRAL`) are the identity: every stage at its neutral value is
skipped, so the output is the input, byte for byte. Randomness (noise, JPEG is deterministic)
comes only from the ``rng`` given. Pure numpy / SciPy / Pillow: no model, no I/O.

    >>> p = CameraParams(gain=0.4, saturation=0.0, noise_read=0.06)
    >>> p.describe()
    'darker x0.40, greyscale, noise sigma 0.06'
    >>> twin = apply_camera(img, p, rng=np.random.default_rng(0))
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image

from models.images import ImageLike, rgb_array

# name -> (neutral, low, high): the box the twin's optimiser searches (models.estimate.twin).
# Bounds are wide enough for "barely usable" conditions (models.sim.conditions severity 3)
# and no wider: an optimiser that may go anywhere finds degenerate matches (all black).
BOUNDS: dict[str, tuple[float, float, float]] = {
    "gain": (1.0, 0.1, 3.0),  # exposure multiplier
    "gamma": (1.0, 0.4, 2.5),  # > 1: darker mid-tones
    "r_gain": (1.0, 0.6, 1.4),  # white balance, per channel
    "g_gain": (1.0, 0.6, 1.4),
    "b_gain": (1.0, 0.6, 1.4),
    "saturation": (1.0, 0.0, 1.6),  # 0: greyscale
    "blur": (0.0, 0.0, 0.03),  # Gaussian sigma as a fraction of the short side
    "vignette": (0.0, 0.0, 0.8),  # corner darkening
    "scale": (1.0, 0.1, 1.0),  # down- then up-scaling factor
    "noise_shot": (0.0, 0.0, 0.05),  # variance per unit of signal
    "noise_read": (0.0, 0.0, 0.15),  # std, independent of the signal
    "jpeg_quality": (100.0, 5.0, 100.0),  # 100: no compression
}
NAMES: tuple[str, ...] = tuple(BOUNDS)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class CameraParams:
    """One setting of the camera model; the defaults are the identity."""

    gain: float = 1.0
    gamma: float = 1.0
    r_gain: float = 1.0
    g_gain: float = 1.0
    b_gain: float = 1.0
    saturation: float = 1.0
    blur: float = 0.0
    vignette: float = 0.0
    scale: float = 1.0
    noise_shot: float = 0.0
    noise_read: float = 0.0
    jpeg_quality: float = 100.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            _, lo, hi = BOUNDS[f.name]
            if not np.isfinite(v) or v < lo - 1e-9 or v > hi + 1e-9:
                raise ValueError(f"camera parameter {f.name}={v!r} outside [{lo}, {hi}]")

    # --- vector form, for optimisers ---------------------------------------------------------
    def to_vector(self) -> np.ndarray:
        """The parameters scaled to [0, 1] in the order of :data:`NAMES`."""
        return np.array([(getattr(self, n) - BOUNDS[n][1]) / (BOUNDS[n][2] - BOUNDS[n][1])
                         for n in NAMES])

    @classmethod
    def from_vector(cls, u: Sequence[float] | np.ndarray,
                    names: Sequence[str] = NAMES) -> CameraParams:
        """Parameters from values in [0, 1] (clipped) for ``names``; the rest neutral."""
        vals = {}
        for n, x in zip(names, np.clip(np.asarray(u, np.float64), 0.0, 1.0), strict=True):
            _, lo, hi = BOUNDS[n]
            vals[n] = float(lo + x * (hi - lo))
        return cls(**vals)

    def to_dict(self) -> dict[str, float]:
        return {k: round(float(v), 6) for k, v in asdict(self).items()}

    @property
    def is_neutral(self) -> bool:
        return all(abs(getattr(self, n) - BOUNDS[n][0]) < 1e-9 for n in NAMES)

    def describe(self, min_effect: float = 0.05) -> str:
        """The condition in words, strongest first among each family ("darker x0.40,
        greyscale, noise sigma 0.06"); "as the training camera" when nothing changes."""
        out = []
        mid = min(1.0, self.gain * 0.5) ** self.gamma / 0.5  # where mid-grey ends up
        if abs(mid - 1.0) >= min_effect:
            out.append(f"{'darker' if mid < 1 else 'brighter'} x{mid:.2f}")
        gains = np.array([self.r_gain, self.g_gain, self.b_gain])
        if np.ptp(gains) >= min_effect:
            lo, mid, hi = np.sort(gains)
            if hi - mid >= mid - lo:  # one channel stands out: its colour
                cast = ("red", "green", "blue")[int(np.argmax(gains))]
            else:  # one channel is missing: its complement (no blue: yellow, warm light)
                cast = ("cyan", "magenta", "yellow (warm)")[int(np.argmin(gains))]
            out.append(f"{cast} cast (R/G/B x{' / '.join(f'{g:.2f}' for g in gains)})")
        if self.saturation <= min_effect:
            out.append("greyscale")
        elif abs(self.saturation - 1.0) >= min_effect:
            out.append(f"{'less' if self.saturation < 1 else 'more'} colourful "
                       f"x{self.saturation:.2f}")
        if self.blur >= 0.002:
            out.append(f"blurred (sigma {100 * self.blur:.1f}% of the side)")
        if self.vignette >= min_effect:
            out.append(f"vignetting {self.vignette:.2f}")
        if self.scale <= 1.0 - min_effect:
            out.append(f"low resolution x{self.scale:.2f}")
        sigma = float(np.sqrt(self.noise_shot * 0.5 + self.noise_read ** 2))
        if sigma >= 0.01:
            out.append(f"noise sigma {sigma:.2f}")
        if self.jpeg_quality < 95:
            out.append(f"JPEG quality {self.jpeg_quality:.0f}")
        return ", ".join(out) or "as the training camera"


NEUTRAL = CameraParams()


# --- the stages ------------------------------------------------------------------------------
def _exposure(x: np.ndarray, p: CameraParams) -> np.ndarray:
    if p.gain != 1.0:
        x = np.clip(x * np.float32(p.gain), 0.0, 1.0)
    if p.gamma != 1.0:
        x = np.power(x, np.float32(p.gamma))
    return x


def _colour(x: np.ndarray, p: CameraParams) -> np.ndarray:
    if (p.r_gain, p.g_gain, p.b_gain) != (1.0, 1.0, 1.0):
        x = np.clip(x * np.array([p.r_gain, p.g_gain, p.b_gain], np.float32), 0.0, 1.0)
    if p.saturation != 1.0:
        y = (x @ _LUMA)[..., None]
        x = np.clip(y + np.float32(p.saturation) * (x - y), 0.0, 1.0)
    return x


def _optics(x: np.ndarray, p: CameraParams) -> np.ndarray:
    h, w = x.shape[:2]
    if p.blur > 0.0:
        from scipy.ndimage import gaussian_filter

        s = p.blur * min(h, w)
        if s >= 0.05:
            x = gaussian_filter(x, sigma=(s, s, 0), mode="reflect")
    if p.vignette > 0.0:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        corner = ((h - 1) / 2) ** 2 + ((w - 1) / 2) ** 2 + 1e-9
        r2 = ((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / corner  # 0 centre, 1 corner
        x = x * (1.0 - np.float32(p.vignette) * r2)[..., None]
    return x


def _resolution(x: np.ndarray, p: CameraParams) -> np.ndarray:
    if p.scale >= 1.0:
        return x
    h, w = x.shape[:2]
    small = (max(1, round(w * p.scale)), max(1, round(h * p.scale)))
    im = Image.fromarray(_to_uint8(x), "RGB").resize(small, Image.BILINEAR)
    im = im.resize((w, h), Image.BILINEAR)
    return np.asarray(im, np.float32) / 255.0


def _noise(x: np.ndarray, p: CameraParams, rng: np.random.Generator,
           normal: np.ndarray | None = None) -> np.ndarray:
    if p.noise_shot <= 0.0 and p.noise_read <= 0.0:
        return x
    std = np.sqrt(np.float32(p.noise_shot) * x + np.float32(p.noise_read) ** 2)
    z = normal if normal is not None and normal.shape == x.shape else rng.standard_normal(
        x.shape, dtype=np.float32)
    return np.clip(x + std * z, 0.0, 1.0)


def noise_shape(shape: tuple[int, ...], native: tuple[int, int] | None) -> tuple[int, int, int]:
    """The shape of the sensor-noise draw :func:`apply_camera` makes for an image of
    ``shape`` (the photo's own pixels when ``native`` is given, else the image's)."""
    if native is not None:
        return int(native[1]), int(native[0]), 3
    return int(shape[0]), int(shape[1]), 3


def _jpeg(img: np.ndarray, p: CameraParams) -> np.ndarray:
    if p.jpeg_quality >= 100.0:
        return img
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=int(round(p.jpeg_quality)))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), np.uint8).copy()


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _at_native(grid: np.ndarray, p: CameraParams, native: tuple[int, int],
               gen: np.random.Generator, normal: np.ndarray | None) -> np.ndarray:
    """Sensor noise and JPEG of ``p`` acting at the camera's own size ``native`` on a grid
    image: the grid image plus what they change there, brought back to the grid. The resize
    to ``native`` and back is itself a blur, which the twin's photos would have and the
    site's do not (they are resized once): a twin at JPEG quality 94 read far blurrier than a
    site at quality 8, and a night twin was blurred by its noise's round trip."""
    h, w = grid.shape[:2]

    def back(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a, "RGB").resize((w, h), Image.BILINEAR), np.float32)

    fine = Image.fromarray(grid, "RGB").resize(native, Image.BILINEAR)
    plain = np.asarray(fine, np.uint8)
    hit = _jpeg(_to_uint8(_noise(plain.astype(np.float32) / 255.0, p, gen, normal)), p)
    out = grid.astype(np.float32) + (back(hit) - back(plain))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def apply_camera(img: ImageLike, p: CameraParams,
                 rng: np.random.Generator | int | None = None,
                 native: tuple[int, int] | None = None,
                 normal: np.ndarray | None = None) -> np.ndarray:
    """``img`` (PIL or uint8 array, RGB or grey) through the camera ``p``: an (H, W, 3) uint8
    array of the same size. The identity when ``p`` is neutral.

    ``native``: the (width, height) of the camera's own photos when ``img`` is on the model's
    grid (:func:`native_size`). Sensor noise and JPEG act on the camera's pixels, before the
    photo is resized to the grid (bilinear, as ``models.network.Preprocessing`` does): there
    the noise is smoothed and lifted where it was clipped at black. A night twin with its noise
    drawn on the grid matched the site's image statistics with a brighter exposure and less
    noise, and read half the drop (bench/results/estimate*.md). Only what they change there is
    brought back to the grid image (:func:`_at_native`), not the resize's own blur.

    ``normal``: a standard normal draw of :func:`noise_shape` to use for the sensor noise
    instead of drawing one from ``rng`` (the twin's fit reuses one per image for every
    camera it tries: common random numbers, and no new draw per try)."""
    a = rgb_array(img)
    if p.is_neutral:
        return a.copy()
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    x = a.astype(np.float32) / 255.0
    x = _exposure(x, p)
    x = _colour(x, p)
    x = _optics(x, p)
    x = _resolution(x, p)
    h, w = x.shape[:2]
    if native is not None and tuple(native) != (w, h) and (
            p.noise_shot > 0 or p.noise_read > 0 or p.jpeg_quality < 100.0):
        return _at_native(_to_uint8(x), p, tuple(native), gen, normal)
    x = _noise(x, p, gen, normal)
    return _jpeg(_to_uint8(x), p)


def native_size(sizes: Sequence[tuple[int, int]], grid: int,
                most: float = 4.0) -> tuple[int, int] | None:
    """The typical (width, height) of a site's photos (the median of each), scaled down to at
    most ``most`` x ``grid`` on the longer side (noise finer than that is averaged away
    anyway); None when there are none."""
    ws = [int(w) for w, h in sizes if w and h]
    hs = [int(h) for w, h in sizes if w and h]
    if not ws or grid <= 0:
        return None
    w, h = float(np.median(ws)), float(np.median(hs))
    k = min(1.0, most * grid / max(w, h))
    return max(1, round(w * k)), max(1, round(h * k))


def apply_camera_batch(images: Sequence[ImageLike], p: CameraParams,
                       rng: np.random.Generator | int | None = None,
                       native: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Every image through the same camera, one noise draw each (seeded by ``rng``)."""
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return [apply_camera(im, p, gen, native) for im in images]


def apply_camera_seeded(images: Sequence[ImageLike], p: CameraParams, seed: Sequence[int],
                        native: tuple[int, int] | None = None,
                        workers: int = 1) -> list[np.ndarray]:
    """Every image through the same camera, image ``i`` with its own noise draw seeded by
    ``[*seed, i]`` (the same whatever the number of threads), spread over ``workers`` threads
    (PIL's resizes and JPEG and numpy's noise release the GIL; on 2 AVX2 cores the night-2
    twin proxies, camera plus forward, went from 25.5 s to 18.9 s)."""
    def one(i: int) -> np.ndarray:
        return apply_camera(images[i], p, np.random.default_rng([*seed, i]), native)

    if workers <= 1 or len(images) < 2:
        return [one(i) for i in range(len(images))]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(images))))


__all__ = ["BOUNDS", "NAMES", "NEUTRAL", "CameraParams", "apply_camera", "apply_camera_batch",
           "apply_camera_seeded", "native_size", "noise_shape"]
