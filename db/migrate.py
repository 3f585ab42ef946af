"""Alembic, driven from Python: ``upgrade(url)``, ``downgrade(url, rev)``, ``current(url)``.

The migration scripts live in ``db/migrations`` next to this file, so they are found from the
installed package whatever the working directory. The database URL comes from the caller (a URL
or an Engine); ``alembic -c db/alembic.ini ...`` on the command line falls back to
``Settings().db_url`` (EMOWATCH_DATABASE_URL).

New revision after changing ``db/models.py``:
``alembic -c db/alembic.ini revision --autogenerate -m "what changed"`` (then read it), and
``pytest tests/test_db.py`` checks that the migrated schema equals the models.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Alembic keeps the running migration context in module globals: one migration per process at a
# time (other processes are serialised by the database: see migrations/env.py).
_LOCK = threading.Lock()


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for our migrations (no .ini file needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: a literal '%' (URL-encoded passwords/options) must be '%%'
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _run(url: str | Engine, fn: Any, *args: Any) -> None:
    with _LOCK:
        if isinstance(url, Engine):
            cfg = alembic_config()
            with url.connect() as conn:
                cfg.attributes["connection"] = conn
                fn(cfg, *args)
                conn.commit()
        else:
            fn(alembic_config(url), *args)


def head() -> str:
    """The newest revision in the migrations folder."""
    rev = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert rev is not None, "no migrations found"
    return rev


def current(url: str | Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    from db.session import make_engine

    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        if not isinstance(url, Engine):
            engine.dispose()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created), held for the block: processes on
    this host take turns (SQLite has no lock that spans Alembic's check-then-create)."""
    import fcntl

    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def init_db(url: str | Engine) -> str:
    """Create or upgrade the database at ``url`` to the newest schema; returns the revision it
    is at. Safe to call on every start: a database already at head is left alone, and
    processes migrating at once take turns (PostgreSQL: an advisory lock in
    migrations/env.py; a SQLite file: a lock file beside it, ``<db>.migrate-lock``)."""
    if isinstance(url, str):
        u = make_url(url)
        if u.get_backend_name() == "sqlite" and u.database not in (None, "", ":memory:"):
            db = Path(u.database).expanduser()
            db.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(db.with_name(db.name + ".migrate-lock")):
                return upgrade(url)
    return upgrade(url)


def upgrade(url: str | Engine, rev: str = "head") -> str:
    """Migrate the database up to ``rev``; returns the revision it is at afterwards."""
    _run(url, command.upgrade, rev)
    return current(url) or "base"


def downgrade(url: str | Engine, rev: str) -> str:
    """Migrate the database down to ``rev`` (``"base"``: drop everything)."""
    _run(url, command.downgrade, rev)
    return current(url) or "base"


def schema_diff(url: str | Engine) -> list[Any]:
    """Differences between the database's schema and ``db.models`` (empty: they agree).

    Types and constraints are compared; server defaults are not (``now()`` is spelt
    differently by each database)."""
    from alembic.autogenerate import compare_metadata

    from db.models import Base
    from db.session import make_engine

    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        with engine.connect() as conn:
            mc = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(mc, Base.metadata))
    finally:
        if not isinstance(url, Engine):
            engine.dispose()


__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "current",
    "downgrade",
    "head",
    "init_db",
    "schema_diff",
    "upgrade",
]
