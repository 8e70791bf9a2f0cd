"""The fold version of the code holding a projection's lease (``es_projections.owner_code``).

A projector of a newer fold version takes the lease from a worker of an older one, so that a
new release's projectors rebuild the rows while the old release's are still running (each of
those renews its lease at every poll, so the lease would never pass on). The column holds
``<fold version>:<owner>``, written with ``owner``; it counts only while it names the current
owner, since code before this revision changes ``owner`` without it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("es_projections") as batch:
        batch.add_column(sa.Column("owner_code", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("es_projections") as batch:
        batch.drop_column("owner_code")
