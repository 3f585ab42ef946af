"""The Prefect flows end to end on small real data (flows/*): a real SMTP server (aiosmtpd), a
real MLflow registry and SQLite, all in a temp dir; and the CLI's JSON contracts.

Tiny backbone at 64 px on a few hundred Emotion6 photos (a few seconds of training): the point
here is the plumbing and the decisions, not accuracy (bench/ measures that). One trained source
model is shared; every test uses sites of its own (several sites read the same inbox), so the
tests do not depend on each other's order.
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
# (site, inbox, extra TOML lines)
SITES = (
    ("clean", "clean", ""),
    ("night", "night", ""),
    ("night-adapt", "night", "[sites.night-adapt.adapt]\ntime_budget_s = 60\n"),
    ("night-cached", "night", "[sites.night-cached.adapt]\ntime_budget_s = 60\n"
                              "train_backbone = false\n"),
    ("promo", "night", ""),
    ("cli", "clean", ""),
    ("night-harmless", "night", ""),
    ("night-every", "night", "[sites.night-every.drift]\nalert_on = \"drift\"\n"),
    ("auto-audit", "night", 'policy = "auto"\n[sites.auto-audit.adapt]\ntime_budget_s = 30\n'
                            "train_backbone = false\n"),
    # the portfolio with a bar no estimate can clear (a 100-point gain) and with none at all
    ("pf-none", "night", '[sites.pf-none.adapt]\nmethod = "portfolio"\nmin_gain = 100.0\n'),
    ("pf-any", "pf-any", '[sites.pf-any.adapt]\nmethod = "portfolio"\nmin_gain = -100.0\n'
                         "tolerance = 100.0\n"
                         "[sites.pf-any.drift]\nwindow = 60\n"),
)


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
    """A trained source model, two inboxes (clean photos, night camera) and the sites above."""
    from emowatch.settings import Settings
    from flows.train import train_source
    from models.sim.conditions import apply_condition

    root = tmp_path_factory.mktemp("flows")
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
    order = rng.permutation(len(pool))
    pick, later = order[:SITE_IMAGES], order[SITE_IMAGES:2 * SITE_IMAGES]
    for j, i in enumerate(pick):
        img = Image.open(pool[i]).convert("RGB")
        night = apply_condition(img, "night", 2, rng)
        for inbox, im in (("clean", img), ("night", night), ("pf-any", night)):
            d = root / "inbox" / inbox
            d.mkdir(parents=True, exist_ok=True)
            im.save(d / f"{j:03d}.jpg", quality=90)
    # other photos the same cameras take later (what a site sends after a promotion)
    for j, i in enumerate(later):
        img = Image.open(pool[i]).convert("RGB")
        for kind, im in (("clean", img), ("night", apply_condition(img, "night", 2, rng))):
            d = root / "later" / kind
            d.mkdir(parents=True, exist_ok=True)
            im.save(d / f"later-{j:03d}.jpg", quality=90)
    toml = "".join(f'[sites.{name}]\ninbox = "inbox/{inbox}"\napprovers = ["ops@example.org"]\n'
                   f"{extra}\n" for name, inbox, extra in SITES)
    (root / "sites.toml").write_text(toml, encoding="utf-8")
    _, port = smtp
    settings = Settings(home=root / "home", sites_file=root / "sites.toml", database_url=None,
                        mlflow_tracking_uri=None, smtp_host="127.0.0.1", smtp_port=port,
                        mail_from="emowatch@example.org", task_runner="thread")
    trained = train_source(data=str(root / "source"), backbone="tiny", epochs=3, seed=0,
                           estimator_specs=12,
                           settings=settings)
    return {"root": root, "trained": trained, "settings": settings}


def _mails(smtp, since: int) -> list[email.message.EmailMessage]:
    handler, _ = smtp
    return [email.message_from_bytes(m[2], policy=email.policy.default)
            for m in handler.messages[since:]]


def test_train_registers_the_source_champion(world):
    from tasks.context import Runtime
    from tasks.registry.client import CHAMPION, SOURCE_MODEL

    t = world["trained"]
    assert (t["model"], t["version"], t["alias"]) == ("emowatch-source", "1", "champion")
    assert len(t["classes"]) == 6 and 0.0 <= t["val_accuracy"] <= 1.0
    rt = Runtime.open(world["settings"])
    assert rt.registry.get_alias_version(SOURCE_MODEL, CHAMPION) == "1"
    # the label-free accuracy estimator is fitted at training and saved with the model
    est = t["estimator"]
    assert est["n_specs"] == 12 and est["n_images"] >= 8 and est["seconds"] > 0
    ckpt, profile = rt.registry.load_model(SOURCE_MODEL, "1")
    assert profile.accuracy_estimator() is not None
    assert ckpt.config["estimator"]["specs_mild"] + ckpt.config["estimator"]["specs_severe"] == 12
    assert t["precision"] == ckpt.precision in ("fp32", "bf16")


def test_monitor_clean_site_says_no_drift(world):
    from flows.monitor import monitor_site

    out = monitor_site(site="clean", settings=world["settings"])
    assert {"site", "decision", "p_value", "statistic", "n_ref", "n_cur", "report_html",
            "alert_id"} <= set(out)
    assert out["decision"] == "no_drift", out
    assert out["n_cur"] == SITE_IMAGES and out["alert_id"] is None
    est = out["estimate"]  # the monitor's estimate contract (issue 15)
    assert {"accuracy", "low", "high", "source_accuracy", "drop", "method", "verifiable",
            "reason"} <= set(est)
    assert est["method"] == "meta-gbm" and est["low"] <= est["accuracy"] <= est["high"]
    assert out["impact"] in ("harmful", "harmless", "unknown") and not out["notified"]
    assert out["ingested"]["ingested"] == SITE_IMAGES
    # the Evidently report only on drift by default (EMOWATCH_EVIDENTLY_REPORTS=drift): the
    # check's own page is always written
    assert out["report_html"] is None and Path(out["report"]).is_file()
    # The site got its own model: version 1 of emowatch-clean, copied from the source champion.
    assert out["model"] == "emowatch-clean/1"


def test_monitor_night_site_says_drift_and_mails(world, smtp):
    from flows.monitor import monitor_site

    before = len(smtp[0].messages)
    out = monitor_site(site="night", settings=world["settings"])
    assert out["decision"] == "drift", out
    assert out["p_value"] <= 0.05 and out["alert_id"] is not None
    assert any("darker" in p for p in out["quality_shift"])
    assert out["impact"] in ("harmful", "unknown") and out["notified"]  # default alert_on
    [msg] = _mails(smtp, before)
    # the subject and the first line lead with the impact and the estimate
    assert msg["Subject"].startswith(f"[emowatch] night: accuracy ~{out['estimate']['accuracy']:.2f}")
    assert f"- {out['impact']}" in msg["Subject"]
    body = msg.get_body(("plain",)).get_content()
    assert body.startswith("night: accuracy ~")
    assert "p-value" in body and f"{SITE_IMAGES} recent site images" in body
    # small: one summary picture, the report linked (never the multi-MB Evidently page)
    assert len(msg.as_bytes()) < 500_000
    assert [p.get_filename() for p in msg.iter_attachments()] == [f"check-{out['check_id']}.png"]
    page = Path(out["report"])
    assert f"Report (open in a browser): {page}" in body and page.stat().st_size < 1_000_000
    html = page.read_text()
    assert out["decision"] in html and "witness" in html and html.count("<img") >= 4
    assert Path(out["status_page"]).is_file() and "night" in Path(out["status_page"]).read_text()
    # A re-check of the same images is cheap (features cached) and a cool-down holds the alert.
    again = monitor_site(site="night", ingest=False, settings=world["settings"])
    assert again["decision"] == "drift" and again["alert_id"] is None
    assert len(smtp[0].messages) == before + 1


def test_a_harmless_drift_is_recorded_but_mails_only_where_alert_on_is_drift(world, smtp,
                                                                            monkeypatch):
    """The drift test fires (night camera) but the estimate says harmless: the default
    alert_on sends no e-mail and no drift event (so no re-adaptation) and records the check
    with its estimate; a site with alert_on = "drift" still gets today's e-mail."""
    from db.checks import latest_check
    from db.session import session_scope
    from flows.monitor import monitor_site
    from models.estimate.base import Estimate
    from tasks import impact
    from tasks.context import Runtime

    harmless = {"accuracy": 0.50, "low": 0.46, "high": 0.54, "source_accuracy": 0.51,
                "drop": 0.01, "drop_low": -0.01, "drop_high": 0.02, "method": "meta-gbm",
                "verifiable": True, "reason": "", "n": SITE_IMAGES}
    monkeypatch.setattr(impact, "estimate_accuracy", lambda profile, fs, **_: Estimate(**harmless))
    settings = world["settings"]
    before = len(smtp[0].messages)
    quiet = monitor_site(site="night-harmless", settings=settings)
    assert (quiet["decision"], quiet["impact"], quiet["notified"]) == ("drift", "harmless", False)
    assert quiet["alert_id"] is None and quiet["event_id"] is None
    assert len(smtp[0].messages) == before
    rt = Runtime.open(settings)
    with session_scope(rt.engine) as s:
        row = latest_check(s, rt.site_context("night-harmless").site_id)
        assert (row.decision, row.impact, row.estimate["accuracy"]) == ("drift", "harmless", 0.50)
    loud = monitor_site(site="night-every", settings=settings)
    assert loud["notified"] and loud["alert_id"] is not None and loud["event_id"] is not None
    [msg] = _mails(smtp, before)
    assert msg["Subject"].startswith("[emowatch] night-every: accuracy ~0.50 [0.46, 0.54], was "
                                     "0.51 - harmless")


def test_readapt_registers_a_challenger_records_its_gates_and_asks_for_approval(world, smtp):
    """The challenger is registered with the gate record of its adaptation run (registry tags
    and database row agree), the champion stays, the verdict follows from the gates, and the
    site's approvers get the approval e-mail with that verdict."""
    from db.adaptations import latest_run
    from db.session import session_scope
    from flows.ingest import ingest_site
    from flows.readapt import readapt_site
    from tasks.context import Runtime

    settings = world["settings"]
    ingest_site(site="night-adapt", settings=settings)
    rt = Runtime.open(settings)
    before = len(smtp[0].messages)
    out = readapt_site(site="night-adapt", method="mmd", settings=settings)
    assert {"site", "method", "version", "gates", "verdict"} <= set(out)
    assert {"source_accuracy", "dev_risk", "residual_drift", "prediction_sanity",
            "explanation_rank_correlation"} <= set(out["gates"])
    for g in out["gates"].values():
        assert set(g) >= {"passed", "value", "threshold"}
    # gates that decide (dev_risk and residual_drift are evidence only by default)
    failed = [k for k, g in out["gates"].items() if not g["passed"] and g.get("decides", True)]
    assert out["gates"]["dev_risk"]["decides"] is False
    unverifiable = out["dev"]["unverifiable"]  # the candidate's own DEV flag
    if failed:
        assert out["verdict"] == "fail"
    else:
        assert out["verdict"] in (("unverifiable",) if unverifiable else ("pass", "unverifiable"))
    reg = rt.registry
    assert reg.get_alias_version("emowatch-night-adapt", "champion") == "1"
    assert reg.get_alias_version("emowatch-night-adapt", "challenger") == out["version"]
    tags = reg.get_version("emowatch-night-adapt", out["version"]).tags
    assert tags["emowatch.verdict"] == out["verdict"]
    assert json.loads(tags["emowatch.gates"]) == out["gates"]
    ctx = rt.site_context("night-adapt")
    with session_scope(rt.engine) as s:
        run = latest_run(s, ctx.site_id)
        assert (run.status, run.candidate_version, run.verdict) == ("done", out["version"],
                                                                    out["verdict"])
        assert run.gates == out["gates"]
    [msg] = _mails(smtp, before)  # manual site: an approval request, no promotion
    assert out["promotion"] is None
    assert f"approve challenger version {out['version']}? (verdict {out['verdict']})" in msg["Subject"]
    assert len(msg.as_bytes()) < 500_000  # small e-mails: what does not fit is named by path
    desc = rt.registry.client().get_model_version("emowatch-night-adapt", out["version"]).description
    assert f"**Verdict: {out['verdict']}**" in desc and "### Gates" in desc


def test_auto_site_asks_a_person_when_the_audit_says_worse(world, smtp, monkeypatch):
    """Issue 17, item 4: every gate passes but the audit set says the challenger is worse. The
    flow decides with the promotion's own blessing: no promotion is attempted (the flow does
    not fail), the approvers get the approval e-mail, the champion stays."""
    from flows.ingest import ingest_site
    from flows.readapt import readapt_site
    from tasks import candidate
    from tasks.context import Runtime

    real = candidate.validate.fn

    def worse_on_audit(inputs, result, site, vouched=""):
        v = real(inputs, result, site, vouched)
        v.verdict = "pass"
        v.gates = {k: {**g, "passed": True} for k, g in v.gates.items()}
        v.audit = {"n": 40, "challenger": 0.40, "champion": 0.70, "champion_only": 13,
                   "challenger_only": 1}
        return v

    monkeypatch.setattr(candidate, "validate", worse_on_audit)
    settings = world["settings"]
    ingest_site(site="auto-audit", settings=settings)
    before = len(smtp[0].messages)
    out = readapt_site(site="auto-audit", method="adabn", settings=settings)
    assert out["verdict"] == "pass" and out["promotion"] is None
    rt = Runtime.open(settings)
    assert rt.registry.get_alias_version("emowatch-auto-audit", "champion") == "1"
    assert rt.registry.get_alias_version("emowatch-auto-audit", "challenger") == out["version"]
    [msg] = _mails(smtp, before)
    assert f"approve challenger version {out['version']}?" in msg["Subject"]
    assert "audit accuracy 0.400 is 0.300 below" in msg.get_body(("plain",)).get_content()


def _known_challenger(rt, site: str, verdict: str, gates: dict) -> str:
    """A challenger with a known gate record: a copy of the site's champion registered the way
    the readapt flow records one (tags, challenger alias, finished adaptation run)."""
    from tasks import readapt
    from tasks.registry.client import CHALLENGER

    ctx = rt.site_context(site).serving()
    model = ctx.site.model_name
    v = rt.registry.copy_to_site(model, ctx.model.version, model, tags={
        "emowatch.verdict": verdict, "emowatch.gates": json.dumps(gates)}).version
    rt.registry.set_alias(model, CHALLENGER, v)
    run_id = readapt.start_run(ctx, "mmd", None)
    readapt.finish_run(ctx, run_id, status="done", candidate_version=v, verdict=verdict,
                       gates=gates)
    return v


def test_approve_then_rollback_through_the_promote_flow(world, smtp):
    from flows.promote import promote
    from tasks.context import Runtime

    settings = world["settings"]
    rt = Runtime.open(settings)
    passed = {"source_accuracy": {"passed": True, "value": 0.0, "threshold": 0.03}}
    v = _known_challenger(rt, "promo", "pass", passed)
    before = len(smtp[0].messages)
    out = promote(site="promo", version=v, action="approve", actor="ops@example.org", reason="e2e",
                  settings=settings)
    assert (out["champion"], out["previous_champion"], out["forced"]) == (v, "1", False)
    assert out["history_agrees"] is True and out["next_rollback"] == "1"
    assert rt.registry.get_alias_version("emowatch-promo", "champion") == v
    [msg] = _mails(smtp, before)
    assert f"version {v} is now the champion" in msg["Subject"]
    back = promote(site="promo", version=None, action="rollback", actor="ops@example.org",
                   reason="undo", settings=settings)
    assert (back["champion"], back["previous_champion"]) == ("1", v)
    assert rt.registry.get_alias_version("emowatch-promo", "champion") == "1"


def test_cli_json_contracts(world, monkeypatch):
    from typer.testing import CliRunner

    from deployments.cli import app

    s = world["settings"]
    for k, v in {"EMOWATCH_HOME": s.home, "EMOWATCH_SITES_FILE": s.sites_file,
                 "EMOWATCH_SMTP_HOST": s.smtp_host, "EMOWATCH_SMTP_PORT": s.smtp_port,
                 "EMOWATCH_MAIL_FROM": s.mail_from}.items():
        monkeypatch.setenv(k, str(v))
    runner = CliRunner()
    r = runner.invoke(app, ["ingest", "cli", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) >= {"site", "ingested", "duplicates", "ignored", "quarantined"}
    assert (out["ingested"], out["duplicates"]) == (SITE_IMAGES, 0)
    r = runner.invoke(app, ["ingest", "cli", "--json"])
    assert json.loads(r.stdout)["duplicates"] == SITE_IMAGES  # a second run finds nothing new

    img = next((world["root"] / "inbox" / "clean").glob("*.jpg"))
    r = runner.invoke(app, ["predict", "cli", str(img), "--json"])
    assert r.exit_code == 0, r.output
    [p] = json.loads(r.stdout)
    assert set(p) >= {"path", "label", "probs"} and abs(sum(p["probs"].values()) - 1) < 1e-4

    png = world["root"] / "map.png"
    r = runner.invoke(app, ["explain", "cli", str(img), "-o", str(png), "--depth", "4", "--json"])
    assert r.exit_code == 0, r.output
    ex = json.loads(r.stdout)
    assert set(ex) >= {"label", "probs", "regions", "efficiency_gap", "model_calls"}
    assert len(ex["regions"]) == 16 and abs(ex["efficiency_gap"]) < 1e-6 and png.is_file()

    r = runner.invoke(app, ["evaluate", "cli", "--data", str(world["root"] / "source"), "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert set(ev) >= {"accuracy", "macro_f1", "n", "per_class"} and ev["n"] == 6 * PER_CLASS_SOURCE

    # usage / config errors exit 2 with a message; no traceback
    r = runner.invoke(app, ["monitor", "no-such-site", "--json"])
    assert r.exit_code == 2 and "unknown site" in r.stderr
    assert json.loads(r.stdout)["exit_code"] == 2
    r = runner.invoke(app, ["adapt", "night", "--method", "magic", "--json"])
    assert r.exit_code == 2 and "--method 'magic'" in r.stderr
    r = runner.invoke(app, ["approve", "cli", "999", "--by", "ops@example.org", "--json"])
    assert r.exit_code == 2 and "no version '999'" in r.stderr
    r = runner.invoke(app, ["adapt", "night", "--method", "adabn", "--train-backbone", "--json"])
    assert r.exit_code == 2 and "use the training data (coral, mmd), not 'adabn'" in r.stderr

    r = runner.invoke(app, ["status", "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert set(st["sites"]) == {name for name, _, _ in SITES}
    assert st["sites"]["cli"]["images"] == SITE_IMAGES
    r = runner.invoke(app, ["site", "list", "--json"])
    assert r.exit_code == 0
    assert {row["name"] for row in json.loads(r.stdout)} == {name for name, _, _ in SITES}


def test_readapt_default_through_the_backbone_and_the_cached_top(world):
    """mmd adapts through the whole backbone by default (judged and profiled on its own
    activations); the site option adapt.train_backbone = false keeps the cached top. Each
    challenger's config says how it was made."""
    from flows.ingest import ingest_site
    from flows.readapt import readapt_site
    from tasks.context import Runtime

    settings = world["settings"]
    reg = Runtime.open(settings).registry
    models = {}
    for site in ("night-cached", "night-adapt"):
        ingest_site(site=site, settings=settings)  # new images, or duplicates of an earlier run
        out = readapt_site(site=site, method="mmd", settings=settings)
        assert out["n_site_images"] == SITE_IMAGES
        assert reg.get_alias_version(f"emowatch-{site}", "challenger") == out["version"]
        models[site] = reg.load_model(f"emowatch-{site}", out["version"])
    cached, cached_profile = models["night-cached"]
    cfg = cached.config["adaptation"]["config"]
    assert cfg["backbone_lr_mult"] == 0.0 and cfg["batch_size"] == 32
    assert cached_profile.features.shape[1] == cached.model.config.bottleneck_dim
    full, full_profile = models["night-adapt"]
    cfg = full.config["adaptation"]["config"]
    assert cfg["backbone_lr_mult"] == 1.0 and cfg["batch_size"] == 16
    assert full_profile.features.shape == cached_profile.features.shape


CANDIDATE_FIELDS = {"method", "name", "params", "estimate", "seconds", "selected", "skipped"}


def _check_candidates(out: dict) -> None:
    """The JSON contract of a portfolio run's candidates (issue 16, item 4)."""
    cands = out["candidates"]
    assert cands[0]["name"] == "champion" and len(cands) >= 2
    for c in cands:
        assert CANDIDATE_FIELDS <= set(c)
        assert not (c["skipped"] or "").startswith("failed"), c  # skipped by rule, never broken
        if c["skipped"] is None:
            assert {"gain", "lower", "upper", "se", "k"} <= set(c["estimate"])
            assert c["estimate"]["lower"] <= c["estimate"]["gain"] <= c["estimate"]["upper"]
    assert sum(c["selected"] for c in cands) == (0 if out["version"] is None else 1)
    assert out["reasons"] and all(isinstance(r, str) for r in out["reasons"])


def test_portfolio_no_gain_registers_nothing_and_mails_nobody(world, smtp):
    """Issue 16: when no candidate's lower bound clears the site's bar, the run is recorded
    with verdict no_gain and its candidates, no version is registered, no e-mail is sent; a
    second adaptation of the same site waits for the lock."""
    from db.adaptations import latest_run
    from db.session import session_scope
    from flows.ingest import ingest_site
    from flows.readapt import readapt_site
    from tasks import readapt
    from tasks.context import Runtime

    settings = world["settings"]
    ingest_site(site="pf-none", settings=settings)
    rt = Runtime.open(settings)
    ctx = rt.site_context("pf-none").serving()
    holder = readapt.owner_id()
    readapt.acquire(ctx, holder)  # another worker is adapting this site
    with pytest.raises(readapt.AdaptationLocked):
        readapt_site(site="pf-none", settings=settings)
    readapt.release(ctx, holder)

    before = len(smtp[0].messages)
    out = readapt_site(site="pf-none", settings=settings)
    assert (out["method"], out["verdict"], out["version"]) == ("portfolio", "no_gain", None)
    _check_candidates(out)
    assert out["reasons"][0].startswith("no_gain: no candidate has an estimated gain above 100 "
                                        "points"), out["reasons"]
    # judged on the site's twin (the default adapt.judge): 4 draws of the fitted camera
    assert len(out["proxies"]) == 4 and out["proxies"][0]["shift"].startswith("twin: ")
    assert _mails(smtp, before) == []
    assert rt.registry.get_alias_version("emowatch-pf-none", "challenger") is None
    assert [str(v.version) for v in rt.registry.client().search_model_versions(
        "name='emowatch-pf-none'")] == ["1"]
    with session_scope(rt.engine) as s:
        run = latest_run(s, ctx.site_id)
        assert (run.status, run.verdict, run.candidate_version) == ("done", "no_gain", None)
        assert run.candidates == out["candidates"] and run.reasons == out["reasons"]


def test_portfolio_selects_registers_and_states_its_reasons_in_the_mail(world, smtp):
    """With no bar, the portfolio proposes the candidate with the highest estimated gain (none
    vetoed by the consensus): it is
    registered as the challenger with its candidates' table (MLflow tag, run record) and the
    approval e-mail states why it was selected and the gates' verdict, with the table."""
    from flows.ingest import ingest_site
    from flows.readapt import readapt_site
    from tasks.context import Runtime

    settings = world["settings"]
    ingest_site(site="pf-any", settings=settings)
    before = len(smtp[0].messages)
    out = readapt_site(site="pf-any", settings=settings)
    assert out["method"] == "portfolio" and out["version"] is not None
    assert out["verdict"] in ("pass", "fail", "unverifiable")
    _check_candidates(out)
    [chosen] = [c for c in out["candidates"] if c["selected"]]
    assert out["selected"] == chosen["name"] != "champion"
    tried = [c for c in out["candidates"][1:] if c["skipped"] is None]
    fit = [c for c in tried if not c["estimate"].get("vetoed")]
    assert chosen["estimate"]["gain"] == max(c["estimate"]["gain"] for c in fit)
    assert out["reasons"][0].startswith(f"selected {chosen['name']}: estimated gain")
    rt = Runtime.open(settings)
    tags = rt.registry.get_version("emowatch-pf-any", out["version"]).tags
    assert json.loads(tags["emowatch.candidates"]) == out["candidates"]
    [msg] = _mails(smtp, before)
    body = msg.get_body(("plain",)).get_content()
    assert out["reasons"][0] in body
    assert "95% interval" in body and f"{chosen['name']}" in body and "<- selected" in body


def test_after_promotion_the_adapted_site_reads_no_drift_and_a_return_is_detected(world, smtp):
    """Issue 16, item 3: a promoted portfolio candidate's reference profile is the site it was
    adapted to. New photos from the same night camera then read no drift (or harmless), and
    photos under the training domain's conditions again are drift. Runs after the test that
    registers pf-any's challenger."""
    import shutil

    from flows.monitor import monitor_site
    from flows.promote import promote
    from tasks.context import Runtime

    settings = world["settings"]
    rt = Runtime.open(settings)
    v = rt.registry.get_alias_version("emowatch-pf-any", "challenger")
    assert v is not None, "run test_portfolio_selects_registers_and_states_its_reasons_in_the_mail first"
    _, profile = rt.registry.load_model("emowatch-pf-any", v)
    assert profile.info["reference"] == "site" and profile.info["site"] == "pf-any"
    promote(site="pf-any", version=v, action="approve", actor="ops@example.org",
            reason="e2e", force=True, settings=settings)
    assert rt.registry.get_alias_version("emowatch-pf-any", "champion") == v
    inbox = world["root"] / "inbox" / "pf-any"
    for f in (world["root"] / "later" / "night").glob("*.jpg"):
        shutil.copy(f, inbox / f.name)
    same = monitor_site(site="pf-any", settings=settings)
    assert same["model"] == f"emowatch-pf-any/{v}" and same["n_cur"] == SITE_IMAGES
    assert same["decision"] == "no_drift" or same["impact"] == "harmless", same
    # the adapted version has no bank estimator: its checks are estimated on the site's twin
    # (the training domain's labelled images through the camera fitted to the night photos)
    est = same["estimate"]
    assert est["method"] == "twin" and est["accuracy"] is not None, est
    assert est["low"] <= est["accuracy"] <= est["high"] and same["impact"] in (
        "harmful", "harmless", "unknown")
    assert est["twin"]["condition"] != "as the training camera", est["twin"]
    page = Path(same["report"]).read_text(encoding="utf-8")
    assert 'id="twin"' in page and est["twin"]["condition"] in page
    for f in (world["root"] / "later" / "clean").glob("*.jpg"):
        shutil.copy(f, inbox / f.name)
    back = monitor_site(site="pf-any", settings=settings)
    assert back["n_cur"] == SITE_IMAGES and back["decision"] == "drift", back
    assert any("brighter" in q for q in back["quality_shift"]), back["quality_shift"]


def test_a_source_model_with_the_twin_estimator_fits_no_bank_and_mails_the_twin(world, smtp):
    """`emowatch train --estimator twin`: no shift bank at training (the profile keeps the
    labelled test images instead); a check of the night site fits the camera to its photos,
    estimates on the twin, says the condition in words and attaches its picture."""
    from flows.monitor import monitor_site
    from flows.train import train_source
    from tasks.context import Runtime

    settings = world["settings"].model_copy(update={"home": world["root"] / "home-twin"})
    trained = train_source(data=str(world["root"] / "source"), backbone="tiny", epochs=3,
                           seed=0, estimator="twin", settings=settings)
    info = trained["estimator"]
    assert info["config"]["method"] == "twin" and info["seconds"] == 0.0
    assert info["twin"]["split"] == "test" and info["twin"]["n"] >= 16
    _, profile = Runtime.open(settings).registry.load_model("emowatch-source", "1")
    assert profile.accuracy_estimator() is None and profile.twin is not None
    before = len(smtp[0].messages)
    out = monitor_site(site="night", settings=settings)
    est = out["estimate"]
    assert est["method"] == "twin" and est["verifiable"], est
    assert "darker" in est["twin"]["condition"] and est["twin"]["seconds"] > 0
    assert est["twin"]["feature_distance"] >= 0  # the model's features of twin and site
    assert est["drop"] > 0 and out["impact"] in ("harmful", "unknown")
    [msg] = _mails(smtp, before)
    body = msg.get_body(("plain",)).get_content()
    assert est["twin"]["condition"] in body
    assert [p.get_filename() for p in msg.iter_attachments()] == [
        f"check-{out['check_id']}.png", f"check-{out['check_id']}-twin.jpg"]
    print(f"twin check: fit {est['twin']['seconds']:.1f} s, estimate {est['ms'] / 1000:.1f} s, "
          f"{est['twin']['condition']}, accuracy {est['accuracy']:.3f} was "
          f"{est['source_accuracy']:.3f}, feature distance {est['twin']['feature_distance']}")
    # the next check of the same camera keeps the site's camera: one evaluation, no search
    again = monitor_site(site="night", ingest=False, settings=settings)["estimate"]
    assert again["twin"]["reused"] and again["twin"]["evaluations"] == 1, again["twin"]
    assert again["twin"]["params"] == est["twin"]["params"] and not est["twin"]["reused"]


def test_a_worker_killed_in_the_middle_of_a_check_completes_it_at_the_next_tick(world):
    """Issue 34: `kill -9` of the warm worker (deployments.worker) in the middle of a check;
    the next worker (as serve's supervisor starts it) checks the site at its next tick: one
    check recorded, every image of the inbox stored once, the lock given back."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import sqlalchemy as sa
    from prefect.settings import PREFECT_API_URL

    from db.models import DriftCheck, ImageRow, SiteLock, SiteRow
    from db.session import session_scope
    from tasks.context import Runtime

    root, settings = world["root"], world["settings"]
    inbox = root / "inbox" / "wk"
    shutil.copytree(root / "inbox" / "clean", inbox)
    sites = root / "worker-sites.toml"
    sites.write_text(f'[sites.wk]\ninbox = "{inbox}"\nschedule = "* * * * *"\n'
                     "[sites.wk.adapt]\nauto = false\n", encoding="utf-8")
    env = {**os.environ, "EMOWATCH_HOME": str(settings.home), "EMOWATCH_SITES_FILE": str(sites),
           "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    for k in ("EMOWATCH_DATABASE_URL", "EMOWATCH_MLFLOW_TRACKING_URI", "EMOWATCH_SMTP_HOST"):
        env.pop(k, None)
    engine = Runtime.open(settings).engine

    def count(model, *where) -> int:
        with session_scope(engine) as s:
            return s.scalar(sa.select(sa.func.count()).select_from(model).where(*where))

    def wk_id():
        with session_scope(engine) as s:
            return s.scalar(sa.select(SiteRow.id).where(SiteRow.name == "wk"))

    worker = [sys.executable, "-m", "deployments.worker", "--tick-s", "5"]
    first = subprocess.Popen(worker, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while count(SiteLock, SiteLock.name == "check:wk",
                    SiteLock.owner.contains(f":{first.pid}")) == 0:
            assert first.poll() is None and time.monotonic() < deadline, "the check never started"
            time.sleep(0.2)
        time.sleep(1.0)  # ingesting and featurizing the 60 photos
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    sid = wk_id()
    assert sid is None or count(DriftCheck, DriftCheck.site_id == sid) == 0, \
        "the check finished before the kill: nothing was interrupted"
    second = subprocess.run([*worker, "--max-checks", "1"], env=env, timeout=600,
                            capture_output=True, text=True)
    assert second.returncode == 3, second.stderr[-3000:]  # restart asked after its one check
    sid = wk_id()
    assert count(DriftCheck, DriftCheck.site_id == sid) == 1
    n_files = len(list(inbox.glob("*.jpg")))
    assert count(ImageRow, ImageRow.site_id == sid) == n_files == SITE_IMAGES
    assert count(SiteLock, SiteLock.name == "check:wk") == 0


def test_monitor_and_train_complete_while_both_cores_are_saturated(world, tmp_path):
    """Issue 34: `emowatch monitor` and `emowatch train` from the command line, each starting
    Prefect's temporary server in a fresh PREFECT_HOME (no server configured), while twice as
    many busy processes as cores run beside them: both complete."""
    import subprocess
    import sys

    from tests.test_prefect_env import saturated

    settings, root = world["settings"], world["root"]
    base = {k: v for k, v in os.environ.items()
            if k not in ("PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                         "EMOWATCH_DATABASE_URL", "EMOWATCH_MLFLOW_TRACKING_URI")}
    monitor_env = {**base, "EMOWATCH_HOME": str(settings.home),
                   "EMOWATCH_SITES_FILE": str(settings.sites_file),
                   "PREFECT_HOME": str(tmp_path / "prefect-monitor")}
    train_env = {**base, "EMOWATCH_HOME": str(tmp_path / "train-home"),
                 "PREFECT_HOME": str(tmp_path / "prefect-train")}
    cli = [sys.executable, "-m", "deployments.cli"]
    with saturated():
        mon = subprocess.run([*cli, "monitor", "clean", "--json"], env=monitor_env, text=True,
                             capture_output=True, timeout=1200)
        train = subprocess.run([*cli, "train", "--data", str(root / "source"), "--backbone",
                                "tiny", "--epochs", "1", "--estimator-specs", "0", "--json"],
                               env=train_env, text=True, capture_output=True, timeout=1200)
    assert mon.returncode == 0, mon.stderr[-3000:]
    assert json.loads(mon.stdout)["decision"] in ("no_drift", "drift", "insufficient_data")
    assert train.returncode == 0, train.stderr[-3000:]
    assert json.loads(train.stdout)["version"] == "1"
