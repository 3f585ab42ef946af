"""accuracy estimates: the label-free accuracy estimate of every drift check and its impact

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 04:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("drift_checks") as b:
        b.add_column(sa.Column("estimate", sa.JSON(), nullable=True))
        b.add_column(sa.Column("impact", sa.String(length=16), nullable=True))
        b.create_index("ix_drift_checks_impact", ["impact"])


def downgrade() -> None:
    with op.batch_alter_table("drift_checks") as b:
        b.drop_index("ix_drift_checks_impact")
        b.drop_column("impact")
        b.drop_column("estimate")
