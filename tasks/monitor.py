"""Tasks of the monitor flow: the drift test, its audit record, report, alert and event."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from emowatch.jsonable import plain
from emowatch.sites import Site
from models.drift.base import CombinedDrift, DriftConfig, DriftResult
from models.estimate.base import Estimate, as_estimate
from models.quality import describe_shift
from tasks.featurize import FeatureSet
from tasks.messages import drift_email

if TYPE_CHECKING:
    from tasks.context import RunContext

DRIFT_EVENT = "emowatch.drift.detected"


@dataclass(frozen=True)
class Window:
    """The site's most recent images: what one check tests."""

    items: list[tuple[str, str]]  # (sha256, store path), newest first
    ids: list[int]  # image row ids, aligned with items
    oldest: dt.datetime | None
    newest: dt.datetime | None

    def ids_of(self, shas: list[str]) -> list[int]:
        by_sha = {sha: i for i, (sha, _) in zip(self.ids, self.items, strict=True)}
        return [by_sha[s] for s in shas]


def window_items(ctx: RunContext, window: int) -> Window:
    """The site's ``window`` most recent images."""
    from db import inbox
    from db.session import session_scope

    with session_scope(ctx.engine) as s:
        rows = inbox.recent_images(s, ctx.site_id, window)
        items = [(r.sha256, r.store_path) for r in rows]
        ids = [r.id for r in rows]
        times = [r.ingested_at for r in rows]
    return Window(items, ids, min(times) if times else None, max(times) if times else None)


@task(name="select-window", cache_policy=NO_CACHE)
def select_window(ctx: RunContext) -> Window:
    return window_items(ctx, ctx.site.drift.window)


def drift_config(site: Site) -> DriftConfig:
    return DriftConfig(alpha=site.drift.alpha, min_samples=site.drift.min_samples,
                       n_permutations=site.drift.permutations)


def check_drift(site: Site, profile: Any, fs: FeatureSet) -> tuple[DriftResult, list[str]]:
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
    result, phrases = check_drift(site, profile, fs)
    get_run_logger().info(
        "site %s: %s (p=%s, stat=%s, n_ref=%d, n_cur=%d)", site.name, result.decision,
        _fmt(result.p_value), _fmt(result.statistic), result.n_ref, result.n_cur,
    )
    return result, phrases


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


@task(name="evidently-report", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def evidently_report(ctx: RunContext, profile: Any, fs: FeatureSet,
                     stamp: dt.datetime, decision: str,
                     estimate: Estimate | None = None, impact: str | None = None,
                     ) -> dict[str, str | None]:
    """Evidently report (HTML + JSON) on PCA components, predicted classes and image quality,
    added to the site's project in the local Evidently workspace. Evidently explains; the
    calibrated test decides. Never fails the monitor run: errors are logged and returned."""
    from tasks.reports import evidently as report

    settings, site = ctx.settings, ctx.site
    log = get_run_logger()
    if len(fs) < 2:
        return {"html": None, "json": None, "error": "fewer than 2 current images"}
    wanted = settings.evidently_reports
    if wanted == "never" or (wanted == "drift" and decision != "drift"):
        # ~10 s a check alone on 2 cores (6.5 s importing Evidently, 4 s building): the scale
        # knob (bench/scale.py); the check's own page and record are written regardless
        return {"html": None, "json": None, "error": None,
                "skipped": f"EMOWATCH_EVIDENTLY_REPORTS={wanted}, decision {decision}"}
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
            metadata={"site": site.name, "decision": decision,
                      **_estimate_metadata(estimate, impact)},
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


def _estimate_metadata(estimate: Estimate | None, impact: str | None) -> dict[str, str]:
    est = as_estimate(estimate)
    if not est.available:
        return {"impact": impact or "unknown", "estimated_accuracy": "none"}
    return {"impact": impact or "unknown",
            **{f"estimated_{k}": f"{getattr(est, k):.4f}" for k in ("accuracy", "low", "high",
                                                                   "source_accuracy", "drop")},
            "estimate_verifiable": str(bool(est.verifiable)).lower()}


@task(name="estimate-accuracy", cache_policy=NO_CACHE)
def estimate_task(ctx: RunContext, profile: Any, fs: FeatureSet, model: Any = None,
                  window: Window | None = None) -> tuple[Estimate, str]:
    """(estimate, impact) of the window (``tasks.impact``); ``model`` and ``window`` let a
    version without a bank estimator be estimated on the site twin."""
    from db import checks
    from db.session import session_scope
    from tasks.impact import estimate_accuracy, headline, impact_of

    paths = previous = None
    if window is not None:
        where = dict(window.items)
        paths = [where[s] for s in fs.shas if s in where]
        with session_scope(ctx.engine) as s:  # the site's last twin: kept while it fits
            last = checks.latest_check(s, ctx.site_id)
            previous = (last.estimate or {}).get("twin") if last is not None else None
    est = estimate_accuracy(profile, fs, model=model, site_paths=paths, previous_twin=previous)
    imp = impact_of(ctx.site, est)
    get_run_logger().info("%s%s", headline(ctx.site, est, imp),
                          "" if est.available else f" ({est.reason})")
    return est, imp


@task(name="record-drift-check", cache_policy=NO_CACHE)
def record_check(ctx: RunContext, result: DriftResult, phrases: list[str], image_ids: list[int],
                 window: Window, reports: dict[str, Any], estimate: Estimate | None = None,
                 impact: str | None = None) -> int:
    from db import checks
    from db.session import session_scope

    with session_scope(ctx.engine) as s:
        return checks.add_check(
            s, site_id=ctx.site_id, model_name=ctx.model.name, model_version=ctx.model.version,
            decision=result.decision, p_value=result.p_value, statistic=result.statistic,
            threshold=result.threshold, method=result.method, n_ref=result.n_ref,
            n_cur=result.n_cur, window_start=window.oldest, window_end=window.newest,
            image_ids=image_ids, details={**plain(result.details), "quality_shift": phrases},
            report_html=reports.get("html"), report_json=reports.get("json"),
            estimate=plain(as_estimate(estimate).to_json()) if estimate is not None else None,
            impact=impact,
        )




@task(name="drift-alert", cache_policy=NO_CACHE)
def alert_on_drift(ctx: RunContext, check_id: int, result: DriftResult, phrases: list[str],
                   reports: dict[str, Any], estimate: Estimate | None = None,
                   impact: str | None = None) -> int | None:
    """Queue the drift e-mail (unless the site's cool-down holds) and link it to the check."""
    from db import checks
    from db.session import session_scope
    from tasks import notify

    log = get_run_logger()
    site, settings = ctx.site, ctx.settings
    cooldown = site.drift.cooldown_minutes
    if cooldown is None:
        cooldown = settings.alert_cooldown_minutes
    with session_scope(ctx.engine) as s:
        if not notify.should_alert(s, ctx.site_id, "drift", cooldown):
            log.info("drift alert for %s suppressed by the %d-minute cool-down", site.name, cooldown)
            return None
        subject, body = drift_email(site, check_id, result, phrases, ctx.model.key, reports,
                                    estimate, impact)
        # one small picture, never the multi-MB Evidently page: the report is linked
        attachments = [reports[k] for k in ("summary_png", "twin_jpg") if reports.get(k)]
        alert = notify.queue_email(s, site_id=ctx.site_id, kind="drift",
                                   recipients=site.approvers or [settings.mail_from],
                                   subject=subject, body=body, attachments=attachments)
        checks.update_check(s, check_id, alert_id=alert.id)
        return alert.id


@task(name="check-report", cache_policy=NO_CACHE)
def check_page(ctx: RunContext, check_id: int, result: DriftResult, phrases: list[str],
               profile: Any, fs: FeatureSet, window: Window, estimate: Estimate | None,
               impact: str | None, notified: bool, reports: dict[str, Any],
               mlflow_run: str | None) -> dict[str, Any]:
    """emowatch's own report of the check (``reports/<site>/check-<id>.html``) and its small
    summary picture for the e-mail; ``reports`` plus ``page`` and ``summary_png``. Never fails
    the check: errors are logged."""
    from tasks.reports import pages

    out = dict(reports)
    try:
        by_sha = dict(window.items)
        paths = [by_sha[s] for s in fs.shas]
        fig = None
        if len(fs) and profile.quality and fs.quality:  # drawn once: the page and the e-mail
            from models.report_plots import quality_histograms_figure

            fig = quality_histograms_figure(profile.quality, fs.quality, site=ctx.site.name)
        page = pages.write_check_report(ctx, check_id, result, phrases, profile, fs, paths,
                                        estimate, impact, notified, reports, mlflow_run,
                                        quality_fig=fig)
        out["page"] = str(page.resolve())
        if fig is not None:
            png = page.with_suffix(".png")
            fig.savefig(png, dpi=60)
            out["summary_png"] = str(png.resolve())
        twin = pages.write_twin_picture(page.with_name(page.stem + "-twin.jpg"), profile,
                                        estimate.twin if estimate is not None else None, paths)
        if twin is not None:
            out["twin_jpg"] = str(twin.resolve())
    except Exception as e:  # noqa: BLE001
        get_run_logger().warning("could not write the check report: %s", e)
    return out


@task(name="status-page", cache_policy=NO_CACHE)
def status_page(ctx: RunContext) -> str | None:
    """Rewrite ``reports/index.html``; never fails the check."""
    from tasks.reports.pages import write_status_page

    try:
        return str(write_status_page(ctx).resolve())
    except Exception as e:  # noqa: BLE001
        get_run_logger().warning("could not write the status page: %s", e)
        return None


@task(name="emit-drift-event", cache_policy=NO_CACHE)
def emit_drift_event(site: Site, check_id: int, result: DriftResult,
                     impact: str | None = None) -> str | None:
    """The Prefect event that triggers the ``readapt`` deployment (see deployments/serve.py)."""
    from prefect.events import emit_event

    ev = emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": f"emowatch.site.{site.name}", "emowatch.site": site.name},
        payload={"site": site.name, "check_id": check_id, "p_value": result.p_value,
                 "n_cur": result.n_cur, "auto_adapt": site.adapt.auto,
                 "impact": impact or "unknown"},
    )
    return str(ev.id) if ev is not None else None


@task(name="log-check-to-mlflow", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def log_check_to_mlflow(ctx: RunContext, check_id: int, result: DriftResult,
                        reports: dict[str, Any], estimate: Estimate | None = None,
                        impact: str | None = None) -> str | None:
    """The check as an MLflow run (metrics + report artifacts) in experiment emowatch-monitor,
    linked from the check's row. Tracking is not worth failing a check for: errors are logged."""
    from db import checks
    from db.session import session_scope

    site = ctx.site
    try:
        metrics = {k: float(v) for k, v in (("p_value", result.p_value),
                   ("statistic", result.statistic), ("n_cur", result.n_cur),
                   ("n_ref", result.n_ref)) if v is not None}
        est = as_estimate(estimate)
        metrics.update({f"estimated_{k}": float(getattr(est, k)) for k in (
            "accuracy", "low", "high", "source_accuracy", "drop", "drop_low", "drop_high")
            if getattr(est, k) is not None})
        run_id = ctx.registry.log_run(
            "emowatch-monitor", f"{site.name}-check-{check_id}",
            tags={"emowatch.site": site.name, "emowatch.model": ctx.model.key,
                  "emowatch.decision": result.decision, "emowatch.check_id": str(check_id),
                  "emowatch.impact": impact or "unknown",
                  "emowatch.estimate_verifiable": str(bool(est.verifiable)).lower()},
            metrics=metrics,
            artifacts=[(reports[k], "evidently") for k in ("html", "json") if reports.get(k)])
    except Exception as e:  # noqa: BLE001
        get_run_logger().warning("could not log the check to MLflow: %s", e)
        return None
    with session_scope(ctx.engine) as s:
        checks.update_check(s, check_id, mlflow_run_id=run_id)
    return run_id


@task(name="prefect-artifact", cache_policy=NO_CACHE)
def publish_artifact(site: Site, check_id: int, result: DriftResult, phrases: list[str],
                     reports: dict[str, Any], estimate: Estimate | None = None,
                     impact: str | None = None) -> None:
    """A markdown artifact people read in the Prefect UI (with a link to the report)."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.impact import explanation, headline

    est = as_estimate(estimate)
    md = [
        f"## Drift check #{check_id} — site `{site.name}`",
        "",
        f"**{headline(site, est, impact or 'unknown')}**",
        "",
        explanation(site, est, impact or "unknown"),
        "",
        "| decision | p-value | alpha | statistic | n_ref | n_cur | method |",
        "|---|---|---|---|---|---|---|",
        f"| **{result.decision}** | {_fmt(result.p_value)} | {result.threshold} | {_fmt(result.statistic)} "
        f"| {result.n_ref} | {result.n_cur} | {result.method} |",
        "",
        "Image quality: " + ("; ".join(phrases) if phrases else "no clear change"),
    ]
    if reports.get("page"):
        md += ["", f"Report: `file://{reports['page']}`"]
    if reports.get("html"):
        md += ["", f"Evidently report (detail): `file://{reports['html']}`"]
    create_markdown_artifact(markdown="\n".join(md), key=f"drift-{site.name.replace('_', '-')}",
                             description=f"emowatch drift check for {site.name}")
