"""Unsupervised re-adaptation of a model to one site's unlabelled images.

Protocol ``Adapter`` (``adapt(model, source, target) -> AdaptResult``); implementations
``MMDAdapter`` and ``CoralAdapter`` (discrepancy losses, as in the paper), ``AdaBNAdapter``
(batch-norm statistics), ``TentAdapter`` and ``ShotIMAdapter`` (source-free, by entropy),
registered in ``models.catalog.ADAPTERS``; the re-adaptation portfolio (``run_portfolio``)
tries several of them, each judged label-free on labelled proxies of the site.

Names are imported on first use (importing the package costs nothing); inside emowatch,
import from the module itself (``from models.adapt.base import ...``).
"""

from __future__ import annotations

from models.lazy import exports

# name -> the module of this package that defines it
_EXPORTS: dict[str, str] = {
    "Adapter": "base",
    "AdaptConfig": "base",
    "AdaptResult": "base",
    "adapt": "base",
    "get_adapter": "base",
    "available_adapters": "base",
    "MMDAdapter": "discrepancy",
    "CoralAdapter": "discrepancy",
    "AdaBNAdapter": "bn",
    "TentAdapter": "entropy",
    "ShotIMAdapter": "entropy",
    "run_portfolio": "portfolio",
    "PortfolioResult": "portfolio",
    "CandidateRecord": "portfolio",
    "ProxyConfig": "proxies",
    "build_proxies": "proxies",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = exports(__name__, _EXPORTS)
