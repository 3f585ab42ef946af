"""tasks.promote.descriptions (the Markdown of MLflow pages) and tasks.promote.sync's decision bookkeeping:
pure functions, known answers."""

from __future__ import annotations

from types import SimpleNamespace

from emowatch.sites import Site
from tasks.promote.descriptions import gates_markdown, model_markdown, version_markdown
from tasks.promote.sync import TAG_SYNCED, decision_key, pending_decisions

SITE = Site(name="night-cam", inbox="/in", policy="manual", approvers=["ann@x.org"])


def test_gates_table_marks_failures_and_escapes_cells():
    text = gates_markdown({"b|x": {"passed": True, "value": 0.5, "threshold": None},
                           "a": {"passed": False, "value": 0.25, "threshold": 0.3}})
    lines = text.splitlines()
    assert lines[0] == "| gate | value | threshold | passed |"
    assert lines[2] == "| a | 0.2500 | 0.3000 | **NO** |"  # sorted by name
    assert lines[3] == "| b\\|x | 0.5000 | - | yes |"
    assert gates_markdown({}) == "_No gate results recorded._"


def test_version_page_has_verdict_reasons_estimate_candidates_and_how_to_decide():
    text = version_markdown(
        SITE, "3", champion="2", verdict="unverifiable",
        reasons=["the domain classifier separates the domains (DEV)"],
        gates={"source_acc": {"passed": True, "value": 0.61, "threshold": 0.57}},
        audit={"champion": 0.4, "challenger": 0.5, "n": 40}, method="mmd",
        base_model="emowatch-night-cam/2",
        drift={"decision": "drift", "p_value": 1e-6, "impact": "harmful",
               "estimate": {"accuracy": 0.31, "low": 0.26, "high": 0.36}},
        candidates=[{"method": "bn-prior", "estimate": {"accuracy": 0.35}, "seconds": 4.2,
                     "selected": True}],
        links={"explanations": "/r/explanations.png"},
        decisions=[{"at": "t", "action": "refused", "actor": "bob", "reason": "not listed"}])
    assert "**Verdict: unverifiable**" in text and "current champion (recorded): version 2" in text
    assert "- the domain classifier separates the domains (DEV)" in text
    assert "| source_acc | 0.6100 | 0.5700 | yes |" in text
    assert "challenger 0.5000, champion 0.4000" in text
    assert "0.3100 [0.2600, 0.3600]" in text and "impact `harmful`" in text
    assert "| bn-prior | 0.3500 | 4.2 | yes |" in text
    assert "`/r/explanations.png`" in text and "`refused` by bob — not listed" in text
    assert "emowatch approve night-cam 3 --by NAME" in text and "ann@x.org" in text


def test_model_page_lists_the_last_moves_newest_first():
    moves = [{"at": f"t{i}", "action": "approve", "version": str(i), "actor": "ann",
              "reason": ""} for i in range(9, 0, -1)]
    text = model_markdown(SITE, "9", moves)
    assert "**champion (recorded): version 9**" in text and "ann@x.org" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| t")]
    assert [r.split("|")[3].strip() for r in rows] == ["9", "8", "7", "6", "5"]


def _v(version, **tags):
    return SimpleNamespace(version=version, tags=tags)


def test_a_decision_is_pending_once_and_again_when_its_tags_change():
    tags = {"emowatch.decision": "Approve ", "emowatch.decision_by": "ann@x.org",
            "emowatch.decision_reason": "ok"}
    [d] = pending_decisions([_v("1"), _v("2", **tags)])
    assert d == {"version": "2", "key": decision_key(tags), "decision": "approve",
                 "by": "ann@x.org", "reason": "ok"}
    assert pending_decisions([_v("2", **tags, **{TAG_SYNCED: d["key"]})]) == []
    changed = {**tags, "emowatch.decision": "reject", TAG_SYNCED: d["key"]}
    assert [x["decision"] for x in pending_decisions([_v("2", **changed)])] == ["reject"]
