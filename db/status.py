"""Per-site counts for ``emowatch status`` (one query per table, grouped by site)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import (
    AdaptationRun,
    Alert,
    DriftCheck,
    ImageFeature,
    ImageRow,
    IngestionBatch,
    ModelDeployment,
    QuarantinedFile,
    SiteRow,
)


def _count_by_site(session: Session, model: Any, *where: Any) -> dict[int, int]:
    q = select(model.site_id, func.count()).where(*where).group_by(model.site_id)
    return {sid: int(n) for sid, n in session.execute(q) if sid is not None}


def _latest_value(session: Session, model: Any, column: Any, site_id: int) -> Any:
    """``column`` of the site's newest row of ``model`` (None without one)."""
    return session.execute(select(column).where(model.site_id == site_id)
                           .order_by(model.id.desc()).limit(1)).scalar_one_or_none()


def status_counts(session: Session) -> dict[str, Any]:
    """Plain numbers for ``emowatch status``: per site (by name) and in total.

    Per site: images, quarantined, batches, last_ingest_at (ISO or None), last_batch_status,
    drift_checks, last_drift (decision or None), adaptation_runs, deployments, alerts_pending.
    Totals: the same counts summed, plus alerts_pending over all alerts and features_cached."""
    sites = list(session.execute(select(SiteRow.id, SiteRow.name).order_by(SiteRow.name)))
    images = _count_by_site(session, ImageRow)
    quarantined = _count_by_site(session, QuarantinedFile)
    batches = _count_by_site(session, IngestionBatch)
    drift = _count_by_site(session, DriftCheck)
    adapt = _count_by_site(session, AdaptationRun)
    deploy = _count_by_site(session, ModelDeployment)
    pending = _count_by_site(session, Alert, Alert.status == "pending")
    last_img = dict(
        session.execute(
            select(ImageRow.site_id, func.max(ImageRow.ingested_at)).group_by(ImageRow.site_id)
        ).all()
    )
    per_site: dict[str, dict[str, Any]] = {}
    for sid, name in sites:
        last_batch = _latest_value(session, IngestionBatch, IngestionBatch.status, sid)
        last_drift = _latest_value(session, DriftCheck, DriftCheck.decision, sid)
        ts = last_img.get(sid)
        if isinstance(ts, dt.datetime) and ts.tzinfo is None:
            ts = ts.replace(tzinfo=dt.UTC)  # SQLite's max() bypasses the column type
        elif isinstance(ts, str):
            ts = dt.datetime.fromisoformat(ts).replace(tzinfo=dt.UTC)
        per_site[name] = {
            "images": images.get(sid, 0),
            "quarantined": quarantined.get(sid, 0),
            "batches": batches.get(sid, 0),
            "last_ingest_at": ts.isoformat() if ts else None,
            "last_batch_status": last_batch,
            "drift_checks": drift.get(sid, 0),
            "last_drift": last_drift,
            "adaptation_runs": adapt.get(sid, 0),
            "deployments": deploy.get(sid, 0),
            "alerts_pending": pending.get(sid, 0),
        }
    keys = ("images", "quarantined", "batches", "drift_checks", "adaptation_runs", "deployments")
    totals: dict[str, int] = {k: sum(s[k] for s in per_site.values()) for k in keys}
    totals["sites"] = len(per_site)
    totals["alerts_pending"] = int(
        session.execute(
            select(func.count()).select_from(Alert).where(Alert.status == "pending")
        ).scalar_one()
    )
    totals["features_cached"] = int(
        session.execute(select(func.count()).select_from(ImageFeature)).scalar_one()
    )
    return {"sites": per_site, "totals": totals}


__all__ = ["status_counts"]
