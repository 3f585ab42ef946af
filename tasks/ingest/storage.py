"""Durable files: the content-addressed image store and the quarantine copies.

Accepted files go to ``store_dir/<sha[:2]>/<sha>``: written to a temp file, made durable,
atomically renamed into place, and the rename made durable -- all before the rows that point at
them commit -- so deleting the inbox file loses nothing. On Linux one ``syncfs`` per step
covers a whole chunk (``fsync`` of each file and folder cost ~10 ms per image on the test VM's
disk); elsewhere each file and folder is fsynced.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from emowatch.processes import alive


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def store_path_for(store_dir: Path, sha256: str) -> Path:
    """Where the content-addressed copy of ``sha256`` lives."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return store_dir / sha256[:2] / sha256


# Every temp file this module writes starts with this prefix, so a run killed mid-way (kill -9
# leaves them behind) can be cleaned up by the next one. Short, whatever the final name's length.
TEMP_PREFIX = ".emowatch-tmp-"
# Longest file name component we write (ext4, XFS, APFS, NTFS: 255 bytes).
MAX_NAME_BYTES = 255
# Temp names carry the writer (host hash, pid): a dead writer's temps can go at once.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def write_temp(path: Path, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to a new temp file next to ``path`` (fsynced unless told not to)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-{secrets.token_hex(6)}"
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


def is_stored(dest: Path, data: bytes) -> bool:
    try:
        # same name = same content, and only complete files ever get the name (rename)
        return dest.stat().st_size == len(data)
    except FileNotFoundError:
        return False


def _writer_is_dead(name: str) -> bool:
    """True when ``name`` is a temp file of a process of this host that no longer runs."""
    parts = name[len(TEMP_PREFIX):].split("-")
    if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    return pid != os.getpid() and not alive(pid)


def remove_stale_temps(root: Path, older_than_s: float = 600.0) -> int:
    """Delete this module's temp files under ``root`` that a killed run left: those of dead
    processes of this host at once, any other writer's once older than ``older_than_s`` (a
    run in progress on another host may still rename them). Returns how many."""
    if not root.is_dir():
        return 0
    now, n = time.time(), 0
    for p in root.rglob(f"{TEMP_PREFIX}*"):
        try:
            if p.is_file() and (_writer_is_dead(p.name) or now - p.stat().st_mtime > older_than_s):
                p.unlink()
                n += 1
        except OSError:
            continue
    return n


def fit_name(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """``name`` shortened (in the middle of its stem, on a character boundary) so that its
    UTF-8 encoding fits ``limit`` bytes; the suffix is kept."""
    if len(name.encode("utf-8", "surrogateescape")) <= limit:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot or len(suffix) > 16:
        stem, suffix, dot = name, "", ""
    room = limit - len((dot + suffix).encode("utf-8", "surrogateescape")) - 3
    head = stem.encode("utf-8", "surrogateescape")[:max(room, 1)]
    return head.decode("utf-8", "ignore") + "..." + dot + suffix


def quarantine_path_for(quarantine_dir: Path, rel_path: str, sha256: str) -> Path:
    """``<quarantine>/<folders>/<stem>.<sha[:12]><ext>``: two different bad files with one name
    both survive; every component fits the file system's name limit."""
    p = Path(rel_path)
    tag = sha256[:12] or "unread"
    parts = [fit_name(part) for part in p.parent.parts if part not in ("", ".", "..")]
    return quarantine_dir.joinpath(*parts, fit_name(f"{p.stem}.{tag}{p.suffix}"))
