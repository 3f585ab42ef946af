"""Plain values of the model registry: names, aliases, version records and small helpers
(no MLflow import; ``tasks.registry.client`` is the client that uses them)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

LOGGED_MODEL_URI = re.compile(r"^models:/(m-[0-9a-f]+)$")  # MLflow 3 logged-model ids
SOURCE_MODEL = "emowatch-source"
CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_EXPERIMENT = "emowatch"

class RegistryError(RuntimeError):
    """The registry does not hold what was asked for (missing model, version or alias)."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    model_uri: str  # "models:/<name>/<version>"
    model_id: str | None = None  # MLflow 3 logged-model id ("m-...")


@dataclass(frozen=True)
class VersionInfo:
    """A model version as plain values (no MLflow entity leaks out of this module)."""

    name: str
    version: str
    run_id: str | None
    model_id: str | None
    source: str
    aliases: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    created_ms: int = 0
    description: str = ""

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def key(self) -> str:
        """``<name>/<version>``: the ``model_key`` of the featurize cache."""
        return f"{self.name}/{self.version}"


def site_model_name(site_name: str) -> str:
    """The registered model of a site (same as ``emowatch.sites.Site.model_name``)."""
    name = f"emowatch-{site_name}"
    if name == SOURCE_MODEL:
        raise ValueError("'source' cannot be a site name: emowatch-source is the source model")
    return name


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def safe_dirname(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "experiment"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def tag_value(v: Any) -> str:
    """A tag value as MLflow stores it: strings as they are, anything else as JSON."""
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)


def not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}


def model_id_of(mv: Any) -> str | None:
    # The SQL registry store has no model_id column: a version registered from a logged model
    # comes back with model_id=None and source "models:/<model_id>".
    if getattr(mv, "model_id", None):
        return mv.model_id
    m = LOGGED_MODEL_URI.match(mv.source or "")
    return m.group(1) if m else None


def version_info(mv: Any) -> VersionInfo:
    return VersionInfo(
        name=mv.name, version=str(mv.version), run_id=mv.run_id or None, model_id=model_id_of(mv),
        source=mv.source or "", aliases=tuple(mv.aliases or ()), tags=dict(mv.tags or {}),
        created_ms=int(mv.creation_timestamp or 0), description=mv.description or "",
    )


def quoted(name: str) -> str:
    if "'" in name:
        raise ValueError(f"model names cannot contain quotes: {name!r}")
    return name


__all__ = [
    "CHALLENGER", "CHAMPION", "DEFAULT_EXPERIMENT", "LOGGED_MODEL_URI", "SOURCE_MODEL",
    "RegisteredVersion", "RegistryError", "VersionInfo", "flatten", "is_remote", "model_id_of",
    "not_found", "quoted", "safe_dirname", "site_model_name", "tag_value", "version_info",
]
