"""The ``sync-registry`` flow: apply the decisions approvers made in the MLflow UI (every site
or one). ``emowatch serve`` runs it on a short interval; it only wires :mod:`tasks.promote.sync`."""

from __future__ import annotations

from typing import Any

from prefect import flow

from emowatch.settings import Settings
from flows.runner import open_runtime
from tasks.promote.sync import sync_sites


@flow(name="sync-registry")
def sync_registry(site: str | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Returns ``{sites: {name: {champion, applied, refused}}, exit_code}``."""
    return sync_sites(open_runtime(settings), site)
