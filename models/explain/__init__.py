"""Attributions and their scores: DnCShap (hierarchical Shapley, the paper's explainer),
occlusion and integrated gradients behind one protocol,
``Explainer(model).attribute(images) -> Attribution``; faithfulness, localisation and
stability metrics; figures. Registered in ``models.catalog.EXPLAINERS``.

Names are imported on first use (importing the package costs nothing); inside emowatch,
import from the module itself (``from models.explain.base import ...``).
"""

from __future__ import annotations

from models.lazy import exports

# name -> the module of this package that defines it
_EXPORTS: dict[str, str] = {
    "Explainer": "base",
    "Attribution": "base",
    "DnCShap": "base",
    "Occlusion": "base",
    "IntegratedGradients": "base",
    "make_explainer": "base",
    "image_partition": "base",
    "GateTolerances": "metrics",
    "explanation_gate": "metrics",
    "deletion_insertion": "metrics",
    "topk_overlap": "metrics",
    "perturbation_stability": "metrics",
    "pointing_game": "metrics",
    "overlay_figure": "plots",
    "gallery_figure": "plots",
    "dnc_shapley": "shapley",
    "exact_shapley": "shapley",
    "exact_owen": "shapley",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = exports(__name__, _EXPORTS)
