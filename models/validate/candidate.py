"""Label-free validation of an adapted model (a "candidate") before it may replace the champion.

Site images have no labels, so nothing here measures site accuracy. What we can check are the
gates of :mod:`models.validate.gates` (source accuracy kept, DEV risk not worse than the champion's,
residual drift reduced, site predictions not collapsed, explanations stable), run from the
configured list, and Deep Embedded Validation's flag that the site is unlike anything the
source validation set can describe (:mod:`models.validate.dev`).

``verdict``: "fail" if any gate that decides failed, else "unverifiable" if DEV says so and the
candidate was not judged on the site's twin, else "pass"; the report carries the reasons in
words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from models.adapt.base import as_cached_set
from models.network import EmotionNet
from models.validate.dev import DEVResult
from models.validate.gates import DEFAULT_GATES, Evidence, GateResult, ValidationConfig, run_gates


@dataclass
class ValidationReport:
    verdict: str  # "pass" | "fail" | "unverifiable"
    gates: dict[str, GateResult]
    # DEV risks are in ``dev_loss`` units (nats of CE, or error rate)
    dev: DEVResult  # candidate
    champion_dev: DEVResult
    source_acc: float  # candidate on source validation
    champion_source_acc: float
    mmd2_before: float  # champion features, site vs source validation
    mmd2_after: float  # candidate features
    reasons: list[str] = dataclasses.field(default_factory=list)  # why this verdict, in words
    attributions: dict[str, Any] = dataclasses.field(default_factory=dict)  # explanation maps

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("attributions")
        return d


def verdict(gates: Mapping[str, GateResult] | Iterable[GateResult],
            dev: DEVResult | bool | None, vouched: bool = False) -> str:
    """"fail" if any gate that decides failed (a result with ``decides`` false is evidence
    only); else "unverifiable" if DEV flagged it and nothing else vouches for the site (``vouched``:
    the candidate's gain was judged on labelled images shown to reproduce the site, its twin);
    else "pass"."""
    gs = list(gates.values()) if isinstance(gates, Mapping) else list(gates)
    if any(not g["passed"] and g.get("decides", True) for g in gs):
        return "fail"
    unver = dev.unverifiable if isinstance(dev, DEVResult) else bool(dev)
    return "unverifiable" if unver and not vouched else "pass"


def reasons_for(gates: Mapping[str, GateResult], dev: DEVResult, champion_dev: DEVResult,
                unverifiable_from: str = "either", vouched: str = "") -> list[str]:
    """The verdict's reasons: every failed gate by how much, and why DEV cannot vouch (evidence
    only when ``vouched`` says what does: the site's twin)."""
    out = []
    for name, g in gates.items():
        if not g["passed"]:
            out.append(f"gate {name} failed: {_num(g['value'])} against threshold "
                       f"{_num(g['threshold'])}"
                       + ("" if g.get("decides", True) else " (evidence only: does not decide)"))
    shown = f" (evidence only: {vouched})" if vouched else ""
    if dev.unverifiable:
        out.append(f"unverifiable (candidate's features): {dev.reason}{shown}")
    if unverifiable_from == "either" and champion_dev.unverifiable:
        out.append(f"unverifiable (champion's features): {champion_dev.reason}{shown}")
    unver = dev.unverifiable or (unverifiable_from == "either" and champion_dev.unverifiable)
    if verdict(gates, unver, bool(vouched)) == "pass":
        out.append(("every gate passed" if not out else "every gate that decides passed")
                   + (f" and {vouched}" if vouched else " and the site lies where the source "
                      "validation set can describe it"))
    return out


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def validate_candidate(candidate: EmotionNet, champion: EmotionNet, source_val: Any,
                       site: Any, config: ValidationConfig | None = None,
                       site_candidate: Any = None, source_candidate: Any = None,
                       probe: torch.Tensor | None = None,
                       candidate_source_model: EmotionNet | None = None,
                       vouched: str = "") -> ValidationReport:
    """Run the configured gates and DEV for both models.

    source_val: labelled source validation activations ``(h, labels)`` or CachedSet (never
    used for adaptation); site: cached site activations (those adapted on are fine: nothing
    here uses site labels). site / source_val are the champion's activations; when the
    candidate's frozen part differs pass its own activations of the same images as
    ``site_candidate`` and ``source_candidate`` (labels as in ``source_val``): the candidate is
    judged as it would run, never on the champion's activations. ``probe``: normalised images
    for the explanation gate (skipped without). ``candidate_source_model``: the network
    that reads the source images for the candidate (default the candidate itself; e.g. its
    weights with the champion's BN statistics, ``tasks.candidate.source_model``).
    ``vouched``: in words, what judged the candidate on labelled images that reproduce the site
    (the portfolio on the site's twin); DEV's "unverifiable" is then evidence, not the verdict.
    """
    cfg = config or ValidationConfig()
    cfg.validate()
    src = as_cached_set(source_val, "source_val", need_labels=True)
    tgt = as_cached_set(site, "site")
    tgt_c = as_cached_set(site_candidate, "site_candidate") if site_candidate is not None else None
    src_c = None
    if source_candidate is not None:
        src_c = as_cached_set(source_candidate, "source_candidate")
        if len(src_c) != len(src):
            raise ValueError(f"source_candidate has {len(src_c)} images, source_val {len(src)}")
    ev = Evidence(champion, candidate, src, tgt, cfg, source_candidate=src_c, site_candidate=tgt_c,
                  probe=probe, candidate_source_model=candidate_source_model)
    gates = run_gates(ev, cfg.gates)
    dev1, dev0 = ev.candidate_dev, ev.champion_dev
    unverifiable = dev1.unverifiable or (cfg.unverifiable_from == "either" and dev0.unverifiable)
    return ValidationReport(
        verdict=verdict(gates, unverifiable, bool(vouched)), gates=gates, dev=dev1, champion_dev=dev0,
        source_acc=ev.candidate_view.source_acc, champion_source_acc=ev.champion_view.source_acc,
        mmd2_before=ev.mmd2_before, mmd2_after=ev.mmd2_after,
        reasons=reasons_for(gates, dev1, dev0, cfg.unverifiable_from, vouched),
        attributions=dict(ev.attributions),
    )


__all__ = ["DEFAULT_GATES", "ValidationConfig", "ValidationReport", "reasons_for",
           "validate_candidate", "verdict"]  # the first two are models.validate.gates'
