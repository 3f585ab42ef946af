"""The fault suite: hostile inputs and faults, each with the guarantee it must keep.

Hostile inbox (names, links swapped after the scan, unreadable files, kill -9), planted model
files, tampered tags, gates bypassed, SMTP down for hours, secrets in outputs, two processes
on a fresh home. ``python -m bench.faults`` runs the same cases and prints the table the README
shows.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from db.migrate import init_db
from db.models import ImageRow, QuarantinedFile
from db.session import make_engine, session_scope
from emowatch.sites import Site
from tasks.ingest.pipeline import ingest_inbox

REPO = Path(__file__).resolve().parents[1]


def _jpeg(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(b, "JPEG")
    return b.getvalue()


@pytest.fixture()
def inbox_env(settings, tmp_path):
    init_db(settings.db_url)
    eng = make_engine(settings.db_url)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    yield settings, eng, inbox, Site(name="hostile", inbox=inbox)
    eng.dispose()


def _rows(eng, model):
    with session_scope(eng) as s:
        return list(s.execute(sa.select(model)).scalars())


# --- 2. one file name never stops a site ------------------------------------------------------------
def test_a_corrupt_file_with_a_250_byte_name_is_corrupt_and_the_batch_goes_on(inbox_env):
    settings, eng, inbox, site = inbox_env
    long_name = "x" * 246 + ".jpg"  # 250 bytes: the longest name ext4 allows is 255
    (inbox / long_name).write_bytes(b"\xff\xd8\xff" + b"\x01" * 300)
    (inbox / "good.jpg").write_bytes(_jpeg(1))
    out = ingest_inbox(site, settings, eng, workers=1)
    assert out["ingested"] == 1
    assert out["quarantined"] == [{"path": long_name, "reason": "corrupt"}]
    [q] = _rows(eng, QuarantinedFile)
    assert q.reason == "corrupt" and q.quarantine_path and Path(q.quarantine_path).is_file()
    assert len(Path(q.quarantine_path).name.encode()) <= 255


def test_a_valid_photo_with_a_non_utf8_name_is_ingested_and_json_stays_valid(inbox_env):
    settings, eng, inbox, site = inbox_env
    raw = b"caf\xe9-\xff.jpg"  # Latin-1 bytes: not UTF-8
    data = _jpeg(2)
    with open(os.path.join(os.fsencode(inbox), raw), "wb") as f:
        f.write(data)
    (inbox / "bad-\udcfe.jpg".encode("utf-8", "surrogateescape").decode("utf-8", "replace")
     ).write_bytes(b"not an image")
    out = ingest_inbox(site, settings, eng, workers=1)
    assert out["ingested"] == 1
    text = json.dumps(out, ensure_ascii=False)
    text.encode("utf-8")  # no lone surrogates: printable as UTF-8
    [img] = _rows(eng, ImageRow)
    assert img.rel_path == "caf\\xe9-\\xff.jpg"  # escaped for people and JSON
    assert img.meta["rel_path_bytes"] == raw.hex()  # the original bytes are kept


def test_an_unreadable_file_affects_that_file_alone(inbox_env, monkeypatch):
    settings, eng, inbox, site = inbox_env
    (inbox / "a.jpg").write_bytes(_jpeg(3))
    (inbox / "b.jpg").write_bytes(_jpeg(4))
    real_read = os.read

    def flaky(fd, n):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/a.jpg"):
            raise OSError(5, "Input/output error")
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", flaky)
    out = ingest_inbox(site, settings, eng, workers=1)
    assert out["ingested"] == 1 and out["quarantined"] == [{"path": "a.jpg", "reason": "corrupt"}]


def test_a_folder_swapped_for_a_link_after_the_scan_is_not_followed(inbox_env, tmp_path, monkeypatch):
    from tasks.ingest import pipeline as ingest

    settings, eng, inbox, site = inbox_env
    (inbox / "sub").mkdir()
    (inbox / "sub" / "photo.jpg").write_bytes(_jpeg(5))
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "photo.jpg").write_bytes(_jpeg(6))  # same name, other content, outside the inbox
    real_scan = ingest.scan_inbox

    def scan_then_swap(root):
        res = real_scan(root)
        (inbox / "sub" / "photo.jpg").unlink()
        (inbox / "sub").rmdir()
        os.symlink(outside, inbox / "sub")  # the attacker's move between the scan and the read
        return res

    monkeypatch.setattr(ingest, "scan_inbox", scan_then_swap)
    out = ingest_inbox(site, settings, eng, workers=1)
    assert out["ingested"] == 0
    secret_sha = __import__("hashlib").sha256((outside / "photo.jpg").read_bytes()).hexdigest()
    assert not list(settings.store_dir.rglob(secret_sha))
    assert [q["reason"] for q in out["quarantined"]] in ([], ["outside-inbox"])


def test_temp_files_of_a_killed_run_are_removed_at_start(inbox_env):
    settings, eng, inbox, site = inbox_env
    store = settings.store_dir.resolve()
    leftover = store / "ab" / ".emowatch-tmp-dead"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a file")
    old = time.time() - 3600
    os.utime(leftover, (old, old))
    (inbox / "a.jpg").write_bytes(_jpeg(7))
    ingest_inbox(site, settings, eng, workers=1)
    assert not leftover.exists()


def test_kill_9_mid_ingest_loses_nothing_and_leaves_no_temp_files(settings, tmp_path,
                                                                  record_property):
    """A child ingests a big inbox and is killed with SIGKILL mid-way; the next run finishes
    the job: every image once, no temp file left."""
    inbox = tmp_path / "big"
    inbox.mkdir()
    for i in range(240):
        (inbox / f"{i:03d}.jpg").write_bytes(_jpeg(100 + i, size=64))
    init_db(settings.db_url)
    code = ("import sys; from pathlib import Path; from emowatch.settings import Settings; "
            "from emowatch.sites import Site; from db.session import make_engine; "
            "from tasks.ingest.pipeline import ingest_inbox; "
            f"s = Settings(home=Path({str(settings.home)!r})); "
            f"site = Site(name='big', inbox=Path({str(inbox)!r})); "
            "ingest_inbox(site, s, make_engine(s.db_url), workers=1, chunk_files=8)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    eng = make_engine(settings.db_url)
    deadline = time.time() + 600
    while time.time() < deadline:  # wait until it has committed something, then kill it
        time.sleep(0.2)
        try:
            with session_scope(eng) as s:
                if s.scalar(sa.select(sa.func.count()).select_from(ImageRow)) >= 16:
                    break
        except sa.exc.OperationalError:
            continue
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    site = Site(name="big", inbox=inbox)
    ingest_inbox(site, settings, eng, workers=1)
    with session_scope(eng) as s:
        n = s.scalar(sa.select(sa.func.count()).select_from(ImageRow))
    record_property("images", f"{n}/240")
    assert n == 240
    store = settings.store_dir.resolve()
    assert len([p for p in store.rglob("*") if p.is_file()]) == 240
    assert [p for p in store.rglob("*tmp*")] == []
    eng.dispose()


# --- 1. model files never run code ---------------------------------------------------------------
class _Evil:
    """Unpickling this runs a shell command (what a planted checkpoint would do)."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _tiny_version(runtime, tmp_path):
    import torch

    from models.network import Checkpoint, EmotionNet, NetConfig, preprocessing_for
    from models.profile import ReferenceProfile

    torch.manual_seed(0)
    cfg = NetConfig(backbone="tiny", img_size=64, pretrained=False, num_classes=3)
    ckpt = Checkpoint(EmotionNet(cfg).eval(), ["a", "b", "c"], preprocessing_for(cfg))
    ref = tmp_path / "ref.npz"
    ReferenceProfile.from_arrays(np.zeros((2, 256)), np.full((2, 3), 1 / 3), ["a", "b", "c"]).to_npz(ref)
    return runtime.registry.log_and_register(ckpt, model_name="emowatch-source",
                                             reference_profile_path=ref, alias="champion")


def test_a_planted_checkpoint_never_runs_code(runtime, tmp_path, record_property):
    import torch

    from models.network import UnsafeCheckpointError, load_checkpoint
    from tasks.registry.client import RegistryError

    sentinel = tmp_path / "pwned"
    planted = tmp_path / "planted.pt"
    torch.save({"format": "emowatch-checkpoint/1", "x": _Evil(str(sentinel))}, planted)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_checkpoint(planted)
    assert not sentinel.exists()

    # The same file put in place of a registered version's checkpoint, in the artifact store:
    v = _tiny_version(runtime, tmp_path)
    [stored] = [p for p in Path(runtime.settings.artifact_root).rglob("checkpoint.pt")]
    stored.write_bytes(planted.read_bytes())
    with pytest.raises(RegistryError, match="does not match the sha256"):
        runtime.registry.load_by_version("emowatch-source", v.version)
    record_property("code_executions", int(sentinel.exists()))
    assert not sentinel.exists()


def test_a_tampered_local_copy_is_refused_on_every_load(runtime, tmp_path):
    from tasks.registry.client import RegistryError

    v = _tiny_version(runtime, tmp_path)
    ckpt, _ = runtime.registry.load_by_version("emowatch-source", v.version)  # caches a copy
    [cached] = [p for p in Path(runtime.registry.cache_dir).rglob("checkpoint.pt")]
    cached.write_bytes(cached.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(RegistryError, match="does not match the sha256"):
        runtime.registry.load_by_version("emowatch-source", v.version)


def test_predict_on_a_planted_version_fails_cleanly(runtime, tmp_path, monkeypatch):
    import torch
    from typer.testing import CliRunner

    from deployments.cli import app

    v = _tiny_version(runtime, tmp_path)
    sentinel = tmp_path / "pwned-cli"
    [stored] = [p for p in Path(runtime.settings.artifact_root).rglob("checkpoint.pt")]
    torch.save({"x": _Evil(str(sentinel))}, stored)
    sites = tmp_path / "sites.toml"
    sites.write_text(f'[sites.lab]\ninbox = "{tmp_path}"\n')
    monkeypatch.setenv("EMOWATCH_SITES_FILE", str(sites))
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    r = CliRunner().invoke(app, ["predict", "lab", str(img), "--version", v.version, "--json"])
    assert r.exit_code == 1 and "does not match the sha256" in r.stderr
    assert not sentinel.exists()


# --- 5. no secret in any output -------------------------------------------------------------------
SECRET = "Sup3r-S3cret-Pw"


def test_status_and_approve_never_print_the_tracking_password(settings, tmp_path, monkeypatch):
    """A tracking URI with credentials, unreachable: ``status`` reports the registry error and
    ``approve`` fails, neither shows the password (JSON, stderr)."""
    from typer.testing import CliRunner

    from deployments.cli import app

    sites = tmp_path / "sites.toml"
    sites.write_text(f'[sites.lab]\ninbox = "{tmp_path}"\napprovers = ["ops@example.org"]\n')
    monkeypatch.setenv("EMOWATCH_SITES_FILE", str(sites))
    monkeypatch.setenv("EMOWATCH_MLFLOW_TRACKING_URI", f"http://emowatch:{SECRET}@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    runner = CliRunner()
    r = runner.invoke(app, ["status", "lab", "--json"])
    out = json.loads(r.stdout)
    assert "registry_error" in out["sites"]["lab"] and "emowatch:***@127.0.0.1:9" in r.stdout
    r2 = runner.invoke(app, ["approve", "lab", "2", "--by", "ops@example.org", "--json"])
    assert r2.exit_code != 0
    for text in (r.stdout, r.stderr, r2.stdout, r2.stderr):
        assert SECRET not in text


def test_log_lines_and_tracebacks_are_redacted(settings, caplog):
    import logging

    from emowatch.redact import install_log_redaction, register_secret

    register_secret("smtp-" + SECRET)
    install_log_redaction()
    log = logging.getLogger("emowatch.test")
    with caplog.at_level(logging.INFO):
        log.warning("connecting to %s", f"postgresql://app:{SECRET}@db/emowatch")
        log.info("smtp password is smtp-%s", SECRET)
        try:
            raise RuntimeError(f"cannot reach https://u:{SECRET}@mlflow.example.org")
        except RuntimeError:
            log.exception("registry down")
    text = "\n".join(caplog.text.splitlines())
    assert "postgresql://app:***@db/emowatch" in text and "registry down" in text
    assert SECRET not in text
    assert all(SECRET not in (r.exc_text or "") for r in caplog.records)


# --- 6. alerts are never exhausted by delivery passes -------------------------------------------
def test_a_6_hour_smtp_outage_with_50_sites_loses_no_alert(settings, record_property):
    """50 sites; each one's flow runs every 10 minutes, queues an alert every hour (drift,
    approval) and runs a delivery pass, as the flows do. The mail server is down for 6 hours,
    then up. Every alert arrives exactly once; none is given up."""
    import datetime as dt

    from aiosmtpd.controller import Controller
    from sqlalchemy.orm import Session

    from db.models import Alert, SiteRow, utcnow
    from tasks import notify
    from tests.smtp_helpers import Collector, free_port

    init_db(settings.db_url)
    eng = make_engine(settings.db_url)
    port = free_port()
    s = settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port,
                                    "smtp_timeout_s": 2.0, "mail_from": "emowatch@example.org"})
    with Session(eng) as db, db.begin():
        db.add_all([SiteRow(id=i, name=f"site-{i:02d}", inbox=f"/in/{i}", config={})
                    for i in range(1, 51)])
    start = utcnow()
    handler = Collector()
    ctl = None
    attempts_during_outage = 0
    try:
        for step in range(7 * 6):  # 10-minute steps: 6 hours down, then 1 hour up
            clock = (lambda t: (lambda: t))(start + dt.timedelta(minutes=10 * step))
            if step == 36:
                ctl = Controller(handler, hostname="127.0.0.1", port=port)
                ctl.start()
            for site_id in range(1, 51):
                if step % 6 == 0 and step < 36:
                    with Session(eng) as db, db.begin():
                        notify.queue_email(db, site_id=site_id, kind="drift",
                                           recipients=["ops@example.org"],
                                           subject=f"[emowatch] drift at site-{site_id:02d}",
                                           body=f"hour {step // 6}")
                summary = notify.deliver_pending(eng, s, now=clock)
                if step < 36:
                    attempts_during_outage += summary.failed
    finally:
        if ctl is not None:
            ctl.stop()
    with Session(eng) as db:
        rows = list(db.scalars(sa.select(Alert)))
    queued = len(rows)
    by_status = {st: sum(r.status == st for r in rows) for st in {r.status for r in rows}}
    ids = [m[2].split(b"Message-ID: ")[1].split(b"\r\n")[0] for m in handler.messages]
    record_property("alerts_queued", queued)
    record_property("alerts_delivered", len(set(ids)))
    record_property("alerts_lost", queued - len(set(ids)))
    assert queued == 300 and by_status == {"sent": 300}
    assert len(ids) == len(set(ids)) == 300  # each exactly once
    # backoff per alert: far fewer attempts than 1 per alert per delivery pass
    assert attempts_during_outage < 300 * 20
    eng.dispose()


def test_outbox_cli_requeues_and_send_exits_1_while_undelivered(settings, monkeypatch):
    from aiosmtpd.controller import Controller
    from sqlalchemy.orm import Session
    from typer.testing import CliRunner

    from deployments.cli import app
    from tasks import notify
    from tests.smtp_helpers import Collector, free_port

    port = free_port()
    monkeypatch.setenv("EMOWATCH_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("EMOWATCH_SMTP_PORT", str(port))
    monkeypatch.setenv("EMOWATCH_ALERT_RETRY_HOURS", "0.0001")  # gives up at the first failure
    init_db(settings.db_url)
    eng = make_engine(settings.db_url)
    with Session(eng) as db, db.begin():
        aid = notify.queue_email(db, site_id=None, kind="drift", recipients=["ops@example.org"],
                                 subject="s", body="b").id
    runner = CliRunner()
    r = runner.invoke(app, ["outbox", "--send", "--json"])
    out = json.loads(r.stdout)
    assert r.exit_code == 1 and out["exit_code"] == 1 and out["undelivered"] == 1
    time.sleep(0.5)
    r = runner.invoke(app, ["outbox", "--send", "--json"])
    assert json.loads(r.stdout)["counts"] == {"undelivered": 1} and r.exit_code == 1
    assert runner.invoke(app, ["outbox", "--requeue"]).exit_code == 2
    assert runner.invoke(app, ["outbox", "--failed"]).exit_code == 2
    r = runner.invoke(app, ["outbox", "--requeue", "--failed", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["requeued"] == [aid]
    handler = Collector()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        r = runner.invoke(app, ["outbox", "--send", "--json"])
    finally:
        ctl.stop()
    assert r.exit_code == 0 and json.loads(r.stdout)["counts"] == {"sent": 1}
    r = runner.invoke(app, ["outbox", "--requeue", str(aid), "--json"])
    assert r.exit_code == 2 and "is sent" in r.stderr
    r = runner.invoke(app, ["outbox"])  # the human view works
    assert r.exit_code == 0 and "sent" in r.stdout
    eng.dispose()


# --- 7. two first commands on a fresh SQLite home --------------------------------------------------
def test_two_processes_migrating_a_fresh_sqlite_home_at_once(tmp_path):
    """Eight processes start on the same fresh home at the same instant (a scheduler firing
    two sites' flows, an operator's first command): every one finds the schema at head."""
    url = f"sqlite:///{tmp_path / 'fresh' / 'emowatch.db'}"
    go = tmp_path / "go"
    code = ("import time, sys; from pathlib import Path\n"
            "from db.migrate import init_db\n"
            f"Path({str(tmp_path)!r}, 'ready-' + sys.argv[1]).touch()\n"
            f"while not Path({str(go)!r}).exists(): time.sleep(0.005)\n"
            f"print(init_db({url!r}))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(8)]
    deadline = time.monotonic() + 600  # all imported and waiting (the event, not a fixed sleep)
    while len(list(tmp_path.glob("ready-*"))) < 8 and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.stderr.read()[-500:] for p in procs if p.poll() is not None]
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=600) for p in procs]
    from db.migrate import head

    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == head()


# --- 7. predict / evaluate / explain read images the way ingestion does ----------------------------
def _huge_png_header(path: Path, w: int = 12_000, h: int = 9_000) -> None:
    """A small file whose PNG header claims w x h pixels (a decompression bomb's shape)."""
    import struct
    import zlib

    b = io.BytesIO()
    Image.new("RGB", (8, 8)).save(b, "PNG")
    data = bytearray(b.getvalue())
    ihdr = struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(data))


def test_predict_refuses_a_fifo_and_a_100_mpx_image_without_hanging(runtime, tmp_path):
    from tasks.predict import predict_paths

    _tiny_version(runtime, tmp_path)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    bomb = tmp_path / "bomb.png"
    _huge_png_header(bomb)
    good = tmp_path / "ok.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(good)
    t0 = time.time()
    out = predict_paths(runtime, "lab", [str(fifo), str(bomb), str(good)])
    assert time.time() - t0 < 30
    assert "not a regular file" in out[0]["error"]
    assert "refused before decoding" in out[1]["error"] and "108000000 pixels" in out[1]["error"]
    assert out[2]["label"] in ("a", "b", "c")
    # the limit is the settings' (the same one ingestion applies)
    small = runtime.__class__(runtime.settings.model_copy(update={"max_image_pixels": 1000}))
    with pytest.raises(ValueError, match="none of the images could be read"):
        predict_paths(small, "lab", [str(good)])


def test_explain_into_a_folder_writes_folder_slash_stem_png(runtime, tmp_path):
    from tasks.explain import explain_image, overlay_path

    _tiny_version(runtime, tmp_path)
    img = tmp_path / "face.jpg"
    Image.new("RGB", (48, 48), (90, 120, 30)).save(img)
    out_dir = tmp_path / "maps"
    out_dir.mkdir()
    r = explain_image(runtime, "lab", str(img), str(out_dir), depth=2)
    assert Path(r["output"]) == (out_dir / "face.png").resolve() and (out_dir / "face.png").is_file()
    assert not (tmp_path / "maps.png").exists()
    assert overlay_path("new/", "x/face.jpg") == Path("new/face.png")
    assert overlay_path("new", "x/face.jpg") == Path("new/face.png")
    assert overlay_path("map.png", "x/face.jpg") == Path("map.png")
