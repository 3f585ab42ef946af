"""Fitting an accuracy estimator for one model version (at training time).

The labelled held-out images are passed through the model clean and under every spec of a
seeded random shift bank (``models.sim.shifts``): per spec, the images' quality statistics,
features and softmax outputs, paired image by image with the clean set. Those become the
meta-sets (``models.estimate.bank``) the estimator is fitted on.

Cost: specs x images x (transform + statistics + one forward pass), about 15 ms per image in
bf16 on 2 cores with Lite0 at 224 px; 60 specs x 330 images ~ 5 minutes. Pure: images come
in as arrays, the fitted estimator goes out as an object (``state()`` for saving).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.catalog import DEFAULT_ESTIMATOR
from models.estimate.describe import STAT_SCALE, Batch
from models.progress import Progress, progress_fn


@dataclass
class EstimatorConfig:
    """How a model version's estimator is fitted (stored in the model's config)."""

    method: str = DEFAULT_ESTIMATOR  # a name of models.catalog.ESTIMATORS
    specs_mild: int = 40  # bank specs with mostly mild severities (6% identity)
    specs_severe: int = 20  # bank specs with mostly strong severities
    max_images: int = 330  # labelled held-out images used (seeded subsample above)
    twin_images: int = 240  # held-out images kept for the site twin (0: none)
    interval: str = "knn"  # drop interval: "knn" (local conformal) or "bins" (Mondrian)
    seed: int = 0
    spec_seed: int = 20240611

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> EstimatorConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    def validate(self) -> None:
        from models.catalog import ESTIMATORS

        if self.method not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.method!r}; known: {', '.join(ESTIMATORS)}")
        if self.specs_mild < 0 or self.specs_severe < 0 or self.specs_mild + self.specs_severe < 2:
            raise ValueError("the shift bank needs at least 2 specs")
        if self.max_images < 8:
            raise ValueError(f"max_images must be >= 8, got {self.max_images}")


def stats_matrix(images: Sequence[np.ndarray]) -> np.ndarray:
    """(n, len(STAT_SCALE)) quality statistics of uint8 images, in STAT_SCALE order."""
    from models.quality import image_stats

    rows = [image_stats(a) for a in images]
    return np.array([[r[k] for k in STAT_SCALE] for r in rows], dtype=np.float64)


def shifted_batches(ckpt: Any, images: Sequence[np.ndarray], specs: Sequence[Any],
                    seed: int = 0, progress: Progress | bool | None = None,
                    ) -> tuple[Batch, list[Batch]]:
    """(clean batch, one batch per spec) of ``images`` under the model (its own precision)."""
    from models.evaluate import extract_features
    from models.sim.shifts import apply_spec

    report = progress_fn(progress)

    def run(arrs: Sequence[np.ndarray]) -> Batch:
        z, p = extract_features(ckpt, list(arrs), batch_size=32)
        return Batch(z, p, stats_matrix(arrs))

    clean = run(images)
    bank = []
    for j, spec in enumerate(specs):
        shifted = [apply_spec(a, spec, np.random.default_rng([seed, j, i]))
                   for i, a in enumerate(images)]
        bank.append(run(shifted))
        if report:
            report({"stage": "estimator bank", "done": j + 1, "total": len(specs)})
    return clean, bank


def build_meta(ckpt: Any, images: Sequence[np.ndarray], labels: Sequence[int],
               config: EstimatorConfig | None = None, progress: Progress | bool | None = None,
               ) -> tuple[Any, dict[str, Any]]:
    """The meta-sets (``MetaBank``) of ``images`` under the config's shift bank, and what
    building them took."""
    from models.estimate.bank import MetaBank
    from models.sim.shifts import bank_specs, primitives_of

    cfg = config or EstimatorConfig()
    cfg.validate()
    y = np.asarray(labels)
    if len(images) != len(y):
        raise ValueError(f"{len(images)} images but {len(y)} labels")
    idx = np.arange(len(y))
    if len(y) > cfg.max_images:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(y), cfg.max_images,
                                                             replace=False))
    imgs, y = [images[i] for i in idx], y[idx]
    specs = bank_specs(cfg.specs_mild, cfg.specs_severe, cfg.spec_seed)
    t0 = time.perf_counter()
    ref, bank = shifted_batches(ckpt, imgs, specs, cfg.seed, progress)
    t1 = time.perf_counter()
    meta = MetaBank.build(ref, y, bank, [frozenset(primitives_of(s)) for s in specs],
                          seed=cfg.seed)
    info = {"config": cfg.to_dict(), "n_images": len(y), "n_specs": len(specs),
            "n_meta_sets": len(meta.D), "acc_ref": meta.acc_ref,
            "bank_seconds": round(t1 - t0, 1), "meta_seconds": round(time.perf_counter() - t1, 1),
            "precision": getattr(ckpt, "precision", "fp32")}
    return meta, info


def fit_estimator(ckpt: Any, images: Sequence[np.ndarray], labels: Sequence[int],
                  config: EstimatorConfig | None = None, progress: Progress | bool | None = None,
                  ) -> tuple[Any, dict[str, Any]]:
    """The fitted estimator of ``config.method`` and what the fit did (seconds, sizes)."""
    from models.catalog import load

    cfg = config or EstimatorConfig()
    meta, info = build_meta(ckpt, images, labels, cfg, progress)
    t0 = time.perf_counter()
    est = load("estimator", cfg.method)(interval=cfg.interval).fit(meta, seed=cfg.seed)
    info["fit_seconds"] = round(time.perf_counter() - t0, 1)
    info["seconds"] = round(info["bank_seconds"] + info["meta_seconds"] + info["fit_seconds"], 1)
    info["oof_mae"] = getattr(est, "oof_mae", None)
    return est, info


__all__ = ["EstimatorConfig", "build_meta", "fit_estimator", "shifted_batches", "stats_matrix"]
