"""The ``emowatch`` command.

Every command takes ``--json`` and then prints exactly one JSON document on stdout (logs go
to stderr). Exit codes: 0 success, 2 usage or configuration error, 1 failure.
Commands are thin: they read the settings once (``Settings()``: the environment and ``.env``),
resolve the site, then run a Prefect flow or a plain function with them.
"""

from __future__ import annotations

import typer

from deployments import cli_admin, cli_models, cli_promote

app = typer.Typer(
    name="emowatch",
    no_args_is_help=True,
    add_completion=False,
    help="Monitor, re-adapt, explain and promote image emotion models across deployment sites.",
)
for _module in (cli_admin, cli_models, cli_promote):
    app.registered_commands.extend(_module.commands.registered_commands)
app.add_typer(cli_admin.site_commands, name="site")


def main() -> None:
    # Before anything imports Prefect: its temporary server's start-up allowance, no telemetry.
    from emowatch.prefect_env import apply_defaults

    apply_defaults()
    app()


if __name__ == "__main__":
    main()
