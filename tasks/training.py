"""Tasks of the train_source flow, and the source-data spec every model carries.

The spec (folder, classes, aliases, split rule, seed, fractions) is stored in each model's
config, so that re-adaptation can rebuild exactly the same train/validation/test split of the
training domain later, and so that no validation image ever leaks into training.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

if TYPE_CHECKING:
    from models.data import LabelledSet
    from tasks.context import Runtime

# Fractions of the labelled training domain held out: validation drives early stopping and is
# the "source accuracy kept" gate; test is never touched by training or gates (README figures).
VAL_FRAC = 0.15
TEST_FRAC = 0.15
# Held-out images in the reference profile: enough for the drift tests' reference sample (the
# MMD test's power is limited by the site's n, not by n_ref, beyond a few hundred).
PROFILE_MAX = 1000


@dataclass
class SourceSpec:
    data: str
    classes: list[str] | None = None
    aliases: dict[str, str] | None = None
    split: Literal["auto", "stratified", "subject"] = "auto"
    seed: int = 0
    val_frac: float = VAL_FRAC
    test_frac: float = TEST_FRAC
    resolved_classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class SourceSplits:
    data: LabelledSet
    train: list[int]
    val: list[int]
    test: list[int]

    def part(self, name: str) -> LabelledSet:
        return self.data.subset(getattr(self, name))


def load_source(spec: SourceSpec) -> SourceSplits:
    """Read the labelled folder and cut the seeded, leak-free train/val/test split."""
    from models import data as d

    root = Path(spec.data)
    if (root / "images").is_dir() and not any(
        p.is_file() for p in root.iterdir() if p.suffix.lower() in (".jpg", ".png")
    ) and (root / "ground_truth.txt").exists():
        root = root / "images"  # Emotion6 layout: <root>/images/<class>/...
    ls = d.read_image_folder(root, classes=spec.classes, aliases=spec.aliases)
    recs = ls.records
    if spec.split == "subject" and not d.has_groups(recs):
        raise ValueError(f"--split subject: no subject groups (S###_ file-name prefixes) in {root}")
    if spec.split == "stratified":
        rest, test = d.stratified_split(recs, spec.test_frac, spec.seed)
        sub = [recs[i] for i in rest]
        tr, va = d.stratified_split(sub, spec.val_frac / (1 - spec.test_frac), spec.seed + 1)
        train, val = [rest[i] for i in tr], [rest[i] for i in va]
    else:  # auto / subject: by group when images share one (CK+ subjects), else stratified
        train, val, test = d.three_way_split(recs, spec.val_frac, spec.test_frac, spec.seed)
    spec.resolved_classes = list(ls.classes)
    return SourceSplits(ls, train, val, test)


@task(name="load-source-data", cache_policy=NO_CACHE)
def load_source_task(spec: SourceSpec) -> SourceSplits:
    s = load_source(spec)
    get_run_logger().info(
        "source data %s: %d images, classes %s; split train %d / val %d / test %d",
        spec.data, len(s.data), s.data.class_counts(), len(s.train), len(s.val), len(s.test),
    )
    return s


@task(name="fit-source-model", cache_policy=NO_CACHE)
def fit(splits: SourceSplits, net_config: Any, train_config: Any) -> Any:
    from models.train import train_source

    return train_source(splits.part("train"), splits.data.classes, net_config, train_config,
                        val=splits.part("val"), progress=True)


@task(name="evaluate-test-split", cache_policy=NO_CACHE)
def evaluate_test(ckpt: Any, splits: SourceSplits) -> Any:
    from models.evaluate import evaluate

    test = splits.part("test")
    return evaluate(ckpt, test.records, test.labels, classes=splits.data.classes)


def build_profile(ckpt: Any, images: list[Any], seed: int) -> Any:
    """Reference profile = held-out features + softmax + image-quality statistics."""
    from models.images import load_rgb
    from models.profile import build_reference_profile, thumbnail_array, typical_indices
    from models.quality import batch_stats

    rng = np.random.default_rng(seed)
    paths = [r.path for r in images]
    if len(paths) > PROFILE_MAX:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), PROFILE_MAX, replace=False))]
    profile = build_reference_profile(ckpt, paths, max_n=PROFILE_MAX, seed=seed)
    profile.quality = batch_stats(load_rgb(p) for p in paths)
    typical = typical_indices(profile.features, THUMBNAILS)
    profile.thumbnails = np.stack([thumbnail_array(load_rgb(paths[i])) for i in typical])
    return profile


THUMBNAILS = 8  # typical training-domain images kept in the profile for the reports


@task(name="reference-profile", cache_policy=NO_CACHE)
def reference_profile(ckpt: Any, splits: SourceSplits, seed: int) -> Any:
    held_out = [splits.data.records[i] for i in splits.val + splits.test]
    return build_profile(ckpt, held_out, seed)


@task(name="register-source-model", retries=2, retry_delay_seconds=[2, 5], cache_policy=NO_CACHE)
def register(rt: Runtime, result: Any, test_metrics: Any, profile: Any, spec: SourceSpec,
             promote: bool | None) -> dict[str, Any]:
    """Log to MLflow and register a version of emowatch-source.

    The first version becomes ``champion``; later ones become ``challenger`` unless
    ``promote`` is true (a new source model changes every site that still follows it)."""
    from models.plots import confusion_matrix_figure, training_curves_figure
    from tasks.registry.client import CHALLENGER, CHAMPION, SOURCE_MODEL

    ckpt = result.checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        prof = tmp_p / "reference_profile.npz"
        profile.to_npz(prof)
        fig = confusion_matrix_figure(test_metrics.confusion, ckpt.classes)
        fig.savefig(tmp_p / "confusion_test.png", dpi=110, bbox_inches="tight")
        fig2 = training_curves_figure(result.history)
        fig2.savefig(tmp_p / "training_curves.png", dpi=110, bbox_inches="tight")
        first = rt.registry.get_alias_version(SOURCE_MODEL, CHAMPION) is None
        alias = CHAMPION if (first or promote) else CHALLENGER
        metrics = {
            "val_accuracy": result.val_metrics.accuracy,
            "val_macro_f1": result.val_metrics.macro_f1,
            "test_accuracy": test_metrics.accuracy,
            "test_macro_f1": test_metrics.macro_f1,
            "train_seconds": result.train_seconds,
            "cache_seconds": result.cache_seconds,
            "best_epoch": result.best_epoch,
        }
        est = profile.info.get("estimator") or {}
        if est:
            metrics.update({"estimator_seconds": est["seconds"],
                            "estimator_oof_drop_mae": est.get("oof_mae") or 0.0})
            if est.get("acc_ref") is not None:  # (the twin measures it at each check)
                metrics["estimator_acc_ref"] = est["acc_ref"]
        reg = rt.registry.log_and_register(
            ckpt,
            model_name=SOURCE_MODEL,
            reference_profile_path=prof,
            metrics=metrics,
            params={"net": ckpt.model.config.to_dict(), "train": ckpt.config.get("train", {}),
                    "source": spec.to_dict()},
            artifacts={"plots": tmp_p / "confusion_test.png", "curves": tmp_p / "training_curves.png"},
            tags={"emowatch.kind": "source", "emowatch.data": spec.data},
            alias=alias,
            run_name="train-source",
        )
    return {"model": reg.name, "version": reg.version, "alias": alias, "run_id": reg.run_id,
            **metrics}


def train_configs(backbone: str, img_size: int | None, epochs: int | None, seed: int,
                  n_classes: int, trainable_blocks: int | None = None,
                  crops: int | None = None) -> tuple[Any, Any]:
    from models.network import NetConfig
    from models.train import TrainConfig

    net = NetConfig(backbone=backbone, num_classes=n_classes)  # type: ignore[arg-type]
    if backbone == "tiny":
        net.img_size = 64
    if img_size:
        net.img_size = img_size
    if trainable_blocks is not None:
        net.trainable_blocks = trainable_blocks
    tc = TrainConfig(seed=seed)
    if backbone == "tiny":
        # Its "top" is the whole randomly initialised CNN: it must learn as fast as the head
        # (lr_top's small default protects PRE-TRAINED blocks).
        tc.lr_top = tc.lr_head
    if epochs:
        tc.epochs = epochs
    if crops is not None:
        tc.crops = crops
    return net, tc


def attach_config(result: Any, spec: SourceSpec, train_config: Any,
                  precision: str = "fp32") -> None:
    """Store what is needed to use and re-adapt the model inside its checkpoint (and the
    arithmetic every inference of this version uses: ``Checkpoint.precision``)."""
    result.checkpoint.config.update({
        "source": spec.to_dict(),
        "train": train_config.to_dict(),
        "inference": {"precision": precision},
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def estimator_config(specs: int | None, seed: int, method: str | None = None) -> Any:
    """The estimator's config for ``specs`` bank specs (None: the default 60; two thirds
    mostly mild, one third mostly strong); None when ``specs`` is 0 (no estimator).
    ``method``: a name of ``models.catalog.ESTIMATORS`` (None: the default); "twin" fits no
    bank (its specs are ignored)."""
    from models.estimate.fit import EstimatorConfig

    cfg = EstimatorConfig(seed=seed)
    if method is not None:
        cfg.method = method
        cfg.validate()
    if specs is None:
        return cfg
    if specs == 0:
        return None
    if specs < 2:
        raise ValueError(f"the estimator needs at least 2 bank specs (or 0: none), got {specs}")
    cfg.specs_mild = round(2 * specs / 3)
    cfg.specs_severe = specs - cfg.specs_mild
    return cfg


def keep_twin_images(splits: SourceSplits, profile: Any, max_images: int, seed: int
                     ) -> dict[str, Any] | None:
    """Keep up to ``max_images`` labelled held-out images in the profile for the site twin
    (``models.estimate.twin``), as their original files: the test split, which never picked the
    epoch; validation images join only when the test split has fewer than 16. None (nothing
    kept) when there are fewer than 8 or ``max_images`` is 0."""
    recs = splits.data.records
    held, split = [recs[i] for i in splits.test], "test"
    if len(held) < 16:
        held, split = held + [recs[i] for i in splits.val], "test+validation"
    if max_images <= 0 or len(held) < 8:
        return None
    if len(held) > max_images:
        rng = np.random.default_rng(seed)
        held = [held[i] for i in sorted(rng.choice(len(held), max_images, replace=False))]
    profile.set_twin_images([Path(r.path).read_bytes() for r in held], [r.label for r in held])
    return {"n": len(held), "split": split, "mb": round(profile.twin["bytes"].nbytes / 1e6, 2)}


@task(name="fit-accuracy-estimator", cache_policy=NO_CACHE)
def fit_accuracy_estimator(ckpt: Any, splits: SourceSplits, profile: Any, config: Any
                           ) -> dict[str, Any] | None:
    """Fit the label-free accuracy estimator on the held-out labelled images (validation and
    test) and store it in the reference profile (saved with the model). None: not fitted."""
    from models.catalog import load
    from models.estimate.fit import fit_estimator
    from models.images import load_rgb

    log = get_run_logger()
    if config is None:
        log.info("no accuracy estimator (estimator specs 0): checks report no estimate")
        return None
    twin_info = keep_twin_images(splits, profile, config.twin_images, config.seed)
    if twin_info is not None:
        log.info("site twin: %d labelled held-out images kept with the model (%s, %.1f MB)",
                 twin_info["n"], twin_info["split"], twin_info["mb"])
    if getattr(load("estimator", config.method), "needs_images", False):
        info = {"config": config.to_dict(), "twin": twin_info, "seconds": 0.0}
        profile.info["estimator"] = info
        if twin_info is None:
            log.warning("too few held-out images for the site twin: checks report no estimate")
        return info
    held = [splits.data.records[i] for i in splits.val + splits.test]
    if len(held) < 8:
        log.warning("only %d held-out images: no accuracy estimator fitted", len(held))
        return None
    rng = np.random.default_rng(config.seed)
    if len(held) > config.max_images:
        held = [held[i] for i in sorted(rng.choice(len(held), config.max_images, replace=False))]
    images = [np.asarray(load_rgb(r.path)) for r in held]
    n_specs = config.specs_mild + config.specs_severe
    log.info("fitting the accuracy estimator: %d held-out images x %d shifts (%s)",
             len(images), n_specs, ckpt.precision)
    est, info = fit_estimator(ckpt, images, [r.label for r in held], config, progress=True)
    profile.estimator = est.state()
    profile.info["estimator"] = {**info, "twin": twin_info}
    log.info("accuracy estimator %s fitted in %.0f s (bank %.0f s): held-out accuracy %.3f, "
             "out-of-fold drop error %.3f", info["config"]["method"], info["seconds"],
             info["bank_seconds"], info["acc_ref"], info["oof_mae"] or float("nan"))
    return info
