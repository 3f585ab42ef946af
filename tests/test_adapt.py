"""Unsupervised re-adaptation (models/adapt/base.py) on a tiny backbone and a synthetic site shift.

The toy: 4 classes, each a bright square in one quadrant of a noisy 32 px image; the site
sees the same scenes darker, lower-contrast, noisier and with a red cast (a "night camera").
The source model is near-perfect on the source and at chance on the site.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.adapt.base import (
    AdaptConfig,
    Adapter,
    CachedSet,
    adapt,
    available_adapters,
    cached_outputs,
    get_adapter,
)
from models.adapt.bn import AdaBNConfig, mix_bn_stats, prior_weight
from models.adapt.discrepancy import (
    BACKBONE_BATCH,
    BACKBONE_STEPS,
    DiscrepancyConfig,
    coral_loss,
    mk_mmd2,
    rampup,
    with_backbone,
)
from models.adapt.entropy import EntropyConfig
from models.network import Checkpoint, EmotionNet, NetConfig, preprocessing_for

K, S = 4, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: thread start-up/spin costs more than the maths, worst when other jobs
    share the cores; one thread keeps these tests at a few CPU seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_scenes(n: int, seed: int, site: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = 0.5 * torch.randn(n, 3, S, S, generator=g)
    for c in range(K):
        r, q = divmod(c, 2)
        x[y == c, :, r * S // 2:(r + 1) * S // 2, q * S // 2:(q + 1) * S // 2] += 1.0
    if site:
        x = 0.3 * x - 1.0 + 0.3 * torch.randn(x.shape, generator=g)
        x[:, 0] += 0.8
    return x, y


def train_toy_model() -> tuple[EmotionNet, tuple[torch.Tensor, torch.Tensor]]:
    """The tiny source model of the toy (seeded) and its source training scenes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = EmotionNet(NetConfig(backbone="tiny", img_size=S, num_classes=K, pretrained=False))
        xs, ys = make_scenes(384, 0)
        opt = torch.optim.Adam(model.trainable_parameters(), 3e-3)
        model.train()
        for _ in range(120):
            i = torch.randint(0, len(xs), (64,))
            loss = F.cross_entropy(model(xs[i]), ys[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), (xs, ys)


@pytest.fixture(scope="module")
def toy():
    """(model, source (h,y), source-val (h,y), site (h,y)); tiny backbone: h is the image."""
    model, src = train_toy_model()
    return model, src, make_scenes(192, 1), make_scenes(192, 2, site=True)


def acc(model, h, y) -> float:
    return float((cached_outputs(model, h)[1].argmax(1) == y.numpy()).mean())


def mmd2(a, b) -> float:
    return float(mk_mmd2(torch.as_tensor(a), torch.as_tensor(b)))


def quick(method: str, **kw):
    cfg = get_adapter(method).default_config()
    cfg.steps = kw.pop("steps", 40)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_toy_is_a_real_shift(toy):
    model, src, val, site = toy
    assert acc(model, *val) > 0.9
    assert acc(model, *site) < 0.5


def test_registry():
    assert {"mmd", "coral", "adabn", "shot-im", "tent"} <= set(available_adapters())
    with pytest.raises(ValueError, match="unknown adaptation method"):
        get_adapter("nope")
    assert DiscrepancyConfig().to_dict()["steps"] == DiscrepancyConfig().steps
    assert DiscrepancyConfig().to_dict()["kernel_multipliers"] == [0.25, 0.5, 1.0, 2.0, 4.0]
    # each method has its own config: another method's config is refused, not half-read
    with pytest.raises(ValueError, match="takes a AdaBNConfig"):
        get_adapter("adabn").adapt(EmotionNet(NetConfig(backbone="tiny", img_size=S, num_classes=K,
                                                        pretrained=False)),
                                   None, torch.zeros(4, 3, S, S), DiscrepancyConfig())


@pytest.mark.parametrize(("method", "top_lr_mult"), [("mmd", 0.0), ("coral", 0.0), ("mmd", 0.1)])
def test_discrepancy_methods_align_features_and_help(toy, method, top_lr_mult):
    model, src, val, site = toy
    res = adapt(model, src, site[0], method, quick(method, lr=1e-3, top_lr_mult=top_lr_mult))
    # the method's own discrepancy between source and site features drops
    disc = mmd2 if method == "mmd" else (lambda a, b: float(coral_loss(torch.as_tensor(a), torch.as_tensor(b))))
    before = disc(cached_outputs(model, val[0])[0], cached_outputs(model, site[0])[0])
    after = disc(cached_outputs(res.model, val[0])[0], cached_outputs(res.model, site[0])[0])
    assert after < 0.8 * before, (before, after)
    # CORAL (second moments only) helps less on this toy than MMD
    assert acc(res.model, *site) > acc(model, *site) + (0.2 if method == "mmd" else 0.1)
    assert acc(res.model, *val) > 0.9  # source kept
    assert res.method == method and res.steps_done == 40 and not res.stopped_early
    assert len(res.history) == 4 and {"loss", "ce", "mmd", "coral", "lam"} <= set(res.history[-1])
    assert all(np.isfinite(r["loss"]) for r in res.history)


@pytest.mark.parametrize("method", ["adabn", "shot-im", "tent"])
def test_source_free_methods_run_without_source_and_move_site_features(toy, method):
    model, src, val, site = toy
    res = get_adapter(method).adapt(model, None, site[0], quick(method))
    # The site's features under the adapted model move toward the source reference profile
    # (source features under the deployed model), which is what the drift monitor watches.
    z_ref = cached_outputs(model, val[0])[0]
    before = mmd2(z_ref, cached_outputs(model, site[0])[0])
    after = mmd2(z_ref, cached_outputs(res.model, site[0])[0])
    assert after < 0.5 * before, (before, after)
    assert acc(res.model, *site) > acc(model, *site) + 0.2


def test_mixed_bn_statistics_are_the_moments_of_the_pooled_population():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([0.0, 3.0, -1.0])
    b = torch.randn(4000, 3, generator=g) * torch.tensor([3.0, 1.0, 0.5]) + torch.tensor([2.0, -1.0, -1.0])
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.copy_(b.mean(0))
    bn.running_var.copy_(b.var(0, unbiased=False))
    mix_bn_stats([bn], [(a.mean(0), a.var(0, unbiased=False))], 0.5)
    pooled = torch.cat([a, b])
    assert torch.allclose(bn.running_mean, pooled.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, pooled.var(0, unbiased=False), rtol=1e-4)
    for w in (0.0, 1.0):  # the end points are the two populations themselves
        bn.running_mean.copy_(b.mean(0))
        bn.running_var.copy_(b.var(0, unbiased=False))
        mix_bn_stats([bn], [(a.mean(0), a.var(0, unbiased=False))], w)
        ref = b if w == 1.0 else a
        assert torch.allclose(bn.running_mean, ref.mean(0), atol=1e-6)


@pytest.mark.parametrize("method", ["adabn", "tent"])
def test_site_bn_weight_mixes_source_and_site_statistics(toy, method):
    """Half-site statistics sit between the champion's (source) and AdaBN's (site)."""
    model, _, val, site = toy
    full = get_adapter(method).adapt(model, None, site[0], quick(method, steps=5))
    half = get_adapter(method).adapt(model, None, site[0], quick(method, steps=5, site_bn_weight=0.5))
    bn0, bn1, bnh = (next(m for m in x.top.modules() if isinstance(m, torch.nn.BatchNorm2d))
                     for x in (model, full.model, half.model))
    assert torch.allclose(bnh.running_mean, 0.5 * (bn0.running_mean + bn1.running_mean), atol=1e-5)
    assert not torch.allclose(bn0.running_mean, bn1.running_mean)  # the site moved them
    assert (bnh.running_var >= torch.minimum(bn0.running_var, bn1.running_var) - 1e-6).all()
    if method == "adabn":
        # The trade-off on a shift this strong: site statistics fix the site and break the
        # source; the half-and-half mixture keeps the source and fixes little of the site.
        assert acc(full.model, *site) > 0.9 and acc(full.model, *val) < 0.5
        assert acc(half.model, *val) > 0.9 and acc(half.model, *site) < 0.5
    for cfg in (AdaBNConfig(site_bn_weight=1.5), EntropyConfig(site_bn_weight=-0.1)):
        with pytest.raises(ValueError, match="site_bn_weight"):
            cfg.validate()


def test_prior_weight_is_n_over_n_plus_prior():
    """Schneider et al.: the training domain counts as N images beside the site's n."""
    assert prior_weight(240, 16) == pytest.approx(240 / 256)
    assert prior_weight(0, 16) == 0.0 and prior_weight(5, 0) == 1.0 and prior_weight(0, 0) == 1.0
    with pytest.raises(ValueError):
        prior_weight(-1, 4)


def test_discrepancy_methods_need_labelled_source(toy):
    model, src, _, site = toy
    with pytest.raises(ValueError, match="needs labelled source"):
        adapt(model, None, site[0], "mmd", quick("mmd"))
    with pytest.raises(ValueError, match="needs labelled source"):
        adapt(model, src[0], site[0], "mmd", quick("mmd"))  # no labels
    with pytest.raises(ValueError, match="different shapes"):
        adapt(model, (src[0][:, :, :8, :8], src[1]), site[0], "mmd", quick("mmd"))
    with pytest.raises(ValueError, match="labels must be in"):
        adapt(model, (src[0], src[1] + 10), site[0], "mmd", quick("mmd"))
    with pytest.raises(ValueError, match="coral_weight"):
        adapt(model, src, site[0], "coral", DiscrepancyConfig(steps=2))


def test_bad_config_is_rejected(toy):
    model, src, _, site = toy
    for bad in ({"batch_size": 1}, {"lr": 0.0}, {"kernel_multipliers": ()}, {"final_bn": "x"},
                {"time_budget_s": 0.0}, {"mmd_weight": -1.0}, {"top_bn": "both"}):
        with pytest.raises(ValueError):
            adapt(model, src, site[0], "mmd", DiscrepancyConfig(steps=1, **bad))
    with pytest.raises(ValueError, match="target.images"):
        adapt(model, None, site[0], "adabn", AdaBNConfig(scope="all"))
    with pytest.raises(ValueError, match="scope"):
        adapt(model, None, site[0], "adabn", AdaBNConfig(scope="some"))


@pytest.mark.parametrize("method", ["mmd", "shot-im"])
def test_input_model_is_not_mutated(toy, method):
    model, src, _, site = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = Checkpoint(model=model, classes=list("abcd"), preprocessing=preprocessing_for(model.config))
    res = adapt(ckpt, src, site[0], method, quick(method, steps=5))
    assert res.model is not model and isinstance(res.model, EmotionNet)
    assert not res.model.training and not model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = any(not torch.equal(before[k], v) for k, v in res.model.state_dict().items())
    assert changed
    out = res.to_checkpoint(ckpt)
    assert out.model is res.model and out.config["adaptation"]["method"] == method


def test_reproducible_with_seed(toy):
    model, src, _, site = toy
    a = adapt(model, src, site[0], "mmd", quick("mmd", steps=8, seed=3))
    b = adapt(model, src, site[0], "mmd", quick("mmd", steps=8, seed=3))
    c = adapt(model, src, site[0], "mmd", quick("mmd", steps=8, seed=4))
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]


def test_global_rng_untouched(toy):
    model, src, _, site = toy
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    adapt(model, src, site[0], "mmd", quick("mmd", steps=2))
    assert torch.equal(torch.rand(3), expected)


def test_time_budget_stops_early_and_progress_is_reported(toy):
    model, src, _, site = toy
    seen = []
    res = adapt(model, src, site[0], "mmd", quick("mmd", steps=10_000, time_budget_s=0.5, log_every=1),
                progress=lambda step, total, rec: seen.append((step, total, rec["loss"])))
    assert res.stopped_early and 0 < res.steps_done < 10_000
    assert seen and seen[-1][0] == res.steps_done and seen[0][1] == 10_000


@pytest.mark.parametrize("top_bn", ["source", "mixed", "site"])
def test_frozen_top_fast_path(toy, top_bn):
    model, src, val, site = toy
    res = adapt(model, src, site[0], "mmd", quick("mmd", top_lr_mult=0.0, top_bn=top_bn, lr=1e-3))
    top0, top1 = model.top.state_dict(), res.model.top.state_dict()
    weights = [k for k in top0 if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(top0[k], top1[k]) for k in weights)  # no gradient step on the top
    stats_same = all(torch.equal(top0[k], top1[k]) for k in top0 if "running" in k)
    assert stats_same == (top_bn == "source")
    assert all(p.requires_grad for p in res.model.top.parameters())
    assert acc(res.model, *site) > acc(model, *site) + 0.2
    assert acc(res.model, *val) > 0.9


def test_adabn_all_scope_uses_images(toy):
    model, _, _, site = toy
    # tiny backbone: the frozen part has no BN, so nothing there changes
    res = adapt(model, None, CachedSet(h=site[0], images=site[0]), "adabn",
                AdaBNConfig(scope="all"))
    assert not res.frozen_changed and res.steps_done == 1


def test_discrepancies():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    assert abs(float(mk_mmd2(a, b))) < 0.01
    assert float(mk_mmd2(a, b + 1.0)) > 0.1
    # median-scaled kernels: rescaling both samples leaves MMD unchanged (no collapse shortcut)
    assert float(mk_mmd2(3 * a, 3 * (b + 1))) == pytest.approx(float(mk_mmd2(a, b + 1.0)), rel=1e-4)
    assert float(coral_loss(a, b)) < float(coral_loss(a, 2.0 * b))
    assert rampup(0, 100, 10.0) == 0.0 and rampup(100, 100, 10.0) > 0.99 and rampup(5, 100, 0.0) == 1.0
    with pytest.raises(ValueError):
        mk_mmd2(a[:1], b)


def test_backbone_mode_aligns_features_on_the_toy(toy):
    """backbone_lr_mult > 0 trains from raw images (tiny backbone: the whole CNN)."""
    model, src, val, site = toy
    # mirror_source off: the toy's classes are quadrants, a mirror image changes the class
    cfg = quick("mmd", lr=1e-3, backbone_lr_mult=0.1, batch_size=BACKBONE_BATCH, mirror_source=False)
    with pytest.raises(ValueError, match="needs .images"):
        adapt(model, src, site[0], "mmd", cfg)
    res = adapt(model, CachedSet(h=src[0], labels=src[1], images=src[0]),
                CachedSet(h=site[0], images=site[0]), "mmd", cfg)
    assert res.frozen_changed and res.steps_done == 40 and res.config["backbone_lr_mult"] == 0.1
    before = mmd2(cached_outputs(model, val[0])[0], cached_outputs(model, site[0])[0])
    after = mmd2(cached_outputs(res.model, val[0])[0], cached_outputs(res.model, site[0])[0])
    assert after < 0.8 * before, (before, after)
    assert acc(res.model, *site) > acc(model, *site) + 0.2
    assert acc(res.model, *val) > 0.9


def test_backbone_mode_changes_the_frozen_part_and_nothing_else():
    """On an EfficientNet (random weights, 32 px): the frozen blocks move in the COPY only,
    its parameters end frozen again, and the recipe is the measured one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = EmotionNet(NetConfig(img_size=32, num_classes=K, pretrained=False)).eval()
        x_src, x_site = torch.randn(24, 3, 32, 32), 0.3 * torch.randn(24, 3, 32, 32) - 0.5
    y_src = torch.arange(24) % K
    with torch.no_grad():
        h_src, h_site = model.frozen_forward(x_src), model.frozen_forward(x_site)
    before = {k: v.clone() for k, v in model.frozen.state_dict().items()}
    cfg = with_backbone(DiscrepancyConfig())
    assert (cfg.steps, cfg.batch_size, cfg.backbone_lr_mult) == (BACKBONE_STEPS, BACKBONE_BATCH, 1.0)
    cfg.steps = 3
    res = adapt(model, CachedSet(h=h_src, labels=y_src, images=x_src),
                CachedSet(h=h_site, images=x_site), "mmd", cfg)
    assert res.frozen_changed and res.steps_done == 3
    assert all(torch.equal(before[k], v) for k, v in model.frozen.state_dict().items())
    new = res.model.frozen.state_dict()
    weights = [k for k in before if "running" not in k and "num_batches" not in k]
    assert any(not torch.equal(before[k], new[k]) for k in weights)
    # the champion's BN statistics of the frozen part are kept (EmotionNet.train keeps it in eval)
    assert all(torch.equal(before[k], new[k]) for k in before if "running" in k)
    assert not any(p.requires_grad for p in res.model.frozen.parameters())
    assert not any(p.requires_grad for p in model.frozen.parameters())


# --- adding a method, as docs/extending.md says: one class + one catalog line --------
@dataclasses.dataclass
class ShrinkConfig(AdaptConfig):
    factor: float = 0.5


class ShrinkAdapter(Adapter):
    """A new (toy) method: scale the head's weights; needs no training data."""

    name = "shrink"
    config_class = ShrinkConfig

    def _adapt(self, model, src, tgt, cfg, gen, report, t0):
        with torch.no_grad():
            model.head.weight.mul_(cfg.factor)
        report.step(1, 1, t0, factor=cfg.factor)
        return {"steps_done": 1}


def test_a_new_method_is_one_class_and_one_catalog_line(toy, monkeypatch):
    from emowatch.sites import Site
    from models import catalog

    model, _, _, site = toy
    monkeypatch.setitem(catalog.ADAPTERS, "shrink", "tests.test_adapt:ShrinkAdapter")
    assert "shrink" in available_adapters()
    res = adapt(model, None, site[0], "shrink", ShrinkConfig(factor=0.25))
    assert torch.allclose(res.model.head.weight, 0.25 * model.head.weight)
    assert res.config["factor"] == 0.25 and res.history[0]["factor"] == 0.25
    # the sites file and the CLI accept it from the same table
    assert Site(name="x", inbox="/tmp", adapt={"method": "shrink"}).adapt.method == "shrink"
