"""The promotion rule: every branch of tasks.promote.blessing.bless."""

import pytest

from tasks.promote.blessing import bless, mcnemar_worse_p

OK = {"source_acc": {"passed": True, "value": 0.6, "threshold": 0.57}}
BAD = {"source_acc": {"passed": False, "value": 0.3, "threshold": 0.57},
       "explanation_rank_corr": {"passed": True, "value": 0.8, "threshold": 0.5}}


@pytest.mark.parametrize("action", ["reject", "rollback"])
def test_reject_and_rollback_always_allowed(action):
    b = bless(action=action, policy="manual", verdict="fail", gates=BAD)
    assert b.allowed and not b.blessed


def test_auto_promotes_only_blessed_on_auto_sites():
    assert bless(action="auto", policy="auto", verdict="pass", gates=OK).allowed
    manual = bless(action="auto", policy="manual", verdict="pass", gates=OK)
    assert not manual.allowed and manual.blessed
    assert "manual" in " ".join(manual.reasons)


def test_auto_never_promotes_unverifiable_or_failed():
    u = bless(action="auto", policy="auto", verdict="unverifiable", gates=OK)
    assert not u.allowed and "unverifiable" in " ".join(u.reasons)
    f = bless(action="auto", policy="auto", verdict="fail", gates=BAD)
    assert not f.allowed and f.failed_gates == ["source_acc"]


def test_fail_verdict_without_failed_gate_still_blocks():
    b = bless(action="auto", policy="auto", verdict="fail", gates=OK)
    assert not b.allowed and "verdict" in b.failed_gates


def test_approve_blessed_and_unverifiable():
    assert bless(action="approve", policy="manual", verdict="pass", gates=OK).allowed
    u = bless(action="approve", policy="manual", verdict="unverifiable", gates=OK)
    assert u.allowed and not u.blessed


def test_approve_failed_needs_force_and_reason():
    assert not bless(action="approve", policy="manual", verdict="fail", gates=BAD).allowed
    assert not bless(action="approve", policy="manual", verdict="fail", gates=BAD, force=True).allowed
    assert not bless(action="approve", policy="manual", verdict="fail", gates=BAD, force=True, reason="  ").allowed
    f = bless(action="approve", policy="manual", verdict="fail", gates=BAD, force=True, reason="checked by hand")
    assert f.allowed and not f.blessed and "checked by hand" in " ".join(f.reasons)


def test_version_without_verdict_needs_force():
    assert not bless(action="approve", policy="manual", verdict=None, gates={}).allowed
    assert bless(action="approve", policy="manual", verdict=None, gates={}, force=True, reason="r").allowed


def test_audit_accuracy_drop_is_a_failed_gate():
    worse = bless(action="auto", policy="auto", verdict="pass", gates=OK,
                  audit={"champion": 0.60, "challenger": 0.50})
    assert not worse.allowed and "audit_accuracy" in worse.failed_gates
    within = bless(action="auto", policy="auto", verdict="pass", gates=OK,
                   audit={"champion": 0.60, "challenger": 0.59})
    assert within.allowed
    missing = bless(action="auto", policy="auto", verdict="pass", gates=OK,
                    audit={"champion": None, "challenger": None})
    assert missing.allowed


def test_audit_drop_counts_only_when_the_paired_test_says_it_is_not_chance():
    # 40 images, the challenger 2 worse (0.375 -> 0.325): 3 vs 1 discordant pairs is chance
    chance = bless(action="auto", policy="auto", verdict="pass", gates=OK,
                   audit={"champion": 0.375, "challenger": 0.325, "n": 40,
                          "champion_only": 3, "challenger_only": 1})
    assert chance.allowed and "audit_accuracy" not in chance.failed_gates
    assert any("within chance" in r for r in chance.reasons)
    # 200 images, 12 vs 2 discordant: a real drop of 5 points
    real = bless(action="auto", policy="auto", verdict="pass", gates=OK,
                 audit={"champion": 0.60, "challenger": 0.55, "n": 200,
                        "champion_only": 12, "challenger_only": 2})
    assert not real.allowed and "audit_accuracy" in real.failed_gates
    assert any("McNemar p=0.006" in r for r in real.reasons)
    assert mcnemar_worse_p(0, 0) == 1.0
    assert mcnemar_worse_p(5, 0) == pytest.approx(1 / 32)


def test_unknown_action():
    with pytest.raises(ValueError):
        bless(action="launch", policy="auto", verdict="pass", gates=OK)
