"""Simulated sites and data: the camera model of the site twin (continuous parameters),
benchmark conditions (``night``, ``blur``, ...), the seeded
bank of parametric shifts the estimators are fitted on, and synthetic faces whose class
is carried only by known regions (for testing explainers).

Names are imported on first use (importing the package costs nothing); inside emowatch,
import from the module itself (``from models.sim.conditions import ...``).
"""

from __future__ import annotations

from models.lazy import exports

# name -> the module of this package that defines it
_EXPORTS: dict[str, str] = {
    "CameraParams": "camera",
    "apply_camera": "camera",
    "Condition": "conditions",
    "apply_condition": "conditions",
    "apply_to_fraction": "conditions",
    "Spec": "shifts",
    "bank_specs": "shifts",
    "apply_spec": "shifts",
    "sample_specs": "shifts",
    "spec_text": "shifts",
    "SyntheticFaces": "synthetic",
    "make_faces": "synthetic",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = exports(__name__, _EXPORTS)
