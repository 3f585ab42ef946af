"""Typed records between tasks and flows: their JSON is the CLI's contract, key for key."""

from __future__ import annotations

import json

from models.estimate.base import Estimate, as_estimate, impact, unavailable
from tasks.records import ReadaptOutcome, Validation

# The CLI's JSON of `emowatch adapt` as it was when the flow built dicts (session 10).
LEGACY_SKIPPED = ["site", "method", "version", "gates", "verdict", "skipped"]
LEGACY_NO_GAIN = ["site", "method", "version", "model", "base_model", "gates", "verdict",
                  "reasons", "candidates", "proxies", "seconds", "adapt_seconds", "n_site_images",
                  "plots", "promotion", "approval_alert_id", "adaptation_run_id"]
LEGACY_REGISTERED = ["site", "method", "selected", "version", "model", "base_model", "gates",
                     "verdict", "reasons", "dev", "source_acc", "champion_source_acc", "audit",
                     "seconds", "adapt_seconds", "candidates", "proxies", "n_site_images", "plots",
                     "promotion", "approval_alert_id", "adaptation_run_id"]
LEGACY_ESTIMATE = ["accuracy", "low", "high", "source_accuracy", "drop", "drop_low", "drop_high",
                   "method", "verifiable", "reason", "n"]


def _validation() -> Validation:
    return Validation(verdict="fail", reasons=["source accuracy fell"],
                      gates={"source_accuracy": {"passed": False, "value": 0.05, "threshold": 0.03}},
                      dev={"risk": 0.4}, champion_dev={"risk": 0.3}, source_acc=0.5,
                      champion_source_acc=0.55, mmd2_before=0.2, mmd2_after=0.1,
                      probe=object(), probe_maps={"champion": object()})


def test_the_three_readapt_shapes_keep_their_keys_and_order():
    skipped = ReadaptOutcome("lobby", "portfolio", skipped="policy manual").to_json()
    assert list(skipped) == LEGACY_SKIPPED
    assert (skipped["version"], skipped["gates"], skipped["verdict"]) == (None, {}, None)
    no_gain = ReadaptOutcome("lobby", "portfolio", verdict="no_gain", reasons=["no_gain: x"],
                             candidates=[], adaptation_run_id=3).to_json()
    assert list(no_gain)[:len(LEGACY_NO_GAIN)] == LEGACY_NO_GAIN  # kept; new keys at the end
    assert (no_gain["plots"], no_gain["promotion"], no_gain["gates"]) == ({}, None, {})
    v = _validation()
    reg = ReadaptOutcome.registered("lobby", "portfolio", "bn(N=80)", v, version="2",
                                    plots={"embedding": "/p.png"}).to_json()
    assert list(reg)[:len(LEGACY_REGISTERED)] == LEGACY_REGISTERED
    assert (reg["verdict"], reg["gates"], reg["dev"], reg["source_acc"]) == (
        "fail", v.gates, {"risk": 0.4}, 0.5)
    json.dumps(reg)  # JSON-able: the probe and maps stay out


def test_validation_json_holds_no_arrays():
    out = _validation().to_json()
    assert "probe" not in out and "probe_maps" not in out and "candidate_activations" not in out
    assert out["verdict"] == "fail" and json.dumps(out)


def test_estimate_json_and_its_stored_form():
    e = Estimate(accuracy=0.4, low=0.35, high=0.45, source_accuracy=0.5, drop=0.1,
                 drop_low=0.05, drop_high=0.15, method="meta-gbm", verifiable=True, reason="",
                 n=80)
    assert list(e.to_json()) == LEGACY_ESTIMATE  # "ms" only when the check timed it
    assert list(e.with_ms(3.2).to_json()) == LEGACY_ESTIMATE + ["ms"]
    assert Estimate.from_json(e.with_ms(3.2).to_json()) == e.with_ms(3.2)
    assert impact(e, 0.03) == impact(e.to_json(), 0.03) == "harmful"
    none = unavailable("old profile", 12)
    assert list(none.to_json()) == LEGACY_ESTIMATE and not none.available
    assert as_estimate(None).reason == "not computed" and as_estimate(e) is e
