"""The ``ingest_site`` flow: one site's inbox into the database and the image store.

It only wires tasks; the work is in :mod:`tasks.ingest.pipeline` (see its docstring for the rules).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from emowatch.settings import Settings
from flows.runner import open_runtime
from tasks.ingest.pipeline import ingest_inbox_task


@flow(name="ingest-site")
def ingest_site(site: str, settings: Settings | None = None, workers: int | None = None
                ) -> dict[str, Any]:
    """Ingest the new images of ``site``; returns the ingestion summary (see
    ``tasks.ingest.pipeline.ingest_inbox``)."""
    ctx = open_runtime(settings).site_context(site)
    return ingest_inbox_task(ctx, workers=workers)
