"""What a promotion checks besides the blessing: who acts, and the version's gate record.

The gate record of a version is the ``adaptation_runs`` row of the run that registered it: the
verdict, gates and audit the readapt flow computed. MLflow tags carry a copy for people to read
(and can be edited by anyone with write access to the registry), so a promotion reads the
record, and a version whose tags disagree with it needs a forced, recorded approval.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tasks.promote.blessing import bless

if TYPE_CHECKING:
    from tasks.context import RunContext
    from tasks.records import Validation

AUTO_ACTOR = "emowatch-auto"  # who an automatic promotion is recorded as
TAG_VERDICT = "emowatch.verdict"
TAG_GATES = "emowatch.gates"
TAG_AUDIT = "emowatch.audit"


def _json_tag(tags: Mapping[str, str], key: str) -> tuple[Any, str | None]:
    raw = tags.get(key)
    if raw is None:
        return None, None
    try:
        return json.loads(raw), None
    except json.JSONDecodeError:
        return None, f"tag {key} is not valid JSON"


def read_validation(tags: Mapping[str, str]) -> dict[str, Any]:
    """verdict, gates and audit of a version from its tags, as :func:`bless` takes them.

    An unreadable gates/audit tag counts as a failed gate (``<tag>_unreadable``): a person can
    still force it, the automatic path cannot."""
    gates, err = _json_tag(tags, TAG_GATES)
    out_gates: dict[str, dict[str, Any]] = {}
    if isinstance(gates, dict):
        for name, g in gates.items():
            out_gates[str(name)] = dict(g) if isinstance(g, Mapping) else {"passed": bool(g)}
    elif gates is not None or err:
        out_gates["gates_tag_unreadable"] = {"passed": False, "value": None, "threshold": None}
    audit, aerr = _json_tag(tags, TAG_AUDIT)
    if aerr or (audit is not None and not isinstance(audit, dict)):
        out_gates["audit_tag_unreadable"] = {"passed": False, "value": None, "threshold": None}
        audit = None
    return {"verdict": tags.get(TAG_VERDICT), "gates": out_gates, "audit": audit}


def check_actor(ctx: RunContext, action: str, actor: str) -> None:
    """Refuse an actor the site does not list as an approver (ValueError)."""
    if action == "auto":
        if actor != AUTO_ACTOR:
            raise ValueError(f"automatic promotions are made by {AUTO_ACTOR!r}, not {actor!r}")
        return
    approvers = [a.lower() for a in ctx.site.approvers]
    if approvers and actor.lower() not in approvers and not ctx.settings.allow_any_approver:
        raise ValueError(
            f"--by {actor!r} is not an approver of site {ctx.site.name} (approvers: "
            f"{', '.join(ctx.site.approvers)}); name one of them, or set "
            "EMOWATCH_ALLOW_ANY_APPROVER=true to accept any name")


def gate_record(ctx: RunContext, version: str) -> dict[str, Any] | None:
    """The database's gate record of ``version``: ``{verdict, gates, audit, run_id}`` of the
    adaptation run that registered it (None: no such run)."""
    from db.adaptations import run_for_version
    from db.session import session_scope

    with session_scope(ctx.engine) as s:
        run = run_for_version(s, ctx.site_id, version)
        if run is None:
            return None
        return {"verdict": run.verdict, "gates": dict(run.gates or {}), "audit": run.audit,
                "run_id": run.id}


def record_problems(version: str, challenger: str | None, info: Any, val: Mapping[str, Any],
                     record: Mapping[str, Any] | None) -> list[str]:
    """Why promoting ``version`` is not a plain approval (each needs --force --reason)."""
    name = info.name
    out = []
    if version != challenger:
        out.append(f"{name}/{version} is not the challenger (the challenger is "
                   f"{challenger or 'none'})")
    if info.tags.get("emowatch.rejected_by"):
        out.append(f"{name}/{version} was rejected by {info.tags['emowatch.rejected_by']}")
    if record is None:
        out.append(f"{name}/{version} has no gate record in the database (no adaptation run "
                   "registered it)")
    elif (val["verdict"], val["gates"]) != (record["verdict"], record["gates"]):
        out.append(f"the MLflow tags of {name}/{version} do not match its gate record "
                   f"(adaptation run #{record['run_id']}): they were edited")
    return out


def auto_blessing(ctx: RunContext, validation: Validation) -> Any:
    """What :func:`promote_version` would decide of an ``auto`` promotion of a candidate with
    this validation: the readapt flow branches on it (same rule, same inputs as the record it
    just wrote), so an auto site never starts a promotion the blessing then refuses."""
    return bless(action="auto", policy=ctx.site.policy, verdict=validation.verdict,
                 gates=dict(validation.gates or {}), audit=validation.audit)


__all__ = ["AUTO_ACTOR", "TAG_AUDIT", "TAG_GATES", "TAG_VERDICT", "auto_blessing", "check_actor",
           "gate_record", "read_validation", "record_problems"]
