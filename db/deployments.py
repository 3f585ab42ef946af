"""The ``model_deployments`` table: the append-only champion history of every site."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import ModelDeployment


def add_deployment(session: Session, **values: Any) -> int:
    """Append a history row (site_id, model_name, version, previous_version, action, actor,
    reason, forced, gates); returns its id."""
    row = ModelDeployment(**values)
    session.add(row)
    session.flush()
    return row.id


def history_rows(session: Session, site_id: int, model_name: str
                 ) -> list[tuple[str, str, str | None]]:
    """``(action, version, previous_version)`` of the site's model, oldest first."""
    q = (select(ModelDeployment.action, ModelDeployment.version, ModelDeployment.previous_version)
         .where(ModelDeployment.site_id == site_id, ModelDeployment.model_name == model_name)
         .order_by(ModelDeployment.id))
    return [tuple(r) for r in session.execute(q)]  # type: ignore[misc]


def latest_deployment(session: Session, site_id: int) -> ModelDeployment | None:
    return session.execute(
        select(ModelDeployment).where(ModelDeployment.site_id == site_id)
        .order_by(ModelDeployment.id.desc()).limit(1)
    ).scalar_one_or_none()


__all__ = ["add_deployment", "history_rows", "latest_deployment"]
