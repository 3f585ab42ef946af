"""Engines and sessions for emowatch's database (SQLite or PostgreSQL).

``make_engine(url)`` builds a configured engine, ``session_scope(engine)`` is a unit of work
(``db.migrate.init_db(url)`` migrates a database to the newest schema). Nothing here runs at
import time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

# 30 s: an ingestion chunk or a lock write holds SQLite's write lock for milliseconds; a reader
# or writer that still waits 30 s is stuck behind something broken, and should say so.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        # WAL: readers never block the writer (the featurizer reads while ingestion writes).
        # In-memory databases answer "memory"; that is fine.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")  # SQLite's default is OFF, PostgreSQL's is on
        # NORMAL is durable across application crashes in WAL mode (only an OS crash can lose
        # the last transactions) and makes each commit ~10x cheaper than FULL.
        cur.execute("PRAGMA synchronous=NORMAL")
    finally:
        cur.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``).

    SQLite: WAL journal, busy timeout, foreign keys on; ``sqlite://`` (in memory) shares one
    connection so that every session sees the same database. PostgreSQL: connections are
    pinged before use (a restarted server does not break a long-running worker).
    """
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        memory = u.database in (None, "", ":memory:")
        args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        if memory:
            args["check_same_thread"] = False
            kwargs.setdefault("poolclass", StaticPool)
        kwargs.setdefault("connect_args", {}).update(args)
        engine = create_engine(u, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    if u.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(u, **kwargs)
    raise ValueError(
        f"unsupported database URL {u.render_as_string(hide_password=True)!r}: "
        "emowatch runs on SQLite ('sqlite:///path/to/file.db') or PostgreSQL "
        "('postgresql+psycopg://user@host:5432/dbname')"
    )


_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(url: str) -> Engine:
    """One shared engine per URL in this process.

    Tasks running in threads share the pool. After a fork, call :func:`dispose_engines`
    in the child (or create your own with :func:`make_engine`)."""
    with _ENGINES_LOCK:
        eng = _ENGINES.get(url)
        if eng is None:
            eng = _ENGINES[url] = make_engine(url)
        return eng


def dispose_engines() -> None:
    """Close every engine made by :func:`get_engine` (tests, forked children)."""
    with _ENGINES_LOCK:
        for eng in _ENGINES.values():
            eng.dispose()
        _ENGINES.clear()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises.

    Objects stay usable after the commit (``expire_on_commit=False``), so a function can return
    the rows it wrote."""
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


__all__ = [
    "SQLITE_BUSY_TIMEOUT_MS",
    "dispose_engines",
    "get_engine",
    "make_engine",
    "session_scope",
]
