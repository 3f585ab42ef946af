"""The MLflow model registry: the client (``client.Registry``: log, register, load, move
aliases), its plain records (``records``: names, aliases, version records, no MLflow
import) and verified local copies of versions' artifacts (``artifacts``)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Versions registered before the loader module pickled ``tasks.registry.EmotionPyfunc``.
    if name == "EmotionPyfunc":
        from tasks.pyfunc import legacy_pyfunc_class

        return legacy_pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
