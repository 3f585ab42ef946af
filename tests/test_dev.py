"""Deep Embedded Validation (models/validate/dev.py) on problems with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.validate.dev import (
    DEVConfig,
    DEVResult,
    deep_embedded_validation,
    density_ratios,
    dev_risk,
    effective_sample_size,
    per_sample_ce,
)

# --- DEV on problems with a known answer ------------------------------------------------------------
# Source z ~ N(0,1), target z ~ N(mu,1), loss L(z) = z^2: the target risk is 1 + mu^2 and the
# true density ratio is exp(mu z - mu^2 / 2).
MU = 0.5
TRUE_RISK = 1.0 + MU**2


def test_control_variate_estimator_is_unbiased_and_not_noisier():
    rng = np.random.default_rng(0)
    dev, plain = [], []
    for _ in range(400):
        z = rng.normal(size=150)
        w = np.exp(MU * z - MU**2 / 2)
        risk, wrisk, _ = dev_risk(z**2, w)
        dev.append(risk)
        plain.append(wrisk)
    dev, plain = np.array(dev), np.array(plain)
    se = dev.std() / math.sqrt(len(dev))
    assert abs(dev.mean() - TRUE_RISK) < 4 * se + 0.02, (dev.mean(), TRUE_RISK)
    assert abs(plain.mean() - TRUE_RISK) < 0.05
    assert dev.std() <= plain.std() * 1.02  # the control variate does not add variance
    # The source-only mean would be biased: E_s[z^2] = 1
    assert abs(dev.mean() - 1.0) > 0.15


def test_dev_with_estimated_ratios_recovers_known_risk():
    rng = np.random.default_rng(1)
    zs = rng.normal(size=(1500, 1))
    zt = rng.normal(MU, 1.0, size=(1500, 1))
    res = deep_embedded_validation(zs, zs[:, 0] ** 2, zt, DEVConfig(C=1.0))
    assert isinstance(res, DEVResult)
    assert abs(res.risk - TRUE_RISK) < 0.12, res
    assert abs(res.source_risk - 1.0) < 0.1
    assert not res.unverifiable and res.reason == ""
    assert 0.55 < res.domain_auc < 0.75  # overlapping domains
    assert res.ess_fraction > 0.5 and 0.8 < res.mean_weight < 1.2
    d = res.to_dict()
    assert all(isinstance(v, float | int | bool | str) for v in d.values())


def test_dev_overlapping_high_dim_is_verifiable():
    rng = np.random.default_rng(2)
    zs = rng.normal(size=(300, 32))
    zt = rng.normal(size=(300, 32)) + 0.1
    losses = rng.exponential(size=300)
    res = deep_embedded_validation(zs, losses, zt)
    assert math.isfinite(res.risk) and not res.unverifiable
    assert res.ess_fraction > 0.3
    assert abs(res.risk - losses.mean()) < 0.5


def test_dev_separable_domains_are_unverifiable():
    """Faces vs landscapes: the domain classifier separates them, no re-weighting helps."""
    rng = np.random.default_rng(3)
    zs = rng.normal(size=(200, 16))
    zt = rng.normal(size=(200, 16)) + 3.0
    res = deep_embedded_validation(zs, rng.exponential(size=200), zt)
    assert res.unverifiable
    assert res.domain_auc > 0.99
    assert "separates" in res.reason


def test_dev_input_checks():
    with pytest.raises(ValueError):
        dev_risk(np.ones(3), np.ones(4))
    with pytest.raises(ValueError):
        dev_risk(np.ones(3), -np.ones(3))
    with pytest.raises(ValueError, match="losses"):
        deep_embedded_validation(np.zeros((5, 2)), np.zeros(4), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="dims"):
        density_ratios(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        density_ratios(np.full((5, 2), np.nan), np.zeros((5, 2)))
    assert effective_sample_size(np.ones(10)) == pytest.approx(10.0)
    assert effective_sample_size(np.r_[1.0, np.zeros(9)]) == pytest.approx(1.0)




def test_per_sample_ce():
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    assert per_sample_ce(p, np.array([0, 1])) == pytest.approx([math.log(2), -math.log(0.1)])
