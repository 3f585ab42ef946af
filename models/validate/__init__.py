"""Label-free validation of a candidate before it may replace the champion.

Protocol ``Gate`` (``check(evidence) -> GateResult``); implementations
``SourceAccuracyGate``, ``DEVRiskGate``, ``ResidualDriftGate``, ``PredictionSanityGate``,
``ExplanationGate``, registered in ``models.catalog.GATES``; ``validate_candidate`` runs
them and gives the verdict; DEV (deep embedded validation) estimates the site risk.

Names are imported on first use (importing the package costs nothing); inside emowatch,
import from the module itself (``from models.validate.gates import ...``).
"""

from __future__ import annotations

from models.lazy import exports

# name -> the module of this package that defines it
_EXPORTS: dict[str, str] = {
    "Gate": "gates",
    "GateResult": "gates",
    "Evidence": "gates",
    "SourceAccuracyGate": "gates",
    "DEVRiskGate": "gates",
    "ResidualDriftGate": "gates",
    "PredictionSanityGate": "gates",
    "ExplanationGate": "gates",
    "run_gates": "gates",
    "ValidationConfig": "candidate",
    "ValidationReport": "candidate",
    "validate_candidate": "candidate",
    "verdict": "candidate",
    "DEVConfig": "dev",
    "DEVResult": "dev",
    "deep_embedded_validation": "dev",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = exports(__name__, _EXPORTS)
