"""The one image decoder (models/images.py): what ingestion accepts is what the model reads.

Every mode to RGB (16-bit grey keeps its top 8 bits, floats are scaled, alpha over white),
EXIF orientation, the first frame, the pixel limit before decoding, FIFOs refused, and the
quarantine reasons of ``inspect_image``.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.images import (
    ALPHA_BACKGROUND,
    ImageLimits,
    Rejected,
    UnreadableImageError,
    arm_bomb_guard,
    inspect_image,
    load_rgb,
    rgb_array,
    to_rgb,
)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _png_with_size(w: int, h: int) -> bytes:
    """A tiny PNG whose IHDR claims w x h (valid CRC): a decompression bomb, 70 bytes on disk."""
    png = bytearray(_encode(Image.new("L", (2, 2)), "PNG"))
    i = png.index(b"IHDR")
    png[i + 4 : i + 12] = struct.pack(">II", w, h)
    png[i + 17 : i + 21] = struct.pack(">I", zlib.crc32(bytes(png[i : i + 17])))
    return bytes(png)


def test_bomb_warning_is_an_error_even_with_a_high_limit():
    limits = ImageLimits(max_file_bytes=10**9, max_image_pixels=10**12, min_image_side=1)
    data = _png_with_size(10_000, 10_000)  # 100 Mpx: above Pillow's warning level, below its error
    arm_bomb_guard()
    with pytest.raises(Rejected) as e:
        inspect_image(data, limits)
    assert e.value.reason == "too-large" and "bomb" in e.value.detail


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "truncated"),  # a JPEG header that stops mid-way
        (b"\xff\xd8\xff" + b"\x01" * 200, "corrupt"),  # JPEG magic, then no valid marker
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00", "truncated"),
        (b"GIF89a" + b"\x00" * 4, "truncated"),
        (b"%PDF-1.4 not an image", "not-image"),
    ],
)
def test_header_failures(data, reason):
    with pytest.raises(Rejected) as e:
        inspect_image(data, ImageLimits(10**6, 10**6, 1))
    assert e.value.reason == reason


def test_to_rgb_numeric_modes():
    f = Image.fromarray(np.full((4, 4), 0.5, np.float32))  # F in 0..1
    assert tuple(np.asarray(to_rgb(f))[0, 0]) == (127, 127, 127)
    i = Image.fromarray(np.full((4, 4), 200, np.int32))  # I with 8-bit values
    assert tuple(np.asarray(to_rgb(i))[0, 0]) == (200, 200, 200)


def test_unreadable_image_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(UnreadableImageError, match="broken.png"):
        load_rgb(bad)
    with pytest.raises(ValueError, match="not found: .*nope.jpg"):
        load_rgb(tmp_path / "nope.jpg")


def test_load_rgb_applies_exif_orientation_and_converts(tmp_path: Path) -> None:
    img = Image.new("L", (30, 10), 128)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    out = load_rgb(tmp_path / "rot.jpg")
    assert out.mode == "RGB" and out.size == (10, 30)
    assert load_rgb((tmp_path / "rot.jpg").read_bytes()).size == (10, 30)  # bytes: the same


def test_sixteen_bit_grey_keeps_its_top_byte_and_alpha_goes_over_white() -> None:
    grey16 = Image.fromarray(np.full((4, 4), 0x8000, np.uint16))  # mid grey in 16 bits
    assert tuple(np.asarray(load_rgb(_encode(grey16, "PNG")))[0, 0]) == (128, 128, 128)
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent
    assert tuple(np.asarray(load_rgb(_encode(clear, "PNG")))[0, 0]) == ALPHA_BACKGROUND
    half = Image.new("LA", (4, 4), (0, 128))  # black at half opacity over white
    assert abs(int(np.asarray(load_rgb(_encode(half, "PNG")))[0, 0, 0]) - 127) <= 1


def test_first_frame_of_an_animation() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    px = np.asarray(load_rgb(b.getvalue()))[0, 0]
    assert px[0] > 200 and px[2] < 50


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = _png_with_size(8_000, 8_000)  # 64 Mpx claimed in 70 bytes (below Pillow's own limit)
    with pytest.raises(UnreadableImageError, match="64000000 pixels > 40000000"):
        load_rgb(data)
    with pytest.raises(UnreadableImageError, match="bomb"):  # Pillow's limit holds without ours
        load_rgb(_png_with_size(20_000, 20_000), max_pixels=None)
    ok = _encode(Image.new("RGB", (100, 100)), "PNG")
    assert load_rgb(ok, max_pixels=10_000).size == (100, 100)
    with pytest.raises(UnreadableImageError, match="10000 pixels > 9999"):
        load_rgb(ok, max_pixels=9_999)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableImageError, match="not a regular file"):
        load_rgb(fifo)


def test_rgb_array_of_arrays_and_images() -> None:
    assert rgb_array(np.zeros((2, 3), np.uint8)).shape == (2, 3, 3)
    assert rgb_array(np.zeros((2, 3, 4), np.uint8)).shape == (2, 3, 3)
    assert rgb_array(Image.new("L", (3, 2))).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="uint8"):
        rgb_array(np.zeros((2, 2, 3), np.float32))


def test_what_ingestion_accepts_is_what_the_model_reads() -> None:
    """inspect_image's decoded size is load_rgb's, for a rotated 16-bit PNG."""
    img = Image.fromarray(np.arange(30 * 10, dtype=np.uint16).reshape(10, 30) * 200)
    exif = Image.Exif()
    exif[0x0112] = 8
    data = _encode(img, "PNG", exif=exif)
    info = inspect_image(data, ImageLimits(10**6, 10**6, 1))
    assert (info.width, info.height) == load_rgb(data).size == (10, 30)
