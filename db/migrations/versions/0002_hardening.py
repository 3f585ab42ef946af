"""hardening: original bytes of quarantined file names; time-based retry of alerts; the
audit result, the verdict's reasons and the candidates of every adaptation run (the gate record
a promotion checks)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 02:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("quarantined_files") as b:
        # hex of the name's bytes when they are not UTF-8 (rel_path holds an escaped form)
        b.add_column(sa.Column("raw_path", sa.Text(), nullable=True))
    with op.batch_alter_table("alerts") as b:
        # when the next delivery attempt is due (NULL: at once); backoff per alert
        b.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        b.create_index("ix_alerts_next_attempt_at", ["next_attempt_at"])
        # retried until then (set at the first failure), then "undelivered"
        b.add_column(sa.Column("retry_until", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("adaptation_runs") as b:
        b.add_column(sa.Column("audit", sa.JSON(), nullable=True))
        b.add_column(sa.Column("reasons", sa.JSON(), nullable=True))
        b.add_column(sa.Column("candidates", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("adaptation_runs") as b:
        b.drop_column("candidates")
        b.drop_column("reasons")
        b.drop_column("audit")
    with op.batch_alter_table("alerts") as b:
        b.drop_column("retry_until")
        b.drop_index("ix_alerts_next_attempt_at")
        b.drop_column("next_attempt_at")
    with op.batch_alter_table("quarantined_files") as b:
        b.drop_column("raw_path")
