"""``emowatch`` commands about the installation: init, site list, status, outbox, serve, demo."""

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
    """Images, quarantine, last drift decision, models and outbox per site."""

    def go() -> dict[str, Any]:
        from deployments.admin import site_status

        return site_status(runtime(), site)

    run(go, as_json)


@commands.command()
def outbox(
    send: Annotated[bool, typer.Option(help="Try to deliver pending e-mails now.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show the e-mail outbox (and deliver what is pending with --send)."""

    def go() -> dict[str, Any]:
        from deployments.admin import outbox_status

        return outbox_status(runtime(), send=send)

    run(go, as_json)


@commands.command()
def serve(
    dry_run: Annotated[bool, typer.Option(help="Print the deployments and exit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Serve one scheduled monitor deployment per site, the drift-triggered re-adaptation,
    and on-demand train/promote (needs a running `prefect server` for schedules)."""

    def go() -> dict[str, Any]:
        from deployments.serve import build_deployments, describe, serve_all

        settings = settings_from_env()
        from emowatch.sites import load_sites

        deps = build_deployments(load_sites(settings.sites_file))
        if dry_run:
            return describe(deps)
        serve_all(deps)
        return describe(deps)

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
