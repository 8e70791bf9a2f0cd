"""Channel versions of the LangGraph index compare byte by byte (``COLLATE "C"``).

``list()`` finds most of a page's channel values with one range read of
``es_lg_blobs.version`` between the lowest and the highest version the page's own events
stored, and looks up the versions outside that range (picked in Python, by code point) one by
one.  A PostgreSQL database whose default collation is not C (``en_US.UTF-8``, an ICU
locale: common defaults) orders ``00001Z...`` and ``00001y...`` the other way round, so some
versions fell in neither read and their values were missing from the history, silently.
SQLite compares text byte by byte already (BINARY).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # Rewrites the table and its primary key index in the new order.
        op.alter_column("es_lg_blobs", "version", type_=sa.Text(collation="C"),
                        existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("es_lg_blobs", "version", type_=sa.Text(), existing_nullable=False)
