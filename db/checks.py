"""The ``drift_checks`` table: one row per scheduled check of a site (the audit record)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import DriftCheck
from db.sql import update_row


def add_check(session: Session, **values: Any) -> int:
    """Insert a drift check (column values as keyword arguments); returns its id."""
    row = DriftCheck(**values)
    session.add(row)
    session.flush()
    return row.id


def update_check(session: Session, check_id: int, **values: Any) -> None:
    """Set columns of a check (e.g. ``alert_id``, ``mlflow_run_id`` once they exist)."""
    update_row(session, DriftCheck, check_id, values)


def latest_check(session: Session, site_id: int) -> DriftCheck | None:
    return session.execute(
        select(DriftCheck).where(DriftCheck.site_id == site_id)
        .order_by(DriftCheck.id.desc()).limit(1)
    ).scalar_one_or_none()


def last_check_times(session: Session, site_names: list[str]) -> dict[str, Any]:
    """name -> when the site's newest check was recorded (None: never checked, or a site not
    in the database yet)."""
    from sqlalchemy import func

    from db.models import SiteRow

    q = (select(SiteRow.name, func.max(DriftCheck.created_at))
         .join(DriftCheck, DriftCheck.site_id == SiteRow.id, isouter=True)
         .where(SiteRow.name.in_(site_names)).group_by(SiteRow.name))
    found = dict(session.execute(q).all())
    return {n: found.get(n) for n in site_names}


def recent_checks(session: Session, site_id: int, limit: int = 200) -> list[DriftCheck]:
    """The site's ``limit`` newest checks, oldest first (for history charts)."""
    rows = session.execute(
        select(DriftCheck).where(DriftCheck.site_id == site_id)
        .order_by(DriftCheck.id.desc()).limit(limit)
    ).scalars()
    return list(rows)[::-1]


__all__ = ["add_check", "latest_check", "recent_checks", "update_check"]
