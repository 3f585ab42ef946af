"""The promotion gates (models/validate/gates.py): values, thresholds, and one new gate added the way
the README says (one class + one catalog line)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from models.network import EmotionNet, NetConfig
from models.validate.candidate import ValidationConfig, validate_candidate
from models.validate.gates import (
    Gate,
    gate_dev_risk,
    gate_prediction_sanity,
    gate_residual_drift,
    gate_result,
    gate_source_accuracy,
)


# --- gates and verdict ----------------------------------------------------------------------------
def test_gates_shape_and_thresholds():
    g = gate_source_accuracy(0.80, 0.82)
    assert set(g) == {"passed", "value", "threshold"} and g["passed"]
    assert g["value"] == pytest.approx(0.02) and g["threshold"] == 0.03
    assert not gate_source_accuracy(0.70, 0.82)["passed"]
    assert gate_dev_risk(1.00, 1.00)["passed"] and not gate_dev_risk(1.5, 1.0)["passed"]
    assert not gate_dev_risk(float("nan"), 1.0)["passed"]
    assert gate_residual_drift(0.10, 0.05)["passed"] and not gate_residual_drift(0.10, 0.2)["passed"]
    assert gate_residual_drift(0.0, 5e-5)["passed"]  # no drift before: noise does not fail
    k = 6
    uniform = np.full((50, k), 1.0 / k)
    collapsed = np.zeros((50, k))
    collapsed[:, 2] = 1.0
    assert gate_prediction_sanity(uniform)["value"] == pytest.approx(1.0)
    assert gate_prediction_sanity(uniform)["passed"]
    assert not gate_prediction_sanity(collapsed)["passed"]
    with pytest.raises(ValueError):
        gate_prediction_sanity(np.ones(5))


# --- adding a gate, as docs/extending.md says: one class + one catalog line ----------
class MaxConfidenceGate(Gate):
    """A new gate: the candidate's mean top-class confidence on the site stays below 0.9."""

    name = "max_confidence"

    def evaluate(self, ev):
        conf = float(ev.candidate_view.p_site.max(1).mean())
        return {self.name: gate_result(conf <= 0.9, conf, 0.9)}


def test_a_new_gate_is_one_class_and_one_catalog_line(monkeypatch):
    from models import catalog
    from models.validate.candidate import DEFAULT_GATES

    monkeypatch.setitem(catalog.GATES, "max_confidence", "tests.test_gates:MaxConfidenceGate")
    torch.manual_seed(0)
    model = EmotionNet(NetConfig(backbone="tiny", img_size=16, num_classes=3, pretrained=False)).eval()
    val = (torch.randn(40, 3, 16, 16), torch.arange(40) % 3)
    site = torch.randn(40, 3, 16, 16)
    cfg = ValidationConfig(gates=(*DEFAULT_GATES, "max_confidence"))
    rep = validate_candidate(model, model, val, site, cfg)
    assert list(rep.gates)[-1] == "max_confidence" and rep.gates["max_confidence"]["passed"]
    confident = copy.deepcopy(model)
    with torch.no_grad():
        confident.head.weight.mul_(1000.0)
    rep = validate_candidate(confident, model, val, site, cfg)
    assert not rep.gates["max_confidence"]["passed"] and rep.verdict == "fail"
    assert any(r.startswith("gate max_confidence failed") for r in rep.reasons)
