"""The event log: events, stream versions and idempotency keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "es_events",
        sa.Column("position", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  primary_key=True, autoincrement=False),
        sa.Column("tenant_id", sa.String(255), nullable=False),
        sa.Column("stream_id", sa.String(255), nullable=False),
        sa.Column("category", sa.String(255), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("event_id", sa.Uuid(as_uuid=True), nullable=False),
        sa.Column("type", sa.String(255), nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("metadata", sa.LargeBinary, nullable=True),
        sa.Column("recorded_at", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("tenant_id", "stream_id", "version", name="es_events_stream_version"),
    )
    op.create_index("es_events_category_position", "es_events", ["category", "position"])
    op.create_table(
        "es_streams",
        sa.Column("tenant_id", sa.String(255), primary_key=True),
        sa.Column("stream_id", sa.String(255), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "es_idempotency",
        sa.Column("tenant_id", sa.String(255), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("stream_id", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.LargeBinary, nullable=False),
        sa.Column("first_position", sa.BigInteger, nullable=False),
        sa.Column("last_position", sa.BigInteger, nullable=False),
        sa.Column("stream_version", sa.BigInteger, nullable=False),
        sa.Column("recorded_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("es_idempotency")
    op.drop_table("es_streams")
    op.drop_index("es_events_category_position", table_name="es_events")
    op.drop_table("es_events")
