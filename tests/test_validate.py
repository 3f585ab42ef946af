"""Label-free validation (models/validate/candidate.py): the verdict, and the gates and DEV end to end
on a tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models.network import EmotionNet, NetConfig
from models.validate.candidate import ValidationConfig, validate_candidate, verdict


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


def test_an_evidence_only_gate_is_reported_but_does_not_decide():
    from models.validate.candidate import reasons_for

    ok = {"passed": True, "value": 0.0, "threshold": 0.1}
    shown = {"passed": False, "value": 0.3, "threshold": 0.05, "decides": False}
    assert verdict({"a": ok, "dev_risk": shown}, False) == "pass"
    assert verdict({"a": {**ok, "passed": False}, "dev_risk": shown}, False) == "fail"
    dev = type("D", (), {"unverifiable": False, "reason": ""})()
    why = reasons_for({"a": ok, "dev_risk": shown}, dev, dev)
    assert "evidence only" in why[0] and why[1].startswith("every gate that decides passed")


def test_a_twin_judged_candidate_is_not_unverifiable_on_dev_alone():
    """DEV's flag (site features unlike the source's) decides "unverifiable" unless the
    candidate's gain was judged on labelled images that reproduce the site (its twin): then it is
    shown as evidence with what vouched instead. A failed gate that decides still fails."""
    from models.validate.candidate import reasons_for

    ok = {"passed": True, "value": 0.0, "threshold": 0.1}
    assert verdict({"a": ok}, True, vouched=True) == "pass"
    assert verdict({"a": ok}, True, vouched=False) == "unverifiable"
    assert verdict({"a": {**ok, "passed": False}}, True, vouched=True) == "fail"
    flagged = type("D", (), {"unverifiable": True, "reason": "weights collapsed"})()
    fine = type("D", (), {"unverifiable": False, "reason": ""})()
    why = reasons_for({"a": ok}, fine, flagged, "either", vouched="the twin judged it")
    assert why[0] == ("unverifiable (champion's features): weights collapsed "
                      "(evidence only: the twin judged it)")
    assert why[-1] == "every gate that decides passed and the twin judged it"
    plain = reasons_for({"a": ok}, fine, flagged, "either")
    assert len(plain) == 1 and "evidence only" not in plain[0]
    assert reasons_for({"a": ok}, fine, fine)[-1].startswith("every gate passed and the site lies")
