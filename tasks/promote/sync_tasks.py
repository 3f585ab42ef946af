"""Prefect wrappers of :mod:`tasks.promote.sync` (the module itself stays importable without Prefect's
start-up cost for ``emowatch sync``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.promote.sync import sync_before

if TYPE_CHECKING:
    from tasks.context import RunContext


@task(name="sync-registry", cache_policy=NO_CACHE)
def sync_registry_task(ctx: RunContext) -> dict[str, Any] | None:
    """Apply the site's MLflow-side decisions (e-mails are delivered by the flow's last task)."""
    return sync_before(ctx, deliver=False)


__all__ = ["sync_registry_task"]
