"""``emowatch`` commands that move a site's champion: approve, reject, rollback."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from deployments.cli_app import (
    JsonOpt,
    UsageError,
    run,
    runtime,
    site_of,
)

commands = typer.Typer()


@commands.command()
def approve(
    site: Annotated[str, typer.Argument()],
    version: Annotated[str, typer.Argument()],
    by: Annotated[str, typer.Option("--by", help="Who approves.")],
    reason: Annotated[str, typer.Option(help="Why.")] = "",
    force: Annotated[bool, typer.Option(help="Approve although a gate failed (needs --reason).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Promote a challenger version to champion (recorded with who and why)."""

    def go() -> dict[str, Any]:
        return _promote(site, version, "approve", by, reason, force)

    run(go, as_json)


def _promote(site: str, version: str | None, action: str, by: str, reason: str,
             force: bool) -> dict[str, Any]:
    settings, s = site_of(site)
    if force and not reason.strip():
        raise UsageError("--force needs --reason")
    if not by.strip():
        raise UsageError("--by must name who acts")
    from tasks.promote.actions import check_promotion

    ctx = runtime(settings).site_context(s.name)
    # Refusals (failed gates without --force, unknown version, an unlisted --by, ...) are
    # answered at once, without starting Prefect; the flow then does the move, and only if the
    # champion is still the one seen here (no approval or rollback in between).
    seen = check_promotion(ctx, version, action, force, reason, actor=by.strip())
    from flows.promote import promote

    return promote(site=s.name, version=version, action=action, actor=by, reason=reason,
                   force=force, settings=settings, expected_champion=seen["champion"])


@commands.command()
def reject(
    site: Annotated[str, typer.Argument()],
    version: Annotated[str, typer.Argument()],
    by: Annotated[str, typer.Option("--by")],
    reason: Annotated[str, typer.Option()] = "",
    as_json: JsonOpt = False,
) -> None:
    """Reject a challenger (the alias is removed; the version stays for the record)."""

    def go() -> dict[str, Any]:
        return _promote(site, version, "reject", by, reason, False)

    run(go, as_json)


@commands.command()
def rollback(
    site: Annotated[str, typer.Argument()],
    by: Annotated[str, typer.Option("--by")] = "cli",
    reason: Annotated[str, typer.Option()] = "",
    as_json: JsonOpt = False,
) -> None:
    """Move the champion alias back to the previous champion."""

    def go() -> dict[str, Any]:
        return _promote(site, None, "rollback", by, reason, False)

    run(go, as_json)
