"""The run context: what every task needs, built once where a run starts and passed down.

    rt = Runtime.open(settings)            # settings, a migrated database, the registry
    ctx = rt.site_context("night-cam")     # + the site's config and database id
    ctx = ctx.serving()                    # + the model that serves the site now

Nothing below the flows reads the environment or a global: a flow builds its context from the
``Settings`` it was given (or, started by a deployment, from ``Settings()`` at that start) and
passes it to its tasks. Plain functions (no Prefect): tasks and flows call them; tests too.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from emowatch.settings import Settings
from emowatch.sites import Site, get_site, load_sites

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from tasks.registry.client import Registry

_INIT_LOCK = threading.Lock()
_MIGRATED: set[str] = set()  # database URLs this process has brought to head


@dataclass(frozen=True)
class ServedModel:
    """The model serving a site right now."""

    name: str
    version: str
    alias: str

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class Runtime:
    """The settings of one run, with the database engine and the model registry they name.

    Only the settings are data: the engine (one per URL and process, ``db.session``) and the
    registry are derived from them, so a context can be copied, pickled or handed to Prefect
    and Dask (which turn task parameters into plain data) and opens the same resources again
    wherever it lands."""

    settings: Settings

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        """State folders and a migrated database (once per process and URL)."""
        from db.migrate import init_db

        settings.register_secrets()
        with _INIT_LOCK:
            if settings.db_url not in _MIGRATED:
                settings.ensure_dirs()
                init_db(settings.db_url)
                _MIGRATED.add(settings.db_url)
        return cls(settings)

    @property
    def engine(self) -> Engine:
        from db.session import get_engine

        return get_engine(self.settings.db_url)

    @functools.cached_property
    def registry(self) -> Registry:
        from tasks.registry.client import Registry

        return Registry.from_settings(self.settings)

    def sites(self) -> dict[str, Site]:
        """The sites file, read now (it is the truth; raises SitesFileError with line/field)."""
        return load_sites(self.settings.sites_file)

    def site_context(self, name: str, sites: dict[str, Site] | None = None) -> RunContext:
        """This runtime for one site: its config from the sites file (``sites`` if already
        read) and its database id (registered on first use)."""
        from db import sites as site_rows
        from db.session import session_scope

        site = get_site(self.sites() if sites is None else sites, name)
        with session_scope(self.engine) as s:
            site_id = site_rows.upsert_site(s, site).id
        return RunContext(self.settings, site, site_id)


@dataclass(frozen=True)
class RunContext(Runtime):
    """A runtime for one site: its config, database id and (after :meth:`serving`) the model
    that serves it."""

    site: Site
    site_id: int
    served: ServedModel | None = None

    def serving(self) -> RunContext:
        """This context with ``served`` set (:func:`ensure_site_model`)."""
        return dataclasses.replace(self, served=ensure_site_model(self))

    @property
    def model(self) -> ServedModel:
        if self.served is None:
            raise RuntimeError("the run context has no served model yet (call serving())")
        return self.served


def ensure_site_model(ctx: RunContext) -> ServedModel:
    """The model that serves the site: the champion of its recorded history (the database's
    ``model_deployments``, never a bare MLflow alias: a version nobody decided on is not
    served). On first use the source champion is registered as version 1 of
    ``emowatch-<site>`` with alias ``champion`` and recorded as the initial champion; a site
    whose registry already had a champion but no history adopts it, recorded too."""
    from db import deployments
    from db.deployments import champion_stack
    from db.session import session_scope
    from tasks.registry.client import CHAMPION, SOURCE_MODEL, RegistryError

    reg, site = ctx.registry, ctx.site
    with session_scope(ctx.engine) as s:
        stack = champion_stack(s, ctx.site_id, site.model_name)
    if stack:
        return ServedModel(site.model_name, stack[-1], CHAMPION)
    v = reg.get_alias_version(site.model_name, CHAMPION)
    if v is not None:
        reason = "adopted the registry's champion (no history was recorded before)"
    else:
        src = reg.get_alias_version(SOURCE_MODEL, CHAMPION)
        if src is None:
            raise RegistryError(f"no {SOURCE_MODEL}@{CHAMPION}: train the source model first "
                                "('emowatch train --data DIR')")
        v = reg.copy_to_site(SOURCE_MODEL, src, site.model_name,
                             tags={"emowatch.site": site.name}).version
        reg.set_alias(site.model_name, CHAMPION, v)
        reason = f"started from {SOURCE_MODEL}/{src}"
    with session_scope(ctx.engine) as s:
        deployments.add_deployment(s, site_id=ctx.site_id, model_name=site.model_name,
                                   version=v, previous_version=None, action="initial",
                                   actor="emowatch", reason=reason)
    return ServedModel(site.model_name, v, CHAMPION)


__all__ = ["RunContext", "Runtime", "ServedModel", "ensure_site_model"]
