"""The fold version a rebuild in progress folds with (``es_projections.rebuild_code_version``).

A rebuild that was interrupted resumes its generation only with the same version of the fold:
another version (a release rolled out or back meanwhile) starts a fresh generation, so that a
generation never holds rows of two folds.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("es_projections") as batch:
        batch.add_column(sa.Column("rebuild_code_version", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("es_projections") as batch:
        batch.drop_column("rebuild_code_version")
