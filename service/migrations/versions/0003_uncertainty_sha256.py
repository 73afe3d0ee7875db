"""Record the uncertainty file's sha256 at admission, like the model's and the data's.

The supervisor re-hashes every input it hands to the sandboxed child and refuses a mismatch
(``input_integrity_error``); the uncertainty file had no recorded hash to compare with.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("uncertainty_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("uncertainty_sha256")
