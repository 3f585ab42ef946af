"""The ``model_deployments`` table: the append-only champion history of every site, and the
champion stack it implies (an undo stack; see :mod:`tasks.promote.history`)."""

from __future__ import annotations

from collections.abc import Iterable
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


# History rows that move the champion alias (``reject`` does not).
MOVES = ("initial", "approve", "auto", "rollback")


def walk_history(rows: Iterable[tuple[str, str, str | None]]) -> list[str]:
    """The champion stack from history rows ``(action, version, previous_version)``, oldest
    first; the last element is the current champion as the history knows it.

    initial/approve/auto push their version (after the previous champion, when the row says the
    alias was somewhere the stack does not show: a move made outside emowatch); rollback pops
    back to its version; reject changes nothing.
    """
    stack: list[str] = []
    for action, version, previous in rows:
        if action not in MOVES:
            continue
        if previous is not None and (not stack or stack[-1] != previous):
            stack.append(previous)  # the alias was moved outside emowatch: remember where
        if action == "rollback":
            below = stack[:-1]
            if version in below:
                del stack[len(below) - below[::-1].index(version):]  # back to its last occurrence
                continue
        if not stack or stack[-1] != version:
            stack.append(version)
    return stack


def champion_stack(session: Session, site_id: int, model_name: str) -> list[str]:
    """:func:`walk_history` over the site's ``model_deployments`` rows."""
    return walk_history(history_rows(session, site_id, model_name))


__all__ = ["MOVES", "add_deployment", "champion_stack", "history_rows", "latest_deployment",
           "walk_history"]
