"""``emowatch`` commands that run a site's model: ingest, train, predict, evaluate, monitor,
adapt, explain."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from deployments.cli_app import (
    JsonOpt,
    UsageError,
    run,
    runtime,
    settings_from_env,
    site_of,
)

commands = typer.Typer()


@commands.command()
def ingest(
    site: Annotated[str, typer.Argument(help="Site name from the sites file.")],
    as_json: JsonOpt = False,
) -> None:
    """Ingest the site's inbox: validate, de-duplicate, store, quarantine bad files."""

    def go() -> dict[str, Any]:
        settings, s = site_of(site)
        from flows.ingest import ingest_site

        return ingest_site(site=s.name, settings=settings)

    run(go, as_json)


@commands.command()
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
    estimator_specs: Annotated[int | None, typer.Option(
        min=0, max=1000, help="Random shifts in the label-free accuracy estimator's bank "
                              "(default 60, ~5 min with Lite0; 0: no estimator).")] = None,
    estimator: Annotated[str | None, typer.Option(
        help="Label-free accuracy estimator: meta-gbm (default; fits a shift bank at training) "
             "or twin (no bank: fits the site's camera at each check).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the source model on a labelled folder and register it as emowatch-source@champion
    (with its reference profile and its label-free accuracy estimator)."""

    def go() -> dict[str, Any]:
        if not data.is_dir():
            raise UsageError(f"--data {data}: not a folder")
        if backbone not in ("efficientnet-lite0", "tiny"):
            raise UsageError(f"--backbone {backbone!r}: choose efficientnet-lite0 or tiny")
        if split not in ("auto", "stratified", "subject"):
            raise UsageError(f"--split {split!r}: choose auto, stratified or subject")
        from models.catalog import ESTIMATORS

        if estimator is not None and estimator not in ESTIMATORS:
            raise UsageError(f"--estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)}")
        from flows.train import train_source

        return train_source(
            settings=settings_from_env(),
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
            estimator_specs=estimator_specs,
            estimator=estimator,
        )

    run(go, as_json)


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


@commands.command()
def predict(
    site: Annotated[str, typer.Argument()],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    version: Annotated[str | None, typer.Option(help="Model version; default: champion.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict emotions of images with the site's champion (or the source champion)."""

    def go() -> list[dict[str, Any]]:
        settings, s = site_of(site)
        from tasks.predict import predict_paths

        return predict_paths(runtime(settings), s.name, [str(p) for p in images], version=version)

    run(go, as_json)


@commands.command()
def evaluate(
    site: Annotated[str, typer.Argument()],
    data: Annotated[Path, typer.Option("--data", help="Labelled ImageFolder.")],
    version: Annotated[str | None, typer.Option()] = None,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy, macro-F1 and per-class recall of the site's model on a labelled folder."""

    def go() -> dict[str, Any]:
        settings, s = site_of(site)
        if not data.is_dir():
            raise UsageError(f"--data {data}: not a folder")
        from tasks.predict import evaluate_folder

        return evaluate_folder(runtime(settings), s.name, str(data), version=version)

    run(go, as_json)


@commands.command()
def monitor(
    site: Annotated[str, typer.Argument()],
    as_json: JsonOpt = False,
) -> None:
    """Ingest, featurize and test the site for drift against the training domain."""

    def go() -> dict[str, Any]:
        settings, s = site_of(site)
        from flows.monitor import monitor_site
        from flows.runner import configured

        return configured(monitor_site, settings)(site=s.name, settings=settings)

    run(go, as_json)


@commands.command()
def adapt(
    site: Annotated[str, typer.Argument()],
    method: Annotated[str | None, typer.Option(
        help="An adaptation method: mmd, coral, adabn, shot-im or tent (models.catalog.ADAPTERS; "
             "forces it alone), or 'portfolio' (models.adapt.portfolio). Default: the site's "
             "adapt.method.")] = None,
    train_backbone: Annotated[bool | None, typer.Option(
        "--train-backbone/--cached-top",
        help="mmd/coral: adapt every layer from the raw images (minutes) or only the cached top "
             "(seconds). Default: the site's adapt.train_backbone.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-adapt the site's champion to its recent images (no labels); register a challenger."""

    def go() -> dict[str, Any]:
        settings, s = site_of(site)
        from models.catalog import ADAPTERS

        if method and method != "portfolio" and method not in ADAPTERS:
            raise UsageError(f"--method {method!r}: choose portfolio or "
                             f"{', '.join(sorted(ADAPTERS))}")
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

    run(go, as_json)


@commands.command()
def explain(
    site: Annotated[str, typer.Argument()],
    image: Annotated[Path, typer.Argument()],
    output: Annotated[str, typer.Option(
        "-o", "--output", help="Overlay PNG to write (FILE.png), or a folder: DIR/<image>.png "
                               "(an existing folder, DIR/, or a name without suffix).")] = "map.png",
    version: Annotated[str | None, typer.Option()] = None,
    depth: Annotated[int, typer.Option(min=1, max=10)] = 6,
    as_json: JsonOpt = False,
) -> None:
    """Explain one prediction with DnCShap region attributions and write an overlay PNG."""

    def go() -> dict[str, Any]:
        settings, s = site_of(site)
        if not image.is_file():
            raise UsageError(f"{image}: no such file")
        from tasks.explain import explain_image

        return explain_image(runtime(settings), s.name, str(image), output, version=version,
                             depth=depth)

    run(go, as_json)
