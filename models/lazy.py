"""Family packages that export their names without importing their modules up front.

``models/drift/__init__.py`` and its siblings list ``name -> module`` and get ``__getattr__``
and ``__dir__`` from :func:`exports` (PEP 562): ``from models.drift import MMDDrift`` imports
``models.drift.mmd`` then, and ``import models.drift`` alone costs nothing (no torch, no
matplotlib), which keeps the CLI's start-up and the catalog's name checks cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(package: str, table: Mapping[str, str]
            ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose ``table`` maps each exported name to
    the submodule (relative to the package) that defines it."""

    def getattr_(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{table[name]}"), name)

    def dir_() -> list[str]:
        return sorted(table)

    return getattr_, dir_
