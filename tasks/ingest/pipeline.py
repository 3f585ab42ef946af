"""Ingestion of a site's inbox into emowatch's database and image store.

The logic is plain functions (``ingest_inbox`` and its parts, callable and testable without
Prefect); the Prefect tasks at the bottom only wrap them.

What one run does, and the decisions it makes:

* **Scan** the inbox recursively and **refuse links out of it** (:mod:`tasks.ingest.inbox`: what is
  ignored, how symbolic links are treated).
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
* **Store** accepted files in the content-addressed store, durably, before the rows that
  point at them commit (:mod:`tasks.ingest.storage`): deleting the inbox file loses nothing.
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

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from db import inbox as rows
from db import sites as site_rows
from db.session import session_scope
from emowatch.processes import owner, owner_is_dead
from emowatch.settings import Settings
from emowatch.sites import Site
from models.images import ImageInfo, ImageLimits, Rejected, arm_bomb_guard, inspect_image
from tasks.ingest.inbox import Candidate, Finding, read_file, scan_inbox
from tasks.ingest.storage import (
    fsync_dir,
    is_stored,
    quarantine_path_for,
    remove_stale_temps,
    store_path_for,
    syncfs,
    write_atomic,
    write_temp,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from tasks.context import RunContext

_log = logging.getLogger("emowatch.ingest")

# A chunk of files is read into memory, checked, copied and committed together: 64 files is one
# transaction per ~0.3 s of work (cheap commits, little redone after a crash); 256 MiB bounds
# memory when the files are large (each file is at most max_file_bytes anyway).
CHUNK_FILES = 64
CHUNK_BYTES = 256 * 2**20
# A running batch whose heartbeat (one per chunk) is older than this is dead even if we cannot
# check its process (another host): 15 min is ~1000x a normal chunk.
STALE_AFTER_S = 900.0


# --- the ingestion -------------------------------------------------------------------------


def _is_stale(batch: Any, now_s: float, stale_after_s: float) -> bool:
    if owner_is_dead(batch.owner):
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


def _with_name_bytes(meta: dict[str, Any], raw: bytes | None) -> dict[str, Any]:
    """The image row's meta, with the name's original bytes (hex) when they are not UTF-8."""
    return meta if raw is None else {**meta, "rel_path_bytes": raw.hex()}


def _read(c: Candidate, limits: ImageLimits) -> _Read:
    try:
        data, sha = read_file(c.path, limits, expect=(c.dev, c.ino))
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
    item: tuple[str, bytes], limits: ImageLimits, store_dir: Path, fsync: bool
) -> tuple[str, _Verdict]:
    sha, data = item
    try:
        info = inspect_image(data, limits)
    except Rejected as r:
        return sha, _Verdict(r)
    dest = store_path_for(store_dir, sha)
    tmp = None if is_stored(dest, data) else write_temp(dest, data, fsync=fsync)
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


def limits_of(settings: Settings) -> ImageLimits:
    """The ingestion limits the settings ask for."""
    return ImageLimits(settings.max_file_bytes, settings.max_image_pixels, settings.min_image_side)


def ingest_inbox(
    site: Site,
    settings: Settings,
    engine: Engine,
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

    ``engine``: the database (migrated: ``db.migrate.init_db``).
    ``workers``: threads reading/decoding/copying (Pillow and hashlib release the GIL);
    default min(4, CPUs). ``on_chunk(i, counts)`` runs after chunk ``i`` is committed (tests
    use it to simulate a crash)."""
    if chunk_files < 1 or chunk_bytes < 1:
        raise ValueError("chunk_files and chunk_bytes must be >= 1")
    workers = workers or min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    run = _Ingestion(site, settings, engine, logger or _log)
    return run.run(workers, chunk_files, chunk_bytes, stale_after_s, progress, on_chunk)


class _Ingestion:
    """One run of :func:`ingest_inbox` (state shared by its steps)."""

    def __init__(self, site: Site, settings: Settings, engine: Engine, log: Any):
        self.site, self.engine, self.log = site, engine, log
        self.limits = limits_of(settings)
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
        for d in (self.store_dir, self.qdir):  # what a killed run left half-written
            n = remove_stale_temps(d)
            if n:
                self.log.info("site %s: removed %d stale temp file(s) under %s", self.site.name, n, d)
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
                rows.finish_batch(s, self.batch_id, "done")
        except BaseException as e:
            try:
                with session_scope(self.engine) as s:
                    rows.finish_batch(
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
            self.site_id = site_rows.upsert_site(s, self.site).id
        with session_scope(self.engine) as s:
            now_s = time.time()
            running = rows.running_batches(s, self.site_id)
            stale = [b.id for b in running if _is_stale(b, now_s, stale_after_s)]
            self.batch_id = rows.start_batch(s, self.site_id, owner()).id
            if stale:
                rows.mark_interrupted(
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
            known = rows.known_shas(s, self.site_id, shas - self.seen_ok - set(self.bad))
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
                        Finding(rel, rj.reason, rj.detail, rj.sha256, rj.size_bytes,
                                r.cand.name_bytes),
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
                    findings.append((Finding(rel, v.reason, v.detail, r.sha, len(data),
                                             r.cand.name_bytes), data))
                    continue
                self.seen_ok.add(r.sha)
                images.append({
                    "site_id": self.site_id, "batch_id": self.batch_id, "sha256": r.sha,
                    "rel_path": rel, "store_path": str(verdicts[r.sha].dest), "size_bytes": len(data),
                    "format": v.format, "width": v.width, "height": v.height, "mode": v.mode,
                    "status": "ok", "meta": _with_name_bytes(v.meta, r.cand.name_bytes),
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
            qpath, detail = None, f.detail
            if data is not None:
                try:
                    dest = quarantine_path_for(self.qdir, f.rel_path, f.sha256)
                    write_atomic(dest, data)
                    qpath = str(dest)
                except OSError as e:  # the copy is a courtesy: the file's reason stays its own
                    detail += f" (quarantine copy not written: {e.strerror or e})"
            qrows.append({
                "site_id": self.site_id, "batch_id": self.batch_id, "rel_path": f.rel_path,
                "sha256": f.sha256, "size_bytes": f.size_bytes, "reason": f.reason,
                "detail": detail[:2000], "quarantine_path": qpath,
                "raw_path": f.name_bytes.hex() if f.name_bytes is not None else None,
            })  # fmt: skip
            self.quarantined.append({"path": f.rel_path, "reason": f.reason})
            self.log.info(
                "site %s: quarantined %s (%s: %s)", self.site.name, f.rel_path, f.reason, f.detail
            )
        with session_scope(self.engine) as s:
            n_new = len(rows.insert_images(s, images))
            rows.insert_quarantined(s, qrows)
            rows.bump_batch(
                s, self.batch_id, n_seen=n_seen, n_ingested=n_new, n_ignored=n_ignored,
                n_duplicates=n_seen - n_new - n_ignored - len(qrows), n_quarantined=len(qrows),
            )  # fmt: skip
        self.counts["ingested"] += n_new
        self.counts["duplicates"] += len(images) - n_new  # lost a race with a concurrent run
        self.counts["ignored"] += n_ignored


# --- Prefect tasks (thin wrappers) -----------------------------------------------------------


@task(name="ingest-inbox", cache_policy=NO_CACHE)
def ingest_inbox_task(ctx: RunContext, workers: int | None = None) -> dict[str, Any]:
    """:func:`ingest_inbox` with Prefect's run logger. Idempotent: safe to retry."""
    from prefect.logging import get_run_logger

    return ingest_inbox(ctx.site, ctx.settings, ctx.engine, workers=workers,
                        logger=get_run_logger())
