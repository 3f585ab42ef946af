"""Drift detectors: is a site's current batch drawn from the training domain's distribution?

Protocol ``DriftDetector`` (``Detector`` is its base class: fit on the reference, score a
batch, decide); implementations ``MMDDrift`` (features), ``BBSDDrift`` (softmax outputs),
``QualityDrift`` (image-quality statistics); ``CombinedDrift`` runs a site's list of them with
a Bonferroni correction. Registered by name in ``models.catalog.DETECTORS``.

Names are imported on first use (importing the package costs nothing); inside emowatch,
import from the module itself (``from models.drift.base import ...``).
"""

from __future__ import annotations

from models.lazy import exports

# name -> the module of this package that defines it
_EXPORTS: dict[str, str] = {
    "DriftDetector": "base",
    "Detector": "base",
    "DriftResult": "base",
    "DriftConfig": "base",
    "CombinedDrift": "base",
    "decide": "base",
    "MMDDrift": "mmd",
    "BBSDDrift": "univariate",
    "QualityDrift": "univariate",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = exports(__name__, _EXPORTS)
