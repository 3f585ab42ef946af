"""``train_source``: labelled training domain -> model + reference profile -> MLflow registry."""

from __future__ import annotations

from typing import Any

from prefect import flow

from emowatch.settings import Settings
from flows.runner import default_runner, open_runtime
from tasks import training as t


@flow(name="train_source", task_runner=default_runner(), log_prints=True)
def train_source(
    data: str,
    classes: list[str] | None = None,
    aliases: dict[str, str] | None = None,
    epochs: int | None = None,
    backbone: str = "efficientnet-lite0",
    img_size: int | None = None,
    split: str = "auto",
    seed: int = 0,
    promote: bool | None = None,
    trainable_blocks: int | None = None,
    crops: int | None = None,
    estimator_specs: int | None = None,
    settings: Settings | None = None,
    estimator: str | None = None,
) -> dict[str, Any]:
    """Train on ``<data>/<class>/<image>`` and register ``emowatch-source`` (the first version
    becomes champion). Returns ``{model, version, val_accuracy, classes, estimator, ...}``.
    ``estimator_specs``: shifts in the accuracy estimator's bank (None: 60; 0: none).
    ``estimator``: the accuracy estimator (``models.catalog.ESTIMATORS``; None: the default);
    "twin" fits no bank at training, it fits the site's camera at each check."""
    from emowatch.hardware import resolve_precision

    rt = open_runtime(settings)
    spec = t.SourceSpec(data=data, classes=classes, aliases=aliases, split=split, seed=seed)  # type: ignore[arg-type]
    splits = t.load_source_task(spec)
    net_cfg, train_cfg = t.train_configs(backbone, img_size, epochs, seed, len(splits.data.classes),
                                         trainable_blocks, crops)
    est_cfg = t.estimator_config(estimator_specs, seed, estimator)  # a bad value fails before training
    result = t.fit(splits, net_cfg, train_cfg)
    t.attach_config(result, spec, train_cfg, resolve_precision(rt.settings.inference_precision))
    if est_cfg is not None:
        result.checkpoint.config["estimator"] = est_cfg.to_dict()
    test_metrics = t.evaluate_test(result.checkpoint, splits)
    profile = t.reference_profile(result.checkpoint, splits, seed)
    estimator = t.fit_accuracy_estimator(result.checkpoint, splits, profile, est_cfg)
    reg = t.register(rt, result, test_metrics, profile, spec, promote)
    return {
        **reg,
        "classes": list(result.checkpoint.classes),
        "n_train": result.n_train,
        "n_val": result.n_val,
        "n_test": test_metrics.n,
        "per_class_test": test_metrics.per_class,
        "precision": result.checkpoint.precision,
        "estimator": estimator,
    }
