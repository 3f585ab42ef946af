"""Batch-norm statistics: re-estimation on a site, mixing with the training domain's, and the
``adabn`` adaptation method (AdaBN, Li et al. 2016; with a source prior, Schneider et al. 2020).

A model's running BN statistics describe the data it normalises. The champion's describe the
training domain; re-estimating them on site images (AdaBN) normalises the site with its own
statistics, at the cost of normalising training-domain images with statistics they do not have.
The moment-matched mixture keeps some of both:

    mean = w mu_t + (1 - w) mu_s,   var = w var_t + (1 - w) var_s + w (1 - w) (mu_t - mu_s)^2

with the site's weight ``w``; with a source prior of N images and n site images (Schneider et
al.), ``w = n / (n + N)`` (:func:`prior_weight`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from models.adapt.base import AdaptConfig, Adapter, batches
from models.network import EmotionNet

BatchNorm = nn.modules.batchnorm._BatchNorm  # the base of BatchNorm1d/2d/3d


def bn_modules(module: nn.Module) -> list[BatchNorm]:
    return [m for m in module.modules() if isinstance(m, BatchNorm)]


def bn_stats(bns: list[BatchNorm]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the running (mean, var) of each module."""
    return [(b.running_mean.clone(), b.running_var.clone()) for b in bns]


@torch.no_grad()
def load_bn_stats(bns: list[BatchNorm], stats: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set each module's running (mean, var) to ``stats`` (``bn_stats`` of matching modules)."""
    for b, (mu, var) in zip(bns, stats, strict=True):
        b.running_mean.copy_(mu)
        b.running_var.copy_(var)


def with_bn_stats_of(model: nn.Module, like: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) whose every BN layer's running statistics are those of
    the matching layer of ``like``: the candidate's weights normalised as ``like`` (the
    champion: the training domain's statistics) normalises."""
    import copy

    m = copy.deepcopy(model)
    load_bn_stats(bn_modules(m), bn_stats(bn_modules(like)))
    return m.eval()


def prior_weight(n_site: int, prior_n: float) -> float:
    """Weight of the site's statistics when the training domain counts as ``prior_n`` images
    (Schneider et al. 2020): n / (n + N)."""
    if n_site < 0 or prior_n < 0:
        raise ValueError(f"n_site and prior_n must be >= 0, got {n_site} and {prior_n}")
    return 1.0 if n_site + prior_n == 0 else n_site / (n_site + prior_n)


@torch.no_grad()
def reestimate_bn(bns: list[BatchNorm], forward: Callable[[torch.Tensor], Any],
                  batches_: list[torch.Tensor]) -> None:
    """AdaBN: reset the running statistics of ``bns`` and recompute them as the cumulative
    average over ``batches_`` (each run through ``forward`` with those BNs in train mode)."""
    saved = [(b.momentum, b.training) for b in bns]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # cumulative moving average: every batch counts the same
        b.train()
    for xb in batches_:
        forward(xb)
    for b, (mom, tr) in zip(bns, saved, strict=True):
        b.momentum = mom
        b.train(tr)


@torch.no_grad()
def mix_bn_stats(bns: list[BatchNorm], old: list[tuple[torch.Tensor, torch.Tensor]],
                 w: float) -> None:
    """Replace each BN's running statistics (mu_t, var_t) by the moments of the mixture
    ``w * N(mu_t, var_t) + (1 - w) * N(mu_s, var_s)`` with ``old`` = [(mu_s, var_s)]:
    mean w mu_t + (1-w) mu_s, variance w var_t + (1-w) var_s + w (1-w) (mu_t - mu_s)^2."""
    for b, (mu_s, var_s) in zip(bns, old, strict=True):
        mu_t, var_t = b.running_mean.clone(), b.running_var.clone()
        b.running_mean.copy_(w * mu_t + (1 - w) * mu_s)
        b.running_var.copy_(w * var_t + (1 - w) * var_s + w * (1 - w) * (mu_t - mu_s) ** 2)


@torch.no_grad()
def adapt_top_bn(model: EmotionNet, h: torch.Tensor, batch_size: int, include_top: bool,
                 site_weight: float = 1.0,
                 mix_with: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Re-estimate BN running stats of (top +) bottleneck on site activations, no dropout;
    ``site_weight`` < 1 mixes them (:func:`mix_bn_stats`) with ``mix_with`` (``bn_stats`` of
    the same modules), by default with the statistics they replace."""
    bns = bn_modules(model.bottleneck) + (bn_modules(model.top) if include_top else [])
    before = mix_with if mix_with is not None else bn_stats(bns)
    was = model.training
    model.eval()
    reestimate_bn(bns, model.embed_cached, batches(h, batch_size))
    model.train(was)
    if site_weight < 1.0:
        mix_bn_stats(bns, before, site_weight)


def check_site_weight(w: float) -> None:
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"site_bn_weight must be in [0, 1], got {w}")


def check_prior(prior_n: float | None) -> None:
    if prior_n is not None and not prior_n >= 0:
        raise ValueError(f"prior_n must be >= 0 (images), got {prior_n}")


def _frozen_forward_in(model: EmotionNet, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The frozen part's forward (float32 out) in ``precision``, channels-last (bf16 under
    autocast), as the version runs (the caller puts the weights in that format)."""
    from models.evaluate import inference_context

    def fwd(x: torch.Tensor) -> torch.Tensor:
        with inference_context(precision):
            return model.frozen_forward(x.contiguous(memory_format=torch.channels_last)).float()

    return fwd


@torch.no_grad()
def reestimate_frozen(model: EmotionNet, images: torch.Tensor, precision: str = "fp32",
                      stats_batch: int = 32) -> None:
    """AdaBN on the frozen part's BN layers from normalised ``images``: one train-mode pass in
    batches of ``stats_batch``; the running statistics are then the images'."""
    from models.engine import channels_last

    fbns = bn_modules(model.frozen)
    model.eval()
    try:
        with channels_last(model.frozen):
            reestimate_bn(fbns, _frozen_forward_in(model, precision), batches(images, stats_batch))
    finally:
        for b in fbns:
            b.eval()


@torch.no_grad()
def frozen_outputs(model: EmotionNet, images: torch.Tensor, batch_size: int | None = None,
                   precision: str = "fp32", engine: str = "auto") -> torch.Tensor:
    """The frozen part's outputs (float32) of normalised ``images``, in eval mode. fp32: ONNX
    Runtime where installed (``models.engine.frozen_runner``: exported once per content of the
    frozen part, for enough images), else PyTorch; bf16: PyTorch's autocast. PyTorch runs
    channels-last in batches of ``batch_size`` (None: ``models.engine.TORCH_BATCH``, measured
    fastest)."""
    from models.engine import TORCH_BATCH, channels_last_pass, frozen_runner
    from models.evaluate import inference_context

    model.eval()
    if precision == "fp32" and batch_size is None:
        run = frozen_runner(model, model.config.img_size, engine, None, n_images=len(images))
        return torch.cat([run(b) for b in batches(images, 32)])
    with inference_context(precision):
        return channels_last_pass(model.frozen, model.frozen_forward, images,
                                  batch_size or TORCH_BATCH[precision])


@dataclass
class AdaBNConfig(AdaptConfig):
    # "trainable" re-estimates BN of the top + bottleneck from cached activations; "all" also
    # the frozen part (mixed at the same site weight), which needs ``target.images`` and makes
    # cached activations of the returned model differ from the input model's.
    scope: Literal["trainable", "all"] = "trainable"
    # The weight of the site in the final statistics: 1 is AdaBN (pure site); 0.5 the moment-
    # matched mixture with the champion's running statistics (the training domain's: no source
    # data needed). adabn at 0.5 on Emotion6 night/blur sites (bench/adapt.py, seeds 0-2): night
    # gap recovered 0.62/0.27/0.33 and blur 0.43/0.00/0.26, losing at most 4.8 points of
    # source accuracy (pure AdaBN: up to 14). One set of statistics cannot serve two domains
    # far apart: on a strong synthetic shift 0.5 fixes nothing (tests/test_adapt.py), so the
    # default stays pure AdaBN.
    site_bn_weight: float = 1.0
    # A source prior of N images (Schneider et al. 2020): when set, the site weight is
    # n / (n + N) for n site images and ``site_bn_weight`` is ignored. The portfolio
    # (models.adapt.portfolio) tries several N.
    prior_n: float | None = None
    # Arithmetic of the frozen part's passes (scope "all"): "fp32" or "bf16" (autocast,
    # channels-last; what the version runs at, models.evaluate.inference_context).
    precision: str = "fp32"
    # scope "all": the frozen part's site statistics from at most this many of the site's
    # images (evenly spaced; each conv BN sees every pixel position of each, so 128 images
    # are tens of thousands of samples per channel) -- the pass that collects them is the
    # costly half of whole-network BN. The site weight still counts every site image.
    stats_images: int = 128

    def validate(self) -> None:
        super().validate()
        if self.stats_images < 2:
            raise ValueError(f"stats_images must be >= 2, got {self.stats_images}")
        if self.scope not in ("trainable", "all"):
            raise ValueError(f"scope must be 'trainable' or 'all', got {self.scope!r}")
        check_site_weight(self.site_bn_weight)
        check_prior(self.prior_n)

    def weight(self, n_site: int) -> float:
        """The site's weight in the final statistics for ``n_site`` site images."""
        return self.site_bn_weight if self.prior_n is None else prior_weight(n_site, self.prior_n)


class AdaBNAdapter(Adapter):
    """AdaBN: BN running statistics re-estimated on the site; no gradients.

    scope "trainable": BN of the top blocks and the bottleneck, from cached activations.
    scope "all": also the frozen part's BN, from ``target.images`` (raw normalised images).
    The frozen part's output then changes, so the result sets ``frozen_changed`` and every
    cached activation of the input model is stale for the returned one.
    """

    name = "adabn"
    config_class = AdaBNConfig
    source_normalisation = "champion"

    def _check(self, cfg, src, tgt):
        if cfg.scope == "all" and tgt.images is None:
            raise ValueError("adabn with scope='all' needs target.images (raw normalised "
                             "images): the frozen part's BN cannot be re-estimated from its "
                             "own cached outputs")

    def _adapt(self, model, src, tgt, cfg, gen, report, t0):
        frozen_changed = False
        h = tgt.h
        w = cfg.weight(len(tgt))
        if cfg.scope == "all":
            # site statistics from one train-mode pass, mixed with the champion's; then the
            # outputs under the final statistics (one eval-mode pass)
            fbns = bn_modules(model.frozen)
            before = bn_stats(fbns)
            n = len(tgt.images)
            pick = (torch.linspace(0, n - 1, cfg.stats_images).round().long().unique()
                    if n > cfg.stats_images else torch.arange(n))
            reestimate_frozen(model, tgt.images[pick], cfg.precision)
            if w < 1.0:
                mix_bn_stats(fbns, before, w)
            h = frozen_outputs(model, tgt.images, None, cfg.precision)
            frozen_changed = bool(fbns)
        adapt_top_bn(model, h, cfg.eval_batch_size, include_top=True, site_weight=w)
        report.step(1, 1, t0, site_weight=w, n_bn=float(len(bn_modules(model.top)) +
                                                        len(bn_modules(model.bottleneck))))
        return {"steps_done": 1, "frozen_changed": frozen_changed, "site_h": h}


__all__ = [
    "AdaBNAdapter", "AdaBNConfig", "BatchNorm", "adapt_top_bn", "bn_modules", "bn_stats",
    "check_prior", "check_site_weight", "frozen_outputs", "load_bn_stats", "mix_bn_stats",
    "prior_weight", "reestimate_bn", "reestimate_frozen",
]
