"""Unsupervised re-adaptation of a trained EmotionNet to one site's unlabelled images.

One protocol, several methods, selected by name (``get_adapter("mmd")``; the names are the
``ADAPTERS`` table of :mod:`models.catalog`):

    method    module              needs source?  updates                          loss
    mmd       models.adapt.discrepancy  yes (labels)   bottleneck + head (+ top blocks,   CE_src + lam(t)*(MK-MMD [+ CORAL])
                                                 + every layer with backbone_lr_mult)
    coral     models.adapt.discrepancy  yes (labels)   as mmd                             CE_src + lam(t)*CORAL
    adabn     models.adapt.bn           no             BN running statistics only         (none: re-estimation)
    shot-im   models.adapt.entropy      no             bottleneck (+ BN affine of top)    mean entropy - diversity
    tent      models.adapt.entropy      no             BN affine of top + bottleneck      mean entropy

``mmd`` is the paper's approach (source cross-entropy plus a discrepancy between source and
site bottleneck features, DAN-style multi-kernel MMD). The methods work from CACHED frozen
activations ``h = model.frozen_forward(x)``: the frozen part never changes (except for
``adabn`` with ``scope="all"`` and mmd/coral with ``backbone_lr_mult > 0``, which need raw
images and invalidate the cache), so one adaptation step costs one forward/backward of the
trainable top only.

Each method has its own config dataclass (a subclass of :class:`AdaptConfig`, which holds what
every method shares); ``get_adapter(name).default_config()`` gives the method's defaults.
The input model is never mutated: every adapter deep-copies it and returns the copy in
``AdaptResult.model`` (in eval mode).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from models.engine import frozen_runner
from models.network import Checkpoint, EmotionNet

ProgressFn = Callable[[int, int, dict[str, float]], None]


# --- inputs -----------------------------------------------------------------------------------
@dataclass
class CachedSet:
    """Cached frozen activations of a set of images (and their labels where known)."""

    h: torch.Tensor  # (N, C, s, s) = EmotionNet.frozen_forward(images)
    labels: torch.Tensor | None = None  # (N,) int64 class indices
    # (N, 3, S, S) normalised images; the methods that change the frozen part need them
    # (adabn scope "all", mmd/coral through the backbone).
    images: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.h.shape[0])


SetLike = CachedSet | tuple | torch.Tensor | np.ndarray


def as_cached_set(x: SetLike | None, what: str, need_labels: bool = False) -> CachedSet | None:
    """Accept a CachedSet, a tensor/array ``h`` or a tuple ``(h, labels)``; check shapes."""
    if x is None:
        return None
    if isinstance(x, CachedSet):
        cs = x
    elif isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"{what}: expected (h, labels), got a tuple of {len(x)}")
        cs = CachedSet(h=torch.as_tensor(x[0]), labels=None if x[1] is None else torch.as_tensor(x[1]))
    elif isinstance(x, torch.Tensor | np.ndarray):
        cs = CachedSet(h=torch.as_tensor(x))
    else:
        raise ValueError(f"{what}: expected CachedSet, tensor or (h, labels), got {type(x).__name__}")
    h = cs.h.float() if cs.h.dtype != torch.float32 else cs.h
    if h.ndim < 2 or h.shape[0] == 0:
        raise ValueError(f"{what}: activations must be (N, ...) with N >= 1, got shape {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise ValueError(f"{what}: activations contain NaN or inf")
    labels = cs.labels
    if labels is not None:
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.shape[0] != h.shape[0]:
            raise ValueError(f"{what}: {h.shape[0]} activations but {labels.shape[0]} labels")
    if need_labels and labels is None:
        raise ValueError(f"{what}: this method needs labelled source activations (h, labels)")
    if cs.images is not None and cs.images.shape[0] != h.shape[0]:
        raise ValueError(f"{what}: {h.shape[0]} activations but {cs.images.shape[0]} images")
    return CachedSet(h=h, labels=labels, images=cs.images)


# --- configuration and result -------------------------------------------------------------------
@dataclass
class AdaptConfig:
    """What every method shares; each method's config subclasses it."""

    seed: int = 0
    # Stop (and return what we have) after this many seconds; the result says so.
    time_budget_s: float = 600.0
    # history records every ``log_every`` steps (and the last one).
    log_every: int = 10
    # Forward batch for no-grad passes (BN re-estimation, caching the top's output): small
    # batches stay in cache (measured here: the top at batch 32 channels-last 5x faster than
    # at 256); BN statistics are cumulative averages over the batches either way.
    eval_batch_size: int = 32

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        if not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0, got {self.time_budget_s}")
        if self.log_every < 1 or self.eval_batch_size < 1:
            raise ValueError("log_every and eval_batch_size must be >= 1")


@dataclass
class AdaptResult:
    model: EmotionNet  # a NEW model (eval mode); the input is untouched
    history: list[dict[str, float]]  # per logged step: step, loss, ce, mmd, coral, ...
    seconds: float
    method: str
    config: dict[str, Any]
    steps_done: int = 0
    stopped_early: bool = False  # hit config.time_budget_s
    # True when the frozen part changed: cached activations of the input model are NOT valid
    # for this one.
    frozen_changed: bool = False
    # The site's activations under the returned model's frozen part, when it changed and the
    # method computed them anyway (adabn scope "all"); None: compute them if needed.
    site_h: torch.Tensor | None = None
    # How the source-accuracy gate judges the candidate's weights on training-domain images:
    # "own" (as the candidate runs: methods trained with the source loss, mmd/coral) or
    # "champion" (with the champion's BN statistics: methods that only re-normalise or tune
    # for the site -- adabn, tent, shot-im -- would otherwise be scored on training-domain
    # images normalised with the site's statistics, a situation no site image is ever in).
    source_normalisation: str = "own"

    def to_checkpoint(self, base: Checkpoint) -> Checkpoint:
        """The adapted model with ``base``'s classes and preprocessing."""
        cfg = dict(base.config)
        cfg["adaptation"] = {"method": self.method, "config": self.config,
                             "steps_done": self.steps_done, "seconds": self.seconds}
        return Checkpoint(model=self.model, classes=list(base.classes),
                          preprocessing=base.preprocessing, config=cfg, engine=base.engine,
                          engine_cache=base.engine_cache)


# --- helpers shared by the methods (also used by validation and the benchmarks) -------------------
def entropy(p: torch.Tensor) -> torch.Tensor:
    """(..., K) probabilities -> (...) entropy in nats."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


@torch.no_grad()
def cached_outputs(model: EmotionNet, h: torch.Tensor,
                   batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Cached activations (N,...) -> (bottleneck features (N,D), softmax probabilities (N,K)),
    with the model in eval mode (its mode is restored)."""
    was = model.training
    model.eval()
    zs, ps = [], []
    for s in range(0, h.shape[0], batch_size):
        z, logits = model.forward_cached(torch.as_tensor(h[s:s + batch_size]).float())
        zs.append(z)
        ps.append(logits.softmax(1))
    model.train(was)
    return torch.cat(zs).numpy(), torch.cat(ps).numpy()


@torch.no_grad()
def cache_activations(model: EmotionNet, images: torch.Tensor | np.ndarray,
                      batch_size: int = 32, preprocessing: Any = None, engine: str = "auto",
                      cache_dir: Any = None) -> torch.Tensor:
    """Raw images -> cached frozen activations h (N, C, s, s), in batches.

    images: (N,3,S,S) normalised float, or (N,S,S,3) uint8 (then ``preprocessing.normalize``
    is applied; a ``Preprocessing`` is required). ``engine``/``cache_dir``: see
    ``models.engine.frozen_runner``.
    """
    out = []
    run = frozen_runner(model, model.config.img_size, engine, cache_dir, n_images=len(images))
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size]
        if (isinstance(x, np.ndarray) and x.dtype == np.uint8) or (
                isinstance(x, torch.Tensor) and x.dtype == torch.uint8):
            if preprocessing is None:
                raise ValueError("uint8 images need a Preprocessing to normalise them")
            x = preprocessing.normalize(x)
        out.append(run(x))
    return torch.cat(out)


def batches(x: torch.Tensor, bs: int) -> list[torch.Tensor]:
    """``x`` cut into consecutive batches of (at most) ``bs`` rows."""
    return [x[s:s + bs] for s in range(0, x.shape[0], bs)]


def sampler(n: int, bs: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: a fresh permutation per pass; batches never cross passes."""
    bs = min(bs, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - bs + 1, bs):
            yield perm[s:s + bs]


def set_dropout(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.train(on)


# --- the protocol -------------------------------------------------------------------------------
class Adapter:
    """Base class: ``adapt`` validates, copies the model, seeds, times; ``_adapt`` computes.

    A method is a subclass with a ``name``, ``needs_source`` (does it read labelled training
    data?), ``config_class`` (its config dataclass) and ``_adapt``; its registration is one line
    in ``models.catalog.ADAPTERS``."""

    name: str = ""
    needs_source: bool = False
    config_class: type[AdaptConfig] = AdaptConfig
    # AdaptResult.source_normalisation of this method's candidates
    source_normalisation: str = "own"

    def default_config(self) -> AdaptConfig:
        return self.config_class()

    def adapt(self, checkpoint_or_model: Checkpoint | EmotionNet, source: SetLike | None,
              target: SetLike, config: AdaptConfig | None = None,
              progress: ProgressFn | bool | None = None) -> AdaptResult:
        """Adapt a copy of the model to ``target`` (cached site activations, no labels used).

        source: labelled source activations ``(h_src, labels)`` / CachedSet, or None for the
            source-free methods (they ignore it when given).
        progress: callable(step, total, record) called at every logged step, or True for a
            tqdm bar.
        """
        if isinstance(checkpoint_or_model, Checkpoint):
            base = checkpoint_or_model.model
        elif isinstance(checkpoint_or_model, EmotionNet):
            base = checkpoint_or_model
        else:
            raise ValueError(f"expected a Checkpoint or EmotionNet, got {type(checkpoint_or_model).__name__}")
        cfg = config if config is not None else self.default_config()
        if not isinstance(cfg, self.config_class):
            raise ValueError(f"method {self.name!r} takes a {self.config_class.__name__}, "
                             f"got {type(cfg).__name__}")
        cfg.validate()
        src = as_cached_set(source, "source", need_labels=self.needs_source)
        if self.needs_source and src is None:
            raise ValueError(f"method {self.name!r} needs labelled source activations; "
                             "use a source-free method (adabn, shot-im, tent) without them")
        tgt = as_cached_set(target, "target")
        if src is not None and src.h.shape[1:] != tgt.h.shape[1:]:
            raise ValueError(f"source activations {tuple(src.h.shape[1:])} and target "
                             f"{tuple(tgt.h.shape[1:])} have different shapes (different models?)")
        if src is not None and src.labels is not None:
            k = base.config.num_classes
            if int(src.labels.min()) < 0 or int(src.labels.max()) >= k:
                raise ValueError(f"source labels must be in [0, {k}), got "
                                 f"[{int(src.labels.min())}, {int(src.labels.max())}]")
        self._check(cfg, src, tgt)

        model = copy.deepcopy(base)
        report = Reporter(progress, getattr(cfg, "steps", 1), cfg.log_every)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            gen = torch.Generator().manual_seed(cfg.seed)
            state = self._adapt(model, src, tgt, cfg, gen, report, t0)
        model.eval()
        report.close()
        return AdaptResult(model=model, history=report.history,
                           seconds=time.perf_counter() - t0, method=self.name,
                           config=cfg.to_dict(), steps_done=state.get("steps_done", 0),
                           stopped_early=state.get("stopped_early", False),
                           frozen_changed=state.get("frozen_changed", False),
                           site_h=state.get("site_h") if state.get("frozen_changed") else None,
                           source_normalisation=self.source_normalisation)

    def _check(self, cfg: Any, src: CachedSet | None, tgt: CachedSet) -> None:
        """Method-specific input checks (raise ValueError)."""

    def _adapt(self, model: EmotionNet, src: CachedSet | None, tgt: CachedSet, cfg: Any,
               gen: torch.Generator, report: Reporter, t0: float) -> dict[str, Any]:
        raise NotImplementedError


class Reporter:
    """Progress of one adaptation: the history records and an optional bar or callback."""

    def __init__(self, progress: ProgressFn | bool | None, total: int, log_every: int) -> None:
        self.history: list[dict[str, float]] = []
        self.log_every = log_every
        self.fn = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="adapt", leave=False)

    def step(self, step: int, total: int, t0: float, **values: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if step % self.log_every and step != total:
            return
        rec = {"step": float(step), "seconds": time.perf_counter() - t0}
        rec.update({k: float(v) for k, v in values.items()})
        self.history.append(rec)
        if self.fn is not None:
            self.fn(step, total, rec)
        if self.bar is not None:
            self.bar.set_postfix({k: round(v, 4) for k, v in values.items()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def available_adapters() -> list[str]:
    from models.catalog import ADAPTERS

    return sorted(ADAPTERS)


def get_adapter(name: str = "mmd") -> Adapter:
    """A fresh adapter of the method registered as ``name`` in ``models.catalog.ADAPTERS``."""
    from models.catalog import load

    return load("adapter", name)()


def adapt(checkpoint_or_model: Checkpoint | EmotionNet, source: SetLike | None, target: SetLike,
          method: str = "mmd", config: AdaptConfig | None = None,
          progress: ProgressFn | bool | None = None) -> AdaptResult:
    """Shortcut: ``get_adapter(method).adapt(...)``."""
    return get_adapter(method).adapt(checkpoint_or_model, source, target, config, progress)


__all__ = [
    "AdaptConfig", "AdaptResult", "Adapter", "CachedSet", "Reporter", "adapt", "as_cached_set",
    "available_adapters", "batches", "cache_activations", "cached_outputs", "entropy",
    "get_adapter", "sampler", "set_dropout",
]
