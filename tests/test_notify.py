"""The e-mail outbox against a real SMTP server (aiosmtpd on localhost)."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import ssl
from pathlib import Path

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from sqlalchemy.orm import Session

from db.migrate import init_db
from db.models import Alert, SiteRow
from db.session import make_engine
from tasks import notify
from tests import smtp_helpers

PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"
       b"\x90wS\xde\x00\x00\x00\x0cIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7\x35\x81\x84"
       b"\x00\x00\x00\x00IEND\xaeB`\x82")


Collector = smtp_helpers.Collector
_free_port = smtp_helpers.free_port


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request, tmp_path):
    """The migrated schema on SQLite, and on PostgreSQL where one is reachable."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    else:
        url = request.getfixturevalue("pg_schema_url")
    init_db(url)
    eng = make_engine(url)
    with Session(eng) as s, s.begin():
        s.add(SiteRow(id=1, name="lab", inbox="/tmp/lab", config={}))
    yield eng
    eng.dispose()


@pytest.fixture()
def report(tmp_path) -> tuple[Path, Path]:
    png = tmp_path / "drift.png"
    png.write_bytes(PNG)
    html = tmp_path / "report.html"
    html.write_text("<html><body>drift report</body></html>", encoding="utf-8")
    return png, html


def _smtp_settings(settings, port: int, **kw):
    return settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port,
                                       "smtp_timeout_s": 3.0, "mail_from": "emowatch@example.org",
                                       **kw})


def _queue(engine, attachments=(), kind="drift", site_id=1) -> int:
    with Session(engine) as s, s.begin():
        a = notify.queue_email(s, site_id=site_id, kind=kind, recipients=["ops@example.org",
                               "lead@example.org"], subject="[emowatch] drift at lab",
                               body="Drift detected (p=0.001).", attachments=attachments)
        return a.id


def _alert(engine, alert_id: int) -> Alert:
    with Session(engine) as s:
        return s.get(Alert, alert_id)


def test_message_arrives_with_subject_recipients_and_attachments(engine, settings, report):
    handler = Collector()
    port = _free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        aid = _queue(engine, attachments=report)
        assert _alert(engine, aid).status == "pending"  # the row exists before any sending
        summary = notify.deliver_pending(engine, _smtp_settings(settings, port))
    finally:
        ctl.stop()
    assert (summary.sent, summary.failed, summary.kept) == (1, 0, 0)
    assert len(handler.messages) == 1
    mail_from, rcpts, raw = handler.messages[0]
    assert mail_from == "emowatch@example.org"
    assert rcpts == ["ops@example.org", "lead@example.org"]
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == "[emowatch] drift at lab"
    assert msg.get_body(("plain",)).get_content().strip() == "Drift detected (p=0.001)."
    parts = {p.get_filename(): p for p in msg.iter_attachments()}
    assert parts["drift.png"].get_content_type() == "image/png"
    assert parts["drift.png"].get_content() == PNG
    assert parts["report.html"].get_content_type() == "text/html"
    assert "drift report" in parts["report.html"].get_content()

    row = _alert(engine, aid)
    assert (row.status, row.attempts, row.last_error) == ("sent", 1, None)
    assert row.sent_at is not None
    # The archived .eml is the message that was sent.
    eml = email.message_from_bytes(Path(row.eml_path).read_bytes(), policy=email.policy.default)
    assert eml["Message-ID"] == msg["Message-ID"]
    # Nothing left to send: a second run sends nothing.
    assert notify.deliver_pending(engine, _smtp_settings(settings, port)).sent == 0


def _clock(minutes: float):
    """A clock ``minutes`` from now (delivery passes at chosen times)."""
    t = notify.utcnow() + dt.timedelta(minutes=minutes)
    return lambda: t


def test_down_server_keeps_alert_and_a_later_run_sends_it_once(engine, settings):
    port = _free_port()  # nobody listens here yet
    s = _smtp_settings(settings, port)
    aid = _queue(engine)
    aid2 = _queue(engine, kind="approval")

    first = notify.deliver_pending(engine, s, now=_clock(0))  # must not raise
    assert (first.sent, first.failed, first.retrying) == (0, 2, 2)
    row = _alert(engine, aid)
    assert row.status == "failed" and row.attempts == 1
    assert "Connection" in row.last_error or "refused" in row.last_error.lower()
    assert Path(row.eml_path).is_file()  # readable by people meanwhile
    assert row.next_attempt_at is not None and row.retry_until is not None

    # Another flow's delivery pass seconds later does not spend an attempt: not due yet.
    assert notify.deliver_pending(engine, s, now=_clock(0.2)).failed == 0
    assert _alert(engine, aid).attempts == 1
    assert notify.deliver_pending(engine, s, now=_clock(2)).failed == 2
    assert _alert(engine, aid).attempts == 2

    handler = Collector()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        third = notify.deliver_pending(engine, s, now=_clock(10))
        fourth = notify.deliver_pending(engine, s, now=_clock(60))
    finally:
        ctl.stop()
    assert (third.sent, third.failed, third.retrying) == (2, 0, 0)
    assert fourth.sent == 0
    assert len(handler.messages) == 2  # exactly once each
    row = _alert(engine, aid)
    assert (row.status, row.attempts, row.last_error) == ("sent", 3, None)
    assert _alert(engine, aid2).status == "sent"


def test_retry_delay_backs_off_per_alert():
    d = [notify.retry_delay(n, 7).total_seconds() for n in range(1, 9)]
    assert 60 <= d[0] < 66 and all(b >= a for a, b in zip(d, d[1:], strict=False))
    assert d[-1] <= 30 * 60 * 1.1 and d[1] > 1.9 * d[0]
    assert notify.retry_delay(1, 7) != notify.retry_delay(1, 8)  # spread between alerts


def test_retried_until_the_window_then_undelivered_until_requeued(engine, settings):
    port = _free_port()
    s = _smtp_settings(settings, port, alert_retry_hours=1.0)
    aid = _queue(engine)
    minutes = 0.0
    while True:  # a delivery pass every 5 minutes while the server is down
        summary = notify.deliver_pending(engine, s, now=_clock(minutes))
        if _alert(engine, aid).status == "undelivered":
            break
        minutes += 5
        assert minutes < 120
    assert 60 <= minutes <= 65 and summary.exhausted == 1
    attempts = _alert(engine, aid).attempts
    assert 5 <= attempts <= 10  # backoff: not one attempt per pass (13 passes)
    assert notify.deliver_pending(engine, s, now=_clock(minutes + 60)).failed == 0  # given up

    with pytest.raises(ValueError, match="no alert 999"):
        notify.requeue(engine, 999)
    assert notify.requeue(engine) == [aid]
    handler = Collector()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        assert notify.deliver_pending(engine, s).sent == 1
    finally:
        ctl.stop()
    with pytest.raises(ValueError, match="is sent"):
        notify.requeue(engine, aid)


def test_stale_sending_row_is_taken_over(engine, settings):
    aid = _queue(engine)
    old = notify.utcnow() - notify.STALE_SENDING - dt.timedelta(minutes=1)
    with Session(engine) as s, s.begin():  # a deliverer died after claiming it
        s.execute(sa.update(Alert).where(Alert.id == aid)
                  .values(status="sending", attempts=1, updated_at=old))
    assert notify.deliver_pending(engine, settings).kept == 1  # no SMTP configured
    assert _alert(engine, aid).status == "kept"


def test_without_smtp_host_eml_is_kept_and_parseable(engine, settings, report):
    assert settings.smtp_host is None
    aid = _queue(engine, attachments=report[:1])
    summary = notify.deliver_pending(engine, settings)
    assert (summary.kept, summary.sent, summary.failed) == (1, 0, 0)
    row = _alert(engine, aid)
    assert row.status == "kept"
    path = Path(row.eml_path)
    assert path.parent == Path(settings.outbox_dir) and path.suffix == ".eml"
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert msg["To"] == "ops@example.org, lead@example.org"
    assert msg["Subject"] == "[emowatch] drift at lab"
    [att] = list(msg.iter_attachments())
    assert att.get_content_type() == "image/png" and att.get_content() == PNG
    assert notify.deliver_pending(engine, settings).kept == 0  # kept is final


def test_missing_attachment_at_send_time_does_not_block(engine, settings, report):
    png, _ = report
    aid = _queue(engine, attachments=[png])
    png.unlink()
    assert notify.deliver_pending(engine, settings).kept == 1
    msg = email.message_from_bytes(Path(_alert(engine, aid).eml_path).read_bytes(),
                                   policy=email.policy.default)
    assert "attachment missing when sent" in msg.get_body(("plain",)).get_content()


def test_queue_validates(engine, tmp_path):
    with Session(engine) as s:
        with pytest.raises(ValueError, match="no recipients"):
            notify.queue_email(s, site_id=1, kind="drift", recipients=[], subject="x", body="")
        with pytest.raises(ValueError, match="not e-mail"):
            notify.queue_email(s, site_id=1, kind="drift", recipients=["nobody"], subject="x",
                               body="")
        with pytest.raises(ValueError, match="attachments not found"):
            notify.queue_email(s, site_id=1, kind="drift", recipients=["a@b.org"], subject="x",
                               body="", attachments=[tmp_path / "nope.png"])
        with pytest.raises(ValueError, match="one line"):
            notify.queue_email(s, site_id=1, kind="drift", recipients=["a@b.org"],
                               subject="x\nBcc: evil@x.org", body="")


def test_cooldown(engine):
    with Session(engine) as s, s.begin():
        assert notify.should_alert(s, 1, "drift", 60)
        notify.queue_email(s, site_id=1, kind="drift", recipients=["a@b.org"], subject="x", body="")
    with Session(engine) as s:
        assert not notify.should_alert(s, 1, "drift", 60)
        assert notify.should_alert(s, 1, "approval", 60)  # another kind
        assert notify.should_alert(s, None, "drift", 60)  # another (no) site
        assert notify.should_alert(s, 1, "drift", 0)  # no cool-down
    old = notify.utcnow() - dt.timedelta(minutes=61)
    with Session(engine) as s, s.begin():
        s.execute(sa.update(Alert).values(created_at=old))
    with Session(engine) as s:
        assert notify.should_alert(s, 1, "drift", 60)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    crt, pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


def test_starttls_with_login(engine, settings, tmp_path):
    from pydantic import SecretStr

    crt, pem = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(crt, pem)
    client_ctx = ssl.create_default_context(cafile=str(crt))
    logins: list[tuple[bytes, bytes]] = []

    def auth(server, session, envelope, mechanism, data):  # noqa: ANN001 (aiosmtpd hook)
        creds = (bytes(data.login), bytes(data.password)) if isinstance(data, LoginPassword) else ()
        logins.append(creds)
        # handled=False: let aiosmtpd answer "535" (the default expects us to have replied).
        return AuthResult(success=creds == (b"emowatch", b"s3cret"), handled=False)

    handler = Collector()
    port = _free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, tls_context=server_ctx,
                     require_starttls=True, authenticator=auth, auth_required=True)
    ctl.start()
    try:
        aid = _queue(engine)
        good = _smtp_settings(settings, port, smtp_security="starttls", smtp_username="emowatch",
                              smtp_password=SecretStr("s3cret"))
        bad = good.model_copy(update={"smtp_password": SecretStr("wrong")})
        assert notify.deliver_pending(engine, bad, ssl_context=client_ctx).failed == 1
        error = _alert(engine, aid).last_error
        assert "Authentication" in error and "wrong" not in error
        assert notify.deliver_pending(engine, good, ssl_context=client_ctx,
                                      now=_clock(5)).sent == 1
    finally:
        ctl.stop()
    assert len(handler.messages) == 1
    # smtplib tries each offered mechanism (PLAIN, LOGIN) before giving up on a wrong password.
    assert set(logins) == {(b"emowatch", b"wrong"), (b"emowatch", b"s3cret")}
    assert logins[-1] == (b"emowatch", b"s3cret")
    assert _alert(engine, aid).attempts == 2


def test_no_password_over_a_plain_connection_unless_allowed(engine, settings):
    from pydantic import SecretStr

    logins: list[bytes] = []

    def auth(server, session, envelope, mechanism, data):  # noqa: ANN001 (aiosmtpd hook)
        logins.append(bytes(data.password))
        return AuthResult(success=True, handled=False)

    handler = Collector()
    port = _free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, authenticator=auth,
                     auth_require_tls=False)
    ctl.start()
    try:
        aid = _queue(engine)
        plain = _smtp_settings(settings, port, smtp_security="none", smtp_username="emowatch",
                               smtp_password=SecretStr("s3cret-pw"))
        assert notify.deliver_pending(engine, plain).failed == 1
        assert logins == [] and "refusing to send the SMTP password" in _alert(engine, aid).last_error
        allowed = plain.model_copy(update={"smtp_allow_plaintext_auth": True})
        assert notify.deliver_pending(engine, allowed, now=_clock(5)).sent == 1
    finally:
        ctl.stop()
    assert logins == [b"s3cret-pw"]


def test_prefect_task_wraps_delivery(engine, settings):
    from tasks.context import Runtime

    _queue(engine)
    assert notify.deliver_alerts.retries == 2
    url = engine.url.render_as_string(hide_password=False)
    summary = notify.deliver_alerts.fn(Runtime(settings.model_copy(update={"database_url": url})))
    assert summary.kept == 1
