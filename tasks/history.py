"""The champion history of a site: an undo stack over ``model_deployments``.

Rollback walks back the history (an undo stack, not a toggle): each approve/auto pushes the
new champion, each rollback pops back to the champion before the current one. Approving v2
then v3 and rolling back twice gives v2, then v1; a third rollback is an error ("nothing to
roll back to"), never a ping-pong between two versions. A champion that someone moved outside
emowatch (the MLflow UI) is sat on top of the stack: rolling it back restores the last
champion the history knows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from tasks.context import RunContext

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
    from db import deployments

    return walk_history(deployments.history_rows(session, site_id, model_name))


def rollback_target(stack: Sequence[str], current: str | None) -> str | None:
    """The champion a rollback from ``current`` restores (None: nothing to roll back to)."""
    if not stack:
        return None
    if current is None or stack[-1] != current:
        return stack[-1]  # the alias was moved/removed outside emowatch: the last known champion
    return stack[-2] if len(stack) >= 2 else None


def consistency(ctx: RunContext) -> dict[str, Any]:
    """Does the registry's champion equal the history's? ``{"registry", "history", "agree"}``."""
    from db.session import session_scope
    from tasks.registry import CHAMPION

    with session_scope(ctx.engine) as s:
        stack = champion_stack(s, ctx.site_id, ctx.site.model_name)
    reg = ctx.registry.get_alias_version(ctx.site.model_name, CHAMPION)
    hist = stack[-1] if stack else None
    return {"registry": reg, "history": hist, "agree": reg == hist}


__all__ = ["MOVES", "champion_stack", "consistency", "rollback_target", "walk_history"]
