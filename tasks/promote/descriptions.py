"""The MLflow descriptions an approver reads: Markdown the MLflow UI renders.

    version_markdown(...)  -> str   a challenger's page: verdict, reasons, gates, estimate, audit
    model_markdown(...)    -> str   a site's registered model: site, policy, approvers, champion
    refresh_descriptions(ctx, versions) writes both from the database's records

Texts are pure functions of the records (tested on their own); :func:`refresh_descriptions`
reads the gate record (``adaptation_runs``), the drift check that started the run and the
champion history (``model_deployments``), so the page says what the database says, never what an
editable tag says. Called after every registration, approve / reject / rollback and sync;
a failure to write a description is logged, never raised (it is not worth a promotion).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emowatch.sites import Site
from tasks.messages import fmt

if TYPE_CHECKING:
    from tasks.context import RunContext

log = logging.getLogger(__name__)

# How an approver decides in the MLflow UI (tags on the version; read by ``emowatch sync``).
TAG_DECISION = "emowatch.decision"
TAG_DECISION_BY = "emowatch.decision_by"
TAG_DECISION_REASON = "emowatch.decision_reason"
DECISIONS = ("approve", "reject")
LAST_MOVES = 5


def _cell(v: Any) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def _secs(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, (int, float)) else _cell(v)


def gates_markdown(gates: Mapping[str, Mapping[str, Any]] | None) -> str:
    if not gates:
        return "_No gate results recorded._"
    rows = ["| gate | value | threshold | passed |", "|---|---:|---:|:---:|"]
    for name in sorted(gates):
        g = gates[name]
        mark = "yes" if g.get("passed") else "**NO**"
        rows.append(f"| {_cell(name)} | {_cell(g.get('value'))} | "
                    f"{_cell(g.get('threshold'))} | {mark} |")
    return "\n".join(rows)


def _estimate_line(estimate: Mapping[str, Any] | None) -> str:
    if not estimate or estimate.get("accuracy") is None:
        return "not available (the model has no label-free estimator, or too few images)"
    lo, hi = estimate.get("low"), estimate.get("high")
    band = f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None else ""
    return f"{fmt(estimate['accuracy'])}{band}"


def version_markdown(site: Site, version: str, *, champion: str | None, verdict: str | None,
                     reasons: Sequence[str] = (),
                     gates: Mapping[str, Mapping[str, Any]] | None = None,
                     audit: Mapping[str, Any] | None = None,
                     method: str | None = None, base_model: str | None = None,
                     drift: Mapping[str, Any] | None = None,
                     candidates: Sequence[Mapping[str, Any]] | None = None,
                     links: Mapping[str, str] | None = None,
                     decisions: Sequence[Mapping[str, Any]] = ()) -> str:
    """A challenger's description. ``drift``: the check that started the run (decision,
    p_value, impact, estimate); ``decisions``: the history rows about this version."""
    out = [f"## emowatch challenger for site `{site.name}`",
           "",
           f"**Verdict: {verdict or 'none recorded'}** — policy `{site.policy}`; "
           f"current champion (recorded): version {champion or 'none'}"
           + (f"; adapted from `{base_model}` with `{method}`" if method else "") + "."]
    if reasons:
        out += ["", "**Why:**"] + [f"- {r}" for r in reasons]
    out += ["", "### Gates", "", gates_markdown(gates)]
    if audit and audit.get("champion") is not None:
        out += ["", f"**Audit** (labelled site images, n = {audit.get('n', '?')}): challenger "
                    f"{fmt(audit.get('challenger'))}, champion {fmt(audit.get('champion'))}."]
    if drift:
        out += ["", "### The drift check that started it", "",
                f"- decision `{drift.get('decision')}`, p = {fmt(drift.get('p_value'))}, "
                f"impact `{drift.get('impact') or 'unknown'}`",
                f"- champion's estimated accuracy on the site: "
                f"{_estimate_line(drift.get('estimate'))}"]
        if drift.get("explanation"):
            out.append(f"- what changed: {drift['explanation']}")
    if candidates:
        out += ["", "### Candidates", "", "| method | estimate | seconds | selected |",
                "|---|---:|---:|:---:|"]
        for c in candidates:
            out.append(f"| {_cell(c.get('method'))} | {_estimate_line(c.get('estimate'))} | "
                       f"{_secs(c.get('seconds'))} | {'yes' if c.get('selected') else ''} |")
    if links:
        out += ["", "### Files"] + [f"- {k}: `{v}`" for k, v in links.items()]
    if decisions:
        out += ["", "### Decisions"]
        for d in decisions:
            who = d.get("actor") or "?"
            why = f" — {d['reason']}" if d.get("reason") else ""
            out.append(f"- {d.get('at', '')} `{d.get('action')}` by {who}{why}")
    out += ["", "### To decide",
            f"- CLI: `emowatch approve {site.name} {version} --by NAME` or "
            f"`emowatch reject {site.name} {version} --by NAME --reason TEXT`",
            f"- here: set the tags `{TAG_DECISION}` = `approve` or `reject`, "
            f"`{TAG_DECISION_BY}` = one of the site's approvers "
            f"({', '.join(site.approvers) or 'none listed'}) and `{TAG_DECISION_REASON}`; "
            "moving the `champion` alias counts only together with these tags. "
            "emowatch applies them at its next sync (or puts the alias back and says why)."]
    return "\n".join(out) + "\n"


def model_markdown(site: Site, champion: str | None, moves: Sequence[Mapping[str, Any]]) -> str:
    """The registered model's description: the site, its policy and approvers, the champion
    and the last moves of the history (newest first)."""
    out = [f"## emowatch site `{site.name}`", "",
           f"- inbox: `{site.inbox}`",
           f"- schedule: `{site.schedule}`; policy: `{site.policy}`",
           f"- approvers: {', '.join(site.approvers) or 'none listed'}",
           f"- **champion (recorded): version {champion or 'none'}**"]
    if moves:
        out += ["", "| when | action | version | by | reason |", "|---|---|---:|---|---|"]
        for m in moves[:LAST_MOVES]:
            out.append(f"| {_cell(m.get('at'))} | {_cell(m.get('action'))} | "
                       f"{_cell(m.get('version'))} | {_cell(m.get('actor'))} | "
                       f"{_cell(m.get('reason'))} |")
    return "\n".join(out) + "\n"


# --- from the records ----------------------------------------------------------------------------
def _history(ctx: RunContext) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from db.models import ModelDeployment
    from db.session import session_scope

    with session_scope(ctx.engine) as s:
        q = (select(ModelDeployment).where(ModelDeployment.site_id == ctx.site_id,
                                           ModelDeployment.model_name == ctx.site.model_name)
             .order_by(ModelDeployment.id.desc()))
        return [{"at": r.created_at.isoformat(timespec="seconds") if r.created_at else "",
                 "action": r.action, "version": r.version, "actor": r.actor,
                 "reason": r.reason or "", "previous": r.previous_version}
                for r in s.scalars(q)]


def _run_record(ctx: RunContext, version: str) -> dict[str, Any] | None:
    from db.adaptations import run_for_version
    from db.models import DriftCheck
    from db.session import session_scope

    with session_scope(ctx.engine) as s:
        run = run_for_version(s, ctx.site_id, version)
        if run is None:
            return None
        drift = None
        if run.drift_check_id is not None:
            c = s.get(DriftCheck, run.drift_check_id)
            if c is not None:
                drift = {"decision": c.decision, "p_value": c.p_value,
                         "impact": getattr(c, "impact", None),
                         "estimate": getattr(c, "estimate", None),
                         "explanation": getattr(c, "explanation", None),
                         "report": c.report_html}
        return {"verdict": run.verdict, "gates": dict(run.gates or {}), "audit": run.audit,
                "reasons": list(run.reasons or []), "candidates": run.candidates,
                "method": run.method, "base_model": run.base_model, "drift": drift}


def refresh_descriptions(ctx: RunContext, versions: Iterable[str] = (),
                         links: Mapping[str, Mapping[str, str]] | None = None) -> bool:
    """Rewrite the registered model's description and those of ``versions`` that an adaptation
    run registered (others keep theirs). ``links``: extra file paths per version. Returns False
    (and logs) when the registry refused."""
    site, reg = ctx.site, ctx.registry
    try:
        history = _history(ctx)
        from db.deployments import walk_history

        stack = walk_history((h["action"], h["version"], h["previous"])
                             for h in reversed(history))
        champion = stack[-1] if stack else None
        reg.set_description(site.model_name, None, model_markdown(site, champion, history))
        for v in dict.fromkeys(str(x) for x in versions):
            rec = _run_record(ctx, v)
            if rec is None:
                continue
            files = dict((links or {}).get(v, {}))
            folder = Path(ctx.settings.reports_dir) / site.name / f"adapt-v{v}"
            for name in ("explanations.png", "embedding.png", "adaptation_curves.png"):
                if (folder / name).is_file():
                    files.setdefault(name.removesuffix(".png").replace("_", " "),
                                     str((folder / name).resolve()))
            drift = rec["drift"]
            if drift and drift.get("report"):
                files.setdefault("drift report", str(drift["report"]))
            decided = [h for h in reversed(history) if h["version"] == v
                       and h["action"] in ("approve", "auto", "reject", "refused", "rollback")]
            reg.set_description(site.model_name, v, version_markdown(
                site, v, champion=champion,
                verdict=rec["verdict"], reasons=rec["reasons"], gates=rec["gates"],
                audit=rec["audit"], method=rec["method"], base_model=rec["base_model"],
                drift=drift, candidates=rec["candidates"], links=files, decisions=decided))
        return True
    except Exception as e:  # noqa: BLE001 -- a description is never worth failing a move
        log.warning("could not update the MLflow descriptions of %s: %s", site.model_name, e)
        return False


__all__ = ["DECISIONS", "TAG_DECISION", "TAG_DECISION_BY", "TAG_DECISION_REASON",
           "gates_markdown", "model_markdown", "refresh_descriptions", "version_markdown"]
