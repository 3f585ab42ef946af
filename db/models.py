"""emowatch's own database: SQLAlchemy 2.0 typed ORM.

The same schema runs on SQLite (default, a file under ``.emowatch/``) and PostgreSQL; the
migrations in ``db/migrations`` create it (``db.session.init_db``), and a test checks that the
migrated schema and this metadata agree. Every table carries ``created_at``/``updated_at``.

Datetimes are always timezone-aware UTC in Python (:class:`UTCDateTime`), on both databases:
SQLite has no time zones, so values are stored as UTC text and given ``tzinfo=UTC`` on read.
Changing this file means adding an Alembic revision under ``db/migrations/versions``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names, so Alembic migrations are identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """``DateTime(timezone=True)`` that always hands back aware UTC datetimes.

    PostgreSQL stores ``timestamptz``; SQLite stores text without an offset, so every value is
    converted to UTC before it is written (naive values are taken to be UTC already) -- that
    also keeps SQLite's text comparisons (lock expiry, time windows) in the right order.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise ValueError(f"expected a datetime, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, dt.datetime: UTCDateTime}


class Timestamped:
    created_at: Mapped[dt.datetime] = mapped_column(
        UTCDateTime(), default=utcnow, server_default=func.now()
    )
    updated_at: Mapped[dt.datetime] = mapped_column(
        UTCDateTime(), default=utcnow, onupdate=utcnow, server_default=func.now()
    )


class SiteRow(Timestamped, Base):
    """A site as last seen in the sites file (the file is the source of truth)."""

    __tablename__ = "sites"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    inbox: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class IngestionBatch(Timestamped, Base):
    """One scan of one site's inbox. Counters are committed chunk by chunk, so a batch that a
    crash left ``running`` shows how far it got; the next run marks it ``interrupted``."""

    __tablename__ = "ingestion_batches"
    __table_args__ = (Index("ix_ingestion_batches_site_status", "site_id", "status"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(
        String(16), default="running"
    )  # running|done|failed|interrupted
    owner: Mapped[str] = mapped_column(String(200), default="")  # "<host>:<pid>" of the process
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())  # at each chunk commit
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    n_seen: Mapped[int] = mapped_column(Integer, default=0)
    n_ingested: Mapped[int] = mapped_column(Integer, default=0)
    n_duplicates: Mapped[int] = mapped_column(Integer, default=0)
    n_ignored: Mapped[int] = mapped_column(Integer, default=0)
    n_quarantined: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)


class ImageRow(Timestamped, Base):
    """One unique image of one site (sha256 of the file bytes)."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("site_id", "sha256", name="uq_images_site_sha256"),
        # recent_images(): newest first by (ingested_at, id) within a site
        Index("ix_images_site_ingested", "site_id", "ingested_at", "id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"))
    batch_id: Mapped[int | None] = mapped_column(
        ForeignKey("ingestion_batches.id", ondelete="SET NULL"), index=True
    )
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    rel_path: Mapped[str] = mapped_column(Text)  # first path it arrived under, inbox-relative
    store_path: Mapped[str] = mapped_column(Text)  # absolute path of the content-addressed copy
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(16))  # Pillow's: JPEG|MPO|PNG|WEBP|BMP|TIFF|GIF
    width: Mapped[int] = mapped_column(Integer)  # after EXIF orientation (as load_rgb returns it)
    height: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(16))  # as stored in the file (P, CMYK, I;16, ...)
    status: Mapped[str] = mapped_column(String(16), default="ok")
    ingested_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class QuarantinedFile(Timestamped, Base):
    __tablename__ = "quarantined_files"
    __table_args__ = (UniqueConstraint("site_id", "rel_path", "sha256", name="uq_quarantine_file"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    batch_id: Mapped[int | None] = mapped_column(
        ForeignKey("ingestion_batches.id", ondelete="SET NULL")
    )  # the batch that first found it
    rel_path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), default="")  # "" when not read
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)  # None when not stat-able
    reason: Mapped[str] = mapped_column(
        String(32)
    )  # empty|not-image|truncated|corrupt|too-large|too-small|outside-inbox
    detail: Mapped[str] = mapped_column(Text, default="")
    quarantine_path: Mapped[str | None] = mapped_column(Text)  # None when not copied
    # hex of the name's bytes when they are not UTF-8 (rel_path then holds "\xNN" escapes)
    raw_path: Mapped[str | None] = mapped_column(Text)


class ImageFeature(Timestamped, Base):
    """Bottleneck features + softmax of an image under one model version (the featurize cache)."""

    __tablename__ = "image_features"
    __table_args__ = (UniqueConstraint("sha256", "model_key", name="uq_features_sha_model"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    model_key: Mapped[str] = mapped_column(String(200), index=True)  # "<name>/<version>"
    features: Mapped[bytes] = mapped_column(LargeBinary)  # float32 (D,)
    probs: Mapped[bytes] = mapped_column(LargeBinary)  # float32 (K,)
    quality: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class DriftCheck(Timestamped, Base):
    __tablename__ = "drift_checks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(32))
    decision: Mapped[str] = mapped_column(String(24))  # drift|no_drift|insufficient_data
    p_value: Mapped[float | None] = mapped_column(Float)
    statistic: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    method: Mapped[str] = mapped_column(String(64))
    n_ref: Mapped[int] = mapped_column(Integer)
    n_cur: Mapped[int] = mapped_column(Integer)
    window_start: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    window_end: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    image_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    report_html: Mapped[str | None] = mapped_column(Text)
    report_json: Mapped[str | None] = mapped_column(Text)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    alert_id: Mapped[int | None] = mapped_column(ForeignKey("alerts.id", ondelete="SET NULL"))
    # the label-free accuracy estimate of the window (models.estimate.base.Estimate as a dict) and
    # what it means for the site: harmful | harmless | unknown (NULL: checks before 0003)
    estimate: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    impact: Mapped[str | None] = mapped_column(String(16), index=True)


class AdaptationRun(Timestamped, Base):
    __tablename__ = "adaptation_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    drift_check_id: Mapped[int | None] = mapped_column(
        ForeignKey("drift_checks.id", ondelete="SET NULL")
    )
    method: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|done|failed
    base_model: Mapped[str] = mapped_column(String(200))  # "<name>/<version>" adapted from
    candidate_version: Mapped[str | None] = mapped_column(String(32))
    verdict: Mapped[str | None] = mapped_column(String(16))  # pass|fail|unverifiable
    gates: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # the site's labelled audit result (None: no audit set), the verdict's reasons in words,
    # and every candidate the run built (method, params, estimate, seconds, selected)
    audit: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    reasons: Mapped[list[Any] | None] = mapped_column(JSON)
    candidates: Mapped[list[Any] | None] = mapped_column(JSON)
    n_site_images: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float | None] = mapped_column(Float)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class ModelDeployment(Timestamped, Base):
    """Champion history per site: every move of the alias, with who/why (append-only)."""

    __tablename__ = "model_deployments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(32))
    previous_version: Mapped[str | None] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(16))  # initial|approve|auto|rollback|reject
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text, default="")
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    gates: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Alert(Timestamped, Base):
    """The e-mail outbox: written first, then sent with retries; never lost."""

    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int | None] = mapped_column(
        ForeignKey("sites.id", ondelete="SET NULL"), index=True
    )
    kind: Mapped[str] = mapped_column(String(32))  # drift|approval|promoted|rejected|rollback|...
    recipients: Mapped[list[Any]] = mapped_column(JSON, default=list)
    subject: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    attachments: Mapped[list[Any]] = mapped_column(JSON, default=list)  # file paths
    status: Mapped[str] = mapped_column(
        String(16), default="pending", index=True
    )  # pending|sending|sent|failed (retried at next_attempt_at)|undelivered (gave up)|kept
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    eml_path: Mapped[str | None] = mapped_column(Text)
    # the next delivery attempt is not before this (backoff per alert; None: at once)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), index=True)
    # retried until then (set at the first failed attempt: now + Settings.alert_retry_hours;
    # a requeue clears it), then "undelivered"
    retry_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class SiteLock(Timestamped, Base):
    """A named lock (e.g. ``adapt:<site>``): held while the row exists and has not expired.

    Taken with one atomic INSERT .. ON CONFLICT DO UPDATE .. WHERE expired (db.queries)."""

    __tablename__ = "site_locks"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


__all__ = [
    "Base",
    "SiteRow",
    "IngestionBatch",
    "ImageRow",
    "QuarantinedFile",
    "ImageFeature",
    "DriftCheck",
    "AdaptationRun",
    "ModelDeployment",
    "Alert",
    "SiteLock",
    "UTCDateTime",
    "relationship",
    "utcnow",
]
