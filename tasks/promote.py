"""Moving a site's ``champion`` alias: approve, auto-promote, reject, roll back.

    promote_version(settings, site, site_id, version, action, actor, reason, force) -> dict
    request_approval(settings, site, site_id, version, verdict, gates, attachments) -> alert id

The rule (may this action happen?) is :func:`tasks.blessing.bless`, fed with the tags the
re-adaptation flow put on the challenger version (``emowatch.verdict``, ``emowatch.gates``,
``emowatch.audit``). This module does the moves and keeps two records in step:

* the registry: aliases ``champion``/``challenger`` of ``emowatch-<site>`` and version tags
  (``emowatch.promoted_by`` ...), what serving and monitoring read;
* the database: ``model_deployments``, the append-only champion history with who and why.

Rollback walks back the history (an undo stack, not a toggle): each approve/auto pushes the
new champion, each rollback pops back to the champion before the current one. Approving v2
then v3 and rolling back twice gives v2, then v1; a third rollback is an error ("nothing to
roll back to"), never a ping-pong between two versions. Every result says which version a
further rollback would restore (``next_rollback``). A champion that someone moved outside
emowatch (the MLflow UI) is sat on top of the stack: rolling it back restores the last
champion the history knows.

One promotion per site at a time (the ``promote:<site>`` lock). The alias is moved inside the
database transaction that writes the history row; if anything fails before the commit, the
aliases are put back, so the history and the registry agree afterwards (:func:`consistency`).
E-mails go through the outbox *after* the commit: a mail problem never undoes a promotion.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import select
from sqlalchemy.orm import Session

from tasks.blessing import bless

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from emowatch.settings import Settings
    from emowatch.sites import Site

log = logging.getLogger(__name__)

ACTIONS = ("approve", "auto", "reject", "rollback")
# History rows that move the champion alias (``reject`` does not).
_MOVES = ("initial", "approve", "auto", "rollback")

TAG_VERDICT = "emowatch.verdict"
TAG_GATES = "emowatch.gates"
TAG_AUDIT = "emowatch.audit"

# A promotion takes a few registry calls (seconds); 5 minutes is far above that, and a crashed
# promoter frees the site after it without anyone deleting rows by hand.
LOCK_TTL_S = 300.0


# --- the champion history (pure) ----------------------------------------------------------------
def walk_history(rows: Iterable[tuple[str, str, str | None]]) -> list[str]:
    """The champion stack from history rows ``(action, version, previous_version)``, oldest
    first; the last element is the current champion as the history knows it.

    initial/approve/auto push their version (after the previous champion, when the row says the
    alias was somewhere the stack does not show: a move made outside emowatch); rollback pops
    back to its version; reject changes nothing.
    """
    stack: list[str] = []
    for action, version, previous in rows:
        if action not in _MOVES:
            continue
        if previous is not None and (not stack or stack[-1] != previous):
            stack.append(previous)  # the alias was moved outside emowatch: remember where
        if action == "rollback":
            below = stack[:-1]
            if version in below:
                del stack[len(below) - below[::-1].index(version):]  # back to its last occurrence
                continue
        if not stack or stack[-1] != version:
            stack.append(version)
    return stack


def champion_stack(session: Session, site_id: int, model_name: str) -> list[str]:
    """:func:`walk_history` over the site's ``model_deployments`` rows."""
    from db.models import ModelDeployment

    q = (select(ModelDeployment.action, ModelDeployment.version, ModelDeployment.previous_version)
         .where(ModelDeployment.site_id == site_id, ModelDeployment.model_name == model_name)
         .order_by(ModelDeployment.id))
    return walk_history(tuple(r) for r in session.execute(q))


def _rollback_target(stack: Sequence[str], current: str | None) -> str | None:
    """The champion a rollback from ``current`` restores (None: nothing to roll back to)."""
    if not stack:
        return None
    if current is None or stack[-1] != current:
        return stack[-1]  # the alias was moved/removed outside emowatch: the last known champion
    return stack[-2] if len(stack) >= 2 else None


def consistency(settings: Settings, site: Site, site_id: int) -> dict[str, Any]:
    """Does the registry's champion equal the history's? ``{"registry", "history", "agree"}``."""
    from db.session import session_scope
    from tasks import registry
    from tasks.context import prepare

    settings, engine = prepare(settings)
    with session_scope(engine) as s:
        stack = champion_stack(s, site_id, site.model_name)
    reg = registry.get_alias_version(site.model_name, registry.CHAMPION)
    hist = stack[-1] if stack else None
    return {"registry": reg, "history": hist, "agree": reg == hist}


# --- tags -----------------------------------------------------------------------------------------
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


# --- e-mail text ----------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def gates_table(gates: Mapping[str, Mapping[str, Any]] | None) -> str:
    """The gates as a fixed-width text table (e-mails are read in any mail client)."""
    if not gates:
        return "  (no gate results recorded)"
    w = max(12, *(len(n) for n in gates))
    lines = [f"  {'gate':<{w}}  {'passed':<6}  {'value':>10}  {'threshold':>10}"]
    for name in sorted(gates):
        g = gates[name]
        lines.append(f"  {name:<{w}}  {_fmt(bool(g.get('passed'))):<6}  "
                     f"{_fmt(g.get('value')):>10}  {_fmt(g.get('threshold')):>10}")
    return "\n".join(lines)


def _audit_line(audit: Mapping[str, Any] | None) -> str:
    if not audit:
        return "Audit set: none (no labelled images at this site)."
    line = (f"Audit accuracy: challenger {_fmt(audit.get('challenger'))}, "
            f"champion {_fmt(audit.get('champion'))}")
    if audit.get("champion_only") is not None and audit.get("challenger_only") is not None:
        line += (f" on {audit.get('n', '?')} labelled site images (only the champion right on "
                 f"{audit['champion_only']}, only the challenger on {audit['challenger_only']})")
    return line + "."


# --- helpers ------------------------------------------------------------------------------------------
def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _require_version(model_name: str, version: str) -> Any:
    from tasks import registry

    try:
        return registry.get_version(model_name, version)
    except registry.RegistryError:
        known = [v.version for v in registry.list_versions(model_name)]
        raise ValueError(
            f"{model_name} has no version {version!r} "
            f"(versions: {', '.join(known) if known else 'none registered'})"
        ) from None


def _send(engine: Engine, settings: Settings, site: Site, site_id: int, kind: str, subject: str,
          body: str, attachments: Sequence[str | Path] = (), deliver: bool = True) -> dict[str, Any]:
    """Queue (and deliver) an e-mail to the site's approvers; never raises.

    Returns ``{"alert_id", "delivery", "mail_error"}``."""
    from db.session import session_scope
    from tasks import notify

    out: dict[str, Any] = {"alert_id": None, "delivery": None, "mail_error": None}
    if not site.approvers:
        out["mail_error"] = f"site {site.name} has no approvers: no e-mail sent"
        log.warning(out["mail_error"])
        return out
    files = [Path(a) for a in attachments]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        body += "\n\nNot attached (missing): " + ", ".join(missing)
    try:
        with session_scope(engine) as s:
            alert = notify.queue_email(s, site_id=site_id, kind=kind, recipients=site.approvers,
                                       subject=subject, body=body,
                                       attachments=[p for p in files if p.is_file()])
            out["alert_id"] = alert.id
        if deliver:
            out["delivery"] = asdict(notify.deliver_pending(engine, settings))
    except Exception as e:  # noqa: BLE001 -- the outbox must never undo a promotion
        out["mail_error"] = f"{type(e).__name__}: {e}"
        log.warning("e-mail %r for site %s not queued/delivered: %s", kind, site.name, e)
    return out


def _restore_aliases(model_name: str, before: Mapping[str, str | None]) -> None:
    """Best effort: put ``champion``/``challenger`` back where they were."""
    from tasks import registry

    for alias, v in before.items():
        try:
            if v is None:
                registry.delete_alias(model_name, alias)
            else:
                registry.set_alias(model_name, alias, v)
        except Exception as e:  # noqa: BLE001
            log.error("could not restore %s@%s to %s: %s (fix by hand)", model_name, alias, v, e)


def _now_iso() -> str:
    from db.models import utcnow

    return utcnow().isoformat(timespec="seconds")


def _current_and_plan(engine: Engine, site: Site, site_id: int, version: str | int | None,
                      action: str, force: bool, reason: str,
                      ) -> tuple[str | None, str | None, dict[str, Any]]:
    """(champion, challenger, plan) now; raises ValueError when the action is refused."""
    from db.session import session_scope
    from tasks import registry

    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    name = site.model_name
    champion = registry.get_alias_version(name, registry.CHAMPION)
    challenger = registry.get_alias_version(name, registry.CHALLENGER)
    with session_scope(engine) as s:
        stack = champion_stack(s, site_id, name)
    v = None if version is None else str(version).strip()
    if action == "rollback":
        return champion, challenger, _plan_rollback(name, v, champion, stack)
    if v is None:
        if challenger is None:
            raise ValueError(f"{name} has no challenger: name the version to {action}")
        v = challenger
    return champion, challenger, _plan_promotion(site, name, v, action, champion, stack, force,
                                                 (reason or "").strip())


def check_promotion(settings: Settings | None, site: Site, site_id: int,
                    version: str | int | None, action: str = "approve", force: bool = False,
                    reason: str = "") -> dict[str, Any]:
    """Dry run of :func:`promote_version`: what it would do, or the ValueError it would raise.
    Nothing is moved, written or sent (the CLI can refuse before starting a flow)."""
    from tasks.context import prepare

    settings, engine = prepare(settings)
    champion, challenger, plan = _current_and_plan(engine, site, site_id, version, action,
                                                   force, reason)
    return {"site": site.name, "model": site.model_name, "action": action,
            "version": plan["version"], "forced": bool(plan["forced"]), "champion": champion,
            "challenger": challenger, "blessing": plan["blessing"]}


# --- promote / reject / roll back -----------------------------------------------------------------
def promote_version(
    settings: Settings | None,
    site: Site,
    site_id: int,
    version: str | int | None,
    action: str = "approve",
    actor: str = "cli",
    reason: str = "",
    force: bool = False,
    *,
    deliver: bool = True,
) -> dict[str, Any]:
    """Approve, auto-promote, reject or roll back a version of ``emowatch-<site>``.

    ``version``: the version to approve/auto/reject (None: the current challenger); for
    rollback None means "the champion before the current one", or an earlier champion of the
    history to go back to. ``deliver``: send the outbox now (the flow delivers in its own task).
    Raises ValueError (a refusal the user can act on; the message lists the reasons).
    """
    from db import queries
    from db.models import ModelDeployment
    from db.session import session_scope
    from tasks import registry
    from tasks.context import prepare

    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    actor = (actor or "").strip()
    if not actor:
        raise ValueError("who does it? (--by NAME)")
    reason = (reason or "").strip()
    settings, engine = prepare(settings)
    name = site.model_name
    lock = f"promote:{site.name}"
    owner = _owner()
    if not queries.acquire_lock(engine, lock, owner, LOCK_TTL_S):
        with session_scope(engine) as s:
            holder = queries.lock_holder(s, lock)
        raise RuntimeError(f"another promotion of site {site.name} is running ({holder}); retry")
    try:
        champion, challenger, plan = _current_and_plan(engine, site, site_id, version, action,
                                                       force, reason)
        target = plan["version"]
        before = {registry.CHAMPION: champion, registry.CHALLENGER: challenger}
        moved = False
        try:
            with session_scope(engine) as s:
                s.add(ModelDeployment(
                    site_id=site_id, model_name=name, version=target,
                    previous_version=champion, action=action, actor=actor, reason=reason,
                    forced=bool(plan["forced"]), gates=plan["gates"]))
                s.flush()
                moved = True  # from here on, a failure restores the aliases
                _apply(name, action, target, champion, challenger, actor, reason, plan)
                new_stack = champion_stack(s, site_id, name)
        except BaseException:
            if moved:
                _restore_aliases(name, before)
            raise
    finally:
        queries.release_lock(engine, lock, owner)

    new_champion = registry.get_alias_version(name, registry.CHAMPION)
    new_challenger = registry.get_alias_version(name, registry.CHALLENGER)
    result: dict[str, Any] = {
        "site": site.name,
        "model": name,
        "action": action,
        "version": target,
        "actor": actor,
        "reason": reason,
        "forced": bool(plan["forced"]),
        "previous_champion": champion,
        "champion": new_champion,
        "challenger": new_challenger,
        "next_rollback": _rollback_target(new_stack, new_champion),
        "history_agrees": (new_stack[-1] if new_stack else None) == new_champion,
        "blessing": plan["blessing"],
    }
    subject, body = _message(site, result, plan)
    mail = _send(engine, settings, site, site_id, _KINDS[action], subject, body, deliver=deliver)
    result.update(mail)
    log.info("%s %s/%s by %s: champion %s -> %s", action, name, target, actor, champion,
             new_champion)
    return result


_KINDS = {"approve": "promoted", "auto": "promoted", "reject": "rejected", "rollback": "rollback"}


def _plan_promotion(site: Site, name: str, version: str, action: str, champion: str | None,
                    stack: Sequence[str], force: bool, reason: str) -> dict[str, Any]:
    info = _require_version(name, version)
    val = read_validation(info.tags)
    if action in ("approve", "auto") and version == champion:
        raise ValueError(f"{name}/{version} is already the champion")
    if action == "reject":
        if version == champion:
            raise ValueError(f"{name}/{version} is the champion: to replace it, roll back "
                             f"('emowatch rollback {site.name} --by NAME') or approve another "
                             "version")
        b = bless(action="reject", policy=site.policy, verdict=val["verdict"], gates=val["gates"])
        return {"version": version, "forced": False, "gates": val["gates"], "validation": val,
                "blessing": b.to_dict()}
    if action == "auto" and info.tags.get("emowatch.rejected_by"):
        raise ValueError(f"{name}/{version} was rejected by {info.tags['emowatch.rejected_by']}: "
                         "it is never promoted automatically")
    b = bless(action=action, policy=site.policy, verdict=val["verdict"], gates=val["gates"],
              audit=val["audit"], force=force, reason=reason)
    if not b.allowed:
        hint = ""
        if version in stack:
            hint = (f"; {name}/{version} was a champion before: to go back to it use "
                    f"'emowatch rollback {site.name} --by NAME'")
        raise ValueError(f"cannot {action} {name}/{version}: " + "; ".join(b.reasons) + hint)
    # ``forced``: the person overrode a failed gate or a missing verdict (not just "unverifiable").
    forced = bool(force and not b.blessed and (b.failed_gates or val["verdict"] is None))
    return {"version": version, "forced": forced, "gates": val["gates"], "validation": val,
            "blessing": b.to_dict()}


def _plan_rollback(name: str, version: str | None, champion: str | None,
                   stack: Sequence[str]) -> dict[str, Any]:
    default = _rollback_target(stack, champion)
    if version is None:
        if default is None:
            where = f"{name}/{champion}" if champion else f"{name} (no champion)"
            raise ValueError(f"nothing to roll back to: {where} is the oldest champion in the "
                             "history")
        target = default
    else:
        _require_version(name, version)
        earlier = list(stack if (stack and stack[-1] != champion) else stack[:-1])
        if version == champion:
            raise ValueError(f"{name}/{version} is already the champion")
        if version not in earlier:
            raise ValueError(f"{name}/{version} is not an earlier champion of this site "
                             f"(history: {', '.join(earlier) or 'none'}); approve it instead")
        target = version
    b = bless(action="rollback", policy="manual", verdict=None, gates=None)
    return {"version": target, "forced": False, "gates": {}, "validation": None,
            "blessing": b.to_dict()}


def _apply(name: str, action: str, target: str, champion: str | None, challenger: str | None,
           actor: str, reason: str, plan: Mapping[str, Any]) -> None:
    """The registry side of an action (aliases, then tags)."""
    from tasks import registry

    now = _now_iso()
    if action == "reject":
        if challenger == target:
            registry.delete_alias(name, registry.CHALLENGER)
        registry.set_version_tags(name, target, {
            "emowatch.rejected_by": actor, "emowatch.rejected_reason": reason,
            "emowatch.rejected_at": now})
        return
    registry.set_alias(name, registry.CHAMPION, target)
    if challenger == target:
        registry.delete_alias(name, registry.CHALLENGER)
    if action == "rollback":
        if champion is not None:
            registry.set_version_tags(name, champion, {
                "emowatch.rolled_back_by": actor, "emowatch.rolled_back_reason": reason,
                "emowatch.rolled_back_at": now, "emowatch.rolled_back_to": target})
        return
    registry.set_version_tags(name, target, {
        "emowatch.promoted_by": actor, "emowatch.promoted_reason": reason,
        "emowatch.promotion": action, "emowatch.forced": "true" if plan["forced"] else "false",
        "emowatch.promoted_at": now, "emowatch.previous_champion": champion or ""})


def _message(site: Site, r: Mapping[str, Any], plan: Mapping[str, Any]) -> tuple[str, str]:
    name, v, prev = r["model"], r["version"], r["previous_champion"]
    who = f"{r['actor']}" + (f" ({r['reason']})" if r["reason"] else "")
    undo = (f"A rollback would restore version {r['next_rollback']}: "
            f"emowatch rollback {site.name} --by NAME" if r["next_rollback"]
            else "There is no earlier champion in the history: a rollback is not possible.")
    val = plan.get("validation") or {}
    if r["action"] in ("approve", "auto"):
        how = "automatically (every gate passed)" if r["action"] == "auto" else f"by {who}"
        forced = ("\nFORCED: the approver overrode failed checks: "
                  + "; ".join(r["blessing"]["reasons"]) if r["forced"] else "")
        subject = f"[emowatch] {site.name}: version {v} is now the champion"
        body = (f"Site {site.name}: {name} version {v} was promoted to champion {how}.\n"
                f"Previous champion: {prev or 'none'}.\n"
                f"Validation verdict: {val.get('verdict') or 'none'}.{forced}\n\n"
                f"Gates:\n{gates_table(val.get('gates'))}\n{_audit_line(val.get('audit'))}\n\n"
                f"{undo}\n")
    elif r["action"] == "reject":
        subject = f"[emowatch] {site.name}: version {v} rejected"
        body = (f"Site {site.name}: {name} version {v} was rejected by {who}.\n"
                f"The champion stays version {r['champion'] or 'none'}; version {v} is kept in "
                f"the registry for the record.\n\n"
                f"Gates:\n{gates_table(val.get('gates'))}\n")
    else:
        subject = f"[emowatch] {site.name}: rolled back to version {v}"
        body = (f"Site {site.name}: the champion of {name} was rolled back from version "
                f"{prev or 'none'} to version {v} by {who}.\n{undo}\n")
    return subject, body


# --- approval requests -----------------------------------------------------------------------------
def request_approval(
    settings: Settings | None,
    site: Site,
    site_id: int,
    version: str | int,
    verdict: str,
    gates: Mapping[str, Mapping[str, Any]] | None,
    attachments: Sequence[str | Path] = (),
    *,
    audit: Mapping[str, Any] | None = None,
    deliver: bool = True,
) -> int | None:
    """Queue the "approval needed" e-mail for a challenger; returns the alert id (None when the
    site has no approvers or the outbox failed: logged, never raised)."""
    from tasks import registry
    from tasks.context import prepare

    settings, engine = prepare(settings)
    name, version = site.model_name, str(version)
    champion = registry.get_alias_version(name, registry.CHAMPION)
    b = bless(action="approve", policy=site.policy, verdict=verdict, gates=dict(gates or {}),
              audit=dict(audit) if audit else None)
    if b.allowed and b.blessed:
        outcome = "Every gate passed."
        approve = f"  emowatch approve {site.name} {version} --by NAME [--reason TEXT]"
    elif b.allowed:
        outcome = ("The checks could not decide without labels (unverifiable): approving means "
                   "taking responsibility for it.")
        approve = f"  emowatch approve {site.name} {version} --by NAME --reason TEXT"
    else:
        outcome = ("Some checks FAILED (" + ", ".join(b.failed_gates) + "). Approving anyway "
                   "needs --force and a reason.")
        approve = f"  emowatch approve {site.name} {version} --by NAME --force --reason TEXT"
    subject = f"[emowatch] {site.name}: approve challenger version {version}? (verdict {verdict})"
    body = (
        f"Site {site.name} drifted and was re-adapted without labels. The challenger is "
        f"{name} version {version}; the champion is version {champion or 'none'}.\n"
        f"Site policy: {site.policy}. Validation verdict: {verdict}.\n{outcome}\n\n"
        f"Gates:\n{gates_table(gates)}\n{_audit_line(audit)}\n\n"
        f"To promote it to champion:\n{approve}\n"
        f"To reject it (the champion stays):\n"
        f"  emowatch reject {site.name} {version} --by NAME --reason TEXT\n"
    )
    mail = _send(engine, settings, site, site_id, "approval", subject, body, attachments,
                 deliver=deliver)
    return mail["alert_id"]


# --- Prefect -----------------------------------------------------------------------------------------
@task(name="load-site", cache_policy=NO_CACHE)
def load_site_task(name: str) -> tuple[Site, int]:
    """The site from the sites file and its database id (:func:`tasks.context.load_site`)."""
    from tasks.context import load_site

    return load_site(name)


@task(name="promote-version", cache_policy=NO_CACHE)
def promote_version_task(site: Site, site_id: int, version: str | None, action: str = "approve",
                         actor: str = "prefect", reason: str = "", force: bool = False,
                         deliver: bool = False) -> dict[str, Any]:
    """:func:`promote_version` (no retries: a second approve of the same version is refused)."""
    return promote_version(None, site, site_id, version, action, actor, reason, force,
                           deliver=deliver)


@task(name="request-approval", cache_policy=NO_CACHE)
def request_approval_task(site: Site, site_id: int, version: str, verdict: str,
                          gates: dict[str, dict[str, Any]] | None,
                          attachments: Sequence[str] = (),
                          audit: dict[str, Any] | None = None,
                          deliver: bool = False) -> int | None:
    return request_approval(None, site, site_id, version, verdict, gates, attachments,
                            audit=audit, deliver=deliver)


__all__ = [
    "ACTIONS", "walk_history", "champion_stack", "consistency", "read_validation", "gates_table",
    "check_promotion", "promote_version", "request_approval", "load_site_task", "promote_version_task",
    "request_approval_task",
]
