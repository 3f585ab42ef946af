"""``monitor_site``: ingest -> featurize (cached) -> drift test -> record, report, alert, event."""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow

from emowatch.jsonable import plain
from emowatch.settings import Settings
from flows.runner import default_runner, open_runtime
from tasks import monitor as t
from tasks.featurize import featurize_images
from tasks.impact import should_notify
from tasks.ingest.pipeline import ingest_inbox_task
from tasks.notify import deliver_alerts
from tasks.promote.sync_tasks import sync_registry_task
from tasks.reports.pages import status_page_path


@flow(name="monitor_site", task_runner=default_runner(), log_prints=True)
def monitor_site(site: str, ingest: bool = True, settings: Settings | None = None,
                 sync_registry: bool = True, status_page: bool = True) -> dict[str, Any]:
    """One scheduled check of one site. Returns the CLI's JSON contract:
    ``{site, decision, p_value, statistic, n_ref, n_cur, report_html, alert_id, estimate,
    impact}`` (+ details). The e-mail and the drift event (re-adaptation) follow the site's
    ``drift.alert_on`` rule (``tasks.impact.should_notify``). ``sync_registry`` and
    ``status_page`` False: the warm worker's checks (``deployments.worker``), which leave the
    registry sync to its own schedule and draw the status page once per tick."""
    ctx = open_runtime(settings).site_context(site)
    if sync_registry:  # decisions made in the MLflow UI first: they may change the champion
        sync_registry_task(ctx)
    ingested = ingest_inbox_task(ctx) if ingest else None
    ctx = ctx.serving()
    model, profile = ctx.registry.load_model(ctx.model.name, ctx.model.version)

    window = t.select_window(ctx)
    fs = featurize_images(ctx, window.items)
    result, phrases = t.drift_test(ctx.site, profile, fs)
    estimate, impact = t.estimate_task(ctx, profile, fs, model, window)
    stamp = dt.datetime.now(dt.UTC)
    reports = t.evidently_report(ctx, profile, fs, stamp, result.decision, estimate, impact)
    check_id = t.record_check(ctx, result, phrases, window.ids_of(fs.shas), window, reports,
                              estimate, impact)
    run_id = t.log_check_to_mlflow(ctx, check_id, result, reports, estimate, impact)
    alert_id = event_id = None
    notified = should_notify(ctx.site, result.decision, impact)
    reports = t.check_page(ctx, check_id, result, phrases, profile, fs, window, estimate, impact,
                           notified, reports, run_id)
    reports["status"] = str(status_page_path(ctx.settings.reports_dir).resolve())
    if notified:
        alert_id = t.alert_on_drift(ctx, check_id, result, phrases, reports, estimate, impact)
        event_id = t.emit_drift_event(ctx.site, check_id, result, impact)
    deliver_alerts(ctx)  # a mail server that is down never fails the flow
    t.publish_artifact(ctx.site, check_id, result, phrases, reports, estimate, impact)
    status = t.status_page(ctx) if status_page else None
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
        "model": ctx.model.key,
        "threshold": result.threshold,
        "method": result.method,
        "quality_shift": phrases,
        "event_id": event_id,
        "ingested": ingested,
        "details": plain(result.details),
        "estimate": plain(estimate.to_json()),
        "impact": impact,
        "alert_on": ctx.site.drift.alert_on,
        "notified": notified,
        "report": reports.get("page"),
        "status_page": status,
    }
