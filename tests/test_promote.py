"""tasks.promote against a real MLflow registry (SQLite store in a tmp dir) and SQLite database.

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

import numpy as np
import pytest
import torch
from sqlalchemy import select

from db.deployments import walk_history
from models.network import Checkpoint, EmotionNet, NetConfig, preprocessing_for
from tasks.registry import CHALLENGER, CHAMPION, SOURCE_MODEL

CLASSES = ["anger", "joy", "sadness"]
PASS = {"source_acc": {"passed": True, "value": 0.61, "threshold": 0.57},
        "explanation_rank_corr": {"passed": True, "value": 0.8, "threshold": 0.5}}
FAIL = {"source_acc": {"passed": False, "value": 0.31, "threshold": 0.57},
        "explanation_rank_corr": {"passed": True, "value": 0.8, "threshold": 0.5}}


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

    torch.manual_seed(0)
    cfg = NetConfig(backbone="tiny", img_size=64, pretrained=False, num_classes=len(CLASSES))
    ckpt = Checkpoint(EmotionNet(cfg).eval(), CLASSES, preprocessing_for(cfg), {"seed": 0})
    ref = root / "ref.npz"
    np.savez(ref, features=np.zeros((4, 8), np.float32))
    rt.registry.log_and_register(ckpt, model_name=SOURCE_MODEL, reference_profile_path=ref,
                                 alias=CHAMPION, run_name="source")
    yield rt

    os.chdir(cwd)
    mlflow.set_tracking_uri(saved_uris[0])
    mlflow.set_registry_uri(saved_uris[1])


APPROVERS = ("lead@example.org", *(f"{n}@example.org" for n in (
    "alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank", "ivan", "judy")))


def _site(env, name: str, policy: str = "manual", approvers=APPROVERS):
    """The run context of a site with its database row and version 1 (the source champion)
    as champion."""
    from emowatch.sites import Site

    site = Site(name=name, inbox=env.settings.home / "inboxes" / name, policy=policy,
                approvers=list(approvers))
    ctx = env.site_context(name, sites={name: site}).serving()
    assert ctx.model.version == "1"
    return ctx


def _challenger(ctx, verdict: str | None, gates=None, audit=None, alias: bool = True,
                record: bool = True) -> str:
    """A challenger version registered the way the readapt flow registers one: tags on the
    version and (``record``) the finished adaptation run holding the same gate record."""
    from tasks import readapt
    from tasks.context import ServedModel

    tags = {}
    if verdict is not None:
        tags["emowatch.verdict"] = verdict
    if gates is not None:
        tags["emowatch.gates"] = gates
    if audit is not None:
        tags["emowatch.audit"] = audit
    src = ctx.registry.get_alias_version(SOURCE_MODEL, CHAMPION)
    v = ctx.registry.copy_to_site(SOURCE_MODEL, src, ctx.site.model_name, tags=tags).version
    if alias:
        ctx.registry.set_alias(ctx.site.model_name, CHALLENGER, v)
    if record:
        run_ctx = ctx.__class__(ctx.settings, ctx.site, ctx.site_id,
                                ServedModel(ctx.site.model_name, "1", CHAMPION))
        run_id = readapt.start_run(run_ctx, "mmd", None)
        readapt.finish_run(run_ctx, run_id, status="done", candidate_version=v, verdict=verdict,
                           gates=gates or {}, audit=audit)
    return v


def _history(ctx) -> list[tuple]:
    from db.models import ModelDeployment
    from db.session import session_scope

    with session_scope(ctx.engine) as s:
        q = select(ModelDeployment).where(ModelDeployment.site_id == ctx.site_id).order_by(
            ModelDeployment.id)
        return [(r.action, r.version, r.previous_version, r.actor, r.forced)
                for r in s.scalars(q)]


def _aliases(ctx) -> tuple[str | None, str | None]:
    return (ctx.registry.get_alias_version(ctx.site.model_name, "champion"),
            ctx.registry.get_alias_version(ctx.site.model_name, "challenger"))


def _agree(ctx) -> bool:
    from tasks.history import consistency

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
    from tasks.promote import promote_version

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
    from tasks.promote import check_promotion, promote_version

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
    from tasks.promote import promote_version

    site = _site(env, "audit")
    v = _challenger(site, "pass", PASS, audit={"challenger": 0.5, "champion": 0.7})
    with pytest.raises(ValueError, match="audit accuracy"):
        promote_version(site, v, "approve", "carol@example.org")


def test_auto_only_on_auto_sites_and_never_unverifiable(env):
    from tasks.promote import promote_version

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
    from tasks.promote import promote_version

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
    from tasks.promote import promote_version

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
    from tasks.promote import promote_version

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
    from tasks.promote import promote_version

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


# --- e-mails ---------------------------------------------------------------------------------------------------
def test_mail_problems_never_fail_a_promotion(env, monkeypatch):
    from tasks import notify
    from tasks.promote import promote_version

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
    from tasks.promote import request_approval

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
    from tasks.promote import promote_version

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
