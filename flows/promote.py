"""The ``promote`` flow: approve, auto-promote, reject or roll back a site's model.

It only wires tasks; the rules and the bookkeeping are in :mod:`tasks.promote.actions`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow

from emowatch.settings import Settings
from flows.runner import open_runtime
from tasks.notify import deliver_alerts
from tasks.promote.actions import promote_version_task
from tasks.promote.sync_tasks import sync_registry_task


@flow(name="promote")
def promote(
    site: str,
    version: str | None = None,
    action: str = "approve",
    actor: str = "prefect",
    reason: str = "",
    force: bool = False,
    settings: Settings | None = None,
    expected_champion: str | None = None,
) -> dict[str, Any]:
    """Move ``emowatch-<site>@champion`` (see ``tasks.promote.actions.promote_version``); the e-mail
    is queued with the move and delivered by the last task. Returns the promotion summary
    with ``delivery`` (the outbox run's counts)."""
    ctx = open_runtime(settings).site_context(site)
    result_of_sync = sync_registry_task(ctx)
    result = promote_version_task(ctx, version, action=action, actor=actor, reason=reason,
                                  force=force, deliver=False, expected_champion=expected_champion)
    result["sync"] = result_of_sync
    result["delivery"] = asdict(deliver_alerts(ctx))
    return result
