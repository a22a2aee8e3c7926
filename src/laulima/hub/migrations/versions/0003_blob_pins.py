"""Blob pins every hub process sees: a blob a process is about to refer to is not deleted by another.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blob_pins",
        sa.Column("digest", sa.String(64), primary_key=True, nullable=False),
        sa.Column("holder", sa.String(64), primary_key=True, nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("pinned_at", sa.Double(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("blob_pins")
