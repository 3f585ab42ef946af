"""Promotion gates: label-free checks a candidate must pass before it may replace the champion.

One protocol: a gate is a class with a ``name`` and ``evaluate(evidence) -> {result name:
{"passed", "value", "threshold"}}`` (usually one result; the explanation gate reports four).
Its registration is one line in ``models.catalog.GATES``; ``models.validate.candidate.validate_candidate``
runs the configured list and derives the verdict.

:class:`Evidence` holds what any gate may look at -- both models, the labelled source
validation activations and the site's, each as the model that reads them sees them, probe
images -- and computes the shared quantities (outputs, DEV, MMD) once, on first use.

    gate               value                                      passes when
    source_accuracy    champion - candidate source val accuracy    <= max_source_drop
                       (the candidate's weights as ``candidate_source_model`` reads the
                       source: did it forget the task?)
    dev_risk           candidate - champion DEV risk                <= dev_tolerance
    residual_drift     candidate's site-vs-source MK-MMD^2          <= max(champion's, floor)
    prediction_sanity  entropy of the mean site prediction / log K  >= min_entropy_ratio
    explanation        rank / top-k / cosine agreement of DnCShap   >= mins; faithfulness drop <= max
                       maps of champion and candidate on probes     (skipped without probes)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from models.adapt.base import CachedSet, cached_outputs
from models.adapt.discrepancy import mk_mmd2
from models.catalog import EVIDENCE_ONLY
from models.explain.metrics import GateTolerances as ExplanationTolerances
from models.network import EmotionNet
from models.validate.dev import DEVConfig, DEVResult, deep_embedded_validation, per_sample_ce

GateResult = dict[str, Any]  # {"passed": bool, "value": float, "threshold": float}

DEFAULT_GATES = ("source_accuracy", "dev_risk", "residual_drift", "prediction_sanity",
                 "explanation")


@dataclass
class ValidationConfig:
    max_source_drop: float = 0.03  # 3 points of source validation accuracy (issue target)
    # DEV risks are CE in nats; the paired estimates (same source samples) of champion and
    # candidate differ by noise of a few hundredths on ~200 validation images.
    dev_tolerance: float = 0.05
    drift_max_ratio: float = 1.0  # adaptation must not increase site-vs-source MMD^2
    min_entropy_ratio: float = 0.5
    # Per-sample loss DEV weights: "ce" (cross-entropy, nats; smooth, what training
    # minimises) or "error" (0-1 loss: the DEV risk is then an estimated site error rate and
    # dev_tolerance is in accuracy units).
    dev_loss: Literal["ce", "error"] = "ce"
    # Whose features decide "unverifiable": "candidate" (DEV as published: the candidate's own
    # bottleneck) or "either" (also the champion's). Alignment can make site and source
    # features of the CANDIDATE overlap although the images are of different kinds (faces
    # vs photos); the champion's features were never trained to hide the difference.
    unverifiable_from: Literal["candidate", "either"] = "either"
    dev: DEVConfig = field(default_factory=DEVConfig)
    explanation: ExplanationTolerances = field(default_factory=ExplanationTolerances)
    # The gates to run, by their names in models.catalog.GATES, in report order.
    gates: tuple[str, ...] = DEFAULT_GATES
    # Gates run and reported (``decides`` false in their results) that do not decide the
    # verdict: evidence with what it means, not a veto.
    evidence: tuple[str, ...] = EVIDENCE_ONLY

    def validate(self) -> None:
        if self.dev_loss not in ("ce", "error"):
            raise ValueError(f"dev_loss must be 'ce' or 'error', got {self.dev_loss!r}")
        if self.unverifiable_from not in ("candidate", "either"):
            raise ValueError("unverifiable_from must be 'candidate' or 'either', got "
                             f"{self.unverifiable_from!r}")


# --- the checks as plain functions -----------------------------------------------------------
def gate_result(passed: bool, value: float, threshold: float) -> GateResult:
    """One gate's result (``run_gates`` adds ``decides``: False for an evidence-only gate)."""
    return {"passed": bool(passed), "value": float(value), "threshold": float(threshold)}


def gate_source_accuracy(candidate_acc: float, reference_acc: float,
                         max_drop: float = 0.03) -> GateResult:
    """Source validation accuracy may drop at most ``max_drop`` (0.03 = 3 points) below the
    reference (the champion's). value = drop (positive = worse)."""
    if max_drop < 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    drop = float(reference_acc) - float(candidate_acc)
    return gate_result(drop <= max_drop + 1e-12, drop, max_drop)


def gate_dev_risk(candidate_risk: float | DEVResult, champion_risk: float | DEVResult,
                  tolerance: float = 0.05) -> GateResult:
    """DEV risk (nats of cross-entropy) may exceed the champion's by at most ``tolerance``.
    value = candidate - champion. A non-finite risk fails."""
    c = candidate_risk.risk if isinstance(candidate_risk, DEVResult) else float(candidate_risk)
    r = champion_risk.risk if isinstance(champion_risk, DEVResult) else float(champion_risk)
    diff = c - r
    return gate_result(math.isfinite(diff) and diff <= tolerance,
                       diff if math.isfinite(diff) else math.inf, tolerance)


def gate_residual_drift(mmd2_before: float, mmd2_after: float, max_ratio: float = 1.0,
                        floor: float = 1e-4) -> GateResult:
    """Site-vs-source MMD^2 of bottleneck features after adaptation may be at most
    ``max_ratio`` times the champion's (before). value = after, threshold = max_ratio *
    max(before, floor); ``floor`` keeps a site with no drift from failing on noise."""
    thr = max_ratio * max(float(mmd2_before), floor)
    return gate_result(float(mmd2_after) <= thr, mmd2_after, thr)


def gate_prediction_sanity(site_probs: np.ndarray, min_ratio: float = 0.5) -> GateResult:
    """Entropy of the mean site prediction / log K must be >= ``min_ratio``: catches a model
    that collapsed onto one or two classes. 0.5 for K=6 fails e.g. 80% of the site on one
    class (ratio 0.46) but allows a moderately imbalanced site."""
    p = np.asarray(site_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(f"site_probs must be (N, K) with N >= 1 and K >= 2, got {p.shape}")
    m = p.mean(0)
    ratio = float(-(m * np.log(np.clip(m, 1e-12, None))).sum() / math.log(p.shape[1]))
    return gate_result(ratio >= min_ratio, ratio, min_ratio)


# --- the evidence ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelView:
    """One model's outputs on the source validation and the site images."""

    z_source: np.ndarray  # (n, D)
    losses: np.ndarray  # (n,) per-sample loss on source validation (DEV's unit)
    z_site: np.ndarray  # (m, D)
    p_site: np.ndarray  # (m, K)
    source_acc: float


def model_view(model: EmotionNet, src: CachedSet, site: CachedSet, loss: str,
               source_model: EmotionNet | None = None) -> ModelView:
    """``source_model`` reads the source images when given (default ``model``)."""
    zs, ps = cached_outputs(source_model if source_model is not None else model, src.h)
    zt, pt = cached_outputs(model, site.h)
    y = src.labels.numpy()
    hit = ps.argmax(1) == y
    losses = per_sample_ce(ps, y) if loss == "ce" else (~hit).astype(np.float64)
    return ModelView(zs, losses, zt, pt, float(hit.mean()))


@dataclass
class Evidence:
    """What the gates look at (see the module docstring); shared quantities are computed once.

    ``source`` / ``site`` are the champion's activations of the labelled source validation
    images and of the site images; ``source_candidate`` / ``site_candidate`` the candidate's
    own when its frozen part differs (the same images, labels as in ``source``), else the same
    objects."""

    champion: EmotionNet
    candidate: EmotionNet
    source: CachedSet
    site: CachedSet
    config: ValidationConfig
    source_candidate: CachedSet | None = None
    site_candidate: CachedSet | None = None
    probe: torch.Tensor | None = None  # normalised probe images for the explanation gate
    # the network that reads the source images for the candidate (None: the candidate): a
    # candidate that only re-normalised for the site is judged on the training domain with
    # the champion's statistics (tasks.candidate.source_model)
    candidate_source_model: EmotionNet | None = None
    # filled by the explanation gate: {"champion": Attribution, "challenger": Attribution}
    attributions: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def champion_view(self) -> ModelView:
        return model_view(self.champion, self.source, self.site, self.config.dev_loss)

    @functools.cached_property
    def candidate_view(self) -> ModelView:
        src = self.source_candidate if self.source_candidate is not None else self.source
        src = CachedSet(h=src.h, labels=self.source.labels)
        site = self.site_candidate if self.site_candidate is not None else self.site
        return model_view(self.candidate, src, site, self.config.dev_loss,
                          self.candidate_source_model)

    @functools.cached_property
    def champion_dev(self) -> DEVResult:
        v = self.champion_view
        return deep_embedded_validation(v.z_source, v.losses, v.z_site, self.config.dev)

    @functools.cached_property
    def candidate_dev(self) -> DEVResult:
        v = self.candidate_view
        return deep_embedded_validation(v.z_source, v.losses, v.z_site, self.config.dev)

    @functools.cached_property
    def mmd2_before(self) -> float:
        v = self.champion_view
        return float(mk_mmd2(torch.from_numpy(v.z_source), torch.from_numpy(v.z_site)))

    @functools.cached_property
    def mmd2_after(self) -> float:
        v = self.candidate_view
        return float(mk_mmd2(torch.from_numpy(v.z_source), torch.from_numpy(v.z_site)))


# --- the protocol and the gates -----------------------------------------------------------------
class Gate:
    """A promotion gate: ``evaluate`` returns its named results (see the module docstring)."""

    name: str = ""

    def evaluate(self, ev: Evidence) -> dict[str, GateResult]:
        raise NotImplementedError


class SourceAccuracyGate(Gate):
    name = "source_accuracy"

    def evaluate(self, ev):
        return {self.name: gate_source_accuracy(ev.candidate_view.source_acc,
                                                ev.champion_view.source_acc,
                                                ev.config.max_source_drop)}


class DEVRiskGate(Gate):
    name = "dev_risk"

    def evaluate(self, ev):
        return {self.name: gate_dev_risk(ev.candidate_dev, ev.champion_dev, ev.config.dev_tolerance)}


class ResidualDriftGate(Gate):
    name = "residual_drift"

    def evaluate(self, ev):
        return {self.name: gate_residual_drift(ev.mmd2_before, ev.mmd2_after,
                                               ev.config.drift_max_ratio)}


class PredictionSanityGate(Gate):
    name = "prediction_sanity"

    def evaluate(self, ev):
        return {self.name: gate_prediction_sanity(ev.candidate_view.p_site,
                                                  ev.config.min_entropy_ratio)}


class ExplanationGate(Gate):
    """DnCShap agreement and faithfulness of champion vs candidate on the probe images
    (``models.explain.metrics.explanation_gate``); nothing to report without probes."""

    name = "explanation"

    def evaluate(self, ev):
        if ev.probe is None:
            return {}
        from models.explain.metrics import explanation_gate

        res = explanation_gate(ev.champion, ev.candidate, ev.probe, ev.config.explanation,
                               attributions=ev.attributions)
        return {f"{self.name}_{k}": gate_result(v["passed"], v["value"], v["threshold"])
                for k, v in res.items()}


def run_gates(ev: Evidence, names: tuple[str, ...] | list[str]) -> dict[str, GateResult]:
    """Every gate of ``names`` (entries of ``models.catalog.GATES``) on one evidence."""
    from models.catalog import load

    out: dict[str, GateResult] = {}
    for name in names:
        decides = name not in ev.config.evidence
        out.update({k: {**v, "decides": decides}
                    for k, v in load("gate", name)().evaluate(ev).items()})
    return out


__all__ = [
    "DEFAULT_GATES", "DEVRiskGate", "Evidence", "ExplanationGate", "Gate", "GateResult", "ModelView",
    "PredictionSanityGate", "ResidualDriftGate", "SourceAccuracyGate", "ValidationConfig", "gate_dev_risk",
    "gate_prediction_sanity", "gate_residual_drift", "gate_result", "gate_source_accuracy",
    "model_view", "run_gates",
]
