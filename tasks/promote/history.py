"""The champion history of a site: an undo stack over ``model_deployments``.

Rollback walks back the history (an undo stack, not a toggle): each approve/auto pushes the
new champion, each rollback pops back to the champion before the current one. Approving v2
then v3 and rolling back twice gives v2, then v1; a third rollback is an error ("nothing to
roll back to"), never a ping-pong between two versions. A champion that someone moved outside
emowatch (the MLflow UI) is sat on top of the stack: rolling it back restores the last
champion the history knows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from db.deployments import champion_stack

if TYPE_CHECKING:
    from tasks.context import RunContext

def rollback_target(stack: Sequence[str], current: str | None) -> str | None:
    """The champion a rollback from ``current`` restores (None: nothing to roll back to)."""
    if not stack:
        return None
    if current is None or stack[-1] != current:
        return stack[-1]  # the alias was moved/removed outside emowatch: the last known champion
    return stack[-2] if len(stack) >= 2 else None


def reconcile(ctx: RunContext, repair: bool = False, reason: str | None = None) -> dict[str, Any]:
    """Compare the registry's champion alias with the history's champion; with ``repair``,
    put the alias back on the history's champion (the recorded decision is the truth: a
    crashed promotion, or a move in the MLflow UI without a recorded decision, left it off)
    and record that as a ``restore`` row. Returns :func:`consistency` plus ``repaired``."""
    from db import deployments
    from db.session import session_scope
    from tasks.registry.client import CHAMPION

    state = consistency(ctx)
    state["repaired"] = False
    if state["agree"] or not repair or state["history"] is None:
        return state
    ctx.registry.set_alias(ctx.site.model_name, CHAMPION, state["history"])
    with session_scope(ctx.engine) as s:
        deployments.add_deployment(
            s, site_id=ctx.site_id, model_name=ctx.site.model_name, version=state["history"],
            previous_version=state["registry"], action="restore", actor="emowatch",
            reason=(reason or f"the champion alias was on {state['registry'] or 'no version'} "
                    "with no recorded decision")
            + f"; put back on the recorded champion {state['history']}")
    return {**consistency(ctx), "repaired": True, "was": state["registry"]}


def consistency(ctx: RunContext) -> dict[str, Any]:
    """Does the registry's champion equal the history's? ``{"registry", "history", "agree"}``."""
    from db.session import session_scope
    from tasks.registry.client import CHAMPION

    with session_scope(ctx.engine) as s:
        stack = champion_stack(s, ctx.site_id, ctx.site.model_name)
    reg = ctx.registry.get_alias_version(ctx.site.model_name, CHAMPION)
    hist = stack[-1] if stack else None
    return {"registry": reg, "history": hist, "agree": reg == hist}


__all__ = ["consistency", "reconcile", "rollback_target"]
