"""The ingestion tables: ``images``, ``quarantined_files`` and ``ingestion_batches``.

Every function takes a Session and leaves committing to the caller (``db.session.session_scope``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import ImageRow, IngestionBatch, QuarantinedFile, utcnow
from db.sql import chunked, dialect_insert


def recent_images(
    session: Session, site_id: int, limit: int, *, status: str | None = "ok"
) -> list[ImageRow]:
    """The ``limit`` most recently ingested images of a site, newest first (ties: higher id
    first). ``status=None``: whatever their status."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    q = select(ImageRow).where(ImageRow.site_id == site_id)
    if status is not None:
        q = q.where(ImageRow.status == status)
    q = q.order_by(ImageRow.ingested_at.desc(), ImageRow.id.desc()).limit(limit)
    return list(session.execute(q).scalars())


def known_shas(session: Session, site_id: int, shas: Iterable[str]) -> set[str]:
    """Which of ``shas`` the site already has as images."""
    keys = sorted(set(shas))
    out: set[str] = set()
    for part in chunked(keys):
        out.update(
            session.execute(
                select(ImageRow.sha256).where(
                    ImageRow.site_id == site_id, ImageRow.sha256.in_(part)
                )
            ).scalars()
        )
    return out


def insert_images(session: Session, rows: Sequence[Mapping[str, Any]]) -> set[str]:
    """Insert image rows, skipping any (site_id, sha256) that exists; returns the sha256s
    actually inserted. Safe against a concurrent ingestion of the same files: the unique
    constraint decides, the loser's row is silently dropped (it is a duplicate)."""
    if not rows:
        return set()
    stmt = (
        dialect_insert(session, ImageRow)
        .on_conflict_do_nothing(index_elements=[ImageRow.site_id, ImageRow.sha256])
        .returning(ImageRow.sha256)
    )
    return set(session.execute(stmt, [dict(r) for r in rows]).scalars())


def insert_quarantined(session: Session, rows: Sequence[Mapping[str, Any]]) -> int:
    """Record quarantined files; a (site, path, sha256) already recorded is skipped.
    Returns how many rows are new."""
    if not rows:
        return 0
    stmt = (
        dialect_insert(session, QuarantinedFile)
        .on_conflict_do_nothing(
            index_elements=[
                QuarantinedFile.site_id,
                QuarantinedFile.rel_path,
                QuarantinedFile.sha256,
            ]
        )
        .returning(QuarantinedFile.id)
    )
    return len(list(session.execute(stmt, [dict(r) for r in rows]).scalars()))


def start_batch(session: Session, site_id: int, owner: str) -> IngestionBatch:
    now = utcnow()
    batch = IngestionBatch(
        site_id=site_id, status="running", owner=owner, started_at=now, heartbeat_at=now
    )
    session.add(batch)
    session.flush()
    return batch


def running_batches(session: Session, site_id: int) -> list[IngestionBatch]:
    q = select(IngestionBatch).where(
        IngestionBatch.site_id == site_id, IngestionBatch.status == "running"
    )
    return list(session.execute(q.order_by(IngestionBatch.id)).scalars())


def mark_interrupted(session: Session, batch_ids: Sequence[int], note: str) -> int:
    """Mark batches that their process left ``running`` as ``interrupted`` (only if still
    running: two recovering processes do not both claim one)."""
    if not batch_ids:
        return 0
    res = session.execute(
        update(IngestionBatch)
        .where(IngestionBatch.id.in_(list(batch_ids)), IngestionBatch.status == "running")
        .values(status="interrupted", error=note, finished_at=utcnow())
    )
    return int(res.rowcount or 0)


def bump_batch(session: Session, batch_id: int, **increments: int) -> None:
    """Add to a batch's counters (``n_seen=.., n_ingested=..``) and refresh its heartbeat."""
    cols = IngestionBatch.__table__.c
    values: dict[str, Any] = {k: cols[k] + int(v) for k, v in increments.items() if v}
    values["heartbeat_at"] = utcnow()
    session.execute(update(IngestionBatch).where(IngestionBatch.id == batch_id).values(**values))


def finish_batch(
    session: Session, batch_id: int, status: str = "done", error: str | None = None
) -> None:
    if status not in ("done", "failed"):
        raise ValueError(f"a batch finishes as 'done' or 'failed', not {status!r}")
    now = utcnow()
    session.execute(
        update(IngestionBatch)
        .where(IngestionBatch.id == batch_id)
        .values(status=status, error=error, finished_at=now, heartbeat_at=now)
    )


__all__ = [
    "bump_batch", "finish_batch", "insert_images", "insert_quarantined", "known_shas",
    "mark_interrupted", "recent_images", "running_batches", "start_batch",
]
