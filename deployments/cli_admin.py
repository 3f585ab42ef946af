"""``emowatch`` commands about the installation: init, site list, status, outbox, doctor, serve,
demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from deployments.cli_app import (
    JsonOpt,
    run,
    runtime,
    settings_from_env,
)

commands = typer.Typer()
site_commands = typer.Typer(no_args_is_help=True, help="Inspect the sites file.")


@commands.command()
def init(
    example: Annotated[bool, typer.Option(help="Write an example sites file if none exists.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Create the state folder and database (migrations), and sync the sites file."""

    def go() -> dict[str, Any]:
        from deployments.admin import init_project

        return init_project(runtime(), write_example=example)

    run(go, as_json)


@site_commands.command("list")
def site_list(as_json: JsonOpt = False) -> None:
    """List the sites of the sites file with their schedule, policy and models."""

    def go() -> list[dict[str, Any]]:
        from deployments.admin import list_sites

        return list_sites(runtime())

    def human(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return "no sites (edit the sites file)"
        head = f"{'site':<16} {'policy':<7} {'schedule':<14} {'champion':<9} inbox"
        return "\n".join([head] + [
            f"{r['name']:<16} {r['policy']:<7} {r['schedule']:<14} {str(r.get('champion') or '-'):<9} {r['inbox']}"
            for r in rows
        ])

    run(go, as_json, human)


@commands.command()
def status(
    site: Annotated[str | None, typer.Argument(help="One site; default: all.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Images, quarantine, last drift decision with its impact and estimated accuracy,
    models and outbox per site."""

    def go() -> dict[str, Any]:
        from deployments.admin import site_status

        return site_status(runtime(), site)

    def render(r: dict[str, Any]) -> str:
        def acc(e: dict[str, Any] | None) -> str:
            if not e or e.get("accuracy") is None:
                return "-"
            flag = "" if e.get("verifiable") else " (unverifiable)"
            return (f"~{e['accuracy']:.2f} [{e['low']:.2f}, {e['high']:.2f}] was "
                    f"{e['source_accuracy']:.2f}{flag}")

        head = (f"{'site':<16} {'images':>6} {'quar.':>5} {'last check':<12} {'impact':<9} "
                f"{'estimated accuracy':<34} {'champion':<8} {'challenger':<10}")
        lines = [head]
        for name, e in r["sites"].items():
            check = e.get("last_drift_check") or {}
            lines.append(
                f"{name:<16} {e['images']:>6} {e['quarantined']:>5} "
                f"{check.get('decision') or '-':<12} {e.get('impact') or '-':<9} "
                f"{acc(e.get('estimated_accuracy')):<34} {str(e.get('champion') or '-'):<8} "
                f"{str(e.get('challenger') or '-'):<10}")
            if e.get("registry_error"):
                lines.append(f"  registry: {e['registry_error']}")
            if not e.get("history_agrees", True):
                lines.append("  MLflow's champion differs from the recorded history: "
                             f"emowatch doctor {name}")
        lines.append(f"outbox: {r['outbox'] or 'empty'}; database {r['database']}")
        if r.get("note"):
            lines.append(r["note"])
        return "\n".join(lines)

    run(go, as_json, render)


@commands.command()
def outbox(
    alert_id: Annotated[int | None, typer.Argument(
        help="With --requeue: the alert to send again.", show_default=False)] = None,
    send: Annotated[bool, typer.Option(help="Try to deliver the due e-mails now; exit 1 when "
                                            "something is left undelivered.")] = False,
    requeue: Annotated[bool, typer.Option(
        "--requeue", help="Make an alert (ALERT_ID) or, with --failed, every failed and "
                          "undelivered alert due again now, with a fresh retry window.")] = False,
    failed: Annotated[bool, typer.Option(
        "--failed", help="With --requeue: every failed and undelivered alert.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show the e-mail outbox; --requeue ID|--failed puts alerts back, --send delivers.

    Failed alerts are retried with backoff (1 minute doubling to 30) for
    EMOWATCH_ALERT_RETRY_HOURS after their first failure, then they are "undelivered" until
    requeued. Exit codes: 0, 1 when --send left alerts undelivered, 2 on bad arguments."""

    def go() -> dict[str, Any]:
        from deployments.admin import outbox_status
        from deployments.cli_app import UsageError

        if requeue and (alert_id is None) == (not failed):
            raise UsageError("--requeue needs one alert id or --failed (not both)")
        if not requeue and (failed or alert_id is not None):
            raise UsageError("an alert id and --failed go with --requeue")
        return outbox_status(runtime(), send=send,
                             requeue=(alert_id if alert_id is not None else "failed")
                             if requeue else None)

    run(go, as_json)


@commands.command()
def doctor(
    site: Annotated[str | None, typer.Argument(help="One site (default: every site).",
                                               show_default=False)] = None,
    repair: Annotated[bool, typer.Option(help="Fix what has one safe fix (see the list).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check that MLflow agrees with emowatch's records, per site: the champion alias against
    the recorded history, the challenger against its gate record, the sha256 tags of the
    versions in use, locks left by dead processes.

    --repair puts a champion alias moved outside emowatch back (a 'restore' row), records a
    site's first champion, records the hashes of versions registered before hashes were kept
    (after checking their checkpoint loads safely) and removes dead locks. A challenger whose
    record does not match is left for a person (approve --force --reason, or reject).
    Exit codes: 0 healthy, 1 problems remain, 2 bad arguments."""

    def go() -> dict[str, Any]:
        from deployments.doctor import doctor as check

        return check(runtime(), site, repair=repair)

    def render(r: dict[str, Any]) -> str:
        lines = []
        for name, e in r["sites"].items():
            lines.append(f"{name}: {'ok' if e['ok'] else 'PROBLEMS'} (champion "
                         f"{e['champion'] or '-'}, challenger {e['challenger'] or '-'})")
            lines += [f"  - {p}" for p in e["problems"]]
            lines += [f"  + {p}" for p in e["repaired"]]
        lines += [f"- {p}" for p in r["problems"]] + [f"+ {p}" for p in r["repaired"]]
        lines.append("healthy" if r["ok"] else "problems remain" + (
            "" if r["repair"] else " (emowatch doctor --repair fixes those it can)"))
        return "\n".join(lines)

    run(go, as_json, render)


@commands.command()
def report(as_json: JsonOpt = False) -> None:
    """Write the status page, $EMOWATCH_HOME/reports/index.html: one row per site (champion,
    last check with its impact and estimated accuracy, images, what waits for approval and
    why, e-mails pending) and per site the p-value and estimated accuracy over time, linking
    each check's report (every monitor run rewrites it too). Open it in a browser."""

    def go() -> dict[str, Any]:
        from tasks.reports.pages import write_status_page

        path = write_status_page(runtime())
        return {"status_page": str(path.resolve()), "bytes": path.stat().st_size}

    run(go, as_json, lambda r: f"status page: {r['status_page']}")


@commands.command()
def sync(
    site: Annotated[str | None, typer.Argument(help="One site (default: every site).",
                                               show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply the decisions approvers made in the MLflow UI: a version tagged
    emowatch.decision=approve|reject with emowatch.decision_by (a listed approver) and
    emowatch.decision_reason is approved or rejected exactly as 'emowatch approve/reject' does;
    a champion alias moved without such a tag, or onto a version the rules refuse, is put back
    on the recorded champion, recorded and e-mailed. The monitor and promote flows and
    'emowatch serve' (every 2 minutes) run it too. Exit codes: 0 nothing refused, 1 a decision
    was refused or a site failed, 2 bad arguments."""

    def go() -> dict[str, Any]:
        from tasks.promote.sync import sync_sites

        return sync_sites(runtime(), site)

    def render(r: dict[str, Any]) -> str:
        lines = []
        for name, e in r["sites"].items():
            if "error" in e:
                lines.append(f"{name}: FAILED {e['error']}")
                continue
            lines.append(f"{name}: champion {e['champion'] or '-'}")
            lines += [f"  applied: {a['action']} version {a['version']} by {a['by']}"
                      for a in e["applied"]]
            lines += [f"  REFUSED ({x['decision']} {x['version']}): {x['reason']}"
                      for x in e["refused"]]
        return "\n".join(lines)

    run(go, as_json, render)


@commands.command()
def serve(
    dry_run: Annotated[bool, typer.Option(help="Print the deployments and exit.")] = False,
    limit: Annotated[int | None, typer.Option(
        min=1, max=1000, help="Most flow runs at once (each is a process of ~0.5 GB; default "
        "EMOWATCH_SERVE_LIMIT). Runs beyond it wait their turn.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve the sites' scheduled checks (by default in one warm worker process that keeps
    models and libraries loaded, deployments.worker; EMOWATCH_CHECK_WORKER=deployments: one
    scheduled deployment run per check), one monitor deployment per site for "check now",
    the drift-triggered re-adaptation, the registry sync and on-demand train/promote (needs
    a running `prefect server` for schedules)."""

    def go() -> dict[str, Any]:
        from deployments.serve import build_deployments, describe, serve_all, worker_command

        settings = settings_from_env()
        from emowatch.sites import load_sites

        sites = load_sites(settings.sites_file)
        warm = settings.check_worker == "warm"
        deps = build_deployments(sites, scheduled_checks=not warm)
        if dry_run:
            return {**describe(deps, sites, warm), "limit": limit or settings.serve_limit}
        serve_all(deps, limit or settings.serve_limit, worker_command() if warm else None)
        return describe(deps, sites, warm)

    run(go, as_json)


@commands.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo's sites and inboxes go.")] = Path(".emowatch/demo"),
    fast: Annotated[bool, typer.Option(help="Tiny backbone and generated data (a minute).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The whole loop end to end on embedded defaults: train, 3 sites, monitor, re-adapt,
    explain, register challengers, promote, and a summary table."""

    def go() -> dict[str, Any]:
        from flows.demo import demo as demo_flow

        return demo_flow(workdir=str(workdir), fast=fast, settings=settings_from_env())

    def human(r: dict[str, Any]) -> str:
        return r.get("summary_text") or human(r)

    run(go, as_json, human)
