"""Alembic environment for emowatch (run by db.migrate or the ``alembic`` command).

URL: the connection or ``sqlalchemy.url`` the caller put in the config, else Settings.db_url.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection, text
from sqlalchemy.pool import NullPool

from db.models import Base, UTCDateTime
from db.session import make_engine

# any fixed 64-bit number: the PostgreSQL advisory lock that serialises concurrent migrations
_PG_MIGRATION_LOCK = 0x656D6F7761746368  # "emowatch"


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    # Migrations must not import db.models (old revisions would break when it changes):
    # our UTCDateTime is a plain timestamptz to the database.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _migrate(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # foreign keys OFF while tables are rebuilt (batch mode copies and drops tables);
        # the pragma is ignored inside a transaction, so set it before one starts.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        compare_type=True,
        render_as_batch=sqlite,  # ALTER on SQLite = copy the table
        render_item=_render_item,
    )
    try:
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # released at commit; a second process waits, then finds the schema at head
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK}
                )
            context.run_migrations()
    finally:
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()


def run_migrations_online() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:  # the alembic command line: the settings of its environment
        from emowatch.settings import Settings

        url = Settings().db_url
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            _migrate(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("emowatch migrations run online only (against a database)")
run_migrations_online()
