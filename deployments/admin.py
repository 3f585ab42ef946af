"""What ``emowatch init``, ``site list``, ``status`` and ``outbox`` do (plain functions).

Every function returns JSON-able dicts/lists for the CLI to print. URLs are printed with their
passwords hidden (:func:`redact_url`); the SMTP password is never printed at all.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from emowatch.settings import Settings
    from emowatch.sites import Site

# ``scheme://user:password@host`` -> ``scheme://user:***@host`` (SQLAlchemy and http URLs alike).
_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@/\s]*(?P<tail>@)")
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


def redact_url(url: str | None) -> str | None:
    """``url`` with any password replaced by ``***``."""
    if url is None:
        return None
    return _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", url)


# --- init -----------------------------------------------------------------------------------------
def _example_text(settings: Settings, sites_file: Path) -> tuple[str, Path]:
    inbox = (Path(settings.home) / "inboxes" / EXAMPLE_SITE).resolve()
    base = sites_file.resolve().parent
    try:
        shown = inbox.relative_to(base).as_posix()  # portable when home sits beside the file
    except ValueError:
        shown = inbox.as_posix()
    return _EXAMPLE.format(name=EXAMPLE_SITE, inbox=shown), inbox


def init_project(settings: Settings, write_example: bool = True) -> dict[str, Any]:
    """State folders, a migrated database, MLflow configured, the sites file (an example one
    only if there is none and ``write_example``), and every site registered in the database."""
    from db import queries
    from db.migrate import current
    from db.session import session_scope
    from emowatch.sites import load_sites, parse_sites
    from tasks.context import prepare

    settings, engine = prepare(settings)
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
                queries.upsert_site(s, site)
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


def _models(settings: Settings, site: Site) -> dict[str, Any]:
    """champion/challenger of ``emowatch-<site>`` and what serves the site right now."""
    from tasks import registry

    out: dict[str, Any] = {"champion": None, "challenger": None, "serving": None}
    if _registry_missing(settings):
        return out
    try:
        out["champion"] = registry.get_alias_version(site.model_name, registry.CHAMPION)
        out["challenger"] = registry.get_alias_version(site.model_name, registry.CHALLENGER)
        try:
            name, version, _ = registry.resolve_site_model(site.name)
            out["serving"] = f"{name}/{version}"
        except registry.RegistryError:
            pass
    except Exception as e:  # noqa: BLE001 -- a down tracking server must not hide the rest
        out["registry_error"] = f"{type(e).__name__}: {e}"
    return out


def list_sites(settings: Settings) -> list[dict[str, Any]]:
    """The sites of the sites file with their settings and models (champion/challenger
    versions of ``emowatch-<site>``, None when there is none)."""
    from emowatch.sites import load_sites
    from tasks import registry

    registry.configure(settings)
    rows = []
    for site in load_sites(Path(settings.sites_file)).values():
        rows.append({
            "name": site.name,
            "inbox": str(site.inbox),
            "inbox_exists": site.inbox.is_dir(),
            "schedule": site.schedule,
            "policy": site.policy,
            "approvers": list(site.approvers),
            "audit": str(site.audit) if site.audit else None,
            "model": site.model_name,
            **_models(settings, site),
            "drift": site.drift.model_dump(mode="json"),
            "adapt_method": site.adapt.method,
            "adapt_auto": site.adapt.auto,
        })
    return rows


# --- status -----------------------------------------------------------------------------------------
def _iso(ts: Any) -> str | None:
    return ts.isoformat(timespec="seconds") if ts is not None else None


def _latest(session: Session, model: Any, site_id: int) -> Any:
    from sqlalchemy import select

    return session.execute(
        select(model).where(model.site_id == site_id).order_by(model.id.desc()).limit(1)
    ).scalar_one_or_none()


def _details(session: Session, site_id: int, model_name: str) -> dict[str, Any]:
    from db.models import AdaptationRun, DriftCheck, ModelDeployment
    from tasks.promote import champion_stack

    d = _latest(session, DriftCheck, site_id)
    a = _latest(session, AdaptationRun, site_id)
    m = _latest(session, ModelDeployment, site_id)
    stack = champion_stack(session, site_id, model_name)
    return {
        "last_drift_check": None if d is None else {
            "id": d.id, "decision": d.decision, "p_value": d.p_value, "statistic": d.statistic,
            "threshold": d.threshold, "method": d.method, "n_ref": d.n_ref, "n_cur": d.n_cur,
            "model": f"{d.model_name}/{d.model_version}", "created_at": _iso(d.created_at),
            "report_html": d.report_html, "report_json": d.report_json, "alert_id": d.alert_id,
        },
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


def site_status(settings: Settings, site: str | None = None) -> dict[str, Any]:
    """Counts (db.queries.status_counts), models and the latest drift check / adaptation /
    deployment per site; ``site``: only that one (a clear error when it is unknown)."""
    from db import queries
    from db.session import session_scope
    from emowatch.sites import SitesFileError, get_site, load_sites
    from tasks import registry
    from tasks.context import prepare

    settings, engine = prepare(settings)
    sites_file = Path(settings.sites_file)
    note = None
    try:
        file_sites = load_sites(sites_file)
    except SitesFileError as e:
        if sites_file.exists():
            raise  # an invalid file is an error, not "no sites"
        file_sites, note = {}, str(e)
    with session_scope(engine) as s:
        counts = queries.status_counts(s)
        ids = {r.name: r.id for r in s.execute(_site_rows())}
        names = sorted(set(file_sites) | set(ids))
        if site is not None:
            if site not in names:
                get_site(file_sites, site)  # raises SitesFileError "unknown site ... (known: ...)"
            names = [site]
        per_site: dict[str, Any] = {}
        for name in names:
            model_name = registry.site_model_name(name)
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
        outbox = _outbox_counts(s)
    for name, entry in per_site.items():
        if name in file_sites:
            entry.update(_models(settings, file_sites[name]))
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
        "outbox": outbox,
    }


def _site_rows() -> Any:
    from sqlalchemy import select

    from db.models import SiteRow

    return select(SiteRow.name, SiteRow.id)


# --- outbox -----------------------------------------------------------------------------------------
def _outbox_counts(session: Session) -> dict[str, int]:
    from sqlalchemy import func, select

    from db.models import Alert

    q = select(Alert.status, func.count()).group_by(Alert.status)
    return {status: int(n) for status, n in session.execute(q)}


def outbox_status(settings: Settings, send: bool = False,
                  limit: int = OUTBOX_LIMIT) -> dict[str, Any]:
    """Alerts by status and the ``limit`` newest; ``send``: deliver what is pending first."""
    from sqlalchemy import select

    from db.models import Alert, SiteRow
    from db.session import session_scope
    from tasks.context import prepare
    from tasks.notify import deliver_pending

    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    settings, engine = prepare(settings)
    delivery = asdict(deliver_pending(engine, settings)) if send else None
    with session_scope(engine) as s:
        counts = _outbox_counts(s)
        q = (select(Alert, SiteRow.name).outerjoin(SiteRow, SiteRow.id == Alert.site_id)
             .order_by(Alert.id.desc()).limit(limit))
        alerts = [{
            "id": a.id, "kind": a.kind, "site": site_name, "subject": a.subject,
            "status": a.status, "attempts": a.attempts, "recipients": list(a.recipients or []),
            "created_at": _iso(a.created_at), "sent_at": _iso(a.sent_at),
            "last_error": (a.last_error or None) and a.last_error[:300], "eml_path": a.eml_path,
        } for a, site_name in s.execute(q)]
    smtp = (f"{settings.smtp_host}:{settings.smtp_port} ({settings.smtp_security})"
            if settings.smtp_host else None)
    return {
        "smtp": smtp,
        "delivery_mode": "smtp" if smtp else "kept (.eml files only: EMOWATCH_SMTP_HOST unset)",
        "outbox_dir": str(Path(settings.outbox_dir).resolve()),
        "counts": counts,
        "total": sum(counts.values()),
        "delivery": delivery,
        "alerts": alerts,
    }


__all__ = ["redact_url", "init_project", "list_sites", "site_status", "outbox_status"]
