"""``emowatch doctor``: does what MLflow says agree with what emowatch recorded?

Per site: the champion alias against the recorded history (a crashed promotion, a move in the
MLflow UI), the challenger against its gate record (none, edited tags, rejected), the sha256
tags of the versions in use (versions registered before hashes were recorded load
unverified), and locks left by dead processes. ``repair`` fixes what has one safe fix and says
what a person must decide:

* champion alias off the history -> put back on the recorded champion (a ``restore`` row);
* no history yet -> the registry's champion is adopted and recorded (what the next run does);
* a version in use without sha256 tags -> its checkpoint is loaded the safe way (tensors and
  plain values only) and, if that works, the hashes of its files now are recorded;
* a lock whose holder is a dead process of this host, or expired -> removed;
* a challenger without a matching gate record -> nothing: approve it with --force --reason or
  reject it (the message says how).

Promotions run the first repair themselves before every move (``tasks.promote.actions``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.context import RunContext, Runtime
    from tasks.registry.client import Registry


def _champion(ctx: RunContext, repair: bool) -> tuple[list[str], list[str]]:
    from tasks.promote.history import consistency, reconcile

    state = consistency(ctx)
    if state["agree"]:
        return [], []
    name = ctx.site.model_name
    if state["history"] is None:
        problem = (f"{name}: no recorded champion history (MLflow's champion is "
                   f"{state['registry']}); the next run adopts it")
        if not repair:
            return [problem], []
        served = ctx.serving().model.version
        return [], [f"{name}: recorded {served} as the initial champion"]
    problem = (f"{name}: MLflow's champion alias is on {state['registry'] or 'no version'}, the "
               f"recorded champion is {state['history']}")
    if not repair:
        return [problem], []
    reconcile(ctx, repair=True)
    return [], [f"{name}: champion alias put back on {state['history']} (a 'restore' row)"]


def _challenger(ctx: RunContext, challenger: str | None) -> list[str]:
    from tasks.promote.gate_record import gate_record, read_validation, record_problems

    if challenger is None:
        return []
    info = ctx.registry.get_version(ctx.site.model_name, challenger)
    problems = record_problems(challenger, challenger, info, read_validation(info.tags),
                               gate_record(ctx, challenger))
    site = ctx.site.name
    return [f"{p}: approve it with 'emowatch approve {site} {challenger} --by NAME --force "
            f"--reason TEXT' or reject it ('emowatch reject {site} {challenger} --by NAME')"
            for p in problems]


def _hashes(reg: Registry, versions: list[tuple[str, str]], repair: bool
            ) -> tuple[list[str], list[str]]:
    from models.network import load_checkpoint
    from tasks.ingest.storage import file_sha256
    from tasks.registry.artifacts import CHECKPOINT_FILE, SHA_TAGS

    problems, repaired = [], []
    for name, v in versions:
        info = reg.get_version(name, v)
        missing = [f for f, tag in SHA_TAGS.items() if tag not in info.tags]
        if not missing:
            continue
        what = f"{name}/{v} records no sha256 of {', '.join(missing)} (registered before " \
               "emowatch recorded them: it loads unverified)"
        if not repair:
            problems.append(what + "; 'emowatch doctor --repair' records them")
            continue
        folder = reg.artifact_folder(name, v)
        try:
            load_checkpoint(folder / CHECKPOINT_FILE)  # tensors and plain values only
        except ValueError as e:
            problems.append(f"{name}/{v}: {e}; re-register it from a trusted copy")
            continue
        reg.set_version_tags(name, v, {SHA_TAGS[f]: file_sha256(folder / f) for f in missing})
        repaired.append(f"{name}/{v}: checkpoint loads safely; recorded the sha256 of "
                        f"{', '.join(missing)}")
    return problems, repaired


def _locks(rt: Runtime, repair: bool) -> tuple[list[str], list[str]]:
    from db import locks
    from db.models import utcnow
    from db.session import session_scope
    from emowatch.processes import owner_is_dead

    problems, repaired = [], []
    now = utcnow()
    with session_scope(rt.engine) as s:
        for name, owner, expires in locks.list_locks(s):
            why = ("its holder is a dead process" if owner_is_dead(owner)
                   else "expired" if expires <= now else None)
            if why is None:
                continue
            if repair and locks.drop_lock(s, name, owner):
                repaired.append(f"lock {name} of {owner} removed ({why})")
            else:
                problems.append(f"lock {name} of {owner}: {why} (taken over by the next run)")
    return problems, repaired


def doctor(rt: Runtime, site: str | None = None, repair: bool = False) -> dict[str, Any]:
    """Check (and with ``repair`` fix) every site or one; ``exit_code`` 1 when problems
    remain."""
    from db.migrate import current, head
    from emowatch.sites import get_site, load_sites
    from tasks.promote.history import consistency
    from tasks.registry.client import CHALLENGER, CHAMPION, SOURCE_MODEL

    sites = load_sites(rt.settings.sites_file)
    names = [get_site(sites, site).name] if site is not None else sorted(sites)
    reg = rt.registry
    report: dict[str, Any] = {}
    in_use: list[tuple[str, str]] = []
    src = reg.get_alias_version(SOURCE_MODEL, CHAMPION)
    if src is not None:
        in_use.append((SOURCE_MODEL, src))
    for name in names:
        ctx = rt.site_context(name, sites=sites)
        recorded = consistency(ctx)["history"]
        problems, repaired = _champion(ctx, repair)
        aliases = reg.aliases(ctx.site.model_name)
        problems += _challenger(ctx, aliases.get(CHALLENGER))
        used = {aliases.get(CHAMPION), aliases.get(CHALLENGER), recorded} - {None}
        versions = [(ctx.site.model_name, v) for v in sorted(used, key=int)]
        p, r = _hashes(reg, versions, repair)
        report[name] = {"ok": not (problems + p), "problems": problems + p,
                        "repaired": repaired + r, "champion": aliases.get(CHAMPION),
                        "challenger": aliases.get(CHALLENGER)}
    general, fixed = _hashes(reg, in_use, repair)
    lp, lr = _locks(rt, repair)
    general += lp
    fixed += lr
    at = current(rt.engine)
    if at != head():
        general.append(f"the database is at revision {at}, the code expects {head()}")
    ok = not general and all(r["ok"] for r in report.values())
    return {"ok": ok, "repair": repair, "sites": report, "problems": general, "repaired": fixed,
            "exit_code": 0 if ok else 1}


__all__ = ["doctor"]
