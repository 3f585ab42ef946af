"""The ``promote`` flow: approve, auto-promote, reject or roll back a site's model.

It only wires tasks; the rules and the bookkeeping are in :mod:`tasks.promote`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow

from tasks.notify import deliver_alerts
from tasks.promote import load_site_task, promote_version_task


@flow(name="promote")
def promote(
    site: str,
    version: str | None = None,
    action: str = "approve",
    actor: str = "prefect",
    reason: str = "",
    force: bool = False,
) -> dict[str, Any]:
    """Move ``emowatch-<site>@champion`` (see ``tasks.promote.promote_version``); the e-mail
    is queued with the move and delivered by the last task. Returns the promotion summary
    with ``delivery`` (the outbox run's counts)."""
    s, site_id = load_site_task(site)
    result = promote_version_task(s, site_id, version, action=action, actor=actor,
                                  reason=reason, force=force, deliver=False)
    result["delivery"] = asdict(deliver_alerts())
    return result
