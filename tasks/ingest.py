"""Ingestion of a site's inbox into emowatch's database and image store.

The logic is plain functions (``ingest_inbox`` and its parts, callable and testable without
Prefect); the Prefect tasks at the bottom only wrap them.

What one run does, and the decisions it makes:

* **Scan** the inbox recursively (:func:`scan_inbox`). Ignored (counted in ``ignored``, never
  read): dot-names (a hidden folder counts once, it is not entered), extensions other than
  ``.jpg .jpeg .png .webp .bmp .tif .tiff .gif`` (any case), symlinks to folders that stay
  inside the inbox (their files are scanned where they really are: no loops, no double
  counting), files that vanish between the scan and the read.
* **Symlinks**: a link that resolves outside the inbox is refused as ``outside-inbox`` and never
  opened or read (a link with a non-image extension is simply ignored). A link to a file inside
  the inbox is followed -- it usually ends as a duplicate of its target. A link to nothing is
  quarantined as ``empty`` (there are no bytes to read). Files are opened with ``O_NOFOLLOW``,
  so a file swapped for a link after the scan is not followed either.
* **Read** each file once, hashing it in 1 MiB chunks; the same bytes are decoded and copied,
  so the sha256, the checks and the stored copy always describe the same content.
* **Check** (:func:`inspect_image`), first failing check wins, one reason per file:
  ``empty`` (0 bytes) -> ``too-large`` (bytes > max_file_bytes: not read at all) ->
  ``not-image`` (not one of the six formats, or not a regular file) -> ``too-large``
  (width*height from the header > max_image_pixels: refused BEFORE any pixel is decoded;
  Pillow's DecompressionBombWarning is made an error too) -> ``too-small`` (a side
  < min_image_side, from the header) -> ``truncated`` (the data ends before the image does)
  / ``corrupt`` (anything else Pillow cannot fully decode, or convert to RGB, or a PNG chunk
  with a bad CRC; also files the OS refuses to read).
* **Store** accepted files under ``store_dir/<sha[:2]>/<sha>``: written to a temp file, made
  durable, atomically renamed into place, and the rename made durable -- all before the rows
  that point at them commit -- so deleting the inbox file loses nothing. On Linux one
  ``syncfs`` per step covers a whole chunk (``fsync`` of each file and folder cost ~10 ms per
  image on the test VM's disk, 75% of the run); elsewhere each file and folder is fsynced.
* **Quarantine** rejected files: a copy under ``home/quarantine/<site>/<path>`` with the name
  ``<stem>.<sha[:12]><ext>`` (two different bad files with one name both survive), except
  ``outside-inbox`` links, over-size files and non-regular files (nothing safe to copy), and a
  row in ``quarantined_files``, unique on (site, path, sha256).
* **Duplicates**: same sha256 for the same site, whether found in an earlier run, earlier in
  this run, or inserted meanwhile by a concurrent run (the unique constraint decides, with
  INSERT .. ON CONFLICT DO NOTHING; the loser counts the file as a duplicate).
* **Summary** ``quarantined`` lists this run's findings: a bad file still in the inbox is
  reported again by every run (the operator should remove it), but its row is not duplicated.
* **Crash safety**: rows are committed per chunk (after their store copies are durable); a
  batch that a dead process left ``running`` is marked ``interrupted`` by the next run, whose
  scan simply processes every file again (what was committed is now a duplicate).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import secrets
import socket
import stat
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from prefect import task
from prefect.cache_policies import NO_CACHE

from db import queries as q
from db.session import get_engine, session_scope
from emowatch.settings import Settings, get_settings
from emowatch.sites import Site

if TYPE_CHECKING:
    from sqlalchemy import Engine

_log = logging.getLogger("emowatch.ingest")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# Pillow's names for the formats we decode (a camera JPEG can report itself as "MPO").
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
REASONS = ("empty", "not-image", "truncated", "corrupt", "too-large", "too-small", "outside-inbox")

READ_CHUNK = 1 << 20  # 1 MiB: hashing throughput is flat above ~64 KiB; fewer syscalls
# A chunk of files is read into memory, checked, copied and committed together: 64 files is one
# transaction per ~0.3 s of work (cheap commits, little redone after a crash); 256 MiB bounds
# memory when the files are large (each file is at most max_file_bytes anyway).
CHUNK_FILES = 64
CHUNK_BYTES = 256 * 2**20
# A running batch whose heartbeat (one per chunk) is older than this is dead even if we cannot
# check its process (another host): 15 min is ~1000x a normal chunk.
STALE_AFTER_S = 900.0


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestLimits:
    max_file_bytes: int
    max_image_pixels: int
    min_image_side: int

    def __post_init__(self) -> None:
        for k in ("max_file_bytes", "max_image_pixels", "min_image_side"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")

    @classmethod
    def from_settings(cls, s: Settings) -> IngestLimits:
        return cls(s.max_file_bytes, s.max_image_pixels, s.min_image_side)


class Rejected(Exception):
    """A file that cannot be ingested, with exactly one of :data:`REASONS`."""

    def __init__(
        self, reason: str, detail: str, *, sha256: str = "", size_bytes: int | None = None
    ):
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


@dataclass(frozen=True)
class Candidate:
    rel_path: str  # inbox-relative, '/'-separated
    path: Path  # what to open (the link's target for a symlink)
    size: int  # from the scan's stat (the read re-checks it)


@dataclass(frozen=True)
class Finding:
    rel_path: str
    reason: str
    detail: str
    sha256: str = ""
    size_bytes: int | None = None


@dataclass
class ScanResult:
    root: Path
    candidates: list[Candidate]
    findings: list[Finding]  # refused by the scan itself (links, special files)
    ignored: int


# --- scanning ------------------------------------------------------------------------------


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def scan_inbox(inbox: Path | str) -> ScanResult:
    """List what an ingestion would look at (see the module docstring for the rules)."""
    root = os.path.realpath(inbox)
    if not os.path.isdir(root):
        raise ValueError(f"inbox {str(inbox)!r} does not exist or is not a folder")
    cands: list[Candidate] = []
    findings: list[Finding] = []
    ignored = 0
    stack = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            _log.warning("cannot list %s: %s", folder, e)
            continue
        for e in entries:
            r = rel + e.name
            ext = os.path.splitext(e.name)[1].lower()
            if e.name.startswith("."):
                ignored += 1
                continue
            try:
                if e.is_symlink():
                    target = os.path.realpath(e.path)
                    is_dir = os.path.isdir(target)  # a stat of the target, no read
                    if not is_dir and ext not in IMAGE_EXTENSIONS:
                        ignored += 1
                    elif not _inside(target, root):
                        what = "folder" if is_dir else "file"
                        findings.append(
                            Finding(
                                r,
                                "outside-inbox",
                                f"symbolic link to a {what} outside the inbox ({target}): not followed",
                            )
                        )
                    elif is_dir:
                        ignored += 1
                    elif not os.path.exists(target):
                        findings.append(
                            Finding(r, "empty", f"dangling symbolic link (to {target})")
                        )
                    else:
                        st = os.stat(target)
                        if stat.S_ISREG(st.st_mode):
                            cands.append(Candidate(r, Path(target), st.st_size))
                        else:
                            findings.append(
                                Finding(
                                    r,
                                    "not-image",
                                    "symbolic link to something that is not a regular file",
                                )
                            )
                elif e.is_dir(follow_symlinks=False):
                    stack.append((e.path, r + "/"))
                elif ext not in IMAGE_EXTENSIONS:
                    ignored += 1
                elif e.is_file(follow_symlinks=False):
                    cands.append(Candidate(r, Path(e.path), e.stat(follow_symlinks=False).st_size))
                else:
                    findings.append(
                        Finding(r, "not-image", "not a regular file (fifo, socket or device)")
                    )
            except FileNotFoundError:
                ignored += 1  # vanished while we looked
    cands.sort(key=lambda c: c.rel_path)
    findings.sort(key=lambda f: f.rel_path)
    return ScanResult(Path(root), cands, findings, ignored)


# --- reading -------------------------------------------------------------------------------


def read_file(path: Path | str, limits: IngestLimits) -> tuple[bytes, str]:
    """The file's bytes and sha256 (hashed in chunks while reading); raises :class:`Rejected`
    for empty, over-size (not read) and non-regular files. ``FileNotFoundError`` passes."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        if os.path.islink(path):  # ELOOP: swapped for a link after the scan
            raise Rejected(
                "outside-inbox", "became a symbolic link while being ingested: not followed"
            ) from None
        raise Rejected("corrupt", f"cannot be read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Rejected("not-image", "not a regular file (fifo, socket or device)")
        if st.st_size == 0:
            raise Rejected("empty", "0 bytes", sha256=hashlib.sha256(b"").hexdigest(), size_bytes=0)
        if st.st_size > limits.max_file_bytes:
            raise Rejected(
                "too-large",
                f"{st.st_size} bytes > max_file_bytes {limits.max_file_bytes} (not read)",
                size_bytes=st.st_size,
            )
        h = hashlib.sha256()
        parts: list[bytes] = []
        total = 0
        while True:
            try:
                b = os.read(fd, READ_CHUNK)
            except OSError as e:
                raise Rejected(
                    "corrupt", f"read error: {e.strerror or e}", size_bytes=st.st_size
                ) from None
            if not b:
                break
            total += len(b)
            if total > limits.max_file_bytes:  # grew since the fstat
                raise Rejected(
                    "too-large",
                    f"> max_file_bytes {limits.max_file_bytes} bytes (growing file)",
                    size_bytes=total,
                )
            h.update(b)
            parts.append(b)
        data = b"".join(parts)
        if not data:
            raise Rejected("empty", "0 bytes", sha256=h.hexdigest(), size_bytes=0)
        return data, h.hexdigest()
    finally:
        os.close(fd)


# --- checking and decoding -------------------------------------------------------------------

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


def inspect_image(data: bytes, limits: IngestLimits) -> ImageInfo:
    """Check that ``data`` is an image we accept and fully decode it (first frame, EXIF
    orientation applied, converted to RGB); raises :class:`Rejected` otherwise.

    The size limits are checked on the header's dimensions before any pixel is decoded."""
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
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
            im.load()  # first frame only (GIF, animated WebP, multi-page TIFF)
            orientation = int(im.getexif().get(0x0112, 1) or 1)
            oriented = ImageOps.exif_transpose(im)
            rgb = to_rgb(oriented)
            rgb.load()
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


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB.

    16-bit grey (I;16*) keeps its top 8 bits (Pillow's own convert clips it to white); 32-bit
    ``I`` is read as 16-bit when any value exceeds 255; float ``F`` as 0..1 when its maximum is
    at most 1, else 0..255. Transparency (alpha modes, or a transparent palette/colour) is
    composited over white, the usual background of a photo print or a web page."""
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
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(source: Path | str | bytes) -> Image.Image:
    """An ingested image as the pipeline sees it: first frame, EXIF orientation applied, RGB.

    ``source``: a path (e.g. ``ImageRow.store_path``) or the file's bytes."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
        im.load()
        rgb = to_rgb(ImageOps.exif_transpose(im))
        rgb.load()
        return rgb


# --- writing -------------------------------------------------------------------------------


def store_path_for(store_dir: Path, sha256: str) -> Path:
    """Where the content-addressed copy of ``sha256`` lives."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return store_dir / sha256[:2] / sha256


def write_temp(path: Path, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to a new temp file next to ``path`` (fsynced unless told not to)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = (
        path.parent
        / f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}.tmp"
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the complete new one:
    temp file in the same folder, fsync, rename, fsync of the folder."""
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_SYNCFS: Any = None


def syncfs(path: Path) -> bool:
    """Flush the whole file system holding ``path`` to disk (Linux ``syncfs``); False where
    unavailable. One syncfs makes a chunk of 64 new files durable in ~30 ms where 64 file
    fsyncs plus 64 folder fsyncs take ~600 ms (ext4: each fsync waits for a journal commit)."""
    global _SYNCFS
    if _SYNCFS is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            _SYNCFS = libc.syncfs if hasattr(libc, "syncfs") else False
        except OSError:
            _SYNCFS = False
    if not _SYNCFS:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return _SYNCFS(fd) == 0
    finally:
        os.close(fd)


def store_copy(store_dir: Path, sha256: str, data: bytes) -> Path:
    """The content-addressed copy of ``data`` (written unless already there)."""
    dest = store_path_for(store_dir, sha256)
    if not _stored(dest, data):
        write_atomic(dest, data)
    return dest


def _stored(dest: Path, data: bytes) -> bool:
    try:
        # same name = same content, and only complete files ever get the name (rename)
        return dest.stat().st_size == len(data)
    except FileNotFoundError:
        return False


def quarantine_path_for(quarantine_dir: Path, rel_path: str, sha256: str) -> Path:
    p = Path(rel_path)
    tag = sha256[:12] or "unread"
    return quarantine_dir / p.parent / f"{p.stem}.{tag}{p.suffix}"


# --- the ingestion -------------------------------------------------------------------------


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(batch: Any, now_s: float, stale_after_s: float) -> bool:
    host, _, pid = (batch.owner or "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid():
        if not _process_alive(int(pid)):
            return True
    beat = batch.heartbeat_at or batch.started_at
    return beat is None or now_s - beat.timestamp() > stale_after_s


def _chunks(
    cands: Sequence[Candidate], n: int, max_bytes: int, max_file: int
) -> Iterator[list[Candidate]]:
    cur: list[Candidate] = []
    size = 0
    for c in cands:
        s = c.size if c.size <= max_file else 0  # over-size files are not read
        if cur and (len(cur) >= n or size + s > max_bytes):
            yield cur
            cur, size = [], 0
        cur.append(c)
        size += s
    if cur:
        yield cur


@dataclass
class _Read:
    cand: Candidate
    data: bytes | None = None
    sha: str = ""
    rejected: Rejected | None = None
    vanished: bool = False


def _read(c: Candidate, limits: IngestLimits) -> _Read:
    try:
        data, sha = read_file(c.path, limits)
        return _Read(c, data, sha)
    except Rejected as r:
        return _Read(c, rejected=r)
    except FileNotFoundError:
        return _Read(c, vanished=True)


@dataclass
class _Verdict:
    info: ImageInfo | Rejected
    dest: Path | None = None  # the store copy's final path (accepted images)
    tmp: Path | None = None  # written but not yet renamed into place


def _check_and_stage(
    item: tuple[str, bytes], limits: IngestLimits, store_dir: Path, fsync: bool
) -> tuple[str, _Verdict]:
    sha, data = item
    try:
        info = inspect_image(data, limits)
    except Rejected as r:
        return sha, _Verdict(r)
    dest = store_path_for(store_dir, sha)
    tmp = None if _stored(dest, data) else write_temp(dest, data, fsync=fsync)
    return sha, _Verdict(info, dest, tmp)


def _commit_copies(verdicts: Sequence[_Verdict], store_dir: Path, batched: bool) -> None:
    """Rename staged copies into place, durably: flush the data, rename, flush the renames
    (one syncfs each when ``batched``; else the temps were fsynced and each folder is)."""
    staged = [v for v in verdicts if v.tmp is not None]
    if not staged:
        return
    try:
        if batched:
            syncfs(store_dir)
        for v in staged:
            assert v.tmp is not None and v.dest is not None
            os.replace(v.tmp, v.dest)
            v.tmp = None
        if batched:
            syncfs(store_dir)
        else:
            for d in {v.dest.parent for v in staged if v.dest is not None}:
                fsync_dir(d)
    finally:
        for v in staged:
            if v.tmp is not None:
                v.tmp.unlink(missing_ok=True)


def ingest_inbox(
    site: Site,
    settings: Settings | None = None,
    engine: Engine | None = None,
    *,
    workers: int | None = None,
    chunk_files: int = CHUNK_FILES,
    chunk_bytes: int = CHUNK_BYTES,
    stale_after_s: float = STALE_AFTER_S,
    progress: bool = False,
    logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    on_chunk: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Ingest every new image of ``site.inbox``; returns the summary
    ``{"site", "ingested", "duplicates", "ignored", "quarantined": [{"path", "reason"}],
    "batch_id", "seconds"}`` (``quarantined``: this run's findings, sorted by path).

    ``engine``: default ``get_engine(settings.db_url)`` (the schema must exist: ``init_db``).
    ``workers``: threads reading/decoding/copying (Pillow and hashlib release the GIL);
    default min(4, CPUs). ``on_chunk(i, counts)`` runs after chunk ``i`` is committed (tests
    use it to simulate a crash)."""
    if chunk_files < 1 or chunk_bytes < 1:
        raise ValueError("chunk_files and chunk_bytes must be >= 1")
    workers = workers or min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    settings = settings or get_settings()
    run = _Ingestion(site, settings, engine or get_engine(settings.db_url), logger or _log)
    return run.run(workers, chunk_files, chunk_bytes, stale_after_s, progress, on_chunk)


class _Ingestion:
    """One run of :func:`ingest_inbox` (state shared by its steps)."""

    def __init__(self, site: Site, settings: Settings, engine: Engine, log: Any):
        self.site, self.engine, self.log = site, engine, log
        self.limits = IngestLimits.from_settings(settings)
        self.store_dir = settings.store_dir.resolve()
        self.qdir = (settings.home / "quarantine" / site.name).resolve()
        self.counts = {"ingested": 0, "duplicates": 0, "ignored": 0}
        self.quarantined: list[dict[str, str]] = []
        self.seen_ok: set[str] = set()  # content accepted earlier in this run
        self.bad: dict[str, Rejected] = {}  # content rejected earlier in this run
        self.site_id = self.batch_id = 0
        self.batched_sync = False

    def run(
        self,
        workers: int,
        chunk_files: int,
        chunk_bytes: int,
        stale_after_s: float,
        progress: bool,
        on_chunk: Callable[[int, dict[str, Any]], None] | None,
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        arm_bomb_guard()
        self._start(stale_after_s)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="ingest") if workers > 1 else None
        pmap: Callable[..., Any] = pool.map if pool is not None else map
        try:
            scan = scan_inbox(self.site.inbox)
            self.log.info(
                "site %s: %d candidate files in %s (%d ignored)",
                self.site.name,
                len(scan.candidates),
                scan.root,
                scan.ignored,
            )
            self._record(
                [(f, None) for f in scan.findings],
                [],
                len(scan.findings) + scan.ignored,
                scan.ignored,
            )
            self.store_dir.mkdir(parents=True, exist_ok=True)
            self.batched_sync = syncfs(self.store_dir)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(scan.candidates), unit="file", desc=f"ingest {self.site.name}")
            last_log = time.monotonic()
            chunks = _chunks(scan.candidates, chunk_files, chunk_bytes, self.limits.max_file_bytes)
            for i, chunk in enumerate(chunks):
                self._chunk(chunk, pmap)
                if bar is not None:
                    bar.update(len(chunk))
                if time.monotonic() - last_log > 30:
                    last_log = time.monotonic()
                    self.log.info("site %s: %s so far", self.site.name, self.counts)
                if on_chunk is not None:
                    on_chunk(i, dict(self.counts))
            if bar is not None:
                bar.close()
            with session_scope(self.engine) as s:
                q.finish_batch(s, self.batch_id, "done")
        except BaseException as e:
            try:
                with session_scope(self.engine) as s:
                    q.finish_batch(
                        s, self.batch_id, "failed", error=f"{type(e).__name__}: {e}"[:2000]
                    )
            except Exception:  # noqa: BLE001 -- the original error matters more
                self.log.exception(
                    "site %s: could not mark batch %s failed", self.site.name, self.batch_id
                )
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        summary = {
            "site": self.site.name,
            **self.counts,
            "quarantined": sorted(self.quarantined, key=lambda d: d["path"]),
            "batch_id": self.batch_id,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        self.log.info(
            "site %s: ingested %d, duplicates %d, ignored %d, quarantined %d in %.1f s (batch %d)",
            self.site.name,
            summary["ingested"],
            summary["duplicates"],
            summary["ignored"],
            len(self.quarantined),
            summary["seconds"],
            self.batch_id,
        )
        return summary

    def _start(self, stale_after_s: float) -> None:
        """Register the site, retire batches whose process died, open our batch."""
        with session_scope(self.engine) as s:
            self.site_id = q.upsert_site(s, self.site).id
        with session_scope(self.engine) as s:
            now_s = time.time()
            running = q.running_batches(s, self.site_id)
            stale = [b.id for b in running if _is_stale(b, now_s, stale_after_s)]
            self.batch_id = q.start_batch(s, self.site_id, _owner()).id
            if stale:
                q.mark_interrupted(
                    s, stale, f"its process stopped; batch {self.batch_id} re-processed the inbox"
                )
                self.log.warning(
                    "site %s: batches %s were left running by a dead process; re-processing",
                    self.site.name,
                    stale,
                )

    def _chunk(self, chunk: list[Candidate], pmap: Callable[..., Any]) -> None:
        """Read, check, copy and record one chunk of files."""
        reads: list[_Read] = list(pmap(lambda c: _read(c, self.limits), chunk))
        shas = {r.sha for r in reads if r.data is not None}
        with session_scope(self.engine) as s:
            known = q.known_shas(s, self.site_id, shas - self.seen_ok - set(self.bad))
        todo: dict[str, bytes] = {}
        for r in reads:
            if (
                r.data is not None
                and r.sha not in known
                and r.sha not in self.seen_ok
                and r.sha not in self.bad
            ):
                todo.setdefault(r.sha, r.data)
        fsync_each = not self.batched_sync
        verdicts: dict[str, _Verdict] = dict(
            pmap(
                lambda it: _check_and_stage(it, self.limits, self.store_dir, fsync_each),
                todo.items(),
            )
        )
        _commit_copies(list(verdicts.values()), self.store_dir, self.batched_sync)

        findings: list[tuple[Finding, bytes | None]] = []
        images: list[dict[str, Any]] = []
        n_ignored = 0
        for r in reads:
            rel = r.cand.rel_path
            if r.vanished:
                n_ignored += 1
            elif r.rejected is not None:
                rj = r.rejected  # only an empty file has (no) bytes to copy; the rest were not read
                findings.append(
                    (
                        Finding(rel, rj.reason, rj.detail, rj.sha256, rj.size_bytes),
                        b"" if rj.reason == "empty" else None,
                    )
                )
            elif r.sha in known or r.sha in self.seen_ok:
                self.counts["duplicates"] += 1
            else:
                data = r.data or b""
                v = self.bad.get(r.sha) or verdicts[r.sha].info
                if isinstance(v, Rejected):
                    self.bad[r.sha] = v
                    findings.append((Finding(rel, v.reason, v.detail, r.sha, len(data)), data))
                    continue
                self.seen_ok.add(r.sha)
                images.append({
                    "site_id": self.site_id, "batch_id": self.batch_id, "sha256": r.sha,
                    "rel_path": rel, "store_path": str(verdicts[r.sha].dest), "size_bytes": len(data),
                    "format": v.format, "width": v.width, "height": v.height, "mode": v.mode,
                    "status": "ok", "meta": v.meta,
                })  # fmt: skip
        self._record(findings, images, len(reads), n_ignored)

    def _record(
        self,
        findings: list[tuple[Finding, bytes | None]],
        images: list[dict[str, Any]],
        n_seen: int,
        n_ignored: int,
    ) -> None:
        """Copy quarantined files, then commit the chunk's rows and the batch counters."""
        qrows = []
        for f, data in findings:
            qpath = None
            if data is not None:
                dest = quarantine_path_for(self.qdir, f.rel_path, f.sha256)
                write_atomic(dest, data)
                qpath = str(dest)
            qrows.append({
                "site_id": self.site_id, "batch_id": self.batch_id, "rel_path": f.rel_path,
                "sha256": f.sha256, "size_bytes": f.size_bytes, "reason": f.reason,
                "detail": f.detail[:2000], "quarantine_path": qpath,
            })  # fmt: skip
            self.quarantined.append({"path": f.rel_path, "reason": f.reason})
            self.log.info(
                "site %s: quarantined %s (%s: %s)", self.site.name, f.rel_path, f.reason, f.detail
            )
        with session_scope(self.engine) as s:
            n_new = len(q.insert_images(s, images))
            q.insert_quarantined(s, qrows)
            q.bump_batch(
                s, self.batch_id, n_seen=n_seen, n_ingested=n_new, n_ignored=n_ignored,
                n_duplicates=n_seen - n_new - n_ignored - len(qrows), n_quarantined=len(qrows),
            )  # fmt: skip
        self.counts["ingested"] += n_new
        self.counts["duplicates"] += len(images) - n_new  # lost a race with a concurrent run
        self.counts["ignored"] += n_ignored


# --- Prefect tasks (thin wrappers) -----------------------------------------------------------


@task(name="load-site", cache_policy=NO_CACHE)
def load_site_task(name: str, sites_file: str | None = None) -> Site:
    """The site ``name`` from the sites file (default: ``Settings.sites_file``)."""
    from emowatch.sites import get_site, load_sites

    return get_site(load_sites(Path(sites_file) if sites_file else get_settings().sites_file), name)


@task(name="init-db", cache_policy=NO_CACHE)
def init_db_task(url: str | None = None) -> str:
    """Migrate the database (default: ``Settings.db_url``) to head; returns the revision."""
    from db.session import init_db

    return init_db(url)


@task(name="ingest-inbox", cache_policy=NO_CACHE)
def ingest_inbox_task(site: Site, workers: int | None = None) -> dict[str, Any]:
    """:func:`ingest_inbox` with Prefect's run logger. Idempotent: safe to retry."""
    from prefect.logging import get_run_logger

    settings = get_settings()
    settings.ensure_dirs()
    return ingest_inbox(site, settings, workers=workers, logger=get_run_logger())
