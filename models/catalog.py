"""The one registration point of every pluggable part of emowatch.

Each table maps a name (what the sites file, the CLI, the flows and the benchmarks say) to the
class that implements it, as ``"module:Class"``, imported on first use: reading this module
costs nothing (no torch), so the sites-file schema and the CLI can check a name against it.

To add a drift detector, an accuracy estimator, an adaptation method or a promotion gate: write
its class (a subclass of the protocol named beside each table) in a module of its own, then add
one line to its table. Nothing else needs to change: see the README's Layout section.
"""

from __future__ import annotations

import importlib
from typing import Any

# Drift detectors (protocol: models.drift.DriftDetector). Each reads one view of a batch
# (``input_kind``: "features", "probs" or "quality"); models.drift.CombinedDrift runs the
# site's list of them with a Bonferroni correction.
DETECTORS: dict[str, str] = {
    "mmd": "models.mmd:MMDDrift",
    "bbsd": "models.drift_univariate:BBSDDrift",
    "quality": "models.drift_univariate:QualityDrift",
}
DEFAULT_DETECTORS: tuple[str, ...] = ("mmd", "bbsd", "quality")

# Label-free accuracy estimators (protocol: models.estimate.Estimator). The default is the one
# the benchmark (python -m bench.estimate) chose on conditions held out of its fitting; the
# others are the published baselines it is compared with.
ESTIMATORS: dict[str, str] = {
    "meta-gbm": "models.estimate_meta:MetaGBM",
    "no-change": "models.estimate:NoChange",
    "avg-conf": "models.estimate:AvgConf",
    "doc": "models.estimate:DoC",
    "atc-mc": "models.estimate:ATCMaxConf",
    "atc-ne": "models.estimate:ATCNegEntropy",
}
DEFAULT_ESTIMATOR = "meta-gbm"

# Unsupervised adaptation methods (protocol: models.adapt.Adapter).
ADAPTERS: dict[str, str] = {
    "mmd": "models.discrepancy:MMDAdapter",
    "coral": "models.discrepancy:CoralAdapter",
    "adabn": "models.bn:AdaBNAdapter",
    "shot-im": "models.entropy:ShotIMAdapter",
    "tent": "models.entropy:TentAdapter",
}

# Promotion gates (protocol: models.gates.Gate), in the order they are reported.
GATES: dict[str, str] = {
    "source_accuracy": "models.gates:SourceAccuracyGate",
    "dev_risk": "models.gates:DEVRiskGate",
    "residual_drift": "models.gates:ResidualDriftGate",
    "prediction_sanity": "models.gates:PredictionSanityGate",
    "explanation": "models.gates:ExplanationGate",
}

_TABLES = {"detector": DETECTORS, "estimator": ESTIMATORS, "adapter": ADAPTERS, "gate": GATES}


def load(kind: str, name: str) -> Any:
    """The class registered as ``name`` in the ``kind`` table ("detector", "estimator",
    "adapter", "gate")."""
    table = _TABLES[kind]
    if name not in table:
        raise ValueError(f"unknown {'adaptation method' if kind == 'adapter' else kind} "
                         f"{name!r}; known: {', '.join(sorted(table))}")
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["ADAPTERS", "DEFAULT_DETECTORS", "DEFAULT_ESTIMATOR", "DETECTORS", "ESTIMATORS",
           "GATES", "load"]
