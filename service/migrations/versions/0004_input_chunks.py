"""Record the inputs' 64 MiB chunk digests at admission, beside their sha256 (issue 17).

The supervisor re-checks every input before the sandboxed child may read it. One SHA-256 over a 1.2 GB
calibration set takes 1.1 s on one core; the chunks' digests, computed from the same upload stream, let it
check the chunks in parallel (``service.chunk_digests``). Rows from before this revision have none and are
checked against the whole-file sha256, as before.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("input_chunks", sa.JSON(), nullable=True))
    op.add_column("datasets", sa.Column("chunks", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("chunks")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("input_chunks")
