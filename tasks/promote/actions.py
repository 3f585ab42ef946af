"""Moving a site's ``champion`` alias: approve, auto-promote, reject, roll back.

    promote_version(ctx, version, action, actor, reason, force) -> dict
    request_approval(ctx, version, verdict, gates, attachments)  -> alert id

The rule (may this action happen?) is :func:`tasks.promote.blessing.bless`, fed with the version's gate
record: the ``adaptation_runs`` row of the run that registered it (verdict, gates, audit). The
champion moves without ``--force --reason`` only to the current challenger whose gate record
exists and matches its MLflow tags (``emowatch.verdict``, ``emowatch.gates``): a version that is
not the challenger, was rejected, has no record or edited tags needs a forced, recorded
approval, and ``auto`` refuses it. ``--by`` must name one of the site's approvers (when it lists
any) unless ``Settings.allow_any_approver``. This module does the moves and keeps two records
in step:

* the registry: aliases ``champion``/``challenger`` of ``emowatch-<site>`` and version tags
  (``emowatch.promoted_by`` ...), what serving and monitoring read;
* the database: ``model_deployments``, the append-only champion history with who and why
  (an undo stack: :mod:`tasks.promote.history`).

One promotion per site at a time (the ``promote:<site>`` lock). The alias is moved inside the
database transaction that writes the history row; if anything fails before the commit, the
aliases are put back, so the history and the registry agree afterwards
(:func:`tasks.promote.history.consistency`). E-mails go through the outbox *after* the commit: a mail
problem never undoes a promotion. Every result says which version a further rollback would
restore (``next_rollback``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from db.deployments import champion_stack
from emowatch.processes import owner as process_owner
from tasks.messages import approval_message, promotion_message
from tasks.promote.blessing import bless
from tasks.promote.gate_record import check_actor, gate_record, read_validation, record_problems
from tasks.promote.history import rollback_target

if TYPE_CHECKING:
    from tasks.context import RunContext

log = logging.getLogger(__name__)

ACTIONS = ("approve", "auto", "reject", "rollback")

# A promotion takes a few registry calls (seconds); 5 minutes is far above that, and a crashed
# promoter frees the site after it without anyone deleting rows by hand.
LOCK_TTL_S = 300.0
# E-mails stay under 500 KB (what relays accept without complaint): attachments beyond this
# total (before base64's 4/3) are named by path instead.
ATTACHMENT_BUDGET = 340_000
_KINDS = {"approve": "promoted", "auto": "promoted", "reject": "rejected", "rollback": "rollback"}


# --- helpers ------------------------------------------------------------------------------------------
def _require_version(ctx: RunContext, model_name: str, version: str) -> Any:
    from tasks.registry.client import RegistryError

    try:
        return ctx.registry.get_version(model_name, version)
    except RegistryError:
        known = [v.version for v in ctx.registry.list_versions(model_name)]
        raise ValueError(
            f"{model_name} has no version {version!r} "
            f"(versions: {', '.join(known) if known else 'none registered'})"
        ) from None


def send_to_approvers(ctx: RunContext, kind: str, subject: str, body: str,
                      attachments: Sequence[str | Path] = (), deliver: bool = True
                      ) -> dict[str, Any]:
    """Queue (and deliver) an e-mail to the site's approvers; never raises.

    Returns ``{"alert_id", "delivery", "mail_error"}``."""
    from db.session import session_scope
    from tasks import notify

    site = ctx.site
    out: dict[str, Any] = {"alert_id": None, "delivery": None, "mail_error": None}
    if not site.approvers:
        out["mail_error"] = f"site {site.name} has no approvers: no e-mail sent"
        log.warning(out["mail_error"])
        return out
    files = [Path(a) for a in attachments]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        body += "\n\nNot attached (missing): " + ", ".join(missing)
    files, too_big = within_budget([p for p in files if p.is_file()], ATTACHMENT_BUDGET)
    if too_big:
        body += "\n\nNot attached (the e-mail stays small), open them here: " + ", ".join(
            str(p.resolve()) for p in too_big)
    try:
        with session_scope(ctx.engine) as s:
            alert = notify.queue_email(s, site_id=ctx.site_id, kind=kind,
                                       recipients=site.approvers, subject=subject, body=body,
                                       attachments=files)
            out["alert_id"] = alert.id
        if deliver:
            out["delivery"] = asdict(notify.deliver_pending(ctx.engine, ctx.settings))
    except Exception as e:  # noqa: BLE001 -- the outbox must never undo a promotion
        out["mail_error"] = f"{type(e).__name__}: {e}"
        log.warning("e-mail %r for site %s not queued/delivered: %s", kind, site.name, e)
    return out


def within_budget(files: Sequence[Path], budget: int) -> tuple[list[Path], list[Path]]:
    """(attached, left out): files in order while their total size stays within ``budget``."""
    keep, out, total = [], [], 0
    for p in files:
        size = p.stat().st_size
        if total + size <= budget:
            keep.append(p)
            total += size
        else:
            out.append(p)
    return keep, out


def _restore_aliases(ctx: RunContext, model_name: str, before: Mapping[str, str | None]) -> None:
    """Best effort: put ``champion``/``challenger`` back where they were."""
    for alias, v in before.items():
        try:
            if v is None:
                ctx.registry.delete_alias(model_name, alias)
            else:
                ctx.registry.set_alias(model_name, alias, v)
        except Exception as e:  # noqa: BLE001
            log.error("could not restore %s@%s to %s: %s (fix by hand)", model_name, alias, v, e)


def _now_iso() -> str:
    from db.models import utcnow

    return utcnow().isoformat(timespec="seconds")


def _current_and_plan(ctx: RunContext, version: str | int | None, action: str, force: bool,
                      reason: str) -> tuple[str | None, str | None, dict[str, Any]]:
    """(champion, challenger, plan) now; raises ValueError when the action is refused."""
    from db.session import session_scope
    from tasks.registry.client import CHALLENGER, CHAMPION

    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    name = ctx.site.model_name
    champion = ctx.registry.get_alias_version(name, CHAMPION)
    challenger = ctx.registry.get_alias_version(name, CHALLENGER)
    with session_scope(ctx.engine) as s:
        stack = champion_stack(s, ctx.site_id, name)
    v = None if version is None else str(version).strip()
    if action == "rollback":
        return champion, challenger, _plan_rollback(ctx, v, champion, stack)
    if v is None:
        if challenger is None:
            raise ValueError(f"{name} has no challenger: name the version to {action}")
        v = challenger
    return champion, challenger, _plan_promotion(ctx, v, action, champion, challenger, stack,
                                                 force, (reason or "").strip())


def check_promotion(ctx: RunContext, version: str | int | None, action: str = "approve",
                    force: bool = False, reason: str = "", actor: str | None = None
                    ) -> dict[str, Any]:
    """Dry run of :func:`promote_version`: what it would do, or the ValueError it would raise.
    Nothing is moved, written or sent (the CLI can refuse before starting a flow); the result's
    ``champion`` is what the move must still find (``expected_champion``)."""
    if actor is not None:
        check_actor(ctx, action, actor)
    champion, challenger, plan = _current_and_plan(ctx, version, action, force, reason)
    return {"site": ctx.site.name, "model": ctx.site.model_name, "action": action,
            "version": plan["version"], "forced": bool(plan["forced"]), "champion": champion,
            "challenger": challenger, "blessing": plan["blessing"]}


# --- promote / reject / roll back -----------------------------------------------------------------
def promote_version(
    ctx: RunContext,
    version: str | int | None,
    action: str = "approve",
    actor: str = "cli",
    reason: str = "",
    force: bool = False,
    *,
    deliver: bool = True,
    expected_champion: str | None = None,
) -> dict[str, Any]:
    """Approve, auto-promote, reject or roll back a version of ``emowatch-<site>``.

    ``version``: the version to approve/auto/reject (None: the current challenger); for
    rollback None means "the champion before the current one", or an earlier champion of the
    history to go back to. ``deliver``: send the outbox now (the flow delivers in its own task).
    ``expected_champion``: refuse if the champion is no longer this version (someone else
    approved or rolled back since the caller looked). Raises ValueError (a refusal the user can
    act on; the message lists the reasons).
    """
    from db import deployments, locks
    from db.session import session_scope
    from tasks.registry.client import CHALLENGER, CHAMPION

    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    actor = (actor or "").strip()
    if not actor:
        raise ValueError("who does it? (--by NAME)")
    check_actor(ctx, action, actor)
    reason = (reason or "").strip()
    site, reg, engine = ctx.site, ctx.registry, ctx.engine
    name = site.model_name
    lock = f"promote:{site.name}"
    owner = process_owner()
    if not locks.acquire_lock(engine, lock, owner, LOCK_TTL_S):
        with session_scope(engine) as s:
            holder = locks.lock_holder(s, lock)
        raise RuntimeError(f"another promotion of site {site.name} is running ({holder}); retry")
    try:
        from tasks.promote.history import reconcile

        reconcile(ctx, repair=True)  # a crashed move left the alias off the history: put it back
        champion, challenger, plan = _current_and_plan(ctx, version, action, force, reason)
        if expected_champion is not None and champion != str(expected_champion):
            raise ValueError(
                f"the champion of {name} changed from {expected_champion} to {champion} since "
                "you looked (another approval or rollback): check 'emowatch status' and retry")
        target = plan["version"]
        before = {CHAMPION: champion, CHALLENGER: challenger}
        moved = False
        try:
            with session_scope(engine) as s:
                deployments.add_deployment(
                    s, site_id=ctx.site_id, model_name=name, version=target,
                    previous_version=champion, action=action, actor=actor, reason=reason,
                    forced=bool(plan["forced"]), gates=plan["gates"])
                moved = True  # from here on, a failure restores the aliases
                _apply(ctx, action, target, champion, challenger, actor, reason, plan)
                new_stack = champion_stack(s, ctx.site_id, name)
        except BaseException:
            if moved:
                _restore_aliases(ctx, name, before)
            raise
    finally:
        locks.release_lock(engine, lock, owner)

    new_champion = reg.get_alias_version(name, CHAMPION)
    new_challenger = reg.get_alias_version(name, CHALLENGER)
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
        "next_rollback": rollback_target(new_stack, new_champion),
        "history_agrees": (new_stack[-1] if new_stack else None) == new_champion,
        "blessing": plan["blessing"],
        "problems": list(plan.get("problems") or []),
    }
    from tasks.promote.descriptions import refresh_descriptions

    refresh_descriptions(ctx, [v for v in (target, champion) if v])
    subject, body = promotion_message(site, result, plan)
    result.update(send_to_approvers(ctx, _KINDS[action], subject, body, deliver=deliver))
    log.info("%s %s/%s by %s: champion %s -> %s", action, name, target, actor, champion,
             new_champion)
    return result


def _plan_promotion(ctx: RunContext, version: str, action: str, champion: str | None,
                    challenger: str | None, stack: Sequence[str], force: bool, reason: str
                    ) -> dict[str, Any]:
    site = ctx.site
    name = site.model_name
    info = _require_version(ctx, name, version)
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
    record = gate_record(ctx, version)
    problems = record_problems(version, challenger, info, val, record)
    # the blessing reads the database's record, never the (editable) tags
    checked = ({"verdict": record["verdict"], "gates": record["gates"], "audit": record["audit"]}
               if record is not None else {"verdict": None, "gates": {}, "audit": None})
    hint = ""
    if version in stack:
        hint = (f"; {name}/{version} was a champion before: to go back to it use "
                f"'emowatch rollback {site.name} --by NAME'")
    if problems and action == "auto":
        raise ValueError(f"cannot auto {name}/{version}: " + "; ".join(problems))
    if problems and not force:
        raise ValueError(f"cannot {action} {name}/{version}: " + "; ".join(problems)
                         + "; approving it anyway needs --force and --reason" + hint)
    if problems and not reason:
        raise ValueError(f"cannot {action} {name}/{version}: " + "; ".join(problems)
                         + "; --force needs a --reason")
    b = bless(action=action, policy=site.policy, verdict=checked["verdict"],
              gates=checked["gates"], audit=checked["audit"], force=force, reason=reason)
    if not b.allowed:
        raise ValueError(f"cannot {action} {name}/{version}: " + "; ".join(b.reasons) + hint)
    blessing = b.to_dict()
    blessing["reasons"] = problems + blessing["reasons"]
    # ``forced``: the person overrode a failed gate, a missing or mismatched record, a rejection
    # or a non-challenger (not just "unverifiable").
    forced = bool(force and (problems or (not b.blessed and (b.failed_gates
                                                              or checked["verdict"] is None))))
    return {"version": version, "forced": forced, "gates": checked["gates"],
            "validation": checked, "blessing": blessing, "problems": problems}


def _plan_rollback(ctx: RunContext, version: str | None, champion: str | None,
                   stack: Sequence[str]) -> dict[str, Any]:
    name = ctx.site.model_name
    default = rollback_target(stack, champion)
    if version is None:
        if default is None:
            where = f"{name}/{champion}" if champion else f"{name} (no champion)"
            raise ValueError(f"nothing to roll back to: {where} is the oldest champion in the "
                             "history")
        target = default
    else:
        _require_version(ctx, name, version)
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


def _apply(ctx: RunContext, action: str, target: str, champion: str | None,
           challenger: str | None, actor: str, reason: str, plan: Mapping[str, Any]) -> None:
    """The registry side of an action (aliases, then tags)."""
    from tasks.registry.client import CHALLENGER, CHAMPION

    reg, name = ctx.registry, ctx.site.model_name
    now = _now_iso()
    if action == "reject":
        if challenger == target:
            reg.delete_alias(name, CHALLENGER)
        reg.set_version_tags(name, target, {
            "emowatch.rejected_by": actor, "emowatch.rejected_reason": reason,
            "emowatch.rejected_at": now})
        return
    reg.set_alias(name, CHAMPION, target)
    if challenger == target:
        reg.delete_alias(name, CHALLENGER)
    if action == "rollback":
        if champion is not None:
            reg.set_version_tags(name, champion, {
                "emowatch.rolled_back_by": actor, "emowatch.rolled_back_reason": reason,
                "emowatch.rolled_back_at": now, "emowatch.rolled_back_to": target})
        return
    reg.set_version_tags(name, target, {
        "emowatch.promoted_by": actor, "emowatch.promoted_reason": reason,
        "emowatch.promotion": action, "emowatch.forced": "true" if plan["forced"] else "false",
        "emowatch.promoted_at": now, "emowatch.previous_champion": champion or ""})


# --- approval requests -----------------------------------------------------------------------------
def request_approval(
    ctx: RunContext,
    version: str | int,
    verdict: str,
    gates: Mapping[str, Mapping[str, Any]] | None,
    attachments: Sequence[str | Path] = (),
    *,
    audit: Mapping[str, Any] | None = None,
    deliver: bool = True,
    reasons: Sequence[str] = (),
    candidates: Sequence[Mapping[str, Any]] | None = None,
) -> int | None:
    """Queue the "approval needed" e-mail for a challenger; returns the alert id (None when the
    site has no approvers or the outbox failed: logged, never raised)."""
    from tasks.registry.client import CHAMPION

    site = ctx.site
    champion = ctx.registry.get_alias_version(site.model_name, CHAMPION)
    b = bless(action="approve", policy=site.policy, verdict=verdict, gates=dict(gates or {}),
              audit=dict(audit) if audit else None)
    subject, body = approval_message(site, str(version), champion, verdict, gates, audit, b,
                                     reasons=reasons, candidates=candidates)
    return send_to_approvers(ctx, "approval", subject, body, attachments,
                             deliver=deliver)["alert_id"]


# --- Prefect -----------------------------------------------------------------------------------------
@task(name="promote-version", cache_policy=NO_CACHE)
def promote_version_task(ctx: RunContext, version: str | None, action: str = "approve",
                         actor: str = "prefect", reason: str = "", force: bool = False,
                         deliver: bool = False, expected_champion: str | None = None
                         ) -> dict[str, Any]:
    """:func:`promote_version` (no retries: a second approve of the same version is refused)."""
    return promote_version(ctx, version, action, actor, reason, force, deliver=deliver,
                           expected_champion=expected_champion)


@task(name="request-approval", cache_policy=NO_CACHE)
def request_approval_task(ctx: RunContext, version: str, verdict: str,
                          gates: dict[str, dict[str, Any]] | None,
                          attachments: Sequence[str] = (),
                          audit: dict[str, Any] | None = None,
                          deliver: bool = False, reasons: Sequence[str] = (),
                          candidates: Sequence[dict[str, Any]] | None = None) -> int | None:
    return request_approval(ctx, version, verdict, gates, attachments, audit=audit,
                            deliver=deliver, reasons=list(reasons), candidates=candidates)


__all__ = [
    "ACTIONS", "ATTACHMENT_BUDGET", "check_promotion", "within_budget", "promote_version", "promote_version_task", "request_approval",
    "request_approval_task", "send_to_approvers",
]
