"""Unsupervised re-adaptation of a trained EmotionNet to one site's unlabelled images.

One protocol, several methods, selected by name (``get_adapter("mmd")``):

    method    needs source?  updates                                      loss
    mmd       yes (labels)   bottleneck + head (+ top blocks if top_lr_mult,  CE_src + lam(t)*(MK-MMD [+ CORAL])
                             + every layer if backbone_lr_mult)
    coral     yes (labels)   as mmd                                       CE_src + lam(t)*CORAL
    adabn     no             BN running statistics only                    (none: re-estimation)
    shot-im   no             bottleneck (+ BN affine of the top)           mean entropy - diversity
    tent      no             BN affine (weight, bias) of top + bottleneck  mean entropy

``mmd`` is the paper's approach (source cross-entropy plus a discrepancy between source and
site bottleneck features, DAN-style multi-kernel MMD). All methods work from CACHED frozen
activations ``h = model.frozen_forward(x)``: the frozen part never changes (except for
``adabn`` with ``scope="all"`` and mmd/coral with ``backbone_lr_mult > 0``, which need raw
images and invalidate the cache), so one adaptation step costs one forward/backward of the
trainable top only.

The input model is never mutated: every adapter deep-copies it and returns the copy in
``AdaptResult.model`` (in eval mode).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.network import Checkpoint, EmotionNet

ProgressFn = Callable[[int, int, dict[str, float]], None]


# --- inputs -----------------------------------------------------------------------------------
@dataclass
class CachedSet:
    """Cached frozen activations of a set of images (and their labels where known)."""

    h: torch.Tensor  # (N, C, s, s) = EmotionNet.frozen_forward(images)
    labels: torch.Tensor | None = None  # (N,) int64 class indices
    # (N, 3, S, S) normalised images; only ``adabn`` with scope="all" needs them (it
    # re-estimates the frozen part's BN statistics, which the cache cannot reflect).
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
    # --- optimisation ---
    # 300 steps x 32+32 images is ~20 passes over a 500-image site: the MMD term settles
    # after ~150 (bench/adapt.py). With the top frozen (default) a step costs milliseconds.
    steps: int = 300
    # Per domain (source and site batches are this size each). MMD/CORAL estimates from fewer
    # than ~32 points per side are too noisy to align anything.
    batch_size: int = 32
    # Adam on the bottleneck + head. Small: we start from a trained model and only want to
    # nudge it; larger rates lose source accuracy before the discrepancy term helps.
    lr: float = 1e-4
    # Learning-rate multiplier of the top blocks. 0 (default) freezes them: their outputs are
    # cached once (with the BN statistics chosen by ``top_bn``) and a step costs ~1 ms instead
    # of ~2 s of EfficientNet top on 2 CPU cores. On Emotion6 night/blur sites training the top
    # (0.1, DAN practice) was no better and ran out of the 10 min budget (bench/adapt.py).
    top_lr_mult: float = 0.0
    # mmd / coral: learning-rate multiplier of EVERYTHING below the bottleneck (stem, all
    # blocks, head conv). 0 (default) keeps the cached path. > 0 backpropagates through the
    # whole backbone from raw images (``CachedSet.images`` of source and site are required),
    # ~1.6 s per step of 16+16 photos on 2 CPU cores instead of ~1 ms, and the returned model's
    # frozen part changes (``AdaptResult.frozen_changed``). It is the only lever measured that
    # moves the blur site: the label oracle gains nothing there with the backbone frozen
    # (bench/adapt_full.py). ``BACKBONE_STEPS`` / ``BACKBONE_BATCH`` are the measured recipe.
    backbone_lr_mult: float = 0.0
    # Backbone mode: mirror each source photo with p = 0.5 (the augmentation training used,
    # TrainConfig.flip). False where the classes are not left-right symmetric.
    mirror_source: bool = True
    weight_decay: float = 1e-4
    # --- discrepancy (mmd / coral) ---
    # lam of the MMD term. MK-MMD with median-scaled kernels is O(0.01-1): weight 1 makes it
    # comparable to the cross-entropy without swamping it.
    mmd_weight: float = 1.0
    # Gaussian kernels exp(-d^2 / (m * median d^2)) for each multiplier m: a family around the
    # median heuristic, so no single bandwidth has to be right (Gretton et al. 2012, DAN).
    kernel_multipliers: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    # Extra CORAL term (Deep CORAL, ||C_s - C_t||_F^2 / (4 d^2)) added to ``mmd``; the
    # ``coral`` method uses it alone (its default config sets 100: the 1/(4 d^2) scaling puts
    # raw values of 256-d features at ~1e-3..1e-2, x100 brings them to the CE's scale).
    coral_weight: float = 0.0
    # DANN ramp lam(p) = lam * (2 / (1 + exp(-gamma p)) - 1), p = step / steps: the
    # discrepancy starts at 0 while the batch statistics settle. 0 disables the ramp.
    rampup_gamma: float = 10.0
    # --- source-free (shot-im / tent) ---
    # Weight of the diversity term (entropy of the batch-mean prediction) in shot-im: 1 as in
    # SHOT; without it entropy minimisation collapses onto one class.
    diversity_weight: float = 1.0
    # shot-im also adapts the top's BN affine parameters (SHOT adapts the whole extractor;
    # the BN affine is the cheap part of that).
    shot_top_bn: bool = True
    # Learning rate for the source-free methods (Adam). Larger than ``lr``: they update few
    # parameters (BN affine / bottleneck only).
    sf_lr: float = 1e-3
    # --- batch norm ---
    # With a frozen top (top_lr_mult == 0), which BN statistics the top uses while its outputs
    # are cached for training (and keeps in the returned model):
    #   "mixed":  re-estimated on equal numbers of source and site images - the site is no
    #             longer normalised with statistics it does not have, the source only partly;
    #   "source": unchanged; "site": the site's only (AdaBN; source accuracy suffers).
    top_bn: Literal["mixed", "source", "site"] = "mixed"
    # What the running BN statistics of the returned model describe:
    #   "target": re-estimated on the site (AdaBN) after training - the model is for that site;
    #   "keep":   whatever training left (mixed source+site batches for mmd/coral).
    final_bn: Literal["target", "keep"] = "keep"
    # adabn: "trainable" re-estimates BN of the top + bottleneck from cached activations;
    # "all" also the frozen part, which needs ``target.images`` and makes cached
    # activations of the returned model differ from the input model's.
    adabn_scope: Literal["trainable", "all"] = "trainable"
    # adabn / shot-im / tent end by re-estimating BN statistics on the site. The weight of the
    # site in those final statistics: 1 is AdaBN (pure site: the model then normalises source
    # images with statistics they do not have, and source accuracy drops); 0.5 is the moment-
    # matched mixture of the champion's running statistics (which describe the training domain,
    # so no source data is needed) and the site's: mean = w mu_t + (1-w) mu_s,
    # var = w var_t + (1-w) var_s + w (1-w) (mu_t - mu_s)^2.
    # adabn at 0.5 on Emotion6 night/blur sites (bench/adapt.py, seeds 0-2): night gap
    # recovered 0.62/0.27/0.33 and blur 0.43/0.00/0.26, losing at most 4.8 points of source
    # accuracy (pure AdaBN: up to 14). But one set of statistics cannot serve two domains that
    # are far apart: on a strong synthetic shift 0.5 fixes nothing (tests/test_adapt.py), so
    # the default stays pure AdaBN.
    site_bn_weight: float = 1.0
    # --- run control ---
    seed: int = 0
    # Stop (and return what we have) after this many seconds; the result says so.
    time_budget_s: float = 600.0
    # history records every ``log_every`` steps (and the last one).
    log_every: int = 10
    # Forward batch for no-grad passes (BN re-estimation, caching the top's output).
    eval_batch_size: int = 128

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kernel_multipliers"] = list(self.kernel_multipliers)
        return d

    def validate(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BN and MMD need pairs), got {self.batch_size}")
        for name in ("lr", "sf_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("top_lr_mult", "backbone_lr_mult", "weight_decay", "mmd_weight", "coral_weight",
                     "rampup_gamma", "diversity_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.kernel_multipliers or any(m <= 0 for m in self.kernel_multipliers):
            raise ValueError(f"kernel_multipliers must be positive, got {self.kernel_multipliers}")
        if self.final_bn not in ("target", "keep"):
            raise ValueError(f"final_bn must be 'target' or 'keep', got {self.final_bn!r}")
        if self.top_bn not in ("mixed", "source", "site"):
            raise ValueError(f"top_bn must be 'mixed', 'source' or 'site', got {self.top_bn!r}")
        if self.adabn_scope not in ("trainable", "all"):
            raise ValueError(f"adabn_scope must be 'trainable' or 'all', got {self.adabn_scope!r}")
        if not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0, got {self.time_budget_s}")
        if not 0.0 <= self.site_bn_weight <= 1.0:
            raise ValueError(f"site_bn_weight must be in [0, 1], got {self.site_bn_weight}")
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
    # True when the frozen part changed (adabn scope="all"): cached activations of the input
    # model are NOT valid for this one.
    frozen_changed: bool = False

    def to_checkpoint(self, base: Checkpoint) -> Checkpoint:
        """The adapted model with ``base``'s classes and preprocessing."""
        cfg = dict(base.config)
        cfg["adaptation"] = {"method": self.method, "config": self.config,
                             "steps_done": self.steps_done, "seconds": self.seconds}
        return Checkpoint(model=self.model, classes=list(base.classes),
                          preprocessing=base.preprocessing, config=cfg)


# The whole-backbone recipe measured in bench/adapt_full.py: 150 Adam steps of 16 source + 16
# site photos at lr 1e-4 (~4-5 min on 2 CPU cores). 16 per side, not 32: a step through the
# whole network costs ~0.05 s per photo.
BACKBONE_STEPS = 150
BACKBONE_BATCH = 16


def with_backbone(cfg: AdaptConfig, lr_mult: float = 1.0) -> AdaptConfig:
    """``cfg`` switched to training the whole backbone (mmd / coral) with the measured recipe."""
    return dataclasses.replace(cfg, backbone_lr_mult=lr_mult, steps=BACKBONE_STEPS,
                               batch_size=BACKBONE_BATCH)


# --- kernels and discrepancies ------------------------------------------------------------------
def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,D),(m,D) -> (n,m) squared Euclidean distances (clamped at 0)."""
    d = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2.0 * a @ b.T
    return d.clamp_min(0.0)


def mk_mmd2(x: torch.Tensor, y: torch.Tensor,
            multipliers: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0),
            bandwidth: float | None = None) -> torch.Tensor:
    """Unbiased multi-kernel MMD^2 between samples x (n,D) and y (m,D) (differentiable).

    Kernels: mean over m of exp(-d^2 / (m * bw)), bw = median pairwise squared distance of the
    pooled sample (detached; pass ``bandwidth`` to fix it). The unbiased U-statistic drops the
    diagonal, so it is ~0 (and may go slightly negative) when x and y come from one law.
    """
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"MMD needs >= 2 points per sample, got {n} and {m}")
    z = torch.cat([x, y], 0)
    d = _sq_dists(z, z)  # (n+m, n+m)
    if bandwidth is None:
        off = d.detach()[~torch.eye(n + m, dtype=torch.bool)]
        bw = float(off.median()) if off.numel() else 1.0
    else:
        bw = float(bandwidth)
    bw = max(bw, 1e-8)
    k = sum(torch.exp(-d / (mult * bw)) for mult in multipliers) / len(multipliers)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sxx + syy - 2.0 * kxy.mean()


def coral_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Deep CORAL: ||Cov(x) - Cov(y)||_F^2 / (4 D^2) for x (n,D), y (m,D)."""
    def cov(a: torch.Tensor) -> torch.Tensor:
        a = a - a.mean(0, keepdim=True)
        return a.T @ a / max(a.shape[0] - 1, 1)

    d = x.shape[1]
    return (cov(x) - cov(y)).pow(2).sum() / (4.0 * d * d)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """(..., K) probabilities -> (...) entropy in nats."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def rampup(step: int, steps: int, gamma: float) -> float:
    """DANN schedule 2/(1+exp(-gamma p)) - 1 for p = step/steps; 1 when gamma == 0."""
    if gamma <= 0 or steps <= 0:
        return 1.0
    p = min(max(step / steps, 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


# --- feature helpers (also used by validation and the benchmark) --------------------------------
def _bn_modules(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def cached_outputs(model: EmotionNet, h: torch.Tensor,
                   batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
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
                      batch_size: int = 32, preprocessing: Any = None) -> torch.Tensor:
    """Raw images -> cached frozen activations h (N, C, s, s), in batches.

    images: (N,3,S,S) normalised float, or (N,S,S,3) uint8 (then ``preprocessing.normalize``
    is applied; a ``Preprocessing`` is required).
    """
    out = []
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size]
        if (isinstance(x, np.ndarray) and x.dtype == np.uint8) or (
                isinstance(x, torch.Tensor) and x.dtype == torch.uint8):
            if preprocessing is None:
                raise ValueError("uint8 images need a Preprocessing to normalise them")
            x = preprocessing.normalize(x)
        out.append(model.frozen_forward(torch.as_tensor(x).float()))
    return torch.cat(out)


@torch.no_grad()
def reestimate_bn(bns: list[nn.modules.batchnorm._BatchNorm], forward: Callable[[torch.Tensor], Any],
                  batches: list[torch.Tensor]) -> None:
    """AdaBN: reset the running statistics of ``bns`` and recompute them as the cumulative
    average over ``batches`` (each run through ``forward`` with those BNs in train mode)."""
    saved = [(b.momentum, b.training) for b in bns]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # cumulative moving average: every batch counts the same
        b.train()
    for xb in batches:
        forward(xb)
    for b, (mom, tr) in zip(bns, saved, strict=True):
        b.momentum = mom
        b.train(tr)


def _batches(x: torch.Tensor, bs: int) -> list[torch.Tensor]:
    return [x[s:s + bs] for s in range(0, x.shape[0], bs)]


def _sampler(n: int, bs: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: a fresh permutation per pass; batches never cross passes."""
    bs = min(bs, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - bs + 1, bs):
            yield perm[s:s + bs]


def _set_dropout(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.train(on)


# --- the protocol -------------------------------------------------------------------------------
class Adapter:
    """Base class: ``adapt`` validates, copies the model, seeds, times; ``_adapt`` computes."""

    name: str = ""
    needs_source: bool = False

    def default_config(self) -> AdaptConfig:
        return AdaptConfig()

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
        report = _Reporter(progress, cfg)
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
                           frozen_changed=state.get("frozen_changed", False))

    def _check(self, cfg: AdaptConfig, src: CachedSet | None, tgt: CachedSet) -> None:
        """Method-specific input checks (raise ValueError)."""

    def _adapt(self, model: EmotionNet, src: CachedSet | None, tgt: CachedSet, cfg: AdaptConfig,
               gen: torch.Generator, report: _Reporter, t0: float) -> dict[str, Any]:
        raise NotImplementedError


class _Reporter:
    def __init__(self, progress: ProgressFn | bool | None, cfg: AdaptConfig) -> None:
        self.history: list[dict[str, float]] = []
        self.cfg = cfg
        self.fn = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.steps, desc="adapt", leave=False)

    def step(self, step: int, total: int, t0: float, **values: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if step % self.cfg.log_every and step != total:
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


ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    ADAPTERS[cls.name] = cls
    return cls


def available_adapters() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(name: str = "mmd") -> Adapter:
    if name not in ADAPTERS:
        raise ValueError(f"unknown adaptation method {name!r}; known: {', '.join(available_adapters())}")
    return ADAPTERS[name]()


def adapt(checkpoint_or_model: Checkpoint | EmotionNet, source: SetLike | None, target: SetLike,
          method: str = "mmd", config: AdaptConfig | None = None,
          progress: ProgressFn | bool | None = None) -> AdaptResult:
    """Shortcut: ``get_adapter(method).adapt(...)``."""
    return get_adapter(method).adapt(checkpoint_or_model, source, target, config, progress)


# --- discrepancy methods (mmd, coral) ------------------------------------------------------------
@register_adapter
class MMDAdapter(Adapter):
    """Source CE + lam(t) * (mmd_weight * MK-MMD + coral_weight * CORAL) on bottleneck features."""

    name = "mmd"
    needs_source = True

    def _check(self, cfg: AdaptConfig, src: CachedSet | None, tgt: CachedSet) -> None:
        if len(tgt) < 2:
            raise ValueError("need at least 2 site images to adapt")
        if cfg.backbone_lr_mult > 0:
            for what, cs in (("source", src), ("target", tgt)):
                if cs is None or cs.images is None:
                    raise ValueError(f"backbone_lr_mult > 0 trains the backbone from raw images: "
                                     f"the {what} CachedSet needs .images (N, 3, S, S)")

    def _weights(self, cfg: AdaptConfig) -> tuple[float, float]:
        return cfg.mmd_weight, cfg.coral_weight

    def _adapt(self, model, src, tgt, cfg, gen, report, t0):
        w_mmd, w_coral = self._weights(cfg)
        train_backbone = cfg.backbone_lr_mult > 0
        train_top = cfg.top_lr_mult > 0 or train_backbone
        model.train()  # the frozen part's BN keeps the champion's statistics (EmotionNet.train)
        head_params = list(model.bottleneck.parameters()) + list(model.head.parameters())
        groups = [{"params": head_params, "lr": cfg.lr}]
        flip = False
        if train_backbone:
            for p in model.frozen.parameters():
                p.requires_grad_(True)
            groups.append({"params": list(model.frozen.parameters()) + list(model.top.parameters()),
                           "lr": cfg.lr * cfg.backbone_lr_mult})
            xs, xt = src.images, tgt.images
            encode = model.features
            flip = cfg.mirror_source
        elif train_top:
            groups.append({"params": list(model.top.parameters()), "lr": cfg.lr * cfg.top_lr_mult})
            xs, xt = src.h, tgt.h
            encode = model.embed_cached
        else:
            # Top frozen: its output is a fixed function of h, cache it once (eval-mode BN).
            for p in model.top.parameters():
                p.requires_grad_(False)
            xs, xt = frozen_top_outputs(model, src.h, tgt.h, cfg, gen)
            encode = model.bottleneck
        opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        it_s = _sampler(len(xs), cfg.batch_size, gen)
        it_t = _sampler(len(xt), cfg.batch_size, gen)
        done, early = 0, False
        for step in range(1, cfg.steps + 1):
            if time.perf_counter() - t0 > cfg.time_budget_s:
                early = True
                break
            i_s, i_t = next(it_s), next(it_t)
            xb = xs[i_s]
            if flip:
                mirror = torch.rand(len(i_s), generator=gen) < 0.5
                xb = torch.where(mirror[:, None, None, None], xb.flip(-1), xb)
            z = encode(torch.cat([xb, xt[i_t]]))  # one BN batch: both domains  (2B, D)
            zs, zt = z[: len(i_s)], z[len(i_s):]
            ce = F.cross_entropy(model.head(zs), src.labels[i_s])
            lam = rampup(step, cfg.steps, cfg.rampup_gamma)
            mmd = mk_mmd2(zs, zt, cfg.kernel_multipliers) if w_mmd > 0 else zs.new_zeros(())
            cor = coral_loss(zs, zt) if w_coral > 0 else zs.new_zeros(())
            loss = ce + lam * (w_mmd * mmd + w_coral * cor)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done = step
            report.step(step, cfg.steps, t0, loss=loss.item(), ce=ce.item(), mmd=mmd.item(),
                        coral=cor.item(), lam=lam)
        if not train_top:
            for p in model.top.parameters():
                p.requires_grad_(True)
        h_t = tgt.h
        if train_backbone:
            for p in model.frozen.parameters():
                p.requires_grad_(False)
            model.eval()
            if cfg.final_bn == "target":
                h_t = cache_activations(model, tgt.images, cfg.eval_batch_size)
        if cfg.final_bn == "target":
            # A frozen top kept its source statistics in training: leave them as they are.
            _adabn(model, h_t, cfg, include_top=train_top)
        return {"steps_done": done, "stopped_early": early, "frozen_changed": train_backbone}


@register_adapter
class CoralAdapter(MMDAdapter):
    """Source CE + lam(t) * coral_weight * CORAL (Deep CORAL; no MMD term)."""

    name = "coral"

    def default_config(self) -> AdaptConfig:
        return AdaptConfig(coral_weight=100.0)

    def _check(self, cfg, src, tgt):
        super()._check(cfg, src, tgt)
        if cfg.coral_weight <= 0:
            raise ValueError("method 'coral' needs coral_weight > 0 (its default config uses 100)")

    def _weights(self, cfg):
        return 0.0, cfg.coral_weight


@torch.no_grad()
def _top_outputs(model: EmotionNet, h: torch.Tensor, cfg: AdaptConfig) -> torch.Tensor:
    was = model.top.training
    model.top.eval()
    out = torch.cat([model.top(b) for b in _batches(h, cfg.eval_batch_size)])  # (N, P)
    model.top.train(was)
    return out


def frozen_top_outputs(model: EmotionNet, h_src: torch.Tensor, h_tgt: torch.Tensor,
                       cfg: AdaptConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For training with the top frozen: give the top the BN statistics ``cfg.top_bn`` asks
    for, then return its (fixed) outputs for the source and the site activations."""
    if cfg.top_bn != "source":
        _top_bn(model, h_src if cfg.top_bn == "mixed" else None, h_tgt, cfg, gen)
    return _top_outputs(model, h_src, cfg), _top_outputs(model, h_tgt, cfg)


@torch.no_grad()
def _top_bn(model: EmotionNet, h_src: torch.Tensor | None, h_tgt: torch.Tensor, cfg: AdaptConfig,
            gen: torch.Generator) -> None:
    """Re-estimate the top's BN statistics on the site, or on site batches each paired with an
    equally large random source batch (h_src given): both domains weigh the same."""
    batches = _batches(h_tgt, cfg.eval_batch_size // (2 if h_src is not None else 1))
    if h_src is not None:
        batches = [torch.cat([b, h_src[torch.randint(0, len(h_src), (len(b),), generator=gen)]])
                   for b in batches]
    was = model.top.training
    model.top.eval()
    reestimate_bn(_bn_modules(model.top), model.top, batches)
    model.top.train(was)


@torch.no_grad()
def _adabn(model: EmotionNet, h: torch.Tensor, cfg: AdaptConfig, include_top: bool,
           site_weight: float = 1.0, mix_with: list[tuple[torch.Tensor, torch.Tensor]] | None = None
           ) -> None:
    """Re-estimate BN running stats of (top +) bottleneck on site activations, no dropout;
    ``site_weight`` < 1 mixes them (``mix_bn_stats``) with ``mix_with`` (``_bn_stats`` of the
    same modules), by default with the statistics they replace."""
    bns = _bn_modules(model.bottleneck) + (_bn_modules(model.top) if include_top else [])
    before = mix_with if mix_with is not None else _bn_stats(bns)
    was = model.training
    model.eval()
    reestimate_bn(bns, model.embed_cached, _batches(h, cfg.eval_batch_size))
    model.train(was)
    if site_weight < 1.0:
        mix_bn_stats(bns, before, site_weight)


def _bn_stats(bns: list[nn.modules.batchnorm._BatchNorm]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the running (mean, var) of each module."""
    return [(b.running_mean.clone(), b.running_var.clone()) for b in bns]


@torch.no_grad()
def mix_bn_stats(bns: list[nn.modules.batchnorm._BatchNorm],
                 old: list[tuple[torch.Tensor, torch.Tensor]], w: float) -> None:
    """Replace each BN's running statistics (mu_t, var_t) by the moments of the mixture
    ``w * N(mu_t, var_t) + (1 - w) * N(mu_s, var_s)`` with ``old`` = [(mu_s, var_s)]:
    mean w mu_t + (1-w) mu_s, variance w var_t + (1-w) var_s + w (1-w) (mu_t - mu_s)^2."""
    for b, (mu_s, var_s) in zip(bns, old, strict=True):
        mu_t, var_t = b.running_mean.clone(), b.running_var.clone()
        b.running_mean.copy_(w * mu_t + (1 - w) * mu_s)
        b.running_var.copy_(w * var_t + (1 - w) * var_s + w * (1 - w) * (mu_t - mu_s) ** 2)


# --- adabn ----------------------------------------------------------------------------------------
@register_adapter
class AdaBNAdapter(Adapter):
    """AdaBN (Li et al. 2016): BN running statistics re-estimated on the site; no gradients.

    scope "trainable": BN of the top blocks and the bottleneck, from cached activations.
    scope "all": also the frozen part's BN, from ``target.images`` (raw normalised images).
    The frozen part's output then changes, so the result sets ``frozen_changed`` and every
    cached activation of the input model is stale for the returned one.
    """

    name = "adabn"

    def _check(self, cfg, src, tgt):
        if cfg.adabn_scope == "all" and tgt.images is None:
            raise ValueError("adabn with adabn_scope='all' needs target.images (raw normalised "
                             "images): the frozen part's BN cannot be re-estimated from its "
                             "own cached outputs")

    def _adapt(self, model, src, tgt, cfg, gen, report, t0):
        frozen_changed = False
        h = tgt.h
        if cfg.adabn_scope == "all":
            fbns = _bn_modules(model.frozen)
            model.eval()
            reestimate_bn(fbns, model.frozen_forward, _batches(tgt.images, cfg.eval_batch_size))
            for b in fbns:
                b.eval()
            with torch.no_grad():
                h = torch.cat([model.frozen_forward(b) for b in _batches(tgt.images, cfg.eval_batch_size)])
            frozen_changed = bool(fbns)
        _adabn(model, h, cfg, include_top=True, site_weight=cfg.site_bn_weight)
        report.step(1, 1, t0, n_bn=float(len(_bn_modules(model.top)) + len(_bn_modules(model.bottleneck))))
        return {"steps_done": 1, "frozen_changed": frozen_changed}


# --- source-free: shot-im and tent ------------------------------------------------------------------
class _EntropyAdapter(Adapter):
    """Shared loop: minimise mean entropy - diversity_weight * H(mean p) over site batches,
    BN in train mode (batch statistics, as Tent), no dropout; then AdaBN so that the
    eval-mode model uses site statistics too."""

    use_diversity = True

    def _params(self, model: EmotionNet, cfg: AdaptConfig) -> list[nn.Parameter]:
        raise NotImplementedError

    def _check(self, cfg, src, tgt):
        if len(tgt) < 2:
            raise ValueError("need at least 2 site images to adapt")

    def _adapt(self, model, src, tgt, cfg, gen, report, t0):
        params = self._params(model, cfg)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        # Start from site statistics: entropy gradients through source BN stats are misleading.
        source_stats = _bn_stats(_bn_modules(model.bottleneck) + _bn_modules(model.top))
        _adabn(model, tgt.h, cfg, include_top=True)
        model.train()
        _set_dropout(model, False)
        opt = torch.optim.Adam(params, lr=cfg.sf_lr)
        it_t = _sampler(len(tgt), cfg.batch_size, gen)
        done, early = 0, False
        for step in range(1, cfg.steps + 1):
            if time.perf_counter() - t0 > cfg.time_budget_s:
                early = True
                break
            _, logits = model.forward_cached(tgt.h[next(it_t)])
            p = logits.softmax(1)  # (B, K)
            ent = _entropy(p).mean()
            div = _entropy(p.mean(0)) if self.use_diversity else p.new_zeros(())
            loss = ent - (cfg.diversity_weight * div if self.use_diversity else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done = step
            report.step(step, cfg.steps, t0, loss=loss.item(), entropy=ent.item(), diversity=div.item())
        for p in model.parameters():
            p.requires_grad_(True)
        for p in model.frozen.parameters():
            p.requires_grad_(False)
        # the champion's statistics, not those training left, are the training domain's
        _adabn(model, tgt.h, cfg, include_top=True, site_weight=cfg.site_bn_weight,
               mix_with=source_stats)
        return {"steps_done": done, "stopped_early": early}


def _bn_affine(module: nn.Module) -> list[nn.Parameter]:
    return [p for b in _bn_modules(module) for p in (b.weight, b.bias) if p is not None]


@register_adapter
class ShotIMAdapter(_EntropyAdapter):
    """SHOT-IM (Liang et al. 2020) without pseudo-labels: information maximisation on the site.
    Updates the bottleneck (Linear + BN) and, with ``shot_top_bn``, the top's BN affine; the
    head (the source hypothesis) stays frozen."""

    name = "shot-im"

    def _params(self, model, cfg):
        ps = list(model.bottleneck.parameters())
        return ps + (_bn_affine(model.top) if cfg.shot_top_bn else [])


@register_adapter
class TentAdapter(_EntropyAdapter):
    """Tent (Wang et al. 2021): entropy minimisation of BN affine parameters only (top +
    bottleneck), with batch statistics; no diversity term."""

    name = "tent"
    use_diversity = False

    def _params(self, model, cfg):
        return _bn_affine(model.top) + _bn_affine(model.bottleneck)


__all__ = [
    "ADAPTERS", "BACKBONE_BATCH", "BACKBONE_STEPS", "AdaptConfig", "AdaptResult", "Adapter",
    "CachedSet", "adapt", "as_cached_set", "available_adapters", "cache_activations",
    "cached_outputs", "coral_loss", "frozen_top_outputs", "get_adapter", "mix_bn_stats", "mk_mmd2",
    "rampup", "reestimate_bn", "register_adapter", "with_backbone",
]
