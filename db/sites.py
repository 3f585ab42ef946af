"""The ``sites`` table: each site as last seen in the sites file (the file is the truth)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import SiteRow, utcnow
from db.sql import dialect_insert

if TYPE_CHECKING:
    from emowatch.sites import Site


def upsert_site(session: Session, site: Site) -> SiteRow:
    """Insert or update the row of ``site`` (the sites file is the source of truth).

    Atomic (INSERT .. ON CONFLICT (name) DO UPDATE): two processes registering the same new
    site at once both succeed and get the same row."""
    values = {
        "name": site.name,
        "inbox": str(site.inbox),
        "config": site.model_dump(mode="json"),
    }
    now = utcnow()
    stmt = dialect_insert(session, SiteRow).values(**values, created_at=now, updated_at=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=[SiteRow.name],
        set_={"inbox": stmt.excluded.inbox, "config": stmt.excluded.config, "updated_at": now},
    )
    session.execute(stmt)
    row = session.execute(
        select(SiteRow).where(SiteRow.name == site.name).execution_options(populate_existing=True)
    ).scalar_one()
    return row


def get_site_row(session: Session, name: str) -> SiteRow | None:
    return session.execute(select(SiteRow).where(SiteRow.name == name)).scalar_one_or_none()


def require_site_row(session: Session, name: str) -> SiteRow:
    """Like :func:`get_site_row`, but a clear error when the site was never registered."""
    row = get_site_row(session, name)
    if row is None:
        raise ValueError(f"site {name!r} is not in the database yet (run its ingestion first)")
    return row


def site_ids(session: Session) -> dict[str, int]:
    """name -> id of every registered site."""
    return {name: sid for name, sid in session.execute(select(SiteRow.name, SiteRow.id))}


__all__ = ["get_site_row", "require_site_row", "site_ids", "upsert_site"]
