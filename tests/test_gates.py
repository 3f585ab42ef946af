"""The promotion gates (models/gates.py): values, thresholds, and one new gate added the way
the README says (one class + one catalog line)."""

from __future__ import annotations

import numpy as np
import pytest

from models.gates import (
    gate_dev_risk,
    gate_prediction_sanity,
    gate_residual_drift,
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
