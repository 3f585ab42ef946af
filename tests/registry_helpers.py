"""Sites, challengers and history reads shared by the promotion tests (tests/test_promote.py,
tests/test_mlflow_sync.py): a challenger registered the way the readapt flow registers one."""

from __future__ import annotations

from sqlalchemy import select

from tasks.registry.client import CHALLENGER, CHAMPION, SOURCE_MODEL

PASS = {"source_acc": {"passed": True, "value": 0.61, "threshold": 0.57},
        "explanation_rank_corr": {"passed": True, "value": 0.8, "threshold": 0.5}}
FAIL = {"source_acc": {"passed": False, "value": 0.31, "threshold": 0.57},
        "explanation_rank_corr": {"passed": True, "value": 0.8, "threshold": 0.5}}

CLASSES = ["anger", "joy", "sadness"]


def register_source(rt, root) -> None:
    """A tiny untrained network registered as emowatch-source@champion (version 1)."""
    import numpy as np
    import torch

    from models.network import Checkpoint, EmotionNet, NetConfig, preprocessing_for

    torch.manual_seed(0)
    cfg = NetConfig(backbone="tiny", img_size=64, pretrained=False, num_classes=len(CLASSES))
    ckpt = Checkpoint(EmotionNet(cfg).eval(), CLASSES, preprocessing_for(cfg), {"seed": 0})
    ref = root / "ref.npz"
    np.savez(ref, features=np.zeros((4, 8), np.float32))
    rt.registry.log_and_register(ckpt, model_name=SOURCE_MODEL, reference_profile_path=ref,
                                 alias=CHAMPION, run_name="source")


APPROVERS = ("lead@example.org", *(f"{n}@example.org" for n in (
    "alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank", "ivan", "judy")))


def site(env, name: str, policy: str = "manual", approvers=APPROVERS):
    """The run context of a site with its database row and version 1 (the source champion)
    as champion."""
    from emowatch.sites import Site

    site = Site(name=name, inbox=env.settings.home / "inboxes" / name, policy=policy,
                approvers=list(approvers))
    ctx = env.site_context(name, sites={name: site}).serving()
    assert ctx.model.version == "1"
    return ctx


def challenger(ctx, verdict: str | None, gates=None, audit=None, alias: bool = True,
                record: bool = True, reasons=None) -> str:
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
                           gates=gates or {}, audit=audit, reasons=reasons)
    return v


def history(ctx) -> list[tuple]:
    from db.models import ModelDeployment
    from db.session import session_scope

    with session_scope(ctx.engine) as s:
        q = select(ModelDeployment).where(ModelDeployment.site_id == ctx.site_id).order_by(
            ModelDeployment.id)
        return [(r.action, r.version, r.previous_version, r.actor, r.forced)
                for r in s.scalars(q)]


def aliases(ctx) -> tuple[str | None, str | None]:
    return (ctx.registry.get_alias_version(ctx.site.model_name, "champion"),
            ctx.registry.get_alias_version(ctx.site.model_name, "challenger"))
