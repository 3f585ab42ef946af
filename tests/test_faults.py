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
from tasks.ingest import ingest_inbox

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
    from tasks import ingest

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


def test_kill_9_mid_ingest_loses_nothing_and_leaves_no_temp_files(settings, tmp_path):
    """A child ingests a big inbox and is killed with SIGKILL mid-way; the next run finishes
    the job: every image once, no temp file left."""
    inbox = tmp_path / "big"
    inbox.mkdir()
    for i in range(240):
        (inbox / f"{i:03d}.jpg").write_bytes(_jpeg(100 + i, size=64))
    init_db(settings.db_url)
    code = ("import sys; from pathlib import Path; from emowatch.settings import Settings; "
            "from emowatch.sites import Site; from db.session import make_engine; "
            "from tasks.ingest import ingest_inbox; "
            f"s = Settings(home=Path({str(settings.home)!r})); "
            f"site = Site(name='big', inbox=Path({str(inbox)!r})); "
            "ingest_inbox(site, s, make_engine(s.db_url), workers=1, chunk_files=8)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    eng = make_engine(settings.db_url)
    deadline = time.time() + 60
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
        assert s.scalar(sa.select(sa.func.count()).select_from(ImageRow)) == 240
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


def test_a_planted_checkpoint_never_runs_code(runtime, tmp_path):
    import torch

    from models.network import UnsafeCheckpointError, load_checkpoint
    from tasks.registry import RegistryError

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
    assert not sentinel.exists()


def test_a_tampered_local_copy_is_refused_on_every_load(runtime, tmp_path):
    from tasks.registry import RegistryError

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
