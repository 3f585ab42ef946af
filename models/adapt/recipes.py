"""The recipes of the re-adaptation portfolio: how one member adapts the champion to one set.

A member of ``models.catalog.PORTFOLIO`` is ``(name, recipe, params)``; the recipe is a class
registered in ``models.catalog.RECIPES`` (protocol :class:`Recipe`). A new recipe is one class
here (or anywhere) and one line in that table; the portfolio asks the class, never the name,
what it needs (the training data, the raw images) and how it combines with others.

    bn       top + bottleneck BN statistics re-estimated on the set, mixed with the champion's
             at n/(n+N) (Schneider et al. 2020), from cached activations
    bn-all   the same for every BN layer (the frozen part from the raw images)
    tent     Tent (BN affine, entropy) on top of the best BN member, a few steps
    shot-im  SHOT-IM on top of the best BN member
    mmd      the paper's loss (source CE + MK-MMD), top layers, cached activations
    mmd-backbone  mmd through the whole backbone (minutes: only when the budget allows)

Pure torch: the sets are built by the flow's task (``tasks.portfolio``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from models.adapt.base import AdaptResult, CachedSet, get_adapter
from models.adapt.bn import bn_modules, bn_stats, load_bn_stats
from models.network import EmotionNet


@dataclass(frozen=True)
class Member:
    """One member of the portfolio (``models.catalog.PORTFOLIO``): its ``kind`` names its
    recipe (``models.catalog.RECIPES``)."""

    name: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def recipe(self) -> Recipe:
        from models.catalog import load

        return load("recipe", self.kind)()

    @property
    def needs_source(self) -> bool:
        return self.recipe.needs_source

    @property
    def needs_images(self) -> bool:
        return self.recipe.needs_images

    @property
    def bn_kind(self) -> bool:
        return self.recipe.bn_statistics


@dataclass
class SiteSet:
    """What a recipe is applied to: the site (no labels) or a proxy (labels)."""

    h: torch.Tensor  # (n, C, s, s) the champion's frozen activations
    images: torch.Tensor | None = None  # (n, 3, S, S) normalised; needs_images recipes use them
    labels: np.ndarray | None = None  # proxies only
    name: str = "site"

    def __len__(self) -> int:
        return int(self.h.shape[0])


@dataclass
class Applied:
    """A recipe applied to one set: the adapted model and the set's activations under it."""

    result: AdaptResult
    h: torch.Tensor


@dataclass
class Context:
    """What a recipe's :meth:`Recipe.apply` gets besides the member and the set."""

    champion: EmotionNet
    source: CachedSet | None  # the labelled training data (None: source-free)
    base: Applied | None  # the best BN member's result on the same set (builds_on_bn recipes)
    base_member: Member | None
    seed: int
    precision: str
    time_budget_s: float
    scale: float = 1.0  # set size / site size: a prior of N images is scaled by it


class Recipe:
    """Protocol of a portfolio recipe. Class attributes say what it needs and how it
    combines; :meth:`apply` adapts ``ctx.champion`` to ``data``."""

    needs_source: ClassVar[bool] = False  # the labelled training data
    needs_images: ClassVar[bool] = False  # the raw images (it changes the frozen part)
    bn_statistics: ClassVar[bool] = False  # its result is a base for builds_on_bn recipes
    builds_on_bn: ClassVar[bool] = False  # starts from the best bn_statistics member
    whole_backbone: ClassVar[bool] = False  # trains the whole backbone (the training images
    # are decoded for it: tasks.readapt)

    def apply(self, member: Member, data: SiteSet, ctx: Context) -> Applied:
        raise NotImplementedError


def _copy_top_stats(dst: EmotionNet, src: EmotionNet) -> None:
    """dst's top and bottleneck BN running statistics := src's."""
    load_bn_stats(bn_modules(dst.top) + bn_modules(dst.bottleneck),
                  bn_stats(bn_modules(src.top) + bn_modules(src.bottleneck)))


class TopBN(Recipe):
    """AdaBN with a prior of ``prior_n`` training-domain images, top and bottleneck."""

    bn_statistics = True
    scope = "trainable"

    def apply(self, member: Member, data: SiteSet, ctx: Context) -> Applied:
        ad = get_adapter("adabn")
        cfg = ad.default_config()
        cfg.scope = self.scope
        cfg.prior_n = float(member.params.get("prior_n", 0.0)) * ctx.scale
        cfg.precision = ctx.precision
        res = ad.adapt(ctx.champion, None, CachedSet(h=data.h, images=data.images), cfg)
        return Applied(res, res.site_h if res.frozen_changed else data.h)


class AllBN(TopBN):
    """AdaBN of every BN layer, the frozen part included (from the raw images)."""

    needs_images = True
    scope = "all"


class EntropyRecipe(Recipe):
    """A source-free entropy method (``adapter``) on top of the best BN member's result."""

    builds_on_bn = True
    adapter: ClassVar[str] = ""

    def apply(self, member: Member, data: SiteSet, ctx: Context) -> Applied:
        ad = get_adapter(self.adapter)
        cfg = ad.default_config()
        cfg.steps = int(member.params.get("steps", cfg.steps))
        cfg.batch_size = int(member.params.get("batch_size", cfg.batch_size))
        cfg.time_budget_s = ctx.time_budget_s
        start, h = ctx.champion, data.h
        base = ctx.base
        if base is not None and ctx.base_member is not None:
            cfg.prior_n = float(ctx.base_member.params.get("prior_n", 0.0)) * ctx.scale
            if base.result.frozen_changed:
                # the bn-all member's frozen part; the top's statistics start from the
                # champion's so that the prior mixes with the training domain's, not twice
                start = copy.deepcopy(base.result.model)
                _copy_top_stats(start, ctx.champion)
                h = base.h
        res = ad.adapt(start, None, CachedSet(h=h), cfg)
        res.frozen_changed = bool(base is not None and base.result.frozen_changed)
        return Applied(res, h)


class Tent(EntropyRecipe):
    adapter = "tent"


class ShotIM(EntropyRecipe):
    adapter = "shot-im"


class MMDTop(Recipe):
    """The paper's discrepancy loss on the top layers (cached activations); parameters of
    the member override the adapter's config fields of the same name."""

    needs_source = True

    def config(self, ad: Any) -> Any:
        return ad.default_config()

    def apply(self, member: Member, data: SiteSet, ctx: Context) -> Applied:
        if ctx.source is None:
            raise ValueError(f"{member.name} needs the labelled training data")
        ad = get_adapter("mmd")
        cfg = self.config(ad)
        cfg.time_budget_s = ctx.time_budget_s
        for k, v in member.params.items():
            if hasattr(cfg, k):
                setattr(cfg, k, v)
        cfg.seed = ctx.seed
        res = ad.adapt(ctx.champion, ctx.source, CachedSet(h=data.h, images=data.images), cfg)
        if res.frozen_changed:
            from models.adapt.bn import frozen_outputs

            h = frozen_outputs(res.model, data.images, None, ctx.precision)
            res.site_h = h
            return Applied(res, h)
        return Applied(res, data.h)


class MMDBackbone(MMDTop):
    """mmd through the whole backbone (raw images; minutes on 2 cores)."""

    needs_images = True
    whole_backbone = True

    def config(self, ad: Any) -> Any:
        from models.adapt.discrepancy import with_backbone

        cfg = ad.default_config()
        return with_backbone(cfg)


__all__ = ["AllBN", "Applied", "Context", "EntropyRecipe", "MMDBackbone", "MMDTop", "Member", "Recipe",
           "ShotIM", "SiteSet", "Tent", "TopBN"]
