"""What every task needs: settings, the database, the site, and the site's model.

Plain functions (no Prefect): tasks and flows call them; tests call them directly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from emowatch.settings import Settings, get_settings
from emowatch.sites import Site, get_site, load_sites

_INIT_LOCK = threading.Lock()
_INITIALISED: set[tuple[str, str]] = set()


def prepare(settings: Settings | None = None) -> tuple[Settings, Engine]:
    """Settings, state folders, a migrated database and a configured MLflow (once per process)."""
    from db.session import get_engine, init_db
    from tasks import registry

    settings = settings or get_settings()
    key = (settings.db_url, settings.tracking_uri)
    with _INIT_LOCK:
        if key not in _INITIALISED:
            settings.ensure_dirs()
            init_db(settings.db_url)
            registry.configure(settings)
            _INITIALISED.add(key)
    return settings, get_engine(settings.db_url)


def forget_prepared() -> None:
    """Tests that switch databases call this (and db.session.dispose_engines)."""
    with _INIT_LOCK:
        _INITIALISED.clear()


def load_site(name: str, settings: Settings | None = None) -> tuple[Site, int]:
    """The site's config from the sites file and its database id (registered on first use)."""
    from db import queries
    from db.session import session_scope

    settings, engine = prepare(settings)
    site = get_site(load_sites(settings.sites_file), name)
    with session_scope(engine) as s:
        row = queries.upsert_site(s, site)
        return site, row.id


@dataclass(frozen=True)
class ServedModel:
    """The model serving a site right now."""

    name: str
    version: str
    alias: str

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"


def ensure_site_model(site: Site, site_id: int, settings: Settings | None = None) -> ServedModel:
    """The site's champion; on first use the source champion is registered as version 1 of
    ``emowatch-<site>`` with alias ``champion`` (recorded in the deployment history)."""
    from db.models import ModelDeployment
    from db.session import session_scope
    from tasks import registry

    settings, engine = prepare(settings)
    v = registry.get_alias_version(site.model_name, registry.CHAMPION)
    if v is not None:
        return ServedModel(site.model_name, v, registry.CHAMPION)
    src = registry.get_alias_version(registry.SOURCE_MODEL, registry.CHAMPION)
    if src is None:
        raise registry.RegistryError(
            f"no {registry.SOURCE_MODEL}@{registry.CHAMPION}: train the source model first "
            "('emowatch train --data DIR')"
        )
    reg = registry.copy_to_site(registry.SOURCE_MODEL, src, site.model_name,
                                tags={"emowatch.site": site.name})
    registry.set_alias(site.model_name, registry.CHAMPION, reg.version)
    with session_scope(engine) as s:
        s.add(ModelDeployment(site_id=site_id, model_name=site.model_name, version=reg.version,
                              previous_version=None, action="initial", actor="emowatch",
                              reason=f"started from {registry.SOURCE_MODEL}/{src}"))
    return ServedModel(site.model_name, reg.version, registry.CHAMPION)


_MODEL_CACHE: dict[tuple[str, str, str], Any] = {}
_MODEL_LOCK = threading.Lock()


def load_model(name: str, version: str) -> tuple[Any, Any]:
    """(Checkpoint, ReferenceProfile) of a registered version, cached per process (a version
    never changes once registered)."""
    from models.profile import ReferenceProfile
    from tasks import registry

    key = (get_settings().tracking_uri, name, str(version))
    with _MODEL_LOCK:
        hit = _MODEL_CACHE.get(key)
    if hit is not None:
        return hit
    ckpt, _ = registry.load_by_version(name, version)
    profile = ReferenceProfile.from_npz(registry.load_reference_profile(name, version))
    with _MODEL_LOCK:
        _MODEL_CACHE[key] = (ckpt, profile)
        while len(_MODEL_CACHE) > 4:  # a few models in RAM is plenty for one worker
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
    return ckpt, profile
