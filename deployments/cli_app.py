"""What every ``emowatch`` command shares: the JSON/exit-code contract and the settings.

Every command takes ``--json`` and then prints exactly one JSON document on stdout (logs go to
stderr). Exit codes: 0 success, 2 usage or configuration error, 1 failure. A command reads the
settings once, at its start (``Settings()``: the environment and ``.env``), and passes them on.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


class UsageError(Exception):
    """A bad argument or configuration: exit code 2."""


def config_errors() -> tuple[type[BaseException], ...]:
    from emowatch.sites import SitesFileError

    return (UsageError, SitesFileError, FileNotFoundError, NotADirectoryError)


def run(fn: Callable[[], dict[str, Any] | list[Any]], as_json: bool,
        render: Callable[[Any], str] | None = None) -> None:
    """Run ``fn``, print its result (``render`` for people, else :func:`human`), and exit with
    the contract's code: a result dict may carry a non-zero ``exit_code`` (the command ran but
    did not achieve what it was asked, e.g. mail left undelivered). Everything printed goes
    through :func:`emowatch.redact.redact_tree` / ``redact``: no password leaves in output."""
    from emowatch.redact import redact_tree

    try:
        result = fn()
    except typer.Exit:
        raise
    except config_errors() as e:
        fail(as_json, e, code=2)
    except ValueError as e:  # bad input data (clear message from models/ or tasks/)
        fail(as_json, e, code=2)
    except Exception as e:  # noqa: BLE001
        if os.environ.get("EMOWATCH_DEBUG"):
            traceback.print_exc()
        fail(as_json, e, code=1)
    result = redact_tree(result)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        sys.stdout.write((render or human)(result) + "\n")
    sys.stdout.flush()
    code = result.get("exit_code") if isinstance(result, dict) else None
    if isinstance(code, int) and code:
        raise typer.Exit(code)


def fail(as_json: bool, e: BaseException, code: int) -> None:
    from emowatch.prefect_env import explain_startup_timeout
    from emowatch.redact import redact

    msg = str(e) or e.__class__.__name__
    if isinstance(e, FileNotFoundError) and e.filename:
        msg = f"not found: {e.filename}"
    msg = redact(explain_startup_timeout(msg))
    typer.echo(f"emowatch: error: {msg}", err=True)
    if as_json:
        sys.stdout.write(json.dumps({"error": msg, "exit_code": code}) + "\n")
    raise typer.Exit(code)


def human(result: Any, indent: int = 0) -> str:
    pad = "  " * indent
    if isinstance(result, dict):
        lines = []
        for k, v in result.items():
            if isinstance(v, dict | list) and v:
                lines.append(f"{pad}{k}:")
                lines.append(human(v, indent + 1))
            else:
                lines.append(f"{pad}{k}: {v}")
        return "\n".join(lines)
    if isinstance(result, list):
        return "\n".join(
            (f"{pad}-\n{human(x, indent + 1)}" if isinstance(x, dict | list) else f"{pad}- {x}")
            for x in result
        )
    return f"{pad}{result}"


def settings_from_env():
    """The command's settings, read from the environment at its start."""
    from emowatch.settings import Settings

    settings = Settings()
    settings.register_secrets()  # what the command prints or logs never holds them
    return settings


def runtime(settings=None):
    """Settings, a migrated database and the registry (``tasks.context.Runtime``)."""
    from tasks.context import Runtime

    return Runtime.open(settings if settings is not None else settings_from_env())


def site_of(name: str):
    """(settings, site) -- the site from the sites file (SitesFileError with line/field on a
    bad file, or "unknown site ... (known: ...)"), checked before any flow starts."""
    from emowatch.sites import get_site, load_sites

    s = settings_from_env()
    return s, get_site(load_sites(s.sites_file), name)
