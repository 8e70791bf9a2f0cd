"""Projection bookkeeping, projection rows and snapshots.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "es_projections",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("code_version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("failed_position", sa.BigInteger, nullable=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("lease_until", sa.BigInteger, nullable=True),
        sa.Column("rebuild_generation", sa.Integer, nullable=True),
        sa.Column("rebuild_position", sa.BigInteger, nullable=True),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "es_projection_rows",
        sa.Column("projection", sa.String(255), primary_key=True),
        sa.Column("generation", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.String(255), primary_key=True),
        sa.Column("stream_id", sa.String(255), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("state", sa.LargeBinary, nullable=False),
        sa.Column("status", sa.String(64), nullable=True),
        sa.Column("group_key", sa.String(255), nullable=True),
        sa.Column("sort_key", sa.BigInteger, nullable=True),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_index(
        "es_projection_rows_query", "es_projection_rows",
        ["projection", "generation", "tenant_id", "status", "group_key", "sort_key"],
    )
    op.create_index(
        "es_projection_rows_status", "es_projection_rows",
        ["projection", "generation", "status", "sort_key"],
    )
    op.create_table(
        "es_snapshots",
        sa.Column("tenant_id", sa.String(255), primary_key=True),
        sa.Column("stream_id", sa.String(255), primary_key=True),
        sa.Column("projection", sa.String(255), primary_key=True),
        sa.Column("code_version", sa.Integer, primary_key=True),
        sa.Column("version", sa.BigInteger, primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("recorded_at", sa.BigInteger, nullable=False),
        sa.Column("state", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("es_snapshots")
    op.drop_index("es_projection_rows_status", table_name="es_projection_rows")
    op.drop_index("es_projection_rows_query", table_name="es_projection_rows")
    op.drop_table("es_projection_rows")
    op.drop_table("es_projections")
