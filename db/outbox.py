"""The ``alerts`` table: the e-mail outbox (rows are written first, delivered later).

Statuses: ``pending`` -> ``sending`` (claimed by one deliverer) -> ``sent`` | ``failed``
(retried at ``next_attempt_at``) | ``undelivered`` (still failing at ``retry_until``: needs
``emowatch outbox --requeue``) | ``kept`` (no SMTP server configured: the ``.eml`` file is the
delivery). The delivery logic is ``tasks.notify``; this module only reads and writes rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from db.models import Alert, SiteRow, utcnow

RETRYABLE = ("pending", "failed")
REQUEUEABLE = ("failed", "undelivered", "kept")


def add_alert(session: Session, **values: Any) -> Alert:
    """Insert an alert row (flushed: its id is known, the caller commits)."""
    alert = Alert(**values)
    session.add(alert)
    session.flush()
    return alert


def count_since(session: Session, site_id: int | None, kind: str, since: dt.datetime) -> int:
    """Alerts of ``kind`` for the site (None: no site) created at or after ``since``."""
    site_clause = Alert.site_id.is_(None) if site_id is None else Alert.site_id == site_id
    q = sa.select(sa.func.count()).select_from(Alert).where(
        site_clause, Alert.kind == kind, Alert.created_at >= since)
    return int(session.scalar(q) or 0)


def _deliverable(now: dt.datetime, stale: dt.timedelta) -> Any:
    # Due: pending, or failed and its backoff has passed. A stale "sending" row is taken over:
    # its deliverer died mid-way and the row would otherwise stay "sending" for ever.
    return sa.or_(
        sa.and_(Alert.status.in_(RETRYABLE),
                sa.or_(Alert.next_attempt_at.is_(None), Alert.next_attempt_at <= now)),
        sa.and_(Alert.status == "sending", Alert.updated_at < now - stale),
    )


def deliverable_ids(session: Session, now: dt.datetime, stale: dt.timedelta) -> list[int]:
    q = sa.select(Alert.id).where(_deliverable(now, stale)).order_by(Alert.id)
    return list(session.scalars(q).all())


def claim(make: Callable[[], Session], alert_id: int, now: dt.datetime,
          stale: dt.timedelta) -> Alert | None:
    """Atomically take one row (status -> sending, attempts + 1); None if another run has it
    or it is no longer due."""
    with make() as s, s.begin():
        res = s.execute(
            sa.update(Alert)
            .where(Alert.id == alert_id, _deliverable(now, stale))
            .values(status="sending", attempts=Alert.attempts + 1, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:
            return None
        alert = s.get(Alert, alert_id)
        s.expunge(alert)
        return alert


def finish(make: Callable[[], Session], alert_id: int, now: dt.datetime | None = None,
           **values: Any) -> None:
    with make() as s, s.begin():
        s.execute(sa.update(Alert).where(Alert.id == alert_id)
                  .values(updated_at=now or utcnow(), **values)
                  .execution_options(synchronize_session=False))


def count_status(session: Session, status: str) -> int:
    return int(session.scalar(sa.select(sa.func.count()).select_from(Alert).where(
        Alert.status == status)) or 0)


def requeue(session: Session, alert_id: int | None) -> list[int]:
    """Put alerts back to ``pending`` (due now, a fresh retry window): one by id (it must be
    failed, undelivered or kept), or (None) every failed and undelivered one. Returns the ids."""
    if alert_id is not None:
        alert = session.get(Alert, alert_id)
        if alert is None:
            raise ValueError(f"no alert {alert_id}")
        if alert.status not in REQUEUEABLE:
            raise ValueError(f"alert {alert_id} is {alert.status}: only "
                             f"{', '.join(REQUEUEABLE)} alerts are requeued")
        ids = [alert_id]
    else:
        ids = list(session.scalars(sa.select(Alert.id).where(
            Alert.status.in_(("failed", "undelivered"))).order_by(Alert.id)))
    if ids:
        session.execute(sa.update(Alert).where(Alert.id.in_(ids)).values(
            status="pending", next_attempt_at=None, retry_until=None, updated_at=utcnow())
            .execution_options(synchronize_session=False))
    return ids


def counts_by_status(session: Session, site_id: int | None = None) -> dict[str, int]:
    q = sa.select(Alert.status, sa.func.count()).group_by(Alert.status)
    if site_id is not None:
        q = q.where(Alert.site_id == site_id)
    return {status: int(n) for status, n in session.execute(q)}


def newest(session: Session, limit: int) -> Sequence[tuple[Alert, str | None]]:
    """The ``limit`` newest alerts with their site's name."""
    q = (sa.select(Alert, SiteRow.name).outerjoin(SiteRow, SiteRow.id == Alert.site_id)
         .order_by(Alert.id.desc()).limit(limit))
    return [(a, name) for a, name in session.execute(q)]


__all__ = [
    "REQUEUEABLE", "RETRYABLE", "add_alert", "claim", "count_since", "count_status",
    "counts_by_status", "deliverable_ids", "finish", "newest", "requeue",
]
