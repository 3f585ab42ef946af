"""The re-adaptation portfolio (models/adapt/portfolio.py): the gain estimate, the selection rule, the
proxies' distance, the BN prior, and the whole portfolio on the toy night camera of
tests/test_adapt.py (tiny backbone)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from models.adapt.base import AdaptResult, CachedSet, get_adapter
from models.adapt.bn import AdaBNConfig, bn_modules, prior_weight
from models.adapt.portfolio import (
    Member,
    SiteSet,
    apply_member,
    gain_estimate,
    halves,
    members,
    run_portfolio,
    select,
)
from models.adapt.proxies import ProxyConfig, build_proxies, choose_proxies, proxy_distances  # noqa: F401
from models.adapt.recipes import Applied, Recipe
from tests.test_adapt import make_scenes, train_toy_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def net():
    return train_toy_model()[0]


def sets(model, site: bool, seed: int, n: int = 160) -> SiteSet:
    x, y = make_scenes(n, seed, site=site)
    with torch.no_grad():
        h = model.frozen_forward(x)
    return SiteSet(h=h, images=x, labels=y.numpy(), name=f"{'site' if site else 'clean'}{seed}")


# --- the estimate and the rule ------------------------------------------------------------------
def test_gain_estimate_known_answer():
    r0 = [np.array([1, 0, 0, 0] * 25, bool), np.array([1, 1, 0, 0] * 25, bool)]  # 25%, 50%
    rc = [np.array([1, 1, 0, 0] * 25, bool), np.array([1, 1, 1, 0] * 25, bool)]  # +25 pts each
    e = gain_estimate(rc, r0)
    assert e["gain"] == pytest.approx(0.25)
    assert e["per_proxy"] == [0.25, 0.25]
    # paired differences are 0/1 with p = 0.25: var = 0.25 * 0.75 * 100 / 99, / n; no spread
    within = 0.25 * 0.75 * 100 / 99 / 100
    assert e["se"] == pytest.approx(math.sqrt(within / 2))
    assert e["lower"] == pytest.approx(0.25 - 1.645 * e["se"])
    assert e["acc"] == pytest.approx(0.625) and e["champion_acc"] == pytest.approx(0.375)


def test_disagreeing_proxies_widen_the_interval():
    r0 = [np.zeros(100, bool)] * 2
    same = gain_estimate([np.r_[np.ones(10), np.zeros(90)].astype(bool)] * 2, r0)
    split = gain_estimate([np.r_[np.ones(20), np.zeros(80)].astype(bool), np.zeros(100, bool)], r0)
    assert same["gain"] == pytest.approx(split["gain"]) == pytest.approx(0.10)
    assert split["se"] > same["se"]


def test_select_takes_the_highest_gain_not_worse_than_the_tolerance():
    est = [{"gain": 0.0, "lower": 0.0}, {"gain": 0.03, "lower": 0.02},
           {"gain": 0.06, "lower": -0.005}, {"gain": 0.06, "lower": 0.01}, None,
           {"gain": 0.2, "lower": float("nan")}]
    assert select(est) == 2  # ties: the earlier, cheaper one; a lower bound of -0.5 pt is fine
    # a larger gain whose lower bound is more than a point below the champion is not proposed
    assert select([{"gain": 0.0, "lower": 0.0}, {"gain": 0.08, "lower": -0.02},
                   {"gain": 0.01, "lower": -0.005}]) == 2
    assert select([{"gain": 0.08, "lower": -0.02}], tolerance=0.03) == 0
    assert select([{"gain": 0.0, "lower": 0.0}, {"gain": -0.01, "lower": -0.005}]) is None
    assert select([{"gain": 0.03, "lower": 0.01}], min_gain=0.05) is None
    assert select([{"gain": 0.05, "lower": 0.03, "vetoed": "no"}]) is None


def test_consensus_vetoes_the_candidate_that_leaves_the_pool():
    from models.adapt.portfolio import consensus_veto

    eye = np.eye(3)
    champion = eye[[0, 1, 2, 0, 1, 2]]
    good = eye[[0, 1, 2, 0, 1, 1]]  # one image changed, as the other good candidate
    same = eye[[0, 1, 2, 0, 1, 1]]
    collapsed = eye[[0, 0, 0, 0, 0, 0]]  # everything one class
    assert consensus_veto([champion, good, same, collapsed]) == [False, False, False, True]
    assert consensus_veto([champion, collapsed]) == [False, False]  # two models: no consensus
    # with the portfolio's margin the collapsed one still leaves the pool; a candidate one
    # image farther from the consensus than the champion does not
    from models.adapt.portfolio import CONSENSUS_MARGIN

    assert consensus_veto([champion, good, same, collapsed], CONSENSUS_MARGIN)[3]
    farther = eye[[0, 1, 2, 0, 2, 1]]
    assert consensus_veto([champion, good, same, farther], 0.2) == [False] * 4


def test_shared_proxies_count_their_images_once():
    r0 = [np.zeros(100, bool)] * 4
    rc = [np.r_[np.ones(10), np.zeros(90)].astype(bool)] * 4
    indep, shared = gain_estimate(rc, r0), gain_estimate(rc, r0, shared=True)
    assert indep["gain"] == shared["gain"] == pytest.approx(0.10)
    assert shared["se"] == pytest.approx(indep["se"] * math.sqrt(2))  # k = 4 halves: 2 sets


def test_proxies_nearest_by_image_statistics():
    rng = np.random.default_rng(0)
    ref = np.abs(rng.normal(1.0, 0.1, (50, 9)))
    site = ref * 0.5  # darker everything
    shifted = [ref * 0.9, ref * 0.52, ref, ref * 0.3]
    d = proxy_distances(ref, site, shifted)
    assert choose_proxies(d, 2) == [1, 0] or choose_proxies(d, 2)[0] == 1
    assert d[1] < d[0] < d[2]
    with pytest.raises(ValueError):
        choose_proxies(d, 0)


def test_the_method_list_is_defined_once():
    from emowatch.sites import AdaptOptions
    from models.catalog import DEFAULT_PORTFOLIO, PORTFOLIO

    assert [m.name for m in members()] == [n for n, _, _ in PORTFOLIO]
    assert AdaptOptions().portfolio == list(DEFAULT_PORTFOLIO)
    with pytest.raises(ValueError, match="unknown portfolio member"):
        members(["bn(N=3)"])
    with pytest.raises(ValueError, match="portfolio member"):
        AdaptOptions(portfolio=["nope"])


# --- the BN prior -------------------------------------------------------------------------------
def test_prior_n_sets_the_site_weight_for_every_layer(net):
    site = sets(net, True, 5, n=120)
    cfg = AdaBNConfig(scope="all", prior_n=360)
    assert cfg.weight(120) == pytest.approx(prior_weight(120, 360)) == pytest.approx(0.25)
    pure = get_adapter("adabn").adapt(net, None, CachedSet(h=site.h, images=site.images),
                                      AdaBNConfig(scope="all"))
    mixed = get_adapter("adabn").adapt(net, None, CachedSet(h=site.h, images=site.images), cfg)
    w = 0.25
    # the top's statistics: the moments of the mixture of the champion's and the site's
    for b0, b1, bm in zip(bn_modules(net.bottleneck), bn_modules(pure.model.bottleneck),
                          bn_modules(mixed.model.bottleneck), strict=True):
        mu0, mu1 = b0.running_mean, b1.running_mean
        assert torch.allclose(bm.running_mean, w * mu1 + (1 - w) * mu0, atol=1e-4)
    assert mixed.source_normalisation == "champion"


def test_a_proxy_half_keeps_the_site_weight_of_the_prior(net):
    """A recipe applied to half a proxy adapts on n/2 images: the prior N is halved with it,
    so its BN statistics mix at the site's weight n/(n+N), not (n/2)/(n/2+N)."""
    proxy = sets(net, True, 31, n=120)
    adapt_half, score_half = halves(proxy, seed=3)
    assert len(adapt_half) == len(score_half) == 60
    both = np.concatenate([adapt_half.labels, score_half.labels])
    assert sorted(both.tolist()) == sorted(proxy.labels.tolist())  # a partition
    again, _ = halves(proxy, seed=3)
    assert torch.equal(again.h, adapt_half.h)  # seeded
    bn = Member("bn(N=240)", "bn", {"prior_n": 240})
    scaled = apply_member(bn, net, adapt_half, None, None, None, 0, "fp32", 60.0, n_site=120)
    halved = apply_member(Member("bn(N=120)", "bn", {"prior_n": 120}), net, adapt_half, None,
                          None, None, 0, "fp32", 60.0)
    unscaled = apply_member(bn, net, adapt_half, None, None, None, 0, "fp32", 60.0)
    m_scaled, m_halved, m_unscaled = (bn_modules(a.result.model.bottleneck)[0].running_mean
                                      for a in (scaled, halved, unscaled))
    assert torch.allclose(m_scaled, m_halved) and not torch.allclose(m_scaled, m_unscaled)


# --- the whole portfolio on the toy ----------------------------------------------------------------
FAST = [Member("bn(N=40)", "bn", {"prior_n": 40}), Member("bn(N=1000)", "bn", {"prior_n": 1000}),
        Member("tent", "tent", {"steps": 5})]


def test_portfolio_selects_a_candidate_that_helps_on_a_real_shift(net):
    site = sets(net, True, 11)
    proxies = [sets(net, True, 21), sets(net, True, 22)]
    res = run_portfolio(net, SiteSet(h=site.h, images=site.images), proxies, None, FAST, 60.0)
    assert res.candidates[0].member.name == "champion" and not res.candidates[0].selected
    chosen = res.chosen
    assert chosen is not None and chosen.estimate["lower"] > 0, res.reasons
    # the estimate was right: on the site's labels the chosen candidate is better
    acc0 = (net.eval()(site.images).argmax(1).numpy() == site.labels).mean()
    model = chosen.applied.result.model
    acc1 = (model.eval()(site.images).argmax(1).numpy() == site.labels).mean()
    assert acc1 > acc0 + 0.1
    table = res.table()
    assert [c["selected"] for c in table].count(True) == 1
    assert {"method", "params", "estimate", "seconds", "selected"} <= set(table[1])
    assert "selected" in res.reasons[0]


def test_portfolio_finds_no_gain_where_nothing_changed(net):
    site = sets(net, False, 11)
    proxies = [sets(net, False, 21), sets(net, False, 22)]
    res = run_portfolio(net, SiteSet(h=site.h), proxies, None,
                        [Member("bn(N=1000)", "bn", {"prior_n": 1000})], 60.0, tolerance=0.0)
    assert res.selected is None
    assert res.reasons[0].startswith("no_gain")


def test_members_are_skipped_with_reasons(net):
    site = sets(net, True, 11)
    proxies = [sets(net, True, 21)]
    res = run_portfolio(net, SiteSet(h=site.h), proxies, None,
                        [Member("mmd", "mmd", {}), Member("bn-all(N=40)", "bn-all", {"prior_n": 40}),
                         Member("mmd-backbone", "mmd-backbone", {"expected_s": 1e6})], 60.0)
    skipped = {c.member.name: c.skipped for c in res.candidates[1:]}
    assert "source-free" in skipped["mmd"]
    assert "raw images" in skipped["bn-all(N=40)"]
    assert skipped["mmd-backbone"]
    with pytest.raises(ValueError, match="proxy"):
        run_portfolio(net, SiteSet(h=site.h), [], None, FAST, 60.0)


def test_a_member_expects_its_fp32_seconds_when_the_model_runs_in_fp32(net):
    from models.adapt.portfolio import expected_seconds

    m = Member("slow-in-fp32", "bn", {"prior_n": 40, "expected_s": 1, "expected_s_fp32": 100})
    assert expected_seconds(m, 480, "bf16") == 2 and expected_seconds(m, 480, "fp32") == 200
    assert expected_seconds(Member("bn", "bn", {"expected_s": 3}), 240, "fp32") == 3  # no fp32 figure
    site = sets(net, True, 11)
    proxies = [sets(net, True, 21)]
    fp32 = run_portfolio(net, SiteSet(h=site.h), proxies, None, [m], 60.0, precision="fp32")
    assert "needs ~" in fp32.candidates[1].skipped  # 100 s x 2 sets do not fit into 60 s
    quick = Member("slow-in-fp32", "bn", {"prior_n": 40, "expected_s": 1})  # bf16 figure only
    res = run_portfolio(net, SiteSet(h=site.h), proxies, None, [quick], 60.0, precision="fp32")
    assert not res.candidates[1].skipped


# --- adding a recipe: one class + one catalog line ----------------------------------------------
class SharpenHead(Recipe):
    """A new (toy) recipe: the champion with its head's logits scaled by ``factor``; the
    portfolio asks it, not its name, what it needs."""

    def apply(self, member, data, ctx):
        model = copy.deepcopy(ctx.champion)
        with torch.no_grad():
            model.head.weight.mul_(float(member.params.get("factor", 2.0)))
            model.head.bias.mul_(float(member.params.get("factor", 2.0)))
        res = AdaptResult(model=model.eval(), history=[], seconds=0.0, method="sharpen",
                          config=dict(member.params))
        return Applied(res, data.h)


def test_a_new_recipe_is_one_class_and_one_catalog_line(net, monkeypatch):
    from models import catalog

    monkeypatch.setitem(catalog.RECIPES, "sharpen", "tests.test_portfolio:SharpenHead")
    monkeypatch.setattr(catalog, "PORTFOLIO",
                        catalog.PORTFOLIO + (("sharpen(x2)", "sharpen", {"factor": 2.0}),))
    [m] = members(["sharpen(x2)"])
    assert isinstance(m.recipe, SharpenHead) and not m.needs_source
    site = sets(net, True, 11)
    res = run_portfolio(net, SiteSet(h=site.h), [sets(net, True, 21)], None, [m], 60.0)
    [rec] = res.candidates[1:]
    assert rec.skipped is None and rec.estimate is not None
    # scaling the logits never changes the argmax: exactly the champion's accuracy
    assert rec.estimate["gain"] == 0.0 and rec.estimate["per_proxy"] == [0.0]
    assert res.table()[1]["method"] == "sharpen"


class SlowRecipe(SharpenHead):
    """SharpenHead that records the time budget of each application and uses all of it."""

    budgets: list[float] = []

    def apply(self, member, data, ctx):
        import time

        SlowRecipe.budgets.append(ctx.time_budget_s)
        time.sleep(ctx.time_budget_s)
        return super().apply(member, data, ctx)


def test_a_members_applications_share_what_is_left_of_the_budget(net, monkeypatch):
    """The site's and each proxy's application get an equal part of what is left: a member
    that uses its whole budget ends within the portfolio's (each had been given all of it)."""
    import time

    from models import catalog
    from models.adapt.portfolio import share

    t0 = time.perf_counter()
    assert share(100.0, t0 - 40.0, 3) == pytest.approx(20.0, abs=0.1)
    assert share(100.0, t0 - 200.0, 3) == 1.0  # spent: the floor
    monkeypatch.setitem(catalog.RECIPES, "slow", "tests.test_portfolio:SlowRecipe")
    monkeypatch.setattr(catalog, "PORTFOLIO", catalog.PORTFOLIO + (("slow", "slow", {}),))
    SlowRecipe.budgets = []
    site = sets(net, True, 11)
    res = run_portfolio(net, SiteSet(h=site.h), [sets(net, True, 21), sets(net, True, 22)],
                        None, members(["slow"]), 3.0)
    assert res.candidates[1].skipped is None and len(SlowRecipe.budgets) == 3
    # site: ~3/3 s; then each proxy an equal part of what the earlier runs left
    assert SlowRecipe.budgets[0] == pytest.approx(1.0, abs=0.1)
    assert sum(SlowRecipe.budgets) <= 3.0


def test_stratified_subsample_keeps_class_proportions():
    from models.adapt.proxies import stratified_subsample

    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    idx = stratified_subsample(labels, 20, np.random.default_rng(0))
    assert len(idx) == 20 and len(set(idx)) == 20 and list(idx) == sorted(idx)
    assert np.bincount(labels[idx]).tolist() == [12, 6, 2]
    assert len(stratified_subsample(labels, 500, np.random.default_rng(0))) == 100
    rare = np.array([0] * 98 + [1, 2])  # every class kept while m allows
    assert set(rare[stratified_subsample(rare, 10, np.random.default_rng(1))]) == {0, 1, 2}
