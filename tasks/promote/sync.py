"""Decisions made in the MLflow UI, applied the way ``emowatch approve`` applies them.

    sync_site(ctx, deliver=True) -> {"site", "champion", "applied": [...], "refused": [...]}

An approver may decide on a version in the MLflow UI by setting the tags ``emowatch.decision``
(``approve`` / ``reject``), ``emowatch.decision_by`` (one of the site's approvers) and
``emowatch.decision_reason``, and may also move the ``champion`` alias. MLflow without its auth
layer does not say who moved an alias, so a moved alias counts only together with an approve
tag naming a listed approver. For each site, :func:`sync_site`:

* a decision tag not seen before: passed to :func:`tasks.promote.actions.promote_version` with the
  named approver as actor (same rule, history row, tags and e-mails as the CLI); when the rule
  refuses it (not an approver, checks failed, not the challenger, ...) the refusal is recorded
  (a ``refused`` history row, which never moves the champion) and e-mailed to the approvers;
* a champion alias that is not the recorded champion and is not explained by an applied approve
  tag: put back on the recorded champion (a ``restore`` row), recorded and e-mailed.

The version's tag ``emowatch.decision_synced`` remembers which decision was handled (a changed
tag is a new decision) and ``emowatch.decision_result`` what came of it. The served model is the
history's champion at all times (:func:`tasks.context.ensure_site_model`), so a moved alias is
never served, even before a sync.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

from tasks.promote.descriptions import (
    DECISIONS,
    TAG_DECISION,
    TAG_DECISION_BY,
    TAG_DECISION_REASON,
    refresh_descriptions,
)

if TYPE_CHECKING:
    from tasks.context import RunContext

log = logging.getLogger(__name__)

TAG_SYNCED = "emowatch.decision_synced"
TAG_RESULT = "emowatch.decision_result"
LOCK_TTL_S = 300.0  # a sync takes a few registry calls; a crashed one frees the site after this


def decision_key(tags: dict[str, str]) -> str:
    """Identity of the decision written in a version's tags (a changed tag is a new one)."""
    raw = "\x1f".join(tags.get(t, "") for t in (TAG_DECISION, TAG_DECISION_BY, TAG_DECISION_REASON))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def pending_decisions(versions: list[Any]) -> list[dict[str, str]]:
    """The decision tags not handled yet, oldest version first."""
    out = []
    for info in versions:
        tags = dict(info.tags)
        if not tags.get(TAG_DECISION, "").strip():
            continue
        key = decision_key(tags)
        if tags.get(TAG_SYNCED) == key:
            continue
        out.append({"version": info.version, "key": key,
                    "decision": tags[TAG_DECISION].strip().lower(),
                    "by": tags.get(TAG_DECISION_BY, "").strip(),
                    "reason": tags.get(TAG_DECISION_REASON, "").strip()})
    return out


def _record_refusal(ctx: RunContext, version: str, champion: str | None, actor: str,
                    reason: str) -> None:
    from db import deployments
    from db.session import session_scope

    with session_scope(ctx.engine) as s:
        deployments.add_deployment(
            s, site_id=ctx.site_id, model_name=ctx.site.model_name, version=version,
            previous_version=champion, action="refused", actor=actor or "unknown (MLflow UI)",
            reason=reason)


def _tell_approvers(ctx: RunContext, version: str, what: str, deliver: bool) -> None:
    from tasks.messages import refused_message
    from tasks.promote.actions import send_to_approvers

    subject, body = refused_message(ctx.site, version, what,
                                    (TAG_DECISION, TAG_DECISION_BY, TAG_DECISION_REASON))
    send_to_approvers(ctx, "refused", subject, body, deliver=deliver)


def sync_site(ctx: RunContext, deliver: bool = True) -> dict[str, Any]:
    """Apply (or refuse) the MLflow-side decisions of one site; see the module docstring.
    One sync per site at a time (the ``sync:<site>`` lock): a second one returns ``skipped``
    rather than seeing the same decision twice."""
    from db import locks
    from emowatch.processes import owner as process_owner

    lock, owner = f"sync:{ctx.site.name}", process_owner()
    if not locks.acquire_lock(ctx.engine, lock, owner, LOCK_TTL_S):
        return {"site": ctx.site.name, "model": ctx.site.model_name, "champion": None,
                "agree": None, "applied": [], "refused": [],
                "skipped": "another sync of this site is running"}
    try:
        return _sync(ctx, deliver)
    finally:
        locks.release_lock(ctx.engine, lock, owner)


def _sync(ctx: RunContext, deliver: bool) -> dict[str, Any]:
    from tasks.promote.actions import promote_version
    from tasks.promote.history import consistency, reconcile
    from tasks.registry.client import CHAMPION

    site, reg = ctx.site, ctx.registry
    name = site.model_name
    state = consistency(ctx)
    recorded, moved_to = state["history"], state["registry"]
    applied: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    touched: list[str] = []
    pending = pending_decisions(reg.list_versions(name))
    alias_explained = False
    for d in pending:
        v = d["version"]
        touched.append(v)
        if d["decision"] not in DECISIONS:
            problem = (f"{TAG_DECISION}={d['decision']!r} on {name}/{v} is neither "
                       f"{' nor '.join(DECISIONS)}")
            result = {"version": v, "decision": d["decision"], "by": d["by"], "reason": problem}
        else:
            action = d["decision"]
            if v == moved_to and action == "approve" and moved_to != recorded:
                # the alias was moved onto it: the move itself is what the tag approves; put it
                # back first, so the approval moves it as emowatch approve would
                if recorded is not None:
                    reg.set_alias(name, CHAMPION, recorded)
                alias_explained = True
            try:
                r = promote_version(ctx, v, action, actor=d["by"] or "unknown (MLflow UI)",
                                    reason=d["reason"], deliver=deliver,
                                    expected_champion=recorded if action == "approve" else None)
                applied.append({"version": v, "action": action, "by": d["by"],
                                "champion": r["champion"]})
                recorded = r["champion"] if action == "approve" else recorded
                reg.set_version_tags(name, v, {TAG_SYNCED: d["key"],
                                               TAG_RESULT: f"applied: {action} by {d['by']}"})
                continue
            except (ValueError, RuntimeError) as e:
                problem = str(e)
            result = {"version": v, "decision": action, "by": d["by"], "reason": problem}
        refused.append(result)
        _record_refusal(ctx, v, recorded, d["by"], f"MLflow decision refused: {problem}")
        reg.set_version_tags(name, v, {TAG_SYNCED: d["key"], TAG_RESULT: f"refused: {problem}"})
        _tell_approvers(ctx, v, f"{d['by'] or 'someone'} asked to {d['decision']} {name}/{v} "
                                f"in MLflow; refused: {problem}", deliver)
    # an alias still off the record (moved without a decision, or its approval refused)
    state = consistency(ctx)
    if not state["agree"] and state["history"] is not None:
        off = state["registry"]
        why = ("the champion alias was moved in MLflow onto "
               f"{name}/{off or 'no version'} without an {TAG_DECISION}=approve tag naming a "
               "listed approver" if not alias_explained else
               f"the approval of {name}/{off} was refused")
        reconcile(ctx, repair=True, reason=why)
        refused.append({"version": off, "decision": "alias", "by": None, "reason": why})
        if off is not None:
            touched.append(off)
        _tell_approvers(ctx, off or "-", why + f"; the alias was put back on the recorded "
                                              f"champion {state['history']}.", deliver)
    if touched or applied or refused:
        refresh_descriptions(ctx, touched)
    final = consistency(ctx)
    if applied or refused:
        log.info("sync %s: applied %d, refused %d, champion %s", site.name, len(applied),
                 len(refused), final["history"])
    return {"site": site.name, "model": name, "champion": final["history"],
            "agree": final["agree"], "applied": applied, "refused": refused}


def sync_sites(rt: Any, site: str | None = None, deliver: bool = True) -> dict[str, Any]:
    """:func:`sync_site` for one site or every site of the sites file (``emowatch sync``); a
    site whose sync fails is reported, the others still run. ``exit_code`` 1 when any
    decision was refused or a site failed."""
    from emowatch.sites import get_site, load_sites

    sites = load_sites(rt.settings.sites_file)
    names = [get_site(sites, site).name] if site is not None else sorted(sites)
    out: dict[str, Any] = {}
    failed = False
    for name in names:
        try:
            out[name] = sync_site(rt.site_context(name, sites=sites), deliver=deliver)
        except Exception as e:  # noqa: BLE001 -- one site's registry problem is its own
            failed = True
            out[name] = {"site": name, "error": f"{type(e).__name__}: {e}"}
    refused = any(r.get("refused") for r in out.values())
    return {"sites": out, "exit_code": 1 if (failed or refused) else 0}


def sync_before(ctx: RunContext, deliver: bool = False) -> dict[str, Any] | None:
    """The sync that starts the monitor and promote flows: never fails the flow (a registry
    that cannot be read fails the flow's own next step anyway, with its own error)."""
    try:
        return sync_site(ctx, deliver=deliver)
    except Exception as e:  # noqa: BLE001
        log.warning("site %s: MLflow decisions not synced: %s", ctx.site.name, e)
        return None


__all__ = ["TAG_RESULT", "TAG_SYNCED", "decision_key", "pending_decisions", "sync_before",
           "sync_site", "sync_sites"]
