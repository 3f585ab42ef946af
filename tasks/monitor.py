"""Tasks of the monitor flow: the drift test, its audit record, report, alert and event."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from emowatch.settings import Settings
from emowatch.sites import Site
from models.drift import CombinedDrift, DriftConfig, DriftResult
from models.quality import describe_shift
from tasks.featurize import FeatureSet

DRIFT_EVENT = "emowatch.drift.detected"


def window_items(site_id: int, window: int) -> tuple[list[tuple[str, str]], list[int], Any, Any]:
    """The site's ``window`` most recent images: ([(sha, store_path)], ids, oldest, newest)."""
    from db import queries
    from db.session import session_scope
    from tasks.context import prepare

    _, engine = prepare()
    with session_scope(engine) as s:
        rows = queries.recent_images(s, site_id, window)
        items = [(r.sha256, r.store_path) for r in rows]
        ids = [r.id for r in rows]
        times = [r.ingested_at for r in rows]
    return items, ids, (min(times) if times else None), (max(times) if times else None)


@task(name="select-window", cache_policy=NO_CACHE)
def select_window(site_id: int, window: int):
    return window_items(site_id, window)


def drift_config(site: Site) -> DriftConfig:
    return DriftConfig(alpha=site.drift.alpha, min_samples=site.drift.min_samples,
                       n_permutations=site.drift.permutations)


def test_drift(site: Site, profile: Any, fs: FeatureSet) -> tuple[DriftResult, list[str]]:
    """The calibrated decision (MMD on features + BBSD on softmax [+ Anderson-Darling on image-quality
    statistics], Bonferroni) and, in words, how the images' quality changed."""
    ref_q = getattr(profile, "quality", None)
    use_q = bool(site.drift.quality_test and ref_q)
    ref: tuple[Any, ...] = (profile.features, profile.probs) + ((ref_q,) if use_q else ())
    det = CombinedDrift(drift_config(site), ref, class_names=list(profile.classes))
    if len(fs) == 0:
        cur: tuple[Any, ...] = (np.zeros((0, profile.features.shape[1]), np.float32),
                                np.zeros((0, profile.probs.shape[1]), np.float32))
        if use_q:
            cur += ({k: np.zeros(0) for k in ref_q},)
    else:
        cur = (fs.z, fs.probs) + ((fs.quality,) if use_q else ())
    result = det.predict(cur)
    phrases: list[str] = []
    if ref_q and len(fs):
        phrases = describe_shift(ref_q, fs.quality)
    return result, phrases


@task(name="drift-test", cache_policy=NO_CACHE)
def drift_test(site: Site, profile: Any, fs: FeatureSet) -> tuple[DriftResult, list[str]]:
    result, phrases = test_drift(site, profile, fs)
    get_run_logger().info(
        "site %s: %s (p=%s, stat=%s, n_ref=%d, n_cur=%d)", site.name, result.decision,
        _fmt(result.p_value), _fmt(result.statistic), result.n_ref, result.n_cur,
    )
    return result, phrases


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


@task(name="evidently-report", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def evidently_report(settings: Settings, site: Site, profile: Any, fs: FeatureSet,
                     stamp: dt.datetime, decision: str) -> dict[str, str | None]:
    """Evidently report (HTML + JSON) on PCA components, predicted classes and image quality,
    added to the site's project in the local Evidently workspace. Evidently explains; the
    calibrated test decides. Never fails the monitor run: errors are logged and returned."""
    from tasks import report

    log = get_run_logger()
    if len(fs) < 2:
        return {"html": None, "json": None, "error": "fewer than 2 current images"}
    try:
        pca = report.PCAProjection.fit(profile.features)
        classes = list(profile.classes)
        ref_frame = report.monitoring_frame(profile.features, profile.probs, classes, pca,
                                            quality=getattr(profile, "quality", None))
        cur_frame = report.monitoring_frame(fs.z, fs.probs, classes, pca, quality=fs.quality)
        common = [c for c in ref_frame.columns if c in cur_frame.columns]
        snap = report.build_drift_report(
            ref_frame[common], cur_frame[common], timestamp=stamp,
            name=f"{site.name} {stamp:%Y-%m-%d %H:%M}",
            metadata={"site": site.name, "decision": decision},
        )
        base = Path(settings.reports_dir) / site.name / f"drift-{stamp:%Y%m%dT%H%M%S}"
        html, js = base.with_suffix(".html"), base.with_suffix(".json")
        report.save_report(snap, html, js)
        try:
            report.add_to_workspace(settings.evidently_workspace, site.name, snap)
        except Exception as e:  # noqa: BLE001 - the workspace is a convenience
            log.warning("could not add the snapshot to the Evidently workspace: %s", e)
        return {"html": str(html.resolve()), "json": str(js.resolve()), "error": None}
    except Exception as e:  # noqa: BLE001
        log.warning("Evidently report failed for %s: %s", site.name, e)
        return {"html": None, "json": None, "error": str(e)}


@task(name="record-drift-check", cache_policy=NO_CACHE)
def record_check(site_id: int, model_key: str, result: DriftResult, phrases: list[str],
                 image_ids: list[int], window: tuple[Any, Any], reports: dict[str, Any]) -> int:
    from db.models import DriftCheck
    from db.session import session_scope
    from tasks.context import prepare

    _, engine = prepare()
    name, version = model_key.rsplit("/", 1)
    with session_scope(engine) as s:
        row = DriftCheck(
            site_id=site_id, model_name=name, model_version=version, decision=result.decision,
            p_value=result.p_value, statistic=result.statistic, threshold=result.threshold,
            method=result.method, n_ref=result.n_ref, n_cur=result.n_cur,
            window_start=window[0], window_end=window[1], image_ids=image_ids,
            details={**_jsonable(result.details), "quality_shift": phrases},
            report_html=reports.get("html"), report_json=reports.get("json"),
        )
        s.add(row)
        s.flush()
        return row.id


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def drift_email(site: Site, check_id: int, result: DriftResult, phrases: list[str],
                model_key: str, reports: dict[str, Any]) -> tuple[str, str]:
    sub = result.details.get(result.details.get("triggered_by", ""), {}) if result.details else {}
    lines = [
        f"emowatch detected drift at site {site.name}.",
        "",
        f"Decision:      {result.decision} (combined p-value {_fmt(result.p_value)} <= alpha {result.threshold})",
        f"Test:          {result.method}; triggered by {result.details.get('triggered_by', '?')}"
        f" (statistic {_fmt(sub.get('statistic'))}, p {_fmt(sub.get('p_value'))})",
        f"Sample sizes:  {result.n_cur} recent site images vs {result.n_ref} reference images",
        f"Model:         {model_key}",
        f"Drift check:   #{check_id}",
        "",
        "What changed in the images: " + ("; ".join(phrases) if phrases else "no clear change in image quality statistics"),
    ]
    bbsd = result.details.get("bbsd", {}).get("details", {}) if result.details else {}
    shares = bbsd.get("predicted_share_cur") or bbsd.get("cur_shares")
    if shares:
        lines.append("Predicted classes now: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    lines += [
        "",
        f"Evidently report: {reports.get('html') or 'not available (' + str(reports.get('error')) + ')'}",
        "",
        "What happens next: if the site's adapt.auto is true, emowatch re-adapts the model to the",
        "site without labels and asks for approval of the candidate. By hand:",
        f"  emowatch adapt {site.name} --json",
    ]
    subject = f"[emowatch] drift at {site.name}: p={_fmt(result.p_value)}, n={result.n_cur}"
    return subject, "\n".join(lines)


@task(name="drift-alert", cache_policy=NO_CACHE)
def alert_on_drift(settings: Settings, site: Site, site_id: int, check_id: int, result: DriftResult,
                   phrases: list[str], model_key: str, reports: dict[str, Any]) -> int | None:
    """Queue the drift e-mail (unless the site's cool-down holds) and link it to the check."""
    from db.models import DriftCheck
    from db.session import session_scope
    from tasks import notify
    from tasks.context import prepare

    log = get_run_logger()
    _, engine = prepare(settings)
    cooldown = site.drift.cooldown_minutes
    if cooldown is None:
        cooldown = settings.alert_cooldown_minutes
    with session_scope(engine) as s:
        if not notify.should_alert(s, site_id, "drift", cooldown):
            log.info("drift alert for %s suppressed by the %d-minute cool-down", site.name, cooldown)
            return None
        subject, body = drift_email(site, check_id, result, phrases, model_key, reports)
        attachments = [reports["html"]] if reports.get("html") else []
        alert = notify.queue_email(s, site_id=site_id, kind="drift", recipients=site.approvers or [settings.mail_from],
                                   subject=subject, body=body, attachments=attachments)
        s.flush()
        s.get(DriftCheck, check_id).alert_id = alert.id
        alert_id = alert.id
    return alert_id


@task(name="emit-drift-event", cache_policy=NO_CACHE)
def emit_drift_event(site: Site, check_id: int, result: DriftResult) -> str | None:
    """The Prefect event that triggers the ``readapt`` deployment (see deployments/serve.py)."""
    from prefect.events import emit_event

    ev = emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": f"emowatch.site.{site.name}", "emowatch.site": site.name},
        payload={"site": site.name, "check_id": check_id, "p_value": result.p_value,
                 "n_cur": result.n_cur, "auto_adapt": site.adapt.auto},
    )
    return str(ev.id) if ev is not None else None


@task(name="log-check-to-mlflow", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def log_check_to_mlflow(site: Site, check_id: int, model_key: str, result: DriftResult,
                        reports: dict[str, Any]) -> str | None:
    """The check as an MLflow run (metrics + report artifacts) in experiment emowatch-monitor."""
    import mlflow

    from tasks import registry

    try:
        exp = registry.ensure_experiment("emowatch-monitor")
        with mlflow.start_run(experiment_id=exp, run_name=f"{site.name}-check-{check_id}") as run:
            mlflow.set_tags({"emowatch.site": site.name, "emowatch.model": model_key,
                             "emowatch.decision": result.decision, "emowatch.check_id": str(check_id)})
            mlflow.log_metrics({k: float(v) for k, v in (("p_value", result.p_value),
                                ("statistic", result.statistic), ("n_cur", result.n_cur),
                                ("n_ref", result.n_ref)) if v is not None})
            for key in ("html", "json"):
                if reports.get(key):
                    mlflow.log_artifact(reports[key], artifact_path="evidently")
            return run.info.run_id
    except Exception as e:  # noqa: BLE001 - tracking is not worth failing a check for
        get_run_logger().warning("could not log the check to MLflow: %s", e)
        return None


def set_check_run(check_id: int, run_id: str | None) -> None:
    from db.models import DriftCheck
    from db.session import session_scope
    from tasks.context import prepare

    if run_id is None:
        return
    _, engine = prepare()
    with session_scope(engine) as s:
        s.get(DriftCheck, check_id).mlflow_run_id = run_id


@task(name="prefect-artifact", cache_policy=NO_CACHE)
def publish_artifact(site: Site, check_id: int, result: DriftResult, phrases: list[str],
                     reports: dict[str, Any]) -> None:
    """A markdown artifact people read in the Prefect UI (with a link to the report)."""
    from prefect.artifacts import create_markdown_artifact

    md = [
        f"## Drift check #{check_id} — site `{site.name}`",
        "",
        "| decision | p-value | alpha | statistic | n_ref | n_cur | method |",
        "|---|---|---|---|---|---|---|",
        f"| **{result.decision}** | {_fmt(result.p_value)} | {result.threshold} | {_fmt(result.statistic)} "
        f"| {result.n_ref} | {result.n_cur} | {result.method} |",
        "",
        "Image quality: " + ("; ".join(phrases) if phrases else "no clear change"),
    ]
    if reports.get("html"):
        md += ["", f"Evidently report: `file://{reports['html']}`"]
    create_markdown_artifact(markdown="\n".join(md), key=f"drift-{site.name.replace('_', '-')}",
                             description=f"emowatch drift check for {site.name}")
