"""tasks/readapt.py and tasks/candidate.py without Prefect: one adaptation per site at a time,
when a drift event may start one, which methods a site may use, the run's record, and which
activations a candidate is judged on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from emowatch.sites import Site
from tasks import candidate, readapt


def _ctx(runtime, tmp_path, **site):
    s = Site(name="lab", inbox=tmp_path, **site)
    return runtime.site_context("lab", sites={"lab": s})


def test_one_adaptation_per_site_at_a_time(runtime, tmp_path):
    ctx = _ctx(runtime, tmp_path)
    first, second = readapt.owner_id(), readapt.owner_id()
    assert first != second
    readapt.acquire(ctx, first)
    with pytest.raises(readapt.AdaptationLocked, match=first.split(":")[0]):
        readapt.acquire(ctx, second)
    readapt.release(ctx, first)
    readapt.acquire(ctx, second)  # free again
    readapt.release(ctx, second)


def test_methods_a_site_may_use(tmp_path):
    free = Site(name="lab", inbox=tmp_path, adapt={"source_free": True})
    assert readapt.resolve_method(free, "tent") == "tent"
    with pytest.raises(ValueError, match="source_free.*needs the training data"):
        readapt.resolve_method(free, "mmd")
    assert readapt.resolve_method(Site(name="x", inbox=tmp_path), None) == "portfolio"  # the default
    assert readapt.resolve_method(Site(name="x", inbox=tmp_path), "mmd") == "mmd"  # forced alone
    assert readapt.resolve_method(Site(name="x", inbox=tmp_path, adapt={"method": "portfolio"}),
                                  None) == "portfolio"
    assert readapt.needs_source("portfolio", Site(name="x", inbox=tmp_path))
    assert not readapt.needs_source("portfolio", free)
    assert readapt.needs_source("coral") and not readapt.needs_source("adabn")


def test_when_a_drift_event_may_start_an_adaptation(runtime, tmp_path, monkeypatch):
    from tasks.registry.client import Registry

    assert "adapt.auto is false" in readapt.auto_adapt_blocker(_ctx(runtime, tmp_path,
                                                                    adapt={"auto": False}))
    ctx = _ctx(runtime, tmp_path)
    monkeypatch.setattr(Registry, "get_alias_version", lambda self, name, alias: None)
    assert readapt.auto_adapt_blocker(ctx) is None
    monkeypatch.setattr(Registry, "get_alias_version", lambda self, name, alias: "4")
    assert readapt.auto_adapt_blocker(ctx) == "challenger version 4 is still waiting for approval"


def test_the_run_is_recorded_with_its_outcome(runtime, tmp_path):
    from db.models import AdaptationRun
    from db.session import session_scope
    from tasks.context import ServedModel

    ctx = _ctx(runtime, tmp_path)
    ctx = ctx.__class__(ctx.settings, ctx.site, ctx.site_id, ServedModel("emowatch-lab", "1", "champion"))
    run_id = readapt.start_run(ctx, "adabn", None)
    readapt.finish_run(ctx, run_id, status="done", candidate_version="2", verdict="pass",
                       gates={"g": {"passed": True, "value": 0.0, "threshold": 1.0}})
    with session_scope(ctx.engine) as s:
        row = s.get(AdaptationRun, run_id)
        assert (row.method, row.base_model, row.status, row.candidate_version, row.verdict) == (
            "adabn", "emowatch-lab/1", "done", "2", "pass")
        assert row.finished_at is not None and row.gates["g"]["passed"] is True


def test_a_candidate_is_judged_on_its_own_activations_when_its_frozen_part_changed():
    src_val = (torch.zeros(3, 2), torch.tensor([0, 1, 0]))
    inputs = readapt.AdaptInputs(
        ckpt=None, profile=None, base_key="m/1", src_train=None, src_val=src_val,
        src_heldout=torch.zeros(5, 2), heldout_paths=[], site_h=torch.ones(4, 2), site_paths=[],
        source_paths_val=["v0", "v1", "v2"])
    same = candidate.candidate_inputs(inputs, None)
    assert same[0] is src_val[0] and same[1] is inputs.site_h
    own = {"heldout": torch.arange(10.0).reshape(5, 2), "site": torch.full((4, 2), 7.0)}
    src_h, site_h = candidate.candidate_inputs(inputs, own)
    # the held-out set starts with the validation images: their rows are the first three
    assert torch.equal(src_h, own["heldout"][:3]) and torch.equal(site_h, own["site"])


def test_validation_config_follows_the_site_gates(tmp_path):
    cfg = candidate.validation_config(Site(name="x", inbox=Path(tmp_path), gates={
        "max_source_acc_drop": 0.05, "min_explanation_cosine": 0.7,
        "min_effective_sample_size": 12}))
    assert cfg.max_source_drop == 0.05 and cfg.explanation.min_cosine == 0.7
    assert cfg.dev.min_ess == 12 and "explanation" in cfg.gates
    assert np.isclose(cfg.explanation.min_rank_correlation, 0.3)
