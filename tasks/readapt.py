"""Tasks of the readapt flow: data, adaptation, label-free validation, registration.

The site's labels are never used to adapt or to decide: only the optional audit folder (a
handful of labelled site images a team may keep) adds labelled evidence to the gates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from emowatch.sites import Site

if TYPE_CHECKING:
    import torch

    from tasks.context import RunContext

# Probe images for the explanation gate: half from the training domain, half from the site.
# 8 images x 2 models x ~60 calls (depth 4) keeps the gate to ~1 min at 224 px on 2 cores.
PROBE_IMAGES = 8
# Site images held out of adaptation for nothing: adaptation is unsupervised, so every recent
# image may be used; validation uses the same images (no labels are involved).
LOCK_GRACE_S = 900
# Whole-backbone adaptation decodes at most this many training images (seeded sample).
MAX_BACKBONE_SOURCE = 1000
# Rows of the champion-vs-challenger gallery attached to the approval e-mail.
GALLERY_IMAGES = 4


@dataclass
class AdaptInputs:
    ckpt: Any  # champion Checkpoint
    profile: Any  # champion ReferenceProfile
    base_key: str
    src_train: tuple[torch.Tensor, torch.Tensor] | None  # (h, labels)
    src_val: tuple[torch.Tensor, torch.Tensor]  # (h, labels) - never adapted on
    src_heldout: torch.Tensor  # (h) val+test for the candidate's reference profile
    heldout_paths: list[str]
    site_h: torch.Tensor
    site_paths: list[str]
    source_paths_val: list[str]
    # Decoded, normalised (N, 3, S, S) images for adaptation through the whole backbone
    # (site option adapt.train_backbone); None on the cached path.
    src_train_images: torch.Tensor | None = None
    site_images: torch.Tensor | None = None
    heldout_labels: list[int] | None = None  # of heldout_paths (the portfolio's proxies)
    # load_inputs(lazy_source=True): computes src_train on first call (the portfolio's
    # members that need the training data are often past its budget: their ~20 s of
    # activations are then never spent)
    src_train_loader: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    # the site's last twin record (its latest check's Estimate.twin): the portfolio's twin
    # proxies start from its camera
    previous_twin: dict[str, Any] | None = None

    def source_train(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """src_train, computed now if it was deferred (None: a source-free run)."""
        if self.src_train is None and self.src_train_loader is not None:
            self.src_train = self.src_train_loader()
            self.src_train_loader = None
        return self.src_train


class AdaptationLocked(RuntimeError):
    """Another adaptation of this site is running."""


def lock_name(site: str) -> str:
    return f"adapt:{site}"


def owner_id() -> str:
    """A lock owner unique to this call (host:pid:time)."""
    from emowatch.processes import owner

    return owner(f":{time.time_ns()}")


def acquire(ctx: RunContext, owner: str) -> None:
    from db import locks
    from db.session import session_scope

    site = ctx.site
    ttl = site.adapt.time_budget_s + LOCK_GRACE_S
    if not locks.acquire_lock(ctx.engine, lock_name(site.name), owner, ttl):
        with session_scope(ctx.engine) as s:
            holder = locks.lock_holder(s, lock_name(site.name))
        raise AdaptationLocked(f"an adaptation of site {site.name!r} is already running ({holder})")


def release(ctx: RunContext, owner: str) -> None:
    from db import locks

    locks.release_lock(ctx.engine, lock_name(ctx.site.name), owner)


def start_run(ctx: RunContext, method: str, drift_check_id: int | None) -> int:
    from db import adaptations
    from db.session import session_scope

    with session_scope(ctx.engine) as s:
        return adaptations.start_run(s, ctx.site_id, method, ctx.model.key, drift_check_id)


def finish_run(ctx: RunContext, run_id: int, **fields: Any) -> None:
    from db import adaptations
    from db.session import session_scope

    with session_scope(ctx.engine) as s:
        adaptations.finish_run(s, run_id, **fields)


def auto_adapt_blocker(ctx: RunContext) -> str | None:
    """Why a drift event should NOT start an adaptation of ``site`` (None: go ahead).

    A challenger waiting for approval is not replaced by the next hourly drift: drift keeps
    being detected until a person decides, and re-adapting every hour would only churn
    versions (a person can still run ``emowatch adapt`` by hand)."""
    from tasks.registry.client import CHALLENGER

    site = ctx.site
    if not site.adapt.auto:
        return "adapt.auto is false for this site"
    pending = ctx.registry.get_alias_version(site.model_name, CHALLENGER)
    if pending is not None:
        return f"challenger version {pending} is still waiting for approval"
    return None


def needs_source(method: str, site: Site | None = None) -> bool:
    """Does ``method`` read the labelled training data (the adapter class says; the portfolio
    does unless the site is source-free)?"""
    from models.adapt.base import get_adapter

    if method == "portfolio":
        return site is None or not site.adapt.source_free
    return get_adapter(method).needs_source


def portfolio_runs_backbone(site: Site) -> bool:
    """Can the site's portfolio reach its whole-backbone member within its budget (then the
    training images are decoded for it)?"""
    from models.adapt.portfolio import EXPECTED_PER, expected_seconds, members

    for m in members(site.adapt.portfolio):
        if m.recipe.whole_backbone:  # sets of EXPECTED_PER images: the site and each proxy
            need = expected_seconds(m, EXPECTED_PER * (1 + site.adapt.proxies))
            return need <= site.adapt.portfolio_budget_s and not site.adapt.source_free
    return False


def resolve_method(site: Site, method: str | None) -> str:
    """The method a run uses: ``method`` (forced: no portfolio) or the site's
    ``adapt.method`` ("portfolio" or one method)."""
    m = method or site.adapt.method
    if m == "portfolio":
        return m
    if site.adapt.source_free and needs_source(m):
        raise ValueError(f"site {site.name} is source_free: method {m!r} needs the training data; "
                         "use shot-im, tent or adabn")
    return m


@task(name="load-adaptation-data", cache_policy=NO_CACHE)
def load_inputs(ctx: RunContext, source_free: bool, train_backbone: bool = False,
                lazy_source: bool = False) -> AdaptInputs:
    """Champion, its training-domain split (cached activations) and the site's recent images;
    with ``train_backbone`` also the decoded training and site images; with ``lazy_source``
    the training images' activations only when ``AdaptInputs.source_train`` asks for them."""
    import torch  # here, not at import: `emowatch serve` imports this flow without torch

    from db import checks, inbox
    from db.session import session_scope
    from tasks.activations import cached_activations, record_items
    from tasks.training import SourceSpec, load_source

    log = get_run_logger()
    settings, site = ctx.settings, ctx.site
    model_name, version = ctx.model.name, ctx.model.version
    ckpt, profile = ctx.registry.load_model(model_name, version)
    spec_d = ckpt.config.get("source")
    if not spec_d:
        raise ValueError(f"{model_name}/{version} carries no source-data spec; cannot re-adapt it")
    spec = SourceSpec.from_dict(spec_d)
    if not Path(spec.data).is_dir():
        raise FileNotFoundError(
            f"training data of {model_name}/{version} is not at {spec.data} any more "
            "(mount it there, or use a source-free method: --method shot-im)")
    splits = load_source(spec)
    if list(splits.data.classes) != list(ckpt.classes):
        raise ValueError(f"training data classes {splits.data.classes} differ from the model's {ckpt.classes}")
    with session_scope(ctx.engine) as s:
        rows = inbox.recent_images(s, ctx.site_id, site.adapt.max_images)
        site_items = [(r.sha256, r.store_path) for r in rows]
        last = checks.latest_check(s, ctx.site_id)
        previous_twin = (last.estimate or {}).get("twin") if last is not None else None
    if len(site_items) < site.drift.min_samples:
        raise ValueError(f"site {site.name} has {len(site_items)} images; at least "
                         f"{site.drift.min_samples} (drift.min_samples) are needed to adapt")

    def acts(records: list[Any], what: str) -> tuple[torch.Tensor, list[str]]:
        items = record_items(records)
        log.info("activations of %d %s images", len(items), what)
        return cached_activations(ckpt, items, settings.cache_dir), [p for _, p in items]

    recs = splits.data.records
    val_recs = [recs[i] for i in splits.val]
    h_val, val_paths = acts(val_recs, "source validation")
    y_val = torch.as_tensor([r.label for r in val_recs])
    src_train = loader = None
    if not source_free:
        tr_recs = [recs[i] for i in splits.train]

        def loader() -> tuple[torch.Tensor, torch.Tensor]:
            return acts(tr_recs, "source training")[0], torch.as_tensor([r.label for r in tr_recs])

        if not lazy_source or train_backbone:
            src_train, loader = loader(), None
    test_recs = [recs[i] for i in splits.test]
    h_test, test_paths = acts(test_recs, "source test")
    log.info("activations of %d site images", len(site_items))
    site_h = cached_activations(ckpt, site_items, settings.cache_dir)
    inputs = AdaptInputs(
        ckpt=ckpt, profile=profile, base_key=f"{model_name}/{version}", src_train=src_train,
        src_val=(h_val, y_val), src_heldout=torch.cat([h_val, h_test]),
        heldout_paths=val_paths + test_paths, site_h=site_h,
        heldout_labels=[r.label for r in val_recs] + [r.label for r in test_recs],
        site_paths=[p for _, p in site_items], source_paths_val=val_paths,
        src_train_loader=loader, previous_twin=previous_twin,
    )
    if train_backbone and src_train is None:
        log.info("train_backbone applies to mmd and coral only (they use the training data); "
                 "this source-free adaptation runs on the cached path")
    elif train_backbone:
        # BACKBONE_STEPS x BACKBONE_BATCH = 2,400 source draws: a seeded sample of at most
        # MAX_BACKBONE_SOURCE training images serves them and bounds memory (~0.6 MB each).
        keep = np.arange(len(splits.train))
        if len(keep) > MAX_BACKBONE_SOURCE:
            keep = np.sort(np.random.default_rng(0).choice(len(keep), MAX_BACKBONE_SOURCE, replace=False))
        tr_paths = [str(recs[splits.train[i]].path) for i in keep]
        log.info("decoding %d training and %d site images for whole-backbone adaptation",
                 len(tr_paths), len(site_items))
        keep_t = torch.as_tensor(keep)
        inputs.src_train = (src_train[0][keep_t], src_train[1][keep_t])
        inputs.src_train_images = decode_images(inputs, tr_paths)
        inputs.site_images = decode_images(inputs, inputs.site_paths)
    return inputs


@task(name="adapt", cache_policy=NO_CACHE)
def run_adaptation(inputs: AdaptInputs, method: str, site: Site, seed: int = 0) -> Any:
    from models.adapt.base import CachedSet, get_adapter
    from models.adapt.discrepancy import with_backbone

    adapter = get_adapter(method)
    cfg = adapter.default_config()
    cfg.seed = seed
    cfg.time_budget_s = site.adapt.time_budget_s
    if site.adapt.site_bn_weight is not None and hasattr(cfg, "site_bn_weight"):
        cfg.site_bn_weight = site.adapt.site_bn_weight
    log = get_run_logger()
    source, target = inputs.src_train, inputs.site_h
    if inputs.site_images is not None and adapter.needs_source:
        cfg = with_backbone(cfg)
        cfg.mirror_source = bool(inputs.ckpt.config.get("train", {}).get("flip", True))
        source = CachedSet(h=inputs.src_train[0], labels=inputs.src_train[1],
                           images=inputs.src_train_images)
        target = CachedSet(h=inputs.site_h, images=inputs.site_images)
    through = getattr(cfg, "backbone_lr_mult", 0) > 0
    log.info("adapting %s to %d site images with %s%s (budget %.0f s)", inputs.base_key,
             len(inputs.site_h), method, " through the whole backbone" if through else "",
             cfg.time_budget_s)
    res = adapter.adapt(inputs.ckpt, source, target, cfg, progress=True)
    log.info("%s: %d steps in %.1f s%s", method, res.steps_done, res.seconds,
             " (stopped at the time budget)" if res.stopped_early else "")
    return res


def decode_grids(inputs: AdaptInputs, paths: list[str]) -> np.ndarray:
    """(N, S, S, 3) uint8 grids as the champion sees them (decoded, resized)."""
    from models.data import load_rgb

    prep = inputs.ckpt.preprocessing
    return np.stack([prep.to_array(load_rgb(p)) for p in paths])


def decode_images(inputs: AdaptInputs, paths: list[str]) -> torch.Tensor:
    """Decoded, resized and normalised (N, 3, S, S) images, as the champion sees them."""
    return inputs.ckpt.preprocessing.normalize(decode_grids(inputs, paths))
