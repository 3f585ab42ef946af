"""The ``adaptation_runs`` table: every re-adaptation of a site, with its gates and verdict
(the record the promotion rule checks)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import AdaptationRun, utcnow
from db.sql import update_row


def start_run(session: Session, site_id: int, method: str, base_model: str,
              drift_check_id: int | None) -> int:
    row = AdaptationRun(site_id=site_id, method=method, base_model=base_model,
                        drift_check_id=drift_check_id, status="running")
    session.add(row)
    session.flush()
    return row.id


def finish_run(session: Session, run_id: int, **values: Any) -> None:
    """Set the outcome columns (status, verdict, gates, ...) and ``finished_at``."""
    update_row(session, AdaptationRun, run_id, {**values, "finished_at": utcnow()})


def latest_run(session: Session, site_id: int) -> AdaptationRun | None:
    return session.execute(
        select(AdaptationRun).where(AdaptationRun.site_id == site_id)
        .order_by(AdaptationRun.id.desc()).limit(1)
    ).scalar_one_or_none()


def run_for_version(session: Session, site_id: int, version: str) -> AdaptationRun | None:
    """The finished run that registered ``version`` of the site's model (the gate record)."""
    return session.execute(
        select(AdaptationRun).where(AdaptationRun.site_id == site_id,
                                    AdaptationRun.candidate_version == str(version),
                                    AdaptationRun.status == "done")
        .order_by(AdaptationRun.id.desc()).limit(1)
    ).scalar_one_or_none()


__all__ = ["finish_run", "latest_run", "run_for_version", "start_run"]
