"""deployments.admin: init, site list, status and outbox on SQLite (and status on PostgreSQL)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest


@pytest.fixture()
def project(settings, monkeypatch, tmp_path):
    """A Runtime whose sites file (not yet written) is tmp/cfg/sites.toml."""
    from tasks.context import Runtime

    return Runtime.open(settings.model_copy(update={"sites_file": tmp_path / "cfg" / "sites.toml"}))


def test_init_creates_database_and_example_sites_file(project):
    import sqlalchemy as sa

    from db.migrate import head
    from deployments.admin import init_project
    from emowatch.sites import load_sites

    r = init_project(project)
    json.dumps(r)
    sites_file = Path(project.settings.sites_file)
    assert r["sites_file_created"] is True and r["sites"] == ["example"] and r["note"] is None
    assert r["sites_file"] == str(sites_file.resolve()) and sites_file.is_file()
    assert r["db_revision"] == head()
    assert r["database"] == project.settings.db_url and r["tracking_uri"] == project.settings.tracking_uri
    db_file = Path(project.settings.db_url.removeprefix("sqlite:///"))
    assert db_file.is_file()
    eng = sa.create_engine(project.settings.db_url)
    with eng.connect() as c:
        assert c.execute(sa.text("select name from sites")).scalars().all() == ["example"]
    eng.dispose()
    site = load_sites(sites_file)["example"]
    assert site.inbox.is_dir() and site.inbox == (Path(project.settings.home) / "inboxes/example").resolve()
    assert site.policy == "manual" and site.approvers == ["approver@localhost"]
    for d in ("store", "reports", "outbox", "cache"):
        assert (Path(project.settings.home) / d).is_dir()

    # A second init never overwrites the file; it registers the sites it now holds.
    text = sites_file.read_text() + '\n[sites.lab-2]\ninbox = "inbox2"\npolicy = "auto"\n'
    sites_file.write_text(text)
    r2 = init_project(project)
    assert r2["sites_file_created"] is False and r2["sites"] == ["example", "lab-2"]
    assert sites_file.read_text() == text
    assert "lab-2" in tomllib.loads(text)["sites"]


def test_init_without_example_and_no_sites_file(project):
    from deployments.admin import init_project

    r = init_project(project, write_example=False)
    assert r["sites"] == [] and not r["sites_file_created"] and "no sites file" in r["note"]
    assert not Path(project.settings.sites_file).exists()


def test_list_sites_shape(project):
    from deployments.admin import init_project, list_sites

    init_project(project)
    rows = list_sites(project)
    json.dumps(rows)
    assert len(rows) == 1
    row = rows[0]
    assert {"name", "inbox", "inbox_exists", "schedule", "policy", "approvers", "audit", "model",
            "champion", "challenger", "serving", "drift", "adapt_method", "adapt_auto"} <= set(row)
    assert (row["name"], row["policy"], row["schedule"]) == ("example", "manual", "0 * * * *")
    assert row["inbox_exists"] and row["audit"] is None and row["model"] == "emowatch-example"
    assert (row["champion"], row["challenger"], row["serving"]) == (None, None, None)
    assert row["drift"]["alpha"] == 0.05 and row["drift"]["min_samples"] == 30
    # Reading the list does not create an MLflow store.
    assert not Path(project.settings.tracking_uri.removeprefix("sqlite:///")).exists()


def _add_drift_check(rt, site: str, decision: str, p: float) -> int:
    from db import checks
    from db.session import session_scope
    from db.sites import require_site_row

    with session_scope(rt.engine) as s:
        sid = require_site_row(s, site).id
        return checks.add_check(s, site_id=sid, model_name="emowatch-source", model_version="1",
                                decision=decision, p_value=p, statistic=0.3, threshold=0.05,
                                method="mmd+bbsd", n_ref=200, n_cur=64,
                                report_html="/r/drift.html")


def test_site_status_details_and_unknown_site(project):
    from deployments.admin import init_project, site_status
    from emowatch.sites import SitesFileError

    init_project(project)
    empty = site_status(project, "example")
    ex = empty["sites"]["example"]
    assert ex["images"] == 0 and ex["last_drift_check"] is None and ex["champion"] is None
    assert ex["in_sites_file"] and ex["in_database"] and ex["history_agrees"]

    _add_drift_check(project, "example", "no_drift", 0.4)
    last = _add_drift_check(project, "example", "drift", 0.001)
    r = site_status(project)
    json.dumps(r)
    ex = r["sites"]["example"]
    d = ex["last_drift_check"]
    assert d["id"] == last and d["decision"] == "drift" and d["p_value"] == pytest.approx(0.001)
    assert (d["n_cur"], d["report_html"], d["model"]) == (64, "/r/drift.html", "emowatch-source/1")
    assert d["created_at"] and ex["drift_checks"] == 2 and ex["last_drift"] == "drift"
    assert r["totals"]["drift_checks"] == 2 and r["totals"]["sites"] == 1
    assert r["outbox"] == {} and r["database"] == project.settings.db_url

    with pytest.raises(SitesFileError, match="unknown site 'nope'.*example"):
        site_status(project, "nope")


def test_outbox_status_and_send(project):
    from db.session import session_scope
    from deployments.admin import init_project, outbox_status
    from tasks import notify

    init_project(project)
    with session_scope(project.engine) as s:
        notify.queue_email(s, site_id=1, kind="drift", recipients=["ops@example.org"],
                           subject="[emowatch] drift at example", body="p=0.001")
    r = outbox_status(project)
    json.dumps(r)
    assert r["counts"] == {"pending": 1} and r["total"] == 1 and r["delivery"] is None
    assert r["smtp"] is None and "kept" in r["delivery_mode"]
    a = r["alerts"][0]
    assert (a["kind"], a["site"], a["status"], a["attempts"], a["eml_path"]) == \
        ("drift", "example", "pending", 0, None)

    sent = outbox_status(project, send=True)
    assert sent["delivery"]["kept"] == 1 and sent["counts"] == {"kept": 1}
    a = sent["alerts"][0]
    assert a["status"] == "kept" and a["attempts"] == 1 and Path(a["eml_path"]).is_file()
    assert site_status_outbox(project) == {"kept": 1}
    assert "password" not in json.dumps(sent).lower()


def site_status_outbox(settings):
    from deployments.admin import site_status

    return site_status(settings)["outbox"]


@pytest.mark.postgres
def test_status_on_postgresql(project, pg_schema_url):
    from deployments.admin import init_project, outbox_status, site_status
    from tasks.context import Runtime

    pg = Runtime.open(project.settings.model_copy(update={"database_url": pg_schema_url}))
    r = init_project(pg)
    assert r["sites"] == ["example"] and r["database"].startswith("postgresql")
    _add_drift_check(pg, "example", "insufficient_data", float("nan"))
    st = site_status(pg, "example")
    assert st["sites"]["example"]["last_drift_check"]["decision"] == "insufficient_data"
    assert st["totals"]["sites"] == 1
    assert outbox_status(pg)["counts"] == {}


def test_every_read_only_command_prints_for_people_too(settings, monkeypatch, tmp_path):
    """Without --json each command prints text and exits 0 (the renderer once crashed on
    every command that had no renderer of its own)."""
    from typer.testing import CliRunner

    from deployments.cli import app

    monkeypatch.setenv("EMOWATCH_SITES_FILE", str(tmp_path / "sites.toml"))
    runner = CliRunner()
    assert runner.invoke(app, ["init"]).exit_code == 0
    for args in (["status"], ["status", "example"], ["site", "list"], ["outbox"],
                 ["doctor"], ["serve", "--dry-run"], ["sync"], ["report"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, (args, r.output)
        assert r.stdout.strip() and not r.stdout.lstrip().startswith("{"), args
