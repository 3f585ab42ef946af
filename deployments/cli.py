"""The ``emowatch`` command.

Every command takes ``--json`` and then prints exactly one JSON document on stdout (logs go
to stderr). Exit codes: 0 success, 2 usage or configuration error, 1 failure.
Commands are thin: they read the settings once (``Settings()``: the environment and ``.env``),
resolve the site, then run a Prefect flow or a plain function with them.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="emowatch",
    no_args_is_help=True,
    add_completion=False,
    help="Monitor, re-adapt, explain and promote image emotion models across deployment sites.",
)
site_app = typer.Typer(no_args_is_help=True, help="Inspect the sites file.")
app.add_typer(site_app, name="site")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


class UsageError(Exception):
    """A bad argument or configuration: exit code 2."""


def _config_errors() -> tuple[type[BaseException], ...]:
    from emowatch.sites import SitesFileError

    return (UsageError, SitesFileError, FileNotFoundError, NotADirectoryError)


def _run(fn: Callable[[], dict[str, Any] | list[Any]], as_json: bool,
         human: Callable[[Any], str] | None = None) -> None:
    """Run ``fn``, print its result, and exit with the contract's code."""
    try:
        result = fn()
    except typer.Exit:
        raise
    except _config_errors() as e:
        _fail(as_json, e, code=2)
    except ValueError as e:  # bad input data (clear message from models/ or tasks/)
        _fail(as_json, e, code=2)
    except Exception as e:  # noqa: BLE001
        if os.environ.get("EMOWATCH_DEBUG"):
            traceback.print_exc()
        _fail(as_json, e, code=1)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        sys.stdout.write((human(result) if human else _human(result)) + "\n")
    sys.stdout.flush()


def _fail(as_json: bool, e: BaseException, code: int) -> None:
    msg = str(e) or e.__class__.__name__
    if isinstance(e, FileNotFoundError) and e.filename:
        msg = f"not found: {e.filename}"
    typer.echo(f"emowatch: error: {msg}", err=True)
    if as_json:
        sys.stdout.write(json.dumps({"error": msg, "exit_code": code}) + "\n")
    raise typer.Exit(code)


def _human(result: Any, indent: int = 0) -> str:
    pad = "  " * indent
    if isinstance(result, dict):
        lines = []
        for k, v in result.items():
            if isinstance(v, dict | list) and v:
                lines.append(f"{pad}{k}:")
                lines.append(_human(v, indent + 1))
            else:
                lines.append(f"{pad}{k}: {v}")
        return "\n".join(lines)
    if isinstance(result, list):
        return "\n".join(
            (f"{pad}-\n{_human(x, indent + 1)}" if isinstance(x, dict | list) else f"{pad}- {x}")
            for x in result
        )
    return f"{pad}{result}"


def _settings():
    """The command's settings, read from the environment at its start."""
    from emowatch.settings import Settings

    return Settings()


def _runtime(settings=None):
    """Settings, a migrated database and the registry (``tasks.context.Runtime``)."""
    from tasks.context import Runtime

    return Runtime.open(settings if settings is not None else _settings())


def _site(name: str):
    """(settings, site) -- the site from the sites file (SitesFileError with line/field on a
    bad file, or "unknown site ... (known: ...)"), checked before any flow starts."""
    from emowatch.sites import get_site, load_sites

    s = _settings()
    return s, get_site(load_sites(s.sites_file), name)


# --------------------------------------------------------------------------- commands


@app.command()
def init(
    example: Annotated[bool, typer.Option(help="Write an example sites file if none exists.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Create the state folder and database (migrations), and sync the sites file."""

    def go() -> dict[str, Any]:
        from deployments.admin import init_project

        return init_project(_runtime(), write_example=example)

    _run(go, as_json)


@site_app.command("list")
def site_list(as_json: JsonOpt = False) -> None:
    """List the sites of the sites file with their schedule, policy and models."""

    def go() -> list[dict[str, Any]]:
        from deployments.admin import list_sites

        return list_sites(_runtime())

    def human(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return "no sites (edit the sites file)"
        head = f"{'site':<16} {'policy':<7} {'schedule':<14} {'champion':<9} inbox"
        return "\n".join([head] + [
            f"{r['name']:<16} {r['policy']:<7} {r['schedule']:<14} {str(r.get('champion') or '-'):<9} {r['inbox']}"
            for r in rows
        ])

    _run(go, as_json, human)


@app.command()
def status(
    site: Annotated[str | None, typer.Argument(help="One site; default: all.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Images, quarantine, last drift decision, models and outbox per site."""

    def go() -> dict[str, Any]:
        from deployments.admin import site_status

        return site_status(_runtime(), site)

    _run(go, as_json)


@app.command()
def ingest(
    site: Annotated[str, typer.Argument(help="Site name from the sites file.")],
    as_json: JsonOpt = False,
) -> None:
    """Ingest the site's inbox: validate, de-duplicate, store, quarantine bad files."""

    def go() -> dict[str, Any]:
        settings, s = _site(site)
        from flows.ingest import ingest_site

        return ingest_site(site=s.name, settings=settings)

    _run(go, as_json)


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="Labelled ImageFolder <root>/<class>/<image>.")],
    classes: Annotated[str | None, typer.Option(help="Comma-separated class subset, e.g. anger,joy.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, max=500)] = None,
    backbone: Annotated[str, typer.Option(help="efficientnet-lite0 or tiny.")] = "efficientnet-lite0",
    img_size: Annotated[int | None, typer.Option(min=32, max=640)] = None,
    aliases: Annotated[str | None, typer.Option(help="Class aliases, e.g. happy=joy,angry=anger.")] = None,
    split: Annotated[str, typer.Option(help="stratified or subject (CK+ S### prefixes).")] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    trainable_blocks: Annotated[int | None, typer.Option(min=0, max=16, help="Fine-tuned MBConv blocks (rest frozen, cached).")] = None,
    crops: Annotated[int | None, typer.Option(min=0, max=8, help="Cached random crops per image (augmentation).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the source model on a labelled folder and register it as emowatch-source@champion."""

    def go() -> dict[str, Any]:
        if not data.is_dir():
            raise UsageError(f"--data {data}: not a folder")
        if backbone not in ("efficientnet-lite0", "tiny"):
            raise UsageError(f"--backbone {backbone!r}: choose efficientnet-lite0 or tiny")
        if split not in ("auto", "stratified", "subject"):
            raise UsageError(f"--split {split!r}: choose auto, stratified or subject")
        from flows.train import train_source

        return train_source(
            settings=_settings(),
            data=str(data),
            classes=[c.strip() for c in classes.split(",") if c.strip()] if classes else None,
            aliases=_parse_aliases(aliases),
            epochs=epochs,
            backbone=backbone,
            img_size=img_size,
            split=split,
            seed=seed,
            trainable_blocks=trainable_blocks,
            crops=crops,
        )

    _run(go, as_json)


def _parse_aliases(s: str | None) -> dict[str, str] | None:
    if not s:
        return None
    out = {}
    for part in s.split(","):
        if "=" not in part:
            raise UsageError(f"--aliases {s!r}: expected name=alias pairs")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@app.command()
def predict(
    site: Annotated[str, typer.Argument()],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    version: Annotated[str | None, typer.Option(help="Model version; default: champion.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict emotions of images with the site's champion (or the source champion)."""

    def go() -> list[dict[str, Any]]:
        settings, s = _site(site)
        from tasks.predict import predict_paths

        return predict_paths(_runtime(settings), s.name, [str(p) for p in images], version=version)

    _run(go, as_json)


@app.command()
def evaluate(
    site: Annotated[str, typer.Argument()],
    data: Annotated[Path, typer.Option("--data", help="Labelled ImageFolder.")],
    version: Annotated[str | None, typer.Option()] = None,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy, macro-F1 and per-class recall of the site's model on a labelled folder."""

    def go() -> dict[str, Any]:
        settings, s = _site(site)
        if not data.is_dir():
            raise UsageError(f"--data {data}: not a folder")
        from tasks.predict import evaluate_folder

        return evaluate_folder(_runtime(settings), s.name, str(data), version=version)

    _run(go, as_json)


@app.command()
def monitor(
    site: Annotated[str, typer.Argument()],
    as_json: JsonOpt = False,
) -> None:
    """Ingest, featurize and test the site for drift against the training domain."""

    def go() -> dict[str, Any]:
        settings, s = _site(site)
        from flows.monitor import monitor_site
        from flows.runner import configured

        return configured(monitor_site, settings)(site=s.name, settings=settings)

    _run(go, as_json)


@app.command()
def adapt(
    site: Annotated[str, typer.Argument()],
    method: Annotated[str | None, typer.Option(
        help="An adaptation method: mmd, coral, adabn, shot-im or tent (models.catalog.ADAPTERS).")] = None,
    train_backbone: Annotated[bool | None, typer.Option(
        "--train-backbone/--cached-top",
        help="mmd/coral: adapt every layer from the raw images (minutes) or only the cached top "
             "(seconds). Default: the site's adapt.train_backbone.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-adapt the site's champion to its recent images (no labels); register a challenger."""

    def go() -> dict[str, Any]:
        settings, s = _site(site)
        from models.catalog import ADAPTERS

        if method and method not in ADAPTERS:
            raise UsageError(f"--method {method!r}: choose {', '.join(sorted(ADAPTERS))}")
        from flows.readapt import readapt_site
        from tasks.readapt import resolve_method

        m = resolve_method(s, method)  # a bad method for this site fails here, before Prefect starts
        from tasks.readapt import needs_source

        if train_backbone and not needs_source(m):
            users = ", ".join(n for n in sorted(ADAPTERS) if needs_source(n))
            raise UsageError(f"--train-backbone applies to the methods that use the training "
                             f"data ({users}), not {m!r}")
        return readapt_site(site=s.name, method=method, train_backbone=train_backbone,
                            settings=settings)

    _run(go, as_json)


@app.command()
def explain(
    site: Annotated[str, typer.Argument()],
    image: Annotated[Path, typer.Argument()],
    output: Annotated[Path, typer.Option("-o", "--output", help="Overlay PNG to write.")] = Path("map.png"),
    version: Annotated[str | None, typer.Option()] = None,
    depth: Annotated[int, typer.Option(min=1, max=10)] = 6,
    as_json: JsonOpt = False,
) -> None:
    """Explain one prediction with DnCShap region attributions and write an overlay PNG."""

    def go() -> dict[str, Any]:
        settings, s = _site(site)
        if not image.is_file():
            raise UsageError(f"{image}: no such file")
        from tasks.explain import explain_image

        return explain_image(_runtime(settings), s.name, str(image), str(output), version=version,
                             depth=depth)

    _run(go, as_json)


@app.command()
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

    _run(go, as_json)


def _promote(site: str, version: str | None, action: str, by: str, reason: str,
             force: bool) -> dict[str, Any]:
    settings, s = _site(site)
    if force and not reason.strip():
        raise UsageError("--force needs --reason")
    if not by.strip():
        raise UsageError("--by must name who acts")
    from tasks.promote import check_promotion

    ctx = _runtime(settings).site_context(s.name)
    # Refusals (failed gates without --force, unknown version, ...) are answered at once,
    # without starting Prefect; the flow then does the move.
    check_promotion(ctx, version, action, force, reason)
    from flows.promote import promote

    return promote(site=s.name, version=version, action=action, actor=by, reason=reason,
                   force=force, settings=settings)


@app.command()
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

    _run(go, as_json)


@app.command()
def rollback(
    site: Annotated[str, typer.Argument()],
    by: Annotated[str, typer.Option("--by")] = "cli",
    reason: Annotated[str, typer.Option()] = "",
    as_json: JsonOpt = False,
) -> None:
    """Move the champion alias back to the previous champion."""

    def go() -> dict[str, Any]:
        return _promote(site, None, "rollback", by, reason, False)

    _run(go, as_json)


@app.command()
def outbox(
    send: Annotated[bool, typer.Option(help="Try to deliver pending e-mails now.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show the e-mail outbox (and deliver what is pending with --send)."""

    def go() -> dict[str, Any]:
        from deployments.admin import outbox_status

        return outbox_status(_runtime(), send=send)

    _run(go, as_json)


@app.command()
def serve(
    dry_run: Annotated[bool, typer.Option(help="Print the deployments and exit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Serve one scheduled monitor deployment per site, the drift-triggered re-adaptation,
    and on-demand train/promote (needs a running `prefect server` for schedules)."""

    def go() -> dict[str, Any]:
        from deployments.serve import build_deployments, describe, serve_all

        settings = _settings()
        from emowatch.sites import load_sites

        deps = build_deployments(load_sites(settings.sites_file))
        if dry_run:
            return describe(deps)
        serve_all(deps)
        return describe(deps)

    _run(go, as_json)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo's sites and inboxes go.")] = Path(".emowatch/demo"),
    fast: Annotated[bool, typer.Option(help="Tiny backbone and generated data (a minute).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The whole loop end to end on embedded defaults: train, 3 sites, monitor, re-adapt,
    explain, register challengers, promote, and a summary table."""

    def go() -> dict[str, Any]:
        from flows.demo import demo as demo_flow

        return demo_flow(workdir=str(workdir), fast=fast, settings=_settings())

    def human(r: dict[str, Any]) -> str:
        return r.get("summary_text") or _human(r)

    _run(go, as_json, human)


def main() -> None:
    # Prefect's ephemeral server sends telemetry by default; keep runs quiet and local.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    app()


if __name__ == "__main__":
    main()
