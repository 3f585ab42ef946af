"""The one image decoder: what ingestion accepts is exactly what the model reads.

    load_rgb(path or bytes, max_pixels=...) -> upright 8-bit RGB PIL image
    inspect_image(data, limits)            -> ImageInfo, or raises Rejected(reason, detail)

Every path that turns a file into pixels -- ingestion, featurization, training, prediction,
explanation, the MLflow pyfunc -- calls :func:`load_rgb`, so a photo decodes to the same pixels
everywhere: the first frame (GIF, animated WebP, multi-page TIFF), EXIF orientation applied,
any Pillow mode converted by :func:`to_rgb` (16-bit grey keeps its top 8 bits, float images are
scaled, transparency is composited over :data:`ALPHA_BACKGROUND`), and the pixel limit checked
on the header before a single pixel is decoded.

Pure: no database, no Prefect. The only file access is reading the file a caller names, and that
read refuses anything that is not a regular file (a FIFO would block a worker for ever).
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Image.Image | np.ndarray

# Pillow's names for the formats we decode (a camera JPEG can report itself as "MPO").
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# Transparent pixels are shown over white: the usual background of a photo print or a web page.
ALPHA_BACKGROUND = (255, 255, 255)
# Pillow's own bomb limit is ~89 Mpx; 40 Mpx is above any camera a site would use (a 7000x5000
# photo is 35 Mpx) and keeps one decode under ~160 MB of RAM. Settings.max_image_pixels
# overrides it for ingestion; every other reader uses this default.
DEFAULT_MAX_PIXELS = 40_000_000

REASONS = ("empty", "not-image", "truncated", "corrupt", "too-large", "too-small", "outside-inbox")


class UnreadableImageError(ValueError):
    """A file that is not an image we decode (the message names the file and why)."""


@dataclass(frozen=True)
class ImageLimits:
    """What ingestion accepts: file bytes, width*height, shortest side."""

    max_file_bytes: int = 50 * 2**20
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    min_image_side: int = 16

    def __post_init__(self) -> None:
        for k in ("max_file_bytes", "max_image_pixels", "min_image_side"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


class Rejected(Exception):
    """A file that cannot be ingested, with exactly one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str, *, sha256: str = "",
                 size_bytes: int | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.sha256, self.size_bytes = reason, detail, sha256, size_bytes


@dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow's format name
    width: int  # after EXIF orientation
    height: int
    mode: str  # as stored in the file
    meta: dict[str, Any] = field(default_factory=dict)  # orientation, raw_size (when rotated)


# --- conversion --------------------------------------------------------------------------------
def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB.

    16-bit grey (I;16*) keeps its top 8 bits (Pillow's own convert clips it to white); 32-bit
    ``I`` is read as 16-bit when any value exceeds 255; float ``F`` as 0..1 when its maximum is
    at most 1, else 0..255. Transparency (alpha modes, or a transparent palette/colour) is
    composited over :data:`ALPHA_BACKGROUND`."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if mode == "F":
            a = a.astype(np.float64)
            a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
            a8 = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
        elif mode.startswith("I;16") or np.max(a, initial=0) > 255:
            a8 = (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        else:
            a8 = np.clip(a, 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode == "La":
        im = im.convert("LA")
        mode = "LA"
    if "A" in mode or "a" in mode or "transparency" in im.info:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def rgb_array(img: ImageLike) -> np.ndarray:
    """A PIL image or uint8 array ((H,W), (H,W,3) or (H,W,4)) as (H,W,3) uint8."""
    if isinstance(img, Image.Image):
        return np.asarray(to_rgb(img), dtype=np.uint8)
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {a.dtype}")
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 3:
        return a
    if a.ndim == 3 and a.shape[2] == 4:
        return np.ascontiguousarray(a[:, :, :3])
    raise ValueError(f"image array must be (H,W), (H,W,3) or (H,W,4), got shape {a.shape}")


# --- reading and decoding ----------------------------------------------------------------------
def read_regular_file(path: str | Path, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file; FIFOs, sockets and devices are refused without blocking
    (``O_NONBLOCK``), so a named pipe in a folder never hangs a reader."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise UnreadableImageError(f"image file not found: {path}") from e
    except OSError as e:
        raise UnreadableImageError(f"cannot open {path}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableImageError(f"{path} is not a regular file (fifo, socket or device)")
        if max_bytes is not None and st.st_size > max_bytes:
            raise UnreadableImageError(f"{path}: {st.st_size} bytes > {max_bytes}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def _check_pixels(w: int, h: int, max_pixels: int | None, what: str) -> None:
    if max_pixels is not None and w * h > max_pixels:
        raise UnreadableImageError(
            f"{what}: {w}x{h} = {w * h} pixels > {max_pixels} (refused before decoding)")


def _decode(data: bytes, max_pixels: int | None = None, what: str = "image"
            ) -> tuple[Image.Image, int]:
    """(upright RGB first frame, EXIF orientation); Pillow's own exceptions pass through."""
    with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
        _check_pixels(im.size[0], im.size[1], max_pixels, what)
        im.load()  # first frame only (GIF, animated WebP, multi-page TIFF)
        orientation = int(im.getexif().get(0x0112, 1) or 1)
        rgb = to_rgb(ImageOps.exif_transpose(im))
        rgb.load()
        return rgb, orientation


def decode_bytes(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 what: str = "image") -> Image.Image:
    """Encoded image bytes -> upright 8-bit RGB (first frame); the pixel limit is checked on
    the header. Raises :class:`UnreadableImageError` naming ``what``."""
    try:
        return _decode(data, max_pixels, what)[0]
    except UnreadableImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImageError(f"{what}: decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
            struct.error, IndexError, MemoryError) as e:
        raise UnreadableImageError(f"cannot read image {what}: {e}") from None


def load_rgb(source: str | Path | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS
             ) -> Image.Image:
    """An image file (path) or its bytes as the pipeline sees it: first frame, EXIF
    orientation applied, 8-bit RGB. Errors name the file."""
    if isinstance(source, bytes | bytearray | memoryview):
        return decode_bytes(bytes(source), max_pixels)
    return decode_bytes(read_regular_file(source), max_pixels, what=str(source))


# --- what ingestion accepts --------------------------------------------------------------------
_TRUNCATION = re.compile(
    r"truncat|only got|buffer of at least|end of file|\bEOF\b|premature|no more images|not enough data",
    re.IGNORECASE,
)


def sniff_format(data: bytes) -> str | None:
    """The format the magic bytes claim (one of PIL_FORMATS), or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM") and (
        len(data) < 18
        or struct.unpack_from("<I", data, 14)[0] in (12, 16, 40, 52, 56, 64, 108, 124)
    ):
        return "BMP"
    return None


def _webp_short(data: bytes) -> bool:
    """True when a RIFF/WEBP file is shorter than its header says."""
    return len(data) >= 8 and struct.unpack_from("<I", data, 4)[0] + 8 > len(data)


def _decode_failure(e: BaseException, data: bytes, kind: str | None) -> Rejected:
    msg = f"{type(e).__name__}: {e}".strip()
    if (
        isinstance(e, EOFError)
        or _TRUNCATION.search(str(e))
        or (kind == "WEBP" and _webp_short(data))
    ):
        return Rejected("truncated", msg)
    return Rejected("corrupt", msg)


def _header_failure(data: bytes, kind: str) -> Rejected:
    """The magic says ``kind`` but Pillow cannot read the header: ask that plugin why."""
    if kind == "WEBP" and _webp_short(data):
        return Rejected("truncated", f"{kind} header: the file is shorter than its RIFF size")
    factory = Image.OPEN.get(kind, (None, None))[0]
    if factory is None:
        return Rejected("corrupt", f"{kind} header cannot be parsed")
    try:
        factory(io.BytesIO(data), "")
    except Exception as e:  # noqa: BLE001 -- classified below
        r = _decode_failure(e, data, kind)
        if "index out of range" in str(e) or isinstance(e, IndexError | struct.error):
            r = Rejected("truncated", r.detail)  # the header reads past the end of the data
        return Rejected(r.reason, f"{kind} header: {r.detail}")
    return Rejected("corrupt", f"{kind} header cannot be parsed")


def arm_bomb_guard() -> None:
    """Make Pillow's DecompressionBombWarning an error in this process (idempotent).

    Called at the start of every ingestion rather than per file: ``warnings.catch_warnings``
    is not thread-safe, and the files are decoded in worker threads."""
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def inspect_image(data: bytes, limits: ImageLimits) -> ImageInfo:
    """Check that ``data`` is an image we accept and fully decode it the way :func:`load_rgb`
    does; raises :class:`Rejected` (one reason) otherwise.

    First failing check wins: ``empty`` -> ``too-large`` (bytes) -> ``not-image`` -> ``too-large``
    (width*height from the header, before any pixel is decoded) -> ``too-small`` (a side) ->
    ``truncated`` / ``corrupt`` (anything Pillow cannot fully decode, or a PNG chunk with a bad
    CRC)."""
    if not data:
        raise Rejected("empty", "0 bytes")
    if len(data) > limits.max_file_bytes:
        raise Rejected("too-large", f"{len(data)} bytes > max_file_bytes {limits.max_file_bytes}")
    kind = sniff_format(data)
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
            fmt, (w, h), mode = str(im.format), im.size, im.mode
            if w * h > limits.max_image_pixels:
                raise Rejected(
                    "too-large",
                    f"{w}x{h} = {w * h} pixels > max_image_pixels {limits.max_image_pixels} "
                    "(refused before decoding)",
                )
            if min(w, h) < limits.min_image_side:
                raise Rejected(
                    "too-small", f"{w}x{h}: a side is below min_image_side {limits.min_image_side}"
                )
            if fmt == "PNG":
                im.verify()  # CRC of every chunk up to IEND; load() does not check them all
        rgb, orientation = _decode(data)
        ow, oh = rgb.size
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected("too-large", f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        if kind is None:
            raise Rejected("not-image", "not a JPEG, PNG, WebP, BMP, TIFF or GIF file") from None
        raise _header_failure(data, kind) from None
    except MemoryError:
        raise Rejected("too-large", "out of memory while decoding") from None
    except Exception as e:  # noqa: BLE001 -- one bad file never ends the batch
        raise _decode_failure(e, data, kind) from None
    meta: dict[str, Any] = {}
    if orientation != 1:
        meta = {"orientation": orientation, "raw_size": [w, h]}
    return ImageInfo(fmt, ow, oh, mode, meta)


__all__ = [
    "ALPHA_BACKGROUND", "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "PIL_FORMATS", "REASONS",
    "ImageInfo", "ImageLike", "ImageLimits", "Rejected", "UnreadableImageError", "arm_bomb_guard",
    "decode_bytes", "inspect_image", "load_rgb", "read_regular_file", "rgb_array", "sniff_format",
    "to_rgb",
]
