"""Dialect helpers shared by the ``db`` query modules (SQLite and PostgreSQL alike)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

# SQLite allows 32766 bound parameters per statement; PostgreSQL 65535. 500 keys per IN list
# keeps every statement far below both and is still one round trip per 500 images.
IN_CHUNK = 500


def dialect_insert(session_or_conn: Any, table: Any) -> Any:
    """The dialect's INSERT (the one with ``on_conflict_do_*``)."""
    bind = session_or_conn.get_bind() if isinstance(session_or_conn, Session) else session_or_conn
    name = bind.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"unsupported database dialect {name!r} (SQLite or PostgreSQL only)")


def chunked(items: Sequence[Any], n: int = IN_CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def update_row(session: Session, model: Any, row_id: Any, values: dict[str, Any]) -> Any:
    """Set columns of the row ``row_id`` of ``model`` (a clear error when there is none)."""
    row = session.get(model, row_id)
    if row is None:
        raise ValueError(f"no {model.__tablename__} row {row_id!r}")
    for k, v in values.items():
        setattr(row, k, v)
    return row


__all__ = ["IN_CHUNK", "chunked", "dialect_insert", "update_row"]
