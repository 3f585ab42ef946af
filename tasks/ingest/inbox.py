"""Scanning a site's inbox and reading its files (no decoding, no database).

* :func:`scan_inbox` lists what an ingestion looks at. Ignored (counted, never read): dot-names
  (a hidden folder counts once, it is not entered), extensions other than
  ``models.images.IMAGE_EXTENSIONS`` (any case), symlinks to folders that stay inside the inbox
  (their files are scanned where they really are: no loops, no double counting), files that
  vanish between the scan and the read.
* Symlinks: a link that resolves outside the inbox is refused as ``outside-inbox`` and never
  opened or read (a link with a non-image extension is simply ignored). A link to a file inside
  the inbox is followed -- it usually ends as a duplicate of its target. A link to nothing is
  ``empty`` (there are no bytes to read).
* :func:`read_file` reads one file once, hashing it in 1 MiB chunks, opened with
  ``O_NOFOLLOW``, and checks that what it opened is the file the scan saw (same device and
  inode): a file -- or any folder above it -- swapped for a link after the scan is never read.
* Names: what people and JSON see is :func:`display_name` (UTF-8; bytes that are not are shown
  as ``\\xNN``); the original bytes are kept beside it (``Candidate.name_bytes``). A name is
  never a reason to refuse a file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from models.images import IMAGE_EXTENSIONS, ImageLimits, Rejected

_log = logging.getLogger("emowatch.ingest")

READ_CHUNK = 1 << 20  # 1 MiB: hashing throughput is flat above ~64 KiB; fewer syscalls


@dataclass(frozen=True)
class Candidate:
    rel_path: str  # inbox-relative, '/'-separated, as display_name shows it
    path: Path  # what to open (the link's target for a symlink)
    size: int  # from the scan's stat (the read re-checks it)
    dev: int = -1  # device and inode the scan saw: the read must open the same file
    ino: int = -1
    name_bytes: bytes | None = None  # the relative path's bytes when they are not UTF-8


@dataclass(frozen=True)
class Finding:
    rel_path: str
    reason: str
    detail: str
    sha256: str = ""
    size_bytes: int | None = None
    name_bytes: bytes | None = None


def display_name(rel: str) -> tuple[str, bytes | None]:
    """(name for people and JSON, the original bytes when they are not UTF-8).

    ``os.scandir`` hands names that are not UTF-8 back with surrogate escapes; those cannot be
    stored, printed or put in JSON, so they are shown with ``\\xNN`` escapes instead."""
    raw = os.fsencode(rel)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), raw


@dataclass
class ScanResult:
    root: Path
    candidates: list[Candidate]
    findings: list[Finding]  # refused by the scan itself (links, special files)
    ignored: int


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
            r_fs = rel + e.name  # the path as the file system names it (surrogates kept)
            r, raw = display_name(r_fs)
            ext = os.path.splitext(e.name)[1].lower()
            if e.name.startswith("."):
                ignored += 1
                continue

            def refuse(reason: str, detail: str) -> None:
                findings.append(Finding(r, reason, detail, name_bytes=raw))  # noqa: B023

            try:
                if e.is_symlink():
                    target = os.path.realpath(e.path)
                    is_dir = os.path.isdir(target)  # a stat of the target, no read
                    if not is_dir and ext not in IMAGE_EXTENSIONS:
                        ignored += 1
                    elif not _inside(target, root):
                        what = "folder" if is_dir else "file"
                        shown = display_name(target)[0]
                        refuse("outside-inbox",
                               f"symbolic link to a {what} outside the inbox ({shown}): not followed")
                    elif is_dir:
                        ignored += 1
                    elif not os.path.exists(target):
                        refuse("empty", f"dangling symbolic link (to {display_name(target)[0]})")
                    else:
                        st = os.stat(target)
                        if stat.S_ISREG(st.st_mode):
                            cands.append(Candidate(r, Path(target), st.st_size, st.st_dev,
                                                   st.st_ino, raw))
                        else:
                            refuse("not-image", "symbolic link to something that is not a regular file")
                elif e.is_dir(follow_symlinks=False):
                    stack.append((e.path, r_fs + "/"))
                elif ext not in IMAGE_EXTENSIONS:
                    ignored += 1
                elif e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    cands.append(Candidate(r, Path(e.path), st.st_size, st.st_dev, st.st_ino, raw))
                else:
                    refuse("not-image", "not a regular file (fifo, socket or device)")
            except FileNotFoundError:
                ignored += 1  # vanished while we looked
            except OSError as err:  # one entry the OS will not describe: that entry alone
                refuse("corrupt", f"cannot be examined: {err.strerror or err}")
    cands.sort(key=lambda c: c.rel_path)
    findings.sort(key=lambda f: f.rel_path)
    return ScanResult(Path(root), cands, findings, ignored)


def read_file(path: Path | str, limits: ImageLimits, expect: tuple[int, int] | None = None
              ) -> tuple[bytes, str]:
    """The file's bytes and sha256 (hashed in chunks while reading); raises :class:`Rejected`
    for empty, over-size (not read) and non-regular files, and -- ``expect`` = the scan's
    (device, inode) -- for a file that is not the one the scan saw. ``FileNotFoundError``
    passes."""
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
        if expect is not None and expect[0] >= 0 and (st.st_dev, st.st_ino) != expect:
            raise Rejected("outside-inbox", "not the file the scan saw (it, or a folder above "
                           "it, was replaced after the scan): not read")
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
