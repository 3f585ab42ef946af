"""``monitor_site``: ingest -> featurize (cached) -> drift test -> record, report, alert, event."""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow

from flows.ingest import ingest_site
from flows.runner import default_runner
from tasks import monitor as t
from tasks.context import ensure_site_model, load_model, load_site
from tasks.featurize import featurize_images
from tasks.notify import deliver_alerts


@flow(name="monitor_site", task_runner=default_runner(), log_prints=True)
def monitor_site(site: str, ingest: bool = True) -> dict[str, Any]:
    """One scheduled check of one site. Returns the CLI's JSON contract:
    ``{site, decision, p_value, statistic, n_ref, n_cur, report_html, alert_id}`` (+ details)."""
    from emowatch.settings import get_settings

    settings = get_settings()
    ingested = ingest_site(site=site) if ingest else None
    cfg, site_id = load_site(site, settings)
    served = ensure_site_model(cfg, site_id, settings)
    _, profile = load_model(served.name, served.version)

    items, ids, oldest, newest = t.select_window(site_id, cfg.drift.window)
    fs = featurize_images(served.name, served.version, items, batch_size=settings.featurize_batch)
    result, phrases = t.drift_test(cfg, profile, fs)
    stamp = dt.datetime.now(dt.UTC)
    reports = t.evidently_report(settings, cfg, profile, fs, stamp, result.decision)
    id_of = {sha: i for i, (sha, _) in zip(ids, items, strict=True)}
    tested_ids = [id_of[sha] for sha in fs.shas]
    check_id = t.record_check(site_id, served.key, result, phrases, tested_ids, (oldest, newest), reports)
    t.set_check_run(check_id, t.log_check_to_mlflow(cfg, check_id, served.key, result, reports))
    alert_id = event_id = None
    if result.decision == "drift":
        alert_id = t.alert_on_drift(settings, cfg, site_id, check_id, result, phrases, served.key, reports)
        event_id = t.emit_drift_event(cfg, check_id, result)
    deliver_alerts(settings=settings)  # a mail server that is down never fails the flow
    t.publish_artifact(cfg, check_id, result, phrases, reports)
    return {
        "site": site,
        "decision": result.decision,
        "p_value": result.p_value,
        "statistic": result.statistic,
        "n_ref": result.n_ref,
        "n_cur": result.n_cur,
        "report_html": reports.get("html"),
        "alert_id": alert_id,
        "check_id": check_id,
        "model": served.key,
        "threshold": result.threshold,
        "method": result.method,
        "quality_shift": phrases,
        "event_id": event_id,
        "ingested": ingested,
        "details": t._jsonable(result.details),
    }
