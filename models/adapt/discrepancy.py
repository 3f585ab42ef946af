"""The discrepancy methods ``mmd`` (the paper's: source cross-entropy + DAN-style multi-kernel
MMD between source and site bottleneck features) and ``coral`` (Deep CORAL), and their maths.

Both need labelled source activations. With the top frozen (default) its output is a fixed
function of the cached activations h and is cached once, so a step costs milliseconds; with
``top_lr_mult`` the top blocks train too, and with ``backbone_lr_mult`` every layer does, from
raw images (``CachedSet.images`` of source and site are required).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from models.adapt.base import AdaptConfig, Adapter, batches, cache_activations, sampler
from models.adapt.bn import adapt_top_bn, bn_modules, reestimate_bn
from models.network import EmotionNet


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


def rampup(step: int, steps: int, gamma: float) -> float:
    """DANN schedule 2/(1+exp(-gamma p)) - 1 for p = step/steps; 1 when gamma == 0."""
    if gamma <= 0 or steps <= 0:
        return 1.0
    p = min(max(step / steps, 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


# --- configuration ---------------------------------------------------------------------------------
@dataclass
class DiscrepancyConfig(AdaptConfig):
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
    # Learning-rate multiplier of EVERYTHING below the bottleneck (stem, all blocks, head
    # conv). 0 (default) keeps the cached path. > 0 backpropagates through the whole backbone
    # from raw images, ~1.6 s per step of 16+16 photos on 2 CPU cores instead of ~1 ms, and the
    # returned model's frozen part changes (``AdaptResult.frozen_changed``). It is the only
    # lever measured that moves the blur site: the label oracle gains nothing there with the
    # backbone frozen (bench/adapt_full.py). ``BACKBONE_STEPS`` / ``BACKBONE_BATCH`` are the
    # measured recipe.
    backbone_lr_mult: float = 0.0
    # Backbone mode: mirror each source photo with p = 0.5 (the augmentation training used,
    # TrainConfig.flip). False where the classes are not left-right symmetric.
    mirror_source: bool = True
    weight_decay: float = 1e-4
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
    # With a frozen top (top_lr_mult == 0), which BN statistics the top uses while its outputs
    # are cached for training (and keeps in the returned model):
    #   "mixed":  re-estimated on equal numbers of source and site images - the site is no
    #             longer normalised with statistics it does not have, the source only partly;
    #   "source": unchanged; "site": the site's only (AdaBN; source accuracy suffers).
    top_bn: Literal["mixed", "source", "site"] = "mixed"
    # What the running BN statistics of the returned model describe:
    #   "target": re-estimated on the site (AdaBN) after training - the model is for that site;
    #   "keep":   whatever training left (mixed source+site batches).
    final_bn: Literal["target", "keep"] = "keep"

    def validate(self) -> None:
        super().validate()
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BN and MMD need pairs), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("top_lr_mult", "backbone_lr_mult", "weight_decay", "mmd_weight",
                     "coral_weight", "rampup_gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.kernel_multipliers or any(m <= 0 for m in self.kernel_multipliers):
            raise ValueError(f"kernel_multipliers must be positive, got {self.kernel_multipliers}")
        if self.final_bn not in ("target", "keep"):
            raise ValueError(f"final_bn must be 'target' or 'keep', got {self.final_bn!r}")
        if self.top_bn not in ("mixed", "source", "site"):
            raise ValueError(f"top_bn must be 'mixed', 'source' or 'site', got {self.top_bn!r}")


# The whole-backbone recipe measured in bench/adapt_full.py: 150 Adam steps of 16 source + 16
# site photos at lr 1e-4 (~4-5 min on 2 CPU cores). 16 per side, not 32: a step through the
# whole network costs ~0.05 s per photo.
BACKBONE_STEPS = 150
BACKBONE_BATCH = 16


def with_backbone(cfg: DiscrepancyConfig, lr_mult: float = 1.0) -> DiscrepancyConfig:
    """``cfg`` switched to training the whole backbone with the measured recipe."""
    return dataclasses.replace(cfg, backbone_lr_mult=lr_mult, steps=BACKBONE_STEPS,
                               batch_size=BACKBONE_BATCH)


# --- the frozen-top fast path --------------------------------------------------------------------
@torch.no_grad()
def top_outputs(model: EmotionNet, h: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The eval-mode top's pooled outputs (N, P) of cached activations."""
    was = model.top.training
    model.top.eval()
    out = torch.cat([model.top(b) for b in batches(h, batch_size)])  # (N, P)
    model.top.train(was)
    return out


@torch.no_grad()
def _top_bn(model: EmotionNet, h_src: torch.Tensor | None, h_tgt: torch.Tensor,
            batch_size: int, gen: torch.Generator) -> None:
    """Re-estimate the top's BN statistics on the site, or on site batches each paired with an
    equally large random source batch (h_src given): both domains weigh the same."""
    bs = batches(h_tgt, batch_size // (2 if h_src is not None else 1))
    if h_src is not None:
        bs = [torch.cat([b, h_src[torch.randint(0, len(h_src), (len(b),), generator=gen)]])
              for b in bs]
    was = model.top.training
    model.top.eval()
    reestimate_bn(bn_modules(model.top), model.top, bs)
    model.top.train(was)


def frozen_top_outputs(model: EmotionNet, h_src: torch.Tensor, h_tgt: torch.Tensor,
                       cfg: DiscrepancyConfig, gen: torch.Generator
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """For training with the top frozen: give the top the BN statistics ``cfg.top_bn`` asks
    for, then return its (fixed) outputs for the source and the site activations."""
    if cfg.top_bn != "source":
        _top_bn(model, h_src if cfg.top_bn == "mixed" else None, h_tgt, cfg.eval_batch_size, gen)
    return (top_outputs(model, h_src, cfg.eval_batch_size),
            top_outputs(model, h_tgt, cfg.eval_batch_size))


# --- the methods ----------------------------------------------------------------------------------
class MMDAdapter(Adapter):
    """Source CE + lam(t) * (mmd_weight * MK-MMD + coral_weight * CORAL) on bottleneck features."""

    name = "mmd"
    needs_source = True
    config_class = DiscrepancyConfig

    def _check(self, cfg, src, tgt):
        if len(tgt) < 2:
            raise ValueError("need at least 2 site images to adapt")
        if cfg.backbone_lr_mult > 0:
            for what, cs in (("source", src), ("target", tgt)):
                if cs is None or cs.images is None:
                    raise ValueError(f"backbone_lr_mult > 0 trains the backbone from raw images: "
                                     f"the {what} CachedSet needs .images (N, 3, S, S)")

    def _weights(self, cfg: DiscrepancyConfig) -> tuple[float, float]:
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
        it_s = sampler(len(xs), cfg.batch_size, gen)
        it_t = sampler(len(xt), cfg.batch_size, gen)
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
            adapt_top_bn(model, h_t, cfg.eval_batch_size, include_top=train_top)
        return {"steps_done": done, "stopped_early": early, "frozen_changed": train_backbone}


class CoralAdapter(MMDAdapter):
    """Source CE + lam(t) * coral_weight * CORAL (Deep CORAL; no MMD term)."""

    name = "coral"

    def default_config(self) -> DiscrepancyConfig:
        return DiscrepancyConfig(coral_weight=100.0)

    def _check(self, cfg, src, tgt):
        super()._check(cfg, src, tgt)
        if cfg.coral_weight <= 0:
            raise ValueError("method 'coral' needs coral_weight > 0 (its default config uses 100)")

    def _weights(self, cfg):
        return 0.0, cfg.coral_weight


__all__ = [
    "BACKBONE_BATCH", "BACKBONE_STEPS", "CoralAdapter", "DiscrepancyConfig", "MMDAdapter",
    "coral_loss", "frozen_top_outputs", "mk_mmd2", "rampup", "top_outputs", "with_backbone",
]
