"""The categories a projection folds (``es_projections.categories``), as a JSON list.

``projections status`` counts a projection's lag in its own categories also when the code that
asks does not have the projection (an operator's shell without the application's module).
NULL: written by code before this revision, which did not record them; ``[]``: every category.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("es_projections") as batch:
        batch.add_column(sa.Column("categories", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("es_projections") as batch:
        batch.drop_column("categories")
