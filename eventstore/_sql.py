"""Named statements, written once as SQLAlchemy Core and compiled once per dialect.

The hot paths (append, read) run these compiled strings on the DBAPI cursor of the SQLAlchemy
connection that holds the transaction.  Why not ``conn.execute(core_statement)``: SQLAlchemy's
per-execution work (cache key, execution context, result processing) costs more than the SQL
itself for one-row statements, and the store's target is half the bare driver's speed or better.
The statements stay Core (one definition for both backends, shared with every other caller);
only the execution is direct.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID, SafeUUID

from sqlalchemy import Connection, bindparam, func, select
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement

from ._backend import dbapi_cursor
from ._schema import events, idempotency, streams


class Compiled:
    """One statement compiled for one dialect, with its parameter order."""

    __slots__ = ("defaults", "names", "sql")

    def __init__(self, stmt: ClauseElement, dialect: Dialect) -> None:
        c: Any = stmt.compile(dialect=dialect)
        self.sql: str = str(c)
        self.names: tuple[str, ...] | None = (
            tuple(c.positiontup) if c.positiontup is not None else None
        )
        self.defaults: dict[str, Any] = dict(c.params)

    def args(self, values: Mapping[str, Any]) -> tuple[Any, ...] | Mapping[str, Any]:
        """``values`` in the driver's parameter style; names they leave out take the
        statement's defaults.  ``values`` must not hold names the statement does not use."""
        if self.names is None:
            if len(values) == len(self.defaults):
                return values
            return {**self.defaults, **values}
        d = self.defaults
        return tuple(values[n] if n in values else d[n] for n in self.names)

    def run(self, conn: Connection, values: Mapping[str, Any], *, binary: bool = False) -> Any:
        """Execute on the connection's DBAPI cursor; returns the cursor.

        ``binary``: ask psycopg for results in PostgreSQL's binary format, which halves the
        client's cost of a large read (``bytea`` arrives as is instead of as hex text).  Only the
        sync psycopg connection takes the option; elsewhere the flag changes nothing.
        """
        # The DBAPI connection's cursor (on psycopg's async driver, the _pg_async facade's).
        cur = dbapi_cursor(conn)
        dialect = conn.dialect
        if binary and dialect.name == "postgresql" and not dialect.is_async:
            cur.execute(self.sql, self.args(values), binary=True)
        else:
            cur.execute(self.sql, self.args(values))
        return cur

    def run_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        cur = dbapi_cursor(conn)
        cur.executemany(self.sql, [self.args(r) for r in rows])
        cur.close()


def _stream_where(stmt: Any) -> Any:
    return stmt.where(events.c.tenant_id == bindparam("tenant_id"),
                      events.c.stream_id == bindparam("stream_id"))


STATEMENTS: dict[str, ClauseElement] = {
    "insert_events": events.insert(),
    # The stream's version and last time, and the log's last position.
    "probe": select(
        select(streams.c.version)
        .where(streams.c.tenant_id == bindparam("tenant_id"),
               streams.c.stream_id == bindparam("stream_id"))
        .scalar_subquery(),
        select(func.max(events.c.position)).scalar_subquery(),
        select(streams.c.updated_at)
        .where(streams.c.tenant_id == bindparam("tenant_id"),
               streams.c.stream_id == bindparam("stream_id"))
        .scalar_subquery(),
    ),
    "find_key": select(idempotency.c.stream_id, idempotency.c.fingerprint,
                       idempotency.c.first_position, idempotency.c.last_position,
                       idempotency.c.stream_version)
    .where(idempotency.c.tenant_id == bindparam("tenant_id"),
           idempotency.c.key == bindparam("key")),
    "insert_key": idempotency.insert(),
    "insert_stream": streams.insert(),
    "update_stream": streams.update()
    .where(streams.c.tenant_id == bindparam("tenant_id"),
           streams.c.stream_id == bindparam("stream_id"))
    .values(version=bindparam("new_version"), updated_at=bindparam("updated_at")),
    # A stream's events as columns for folds (StreamSlice): no ids, no metadata.
    "read_slice": _stream_where(
        select(events.c.version, events.c.type, events.c.schema_version, events.c.data,
               events.c.recorded_at, events.c.position))
    .where(events.c.version >= bindparam("lo"), events.c.version <= bindparam("hi"))
    .order_by(events.c.version).limit(bindparam("page")),
}


_compiled: dict[tuple[str, str], Compiled] = {}


def statement(name: str, dialect: Dialect) -> Compiled:
    """The named statement compiled for the dialect (once per dialect name)."""
    key = (name, dialect.name)
    c = _compiled.get(key)
    if c is None:
        c = _compiled[key] = Compiled(STATEMENTS[name], dialect)
    return c


_reads: dict[tuple[Any, ...], Compiled] = {}


def read_query(dialect: Dialect, *, by_stream: bool, backwards: bool, upper: bool,
               tenant: bool, n_categories: int, n_types: int) -> Compiled:
    """The paged read of a stream (by version) or of the log (by position), compiled once.

    Filters on categories and types are one bind parameter per value (``cat0``, ``type0`` …), so
    each list length compiles once and caller strings never become SQL.
    """
    key = (dialect.name, by_stream, backwards, upper, tenant, n_categories, n_types)
    c = _reads.get(key)
    if c is None:
        if len(_reads) > 512:
            _reads.clear()
        c = _reads[key] = _build_read(dialect, by_stream, backwards, upper, tenant,
                                      n_categories, n_types)
    return c


def _build_read(dialect: Dialect, by_stream: bool, backwards: bool, upper: bool, tenant: bool,
                n_categories: int, n_types: int) -> Compiled:
    # Every column but the category (a record derives it from the stream id).
    stmt = select(*(c for c in events.c if c.name != "category"))
    col = events.c.version if by_stream else events.c.position
    if by_stream:
        stmt = _stream_where(stmt)
    elif tenant:
        stmt = stmt.where(events.c.tenant_id == bindparam("tenant_id"))
    if n_categories:
        stmt = stmt.where(events.c.category.in_(
            [bindparam(f"cat{i}") for i in range(n_categories)]))
    if n_types:
        stmt = stmt.where(events.c.type.in_([bindparam(f"type{i}") for i in range(n_types)]))
    stmt = stmt.where(col >= bindparam("lo"))
    if upper:
        stmt = stmt.where(col <= bindparam("hi"))
    stmt = stmt.order_by(col.desc() if backwards else col).limit(bindparam("page"))
    return Compiled(stmt, dialect)


_new_object = object.__new__
# UUID's slot descriptors, called directly: cheaper than object.__setattr__.
_set_int = UUID.__dict__["int"].__set__
_set_safe = UUID.__dict__["is_safe"].__set__
_UNKNOWN = SafeUUID.unknown


def as_uuid(value: Any) -> UUID:
    """A stored event id (UUID on PostgreSQL, 32 hex characters on SQLite) as a UUID.

    Built without ``UUID.__init__``, whose argument parsing costs more than the rest of decoding
    a row: the stored text is always the 32 hex digits SQLAlchemy's ``Uuid`` type writes.
    """
    if isinstance(value, UUID):
        return value
    u: UUID = _new_object(UUID)
    _set_int(u, int(value, 16))
    _set_safe(u, _UNKNOWN)
    return u


def uuid_param(value: UUID, dialect_name: str) -> Any:
    """A UUID as the DBAPI takes it for the ``Uuid`` column (as SQLAlchemy would store it)."""
    return value.hex if dialect_name == "sqlite" else value
