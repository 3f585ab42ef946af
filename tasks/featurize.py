"""Featurize site images with a model version, cached in ``image_features`` by sha256 + model.

Large batches are split into chunks; each chunk is a Prefect task, so the flow's task runner
decides where they run (threads by default, a Dask cluster with ``EMOWATCH_TASK_RUNNER=dask``).
A chunk loads the model once per worker process, decodes each image once (quality statistics
on the full-resolution image, features on the model's input grid) and writes to the cache;
re-checks of the same images under the same model version cost one SELECT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from emowatch.settings import Settings
from models.quality import STAT_NAMES

if TYPE_CHECKING:
    from tasks.context import RunContext


@dataclass
class FeatureSet:
    """Features of N images, aligned with ``shas``."""

    shas: list[str]
    z: np.ndarray  # (N, D) float32 bottleneck features
    probs: np.ndarray  # (N, K) float32 softmax outputs
    quality: dict[str, np.ndarray]  # stat name -> (N,) float64

    def __len__(self) -> int:
        return len(self.shas)


def compute_chunk(settings: Settings, model_name: str, version: str,
                  items: Sequence[tuple[str, str]], batch_size: int = 32) -> int:
    """Featurize ``(sha256, path)`` pairs and cache them; returns how many were written.

    Takes the settings, not a run context, because it may run in another process (a Dask
    worker), which opens its own database engine and registry from them. Images that can no
    longer be decoded are skipped (they were validated at ingestion, so this only happens when
    the content store was tampered with) and logged by the caller."""
    from db import features
    from db.session import session_scope
    from models.evaluate import extract_features_overlapped
    from models.images import load_rgb
    from models.quality import image_stats
    from tasks.context import Runtime

    rt = Runtime.open(settings)
    ckpt, _ = rt.registry.load_model(model_name, version)
    prep = ckpt.preprocessing
    quals: dict[int, dict] = {}

    def load(i: int) -> np.ndarray | None:
        try:
            img = load_rgb(items[i][1])
        except Exception:  # noqa: BLE001 - reported as missing by featurize_images
            return None
        quals[i] = image_stats(img)
        return prep.to_array(img)

    kept, z, p = extract_features_overlapped(ckpt, list(range(len(items))), load, batch_size)
    if not kept:
        return 0
    with session_scope(rt.engine) as s:
        return features.put_features(
            s, f"{model_name}/{version}",
            [(items[i][0], z[j], p[j], quals[i]) for j, i in enumerate(kept)])


@task(name="featurize-chunk", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def featurize_chunk(settings: Settings, model_name: str, version: str,
                    items: list[tuple[str, str]], batch_size: int) -> int:
    return compute_chunk(settings, model_name, version, items, batch_size)


def load_cached(ctx: RunContext, model_key: str, shas: Sequence[str]) -> dict:
    from db import features
    from db.session import session_scope

    with session_scope(ctx.engine) as s:
        return features.get_features(s, shas, model_key)


@task(name="featurize-images", cache_policy=NO_CACHE)
def featurize_images(ctx: RunContext, items: list[tuple[str, str]], chunk_size: int = 256
                     ) -> FeatureSet:
    """Features of every ``(sha256, store_path)`` under the model serving ``ctx``'s site,
    computing only what is not cached yet.

    Runs the missing chunks through the flow's task runner (parallel on Dask)."""
    log = get_run_logger()
    model_name, version = ctx.model.name, ctx.model.version
    key = ctx.model.key
    batch_size = ctx.settings.featurize_batch
    shas = [s for s, _ in items]
    cached = load_cached(ctx, key, shas)
    missing = [(s, p) for s, p in items if s not in cached]
    if missing:
        chunks = [missing[i:i + chunk_size] for i in range(0, len(missing), chunk_size)]
        log.info("featurizing %d new images with %s in %d chunk(s) (%d cached)",
                 len(missing), key, len(chunks), len(cached))
        futures = [featurize_chunk.submit(ctx.settings, model_name, version, c, batch_size)
                   for c in chunks]
        written = sum(f.result() for f in futures)
        log.info("featurized %d images", written)
        cached = load_cached(ctx, key, shas)
    lost = [s for s in shas if s not in cached]
    if lost:
        log.warning("%d images could not be decoded from the content store and are left out: %s",
                    len(lost), ", ".join(lost[:5]))
    kept = [s for s in shas if s in cached]
    return assemble(kept, cached)


def assemble(shas: list[str], cached: dict) -> FeatureSet:
    if not shas:
        return FeatureSet([], np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32),
                          {k: np.zeros(0) for k in STAT_NAMES})
    z = np.stack([cached[s].features for s in shas]).astype(np.float32)
    p = np.stack([cached[s].probs for s in shas]).astype(np.float32)
    q = {k: np.asarray([cached[s].quality.get(k, np.nan) for s in shas], dtype=np.float64)
         for k in STAT_NAMES}
    return FeatureSet(shas, z, p, q)
