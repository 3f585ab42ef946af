"""Source-free adaptation by entropy: ``shot-im`` (SHOT-IM, Liang et al. 2020) and ``tent``
(Tent, Wang et al. 2021). They need no training data: only the site's cached activations.

Shared loop: minimise mean entropy - diversity_weight * H(mean p) over site batches, BN in train
mode (batch statistics, as Tent), no dropout; then re-estimate BN statistics on the site so the
eval-mode model uses site statistics too (mixed with the champion's at ``site_bn_weight``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from models.adapt.base import AdaptConfig, Adapter, entropy, sampler, set_dropout
from models.adapt.bn import (
    adapt_top_bn,
    bn_modules,
    bn_stats,
    check_prior,
    check_site_weight,
    prior_weight,
)
from models.network import EmotionNet


@dataclass
class EntropyConfig(AdaptConfig):
    steps: int = 300
    batch_size: int = 32
    # Adam. Larger than the discrepancy methods' rate: these update few parameters (BN
    # affine / bottleneck only).
    lr: float = 1e-3
    # Weight of the diversity term (entropy of the batch-mean prediction) in shot-im: 1 as in
    # SHOT; without it entropy minimisation collapses onto one class.
    diversity_weight: float = 1.0
    # shot-im also adapts the top's BN affine parameters (SHOT adapts the whole extractor;
    # the BN affine is the cheap part of that).
    shot_top_bn: bool = True
    # Weight of the site in the final BN statistics (models.adapt.bn): 1 = pure site statistics.
    site_bn_weight: float = 1.0
    # A source prior of N images (models.adapt.bn.AdaBNConfig.prior_n): the site weight is then
    # n / (n + N), and ``site_bn_weight`` is ignored.
    prior_n: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BN needs pairs), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.diversity_weight < 0:
            raise ValueError(f"diversity_weight must be >= 0, got {self.diversity_weight}")
        check_site_weight(self.site_bn_weight)
        check_prior(self.prior_n)


def bn_affine(module: nn.Module) -> list[nn.Parameter]:
    return [p for b in bn_modules(module) for p in (b.weight, b.bias) if p is not None]


class EntropyAdapter(Adapter):
    """The shared loop (module docstring); subclasses choose the parameters and the loss."""

    use_diversity = True
    config_class = EntropyConfig
    source_normalisation = "champion"

    def _params(self, model: EmotionNet, cfg: EntropyConfig) -> list[nn.Parameter]:
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
        source_stats = bn_stats(bn_modules(model.bottleneck) + bn_modules(model.top))
        adapt_top_bn(model, tgt.h, cfg.eval_batch_size, include_top=True)
        model.train()
        set_dropout(model, False)
        opt = torch.optim.Adam(params, lr=cfg.lr)
        it_t = sampler(len(tgt), cfg.batch_size, gen)
        done, early = 0, False
        for step in range(1, cfg.steps + 1):
            if time.perf_counter() - t0 > cfg.time_budget_s:
                early = True
                break
            _, logits = model.forward_cached(tgt.h[next(it_t)])
            p = logits.softmax(1)  # (B, K)
            ent = entropy(p).mean()
            div = entropy(p.mean(0)) if self.use_diversity else p.new_zeros(())
            loss = ent - (cfg.diversity_weight * div if self.use_diversity else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done = step
            report.step(step, cfg.steps, t0, loss=loss.item(), entropy=ent.item(),
                        diversity=div.item())
        for p in model.parameters():
            p.requires_grad_(True)
        for p in model.frozen.parameters():
            p.requires_grad_(False)
        # the champion's statistics, not those training left, are the training domain's
        w = cfg.site_bn_weight if cfg.prior_n is None else prior_weight(len(tgt), cfg.prior_n)
        adapt_top_bn(model, tgt.h, cfg.eval_batch_size, include_top=True,
                     site_weight=w, mix_with=source_stats)
        return {"steps_done": done, "stopped_early": early}


class ShotIMAdapter(EntropyAdapter):
    """SHOT-IM without pseudo-labels: information maximisation on the site. Updates the
    bottleneck (Linear + BN) and, with ``shot_top_bn``, the top's BN affine; the head (the
    source hypothesis) stays frozen."""

    name = "shot-im"

    def _params(self, model, cfg):
        ps = list(model.bottleneck.parameters())
        return ps + (bn_affine(model.top) if cfg.shot_top_bn else [])


class TentAdapter(EntropyAdapter):
    """Tent: entropy minimisation of BN affine parameters only (top + bottleneck), with batch
    statistics; no diversity term."""

    name = "tent"
    use_diversity = False

    def _params(self, model, cfg):
        return bn_affine(model.top) + bn_affine(model.bottleneck)


__all__ = ["EntropyAdapter", "EntropyConfig", "ShotIMAdapter", "TentAdapter", "bn_affine"]
