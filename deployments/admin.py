"""What ``emowatch init``, ``site list``, ``status`` and ``outbox`` do (plain functions).

Every function takes the command's :class:`tasks.context.Runtime` and returns JSON-able
dicts/lists for the CLI to print. URLs are printed with their passwords hidden
(``emowatch.redact``); the SMTP password is never printed at all.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emowatch.redact import redact, redact_url

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from emowatch.settings import Settings
    from emowatch.sites import Site
    from tasks.context import Runtime

# `emowatch outbox` shows this many of the newest alerts: a screenful.
OUTBOX_LIMIT = 20

EXAMPLE_SITE = "example"
_EXAMPLE = """\
# emowatch sites file, written by `emowatch init` (EMOWATCH_SITES_FILE points here).
# One [sites.<name>] table per deployment site; deployments/sites.example.toml shows every
# option with its meaning. Relative paths are relative to this file's folder.

[sites.{name}]
inbox = "{inbox}"   # the site's new images arrive here
schedule = "0 * * * *"          # cron (UTC): when `emowatch serve` monitors the site
approvers = ["approver@localhost"]  # e-mails; without EMOWATCH_SMTP_HOST they stay .eml files in the outbox
policy = "manual"               # a person approves challengers ("auto": promote when every gate passes)
"""


# --- init -----------------------------------------------------------------------------------------
def _example_text(settings: Settings, sites_file: Path) -> tuple[str, Path]:
    inbox = (Path(settings.home) / "inboxes" / EXAMPLE_SITE).resolve()
    base = sites_file.resolve().parent
    try:
        shown = inbox.relative_to(base).as_posix()  # portable when home sits beside the file
    except ValueError:
        shown = inbox.as_posix()
    return _EXAMPLE.format(name=EXAMPLE_SITE, inbox=shown), inbox


def init_project(rt: Runtime, write_example: bool = True) -> dict[str, Any]:
    """State folders, a migrated database, MLflow configured, the sites file (an example one
    only if there is none and ``write_example``), and every site registered in the database."""
    from db import sites as site_rows
    from db.migrate import current
    from db.session import session_scope
    from emowatch.sites import load_sites, parse_sites

    settings, engine = rt.settings, rt.engine
    sites_file = Path(settings.sites_file)
    created = False
    if not sites_file.exists() and write_example:
        text, inbox = _example_text(settings, sites_file)
        parse_sites(text, source="<example>", base_dir=sites_file.resolve().parent)  # valid?
        sites_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = sites_file.with_name(sites_file.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, sites_file)
        inbox.mkdir(parents=True, exist_ok=True)
        created = True
    names: list[str] = []
    if sites_file.exists():
        sites = load_sites(sites_file)
        with session_scope(engine) as s:
            for site in sites.values():
                site_rows.upsert_site(s, site)
        names = sorted(sites)
    return {
        "home": str(Path(settings.home).resolve()),
        "database": redact_url(settings.db_url),
        "db_revision": current(engine),
        "tracking_uri": redact_url(settings.tracking_uri),
        "sites_file": str(sites_file.resolve()),
        "sites_file_created": created,
        "sites": names,
        "note": None if sites_file.exists() else
        f"no sites file at {sites_file}: run 'emowatch init' (without --no-example) or write one",
    }


# --- registry views ---------------------------------------------------------------------------------
def _registry_missing(settings: Settings) -> bool:
    """A SQLite MLflow store that does not exist yet holds no models (and a read-only command
    should not create it)."""
    uri = settings.tracking_uri
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()


def _models(rt: Runtime, site: Site) -> dict[str, Any]:
    """champion/challenger of ``emowatch-<site>`` and what serves the site right now."""
    from tasks.registry.client import CHALLENGER, CHAMPION, RegistryError

    out: dict[str, Any] = {"champion": None, "challenger": None, "serving": None}
    if _registry_missing(rt.settings):
        return out
    reg = rt.registry
    try:
        out["champion"] = reg.get_alias_version(site.model_name, CHAMPION)
        out["challenger"] = reg.get_alias_version(site.model_name, CHALLENGER)
        try:
            name, version, _ = reg.resolve_site_model(site.name)
            out["serving"] = f"{name}/{version}"
        except RegistryError:
            pass
    except Exception as e:  # noqa: BLE001 -- a down tracking server must not hide the rest
        out["registry_error"] = redact(f"{type(e).__name__}: {e}")
    return out


def list_sites(rt: Runtime) -> list[dict[str, Any]]:
    """The sites of the sites file with their settings and models (champion/challenger
    versions of ``emowatch-<site>``, None when there is none)."""
    rows = []
    for site in rt.sites().values():
        rows.append({
            "name": site.name,
            "inbox": str(site.inbox),
            "inbox_exists": site.inbox.is_dir(),
            "schedule": site.schedule,
            "policy": site.policy,
            "approvers": list(site.approvers),
            "audit": str(site.audit) if site.audit else None,
            "model": site.model_name,
            **_models(rt, site),
            "drift": site.drift.model_dump(mode="json"),
            "adapt_method": site.adapt.method,
            "adapt_auto": site.adapt.auto,
        })
    return rows


# --- status -----------------------------------------------------------------------------------------
def _iso(ts: Any) -> str | None:
    return ts.isoformat(timespec="seconds") if ts is not None else None


def _details(session: Session, site_id: int, model_name: str) -> dict[str, Any]:
    from db.adaptations import latest_run
    from db.checks import latest_check
    from db.deployments import champion_stack, latest_deployment

    d = latest_check(session, site_id)
    a = latest_run(session, site_id)
    m = latest_deployment(session, site_id)
    stack = champion_stack(session, site_id, model_name)
    return {
        "last_drift_check": None if d is None else {
            "id": d.id, "decision": d.decision, "p_value": d.p_value, "statistic": d.statistic,
            "threshold": d.threshold, "method": d.method, "n_ref": d.n_ref, "n_cur": d.n_cur,
            "model": f"{d.model_name}/{d.model_version}", "created_at": _iso(d.created_at),
            "report_html": d.report_html, "report_json": d.report_json, "alert_id": d.alert_id,
            "impact": d.impact, "estimate": d.estimate,
        },
        "impact": None if d is None else d.impact,
        "estimated_accuracy": None if d is None or not d.estimate else {
            k: d.estimate.get(k) for k in ("accuracy", "low", "high", "source_accuracy",
                                           "verifiable")},
        "last_adaptation": None if a is None else {
            "id": a.id, "status": a.status, "method": a.method, "verdict": a.verdict,
            "candidate_version": a.candidate_version, "base_model": a.base_model,
            "created_at": _iso(a.created_at), "error": a.error,
        },
        "last_deployment": None if m is None else {
            "action": m.action, "version": m.version, "previous_version": m.previous_version,
            "actor": m.actor, "reason": m.reason, "forced": m.forced,
            "created_at": _iso(m.created_at),
        },
        "history_champion": stack[-1] if stack else None,
    }


_ZERO = {"images": 0, "quarantined": 0, "batches": 0, "last_ingest_at": None,
         "last_batch_status": None, "drift_checks": 0, "last_drift": None, "adaptation_runs": 0,
         "deployments": 0, "alerts_pending": 0}


def site_status(rt: Runtime, site: str | None = None) -> dict[str, Any]:
    """Counts (db.status.status_counts), models and the latest drift check / adaptation /
    deployment per site; ``site``: only that one (a clear error when it is unknown)."""
    from db import outbox
    from db.session import session_scope
    from db.sites import site_ids
    from db.status import status_counts
    from emowatch.sites import SitesFileError, get_site, load_sites
    from tasks.registry.client import site_model_name

    settings, engine = rt.settings, rt.engine
    sites_file = Path(settings.sites_file)
    note = None
    try:
        file_sites = load_sites(sites_file)
    except SitesFileError as e:
        if sites_file.exists():
            raise  # an invalid file is an error, not "no sites"
        file_sites, note = {}, str(e)
    with session_scope(engine) as s:
        counts = status_counts(s)
        ids = site_ids(s)
        names = sorted(set(file_sites) | set(ids))
        if site is not None:
            if site not in names:
                get_site(file_sites, site)  # raises SitesFileError "unknown site ... (known: ...)"
            names = [site]
        per_site: dict[str, Any] = {}
        for name in names:
            model_name = site_model_name(name)
            entry: dict[str, Any] = {**_ZERO, **counts["sites"].get(name, {})}
            entry["in_sites_file"] = name in file_sites
            entry["in_database"] = name in ids
            entry["model"] = model_name
            if name in ids:
                entry.update(_details(s, ids[name], model_name))
            else:
                entry.update({"last_drift_check": None, "last_adaptation": None,
                              "last_deployment": None, "history_champion": None})
            per_site[name] = entry
        outbox_counts = outbox.counts_by_status(s)
    for name, entry in per_site.items():
        if name in file_sites:
            entry.update(_models(rt, file_sites[name]))
        else:
            entry.update({"champion": None, "challenger": None, "serving": None})
        entry["history_agrees"] = entry["history_champion"] == entry["champion"]
    return {
        "database": redact_url(settings.db_url),
        "tracking_uri": redact_url(settings.tracking_uri),
        "sites_file": str(sites_file),
        "note": note,
        "sites": per_site,
        "totals": counts["totals"],
        "outbox": outbox_counts,
    }


# --- outbox -----------------------------------------------------------------------------------------
def outbox_status(rt: Runtime, send: bool = False, limit: int = OUTBOX_LIMIT,
                  requeue: int | str | None = None) -> dict[str, Any]:
    """Alerts by status and the ``limit`` newest. ``requeue``: an alert id, or "failed" (every
    failed and undelivered alert), made due again first; ``send``: deliver what is due. With
    ``send``, ``exit_code`` is 1 when alerts are left undelivered (failed, waiting or given up)."""
    from db import outbox
    from db.session import session_scope
    from tasks.notify import deliver_pending
    from tasks.notify import requeue as requeue_alerts

    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    settings, engine = rt.settings, rt.engine
    requeued = None
    if requeue is not None:
        requeued = requeue_alerts(engine, None if requeue == "failed" else int(requeue))
    summary = deliver_pending(engine, settings) if send else None
    with session_scope(engine) as s:
        counts = outbox.counts_by_status(s)
        alerts = [{
            "id": a.id, "kind": a.kind, "site": site_name, "subject": a.subject,
            "status": a.status, "attempts": a.attempts, "recipients": list(a.recipients or []),
            "created_at": _iso(a.created_at), "sent_at": _iso(a.sent_at),
            "next_attempt_at": _iso(a.next_attempt_at), "retry_until": _iso(a.retry_until),
            "last_error": (a.last_error or None) and a.last_error[:300], "eml_path": a.eml_path,
        } for a, site_name in outbox.newest(s, limit)]
    smtp = (f"{settings.smtp_host}:{settings.smtp_port} ({settings.smtp_security})"
            if settings.smtp_host else None)
    undelivered = sum(counts.get(k, 0) for k in ("pending", "failed", "undelivered"))
    out: dict[str, Any] = {
        "smtp": smtp,
        "delivery_mode": "smtp" if smtp else "kept (.eml files only: EMOWATCH_SMTP_HOST unset)",
        "outbox_dir": str(Path(settings.outbox_dir).resolve()),
        "retry_hours": settings.alert_retry_hours,
        "counts": counts,
        "total": sum(counts.values()),
        "undelivered": undelivered,
        "requeued": requeued,
        "delivery": asdict(summary) if summary is not None else None,
        "alerts": alerts,
    }
    if send:
        out["exit_code"] = 1 if undelivered else 0
    return out


__all__ = ["redact_url", "init_project", "list_sites", "site_status", "outbox_status"]
