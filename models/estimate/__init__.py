"""Label-free accuracy estimates: how well does the model work on a site's images now?

Protocol ``Estimator`` (fit on meta-sets of the labelled held-out images, ``estimate`` a
batch -> ``Estimate``); implementations ``MetaGBM`` (the default) and the published
baselines ``NoChange``, ``AvgConf``, ``DoC``, ``ATCMaxConf``, ``ATCNegEntropy``, registered in
``models.catalog.ESTIMATORS``; ``fit_estimator`` fits one for a model version; ``fit_twin``
fits the camera that makes the held-out images look like a site (the site twin);
``TwinEstimator`` measures a version on it.

Names are imported on first use (importing the package costs nothing); inside emowatch,
import from the module itself (``from models.estimate.base import ...``).
"""

from __future__ import annotations

from models.lazy import exports

# name -> the module of this package that defines it
_EXPORTS: dict[str, str] = {
    "Estimator": "base",
    "Estimate": "base",
    "impact": "base",
    "NoChange": "base",
    "AvgConf": "base",
    "DoC": "base",
    "ATCMaxConf": "base",
    "ATCNegEntropy": "base",
    "estimator_from_state": "base",
    "MetaGBM": "meta",
    "MetaBank": "bank",
    "EstimatorConfig": "fit",
    "fit_estimator": "fit",
    "Novelty": "novelty",
    "TwinConfig": "twin",
    "TwinFit": "twin",
    "fit_twin": "twin",
    "TwinEstimator": "twin_estimator",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = exports(__name__, _EXPORTS)
