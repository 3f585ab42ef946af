"""End to end on small real data: the Prefect flows, the CLI's JSON contracts, a real SMTP
server (aiosmtpd), a real MLflow registry and SQLite, all in a temp dir.

Tiny backbone at 64 px on a few hundred Emotion6 photos (a few seconds of training): the
point here is the plumbing and the decisions, not accuracy (bench/ measures that).
"""

from __future__ import annotations

import email
import email.policy
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.smtp_helpers import Collector, free_port

PER_CLASS_SOURCE = 30
SITE_IMAGES = 60


@pytest.fixture(scope="module")
def smtp():
    from aiosmtpd.controller import Controller

    handler = Collector()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    yield handler, port
    ctl.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_dir, smtp, prefect_harness):
    """A trained source model and two site inboxes (clean photos, night camera)."""
    from emowatch.settings import reset_settings
    from models.conditions import apply_condition

    root = tmp_path_factory.mktemp("e2e")
    images = data_dir / "emotion6" / "images"
    rng = np.random.default_rng(0)
    pool = []
    for c in sorted(p.name for p in images.iterdir() if p.is_dir()):
        files = sorted((images / c).glob("*.jpg"))
        idx = rng.permutation(len(files))
        for i in idx[:PER_CLASS_SOURCE]:
            (root / "source" / c).mkdir(parents=True, exist_ok=True)
            os.symlink(files[i], root / "source" / c / files[i].name)
        pool += [files[i] for i in idx[PER_CLASS_SOURCE:PER_CLASS_SOURCE + 20]]
    pick = rng.choice(len(pool), SITE_IMAGES, replace=False)
    for j, i in enumerate(pick):
        img = Image.open(pool[i]).convert("RGB")
        for site, im in (("clean", img), ("night", apply_condition(img, "night", 2, rng))):
            d = root / "inbox" / site
            d.mkdir(parents=True, exist_ok=True)
            im.save(d / f"{j:03d}.jpg", quality=90)
    (root / "sites.toml").write_text(
        '[sites.clean]\ninbox = "inbox/clean"\napprovers = ["ops@example.org"]\n\n'
        '[sites.night]\ninbox = "inbox/night"\napprovers = ["ops@example.org"]\n'
        'policy = "manual"\n[sites.night.adapt]\ntime_budget_s = 60\n',
        encoding="utf-8",
    )
    _, port = smtp
    mp = pytest.MonkeyPatch()
    env = {
        "EMOWATCH_HOME": str(root / "home"),
        "EMOWATCH_SITES_FILE": str(root / "sites.toml"),
        "EMOWATCH_SMTP_HOST": "127.0.0.1",
        "EMOWATCH_SMTP_PORT": str(port),
        "EMOWATCH_MAIL_FROM": "emowatch@example.org",
    }
    for k, v in env.items():
        mp.setenv(k, v)
    for k in ("EMOWATCH_DATABASE_URL", "EMOWATCH_MLFLOW_TRACKING_URI", "EMOWATCH_TASK_RUNNER"):
        mp.delenv(k, raising=False)
    reset_settings()
    from flows.train import train_source

    trained = train_source(data=str(root / "source"), backbone="tiny", epochs=3, seed=0)
    yield {"root": root, "trained": trained}
    mp.undo()
    reset_settings()


def test_train_registers_the_source_champion(world):
    from tasks import registry

    t = world["trained"]
    assert (t["model"], t["version"], t["alias"]) == ("emowatch-source", "1", "champion")
    assert len(t["classes"]) == 6 and 0.0 <= t["val_accuracy"] <= 1.0
    assert registry.get_alias_version("emowatch-source", "champion") == "1"


def test_monitor_clean_site_says_no_drift(world):
    from flows.monitor import monitor_site

    out = monitor_site(site="clean")
    assert {"site", "decision", "p_value", "statistic", "n_ref", "n_cur", "report_html",
            "alert_id"} <= set(out)
    assert out["decision"] == "no_drift", out
    assert out["n_cur"] == SITE_IMAGES and out["alert_id"] is None
    assert Path(out["report_html"]).is_file()
    # The site got its own model: version 1 of emowatch-clean, copied from the source champion.
    assert out["model"] == "emowatch-clean/1"


def test_monitor_night_site_says_drift_and_mails(world, smtp):
    from flows.monitor import monitor_site

    handler, _ = smtp
    before = len(handler.messages)
    out = monitor_site(site="night")
    assert out["decision"] == "drift", out
    assert out["p_value"] <= 0.05 and out["alert_id"] is not None
    assert any("darker" in p for p in out["quality_shift"])
    assert len(handler.messages) == before + 1
    msg = email.message_from_bytes(handler.messages[-1][2], policy=email.policy.default)
    assert "drift at night" in msg["Subject"]
    body = msg.get_body(("plain",)).get_content()
    assert "p-value" in body and f"{SITE_IMAGES} recent site images" in body
    # A re-check of the same images is cheap (features cached) and a cool-down holds the alert.
    again = monitor_site(site="night", ingest=False)
    assert again["decision"] == "drift" and again["alert_id"] is None
    assert len(handler.messages) == before + 1


def test_readapt_registers_a_challenger_and_leaves_the_champion(world):
    from flows.readapt import readapt_site
    from tasks import registry

    champion = registry.get_alias_version("emowatch-night", "champion")
    out = readapt_site(site="night", method="mmd")
    assert {"site", "method", "version", "gates", "verdict"} <= set(out)
    assert out["verdict"] in ("pass", "fail", "unverifiable")
    for g in out["gates"].values():
        assert set(g) >= {"passed", "value", "threshold"}
    assert {"source_accuracy", "dev_risk", "residual_drift", "prediction_sanity",
            "explanation_rank_correlation"} <= set(out["gates"])
    assert registry.get_alias_version("emowatch-night", "champion") == champion
    assert registry.get_alias_version("emowatch-night", "challenger") == out["version"]
    tags = registry.get_version("emowatch-night", out["version"]).tags
    assert tags["emowatch.verdict"] == out["verdict"]
    assert json.loads(tags["emowatch.gates"]) == out["gates"]
    world["challenger"] = out


def test_approve_then_rollback(world):
    from flows.promote import promote
    from tasks import registry

    ch = world.get("challenger")
    if ch is None:
        pytest.fail("the readapt test did not run first")
    force = ch["verdict"] == "fail"
    out = promote(site="night", version=ch["version"], action="approve", actor="tester",
                  reason="e2e test", force=force)
    assert registry.get_alias_version("emowatch-night", "champion") == ch["version"]
    assert out["history_agrees"] is True
    back = promote(site="night", version=None, action="rollback", actor="tester", reason="undo")
    assert registry.get_alias_version("emowatch-night", "champion") == back["champion"] != ch["version"]


def test_cli_json_contracts(world, capsys):
    from typer.testing import CliRunner

    from deployments.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["ingest", "clean", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) >= {"site", "ingested", "duplicates", "ignored", "quarantined"}
    assert out["ingested"] == 0 and out["duplicates"] == SITE_IMAGES

    img = next((world["root"] / "inbox" / "clean").glob("*.jpg"))
    r = runner.invoke(app, ["predict", "clean", str(img), "--json"])
    assert r.exit_code == 0, r.output
    [p] = json.loads(r.stdout)
    assert set(p) >= {"path", "label", "probs"} and abs(sum(p["probs"].values()) - 1) < 1e-4

    png = world["root"] / "map.png"
    r = runner.invoke(app, ["explain", "clean", str(img), "-o", str(png), "--depth", "4", "--json"])
    assert r.exit_code == 0, r.output
    ex = json.loads(r.stdout)
    assert set(ex) >= {"label", "probs", "regions", "efficiency_gap", "model_calls"}
    assert len(ex["regions"]) == 16 and abs(ex["efficiency_gap"]) < 1e-6 and png.is_file()

    r = runner.invoke(app, ["evaluate", "clean", "--data", str(world["root"] / "source"), "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert set(ev) >= {"accuracy", "macro_f1", "n", "per_class"} and ev["n"] == 6 * PER_CLASS_SOURCE

    # usage / config errors exit 2 with a message; no traceback
    r = runner.invoke(app, ["monitor", "no-such-site", "--json"])
    assert r.exit_code == 2 and "unknown site" in r.stderr
    r = runner.invoke(app, ["adapt", "night", "--method", "magic", "--json"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["approve", "night", "999", "--by", "x", "--json"])
    assert r.exit_code == 2


def test_status_and_site_list(world):
    from typer.testing import CliRunner

    from deployments.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["status", "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert "night" in json.dumps(st)
    r = runner.invoke(app, ["site", "list", "--json"])
    assert r.exit_code == 0
    names = {s["name"] for s in json.loads(r.stdout)}
    assert names == {"clean", "night"}


def test_readapt_default_and_cached_top(world):
    """mmd adapts through the whole backbone by default (the night challenger, judged and
    profiled on its own activations); the site option adapt.train_backbone = false keeps the
    cached top. Each challenger's config says how it was made."""
    from flows.ingest import ingest_site
    from flows.readapt import readapt_site
    from tasks import registry
    from tasks.context import load_model

    sites = world["root"] / "sites.toml"
    original = sites.read_text(encoding="utf-8")
    sites.write_text(original + '\n[sites.nightcached]\ninbox = "inbox/night"\n'
                     '[sites.nightcached.adapt]\ntime_budget_s = 60\ntrain_backbone = false\n',
                     encoding="utf-8")
    try:
        assert ingest_site(site="nightcached")["ingested"] == SITE_IMAGES
        out = readapt_site(site="nightcached", method="mmd")
    finally:
        sites.write_text(original, encoding="utf-8")
    assert out["verdict"] in ("pass", "fail", "unverifiable") and out["n_site_images"] == SITE_IMAGES
    assert {"source_accuracy", "dev_risk", "residual_drift"} <= set(out["gates"])
    assert registry.get_alias_version("emowatch-nightcached", "challenger") == out["version"]
    ckpt, profile = load_model("emowatch-nightcached", out["version"])
    cfg = ckpt.config["adaptation"]["config"]
    assert cfg["backbone_lr_mult"] == 0.0 and cfg["batch_size"] == 32
    assert profile.features.shape[1] == ckpt.model.config.bottleneck_dim
    night, night_profile = load_model("emowatch-night", world["challenger"]["version"])
    cfg = night.config["adaptation"]["config"]
    assert cfg["backbone_lr_mult"] == 1.0 and cfg["batch_size"] == 16
    assert night_profile.features.shape == profile.features.shape

    from typer.testing import CliRunner

    from deployments.cli import app

    r = CliRunner().invoke(app, ["adapt", "night", "--method", "adabn", "--train-backbone", "--json"])
    assert r.exit_code == 2 and "mmd and coral" in r.stderr
