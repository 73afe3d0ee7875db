"""Index jobs by (owner, started_at): fair claims ask each active owner when it was last served.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_owner_started_at", "jobs", ["owner", "started_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_started_at", table_name="jobs")
