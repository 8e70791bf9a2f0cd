"""SQLAlchemy Core tables of the store.

These mirror what the Alembic migrations in ``migrations/`` create; the migrations, not
``metadata.create_all``, are what builds and upgrades a database.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
)

MAX_ID_LENGTH = 255
VERSION_TABLE = "eventstore_alembic_version"

metadata = MetaData()

# Position: assigned by the store as last position + 1 while it holds the append lock, so
# positions are gap-free and their order is the commit order (see store._append_locked).
events = Table(
    "es_events",
    metadata,
    Column("position", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
           autoincrement=False),
    Column("tenant_id", String(MAX_ID_LENGTH), nullable=False),
    Column("stream_id", String(MAX_ID_LENGTH), nullable=False),
    Column("category", String(MAX_ID_LENGTH), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("event_id", Uuid(as_uuid=True), nullable=False),
    Column("type", String(MAX_ID_LENGTH), nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("metadata", LargeBinary, nullable=True),
    # Microseconds since the Unix epoch, UTC: one integer compares and converts fastest on both
    # backends, and time-travel queries compare integers.
    Column("recorded_at", BigInteger, nullable=False),
    UniqueConstraint("tenant_id", "stream_id", "version", name="es_events_stream_version"),
)
Index("es_events_category_position", events.c.category, events.c.position)

streams = Table(
    "es_streams",
    metadata,
    Column("tenant_id", String(MAX_ID_LENGTH), primary_key=True),
    Column("stream_id", String(MAX_ID_LENGTH), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

idempotency = Table(
    "es_idempotency",
    metadata,
    Column("tenant_id", String(MAX_ID_LENGTH), primary_key=True),
    Column("key", String(MAX_ID_LENGTH), primary_key=True),
    Column("stream_id", String(MAX_ID_LENGTH), nullable=False),
    Column("fingerprint", LargeBinary, nullable=False),
    Column("first_position", BigInteger, nullable=False),
    Column("last_position", BigInteger, nullable=False),
    Column("stream_version", BigInteger, nullable=False),
    Column("recorded_at", BigInteger, nullable=False),
)

# -- projections (migration 0002) --------------------------------------------------------------

projections = Table(
    "es_projections",
    metadata,
    Column("name", String(MAX_ID_LENGTH), primary_key=True),
    # Queries read rows of the active generation; a rebuild fills the next one and swaps.
    Column("generation", Integer, nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("code_version", Integer, nullable=False),
    Column("status", String(32), nullable=False),
    Column("error", Text, nullable=True),
    Column("failed_position", BigInteger, nullable=True),
    Column("owner", String(MAX_ID_LENGTH), nullable=True),
    Column("lease_until", BigInteger, nullable=True),
    Column("rebuild_generation", Integer, nullable=True),
    Column("rebuild_position", BigInteger, nullable=True),
    # The fold version the rebuild in progress folds with (migration 0004).
    Column("rebuild_code_version", Integer, nullable=True),
    Column("updated_at", BigInteger, nullable=False),
    # The categories the projection folds, a JSON list ([]: all; NULL: not recorded, before
    # migration 0005), for its lag in `projections status` where its code is not loaded.
    Column("categories", Text, nullable=True),
    # "<fold version>:<owner>" of the lease holder's code (migration 0006; it counts only while
    # it names the current owner, as code before 0006 changes the owner without it): a
    # projector of a newer fold version takes the lease from an older one.
    Column("owner_code", Text, nullable=True),
)

projection_rows = Table(
    "es_projection_rows",
    metadata,
    Column("projection", String(MAX_ID_LENGTH), primary_key=True),
    Column("generation", Integer, primary_key=True),
    Column("tenant_id", String(MAX_ID_LENGTH), primary_key=True),
    Column("stream_id", String(MAX_ID_LENGTH), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("state", LargeBinary, nullable=False),
    Column("status", String(64), nullable=True),
    Column("group_key", String(MAX_ID_LENGTH), nullable=True),
    Column("sort_key", BigInteger, nullable=True),
    Column("updated_at", BigInteger, nullable=False),
)
Index("es_projection_rows_query", projection_rows.c.projection, projection_rows.c.generation,
      projection_rows.c.tenant_id, projection_rows.c.status, projection_rows.c.group_key,
      projection_rows.c.sort_key)
Index("es_projection_rows_status", projection_rows.c.projection, projection_rows.c.generation,
      projection_rows.c.status, projection_rows.c.sort_key)

snapshots = Table(
    "es_snapshots",
    metadata,
    Column("tenant_id", String(MAX_ID_LENGTH), primary_key=True),
    Column("stream_id", String(MAX_ID_LENGTH), primary_key=True),
    Column("projection", String(MAX_ID_LENGTH), primary_key=True),
    Column("code_version", Integer, primary_key=True),
    Column("version", BigInteger, primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("recorded_at", BigInteger, nullable=False),
    Column("state", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)
