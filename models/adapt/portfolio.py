"""The re-adaptation portfolio: several candidates, cheapest first, the champion itself as
candidate zero, each judged label-free by what its recipe does on labelled proxies of the site;
the one to propose is chosen on the lower bound of its estimated gain.

**Proxies.** The site's images have no labels. The labelled held-out training-domain images do;
under the shifts of the estimator's bank (:mod:`models.sim.shifts`, never the benchmark's
conditions) whose image statistics come closest to the site's (``models.adapt.proxies``) they
are labelled stand-ins for the site. Each member's recipe is applied to the site and to every
proxy as to the site, and scored the way the site will use it: it adapts on one half of the
proxy's images (the prior's weight kept at the site's, n/(n+N) with the site's n) and predicts
the other half, images it did not adapt on -- as the adapted model serves the site's next
images, not the ones it adapted on. (Scoring on the adapted images themselves is transductive:
measured here, it promised +1.7 points to BN statistics on near-clean proxies of a colour-cast
site where they cost 3.1.) The paired accuracy change on a proxy's held-out half is one
measurement of what the recipe does to a shift like the site's:

    g_j   = acc(recipe on proxy j) - acc(champion on proxy j)      (paired, same images)
    gain  = mean_j g_j
    se^2  = mean_j(var_j) / k + s_b^2 / k     (var_j: paired per-image variance / n_j;
                                               s_b: spread of g_j between the k proxies)
    lower = gain - z se                       (z = 1.645: one-sided 95 %)

:func:`select` proposes, among the members whose estimated gain is above ``min_gain`` (0)
and whose lower bound is above ``-tolerance`` (1 point: never worse than the champion by more
than that, at 95%), the one with the highest estimated gain; otherwise nothing (the flow's
verdict ``no_gain``). A consensus check vetoes first (:func:`consensus_veto`, EnsV): a member
whose predictions on the site disagree with the pool's consensus (champion included) more than
the champion's do (by more than ``CONSENSUS_MARGIN``) is not proposed.

With twin proxies (``models.adapt.proxies.twin_proxies``) every proxy holds the same held-out
images (other noise draws, other halves): their per-image variances are not independent, and
the standard error counts the images once (``shared``).

**Members** (``models.catalog.PORTFOLIO``, in order, cheapest first): a name, a recipe
(``models.catalog.RECIPES``, :mod:`models.adapt.recipes`) and its parameters.

Pure torch/numpy: the flow's task (``tasks.portfolio``) decodes the images and builds the sets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.adapt.base import CachedSet, cached_outputs
from models.adapt.recipes import Applied, Context, Member, SiteSet
from models.network import EmotionNet

Z_ONE_SIDED_95 = 1.645
# The consensus veto's margin: a candidate is vetoed when it disagrees with the pool's
# consensus on this much more of the site's images than the champion does. With 0, the
# most-adapted of a graded family (BN statistics with priors of 80, 240, 720 images) sat
# farthest from a consensus that included the champion and was vetoed although it was the
# best (night 2, seed 0: 0.209 against the champion's 0.201, true gain +7.5 points, the oracle;
# bench/results/portfolio_twin.md). A candidate that collapses to a few classes leaves the pool
# by far more.
CONSENSUS_MARGIN = 0.05


# --- members --------------------------------------------------------------------------------
EXPECTED_PER = 240  # images that a member's ``expected_s`` is measured for (models.catalog)


def expected_seconds(member: Member, n_images: int, precision: str = "bf16") -> float:
    """Seconds ``member`` is expected to need for ``n_images`` (the site's and every
    proxy's), from its catalog ``expected_s`` (measured with native bf16), or its
    ``expected_s_fp32`` when the model runs in fp32 (0: always starts)."""
    key = "expected_s_fp32" if precision == "fp32" and "expected_s_fp32" in member.params \
        else "expected_s"
    return float(member.params.get(key, 0.0)) * n_images / EXPECTED_PER


def members(names: Sequence[str] | None = None) -> list[Member]:
    """The members of ``models.catalog.PORTFOLIO`` named ``names`` (None: all), in the
    catalog's order."""
    from models.catalog import PORTFOLIO

    table = {n: Member(n, kind, dict(params)) for n, kind, params in PORTFOLIO}
    if names is None:
        return list(table.values())
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown portfolio member(s) {unknown}; known: {', '.join(table)}")
    return [m for m in table.values() if m.name in set(names)]


# --- records ------------------------------------------------------------------------------------
@dataclass
class CandidateRecord:
    member: Member
    seconds: float = 0.0  # the recipe on the site and on every proxy
    site_seconds: float = 0.0  # on the site alone
    estimate: dict[str, Any] | None = None
    selected: bool = False
    skipped: str | None = None
    applied: Applied | None = None  # on the site (None for the champion / skipped)
    proxies: list[Applied] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.member.kind,
                "name": self.member.name, "params": dict(self.member.params),
                "estimate": self.estimate, "seconds": round(self.seconds, 2),
                "site_seconds": round(self.site_seconds, 2), "selected": self.selected,
                "skipped": self.skipped}


@dataclass
class PortfolioResult:
    candidates: list[CandidateRecord]  # candidates[0] is the champion
    selected: int | None  # index into candidates; None: no candidate's lower bound clears 0
    reasons: list[str]
    seconds: float
    proxies: list[dict[str, Any]] = field(default_factory=list)
    setup_seconds: float = 0.0  # the proxies (the twin's fit and its images), apart from budget
    # in words, when the proxies reproduce the site (its twin, within the residual limit): what
    # vouches for the selected candidate's gain, so DEV's "unverifiable" is evidence only
    vouched: str = ""

    @property
    def chosen(self) -> CandidateRecord | None:
        return None if self.selected is None else self.candidates[self.selected]

    def table(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.candidates]


# --- the estimate ----------------------------------------------------------------------------
def gain_estimate(right_candidate: Sequence[np.ndarray], right_champion: Sequence[np.ndarray],
                  z: float = Z_ONE_SIDED_95, shared: bool = False) -> dict[str, Any]:
    """Estimated accuracy gain of a recipe from k proxies (module docstring): per proxy the
    paired per-image correctness (bool arrays of the same images) of candidate and champion.
    ``shared``: the proxies are halves of one set of images (twin proxies), so their
    within-proxy variances average over two halves, not over k independent sets."""
    if len(right_candidate) != len(right_champion) or not right_candidate:
        raise ValueError("need the same number (>= 1) of candidate and champion proxies")
    g, var = [], []
    for rc, r0 in zip(right_candidate, right_champion, strict=True):
        d = np.asarray(rc, np.float64) - np.asarray(r0, np.float64)
        if d.ndim != 1 or len(d) < 2:
            raise ValueError("each proxy needs at least 2 paired images")
        g.append(float(d.mean()))
        var.append(float(d.var(ddof=1)) / len(d))
    k = len(g)
    gain = float(np.mean(g))
    between = float(np.var(g, ddof=1)) if k > 1 else 0.0
    se = math.sqrt(float(np.mean(var)) / (min(k, 2) if shared else k) + between / k)
    return {"gain": gain, "lower": gain - z * se, "upper": gain + z * se, "se": se,
            "per_proxy": [round(x, 4) for x in g], "k": k,
            "acc": float(np.mean([np.mean(r) for r in right_candidate])),
            "champion_acc": float(np.mean([np.mean(r) for r in right_champion]))}


def select(estimates: Sequence[dict[str, Any] | None], min_gain: float = 0.0,
           tolerance: float = 0.01) -> int | None:
    """Index of the estimate with the highest gain among those whose gain is above
    ``min_gain`` and whose lower bound is above ``-tolerance`` (fractions of accuracy); ties go
    to the earlier (cheaper) one; None when none qualifies. An estimate marked ``vetoed`` never
    qualifies."""
    best, best_gain = None, -math.inf
    for i, e in enumerate(estimates):
        if e is None or e.get("vetoed") or not math.isfinite(e.get("lower", math.nan)):
            continue
        if e["gain"] > min_gain + 1e-12 and e["lower"] > -tolerance and e["gain"] > best_gain + 1e-12:
            best, best_gain = i, e["gain"]
    return best


def disagreements(site_probs: Sequence[np.ndarray]) -> list[float] | None:
    """EnsV's consensus: ``site_probs[0]`` the champion's (N, K) probabilities on the site, the
    rest the candidates'; the consensus is the argmax of their mean. Returns each model's share
    of the site's images on which it disagrees with the consensus; None with fewer than the
    champion and two candidates (the consensus of two models says nothing)."""
    if len(site_probs) < 3:
        return None
    consensus = np.mean([np.asarray(p, np.float64) for p in site_probs], 0).argmax(1)
    return [float(np.mean(np.asarray(p).argmax(1) != consensus)) for p in site_probs]


def consensus_veto(site_probs: Sequence[np.ndarray], margin: float = 0.0) -> list[bool]:
    """The consensus as a veto (:func:`disagreements`): a candidate is vetoed when it disagrees
    with the consensus on a larger share of the site's images than the champion does (plus
    ``margin``). Nothing is vetoed without a consensus."""
    return vetoes(disagreements(site_probs), margin, len(site_probs))


def vetoes(off: list[float] | None, margin: float, n: int) -> list[bool]:
    """:func:`consensus_veto` from the disagreements already measured (None: no consensus)."""
    if off is None:
        return [False] * n
    return [False] + [o > off[0] + margin for o in off[1:]]


# --- applying a member ---------------------------------------------------------------------------
def apply_member(member: Member, champion: EmotionNet, data: SiteSet, source: CachedSet | None,
                 base: Applied | None, base_member: Member | None, seed: int,
                 precision: str, time_budget_s: float, n_site: int | None = None) -> Applied:
    """The recipe of ``member`` on one set. Recipes that build on BN statistics start from
    ``base`` (the best BN member's result on the same set; None: the champion). ``n_site``:
    the site's number of images when ``data`` is a proxy's half; a prior of N images is then
    scaled so that the set's weight n/(n+N) is the site's."""
    ctx = Context(champion, source, base, base_member, seed, precision, time_budget_s,
                  len(data) / n_site if n_site else 1.0)
    return member.recipe.apply(member, data, ctx)


def correct(model: EmotionNet, h: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    return cached_outputs(model, h)[1].argmax(1) == np.asarray(labels)


def halves(proxy: SiteSet, seed: int) -> tuple[SiteSet, SiteSet]:
    """(the half a recipe adapts on, the half it is scored on) of a proxy, seeded."""
    if proxy.labels is None or len(proxy) < 4:
        raise ValueError(f"proxy {proxy.name}: needs labels and at least 4 images")
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(len(proxy)))
    out = []
    for idx in (perm[:len(proxy) // 2].sort().values, perm[len(proxy) // 2:].sort().values):
        out.append(SiteSet(h=proxy.h[idx],
                           images=None if proxy.images is None else proxy.images[idx],
                           labels=np.asarray(proxy.labels)[idx.numpy()],
                           name=proxy.name))
    return out[0], out[1]


def score_on(applied: Applied, data: SiteSet, precision: str) -> np.ndarray:
    """Per-image correctness of an applied recipe's model on images it did not adapt on (its
    own frozen outputs of them when its frozen part changed)."""
    from models.adapt.bn import frozen_outputs

    m = applied.result.model
    h = frozen_outputs(m, data.images, None, precision) if applied.result.frozen_changed else data.h
    return correct(m, h, data.labels)


# --- the portfolio ---------------------------------------------------------------------------------
def share(budget_s: float, t_start: float, runs_left: int, floor_s: float = 1.0) -> float:
    """The time budget of one of a member's ``runs_left`` remaining applications (the site's,
    then each proxy's): an equal part of what is left of the portfolio's budget, so that a
    member whose recipe stops at its budget (the iterative ones) ends within the portfolio's
    -- each had been given all that was left, and the site plus 4 proxies could take 5x it."""
    left = budget_s - (time.perf_counter() - t_start)
    return max(left / max(1, runs_left), floor_s)


def run_portfolio(champion: EmotionNet, site: SiteSet, proxies: Sequence[SiteSet],
                  source: CachedSet | Callable[[], CachedSet] | None,
                  portfolio: Sequence[Member], budget_s: float,
                  precision: str = "fp32", seed: int = 0, z: float = Z_ONE_SIDED_95,
                  min_gain: float = 0.0, progress: Callable[[str], None] | None = None,
                  tolerance: float = 0.01, shared: bool = False, judged_on: str = "proxies",
                  consensus_margin: float = CONSENSUS_MARGIN) -> PortfolioResult:
    """Apply each member (in order) to the site and to every proxy while the time budget
    lasts, estimate each one's gain on the proxies, and select (module docstring).

    A member that needs the training data is skipped when ``source`` is None; one that needs
    raw images when the sets carry none; a member not started before ``budget_s`` is skipped
    (recorded with the reason), and so is one whose :func:`expected_seconds` for the site's
    and proxies' images do not fit into what is left. ``source`` may be a function that
    returns the training data: it is called when the first member that needs it starts
    (never, if none does)."""
    if not proxies:
        raise ValueError("the portfolio needs at least one labelled proxy")
    if any(p.labels is None for p in proxies):
        raise ValueError("every proxy needs labels")
    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    split = [halves(p, seed + 7919 * j) for j, p in enumerate(proxies)]
    right0 = [correct(champion, ev.h, ev.labels) for _, ev in split]
    champ = CandidateRecord(Member("champion", "champion"), selected=False)
    champ.estimate = gain_estimate(right0, right0, z, shared)
    records = [champ]
    n_images = len(site) + sum(len(p) for p in proxies)
    best_bn: CandidateRecord | None = None
    for member in portfolio:
        rec = CandidateRecord(member)
        records.append(rec)
        elapsed = time.perf_counter() - t_start
        left = budget_s - elapsed
        need = expected_seconds(member, n_images, precision)
        if member.needs_source and source is None:
            rec.skipped = "needs the labelled training data (source-free site)"
        elif member.needs_images and (site.images is None or any(p.images is None for p in proxies)):
            rec.skipped = "needs the raw images"
        elif left <= 0:
            rec.skipped = f"time budget of {budget_s:.0f} s spent ({elapsed:.0f} s)"
        elif need > left:
            rec.skipped = f"needs ~{need:.0f} s, {left:.0f} s of the budget left"
        if rec.skipped:
            say(f"{member.name}: skipped ({rec.skipped})")
            continue
        base_rec = best_bn if member.recipe.builds_on_bn else None
        t0 = time.perf_counter()
        try:
            if member.needs_source and callable(source):
                source = source()  # once: later members get the same set
            rec.applied = apply_member(member, champion, site, source,
                                       base_rec.applied if base_rec else None,
                                       base_rec.member if base_rec else None, seed, precision,
                                       share(budget_s, t_start, 1 + len(split)))
            rec.site_seconds = time.perf_counter() - t0
            rights = []
            for j, (adapt_half, score_half) in enumerate(split):
                a = apply_member(member, champion, adapt_half, source,
                                 base_rec.proxies[j] if base_rec else None,
                                 base_rec.member if base_rec else None, seed, precision,
                                 share(budget_s, t_start, len(split) - j), n_site=len(site))
                rec.proxies.append(a)
                rights.append(score_on(a, score_half, precision))
        except (ValueError, RuntimeError) as e:  # one recipe failing does not stop the rest
            rec.skipped = f"failed: {e}"
            rec.applied, rec.proxies = None, []
            say(f"{member.name}: {rec.skipped}")
            continue
        rec.seconds = time.perf_counter() - t0
        rec.estimate = gain_estimate(rights, right0, z, shared)
        say(f"{member.name}: gain {100 * rec.estimate['gain']:+.1f} pts "
            f"(lower {100 * rec.estimate['lower']:+.1f}) in {rec.seconds:.1f} s")
        # only the best bn member's proxy results are used again (by tent / shot-im): drop
        # every other adapted proxy model as soon as it is scored
        if member.bn_kind and (best_bn is None or rec.estimate["lower"] > best_bn.estimate["lower"]):
            if best_bn is not None:
                best_bn.proxies = []
            best_bn = rec
        else:
            rec.proxies = []
    built = [r for r in records[1:] if r.applied is not None]
    probs = [cached_outputs(champion, site.h)[1]] + [
        cached_outputs(r.applied.result.model, r.applied.h)[1] for r in built]
    off = disagreements(probs)
    for i, (r, veto) in enumerate(zip([champ, *built], vetoes(off, consensus_margin, len(probs)),
                                      strict=True)):
        if off is not None:
            r.estimate["consensus_disagreement"] = round(off[i], 4)
        if veto:
            r.estimate["vetoed"] = ("its predictions on the site disagree with the consensus of "
                                    "the candidates and the champion more than the champion's")
            say(f"{r.member.name}: vetoed ({r.estimate['vetoed']})")
    idx = select([r.estimate if r.applied is not None else None for r in records], min_gain,
                 tolerance)
    rule = (f"an estimated gain above {100 * min_gain:g} points with a 95% lower bound above "
            f"{-100 * tolerance:+g}")
    reasons = []
    if idx is None:
        tried = [r for r in records[1:] if r.estimate is not None]
        if tried:
            top = max(tried, key=lambda r: r.estimate["gain"])
            reasons.append(
                f"no_gain: no candidate has {rule} (best {top.member.name}: "
                f"{100 * top.estimate['gain']:+.1f} points, lower bound "
                f"{100 * top.estimate['lower']:+.1f}"
                + (", vetoed by the consensus" if top.estimate.get("vetoed") else "")
                + f", on {top.estimate['k']} labelled {judged_on} of the site)")
        else:
            reasons.append("no_gain: no candidate could be built")
    else:
        records[idx].selected = True
        e = records[idx].estimate
        reasons.append(f"selected {records[idx].member.name}: estimated gain "
                       f"{100 * e['gain']:+.1f} points (95% lower bound {100 * e['lower']:+.1f}; "
                       f"rule: {rule}) on {e['k']} labelled {judged_on} of the site")
    return PortfolioResult(records, idx, reasons, time.perf_counter() - t_start)


__all__ = ["EXPECTED_PER", "Applied", "CandidateRecord", "Member", "PortfolioResult",
           "SiteSet", "apply_member", "consensus_veto", "correct", "disagreements",
           "expected_seconds", "gain_estimate", "halves", "members", "run_portfolio", "score_on",
           "select", "share"]
