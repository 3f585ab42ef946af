"""Small database functions the tasks and the CLI share (same behaviour on SQLite and PostgreSQL).

Every function takes a :class:`~sqlalchemy.orm.Session` and leaves committing to the caller
(``db.session.session_scope``), except the locks, which also accept an Engine and then commit
at once -- a lock is only useful once other processes can see it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import (
    AdaptationRun,
    Alert,
    DriftCheck,
    ImageFeature,
    ImageRow,
    IngestionBatch,
    ModelDeployment,
    QuarantinedFile,
    SiteLock,
    SiteRow,
    utcnow,
)

if TYPE_CHECKING:
    from emowatch.sites import Site

# SQLite allows 32766 bound parameters per statement; PostgreSQL 65535. 500 keys per IN list
# keeps every statement far below both and is still one round trip per 500 images.
IN_CHUNK = 500


def _insert(session_or_conn: Any, table: Any) -> Any:
    """The dialect's INSERT (the one with ``on_conflict_do_*``)."""
    bind = session_or_conn.get_bind() if isinstance(session_or_conn, Session) else session_or_conn
    name = bind.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"unsupported database dialect {name!r} (SQLite or PostgreSQL only)")


def _chunks(items: Sequence[Any], n: int = IN_CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# --- sites ---------------------------------------------------------------------------------


def upsert_site(session: Session, site: Site) -> SiteRow:
    """Insert or update the row of ``site`` (the sites file is the source of truth).

    Atomic (INSERT .. ON CONFLICT (name) DO UPDATE): two processes registering the same new
    site at once both succeed and get the same row."""
    values = {
        "name": site.name,
        "inbox": str(site.inbox),
        "config": site.model_dump(mode="json"),
    }
    now = utcnow()
    stmt = _insert(session, SiteRow).values(**values, created_at=now, updated_at=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=[SiteRow.name],
        set_={"inbox": stmt.excluded.inbox, "config": stmt.excluded.config, "updated_at": now},
    )
    session.execute(stmt)
    row = session.execute(
        select(SiteRow).where(SiteRow.name == site.name).execution_options(populate_existing=True)
    ).scalar_one()
    return row


def get_site_row(session: Session, name: str) -> SiteRow | None:
    return session.execute(select(SiteRow).where(SiteRow.name == name)).scalar_one_or_none()


def require_site_row(session: Session, name: str) -> SiteRow:
    """Like :func:`get_site_row`, but a clear error when the site was never registered."""
    row = get_site_row(session, name)
    if row is None:
        raise ValueError(f"site {name!r} is not in the database yet (run its ingestion first)")
    return row


# --- images --------------------------------------------------------------------------------


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
    for part in _chunks(keys):
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
        _insert(session, ImageRow)
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
        _insert(session, QuarantinedFile)
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


# --- ingestion batches -----------------------------------------------------------------------


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


# --- locks ---------------------------------------------------------------------------------


def _lock_stmt(conn_or_session: Any, name: str, owner: str, ttl_s: float) -> Any:
    now = utcnow()
    expires = now + dt.timedelta(seconds=ttl_s)
    stmt = _insert(conn_or_session, SiteLock).values(
        name=name, owner=owner, expires_at=expires, created_at=now, updated_at=now
    )
    cur = SiteLock.__table__.c
    # One statement: insert, or take over the row when it has expired (or is ours already:
    # re-acquiring refreshes the expiry). PostgreSQL locks the conflicting row for the
    # update; SQLite runs one writer at a time -- either way two callers cannot both win.
    return stmt.on_conflict_do_update(
        index_elements=[SiteLock.name],
        set_={
            "owner": stmt.excluded.owner,
            "expires_at": stmt.excluded.expires_at,
            "created_at": now,
            "updated_at": now,
        },
        where=(cur.expires_at <= now) | (cur.owner == owner),
    ).returning(SiteLock.name)


def acquire_lock(session_or_engine: Session | Engine, name: str, owner: str, ttl_s: float) -> bool:
    """Take the lock ``name`` for ``owner`` for ``ttl_s`` seconds; False if someone else holds
    it and it has not expired. Re-acquiring a lock you hold extends it.

    With an Engine the lock is committed at once. With a Session it becomes visible to others
    when the session commits (and, until then, others wait on it): commit soon."""
    if not name or not owner:
        raise ValueError("a lock needs a non-empty name and owner")
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
    if isinstance(session_or_engine, Engine):
        with session_or_engine.begin() as conn:
            return conn.execute(_lock_stmt(conn, name, owner, ttl_s)).first() is not None
    return (
        session_or_engine.execute(_lock_stmt(session_or_engine, name, owner, ttl_s)).first()
        is not None
    )


def release_lock(session_or_engine: Session | Engine, name: str, owner: str) -> bool:
    """Release ``name`` if ``owner`` holds it; False if it was not theirs (or not held)."""
    stmt = delete(SiteLock).where(SiteLock.name == name, SiteLock.owner == owner)
    if isinstance(session_or_engine, Engine):
        with session_or_engine.begin() as conn:
            return bool(conn.execute(stmt).rowcount)
    return bool(session_or_engine.execute(stmt).rowcount)


def lock_holder(session: Session, name: str) -> str | None:
    """Who holds ``name`` now (None: free or expired)."""
    row = session.get(SiteLock, name, populate_existing=True)
    if row is None or row.expires_at <= utcnow():
        return None
    return row.owner


# --- feature cache -------------------------------------------------------------------------


def to_blob(a: Any) -> bytes:
    """A 1-D vector as float32 little-endian bytes (the cache's storage format)."""
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"cached vectors must be 1-D, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype="<f4").tobytes()


def from_blob(b: bytes) -> np.ndarray:
    """Inverse of :func:`to_blob`: a writable (D,) float32 array."""
    if len(b) % 4:
        raise ValueError(f"a float32 blob has a multiple of 4 bytes, got {len(b)}")
    return np.frombuffer(b, dtype="<f4").astype(np.float32)


@dataclass(frozen=True)
class CachedFeatures:
    features: np.ndarray  # (D,) float32
    probs: np.ndarray  # (K,) float32
    quality: dict[str, Any] = field(default_factory=dict)


def get_features(
    session: Session, shas: Iterable[str], model_key: str
) -> dict[str, CachedFeatures]:
    """Cached features of the images ``shas`` under ``model_key``; missing ones are absent."""
    keys = sorted(set(shas))
    out: dict[str, CachedFeatures] = {}
    for part in _chunks(keys):
        q = select(
            ImageFeature.sha256, ImageFeature.features, ImageFeature.probs, ImageFeature.quality
        )
        q = q.where(ImageFeature.model_key == model_key, ImageFeature.sha256.in_(part))
        for sha, f, p, qual in session.execute(q):
            out[sha] = CachedFeatures(from_blob(f), from_blob(p), dict(qual or {}))
    return out


def get_feature(session: Session, sha256: str, model_key: str) -> CachedFeatures | None:
    return get_features(session, [sha256], model_key).get(sha256)


def put_features(
    session: Session,
    model_key: str,
    items: Iterable[tuple[str, Any, Any] | tuple[str, Any, Any, Mapping[str, Any]]],
) -> int:
    """Cache ``(sha256, features (D,), probs (K,)[, quality])`` under ``model_key``.

    Entries already cached are kept as they are (features of an image under one model version
    never change); returns how many were new."""
    if not model_key:
        raise ValueError("model_key must be non-empty (e.g. 'emowatch-site-a/3')")
    now = utcnow()
    rows = []
    for it in items:
        sha, f, p = it[0], it[1], it[2]
        qual = dict(it[3]) if len(it) > 3 else {}  # type: ignore[arg-type]
        rows.append(
            {
                "sha256": sha,
                "model_key": model_key,
                "features": to_blob(f),
                "probs": to_blob(p),
                "quality": qual,
                "created_at": now,
                "updated_at": now,
            }
        )
    if not rows:
        return 0
    stmt = (
        _insert(session, ImageFeature)
        .on_conflict_do_nothing(index_elements=[ImageFeature.sha256, ImageFeature.model_key])
        .returning(ImageFeature.id)
    )
    return len(list(session.execute(stmt, rows).scalars()))


# --- status --------------------------------------------------------------------------------


def _count_by_site(session: Session, model: Any, *where: Any) -> dict[int, int]:
    q = select(model.site_id, func.count()).where(*where).group_by(model.site_id)
    return {sid: int(n) for sid, n in session.execute(q) if sid is not None}


def status_counts(session: Session) -> dict[str, Any]:
    """Plain numbers for ``emowatch status``: per site (by name) and in total.

    Per site: images, quarantined, batches, last_ingest_at (ISO or None), last_batch_status,
    drift_checks, last_drift (decision or None), adaptation_runs, deployments, alerts_pending.
    Totals: the same counts summed, plus alerts_pending over all alerts and features_cached."""
    sites = list(session.execute(select(SiteRow.id, SiteRow.name).order_by(SiteRow.name)))
    images = _count_by_site(session, ImageRow)
    quarantined = _count_by_site(session, QuarantinedFile)
    batches = _count_by_site(session, IngestionBatch)
    drift = _count_by_site(session, DriftCheck)
    adapt = _count_by_site(session, AdaptationRun)
    deploy = _count_by_site(session, ModelDeployment)
    pending = _count_by_site(session, Alert, Alert.status == "pending")
    last_img = dict(
        session.execute(
            select(ImageRow.site_id, func.max(ImageRow.ingested_at)).group_by(ImageRow.site_id)
        ).all()
    )
    per_site: dict[str, dict[str, Any]] = {}
    for sid, name in sites:
        last_batch = session.execute(
            select(IngestionBatch.status)
            .where(IngestionBatch.site_id == sid)
            .order_by(IngestionBatch.id.desc())
            .limit(1)
        ).scalar_one_or_none()
        last_drift = session.execute(
            select(DriftCheck.decision)
            .where(DriftCheck.site_id == sid)
            .order_by(DriftCheck.id.desc())
            .limit(1)
        ).scalar_one_or_none()
        ts = last_img.get(sid)
        if isinstance(ts, dt.datetime) and ts.tzinfo is None:
            ts = ts.replace(tzinfo=dt.UTC)  # SQLite's max() bypasses the column type
        elif isinstance(ts, str):
            ts = dt.datetime.fromisoformat(ts).replace(tzinfo=dt.UTC)
        per_site[name] = {
            "images": images.get(sid, 0),
            "quarantined": quarantined.get(sid, 0),
            "batches": batches.get(sid, 0),
            "last_ingest_at": ts.isoformat() if ts else None,
            "last_batch_status": last_batch,
            "drift_checks": drift.get(sid, 0),
            "last_drift": last_drift,
            "adaptation_runs": adapt.get(sid, 0),
            "deployments": deploy.get(sid, 0),
            "alerts_pending": pending.get(sid, 0),
        }
    keys = ("images", "quarantined", "batches", "drift_checks", "adaptation_runs", "deployments")
    totals: dict[str, int] = {k: sum(s[k] for s in per_site.values()) for k in keys}
    totals["sites"] = len(per_site)
    totals["alerts_pending"] = int(
        session.execute(
            select(func.count()).select_from(Alert).where(Alert.status == "pending")
        ).scalar_one()
    )
    totals["features_cached"] = int(
        session.execute(select(func.count()).select_from(ImageFeature)).scalar_one()
    )
    return {"sites": per_site, "totals": totals}


__all__ = [
    "CachedFeatures",
    "acquire_lock",
    "bump_batch",
    "finish_batch",
    "from_blob",
    "get_feature",
    "get_features",
    "get_site_row",
    "insert_images",
    "insert_quarantined",
    "known_shas",
    "lock_holder",
    "mark_interrupted",
    "put_features",
    "recent_images",
    "release_lock",
    "require_site_row",
    "running_batches",
    "start_batch",
    "status_counts",
    "to_blob",
    "upsert_site",
]
