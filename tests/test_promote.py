"""tasks.promote.actions against a real MLflow registry (SQLite store in a tmp dir) and SQLite database.

One registry and database for the module (an MLflow store takes seconds to create); every test
uses its own site, so its own registered model ``emowatch-<site>`` and history rows. Challenger
versions are registered cheaply with ``copy_to_site`` (same logged model, own tags).
"""

from __future__ import annotations

import email
import email.policy
import json
import os
from pathlib import Path

import pytest

from db.deployments import walk_history
from tasks.registry.client import CHALLENGER, CHAMPION
from tests.registry_helpers import (
    FAIL,
    PASS,
    register_source,
)
from tests.registry_helpers import aliases as _aliases
from tests.registry_helpers import challenger as _challenger
from tests.registry_helpers import history as _history
from tests.registry_helpers import site as _site

CLASSES = ["anger", "joy", "sadness"]


# --- the history walk (pure) ------------------------------------------------------------------------
def test_walk_history_is_an_undo_stack():
    rows = [("initial", "1", None), ("approve", "2", "1"), ("reject", "4", "2"),
            ("auto", "3", "2")]
    assert walk_history(rows) == ["1", "2", "3"]
    rows += [("rollback", "2", "3")]
    assert walk_history(rows) == ["1", "2"]
    rows += [("rollback", "1", "2")]
    assert walk_history(rows) == ["1"]  # no ping-pong: 3 is not "the previous" of 1
    rows += [("approve", "3", "1"), ("approve", "2", "3"), ("rollback", "3", "2")]
    assert walk_history(rows) == ["1", "3"]  # back to the *last* occurrence of 3


def test_walk_history_remembers_moves_made_outside_emowatch():
    # Someone pointed the alias at 5 in the MLflow UI; the next approve recorded previous=5.
    rows = [("initial", "1", None), ("approve", "2", "1"), ("approve", "6", "5")]
    assert walk_history(rows) == ["1", "2", "5", "6"]
    assert walk_history(rows + [("rollback", "2", "5")]) == ["1", "2"]


# --- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A Runtime with a tmp home, a migrated database and emowatch-source@champion registered."""
    import mlflow

    from emowatch.settings import Settings
    from tasks.context import Runtime

    root = tmp_path_factory.mktemp("promote")
    saved_uris = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    cwd = os.getcwd()
    os.chdir(root)  # anything written to ./mlruns would land here
    settings = Settings(home=root / "home", database_url=None, mlflow_tracking_uri=None,
                        smtp_host=None, sites_file=root / "sites.toml")
    rt = Runtime.open(settings)

    register_source(rt, root)
    yield rt

    os.chdir(cwd)
    mlflow.set_tracking_uri(saved_uris[0])
    mlflow.set_registry_uri(saved_uris[1])


def _agree(ctx) -> bool:
    from tasks.promote.history import consistency

    c = consistency(ctx)
    return c["agree"] and c["registry"] is not None


def _eml(env, alert_id: int) -> email.message.EmailMessage:
    from db.models import Alert
    from db.session import session_scope

    with session_scope(env.engine) as s:
        a = s.get(Alert, alert_id)
        assert a.status == "kept" and a.eml_path  # no SMTP configured: the .eml is the delivery
        path = Path(a.eml_path)
    assert path.is_file() and path.parent == Path(env.settings.outbox_dir)
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.default)


# --- approve ------------------------------------------------------------------------------------------------
def test_approve_moves_aliases_tags_and_history(env):
    from tasks.promote.actions import promote_version

    site = _site(env, "ap")
    v = _challenger(site, "pass", PASS, audit={"challenger": 0.7, "champion": 0.69})
    assert v == "2" and _aliases(site) == ("1", "2")

    r = promote_version(site, v, "approve", "alice@example.org", "looks good")
    assert (r["champion"], r["challenger"], r["previous_champion"]) == ("2", None, "1")
    assert r["blessing"]["allowed"] and r["blessing"]["blessed"] and not r["forced"]
    assert r["next_rollback"] == "1" and r["history_agrees"] is True
    json.dumps(r)  # JSON-able for the CLI
    assert _aliases(site) == ("2", None)
    tags = env.registry.get_version(site.site.model_name, "2").tags
    assert tags["emowatch.promoted_by"] == "alice@example.org"
    assert tags["emowatch.promoted_reason"] == "looks good"
    assert tags["emowatch.promotion"] == "approve" and tags["emowatch.forced"] == "false"
    assert tags["emowatch.previous_champion"] == "1"
    assert _history(site) == [("initial", "1", None, "emowatch", False),
                                  ("approve", "2", "1", "alice@example.org", False)]
    assert _agree(site)

    msg = _eml(env, r["alert_id"])
    assert msg["To"].startswith("lead@example.org, alice@example.org") and "version 2 is now the champion" in msg["Subject"]
    text = msg.get_body(("plain",)).get_content()
    assert "source_acc" in text and "emowatch rollback ap --by NAME" in text

    with pytest.raises(ValueError, match="already the champion"):
        promote_version(site, "2", "approve", "alice@example.org")
    with pytest.raises(ValueError, match="has no version '99'"):
        promote_version(site, "99", "approve", "alice@example.org")
    with pytest.raises(ValueError, match="no challenger"):
        promote_version(site, None, "approve", "alice@example.org")
    with pytest.raises(ValueError, match="--by"):
        promote_version(site, "1", "approve", " ")
    assert len(_history(site)) == 2  # refusals leave no trace


def test_failed_gate_needs_force_and_reason_and_is_recorded_as_forced(env):
    from tasks.promote.actions import check_promotion, promote_version

    site = _site(env, "forced")
    v = _challenger(site, "fail", FAIL)
    with pytest.raises(ValueError, match="source_acc") as e:
        check_promotion(site, v, "approve")  # the dry run refuses the same way
    with pytest.raises(ValueError, match="source_acc") as e:
        promote_version(site, v, "approve", "bob@example.org")
    assert "--force" in str(e.value)
    with pytest.raises(ValueError, match="needs a --reason"):
        promote_version(site, v, "approve", "bob@example.org", force=True)
    assert _aliases(site) == ("1", v) and len(_history(site)) == 1  # nothing moved
    dry = check_promotion(site, None, "approve", force=True, reason="by hand")
    assert dry["version"] == v and dry["forced"] and dry["champion"] == "1"
    assert _aliases(site) == ("1", v) and len(_history(site)) == 1  # still nothing

    r = promote_version(site, v, "approve", "bob@example.org", "labels checked by hand", force=True)
    assert r["forced"] and r["champion"] == v and not r["blessing"]["blessed"]
    assert r["blessing"]["failed_gates"] == ["source_acc"]
    assert env.registry.get_version(site.site.model_name, v).tags["emowatch.forced"] == "true"
    assert _history(site)[-1] == ("approve", v, "1", "bob@example.org", True)
    assert _agree(site)
    assert "FORCED" in _eml(env, r["alert_id"]).get_body(("plain",)).get_content()


def test_audit_drop_blocks_approval(env):
    from tasks.promote.actions import promote_version

    site = _site(env, "audit")
    v = _challenger(site, "pass", PASS, audit={"challenger": 0.5, "champion": 0.7})
    with pytest.raises(ValueError, match="audit accuracy"):
        promote_version(site, v, "approve", "carol@example.org")


def test_auto_only_on_auto_sites_and_never_unverifiable(env):
    from tasks.promote.actions import promote_version

    manual = _site(env, "man")
    v = _challenger(manual, "pass", PASS)
    with pytest.raises(ValueError, match="site policy is manual"):
        promote_version(manual, v, "auto", "emowatch-auto")

    auto = _site(env, "aut", policy="auto")
    u = _challenger(auto, "unverifiable", PASS)
    with pytest.raises(ValueError, match="unverifiable never auto-promotes"):
        promote_version(auto, u, "auto", "emowatch-auto")
    f = _challenger(auto, "fail", FAIL)
    with pytest.raises(ValueError, match="not every gate passed"):
        promote_version(auto, f, "auto", "emowatch-auto")
    assert _aliases(auto) == ("1", f)

    p = _challenger(auto, "pass", PASS)
    r = promote_version(auto, None, "auto", "emowatch-auto")  # None: the challenger
    assert r["version"] == p and r["champion"] == p
    assert env.registry.get_version(auto.site.model_name, p).tags["emowatch.promotion"] == "auto"
    assert _history(auto)[-1] == ("auto", p, "1", "emowatch-auto", False)
    assert _agree(auto)

    # A person may approve an unverifiable challenger (taking responsibility), not forced.
    u2 = _challenger(auto, "unverifiable", PASS)
    r2 = promote_version(auto, u2, "approve", "dave@example.org", "spot-checked 20 images")
    assert r2["champion"] == u2 and not r2["forced"] and not r2["blessing"]["blessed"]


# --- reject ---------------------------------------------------------------------------------------------------
def test_reject_removes_challenger_alias(env):
    from tasks.promote.actions import promote_version

    site = _site(env, "rej")
    v = _challenger(site, "fail", FAIL)
    r = promote_version(site, v, "reject", "erin@example.org", "entropy collapsed")
    assert (r["champion"], r["challenger"], r["version"]) == ("1", None, v)
    assert _aliases(site) == ("1", None)
    tags = env.registry.get_version(site.site.model_name, v).tags
    assert tags["emowatch.rejected_by"] == "erin@example.org"
    assert tags["emowatch.rejected_reason"] == "entropy collapsed"
    assert _history(site)[-1] == ("reject", v, "1", "erin@example.org", False)
    assert _agree(site)  # a reject does not move the champion
    msg = _eml(env, r["alert_id"])
    assert "rejected" in msg["Subject"] and "erin@example.org" in msg.get_body(("plain",)).get_content()

    with pytest.raises(ValueError, match="is the champion"):
        promote_version(site, "1", "reject", "erin@example.org")
    # A rejected version is never promoted automatically, even when its gates passed.
    auto = _site(env, "rej-auto", policy="auto")
    p = _challenger(auto, "pass", PASS)
    promote_version(auto, p, "reject", "erin@example.org")
    with pytest.raises(ValueError, match="rejected by erin"):
        promote_version(auto, p, "auto", "emowatch-auto")


# --- rollback ---------------------------------------------------------------------------------------------------
def test_rollback_walks_back_the_history(env):
    from tasks.promote.actions import promote_version

    site = _site(env, "rb")
    with pytest.raises(ValueError, match="nothing to roll back to"):
        promote_version(site, None, "rollback", "frank@example.org")
    v2 = _challenger(site, "pass", PASS)
    promote_version(site, v2, "approve", "frank@example.org")
    v3 = _challenger(site, "pass", PASS)
    r = promote_version(site, v3, "approve", "frank@example.org")
    assert r["next_rollback"] == v2

    r = promote_version(site, None, "rollback", "frank@example.org", "complaints")
    assert (r["previous_champion"], r["champion"], r["next_rollback"]) == (v3, v2, "1")
    assert _agree(site)
    assert env.registry.get_version(site.site.model_name, v3).tags["emowatch.rolled_back_by"] == "frank@example.org"
    msg = _eml(env, r["alert_id"])
    assert "rolled back to version 2" in msg["Subject"]
    assert "restore version 1" in msg.get_body(("plain",)).get_content()

    r = promote_version(site, None, "rollback", "frank@example.org")
    assert (r["champion"], r["next_rollback"]) == ("1", None)  # v1, not back to v3
    assert _agree(site)
    with pytest.raises(ValueError, match="nothing to roll back to"):
        promote_version(site, None, "rollback", "frank@example.org")

    with pytest.raises(ValueError, match="is not the challenger.*needs --force"):
        promote_version(site, v3, "approve", "frank@example.org", "second try")
    promote_version(site, v3, "approve", "frank@example.org", "second try", force=True)
    assert promote_version(site, None, "rollback", "frank@example.org")["champion"] == "1"
    assert [h[:3] for h in _history(site)] == [
        ("initial", "1", None), ("approve", v2, "1"), ("approve", v3, v2),
        ("rollback", v2, v3), ("rollback", "1", v2), ("approve", v3, "1"), ("rollback", "1", v3)]
    assert _aliases(site) == ("1", None) and _agree(site)


def test_a_move_outside_emowatch_is_put_back_before_any_promotion(env):
    """The history is the record: an alias moved in the MLflow UI without a recorded decision
    (or left by a crashed promotion) is put back on the recorded champion, with a row."""
    from tasks.promote.actions import promote_version

    site = _site(env, "rb-ext")
    v2 = _challenger(site, "pass", PASS, alias=False)
    env.registry.set_alias(site.site.model_name, CHAMPION, v2)  # by hand, in the MLflow UI
    assert not _agree(site)
    assert site.serving().model.version == "1"  # the monitor serves the recorded champion
    with pytest.raises(ValueError, match="nothing to roll back to"):
        promote_version(site, None, "rollback", "gina@example.org")
    assert _aliases(site)[0] == "1" and _agree(site)
    assert _history(site)[-1][:3] == ("restore", "1", v2)


def test_failed_registry_move_leaves_history_and_aliases_as_they_were(env, monkeypatch):
    from tasks.promote.actions import promote_version

    site = _site(env, "atomic")
    v = _challenger(site, "pass", PASS)

    def broken(*a, **k):
        raise RuntimeError("tracking server went away")

    monkeypatch.setattr(type(env.registry), "set_version_tags", broken)  # fails after the alias moved
    with pytest.raises(RuntimeError, match="went away"):
        promote_version(site, v, "approve", "hank@example.org")
    monkeypatch.undo()
    assert _aliases(site) == ("1", v)
    assert len(_history(site)) == 1 and _agree(site)


# --- gates cannot be bypassed (issue 17, item 3) ------------------------------------------------
def test_a_version_that_is_not_the_challenger_and_has_no_record_needs_force(env):
    """A ``verdict = pass`` tag alone is not a gate record."""
    from tasks.promote.actions import promote_version

    site = _site(env, "bypass-nc")
    v = _challenger(site, "pass", PASS, alias=False, record=False)
    with pytest.raises(ValueError, match="not the challenger") as e:
        promote_version(site, v, "approve", "alice@example.org")
    assert "no gate record in the database" in str(e.value) and "--force" in str(e.value)
    with pytest.raises(ValueError, match="--force needs a --reason"):
        promote_version(site, v, "approve", "alice@example.org", force=True)
    assert _aliases(site) == ("1", None) and len(_history(site)) == 1
    r = promote_version(site, v, "approve", "alice@example.org", "hand-checked 30 images",
                        force=True)
    assert r["forced"] and r["champion"] == v and len(r["problems"]) == 2
    assert _history(site)[-1] == ("approve", v, "1", "alice@example.org", True)


def test_edited_tags_do_not_outvote_the_gate_record(env):
    """The database's record said fail; someone set the MLflow tags to pass."""
    from tasks.promote.actions import promote_version

    site = _site(env, "bypass-tags")
    v = _challenger(site, "fail", FAIL)
    env.registry.set_version_tags(site.site.model_name, v, {"emowatch.verdict": "pass",
                                                            "emowatch.gates": PASS})
    with pytest.raises(ValueError, match="do not match its gate record"):
        promote_version(site, v, "approve", "bob@example.org")
    assert _aliases(site) == ("1", v) and len(_history(site)) == 1
    # forcing it is a recorded decision judged on the record (its failed gate), not the tags
    r = promote_version(site, v, "approve", "bob@example.org", "labels checked", force=True)
    assert r["forced"] and r["blessing"]["failed_gates"] == ["source_acc"]
    assert _history(site)[-1] == ("approve", v, "1", "bob@example.org", True)


def test_a_rejected_version_put_back_as_challenger_needs_force(env):
    from tasks.promote.actions import promote_version

    site = _site(env, "bypass-rej")
    v = _challenger(site, "pass", PASS)
    promote_version(site, v, "reject", "carol@example.org", "blurry faces")
    env.registry.set_alias(site.site.model_name, CHALLENGER, v)  # by hand, in the MLflow UI
    with pytest.raises(ValueError, match="was rejected by carol@example.org"):
        promote_version(site, v, "approve", "dave@example.org")
    assert _aliases(site)[0] == "1"
    r = promote_version(site, v, "approve", "dave@example.org", "re-checked", force=True)
    assert r["forced"] and r["champion"] == v


def test_by_must_name_an_approver_unless_the_setting_allows_any(env):
    import dataclasses

    from tasks.promote.actions import promote_version

    site = _site(env, "bypass-by")
    v = _challenger(site, "pass", PASS)
    with pytest.raises(ValueError, match="not an approver of site bypass-by"):
        promote_version(site, v, "approve", "mallory@example.org")
    with pytest.raises(ValueError, match="automatic promotions are made by 'emowatch-auto'"):
        promote_version(site, v, "auto", "alice@example.org")
    assert _aliases(site) == ("1", v)
    anyone = dataclasses.replace(site, settings=site.settings.model_copy(
        update={"allow_any_approver": True}))
    assert promote_version(anyone, v, "approve", "mallory@example.org")["champion"] == v


def test_expected_champion_guards_an_approval_against_a_race(env):
    from tasks.promote.actions import promote_version

    site = _site(env, "race-exp")
    v = _challenger(site, "pass", PASS)
    looked = "1"
    promote_version(site, v, "approve", "erin@example.org")  # someone else, meanwhile
    w = _challenger(site, "pass", PASS)
    with pytest.raises(ValueError, match=f"changed from {looked} to {v}"):
        promote_version(site, w, "approve", "frank@example.org", expected_champion=looked)
    with pytest.raises(ValueError, match="changed from"):
        promote_version(site, None, "rollback", "frank@example.org", expected_champion=looked)
    assert _aliases(site) == (v, w) and _agree(site)


def test_concurrent_approve_and_rollback_keep_history_and_registry_in_step(env):
    """Eight threads approve and roll back the same site at once: each either happens with its
    history row or is refused cleanly; afterwards the registry's champion is the history's."""
    import threading

    from tasks.promote.actions import promote_version

    site = _site(env, "race")
    v = _challenger(site, "pass", PASS)
    outcomes: list[str] = []

    def act(i: int) -> None:
        try:
            if i % 2:
                promote_version(site, None, "rollback", "gina@example.org", "undo", deliver=False)
            else:
                promote_version(site, v, "approve", "gina@example.org", deliver=False)
            outcomes.append("done")
        except (ValueError, RuntimeError) as e:
            outcomes.append(type(e).__name__)

    threads = [threading.Thread(target=act, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 8 and "done" in outcomes
    assert _agree(site)
    moves = [h for h in _history(site) if h[0] in ("approve", "rollback")]
    assert len(moves) == outcomes.count("done")


def test_kill_9_mid_promotion_is_reconciled_by_the_next_one(env, tmp_path):
    """A promoter killed after MLflow's champion moved but before its history row committed:
    its lock belongs to a dead process and the alias has no recorded decision. The next
    promotion takes the lock over, puts the alias back (a ``restore`` row) and proceeds."""
    import subprocess
    import sys

    site = _site(env, "kill9")
    v = _challenger(site, "pass", PASS)
    s = env.settings
    code = f"""
import os, signal
from pathlib import Path
from emowatch.settings import Settings
from emowatch.sites import Site
from tasks.context import Runtime
from tasks.registry import client as registry
s = Settings(home=Path({str(s.home)!r}), database_url=None, mlflow_tracking_uri=None,
             smtp_host=None, sites_file=Path({str(s.sites_file)!r}))
site = Site(name="kill9", inbox=Path({str(tmp_path)!r}), approvers=["lead@example.org"])
ctx = Runtime.open(s).site_context("kill9", sites={{"kill9": site}}).serving()
real = registry.Registry.set_alias
def set_alias_then_die(self, name, alias, version):
    real(self, name, alias, version)
    if alias == "champion":
        os.kill(os.getpid(), signal.SIGKILL)
registry.Registry.set_alias = set_alias_then_die
from tasks.promote.actions import promote_version
promote_version(ctx, {v!r}, "approve", "lead@example.org", deliver=False)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, r.stderr
    assert _aliases(site)[0] == v and not _agree(site)  # moved, nothing recorded
    assert len(_history(site)) == 1

    from tasks.promote.actions import promote_version

    out = promote_version(site, v, "approve", "lead@example.org", deliver=False)
    assert out["champion"] == v and out["history_agrees"]
    assert [h[:3] for h in _history(site)[1:]] == [("restore", "1", v), ("approve", v, "1")]


# --- doctor ------------------------------------------------------------------------------------------------
def test_doctor_finds_and_repairs_what_has_a_safe_fix(env, monkeypatch):
    """A champion moved in the MLflow UI, a challenger with edited tags, a version registered
    before hashes were recorded and a lock of a dead process: the doctor names each; --repair
    fixes all but the challenger (a person's decision) and says so."""
    import datetime as dt

    from typer.testing import CliRunner

    from db.locks import list_locks
    from db.models import SiteLock, utcnow
    from db.session import session_scope
    from deployments.cli import app
    from deployments.doctor import doctor

    site = _site(env, "doc")
    Path(env.settings.sites_file).write_text(
        f'[sites.doc]\ninbox = "{site.site.inbox}"\napprovers = ["lead@example.org"]\n')
    name = site.site.model_name
    v2 = _challenger(site, "pass", PASS, alias=False)
    env.registry.set_alias(name, CHAMPION, v2)  # by hand, in the MLflow UI
    v3 = _challenger(site, "fail", FAIL)
    env.registry.set_version_tags(name, v3, {"emowatch.verdict": "pass", "emowatch.gates": PASS})
    env.registry.client().delete_model_version_tag(name, "1", "emowatch.sha256.checkpoint")
    with session_scope(env.engine) as s:
        s.add(SiteLock(name="promote:doc", owner=f"{os.uname().nodename}:999999",
                       expires_at=utcnow() + dt.timedelta(minutes=5)))

    r = doctor(env, "doc")
    assert not r["ok"] and r["exit_code"] == 1
    text = " | ".join(r["sites"]["doc"]["problems"] + r["problems"])
    assert f"champion alias is on {v2}, the recorded champion is 1" in text
    assert f"tags of {name}/{v3} do not match its gate record" in text
    assert f"{name}/1 records no sha256 of checkpoint.pt" in text
    assert "lock promote:doc" in text and "dead process" in text
    assert _aliases(site) == (v2, v3)  # a check changes nothing

    monkeypatch.setenv("EMOWATCH_HOME", str(env.settings.home))
    monkeypatch.setenv("EMOWATCH_SITES_FILE", str(env.settings.sites_file))
    for k in ("EMOWATCH_DATABASE_URL", "EMOWATCH_MLFLOW_TRACKING_URI", "EMOWATCH_SMTP_HOST"):
        monkeypatch.delenv(k, raising=False)
    cli = CliRunner().invoke(app, ["doctor", "doc", "--repair"])
    assert cli.exit_code == 1, cli.output  # the challenger is left for a person
    assert "put back on 1" in cli.stdout and "emowatch reject doc" in cli.stdout
    r = doctor(env, "doc")
    assert r["sites"]["doc"]["problems"] == [p for p in r["sites"]["doc"]["problems"]
                                             if "gate record" in p] and r["problems"] == []
    assert _aliases(site) == ("1", v3) and _agree(site)
    assert "emowatch.sha256.checkpoint" in env.registry.get_version(name, "1").tags
    with session_scope(env.engine) as s:
        assert [n for n, _, _ in list_locks(s)] == []
    env.registry.load_by_version(name, "1")  # verified again


# --- e-mails ---------------------------------------------------------------------------------------------------
def test_mail_problems_never_fail_a_promotion(env, monkeypatch):
    from tasks import notify
    from tasks.promote.actions import promote_version

    site = _site(env, "nomail", approvers=())
    v = _challenger(site, "pass", PASS)
    r = promote_version(site, v, "approve", "ivan@example.org")
    assert r["champion"] == v and r["alert_id"] is None and "no approvers" in r["mail_error"]

    site2 = _site(env, "badmail")
    v = _challenger(site2, "pass", PASS)
    monkeypatch.setattr(notify, "deliver_pending",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    r = promote_version(site2, v, "approve", "ivan@example.org")
    assert r["champion"] == v and "disk full" in r["mail_error"] and r["alert_id"] is not None
    assert _agree(site2)


def test_request_approval_email(env, tmp_path):
    from db.models import Alert
    from db.session import session_scope
    from tasks.promote.actions import request_approval

    site = _site(env, "ask")
    v = _challenger(site, "fail", FAIL)
    report = tmp_path / "gates.html"
    report.write_text("<html>gates</html>")
    aid = request_approval(site, v, "fail", FAIL, [report, tmp_path / "gone.png"])
    msg = _eml(env, aid)
    assert f"approve challenger version {v}?" in msg["Subject"]
    text = msg.get_body(("plain",)).get_content()
    assert f"emowatch approve ask {v} --by NAME --force --reason TEXT" in text
    assert f"emowatch reject ask {v} --by NAME" in text
    assert "source_acc" in text and "0.3100" in text and "0.5700" in text
    assert "gone.png" in text  # a missing attachment is named, not fatal
    assert [p.get_filename() for p in msg.iter_attachments()] == ["gates.html"]
    with session_scope(env.engine) as s:
        assert s.get(Alert, aid).kind == "approval"

    ok = request_approval(site, v, "pass", PASS)
    text = _eml(env, ok).get_body(("plain",)).get_content()
    assert "Every gate passed" in text and "--force" not in text


# --- what `emowatch site list` / `status` show once a site has models ------------------------------------
def test_admin_views_show_champion_challenger_and_history(env):
    from deployments.admin import list_sites, site_status
    from tasks.promote.actions import promote_version

    Path(env.settings.sites_file).write_text(
        f'[sites.view]\ninbox = "{(env.settings.home / "inboxes" / "view").as_posix()}"\n'
        'approvers = ["lead@example.org"]\n')
    site = _site(env, "view")
    v2 = _challenger(site, "pass", PASS)
    promote_version(site, v2, "approve", "judy@example.org")
    v3 = _challenger(site, "unverifiable", PASS)

    [row] = list_sites(env)
    assert (row["name"], row["champion"], row["challenger"]) == ("view", v2, v3)
    assert row["serving"] == f"emowatch-view/{v2}"
    st = site_status(env, "view")["sites"]["view"]
    assert (st["champion"], st["challenger"], st["history_champion"]) == (v2, v3, v2)
    assert st["history_agrees"] is True and st["deployments"] == 2
    assert st["last_deployment"]["action"] == "approve"
    assert st["last_deployment"]["actor"] == "judy@example.org"
