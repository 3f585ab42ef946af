"""The ``ingest_site`` flow: one site's inbox into the database and the image store.

It only wires tasks; the work is in :mod:`tasks.ingest` (see its docstring for the rules).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.ingest import ingest_inbox_task, init_db_task, load_site_task


@flow(name="ingest-site")
def ingest_site(
    site: str, sites_file: str | None = None, workers: int | None = None
) -> dict[str, Any]:
    """Ingest the new images of ``site``; returns the ingestion summary (see
    ``tasks.ingest.ingest_inbox``). ``sites_file`` defaults to ``Settings.sites_file``."""
    s = load_site_task(site, sites_file)
    init_db_task()
    return ingest_inbox_task(s, workers=workers)
