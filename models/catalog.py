"""The one registration point of every pluggable part of emowatch.

Each table maps a name (what the sites file, the CLI, the flows and the benchmarks say) to the
class that implements it, as ``"module:Class"``, imported on first use: reading this module
costs nothing (no torch), so the sites-file schema and the CLI can check a name against it.

To add a drift detector, an accuracy estimator, an adaptation method, a portfolio recipe, a
promotion gate or an explainer: write
its class (a subclass of the protocol named beside each table) in a module of its own, then add
one line to its table. Nothing else needs to change: see docs/extending.md.
"""

from __future__ import annotations

import importlib
from typing import Any

# Drift detectors (protocol: models.drift.base.DriftDetector). Each reads one view of a batch
# (``input_kind``: "features", "probs" or "quality"); models.drift.base.CombinedDrift runs the
# site's list of them with a Bonferroni correction.
DETECTORS: dict[str, str] = {
    "mmd": "models.drift.mmd:MMDDrift",
    "bbsd": "models.drift.univariate:BBSDDrift",
    "quality": "models.drift.univariate:QualityDrift",
}
DEFAULT_DETECTORS: tuple[str, ...] = ("mmd", "bbsd", "quality")

# Label-free accuracy estimators (protocol: models.estimate.base.Estimator, fitted on a shift
# bank at training time and given a batch's features; or, ``needs_images``, given the site's
# images and the version itself: the site twin). The default is the one the benchmark
# (python -m bench.estimate) chose on conditions held out of its fitting; the others are the
# published baselines it is compared with.
ESTIMATORS: dict[str, str] = {
    "meta-gbm": "models.estimate.meta:MetaGBM",
    "twin": "models.estimate.twin_estimator:TwinEstimator",
    "no-change": "models.estimate.base:NoChange",
    "avg-conf": "models.estimate.base:AvgConf",
    "doc": "models.estimate.base:DoC",
    "atc-mc": "models.estimate.base:ATCMaxConf",
    "atc-ne": "models.estimate.base:ATCNegEntropy",
}
DEFAULT_ESTIMATOR = "meta-gbm"

# Unsupervised adaptation methods (protocol: models.adapt.base.Adapter).
ADAPTERS: dict[str, str] = {
    "mmd": "models.adapt.discrepancy:MMDAdapter",
    "coral": "models.adapt.discrepancy:CoralAdapter",
    "adabn": "models.adapt.bn:AdaBNAdapter",
    "shot-im": "models.adapt.entropy:ShotIMAdapter",
    "tent": "models.adapt.entropy:TentAdapter",
}

# The re-adaptation portfolio (models.adapt.portfolio): (name, kind, params), cheapest first. The
# flow tries them in this order within the site's adapt.portfolio_budget_s; the sites file's
# adapt.portfolio names a subset. prior_n: the training domain counted as N images in the BN
# statistics (site weight n / (n + N)); expected_s: seconds per 240 images of each set (the
# site and every proxy) measured on 2 cores with AVX512-BF16 (bench/results/portfolio.md);
# expected_s_fp32: the same with the model in fp32 (bench/results/member_seconds.md, the
# measured figure rounded up; mmd-backbone not measured): a member starts only if what it
# expects to need fits into what is left of the budget.
PORTFOLIO: tuple[tuple[str, str, dict[str, float]], ...] = (
    ("bn(N=80)", "bn", {"prior_n": 80, "expected_s": 1, "expected_s_fp32": 1}),
    ("bn(N=240)", "bn", {"prior_n": 240, "expected_s": 1, "expected_s_fp32": 1}),
    ("bn(N=720)", "bn", {"prior_n": 720, "expected_s": 1, "expected_s_fp32": 1}),
    ("bn-all(N=480)", "bn-all", {"prior_n": 480, "expected_s": 4, "expected_s_fp32": 14}),
    ("tent", "tent", {"steps": 20, "expected_s": 4, "expected_s_fp32": 6}),
    ("shot-im", "shot-im", {"steps": 20, "expected_s": 4, "expected_s_fp32": 4}),
    ("mmd", "mmd", {"steps": 100, "expected_s": 7, "expected_s_fp32": 4}),
    ("mmd-backbone", "mmd-backbone", {"expected_s": 300}),
)
DEFAULT_PORTFOLIO: tuple[str, ...] = tuple(n for n, _, _ in PORTFOLIO)

# Portfolio recipes (protocol: models.adapt.recipes.Recipe): what a member's kind does.
RECIPES: dict[str, str] = {
    "bn": "models.adapt.recipes:TopBN",
    "bn-all": "models.adapt.recipes:AllBN",
    "tent": "models.adapt.recipes:Tent",
    "shot-im": "models.adapt.recipes:ShotIM",
    "mmd": "models.adapt.recipes:MMDTop",
    "mmd-backbone": "models.adapt.recipes:MMDBackbone",
}

# Promotion gates (protocol: models.validate.gates.Gate), in the order they are reported.
GATES: dict[str, str] = {
    "source_accuracy": "models.validate.gates:SourceAccuracyGate",
    "dev_risk": "models.validate.gates:DEVRiskGate",
    "residual_drift": "models.validate.gates:ResidualDriftGate",
    "prediction_sanity": "models.validate.gates:PredictionSanityGate",
    "explanation": "models.validate.gates:ExplanationGate",
}

# The promotion gates a site shows as evidence without a veto by default (``evidence_only``
# in the sites file; [] restores their veto). Neither predicted harm in the benchmarks: of
# 40 adapted candidates (bench/results/adapt.md, 3 seeds) DEV failed 23, of which 2 were
# worse than the champion, and passed 17, of which 2 were (residual drift: 2 of 18 and 2 of
# 22); on the twin (bench/results/portfolio_twin.md) DEV failed the one selected candidate
# at night 2, +7.0 points.
EVIDENCE_ONLY = ("dev_risk", "residual_drift")

# Explainers (protocol: models.explain.base.Explainer): attribution maps of one image batch.
EXPLAINERS: dict[str, str] = {
    "dncshap": "models.explain.base:DnCShap",
    "occlusion": "models.explain.base:Occlusion",
    "integrated_gradients": "models.explain.base:IntegratedGradients",
}

DEFAULT_EXPLAINER = "dncshap"  # the paper's; what the explanation gate uses by default

_TABLES = {"detector": DETECTORS, "estimator": ESTIMATORS, "adapter": ADAPTERS, "gate": GATES,
           "recipe": RECIPES, "explainer": EXPLAINERS}


def load(kind: str, name: str) -> Any:
    """The class registered as ``name`` in the ``kind`` table ("detector", "estimator",
    "adapter", "gate", "recipe", "explainer")."""
    table = _TABLES[kind]
    if name not in table:
        raise ValueError(f"unknown {'adaptation method' if kind == 'adapter' else kind} "
                         f"{name!r}; known: {', '.join(sorted(table))}")
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["ADAPTERS", "DEFAULT_DETECTORS", "DEFAULT_ESTIMATOR", "DEFAULT_PORTFOLIO", "DETECTORS",
           "ESTIMATORS", "DEFAULT_EXPLAINER", "EVIDENCE_ONLY", "EXPLAINERS", "GATES", "PORTFOLIO",
           "RECIPES", "load"]
