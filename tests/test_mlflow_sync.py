"""Approvals made in the MLflow UI, against a real ``mlflow server`` (SQLite backend store,
artifacts served by the server) driven through its REST API the way the UI drives it (set an
alias, set a tag), then ``emowatch sync``: history, aliases, e-mails and the served model.

The browser test renders a version page of that server's UI in headless Chromium (the DOM must
show the verdict, reasons and gates of the description) and keeps a screenshot
(``EMOWATCH_SCREENSHOT_DIR``, default: the test's tmp dir; the README's picture comes from it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.registry_helpers import FAIL, PASS, register_source
from tests.registry_helpers import aliases as _aliases
from tests.registry_helpers import challenger as _challenger
from tests.registry_helpers import history as _history
from tests.registry_helpers import site as _site

CLASSES = ["anger", "joy", "sadness"]
ALICE = "alice@example.org"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, path: str, body: dict | None = None, method: str = "POST") -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
    return json.loads(raw) if raw else {}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on a free localhost port; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("mlflow server did not start:\n"
                               + (root / "server.log").read_text(errors="replace")[-3000:])
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, 15)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    log.close()


@pytest.fixture(scope="module")
def env(server, tmp_path_factory):
    """A Runtime whose registry is the tracking server, with emowatch-source@champion."""
    import mlflow

    from emowatch.settings import Settings
    from tasks.context import Runtime

    root = tmp_path_factory.mktemp("sync")
    saved = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    settings = Settings(home=root / "home", database_url=None, mlflow_tracking_uri=server,
                        smtp_host=None, sites_file=root / "sites.toml")
    rt = Runtime.open(settings)
    register_source(rt, root)
    yield rt
    mlflow.set_tracking_uri(saved[0])
    mlflow.set_registry_uri(saved[1])


# --- what the MLflow UI does ---------------------------------------------------------------------
def ui_move_alias(url: str, model: str, version: str, alias: str = "champion") -> None:
    _call(url, "/api/2.0/mlflow/registered-models/alias",
          {"name": model, "alias": alias, "version": version})


def ui_set_tag(url: str, model: str, version: str, key: str, value: str) -> None:
    _call(url, "/api/2.0/mlflow/model-versions/set-tag",
          {"name": model, "version": version, "key": key, "value": value})


def ui_decide(url: str, model: str, version: str, decision: str, by: str, reason: str) -> None:
    ui_set_tag(url, model, version, "emowatch.decision", decision)
    ui_set_tag(url, model, version, "emowatch.decision_by", by)
    ui_set_tag(url, model, version, "emowatch.decision_reason", reason)


def _served(ctx) -> str:
    """The version the monitor would serve now (resolved from the recorded history)."""
    from tasks.context import ensure_site_model

    return ensure_site_model(ctx).version


def _alerts(ctx) -> list[tuple[str, str]]:
    from sqlalchemy import select

    from db.models import Alert
    from db.session import session_scope

    with session_scope(ctx.engine) as s:
        q = select(Alert).where(Alert.site_id == ctx.site_id).order_by(Alert.id)
        return [(a.kind, a.subject) for a in s.scalars(q)]


def _version(url: str, model: str, version: str) -> dict:
    q = urllib.parse.urlencode({"name": model, "version": version})
    return _call(url, f"/api/2.0/mlflow/model-versions/get?{q}", method="GET")["model_version"]


# --- the tests -----------------------------------------------------------------------------------
def test_alias_and_tag_approval_in_mlflow_ends_like_emowatch_approve(env, server):
    from tasks.promote.actions import promote_version
    from tasks.promote.sync import sync_site

    ui_ctx, cli_ctx = _site(env, "sync-ui"), _site(env, "sync-cli")
    v_ui, v_cli = _challenger(ui_ctx, "pass", PASS), _challenger(cli_ctx, "pass", PASS)
    name = ui_ctx.site.model_name
    ui_decide(server, name, v_ui, "approve", ALICE, "night gap closed")
    ui_move_alias(server, name, v_ui)
    assert _served(ui_ctx) == "1"  # a moved alias alone is never served
    r = sync_site(ui_ctx, deliver=False)
    assert [a["version"] for a in r["applied"]] == [v_ui] and not r["refused"]
    promote_version(cli_ctx, v_cli, "approve", actor=ALICE, reason="night gap closed",
                    deliver=False)
    for ctx, v in ((ui_ctx, v_ui), (cli_ctx, v_cli)):
        assert _history(ctx)[-1] == ("approve", v, "1", ALICE, False)
        assert _aliases(ctx) == (v, None)
        assert _served(ctx) == v
        tags = ctx.registry.get_version(ctx.site.model_name, v).tags
        assert tags["emowatch.promoted_by"] == ALICE
        assert tags["emowatch.promoted_reason"] == "night gap closed"
        assert _alerts(ctx)[-1][0] == "promoted"
    assert _version(server, name, v_ui)["tags"] and \
        ui_ctx.registry.get_version(name, v_ui).tags["emowatch.decision_result"].startswith("applied")
    again = sync_site(ui_ctx, deliver=False)  # a decision is handled once
    assert again["applied"] == [] and again["refused"] == []
    assert _history(ui_ctx)[-1][0] == "approve"


def test_a_tag_alone_approves_and_a_reject_tag_rejects(env, server):
    from tasks.promote.sync import sync_site

    ctx = _site(env, "sync-tag")
    name = ctx.site.model_name
    v = _challenger(ctx, "pass", PASS)
    ui_decide(server, name, v, "reject", ALICE, "colours look wrong")
    sync_site(ctx, deliver=False)
    assert _history(ctx)[-1][:4] == ("reject", v, "1", ALICE)
    assert _aliases(ctx) == ("1", None)
    v2 = _challenger(ctx, "pass", PASS)
    ui_decide(server, name, v2, "approve", ALICE, "ok")
    sync_site(ctx, deliver=False)
    assert _history(ctx)[-1][:4] == ("approve", v2, "1", ALICE) and _aliases(ctx) == (v2, None)


@pytest.mark.parametrize("case", ["no-tag", "not-an-approver", "failed-checks"])
def test_a_refused_move_is_put_back_recorded_and_emailed(env, server, case):
    from tasks.promote.sync import sync_site

    ctx = _site(env, f"sync-refuse-{case}")
    name = ctx.site.model_name
    v = _challenger(ctx, "fail" if case == "failed-checks" else "pass",
                    FAIL if case == "failed-checks" else PASS)
    if case == "not-an-approver":
        ui_decide(server, name, v, "approve", "mallory@example.org", "trust me")
    elif case == "failed-checks":
        ui_decide(server, name, v, "approve", ALICE, "ship it")
    ui_move_alias(server, name, v)
    assert _served(ctx) == "1"
    n_alerts = len(_alerts(ctx))
    r = sync_site(ctx, deliver=False)
    assert r["applied"] == [] and r["refused"]
    assert _aliases(ctx)[0] == "1"  # put back within one sync
    assert _served(ctx) == "1"
    rows = _history(ctx)
    assert rows[-1][0] in ("restore", "refused") and rows[0][0] == "initial"
    assert not any(row[0] == "approve" for row in rows)
    if case != "no-tag":
        assert any(row[0] == "refused" and row[1] == v for row in rows)
    new = _alerts(ctx)[n_alerts:]
    assert new and all(kind == "refused" for kind, _ in new)
    assert sync_site(ctx, deliver=False)["refused"] == []  # and handled once
    assert _aliases(ctx)[0] == "1"


def test_sync_command_reports_and_exits_1_on_a_refusal(env, server, monkeypatch):
    from typer.testing import CliRunner

    from deployments.cli import app
    from emowatch.sites import load_sites

    sites_file = env.settings.home / "cli-sites.toml"
    sites_file.write_text(f'[sites.sync-cmd]\ninbox = "{env.settings.home / "in"}"\n'
                          f'approvers = ["{ALICE}"]\n')
    ctx = env.site_context("sync-cmd", sites=load_sites(sites_file)).serving()
    v = _challenger(ctx, "pass", PASS)
    ui_move_alias(server, ctx.site.model_name, v)
    for k, val in (("EMOWATCH_HOME", env.settings.home), ("EMOWATCH_SITES_FILE", sites_file),
                   ("EMOWATCH_MLFLOW_TRACKING_URI", server)):
        monkeypatch.setenv(k, str(val))
    monkeypatch.delenv("EMOWATCH_DATABASE_URL", raising=False)
    r = CliRunner().invoke(app, ["sync", "--json"])
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout)["sites"]["sync-cmd"]
    assert out["champion"] == "1" and out["refused"][0]["decision"] == "alias"
    r = CliRunner().invoke(app, ["sync", "sync-cmd"])
    assert r.exit_code == 0 and "sync-cmd: champion 1" in r.stdout, r.output


def test_a_challenger_page_says_verdict_reasons_and_gates(env, server):
    from tasks.promote.descriptions import refresh_descriptions

    ctx = _site(env, "sync-desc")
    v = _challenger(ctx, "fail", FAIL)
    assert refresh_descriptions(ctx, [v])
    text = _version(server, ctx.site.model_name, v)["description"]
    assert "**Verdict: fail**" in text
    assert "| source_acc | 0.3100 | 0.5700 | **NO** |" in text
    assert "emowatch.decision_by" in text and ALICE in text
    model = _call(server, "/api/2.0/mlflow/registered-models/get?name=" + ctx.site.model_name,
                  method="GET")["registered_model"]
    assert "champion (recorded): version 1" in model["description"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_version_page_in_a_browser_shows_the_description(env, server, tmp_path):
    from tasks.promote.descriptions import refresh_descriptions

    browser = _chromium()
    if browser is None:
        if os.environ.get("EMOWATCH_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (EMOWATCH_REQUIRE_BROWSER) but not installed")
        pytest.skip("chromium not installed (apt-get install chromium)")
    ctx = _site(env, "night-cam")
    v = _challenger(ctx, "fail", FAIL, reasons=["source accuracy 0.31 < 0.57 (gate source_acc)"])
    assert refresh_descriptions(ctx, [v])
    page = f"{server}/#/models/{ctx.site.model_name}/versions/{v}"
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--virtual-time-budget=20000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*args, "--dump-dom", page], capture_output=True, text=True,
                         timeout=600).stdout
    assert "Verdict: fail" in dom, dom[-2000:]
    assert "source_acc" in dom and "Gates" in dom
    assert "source accuracy 0.31 &lt; 0.57" in dom or "source accuracy 0.31 < 0.57" in dom
    out = Path(os.environ.get("EMOWATCH_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    shot = out / "mlflow-version-page.png"
    subprocess.run([*args, "--window-size=1280,1500", f"--screenshot={shot}", page],
                   capture_output=True, timeout=600, check=True)
    assert shot.is_file() and shot.stat().st_size > 20_000  # a rendered page, not a blank one

