"""Named locks (``site_locks``): held while the row exists and has not expired.

Taken with one atomic INSERT .. ON CONFLICT DO UPDATE .. WHERE expired. The functions accept an
Engine (the lock commits at once: it is only useful once other processes can see it) or a
Session (visible when the caller commits).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Engine, delete
from sqlalchemy.orm import Session

from db.models import SiteLock, utcnow
from db.sql import dialect_insert


def _lock_stmt(conn_or_session: Any, name: str, owner: str, ttl_s: float) -> Any:
    now = utcnow()
    expires = now + dt.timedelta(seconds=ttl_s)
    stmt = dialect_insert(conn_or_session, SiteLock).values(
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
    it and it has not expired. Re-acquiring a lock you hold extends it. A lock whose owner is
    a dead process of this host (``emowatch.processes``) is taken over at once.

    With an Engine the lock is committed at once. With a Session it becomes visible to others
    when the session commits (and, until then, others wait on it): commit soon."""
    if not name or not owner:
        raise ValueError("a lock needs a non-empty name and owner")
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
    if isinstance(session_or_engine, Engine):
        with session_or_engine.begin() as conn:
            if conn.execute(_lock_stmt(conn, name, owner, ttl_s)).first() is not None:
                return True
            return _take_over_dead(conn, name, owner, ttl_s)
    return (
        session_or_engine.execute(_lock_stmt(session_or_engine, name, owner, ttl_s)).first()
        is not None
    )


def _take_over_dead(conn: Any, name: str, owner: str, ttl_s: float) -> bool:
    """Take ``name`` from a holder that is a dead process of this host (one conditional
    UPDATE: two callers cannot both win)."""
    from sqlalchemy import select, update

    from emowatch.processes import owner_is_dead

    holder = conn.execute(select(SiteLock.owner).where(SiteLock.name == name)).scalar()
    if not owner_is_dead(holder):
        return False
    now = utcnow()
    res = conn.execute(update(SiteLock).where(SiteLock.name == name, SiteLock.owner == holder)
                       .values(owner=owner, expires_at=now + dt.timedelta(seconds=ttl_s),
                               created_at=now, updated_at=now))
    return bool(res.rowcount)


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


def list_locks(session: Session) -> list[tuple[str, str, dt.datetime]]:
    """Every lock row ``(name, owner, expires_at)`` (expired ones too)."""
    from sqlalchemy import select

    q = select(SiteLock.name, SiteLock.owner, SiteLock.expires_at).order_by(SiteLock.name)
    return [(n, o, e) for n, o, e in session.execute(q)]


def drop_lock(session: Session, name: str, owner: str) -> bool:
    """Delete the row of ``name`` if ``owner`` still holds it (a stale lock being cleared)."""
    return bool(session.execute(
        delete(SiteLock).where(SiteLock.name == name, SiteLock.owner == owner)).rowcount)


__all__ = ["acquire_lock", "drop_lock", "list_locks", "lock_holder", "release_lock"]
