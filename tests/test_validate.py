"""Label-free validation (models/validate.py): DEV estimator, gates, verdict."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.network import EmotionNet, NetConfig
from models.validate import (
    DEVConfig,
    DEVResult,
    ValidationConfig,
    deep_embedded_validation,
    density_ratios,
    dev_risk,
    effective_sample_size,
    gate_dev_risk,
    gate_prediction_sanity,
    gate_residual_drift,
    gate_source_accuracy,
    per_sample_ce,
    validate_candidate,
    verdict,
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


def test_verdict_logic():
    ok = {"passed": True, "value": 0.0, "threshold": 1.0}
    bad = {"passed": False, "value": 2.0, "threshold": 1.0}
    assert verdict({"a": ok, "b": ok}, False) == "pass"
    assert verdict({"a": ok, "b": ok}, True) == "unverifiable"
    assert verdict({"a": ok, "b": bad}, True) == "fail"
    assert verdict([ok, bad], None) == "fail"


# --- end to end on a tiny model -------------------------------------------------------------------
K, S = 4, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: thread start-up/spin costs more than the maths, worst when other jobs
    share the cores; one thread keeps these tests at a few CPU seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def scenes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = 0.5 * torch.randn(n, 3, S, S, generator=g)
    for c in range(K):
        r, q = divmod(c, 2)
        x[y == c, :, r * S // 2:(r + 1) * S // 2, q * S // 2:(q + 1) * S // 2] += 1.0
    return x, y


@pytest.fixture(scope="module")
def champion():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = EmotionNet(NetConfig(backbone="tiny", img_size=S, num_classes=K, pretrained=False))
        x, y = scenes(256, 0)
        opt = torch.optim.Adam(m.trainable_parameters(), 3e-3)
        m.train()
        for _ in range(80):
            i = torch.randint(0, len(x), (64,))
            loss = F.cross_entropy(m(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    return m


def test_healthy_candidate_passes_on_a_site_like_the_source(champion):
    val, site = scenes(160, 1), scenes(160, 2)
    rep = validate_candidate(copy.deepcopy(champion), champion, val, site[0])
    assert rep.champion_source_acc > 0.9
    assert all(g["passed"] for g in rep.gates.values()), rep.gates
    assert not rep.dev.unverifiable and rep.verdict == "pass"
    assert math.isfinite(rep.dev.risk) and rep.dev.ess_fraction > 0.3


def test_gates_reject_a_collapsed_candidate(champion):
    val, site = scenes(160, 1), scenes(160, 2)
    broken = copy.deepcopy(champion)
    with torch.no_grad():
        broken.head.bias[0] += 100.0  # everything is class 0
    rep = validate_candidate(broken, champion, val, site[0])
    assert not rep.gates["prediction_sanity"]["passed"]
    assert not rep.gates["source_accuracy"]["passed"]
    assert rep.verdict == "fail"


def test_gates_reject_a_candidate_that_lost_source_accuracy(champion):
    val, site = scenes(160, 1), scenes(160, 2)
    broken = copy.deepcopy(champion)
    with torch.no_grad():  # swap the class meanings: predictions stay diverse, labels wrong
        broken.head.weight.copy_(broken.head.weight[[1, 2, 3, 0]])
        broken.head.bias.copy_(broken.head.bias[[1, 2, 3, 0]])
    rep = validate_candidate(broken, champion, val, site[0])
    assert rep.gates["prediction_sanity"]["passed"]
    assert not rep.gates["source_accuracy"]["passed"]
    assert not rep.gates["dev_risk"]["passed"]
    assert rep.verdict == "fail"


def test_candidate_with_its_own_activations_is_judged_on_them(champion):
    """adabn scope "all" changes the frozen part: the candidate's source accuracy must come
    from ITS activations of the source images, not the champion's."""
    val, site = scenes(160, 1), scenes(160, 2)
    x, y = val
    same = validate_candidate(copy.deepcopy(champion), champion, val, site[0],
                              source_candidate=(x.clone(), y))
    assert same.source_acc == same.champion_source_acc
    # what a candidate whose frozen part mangles source images would produce
    mangled = torch.flip(x, dims=(2, 3))  # every class cue moves to another quadrant
    rep = validate_candidate(copy.deepcopy(champion), champion, val, site[0],
                             source_candidate=(mangled, y))
    assert rep.source_acc < rep.champion_source_acc - 0.5
    assert not rep.gates["source_accuracy"]["passed"] and rep.verdict == "fail"
    with pytest.raises(ValueError, match="source_candidate has 10"):
        validate_candidate(champion, champion, val, site[0], source_candidate=(x[:10], y[:10]))


def test_per_sample_ce():
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    assert per_sample_ce(p, np.array([0, 1])) == pytest.approx([math.log(2), -math.log(0.1)])


def test_separable_site_is_unverifiable_not_pass(champion):
    """Gates all pass (the candidate IS the champion) but the site is a different kind of
    image: DEV cannot vouch for it, so the verdict is 'unverifiable', never 'pass'."""
    val, (x, _) = scenes(160, 1), scenes(160, 2)
    x = x.clone()
    x[:, 0] += 1.0  # a strong colour cast: every site image is told apart by its red channel
    for loss in ("ce", "error"):
        rep = validate_candidate(copy.deepcopy(champion), champion, val, x,
                                 ValidationConfig(dev_loss=loss))
        assert all(g["passed"] for g in rep.gates.values()), rep.gates
        assert rep.dev.unverifiable and rep.dev.domain_auc > 0.99
        assert rep.verdict == "unverifiable"
        assert math.isfinite(rep.dev.risk)
    assert 0.0 <= rep.dev.source_risk <= 1.0  # error rate


def test_validation_config_is_checked(champion):
    val, site = scenes(40, 1), scenes(40, 2)
    with pytest.raises(ValueError, match="dev_loss"):
        validate_candidate(champion, champion, val, site[0], ValidationConfig(dev_loss="mse"))
    with pytest.raises(ValueError, match="unverifiable_from"):
        validate_candidate(champion, champion, val, site[0], ValidationConfig(unverifiable_from="x"))
    with pytest.raises(ValueError, match="labels"):
        validate_candidate(champion, champion, val[0], site[0])
