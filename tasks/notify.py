"""E-mail alerts through an outbox table: written first, delivered later, never lost.

    queue_email(session, ...)        -> an ``alerts`` row (status ``pending``), in the caller's
                                        transaction: the alert exists once that commits.
    deliver_pending(engine, settings) -> sends every due row and records the outcome on it.
    requeue(engine, alert_id | None)  -> failed/undelivered rows due again, with a fresh window.

Statuses: ``pending`` (queued) -> ``sending`` (claimed by one deliverer) -> ``sent`` |
``failed`` (retried at ``next_attempt_at``) | ``undelivered`` | ``kept`` (no SMTP server is
configured: the ``.eml`` file in ``settings.outbox_dir`` *is* the delivery). A ``sending`` row
whose deliverer died is claimable again after ``STALE_SENDING``.

Retries are timed per alert, not counted per delivery pass (with fifty sites, fifty flows
deliver every few minutes): a failed alert waits :func:`retry_delay` (1 minute, doubling, at
most 30 minutes, spread by a few percent per alert so a recovered server is not hit by every
alert at the same second) and is retried until ``Settings.alert_retry_hours`` after its first
failure; only then is it ``undelivered``, and ``emowatch outbox --requeue`` sends it again.

Every delivery attempt also writes the message as ``<outbox_dir>/alert-<id>-<kind>.eml``: the
exact bytes sent, readable by people (any mail client opens it) even when the mail server is
down or mis-configured; ``Alert.eml_path`` points at it.

Delivery is at-least-once: a crash between the server's "250 OK" and the database update sends
the message again on the next run. The Message-ID is fixed per alert, so mail clients show such
a duplicate once.

We use :mod:`smtplib` directly rather than prefect-email's ``email_send_message``: that task is
async, needs an ``EmailServerCredentials`` block stored in the Prefect server, and raises out of
the flow on a down server, while the outbox must work from the CLI and from tests without a
Prefect server, handle each message's failure on its own row and keep timeouts and TLS exact.
"""

from __future__ import annotations

import datetime as dt
import logging
import mimetypes
import os
import smtplib
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, getaddresses
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from db import outbox
from db.models import Alert, utcnow
from emowatch.redact import redact

if TYPE_CHECKING:
    from emowatch.settings import Settings
    from tasks.context import Runtime

log = logging.getLogger(__name__)
# A deliverer that claimed a row and then died leaves it "sending"; after this long another run
# may take it over. Far above one SMTP exchange (timeout 10 s by default), so a slow but live
# deliverer is never doubled.
STALE_SENDING = dt.timedelta(minutes=15)
_MAX_ERROR_CHARS = 2000

SessionSource = Engine | Callable[[], Session]


RETRY_FIRST_S = 60.0
RETRY_MAX_S = 30 * 60.0


@dataclass(frozen=True)
class DeliverySummary:
    sent: int = 0
    kept: int = 0  # written to the outbox folder only (no SMTP server configured)
    failed: int = 0  # tried this run and failed (retried later, or given up: see exhausted)
    skipped: int = 0  # claimed by a concurrent deliverer meanwhile
    exhausted: int = 0  # "undelivered" rows (all time): their retry window passed; need a person
    retrying: int = 0  # "failed" rows (all time) waiting for their next attempt

    @property
    def undelivered(self) -> int:
        """Alerts not delivered when this pass ended (failed now, waiting, or given up)."""
        return self.exhausted + self.retrying


class PlaintextAuthRefused(smtplib.SMTPException):
    """The SMTP password would cross the network unencrypted."""


def retry_delay(attempts: int, alert_id: int) -> dt.timedelta:
    """Wait before the next attempt of an alert that has failed ``attempts`` times: 1 minute,
    doubling, capped at 30 minutes, +0-10 % by alert id (deterministic spread)."""
    base = min(RETRY_FIRST_S * 2.0 ** max(attempts - 1, 0), RETRY_MAX_S)
    spread = 1.0 + ((alert_id * 2654435761) % 1000) / 10000.0
    return dt.timedelta(seconds=base * spread)


# --- queueing -------------------------------------------------------------------------------------
def queue_email(
    session: Session,
    *,
    site_id: int | None,
    kind: str,
    recipients: Sequence[str],
    subject: str,
    body: str,
    attachments: Iterable[str | Path] = (),
) -> Alert:
    """Add a pending alert to the outbox (flushed, not committed: the caller's transaction owns it).

    Attachments are file paths, read when the message is sent (reports are written before
    the alert and not changed afterwards).
    """
    rcpts = [r.strip() for r in recipients if r and r.strip()]
    if not rcpts:
        raise ValueError(f"alert {kind!r} has no recipients")
    bad = [r for r in rcpts if "@" not in getaddresses([r])[0][1]]
    if bad:
        raise ValueError(f"not e-mail addresses: {', '.join(bad)}")
    if not kind or len(kind) > 32:
        raise ValueError(f"alert kind must be 1-32 characters, got {kind!r}")
    if "\n" in subject or "\r" in subject:
        raise ValueError("the subject must be one line")
    paths = [Path(a).resolve() for a in attachments]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"attachments not found: {', '.join(missing)}")
    return outbox.add_alert(session, site_id=site_id, kind=kind, recipients=rcpts,
                            subject=subject, body=body, attachments=[str(p) for p in paths],
                            status="pending", attempts=0)


def should_alert(session: Session, site_id: int | None, kind: str, cooldown_minutes: float) -> bool:
    """False when an alert of ``kind`` for this site was queued within the cool-down.

    Counts alerts in every status: a queued-but-undelivered alert is still the alert for its
    period. Two flows checking at the same instant may both get True (no lock; harmless).
    """
    if cooldown_minutes < 0:
        raise ValueError(f"cooldown_minutes must be >= 0, got {cooldown_minutes}")
    if cooldown_minutes == 0:
        return True
    since = utcnow() - dt.timedelta(minutes=cooldown_minutes)
    return outbox.count_since(session, site_id, kind, since) == 0


# --- messages -------------------------------------------------------------------------------------
def build_message(alert: Alert, mail_from: str) -> EmailMessage:
    """The e-mail of an alert: text body plus its attachments with their MIME types."""
    msg = EmailMessage()
    msg["From"] = mail_from
    msg["To"] = ", ".join(alert.recipients)
    msg["Subject"] = alert.subject
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    domain = mail_from.rpartition("@")[2] or "localhost"
    created = alert.created_at.strftime("%Y%m%d%H%M%S") if alert.created_at else "0"
    # Fixed per alert: a re-send after a crash is the same message to mail clients.
    msg["Message-ID"] = f"<emowatch-alert-{alert.id}-{created}@{domain}>"
    msg["X-Emowatch-Alert"] = f"{alert.id}; kind={alert.kind}; site={alert.site_id}"
    body = alert.body
    files = []
    for a in alert.attachments or []:
        p = Path(a)
        if p.is_file():
            files.append(p)
        else:  # a deleted report must not block the alert itself
            body += f"\n\n[attachment missing when sent: {p}]"
    msg.set_content(body)
    for p in files:
        ctype, encoding = mimetypes.guess_type(p.name)
        if ctype is None or encoding is not None:  # unknown, or compressed (.gz)
            ctype = "application/octet-stream"
        maintype, subtype = ctype.split("/", 1)
        msg.add_attachment(p.read_bytes(), maintype=maintype, subtype=subtype, filename=p.name)
    return msg


def _write_eml(msg: EmailMessage, alert: Alert, outbox_dir: Path) -> Path:
    outbox_dir.mkdir(parents=True, exist_ok=True)
    path = outbox_dir / f"alert-{alert.id:06d}-{_safe(alert.kind)}.eml"
    tmp = path.with_suffix(".eml.tmp")
    tmp.write_bytes(msg.as_bytes())
    os.replace(tmp, path)  # readers never see half a file
    return path


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


# --- SMTP ------------------------------------------------------------------------------------------
def _connect(settings: Settings, ssl_context: ssl.SSLContext | None) -> smtplib.SMTP:
    host, port, timeout = settings.smtp_host, settings.smtp_port, settings.smtp_timeout_s
    if settings.smtp_security == "ssl":
        ctx = ssl_context or ssl.create_default_context()
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=timeout, context=ctx)
    else:
        smtp = smtplib.SMTP(host, port, timeout=timeout)
    try:
        if settings.smtp_security == "starttls":
            smtp.ehlo()
            smtp.starttls(context=ssl_context or ssl.create_default_context())
            smtp.ehlo()
        if (settings.smtp_username and settings.smtp_security == "none"
                and not settings.smtp_allow_plaintext_auth):
            raise PlaintextAuthRefused(
                "refusing to send the SMTP password without encryption (smtp_security = none): "
                "set EMOWATCH_SMTP_SECURITY=starttls or ssl, or "
                "EMOWATCH_SMTP_ALLOW_PLAINTEXT_AUTH=true if the network is trusted")
        if settings.smtp_username:
            pw = settings.smtp_password.get_secret_value() if settings.smtp_password else ""
            smtp.login(settings.smtp_username, pw)
    except BaseException:
        _close(smtp)
        raise
    return smtp


def _close(smtp: smtplib.SMTP | None) -> None:
    if smtp is None:
        return
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


def _describe(e: BaseException) -> str:
    return redact(f"{type(e).__name__}: {e}")[:_MAX_ERROR_CHARS]


# --- delivery --------------------------------------------------------------------------------------
def _sessions(source: SessionSource) -> Callable[[], Session]:
    if isinstance(source, Engine):
        return lambda: Session(source, expire_on_commit=False)
    return source


def deliver_pending(
    sessions: SessionSource,
    settings: Settings,
    *,
    ssl_context: ssl.SSLContext | None = None,
    now: Callable[[], dt.datetime] = utcnow,
) -> DeliverySummary:
    """Send every due alert; SMTP trouble is recorded on the rows, never raised.

    ``sessions``: an Engine or a session factory. ``ssl_context``: for STARTTLS/SSL (default:
    the system's trust store; tests pass one that trusts their own certificate). ``now``: the
    clock (simulations pass their own). Database errors do raise: without the outbox nothing
    can be recorded.
    """
    make = _sessions(sessions)
    window = dt.timedelta(hours=settings.alert_retry_hours)
    with make() as s:
        ids = outbox.deliverable_ids(s, now(), STALE_SENDING)

    counts = {"sent": 0, "kept": 0, "failed": 0, "skipped": 0}

    def failed(alert: Alert, error: str, eml: str | None) -> None:
        t = now()
        until = alert.retry_until or t + window
        if t >= until:
            values = {"status": "undelivered", "next_attempt_at": None}
            log.error("alert %s: still not delivered after %.0f h, giving up (requeue it with "
                      "'emowatch outbox --requeue %s'): %s", alert.id, settings.alert_retry_hours,
                      alert.id, error)
        else:
            values = {"status": "failed",
                      "next_attempt_at": min(t + retry_delay(alert.attempts, alert.id), until)}
        outbox.finish(make, alert.id, now=t, retry_until=until, last_error=error,
                      **({"eml_path": eml} if eml else {}), **values)
        counts["failed"] += 1

    smtp: smtplib.SMTP | None = None
    connect_error: str | None = None  # one refused connection fails the rest of this run fast
    try:
        for alert_id in ids:
            alert = outbox.claim(make, alert_id, now(), STALE_SENDING)
            if alert is None:
                counts["skipped"] += 1
                continue
            try:
                msg = build_message(alert, settings.mail_from)
                eml = str(_write_eml(msg, alert, Path(settings.outbox_dir)))
            except (OSError, ValueError) as e:  # unreadable attachment, full disk, bad header
                log.warning("alert %s: cannot build message: %s", alert_id, _describe(e))
                failed(alert, _describe(e), None)
                continue
            if not settings.smtp_host:
                outbox.finish(make, alert_id, now=now(), status="kept", eml_path=eml,
                              last_error=None, next_attempt_at=None)
                counts["kept"] += 1
                continue
            if smtp is None and connect_error is None:
                try:
                    smtp = _connect(settings, ssl_context)
                except (smtplib.SMTPException, OSError) as e:
                    connect_error = (f"connect {settings.smtp_host}:{settings.smtp_port}: "
                                     f"{_describe(e)}")
                    log.warning("no SMTP session: %s", connect_error)
            if connect_error is not None:
                failed(alert, connect_error, eml)
                continue
            assert smtp is not None
            try:
                refused = smtp.send_message(msg, from_addr=settings.mail_from,
                                            to_addrs=list(alert.recipients))
            except (smtplib.SMTPException, OSError) as e:
                log.warning("alert %s not sent: %s", alert_id, _describe(e))
                failed(alert, _describe(e), eml)
                if isinstance(e, smtplib.SMTPServerDisconnected | OSError):
                    _close(smtp)
                    smtp = None  # reconnect for the next message
                continue
            # Some recipients refused (others accepted): sent, with the refusals on record.
            note = f"refused: {refused}"[:_MAX_ERROR_CHARS] if refused else None
            outbox.finish(make, alert_id, now=now(), status="sent", sent_at=now(), eml_path=eml,
                          last_error=note, next_attempt_at=None)
            counts["sent"] += 1
    finally:
        _close(smtp)

    with make() as s:
        exhausted = outbox.count_status(s, "undelivered")
        retrying = outbox.count_status(s, "failed")
    if exhausted:
        log.error("%d alert(s) were not delivered within %.0f h and are no longer retried "
                  "('emowatch outbox --requeue --failed')", exhausted, settings.alert_retry_hours)
    return DeliverySummary(**counts, exhausted=exhausted, retrying=retrying)


def requeue(sessions: SessionSource, alert_id: int | None = None) -> list[int]:
    """Make failed/undelivered alerts (or one alert, also a ``kept`` one) due now, with a fresh
    retry window; returns their ids."""
    make = _sessions(sessions)
    with make() as s, s.begin():
        return outbox.requeue(s, alert_id)


# --- Prefect ----------------------------------------------------------------------------------------
@task(name="deliver-alerts", retries=2, retry_delay_seconds=[2, 5], cache_policy=NO_CACHE)
def deliver_alerts(rt: Runtime) -> DeliverySummary:
    """Prefect task around :func:`deliver_pending`.

    A down mail server does not fail this task (the outbox retries on the next run); the
    Prefect retries cover what does raise: a database that is briefly unreachable or locked.
    """
    return deliver_pending(rt.engine, rt.settings)


__all__ = [
    "DeliverySummary", "PlaintextAuthRefused", "STALE_SENDING", "build_message",
    "deliver_alerts", "deliver_pending", "queue_email", "requeue", "retry_delay", "should_alert",
]
