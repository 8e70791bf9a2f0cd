"""Index tables of the LangGraph checkpoint savers (projections/langgraph_saver.py).

Every row is a projection of the ``lg.*`` events of the ``lgthread-<thread id>`` streams and
points at the event that holds the data (``position``); checkpoints, channel values and pending
writes themselves live only in the log.  ``projections.langgraph_saver.rebuild_index`` rebuilds
all three tables from the events.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per checkpoint; the checkpoint itself is the CheckpointSaved event at `position`.
    # (No index on run_id: delete_for_runs, a rare operation, scans the tenant's rows.)
    op.create_table(
        "es_lg_checkpoints",
        sa.Column("tenant_id", sa.String(255), primary_key=True),
        sa.Column("thread_id", sa.String(255), primary_key=True),
        sa.Column("checkpoint_ns", sa.Text, primary_key=True),
        # Checkpoint ids as keys: 17 bytes for a UUID (LangGraph's ids), else 0x01 + the text.
        sa.Column("checkpoint_id", sa.LargeBinary, primary_key=True),
        sa.Column("parent_id", sa.LargeBinary, nullable=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("run_id", sa.Text, nullable=True),
        sqlite_with_rowid=False,
    )
    # Where channel values are: per channel version, the first event that stored any channel at
    # that version (channel ''), plus a row per channel another event stored at a version that
    # first event did not hold.  LangGraph gives all channels written in one step one version,
    # so this is one row per step; a channel whose version did not change gets none.
    op.create_table(
        "es_lg_blobs",
        sa.Column("tenant_id", sa.String(255), primary_key=True),
        sa.Column("thread_id", sa.String(255), primary_key=True),
        sa.Column("checkpoint_ns", sa.Text, primary_key=True),
        sa.Column("version", sa.Text, primary_key=True),
        sa.Column("channel", sa.Text, primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sqlite_with_rowid=False,
    )
    # One row per WritesSaved event, under the checkpoint its writes belong to.
    op.create_table(
        "es_lg_writes",
        sa.Column("tenant_id", sa.String(255), primary_key=True),
        sa.Column("thread_id", sa.String(255), primary_key=True),
        sa.Column("checkpoint_ns", sa.Text, primary_key=True),
        sa.Column("checkpoint_id", sa.LargeBinary, primary_key=True),
        sa.Column("position", sa.BigInteger, primary_key=True),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("es_lg_writes")
    op.drop_table("es_lg_blobs")
    op.drop_table("es_lg_checkpoints")
