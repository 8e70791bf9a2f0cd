"""The projection engine: pure folds run live, inline, or by a projector, plus rebuild and verify.

A projection folds the events of one stream into one state: ``evolve(state, event) -> state``.
Persisted projections keep that state per stream as a row of ``es_projection_rows`` (the state as
JSON, plus three indexed columns the projection derives from it: ``status``, ``group_key`` and
``sort_key``, which serve queries across streams such as "pending pauses of a user").  One generic
table instead of a table per projection: every projection gets rebuild, verify, snapshots and the
replay-equals-rows check for free, and the schema stays owned by the migrations.

Generations instead of table swaps: ``es_projections.generation`` names the rows queries read.  A
rebuild fills the next generation while queries keep reading the current one, then switches the
number in one transaction and deletes the old rows.  No DDL at run time, so the migrations stay
the only thing that creates tables.

Exactly once: every writer of a projection's rows (inline handler, projector batch, rebuild swap)
first locks the projection's ``es_projections`` row (``SELECT … FOR UPDATE`` on PostgreSQL; the
single write lock on SQLite) and stores the checkpoint in the same transaction as the rows.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import decimal
import functools
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, NoReturn, TypeVar, cast

import msgspec
from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    delete,
    func,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from eventstore import EventStore, RecordedEvent, StreamSlice
from eventstore._backend import _sqlite_settings, is_sqlite, translate
from eventstore._bound import BoundStore, transaction
from eventstore._core import (
    _MAX_RETRY_PAUSE,
    MAX_INT,
    RetryAppend,
    StoreCore,
    _pipeline,
    check_id,
    check_int,
    check_storable,
    locks_must_not_wait,
)
from eventstore._schema import MAX_ID_LENGTH, projection_rows, projections, snapshots
from eventstore._schema import events as event_table
from eventstore._sql import Compiled
from eventstore._time import from_micros, to_micros
from eventstore.errors import (
    DatabaseError,
    EventDecodeError,
    EventStoreError,
    InvalidArgument,
    InvalidStreamId,
    error_text,
)
from eventstore.logs import get_logger

from .errors import ProjectionStopped, RebuildInProgress

__all__ = [
    "Projection",
    "ProjectionFailed",
    "ProjectionStatus",
    "Projector",
    "RowIndex",
    "UndecodableRow",
    "fold_live",
    "inline",
    "rebuild",
    "register",
    "registered",
    "status",
    "verify",
]

S = TypeVar("S")

_log = get_logger("eventstore.projections")

_PAGE = 1000


class ProjectionFailed(EventStoreError):
    """A projection raised on an event; it stays stopped at that event until restarted."""

    def __init__(self, *, projection: str, position: int, type: str, stream_id: str,
                 tenant_id: str, cause: BaseException) -> None:
        super().__init__(
            f"projection {projection} failed on event at position {position} "
            f"(type {type}, stream {stream_id}, tenant {tenant_id}): "
            f"{type_name(cause)}: {error_text(cause)}"
        )
        self.projection = projection
        self.position = position
        self.type = type
        self.stream_id = stream_id
        self.tenant_id = tenant_id


def _failed_at(projection: str, ev: RecordedEvent, cause: BaseException) -> ProjectionFailed:
    return ProjectionFailed(projection=projection, position=ev.position, type=ev.type,
                            stream_id=ev.stream_id, tenant_id=ev.tenant_id, cause=cause)


def type_name(e: BaseException) -> str:
    return type(e).__name__


@dataclass(frozen=True)
class RowIndex:
    """The indexed columns of a projection row, derived from its state."""

    status: str | None = None
    group_key: str | None = None
    sort_key: int | None = None


class Projection(Generic[S]):
    """A fold of one stream's events into a state, and how that state is indexed.

    Subclasses set ``name``, ``categories`` and ``state_type`` and implement :meth:`initial` and
    :meth:`evolve` (pure: no I/O, no clock, no randomness; everything comes from the event).
    Bump ``version`` when the fold changes: rows of an older version are rebuilt (rows of a
    newer one are left to the code that built them), snapshots of another version are skipped,
    never trusted.
    """

    name: str = ""
    version: int = 1
    categories: tuple[str, ...] = ()
    state_type: type[Any] = object
    snapshot_every: int | None = 100

    def initial(self, tenant_id: str, stream_id: str) -> S:
        """The state of a stream before its first event (subclasses implement it)."""
        raise NotImplementedError

    def evolve(self, state: S, event: RecordedEvent) -> S:
        """The state after ``event`` (subclasses implement it): pure, and it must not change
        ``state`` in place when that state may be shared (return a new one)."""
        raise NotImplementedError

    # Live folds call this instead of evolve when a subclass defines it.
    evolve_slice: Callable[[S, StreamSlice], S] | None = None
    """Optional: fold consecutive events of one stream at once, from columns.

    Must give the state that :meth:`evolve` gives over the same events in order (the property
    tests hold both to it).  Live folds use it when defined: reading columns skips building a
    record per event, and a batch may copy the state once instead of once per event.  When it
    raises, the engine folds the slice again with :meth:`evolve`, one event at a time, to name
    the failing event.
    """

    def index(self, state: S) -> RowIndex:
        """The columns ``query_rows`` filters and orders a stream's row by (none by default)."""
        return RowIndex()

    # -- helpers the engine uses ------------------------------------------------------------

    def handles(self, event: RecordedEvent) -> bool:
        """Whether the fold sees ``event``: its stream is of one of ``categories`` (all when
        there are none)."""
        return not self.categories or event.category in self.categories

    def encode(self, state: S) -> bytes:
        """The state as stored in rows and snapshots (msgspec JSON by default)."""
        return msgspec.json.encode(state)

    def decode(self, raw: bytes) -> S:
        """The state :meth:`encode` stored, as ``state_type``."""
        result: S = msgspec.json.decode(raw, type=self.state_type)
        return result

    def renamed(self, name: str) -> Projection[S]:
        """A copy under another name (the same fold kept in its own rows)."""
        other = copy.copy(self)
        other.name = name
        return other


# -- the registry, for the command line --

_registry: dict[str, Callable[[], Projection[Any]]] = {}


def register(name: str, factory: Callable[[], Projection[Any]]) -> None:
    """Make a projection known to ``eventstore projections …`` by name: ``factory()`` gives
    the projection, whose ``name`` must be ``name`` (checked when the command line builds it;
    the store knows a projection by its own name)."""
    _check_name(name)
    if not callable(factory):
        raise InvalidArgument(f"register({name!r}, …) needs a factory (a callable), got "
                              f"{type(factory).__name__}")
    _registry[name] = factory


def build_registered(name: str) -> Projection[Any]:
    """The projection registered as ``name``, built by its factory."""
    built = _registry[name]()
    if getattr(built, "name", None) != name:
        raise InvalidArgument(f"the projection registered as {name!r} is named "
                              f"{getattr(built, 'name', None)!r}: register it by its own name")
    return built


def registered() -> dict[str, Callable[[], Projection[Any]]]:
    return dict(_registry)


# -- bookkeeping rows --


@dataclass(frozen=True)
class ProjectionStatus:
    """One projection's bookkeeping row, and its lag behind the log."""

    name: str
    generation: int
    position: int
    code_version: int
    status: str
    error: str | None
    failed_position: int | None
    owner: str | None
    lease_until: datetime | None
    rebuild_generation: int | None
    rebuild_position: int | None
    head: int = 0
    # Events of the projection's categories after its position, when status() knows them.
    behind: int | None = None
    # The categories its row records (() : every category; None: not recorded, before
    # migration 0005 or until code of its fold registers it again).
    categories: tuple[str, ...] | None = None

    @property
    def lag(self) -> int:
        """Events the projection has yet to apply: those of its categories after its position
        when the projection is registered, else every event after it."""
        if self.behind is not None:
            return self.behind
        return max(0, self.head - self.position)


def _now_us(store: EventStore) -> int:
    return to_micros(store.now())


def _machine_now_us() -> int:
    """The machine's time, never a store's ``clock`` (which may be set): for what processes
    coordinate by, SQLite leases and the age of verify's scratch rows (a verify on a store
    whose clock was set days ahead dropped the scratch rows of a verify running beside it,
    which then reported every row missing)."""
    return time.time_ns() // 1000


def _ensure_row(conn: Connection, projection: Projection[Any], now_us: int) -> None:
    categories = _categories_json(projection)
    exists = conn.execute(select(projections.c.categories, projections.c.code_version)
                          .where(projections.c.name == projection.name)).first()
    if exists is None:
        values = {"name": projection.name, "generation": 1, "position": 0,
                  "code_version": projection.version, "status": "running",
                  "updated_at": now_us, "categories": categories}
        if conn.dialect.name == "postgresql":
            conn.execute(postgresql.insert(projections).values(**values)
                         .on_conflict_do_nothing(index_elements=["name"]))
        else:
            conn.execute(sqlite.insert(projections).values(**values)
                         .on_conflict_do_nothing(index_elements=["name"]))
    elif exists.categories != categories and projection.version >= exists.code_version:
        # (Code of the fold that built the rows, or newer, says what it folds.)
        conn.execute(update(projections).where(projections.c.name == projection.name)
                     .values(categories=categories))


def _categories_json(projection: Projection[Any]) -> str:
    return msgspec.json.encode(_categories_of(projection)).decode()


def _categories_of(projection: Projection[Any]) -> list[str]:
    return sorted(set(projection.categories or ()))


def _decoded_categories(stored: str | None) -> list[str] | None:
    if stored is None:
        return None
    try:
        return msgspec.json.decode(stored, type=list[str])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


# PostgreSQL's clock, in microseconds: the time leases are given and compared in there.
_SERVER_CLOCK_US: Any = literal_column(
    "CAST(floor(extract(epoch FROM clock_timestamp()) * 1000000) AS BIGINT)")


def lease_clock(store: EventStore) -> datetime:
    """The time leases are given and compared in (see :meth:`Projector._acquire`): the
    PostgreSQL server's, or on SQLite the machine's."""
    if is_sqlite(store.engine.url):
        return from_micros(_machine_now_us())
    with transaction(store, write=False) as conn:
        return from_micros(int(conn.execute(select(_SERVER_CLOCK_US)).scalar_one()))


def _lock_row(conn: Connection, name: str, *, missing_ok: bool = False) -> Any:
    """Lock and return the projection's bookkeeping row (see the module docstring); on
    PostgreSQL with the server's time (``server_now_us``, see :meth:`Projector._acquire`)."""
    q = select(projections).where(projections.c.name == name)
    if conn.dialect.name == "postgresql":
        q = q.add_columns(_SERVER_CLOCK_US.label("server_now_us")).with_for_update()
    row = conn.execute(q).first()
    if row is None and not missing_ok:
        raise InvalidArgument(f"projection {name} is not registered in this store")
    return row


def _holder_code(row: Any) -> int | None:
    """The fold version of the lease holder's code, if it recorded one with its ownership
    (None: code before migration 0006 took the lease, or it changed hands since)."""
    version, _, owner = (row.owner_code or "").partition(":")
    return int(version) if owner == row.owner and version.isdigit() else None


def _check_name(name: object) -> str:
    if not name:
        raise InvalidArgument("a projection needs a name")
    return check_id(name, "projection name", InvalidArgument)


_MAX_CODE_VERSION = 2**31 - 1  # (the bookkeeping columns' 32 bits)


def check_projection(projection: object) -> Projection[Any]:
    """``projection`` when it is a :class:`Projection` whose settings the engine can use, else
    :class:`InvalidArgument` (before anything is written)."""
    if not isinstance(projection, Projection):
        raise InvalidArgument(f"expected a Projection, got {type(projection).__name__}: "
                              f"{projection!r:.80}")
    _check_name(projection.name)
    version = projection.version
    if type(version) is not int or not 1 <= version <= _MAX_CODE_VERSION:
        raise InvalidArgument(f"projection {projection.name}: version must be an int from 1 "
                              f"to {_MAX_CODE_VERSION}, got {version!r}")
    every = projection.snapshot_every
    if every is not None and (type(every) is not int or every < 1):
        raise InvalidArgument(f"projection {projection.name}: snapshot_every must be None or "
                              f"an int >= 1, got {every!r}")
    cats = projection.categories
    if cats is not None and (isinstance(cats, str) or not isinstance(cats, Collection)
                             or not all(isinstance(c, str) and c for c in cats)):
        raise InvalidArgument(f"projection {projection.name}: categories must be a tuple of "
                              f"category names (empty or None: every category), got {cats!r}")
    return projection


def ensure_registered(store: EventStore, projection: Projection[Any]) -> None:
    """Create the projection's bookkeeping row when it does not exist yet."""
    check_projection(projection)
    with transaction(store, write=True) as conn:
        _ensure_row(conn, projection, _now_us(store))


def status(store: EventStore, name: str | None = None) -> list[ProjectionStatus]:
    """The bookkeeping of every projection (or of one), with the log's head position."""
    q = select(projections).order_by(projections.c.name)
    if name is not None:
        q = q.where(projections.c.name == _check_name(name))
    # The head in the rows' statement (one snapshot on PostgreSQL, where reads run in
    # autocommit), and ``behind`` counted up to that head: read apart, a projection could
    # show a position past the head, and a lag of 0 while it was behind.
    q = q.add_columns(select(func.max(event_table.c.position)).scalar_subquery().label("head"))
    with transaction(store, write=False) as conn:
        rows = conn.execute(q).all()
        head = int(rows[0].head or 0) if rows else 0  # (no rows: no status to give it)
        behind = {r.name: _behind(conn, r.name, r.position, r.categories, head) for r in rows}
    return [
        ProjectionStatus(
            name=r.name, generation=r.generation, position=r.position,
            code_version=r.code_version, status=r.status, error=r.error,
            failed_position=r.failed_position, owner=r.owner,
            lease_until=from_micros(r.lease_until) if r.lease_until is not None else None,
            rebuild_generation=r.rebuild_generation, rebuild_position=r.rebuild_position,
            head=head, behind=behind[r.name],
            categories=(tuple(c) if (c := _decoded_categories(r.categories)) is not None
                        else None),
        )
        for r in rows
    ]


def _behind(conn: Connection, name: str, position: int, stored: str | None,
            head: int) -> int | None:
    """Events of a projection's categories after ``position`` (an index range per category):
    those of the registered projection, else those its row records (``stored``); ``None``
    when neither is known or it takes every category."""
    categories: Sequence[str] | None = None
    factory = _registry.get(name)
    if factory is not None:
        with contextlib.suppress(Exception):  # a factory that cannot build here
            categories = factory().categories
    if categories is None:
        categories = _decoded_categories(stored)
    if not categories:
        return None
    e = event_table.c
    return int(conn.execute(select(func.count()).where(
        e.category.in_(list(categories)), e.position > position,
        e.position <= head)).scalar() or 0)


def restart(store: EventStore, name: str) -> None:
    """Clear a failed projection so its projector retries from the failed event.

    Also drops the projection's lease, so that any worker takes it at once: a worker that died
    holding a long lease no longer keeps the others out until it runs out.  (A live holder
    just takes it again; each batch locks the projection's row and starts from its position,
    so no event is applied twice whoever holds the lease.)
    """
    _check_name(name)
    with transaction(store, write=True) as conn:
        _lock_row(conn, name)
        conn.execute(update(projections).where(projections.c.name == name)
                     .values(status="running", error=None, failed_position=None,
                             owner=None, lease_until=None, updated_at=_now_us(store)))
    _log.info("projection_restarted", projection=name)


def _record_database_failure(store: EventStore, name: str, err: DatabaseError) -> None:
    """A projection whose batch the database refuses stops at that batch, in ``status``."""
    with transaction(store, write=True) as conn:
        at = int(_lock_row(conn, name).position) + 1
        _mark_failed(conn, store, name, at, f"projection {name}: the database refused the "
                                            f"batch from position {at}: {error_text(err)}")
    _log.error("projection_failed", projection=name, position=at, error=error_text(err))


def _record_failure(store: EventStore, name: str, err: ProjectionFailed) -> None:
    with transaction(store, write=True) as conn:
        _stop_at(conn, store, name, err)


def _unreadable(name: str, err: EventDecodeError) -> ProjectionFailed | None:
    """An event this code cannot read, as the failure that stops projection ``name`` there
    (named in the error and in ``status``, as a failing fold); ``None`` when newer code can
    read it (a rolling deploy: that code's workers go on)."""
    if err.position is None or err.newer_schema:
        return None
    return ProjectionFailed(projection=name, position=err.position, type=err.type or "",
                            stream_id=err.stream_id or "", tenant_id=err.tenant_id or "",
                            cause=err)


def _mark_failed(conn: Connection, store: EventStore, name: str, at: int, error: str) -> None:
    """Projection ``name`` stops at position ``at`` (``status`` shows it, with ``error``)."""
    conn.execute(update(projections).where(projections.c.name == name)
                 .values(status="failed", error=error, failed_position=at,
                         updated_at=_now_us(store)))


def _fold_before(store: EventStore, conn: Connection, projection: Projection[Any],
                 generation: int, after: int, err: ProjectionFailed, now_us: int) -> int:
    """On ``conn``: fold and write the events after position ``after`` that come before the
    one ``err`` names (they folded; a batch's failure rolled them back with it), and move the
    checkpoint to just before that event, so that the projection stops exactly there.
    Returns the number of events read."""
    until = err.position - 1
    if until <= after:
        return 0
    rows: _Rows[Any] = _Rows(projection, generation)
    read = [0]
    try:
        _catch_up(store, conn, rows, after, until, read)
        rows.flush(conn, now_us)  # (refuses a row's index before writing any)
    except (ProjectionFailed, EventDecodeError):  # a fold that changed its mind: stop earlier
        return 0
    conn.execute(update(projections).where(projections.c.name == projection.name)
                 .values(position=until, updated_at=now_us))
    return read[0]


def _checkpoint_holder(name: str, conn: Connection) -> str | None:
    """``None`` when no other transaction holds projection ``name``'s ``es_projections`` row,
    else the holder (the row's ``xmax``: the transaction that locked it).  ``RetryAppend.probe``,
    outside any append; the lock it takes goes with its transaction."""
    pc = projections.c
    if conn.execute(select(pc.name).where(pc.name == name)
                    .with_for_update(skip_locked=True)).first() is not None:
        return None
    holder = conn.execute(select(literal_column("xmax::text")).select_from(projections)
                          .where(pc.name == name)).scalar()
    return None if holder is None else str(holder)


def _stop_at(conn: Connection, store: EventStore, name: str, err: ProjectionFailed) -> None:
    """Record, on ``conn``, that projection ``name`` stopped at the event ``err`` names."""
    _mark_failed(conn, store, name, err.position, str(err))
    _log.error("projection_failed", projection=name, position=err.position,
               type=err.type, stream=err.stream_id, tenant=err.tenant_id, error=str(err))


# -- compiled statements for the inline path (run on every append) --

_fast_cache: dict[tuple[str, str], Compiled] = {}


def _fast(name: str, conn: Connection) -> Compiled:
    """A statement of the inline path, compiled once per dialect (see eventstore._sql)."""
    key = (name, conn.dialect.name)
    c = _fast_cache.get(key)
    if c is None:
        c = _fast_cache[key] = Compiled(_build_fast(name, conn.dialect.name), conn.dialect)
    return c


def _build_fast(name: str, dialect_name: str) -> Any:
    pc, pr = projections.c, projection_rows.c
    if name in ("lock", "lock_skip"):
        q = (select(pc.generation, pc.position, pc.status, pc.error, pc.code_version)
             .where(pc.name == bindparam("name")))
        if dialect_name != "postgresql":
            return q
        # SKIP LOCKED: no row while another transaction holds it (no error: an aborted
        # pipeline would make psycopg log a warning for what is an expected wait).
        return q.with_for_update(skip_locked=name == "lock_skip")
    if name == "get_row":
        return select(pr.state, pr.version, pr.position).where(
            pr.projection == bindparam("projection"), pr.generation == bindparam("generation"),
            pr.tenant_id == bindparam("tenant_id"), pr.stream_id == bindparam("stream_id"))
    if name == "current_row":
        # The stream's row in the generation queries read.  Sent right after "lock" (one
        # pipeline): the server runs it once the lock is granted, with a snapshot of its own,
        # so it sees the generation the lock holder sees.
        generation = (select(pc.generation).where(pc.name == bindparam("projection"))
                      .scalar_subquery())
        return select(pr.state, pr.version, pr.position).where(
            pr.projection == bindparam("projection"), pr.generation == generation,
            pr.tenant_id == bindparam("tenant_id"), pr.stream_id == bindparam("stream_id"))
    if name == "upsert":
        ins = (postgresql.insert(projection_rows) if dialect_name == "postgresql"
               else sqlite.insert(projection_rows))
        return ins.on_conflict_do_update(
            index_elements=["projection", "generation", "tenant_id", "stream_id"],
            set_={c: ins.excluded[c] for c in ("version", "position", "state", "status",
                                               "group_key", "sort_key", "updated_at")})
    if name == "snapshot":
        ins = (postgresql.insert(snapshots) if dialect_name == "postgresql"
               else sqlite.insert(snapshots))
        return ins.on_conflict_do_nothing()
    if name == "advance":
        return (update(projections).where(pc.name == bindparam("name"))
                .values(position=bindparam("new_position")))
    if name in ("advance_from", "advance_from_skip"):
        # PostgreSQL, _InlineHandler.guess: move the checkpoint from where this process left it,
        # and fail (division by zero) if it is not there any more (or, SKIP LOCKED, if another
        # transaction holds it: prepare() then finds it held, and says what to wait for).
        named: Any = pc.name == bindparam("name")
        if name == "advance_from_skip":
            named = pc.name.in_(select(pc.name).where(named).with_for_update(skip_locked=True))
        moved = (update(projections)
                 .where(named, pc.position == bindparam("prev"),
                        pc.generation == bindparam("generation"),
                        pc.code_version == bindparam("code_version"), pc.status != "failed")
                 .values(position=bindparam("new_position"))
                 .returning(pc.position).cte("moved"))
        return select(literal(1) / select(func.count()).select_from(moved).scalar_subquery())
    raise KeyError(name)


# -- folding into rows --


class _RowUndecodable(Exception):
    """A stored row its projection cannot decode: the events for it cannot be folded."""

    def __init__(self, key: tuple[str, str], cause: Exception) -> None:
        super().__init__(f"the stored row of {key[0]}/{key[1]} does not decode: "
                         f"{type_name(cause)}: {error_text(cause)}")


class _Unusable:
    """In place of a row's state: the row cannot be folded (its stored state does not decode,
    or ``initial`` raised).  The first of its events a fold meets fails with ``cause``, so a
    batch's failures are met in log order."""

    __slots__ = ("cause",)

    def __init__(self, cause: Exception) -> None:
        self.cause = cause


_GROUPED_TENANTS = 8  # tenants a chunk of row lookups asks for apart (see _Rows.load)


class _Rows(Generic[S]):
    """States of one generation's rows, loaded on demand and written back in one go."""

    def __init__(self, projection: Projection[S], generation: int) -> None:
        self.p = projection
        self.generation = generation
        self.cache: dict[tuple[str, str], tuple[S, int, int]] = {}
        self.dirty: set[tuple[str, str]] = set()
        # Each dirty row's state before its first event since the last flush, and the events
        # folded into it since (to name the one that made its index one the columns refuse).
        self.folded: dict[tuple[str, str], tuple[S, list[RecordedEvent]]] = {}
        # A dirty row's stored form, made for check_rows, with the state it was made of.
        self.made: dict[tuple[str, str], tuple[S, tuple[RowIndex, bytes]]] = {}

    def load(self, conn: Connection, keys: Iterable[tuple[str, str]]) -> None:
        missing = [k for k in keys if k not in self.cache]
        if len(missing) == 1 or (missing and conn.dialect.name == "sqlite"):
            # One key: the inline case, one stream per append.  On SQLite every key alike:
            # a statement costs no round trip there, and a lookup by the whole primary key is
            # planned as one whatever the statistics, where a statement for many keys was not
            # (an OR of (tenant, stream) pairs was a scan of the generation's rows per chunk,
            # so a rebuild of one-event streams grew with the square of their number; a join
            # to a list of keys met a Bloom filter over the whole table once analyzed).
            get_row = _fast("get_row", conn)
            for key in missing:
                cur = get_row.run(conn, {
                    "projection": self.p.name, "generation": self.generation,
                    "tenant_id": key[0], "stream_id": key[1]})
                found = cur.fetchone()
                cur.close()
                self.cache[key] = ((self._initial(key), 0, 0) if found is None else
                                   (self._decoded(key, found[0]), found[1], found[2]))
            return
        pr = projection_rows.c
        for i in range(0, len(missing), 200):
            chunk = missing[i:i + 200]
            by_tenant: dict[str, list[str]] = {}
            for tenant_id, stream_id in chunk:
                by_tenant.setdefault(tenant_id, []).append(stream_id)
            # A few tenants' streams by "tenant = ? AND stream IN (...)", a search of the
            # primary key (also on statistics taken before this generation existed, where the
            # OR below took a second a chunk); the other pairs together, by their OR (a
            # BitmapOr of primary-key lookups), not a statement a tenant.
            grouped = [(t, streams) for t, streams in by_tenant.items() if len(streams) > 1]
            if len(grouped) > _GROUPED_TENANTS:
                grouped = []
            queries: list[Any] = [and_(pr.tenant_id == t, pr.stream_id.in_(streams))
                                  for t, streams in grouped]
            apart = {t for t, _streams in grouped}
            rest = [(t, st) for t, st in chunk if t not in apart]
            if rest:
                queries.append(or_(*[and_(pr.tenant_id == t, pr.stream_id == st)
                                     for t, st in rest]))
            hits: dict[tuple[str, str], Any] = {}
            for condition in queries:
                for r in conn.execute(select(
                        pr.tenant_id, pr.stream_id, pr.state, pr.version, pr.position).where(
                        pr.projection == self.p.name, pr.generation == self.generation,
                        condition)):
                    hits[(r.tenant_id, r.stream_id)] = r
            for key in chunk:
                row = hits.get(key)
                if row is None:
                    self.cache[key] = (self._initial(key), 0, 0)
                else:
                    self.cache[key] = (self._decoded(key, row.state), row.version, row.position)

    def _decoded(self, key: tuple[str, str], raw: bytes) -> S:
        try:
            return self.p.decode(_stored_bytes(raw))
        except Exception as e:  # a damaged row (or one of another shape): its fold stops
            undecodable = _RowUndecodable(key, e)
            undecodable.__cause__ = e
            return cast(S, _Unusable(undecodable))

    def _initial(self, key: tuple[str, str]) -> S:
        try:
            return self.p.initial(*key)
        except Exception as e:  # the projection's own code: its fold stops at the event
            return cast(S, _Unusable(e))

    def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> int:
        """Fold the relevant events; returns how many were applied.

        With ``evolve_slice``, each stream's events of the page are folded as one slice.  When a
        slice fails, the page is folded again from the states before it, event by event in log
        order, so the error names the first failing event of the log.
        """
        relevant = [e for e in events if self.p.handles(e)]
        if not relevant:
            return 0
        by_stream: dict[tuple[str, str], list[RecordedEvent]] = {}
        for e in relevant:
            key = (e.tenant_id, e.stream_id)
            group = by_stream.get(key)
            if group is None:
                by_stream[key] = [e]
            else:
                group.append(e)
        self.load(conn, by_stream)
        evolve_slice = self.p.evolve_slice
        if evolve_slice is None:
            return self._apply_each(relevant)
        before = {key: self.cache[key] for key in by_stream}
        noted = {key: len(self.folded[key][1]) for key in by_stream if key in self.folded}
        applied = 0
        folding: list[RecordedEvent] = []
        try:
            for key, folding in by_stream.items():
                state, version, _pos = self.cache[key]
                if folding[0].version <= version:  # a catch-up overlapping what was applied
                    folding = [e for e in folding if e.version > version]
                    if not folding:
                        continue
                if state.__class__ is _Unusable:
                    raise cast(_Unusable, state).cause
                self._note(key, state, folding)
                if len(folding) == 1:  # an inline append's usual case: no slice to build
                    state = _evolve_one(self.p, state, folding[0])
                else:
                    state = evolve_slice(state, _slice_of(key, folding))
                last = folding[-1]
                self.cache[key] = (state, last.version, last.position)
                self.dirty.add(key)
                applied += len(folding)
        except Exception as e:
            self.cache.update(before)
            for key in by_stream:  # (what this page noted goes: it is folded again below)
                if key in noted:
                    del self.folded[key][1][noted[key]:]
                else:
                    self.folded.pop(key, None)
            self._apply_each(relevant)  # raises ProjectionFailed at the first failing event
            # evolve passed where evolve_slice failed (the two disagree): name the first event
            # of the slice that failed.
            raise _failed_at(self.p.name, folding[0], e) from e
        return applied

    def _apply_each(self, relevant: Sequence[RecordedEvent]) -> int:
        applied = 0
        for ev in relevant:
            key = (ev.tenant_id, ev.stream_id)
            state, version, _pos = self.cache[key]
            if ev.version <= version:
                continue  # already folded (a catch-up overlapping what was applied)
            try:
                if state.__class__ is _Unusable:
                    cause = cast(_Unusable, state).cause
                    raise _failed_at(self.p.name, ev, cause) from cause
                new = _evolve_one(self.p, state, ev)
            except ProjectionFailed as failed:
                raise self._first_failure(failed) from failed.__cause__
            self._note(key, state, (ev,))
            self.cache[key] = (new, ev.version, ev.position)
            self.dirty.add(key)
            applied += 1
        return applied

    def _first_failure(self, failed: ProjectionFailed) -> ProjectionFailed:
        """``failed``, or the failure of a row folded before it that cannot be stored (found
        at the flush, which this failure comes before), whichever is first in the log."""
        first = self._first_row_failure()
        return first if first is not None and first.position < failed.position else failed

    def _first_row_failure(self) -> ProjectionFailed | None:
        """The failure, first in the log, of a dirty row that cannot be stored; else None."""
        failures = [f for f in (self._row_failure(k) for k in self.dirty) if f is not None]
        return min(failures, key=lambda f: f.position, default=None)

    def _note(self, key: tuple[str, str], state: S, events: Sequence[RecordedEvent]) -> None:
        noted = self.folded.get(key)
        if noted is None:
            self.folded[key] = (state, list(events))
        else:
            noted[1].extend(events)

    def _stored(self, state: S) -> tuple[RowIndex, bytes] | Exception:
        """A state as its row stores it (its index and its encoding), or why it cannot be:
        ``index`` or ``encode`` raised, or the index is one the columns cannot hold."""
        try:
            idx = self.p.index(state)
        except Exception as e:
            return e
        problem = _index_problem(idx)
        if problem is not None:
            return InvalidArgument(f"index() gave {problem}")
        try:
            return idx, self.p.encode(state)
        except Exception as e:
            return e

    def _stored_row(self, key: tuple[str, str]) -> tuple[RowIndex, bytes]:
        """The row of ``key`` as stored; when any dirty row cannot be stored,
        :class:`ProjectionFailed` at the first event in the log after which one could not
        (the projection's own code failed there, as a fold that raises)."""
        state = self.cache[key][0]
        made = self.made.get(key)
        if made is not None and made[0] is state:
            return made[1]
        stored = self._stored(state)
        if not isinstance(stored, Exception):
            self.made[key] = (state, stored)
            return stored
        failure = self._first_row_failure()
        assert failure is not None  # (this row is dirty, and fails)
        raise failure

    def _row_failure(self, key: tuple[str, str]) -> ProjectionFailed | None:
        """The failure of a row that cannot be stored, at the event since the last flush
        after which it could not (folded again to find it); else None."""
        state, _version, position = self.cache[key]
        cause = self._stored(state)
        if not isinstance(cause, Exception):
            return None
        culprit = None
        noted = self.folded.get(key)
        if noted is not None:
            folded, events = noted
            culprit = events[-1]
            for ev in events:
                folded = _evolve_one(self.p, folded, ev)
                found = self._stored(folded)
                if isinstance(found, Exception):
                    culprit, cause = ev, found
                    break
        return ProjectionFailed(
            projection=self.p.name, position=position if culprit is None else culprit.position,
            type="" if culprit is None else culprit.type, stream_id=key[1], tenant_id=key[0],
            cause=cause)

    def encoded(self, keys: Iterable[tuple[str, str]]
                ) -> dict[tuple[str, str], tuple[bytes, int, int]]:
        """The rows of ``keys`` as (encoded state, version, position), reusing the encoding a
        :meth:`payload` since the last write made."""
        out = {}
        for key in keys:
            state, version, position = self.cache[key]
            if state.__class__ is _Unusable:  # (nothing folded into it: not remembered)
                continue
            made = self.made.get(key)
            data = made[1][1] if made is not None and made[0] is state else self.p.encode(state)
            out[key] = (data, version, position)
        return out

    def check_rows(self) -> None:
        """Raise as :meth:`flush` would for a row that cannot be stored, writing nothing."""
        for key in self.dirty:
            self._stored_row(key)

    def flush(self, conn: Connection, now_us: int) -> None:
        self.write(conn, self.payload(now_us))

    def payload(self, now_us: int) -> list[dict[str, Any]]:
        """The dirty rows as :meth:`write` stores them; raises as :meth:`_stored_row` does
        (before anything is written)."""
        rows = []
        for key in self.dirty:
            _state, version, position = self.cache[key]
            idx, data = self._stored_row(key)
            rows.append({
                "projection": self.p.name, "generation": self.generation,
                "tenant_id": key[0], "stream_id": key[1], "version": version,
                "position": position, "state": data, "status": idx.status,
                "group_key": idx.group_key, "sort_key": idx.sort_key, "updated_at": now_us,
            })
        return rows

    def write(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Store the rows :meth:`payload` gave (the dirty rows then)."""
        if not rows:
            return
        upsert = _fast("upsert", conn)
        if len(rows) == 1:
            upsert.run(conn, rows[0]).close()
        else:
            upsert.run_many(conn, rows)
        self.dirty.clear()
        self.folded.clear()
        self.made.clear()
        if len(self.cache) > 50_000:
            self.cache.clear()


_MAX_STATUS = 64  # es_projection_rows.status; group_key: MAX_ID_LENGTH


def _index_problem(idx: object) -> str | None:
    """What the columns a row is indexed by cannot hold (the same on SQLite and PostgreSQL),
    or None."""
    if not isinstance(idx, RowIndex):
        return f"{type(idx).__name__}, not a RowIndex"
    for field, value, limit in (("status", idx.status, _MAX_STATUS),
                                ("group_key", idx.group_key, MAX_ID_LENGTH)):
        if value is None:
            continue
        if not isinstance(value, str):
            return f"a {field} that is not a string: {value!r:.60}"
        if len(value) > limit:
            return f"a {field} of {len(value)} characters (at most {limit})"
        try:
            check_storable(value, f"a {field}", InvalidArgument)
        except InvalidArgument as e:
            return str(e)
    key = idx.sort_key
    if key is not None and (not isinstance(key, int) or isinstance(key, bool)
                            or not -MAX_INT - 1 <= key <= MAX_INT):
        return f"a sort_key that is not a 64-bit integer: {key!r:.60}"
    return None


def _catch_up(store: EventStore, conn: Connection, rows: _Rows[Any], after: int,
              until: int | None, read: list[int] | None = None) -> int:
    """Fold events with ``after < position <= until`` (all when ``until`` is None) on ``conn``.

    Returns the last position folded (``after`` when there was nothing); ``read[0]`` counts the
    events read.
    """
    p = rows.p
    cats = p.categories or None
    last = after
    while until is None or last < until:
        page = store.read_page(conn, from_position=last + 1, limit=_PAGE, categories=cats,
                               to_position=until)
        if not page:
            break
        rows.apply(conn, page)
        last = page[-1].position
        if read is not None:
            read[0] += len(page)
        if len(page) < _PAGE:
            break
    return last


# -- inline --

_KNOWN_ROWS = 4096  # streams' rows an inline handler remembers (see _InlineHandler.guess)


class _InlineHandler:
    """Keeps a projection's rows current inside every append's transaction."""

    def __init__(self, store: EventStore, projection: Projection[Any]) -> None:
        self.store = store
        self.p = projection
        self.warned = False
        # What this process last committed (see guess): the checkpoint's generation and
        # position, and recent streams' rows; and what the append under way will commit.
        self._mark: tuple[int, int] | None = None
        # The last position of the last append this handler was told committed: a guess needs
        # every event since its mark to have come through it (none it did not see).
        self._seen_to: int | None = None
        self._known: dict[tuple[str, str], tuple[bytes, int, int]] = {}  # encoded state
        # What the last guess or prepare folded, and for which events (the append's list): an
        # append in another transaction (a BoundStore's) folds concurrently, and may roll back;
        # committed() takes only the fold of the events it is told of.
        self._pending: tuple[Sequence[RecordedEvent], tuple[int, int],
                             dict[tuple[str, str], tuple[bytes, int, int]], bool] | None = None
        # The transaction in which this handler stopped the projection (see prepare).
        self._stopped_in: object = None
        # Why appends of its events are refused: its rows could not be rebuilt for this fold
        # (an AsyncEventStore's inline(), which could not raise it; see refuse).
        self.refused: BaseException | None = None

    def refuse(self, why: BaseException) -> None:
        """Refuse every append of this projection's events from now on, naming ``why``."""
        self.refused = why
        self._mark = None

    def _refuse_if_refused(self) -> None:
        why = self.refused
        if why is not None:
            raise ProjectionStopped(
                f"projection {self.p.name} is not kept inline: rebuilding its rows for this "
                f"version of its fold failed ({type_name(why)}: {why}); its events are refused "
                "until the fold (or the event) is fixed and the projection made inline again",
                projection=self.p.name) from why

    def __call__(self, conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        write = self.prepare(conn, recorded)
        if write is not None:
            write(conn)

    def writes_only(self, conn: Connection, recorded: Sequence[RecordedEvent]) -> bool:
        """None of these events is the projection's: the handler then writes nothing at all."""
        return not any(self.p.handles(e) for e in recorded)

    def guess(self, conn: Connection, recorded: Sequence[RecordedEvent]
              ) -> Callable[[Connection], None] | None:
        """The rows' writes without reading anything, from what this process committed last
        (PostgreSQL, see ``StoreCore._append_guessed``); ``None`` when it knows too little.

        The fold starts from the stream's row as this process wrote it.  That is the row in
        the database if the projection's checkpoint is still where this process left it
        (every writer of the projection's rows moves it, a rebuild changes its generation):
        the checkpoint's update says so, or fails and takes the append's transaction with it.
        Events between that checkpoint and this append need no catch-up only if they all went
        through this handler (it was told of every commit since its mark: ``_seen_to``), so
        they were not this projection's; otherwise ``None``, and prepare() catches them up.
        """
        relevant = [e for e in recorded if self.p.handles(e)]
        keys = {(e.tenant_id, e.stream_id) for e in relevant}
        mark = self._mark
        if (mark is None or self.refused is not None or len(keys) != 1
                or recorded[0].position != (self._seen_to or 0) + 1):
            return None
        (key,) = keys
        known = self._known.get(key)
        if known is None:
            return None
        generation, prev = mark
        rows: _Rows[Any] = _Rows(self.p, generation)
        # A state of its own (decoded afresh), so a fold that changes its state in place and
        # then fails, or whose transaction fails, leaves what is remembered as it was.
        rows.cache[key] = (self.p.decode(known[0]), known[1], known[2])
        rows.apply(conn, relevant)
        now_us = to_micros(relevant[0].recorded_at)
        new_position = recorded[-1].position
        payload = rows.payload(now_us)  # (a row that cannot be stored fails here, unsent)
        self._pending = (recorded, (generation, new_position), rows.encoded((key,)), False)
        due = _due_snapshots(self.p, rows, relevant, now_us)

        def write(conn: Connection) -> None:
            # The checkpoint first: it is locked before the row, as prepare() locks it.  Busy,
            # it fails the guess (see StoreCore._append_guessed): prepare() says what to wait
            # for.
            advance = "advance_from_skip" if locks_must_not_wait() else "advance_from"
            _fast(advance, conn).run(conn, {
                "name": self.p.name, "prev": prev, "generation": generation,
                "code_version": self.p.version, "new_position": new_position}).close()
            rows.write(conn, payload)
            if due:
                _insert_snapshots(conn, due)

        return write

    def committed(self, recorded: Sequence[RecordedEvent]) -> None:
        """The append these events came in has committed (the store says so only when it
        knows): what prepare or guess folded is now the projection's state."""
        pending, self._pending = self._pending, None
        seen_to, self._seen_to = self._seen_to, recorded[-1].position
        if pending is not None and pending[0] is not recorded:
            # Folded in another transaction, which may never commit: what the projection's
            # rows hold is not known here, and the next append reads them.
            self._mark = None
            return
        if pending is None:
            if seen_to is None or recorded[0].position != seen_to + 1:
                # Events this handler never saw lie between: they may be the projection's
                # (another writer without it), and only prepare() catches them up.
                self._mark = None
            return
        _recorded, mark, rows, others_changed = pending
        known = self._known
        if others_changed or len(known) >= _KNOWN_ROWS:
            known.clear()
        known.update(rows)
        self._mark = mark

    def prepare(self, conn: Connection, recorded: Sequence[RecordedEvent]
                ) -> Callable[[Connection], None] | None:
        """Lock the projection, fold the events into their rows; returns the rows' writes.

        Runs before the append's own rows are written (see ``eventstore.InlineHandler``): it
        reads only the projection's rows and, to catch up, events below this append's.
        """
        relevant = [e for e in recorded if self.p.handles(e)]
        if not relevant:
            return None
        self._refuse_if_refused()
        keys = {(e.tenant_id, e.stream_id) for e in relevant}
        # A projector's batch may hold the lock (until the server ends its session, if it froze
        # mid-batch): waiting here, under the append lock, would hold every appender of the
        # database behind it.  In a transaction that can run again the append is rolled back
        # and waits for it outside (RetryAppend); in a caller's, it waits here.
        nowait = locks_must_not_wait()
        lock = _fast("lock_skip" if nowait else "lock", conn)
        row_cur: Any = None
        # One round trip on psycopg: the projection's lock and, for the usual one-stream
        # append, the stream's current row (leaving the pipeline syncs it).
        with _pipeline(conn):
            cur = lock.run(conn, {"name": self.p.name})
            if len(keys) == 1:
                ((tenant, stream),) = keys
                row_cur = _fast("current_row", conn).run(conn, {
                    "projection": self.p.name, "tenant_id": tenant, "stream_id": stream})
        row = cur.fetchone()
        cur.close()
        found = None
        if row_cur is not None:
            found = row_cur.fetchone()
            row_cur.close()
        if row is None and nowait and conn.execute(
                select(projections.c.name).where(projections.c.name == self.p.name)).first():
            raise RetryAppend(f"projection {self.p.name}",
                              functools.partial(_checkpoint_holder, self.p.name))
        if row is None:  # first use in this database
            _ensure_row(conn, self.p, to_micros(relevant[0].recorded_at))
            # (Made, or found made by a projector's transaction: that one may hold it.)
            cur = _fast("lock", conn).run(conn, {"name": self.p.name})
            row = cur.fetchone()
            cur.close()
        generation, position, status_, error, code_version = row
        if code_version != self.p.version:
            # Rows of another fold version are never extended with this one: reads fall back to
            # live folds until a rebuild (run by inline() at start-up, or by a projector).
            if not self.warned:
                self.warned = True
                _log.warning("projection_stale", projection=self.p.name,
                             stored=code_version, code=self.p.version)
            self._mark = None  # nothing to guess from until this code folds the rows again
            return None
        if status_ != "failed":
            self._stopped_in = None  # (restarted since: forget that transaction)
        else:
            stopped_in = self._stopped_in
            if stopped_in is not None and stopped_in is conn.get_transaction():
                # This transaction's own earlier append stopped it (a catch-up below): the
                # record must commit with it, so its later appends go through the same way.
                self._mark = None
                return None
            raise ProjectionStopped(
                f"projection {self.p.name} is stopped after a failure ({error}); fix it and "
                f"run `eventstore projections restart {self.p.name}` before appending",
                projection=self.p.name)
        rows: _Rows[Any] = _Rows(self.p, generation)
        first = relevant[0].position
        # Rows this process remembers (see guess) are the database's only while nobody else
        # moved the checkpoint and no catch-up folded other appends into them.
        others_changed = (generation, position) != self._mark
        if position < first - 1:
            # Catch up what appends without this handler (another process, or before it was
            # registered) left behind, then fold this batch.
            try:
                _catch_up(self.store, conn, rows, position, first - 1)
                rows.check_rows()  # (what the flush below would refuse, at its event)
            except (ProjectionFailed, EventDecodeError) as e:
                # An event already in the log (appended without this projection) that its fold
                # refuses, or this code cannot read: the projection stops at it, in ``status``,
                # as a projector's would, and this append goes through without it (a restart
                # after the fix folds it in).  Refusing this append too would roll the record
                # back with it, and every append after it would meet the same event and be
                # refused for it unseen.
                err = e if isinstance(e, ProjectionFailed) else _unreadable(self.p.name, e)
                if err is None:
                    raise  # of a newer schema: newer code, running it inline, goes on
                _fold_before(self.store, conn, self.p, generation, position, err,
                             to_micros(relevant[0].recorded_at))
                _stop_at(conn, self.store, self.p.name, err)
                self._stopped_in = conn.get_transaction()
                self._mark = None
                return None
            if rows.dirty:
                others_changed = True
        key = next(iter(keys))
        if len(keys) == 1 and key not in rows.cache:  # (a catch-up may have loaded it)
            rows.cache[key] = ((rows._initial(key), 0, 0) if found is None else
                               (rows._decoded(key, found[0]), found[1], found[2]))
        rows.apply(conn, relevant)
        now_us = to_micros(relevant[0].recorded_at)
        new_position = recorded[-1].position
        payload = rows.payload(now_us)  # (a row that cannot be stored fails here, unsent)
        self._pending = (recorded, (generation, new_position), rows.encoded(keys),
                         others_changed)
        due = _due_snapshots(self.p, rows, relevant, now_us)

        def write(conn: Connection) -> None:
            with _pipeline(conn):  # the rows and the checkpoint: one round trip on psycopg
                rows.write(conn, payload)
                _fast("advance", conn).run(conn, {"name": self.p.name,
                                                  "new_position": new_position}).close()
            if due:
                _insert_snapshots(conn, due)

        return write


def _due_snapshots(projection: Projection[Any], rows: _Rows[Any],
                   relevant: Sequence[RecordedEvent], now_us: int) -> list[dict[str, Any]]:
    """The snapshot policy of an inline projection: the snapshot rows of the streams whose
    version this append took past a multiple of ``snapshot_every`` (their rows' states)."""
    every = projection.snapshot_every
    if not every:
        return []
    first: dict[tuple[str, str], int] = {}
    last: dict[tuple[str, str], RecordedEvent] = {}
    for e in relevant:
        key = (e.tenant_id, e.stream_id)
        first.setdefault(key, e.version)
        last[key] = e
    due = []
    for key, ev in last.items():
        if ev.version // every == (first[key] - 1) // every:
            continue
        state, version, position = rows.cache[key]
        if (version, position) != (ev.version, ev.position):  # (it folded past this one?)
            continue
        due.append({"tenant_id": key[0], "stream_id": key[1], "projection": projection.name,
                    "code_version": projection.version, "version": version,
                    "position": position, "recorded_at": to_micros(ev.recorded_at),
                    "state": projection.encode(state), "created_at": now_us})
    return due


def _insert_snapshots(conn: Connection, due: list[dict[str, Any]]) -> None:
    # On the driver's cursor, as the rows' writes: in the one-round-trip append an error of an
    # earlier statement may surface here, and the store must see it as the driver raised it.
    # (Once every snapshot_every appends: no one-row shortcut.)
    _fast("snapshot", conn).run_many(conn, due)


def inline(store: EventStore, projection: Projection[Any]) -> None:
    """Run ``projection`` inline: its rows change in the same transaction as each append.

    Rows are then current for any query right after ``append`` returns (read-your-writes).  A
    projection that raises on an event of the append makes the append fail: nothing is
    written.  One that raises on an event already in the log (appended without it) stops there,
    in ``status``; later appends are refused (``ProjectionStopped``) until a restart.  Rows
    built by an older version of the fold are rebuilt first.  For an ``AsyncEventStore`` that
    check (and any rebuild) runs on a worker thread, through a sync store of the same
    database, before the async store's next append or transaction, which waits for it: this
    call, and a facade's constructor, do no I/O on the event loop.  Where the sync store's
    ``inline()`` raises the rebuild's failure, the async store's appends of the projection's
    events raise ``ProjectionStopped`` (caused by it) until ``inline()`` is called again with
    a fold that rebuilds.  Rows a newer version built are left as they are (see
    ``_rebuild_if_stale``).
    """
    check_projection(projection)
    if isinstance(store, StoreCore):
        store._check_open()  # (StoreClosed also when the projection is inline already)
    for h in store.inline_handlers:
        if isinstance(h, _InlineHandler) and h.p.name == projection.name:
            if h.refused is None:
                return
            if isinstance(store, BoundStore):  # (no rebuild runs from here: still refused)
                h._refuse_if_refused()
            store.remove_inline_handler(h)  # (its rebuild failed: this one tries again)
    if isinstance(store, EventStore):
        _rebuild_if_stale(store, projection)
    handler = _InlineHandler(store, projection)
    store.add_inline_handler(handler)
    if not isinstance(store, (EventStore, BoundStore)) and hasattr(store, "prepare_before_use"):
        url = store.url
        if not (is_sqlite(url) and _sqlite_settings(url)[3]):  # in memory: not reachable
            store.prepare_before_use(functools.partial(
                _rebuild_if_stale_at, url, projection, store, handler))


def _rebuild_if_stale_at(url: Any, projection: Projection[Any], store: Any,
                         handler: _InlineHandler) -> None:
    """:func:`_rebuild_if_stale` through a sync store of the database at ``url``, for an
    ``AsyncEventStore``.  If that fails for good (a fold that raises), the error cannot reach
    the caller of ``inline()`` as the sync store's does: the handler refuses every append of
    the projection's events instead (``ProjectionStopped``, naming the error), and its async
    facade raises the error (see ``projections.aio``); the store's other appends go on."""
    try:
        with EventStore.open(url, migrate=False) as sync:
            _rebuild_if_stale(sync, projection)
    except Exception as e:
        if not (isinstance(e, DatabaseError) and e.transient):  # (tried again: keep it)
            handler.refuse(e)
        raise


def _rebuild_if_stale(store: EventStore, projection: Projection[Any]) -> None:
    """Rebuild rows built by an older version of the fold before they are used (and record
    the categories it folds, if its row holds others)."""
    existing = status(store, projection.name)
    if (existing and existing[0].code_version <= projection.version
            and existing[0].categories != tuple(_categories_of(projection))):
        ensure_registered(store, projection)
    if existing and existing[0].code_version > projection.version:
        # Newer code built them (a rolling deploy, this process the old release): rebuilding
        # them back would undo its rebuild, and the two would take turns.  This process's
        # reads of one stream fold live meanwhile; its queries across streams find none of
        # these rows.  Rolling back is an explicit `projections rebuild NAME` with this code.
        _log.warning("projection_built_by_newer_code", projection=projection.name,
                     stored=existing[0].code_version, code=projection.version)
    elif existing and existing[0].code_version != projection.version:
        _log.info("projection_code_changed", projection=projection.name,
                  stored=existing[0].code_version, code=projection.version)
        try:
            _rebuild(store, projection, progress=None, only_if_stale=True)
        except RebuildInProgress:
            # Another process (a worker of the same deploy) is rebuilding.  Until its swap
            # there are no rows of this fold: this process's queries across streams would
            # answer nothing, not even its own appends (a finish_run would retire nothing).
            _log.info("projection_rebuild_elsewhere", projection=projection.name)
            _await_rebuild(store, projection)


# How often a process waiting for another's rebuild looks at it, and after how long without
# progress it takes the rebuild over (the other process died or hangs).
_REBUILD_POLL_S = 0.1
_REBUILD_STALLED_S = 10.0


def _await_rebuild(store: EventStore, projection: Projection[Any]) -> None:
    """Wait until the projection's rows are of this fold version (or newer): another process
    is rebuilding them.  Its rebuild is taken over (resumed where it stopped) when it stops
    moving for :data:`_REBUILD_STALLED_S`, or when there is none of this fold any more (it
    failed: the error is this process's too)."""
    seen: tuple[int | None, int | None] | None = None
    since = time.monotonic()
    while True:
        (st,) = status(store, projection.name)
        if st.code_version >= projection.version:
            return
        mark = (st.rebuild_generation, st.rebuild_position)
        if mark != seen:
            seen, since = mark, time.monotonic()
        if st.rebuild_generation is None or time.monotonic() - since >= _REBUILD_STALLED_S:
            try:
                _rebuild(store, projection, progress=None, only_if_stale=True)
                return
            except RebuildInProgress:
                since = time.monotonic()
        time.sleep(_REBUILD_POLL_S)


# -- reading rows --


def _usable_generation(projection: Projection[Any]) -> Any:
    """The active generation, if its rows were built by this version of the fold (else NULL)."""
    return (select(projections.c.generation)
            .where(projections.c.name == projection.name,
                   projections.c.code_version == projection.version)
            .scalar_subquery())


def load_row(store: EventStore, projection: Projection[S], tenant_id: str, stream_id: str
             ) -> tuple[S, int] | None:
    """The persisted state of one stream and the version it reflects, or ``None``."""
    check_projection(projection)
    check_id(stream_id, "stream id", InvalidStreamId)
    check_id(tenant_id, "tenant id", InvalidArgument)
    pr = projection_rows.c
    gen = _usable_generation(projection)
    with transaction(store, write=False) as conn:
        r = conn.execute(select(pr.state, pr.version).where(
            pr.projection == projection.name, pr.generation == gen,
            pr.tenant_id == tenant_id, pr.stream_id == stream_id)).first()
    if r is None:
        return None
    return projection.decode(r.state), r.version


def current(store: EventStore, projection: Projection[S], stream_id: str, *, tenant_id: str
            ) -> tuple[S, int]:
    """A stream's state now and its version: the persisted row, topped up from the log.

    The top-up covers events appended by a writer that did not run this projection inline (or
    before it was registered), so a command layer always decides on the latest state.
    """
    row = load_row(store, projection, tenant_id, stream_id)
    state, version = row if row is not None else (projection.initial(tenant_id, stream_id), 0)
    for ev in store.read_stream(stream_id, tenant_id=tenant_id, from_version=version + 1):
        state = _evolve_one(projection, state, ev)  # (ProjectionFailed, as fold_live's)
        version = ev.version
    return state, version


def query_rows(store: EventStore, projection: Projection[S], *, tenant_id: str | None,
               status: str | Iterable[str] | None = None, group_key: str | None = None,
               sort_before: int | None = None, limit: int | None = None,
               conn: Connection | None = None) -> list[tuple[str, str, S, int]]:
    """Rows of the active generation by indexed columns, oldest ``sort_key`` first; rows with
    the same ``sort_key`` in log order (of the event each row last folded), so a queue stays
    first-in-first-out when times tie (an injected clock, or two events in one microsecond).

    Returns ``(tenant_id, stream_id, state, version)`` tuples.  ``tenant_id=None`` reads every
    tenant's rows; ``sort_before`` is in the projection's ``sort_key`` units; ``conn``: read on
    that connection (a command layer's transaction) instead of a new one.  Rows without a
    ``sort_key`` come first on SQLite and last on PostgreSQL (each database's own order, which
    its index gives without a sort).
    """
    check_projection(projection)
    for value, what in ((tenant_id, "tenant id"), (group_key, "group key")):
        if value is not None:
            check_id(value, what, InvalidArgument)
    statuses: list[str] | None = None
    if status is not None:
        if not isinstance(status, Iterable):
            raise InvalidArgument(f"status must be a str or an iterable of them, got "
                                  f"{type(status).__name__}")
        statuses = [status] if isinstance(status, str) else list(status)
        for value in statuses:
            check_id(value, "status", InvalidArgument)
    if limit is not None:
        check_int(limit, "limit", minimum=0)
    if sort_before is not None:
        check_int(sort_before, "sort_before", minimum=-MAX_INT - 1)
    pr = projection_rows.c
    gen = _usable_generation(projection)
    q = select(pr.tenant_id, pr.stream_id, pr.state, pr.version).where(
        pr.projection == projection.name, pr.generation == gen)
    if tenant_id is not None:
        q = q.where(pr.tenant_id == tenant_id)
    if statuses is not None:
        q = q.where(pr.status == statuses[0] if len(statuses) == 1 else pr.status.in_(statuses))
    if group_key is not None:
        q = q.where(pr.group_key == group_key)
    if sort_before is not None:
        q = q.where(pr.sort_key < sort_before)
    q = q.order_by(pr.sort_key, pr.position, pr.tenant_id, pr.stream_id)
    if limit is not None:
        q = q.limit(limit)
    if conn is not None:
        rows = conn.execute(q).all()
    else:
        with transaction(store, write=False) as c:
            rows = c.execute(q).all()
    return [(r.tenant_id, r.stream_id, projection.decode(r.state), r.version) for r in rows]


# -- live folds and snapshots --


def fold_live(
    store: EventStore,
    projection: Projection[S],
    stream_id: str,
    *,
    tenant_id: str,
    at_version: int | None = None,
    at_time: datetime | None = None,
    use_snapshots: bool = True,
) -> tuple[S, int]:
    """Fold one stream on read, from the newest usable snapshot; returns (state, version).

    ``at_version`` / ``at_time`` stop the fold there (time travel; with both, at the first it
    reaches).  A snapshot is saved when the fold went ``snapshot_every`` events past the last
    one (current reads only; an inline projection saves one with the append that takes a
    stream past each multiple of it).  Any snapshot of the projection's version is used, also
    with ``snapshot_every = None`` (those :func:`snapshot_now` saved on demand); one that does
    not decode is passed over (a cache: the fold reads the log instead) and, by a current read,
    replaced.
    """
    check_projection(projection)
    limit_us = to_micros(at_time) if at_time is not None else None
    if at_version is not None:
        check_int(at_version, "at_version", minimum=0)
    stream = check_id(stream_id, "stream id", InvalidStreamId)
    tenant = check_id(tenant_id, "tenant id", InvalidArgument)
    state: S = projection.initial(tenant, stream)
    version = 0
    snap_version = 0
    damaged = False
    # One read transaction for the snapshot and the events after it.
    with transaction(store, write=False) as conn:
        if use_snapshots:
            snap = _newest_snapshot(conn, projection, tenant, stream, at_version, limit_us)
            if isinstance(snap, int):
                damaged = True
            elif snap is not None:
                state, version = snap
                snap_version = version
        if projection.evolve_slice is not None:
            state, version, last = _fold_slices(store, conn, projection, state, version, stream,
                                                tenant, at_version, limit_us)
    if projection.evolve_slice is None:
        state, version, last = _fold_records(store, projection, state, version, stream, tenant,
                                             at_version, limit_us)
    every = projection.snapshot_every
    if (use_snapshots and last is not None and at_version is None and at_time is None
            and (damaged or (every is not None and version - snap_version >= every))
            and not _read_only_on_sqlite(store)):
        save_snapshot(store, projection, tenant_id, stream_id, state, last, replace=damaged)
    return state, version


def _read_only_on_sqlite(store: EventStore) -> bool:
    """A store bound to an SQLite read transaction (an async store's read): a live fold there
    saves no snapshot, a cache whose write would fail the read once another transaction has
    committed since it began (on PostgreSQL the write goes through)."""
    return (isinstance(store, BoundStore) and store.read_only
            and store.conn.dialect.name == "sqlite")


# What a live fold stopped at, for the snapshot it may save: (version, recorded_at).
_Last = tuple[int, datetime]
# Events per page of a live fold.  Small enough that a page's decoded events die before the
# garbage collector's first generation fills up (measured: pages of 1,000 set off a full
# collection every few folds of 10,000 events, which doubled those folds' time).
SLICE_PAGE = 500


def _fold_records(store: EventStore, projection: Projection[S], state: S, version: int,
                  stream_id: str, tenant_id: str, at_version: int | None, limit_us: int | None
                  ) -> tuple[S, int, _Last | None]:
    last: RecordedEvent | None = None
    for ev in store.read_stream(stream_id, tenant_id=tenant_id, from_version=version + 1,
                                to_version=at_version):
        if limit_us is not None and to_micros(ev.recorded_at) > limit_us:
            break
        state = _evolve_one(projection, state, ev)
        version = ev.version
        last = ev
    return state, version, None if last is None else (last.version, last.recorded_at)


def _evolve_one(projection: Projection[S], state: S, ev: RecordedEvent) -> S:
    try:
        return projection.evolve(state, ev)
    except Exception as e:
        raise _failed_at(projection.name, ev, e) from e


def _slice_of(key: tuple[str, str], records: Sequence[RecordedEvent]) -> StreamSlice:
    """Records of one stream as a slice (the events of one append share their time object)."""
    micros: list[int] = []
    last_at: datetime | None = None
    us = 0
    for r in records:
        if r.recorded_at is not last_at:
            last_at, us = r.recorded_at, to_micros(r.recorded_at)
        micros.append(us)
    return StreamSlice(key[0], key[1], [r.version for r in records], [r.type for r in records],
                       [r.data for r in records], micros)


def _fold_slices(store: EventStore, conn: Connection, projection: Projection[S], state: S,
                 version: int, stream: str, tenant: str, at_version: int | None,
                 limit_us: int | None) -> tuple[S, int, _Last | None]:
    """The live fold through ``evolve_slice``: pages of columns, read on ``conn``."""
    evolve_slice = projection.evolve_slice
    assert evolve_slice is not None
    core = store.core if isinstance(store, BoundStore) else store
    last: _Last | None = None
    for page in core.iter_slices_on(conn, stream, tenant, version + 1, at_version, SLICE_PAGE):
        batch = page if limit_us is None else _until(page, limit_us)
        if not len(batch):
            break
        try:
            state = evolve_slice(state, batch)
        except Exception as e:
            _blame(store, projection, state, batch, e)
        version = batch.versions[-1]
        last = (version, batch.recorded_at(len(batch) - 1))
        if len(batch) < len(page):  # the time limit cut the page
            break
    return state, version, last


def _until(batch: StreamSlice, limit_us: int) -> StreamSlice:
    """The events of ``batch`` before the first one committed after ``limit_us`` (as a record
    fold stops: a stream's times never go back, but rows written before that rule may)."""
    n = next((i for i, at in enumerate(batch.recorded_at_us) if at > limit_us), len(batch))
    if n == len(batch):
        return batch
    return StreamSlice(batch.tenant_id, batch.stream_id, batch.versions[:n], batch.types[:n],
                       batch.data[:n], batch.recorded_at_us[:n])


def _blame(store: EventStore, projection: Projection[S], state: S, batch: StreamSlice,
           cause: Exception) -> NoReturn:
    """``evolve_slice`` raised: fold the slice's records one by one to name the failing event.

    When ``evolve`` passes where ``evolve_slice`` failed (the two disagree), the slice's first
    event is named.
    """
    records = list(store.read_stream(batch.stream_id, tenant_id=batch.tenant_id,
                                     from_version=batch.versions[0],
                                     to_version=batch.versions[-1]))
    for ev in records:
        state = _evolve_one(projection, state, ev)  # raises ProjectionFailed at the culprit
    first = records[0]
    raise ProjectionFailed(projection=projection.name, position=first.position, type=first.type,
                           stream_id=first.stream_id, tenant_id=first.tenant_id,
                           cause=cause) from cause


def _newest_snapshot(conn: Connection, projection: Projection[S], tenant_id: str,
                     stream_id: str, at_version: int | None, at_us: int | None
                     ) -> tuple[S, int] | int | None:
    """The newest snapshot within the bounds, as (state, version); its version alone when it
    does not decode; None when there is none."""
    c = _snapshot_query(conn, at_version is not None, at_us is not None)
    params: dict[str, Any] = {"tenant_id": tenant_id, "stream_id": stream_id,
                              "projection": projection.name,
                              "code_version": projection.version}
    if at_version is not None:
        params["at_version"] = at_version
    if at_us is not None:
        params["at_us"] = at_us
    cur = c.run(conn, params)
    r = cur.fetchone()
    cur.close()
    if r is None:
        return None
    try:
        return projection.decode(_stored_bytes(r[0])), r[1]
    except Exception as e:  # damaged, or written by other code under the same version
        _log.warning("snapshot_undecodable", projection=projection.name, tenant=tenant_id,
                     stream=stream_id, version=r[1], error=f"{type_name(e)}: {error_text(e)}")
        return int(r[1])


_snapshot_queries: dict[tuple[str, bool, bool], Compiled] = {}


def _snapshot_query(conn: Connection, by_version: bool, by_time: bool) -> Compiled:
    """The newest usable snapshot of a stream, compiled once per dialect and shape."""
    key = (conn.dialect.name, by_version, by_time)
    c = _snapshot_queries.get(key)
    if c is None:
        sc = snapshots.c
        q = (select(sc.state, sc.version)
             .where(sc.tenant_id == bindparam("tenant_id"),
                    sc.stream_id == bindparam("stream_id"),
                    sc.projection == bindparam("projection"),
                    sc.code_version == bindparam("code_version"))
             .order_by(sc.version.desc()).limit(1))
        if by_version:
            q = q.where(sc.version <= bindparam("at_version"))
        if by_time:
            q = q.where(sc.recorded_at <= bindparam("at_us"))
        c = _snapshot_queries[key] = Compiled(q, conn.dialect)
    return c


def save_snapshot(store: EventStore, projection: Projection[S], tenant_id: str, stream_id: str,
                  state: S, last: RecordedEvent | _Last, *, replace: bool = False) -> None:
    """Store ``state`` as the stream's state at ``last`` (a cache: never an event).

    ``last``: the stream's newest folded event, or its (version, recorded_at).  ``replace``:
    overwrite a snapshot already stored at that version (one that does not decode); else it is
    kept (the fold is pure: it holds the same state).
    """
    values = {"tenant_id": tenant_id, "stream_id": stream_id, "projection": projection.name,
              "code_version": projection.version, "state": projection.encode(state),
              "created_at": _now_us(store)}
    with transaction(store, write=True) as conn:
        if isinstance(last, RecordedEvent):
            values.update(version=last.version, position=last.position,
                          recorded_at=to_micros(last.recorded_at))
        else:
            ec = event_table.c
            position = conn.execute(select(ec.position).where(
                ec.tenant_id == tenant_id, ec.stream_id == stream_id,
                ec.version == last[0])).scalar_one()
            values.update(version=last[0], position=position, recorded_at=to_micros(last[1]))
        ins = (postgresql.insert(snapshots) if conn.dialect.name == "postgresql"
               else sqlite.insert(snapshots))
        stmt = ins.values(**values)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=list(snapshots.primary_key.columns),
            set_={"state": stmt.excluded.state, "position": stmt.excluded.position,
                  "recorded_at": stmt.excluded.recorded_at,
                  "created_at": stmt.excluded.created_at})
                     if replace else stmt.on_conflict_do_nothing())
        # Snapshots of older fold code are never read again.
        conn.execute(delete(snapshots).where(
            snapshots.c.tenant_id == tenant_id, snapshots.c.stream_id == stream_id,
            snapshots.c.projection == projection.name,
            snapshots.c.code_version != projection.version))


def snapshot_now(store: EventStore, projection: Projection[Any], stream_id: str, *,
                 tenant_id: str) -> int:
    """Fold the stream and save a snapshot at its current version (on demand); returns it."""
    state, version = fold_live(store, projection, stream_id, tenant_id=tenant_id,
                               use_snapshots=True)
    if version == 0:
        return 0
    (last,) = store.read_stream(stream_id, tenant_id=tenant_id, from_version=version,
                                to_version=version)
    save_snapshot(store, projection, tenant_id, stream_id, state, last)
    return version


# -- the asynchronous projector --


_MIN_STALL_SECONDS = 60.0
_MAX_STALL_SECONDS = (2**31 - 1) / 1000  # PostgreSQL's timeouts are int32 milliseconds
_DEFAULT_STALL_MS = int(_MIN_STALL_SECONDS * 1000)
_IDLE_TIMEOUT = "25P03"  # idle_in_transaction_session_timeout ended the transaction
_LOCK_TIMEOUT = "55P03"  # lock_timeout: the row lock was not granted in time
_BATCH_LOCK_WAIT_MS = 1000
_BUSY_MARGIN_SECONDS = 5.0
_idle_limit = select(func.set_config("idle_in_transaction_session_timeout", bindparam("ms"),
                                     literal(True)))
_limits = select(func.set_config("idle_in_transaction_session_timeout", bindparam("ms"),
                                 literal(True)),
                 func.set_config("lock_timeout", bindparam("lock_ms"), literal(True)))


def _limit_waits(conn: Connection, stall_ms: int, lock_ms: int | None = None) -> None:
    """PostgreSQL, for the rest of this transaction: end it when it sits idle for ``stall_ms``
    (its worker froze while it holds the projection's row lock, and the others wait for it),
    and wait at most ``lock_ms`` for a lock (None: the server's setting)."""
    if conn.dialect.name != "postgresql":
        return
    if lock_ms is None:
        conn.execute(_idle_limit, {"ms": str(stall_ms)})
    else:
        conn.execute(_limits, {"ms": str(stall_ms), "lock_ms": str(lock_ms)})


class Projector:
    """Runs persisted projections from the log, with a lease per projection.

    Several projectors (processes, hosts) may run the same projections: a lease in
    ``es_projections`` makes one of them active per projection, and another takes over once the
    lease runs out (``lease_seconds``) when the active one dies.  Each batch locks the
    projection's row, checks the lease is still ours, and writes rows and checkpoint in one
    transaction, so a projector that crashes at any point applies every event exactly once.

    On PostgreSQL a batch's transaction may sit idle between its statements (folding) for
    ``stall_seconds`` at most (default: three leases, at least 60 s); then the server ends it.
    A worker that froze in a batch (a paused process, a host gone quiet) holds the projection's
    row lock until then, and the others wait for it.
    """

    def __init__(
        self,
        store: EventStore,
        projections_: Sequence[Projection[Any]],
        *,
        worker_id: str | None = None,
        lease_seconds: float = 10.0,
        batch_size: int = 500,
        poll_interval: float = 0.2,
        stall_seconds: float | None = None,
    ) -> None:
        lease_seconds = _check_seconds(lease_seconds, "lease_seconds")
        poll_interval = _check_seconds(poll_interval, "poll_interval")
        if stall_seconds is None:
            stall_seconds = min(max(3 * lease_seconds, _MIN_STALL_SECONDS), _MAX_STALL_SECONDS)
        stall_seconds = _check_seconds(stall_seconds, "stall_seconds")
        if stall_seconds > _MAX_STALL_SECONDS:
            raise InvalidArgument(f"stall_seconds must be at most {_MAX_STALL_SECONDS} (what "
                                  f"PostgreSQL's idle_in_transaction_session_timeout holds), "
                                  f"got {stall_seconds!r}")
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        if worker_id is not None:
            check_id(worker_id, "worker_id", InvalidArgument)
        if isinstance(projections_, Projection) or not isinstance(projections_, Iterable):
            raise InvalidArgument(f"Projector takes a list of projections, got "
                                  f"{type(projections_).__name__}")
        projections_ = [check_projection(p) for p in projections_]
        if not projections_:
            raise InvalidArgument("Projector needs at least one projection")
        names = [p.name for p in projections_]
        if len(set(names)) != len(names) or not all(names):
            raise InvalidArgument(f"projections need distinct names, got {names}")
        self.store = store
        self.projections = list(projections_)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease_us = int(lease_seconds * 1_000_000)
        self.stall_ms = max(1, int(stall_seconds * 1000))
        self.batch_size = batch_size
        # Per projection: halved when a batch's fold outlasts stall_seconds (see run_once).
        self._sizes: dict[str, int] = {}
        self.poll_interval = poll_interval
        self._log = _log.bind(worker=self.worker_id)
        self._outdated: set[str] = set()  # projections whose rows newer code built (logged)
        self._rebuilding: set[str] = set()  # projections whose rebuild this worker left off
        self._busy: set[str] = set()  # projections whose row another transaction held
        self._rebuilt_elsewhere: set[str] = set()  # ... that another process was rebuilding
        # Projections whose rebuild by this code failed: (fold version, failed_position shown).
        self._failed_rebuilds: dict[str, tuple[int, int | None]] = {}
        # Events a failed batch applied before the event that failed it (see run_once).
        self._applied_before_failure: dict[str, int] = {}
        self._stop: threading.Event | None = None  # run()'s
        for p in self.projections:
            ensure_registered(store, p)

    def _acquire(self, conn: Connection, p: Projection[Any], row: Any) -> bool:
        """Take or renew the projection's lease (the row is locked): free, expired, ours, or
        held by a worker of an older fold version while the rows are older than ours too.

        A lease is given and compared in real time, never the store's clock (which may be
        set, see ``EventStore.open``): on PostgreSQL the server's, so that workers on hosts
        whose clocks disagree neither take a live worker's lease (a clock ahead) nor wait past
        the lease time for a dead one's (the dead host's clock ahead); on SQLite the machine's,
        which all its workers share.

        Why the last: in a rolling deploy that bumps the fold version, the old release's
        workers renew their lease at every poll, so a new release's projector never got it,
        and the rows were never rebuilt while any old worker ran.  Taking it is safe: every
        batch runs under the row's lock and checks the lease first, so the old worker's next
        batch finds it taken and stands down.  Workers of one version never take it from each
        other (nor from a worker rebuilding the rows with this version)."""
        pg = conn.dialect.name == "postgresql"
        # (PostgreSQL: read with the row, before the wait for its lock, if there was one: an
        # expiry is judged a little late, never early; a lease given starts when it is given.)
        now_us = row.server_now_us if pg else _machine_now_us()
        mine = row.owner == self.worker_id
        held = not mine and row.owner is not None and (row.lease_until or 0) > now_us
        holder_code = _holder_code(row) if held else None
        newer = held and row.code_version < p.version and (holder_code or 0) < p.version
        if held and not newer:
            return False
        conn.execute(update(projections).where(projections.c.name == p.name)
                     .values(owner=self.worker_id,
                             lease_until=(_SERVER_CLOCK_US if pg else now_us) + self.lease_us,
                             owner_code=f"{p.version}:{self.worker_id}"))
        if newer:
            self._log.info("projection_lease_taken_by_newer_code", projection=p.name,
                           previous=row.owner, previous_code=holder_code,
                           code=p.version, position=row.position)
        elif not mine:
            self._log.info("projection_lease_taken", projection=p.name,
                           previous=row.owner, position=row.position)
        return True

    def run_once(self, projection: Projection[Any]) -> int:
        """Apply one batch of new events if this worker holds (or can take) the lease.

        Returns the number of events read (0 when idle, not leased, busy in another worker's
        transaction, or failed; for rows of an older fold version, the events this turn of
        their rebuild replayed).  Raises
        :class:`ProjectionFailed` when the fold raises; the projection is then marked failed,
        except in a rebuild of rows of another fold version: status shows that failure and the
        projection goes on running on its rows (kept by the release that built them), and this
        worker leaves it alone until an operator's ``restart``.
        """
        p = projection
        self._rebuilding.discard(p.name)  # (set again below while its rebuild goes on)
        self._busy.discard(p.name)
        self._rebuilt_elsewhere.discard(p.name)
        stopped: ProjectionFailed | None = None  # recorded with the batch
        applied_before = 0  # ... after this many of its events
        self._applied_before_failure.pop(p.name, None)
        started = time.monotonic()
        rebuilding = False
        try:
            with transaction(self.store, write=True) as conn:
                # The batch holds the projection's row lock: if this worker freezes in it (a
                # paused process, an unreachable host), the server ends the transaction after
                # stall_seconds idle, and another worker takes over.  A row another worker
                # holds longer than a second is left for now (it is busy with it, or frozen):
                # this worker goes on with its other projections and its stop.
                _limit_waits(conn, self.stall_ms, _BATCH_LOCK_WAIT_MS)
                row = _lock_row(conn, p.name)
                now_us = _now_us(self.store)
                if row.code_version > p.version:
                    # Rows of a newer fold (a rolling deploy, this worker the old release):
                    # stand down for a worker of that code, as for an event of a newer schema;
                    # rebuilding them back would start the two taking turns.  A fold version
                    # never goes back by itself: rolling back is `projections rebuild NAME`.
                    if p.name not in self._outdated:
                        self._outdated.add(p.name)
                        self._log.warning("projection_built_by_newer_code", projection=p.name,
                                          stored=row.code_version, code=p.version)
                    if row.owner == self.worker_id:  # let a worker of the newer code in now
                        conn.execute(update(projections).where(projections.c.name == p.name)
                                     .values(owner=None, lease_until=None))
                    return 0
                if row.status != "failed" and row.code_version != p.version \
                        and self._failed_rebuilds.get(p.name) == (p.version, row.failed_position):
                    # This code's rebuild of the rows failed, and status still shows it (until
                    # an operator's restart, or a fixed release's rebuild): the rows stay those
                    # of the code that built them, kept by its workers; this one stands aside
                    # rather than replay the log to the same failure, batch after batch.
                    if row.owner == self.worker_id:
                        conn.execute(update(projections).where(projections.c.name == p.name)
                                     .values(owner=None, lease_until=None))
                    return 0
                self._failed_rebuilds.pop(p.name, None)
                if row.status == "failed" or not self._acquire(conn, p, row):
                    return 0
                stale = row.code_version != p.version
                if not stale:
                    rows: _Rows[Any] = _Rows(p, row.generation)
                    try:
                        page = self.store.read_page(conn, from_position=row.position + 1,
                                                    limit=self._size(p),
                                                    categories=p.categories or None)
                        if not page:
                            return 0
                        rows.apply(conn, page)
                        rows.flush(conn, now_us)
                    except (ProjectionFailed, EventDecodeError) as e:
                        failed = (e if isinstance(e, ProjectionFailed)
                                  else _unreadable(p.name, e))
                        if failed is None:
                            raise
                        if failed is not e:
                            failed.__cause__ = e
                        # It stops at that event: the batch's events before it go in, with
                        # the record of the failure.
                        applied_before = _fold_before(
                            self.store, conn, p, row.generation, row.position, failed, now_us)
                        _stop_at(conn, self.store, p.name, failed)
                        stopped = failed
                    else:
                        conn.execute(update(projections).where(projections.c.name == p.name)
                                     .values(position=page[-1].position, updated_at=now_us))
                        return len(page)
            if stopped is not None:  # (committed with the batch)
                self._applied_before_failure[p.name] = applied_before
                raise stopped
            # Rows of another fold version: replay them with this one (the lease is ours), a
            # slice of half a lease at a time (the next run_once renews the lease and resumes
            # it; the worker's other projections and its stop get their turns meanwhile).
            if p.name not in self._rebuilding:
                self._log.info("projection_code_changed", projection=p.name,
                               stored=row.code_version, code=p.version)
            ends = time.monotonic() + self.lease_us / 2e6
            moved: dict[str, int] = {}
            rebuilding = True  # (a failure from here on is the rebuild's: see below)
            try:
                # Re-checked under the projection's lock: an inline process of this release
                # may have rebuilt them since this lease's read.
                _rebuild(self.store, p, progress=None, only_if_stale=True,
                         stopping=lambda: self._stopping() or time.monotonic() >= ends,
                         stall_ms=self.stall_ms, moved=moved, page=self._size(p))
            except RebuildInProgress:
                self._log.info("projection_rebuild_elsewhere", projection=p.name)
                self._rebuilt_elsewhere.add(p.name)
                return 0  # another process rebuilds it; its rows come with its swap
            except _RebuildStopped:
                self._rebuilding.add(p.name)  # more to replay: not idle
                return moved.get("replayed", 0)
            return moved.get("replayed", 0)
        except ProjectionFailed as e:
            if rebuilding:
                # The rebuild showed it in status and left the projection running on its
                # rows: failing it would stop the appends of the release that keeps them.
                self._failed_rebuilds[p.name] = (p.version, e.position)
            elif e is not stopped:
                _record_failure(self.store, p.name, e)
            raise
        except DatabaseError as e:
            if e.sqlstate == _LOCK_TIMEOUT:
                self._log.debug("projection_busy_elsewhere", projection=p.name)
                self._busy.add(p.name)
                return 0
            if (e.sqlstate is None and e.transient and self.store.backend == "postgresql"
                    and time.monotonic() - started >= self.stall_ms / 1000):
                # A connection lost after the batch outlasted stall_seconds: the server ended
                # it for idling and closed the session.  psycopg reports the server's reason
                # (25P03) only when it reads it first; with several statements in a pipeline
                # (the rows of two streams or more) it reports the closed connection instead.
                lost = e
                e = DatabaseError(f"the server ended the batch's session, idle-in-transaction "
                                  f"for stall_seconds ({self.stall_ms / 1000:g} s): {lost}")
                e.transient, e.sqlstate = True, _IDLE_TIMEOUT
                e.__cause__ = lost
            if e.sqlstate == _IDLE_TIMEOUT:
                # The server ended the batch after stall_seconds idle: this worker froze, or
                # the batch's fold takes that long.  Retried (a transient error) with half the
                # events, so that a slow fold still gets through; this worker keeps the smaller
                # size (growing it back would time out again, every other batch).
                size = self._sizes[p.name] = max(1, self._size(p) // 2)
                self._log.warning("projector_batch_too_slow", projection=p.name,
                                  stall_seconds=self.stall_ms / 1000, batch_size=size)
            raise e from e.__cause__
        except EventDecodeError as e:
            failed = _unreadable(p.name, e)
            if failed is None:
                # Newer code can read it (a rolling deploy): this worker stops, and the
                # projection stays running for one that is up to date (the lease passes on).
                raise
            if rebuilding:  # (shown by the rebuild, as above)
                self._failed_rebuilds[p.name] = (p.version, failed.position)
            else:
                _record_failure(self.store, p.name, failed)
            raise failed from e

    def catch_up(self) -> int:
        """Run every projection until it has applied the whole log; returns events applied.

        A projection that fails (:class:`ProjectionFailed`, recorded in ``status``) does not
        keep the others from catching up: the first failure is raised after all have run.
        """
        total, failures = self.catch_up_each()
        if failures:
            raise failures[0]
        return total

    def catch_up_each(self) -> tuple[int, list[EventStoreError]]:
        """:meth:`catch_up`, returning the failures (each recorded in ``status``) instead of
        raising the first: the events applied, and why projections failed (a
        :class:`ProjectionFailed`, or the :class:`DatabaseError` of a batch the database
        refuses, which fails its projection as in :meth:`run`)."""
        total = 0
        failures: list[EventStoreError] = []
        for p in self.projections:
            # A row another transaction holds is tried again (a batch waits a second for it)
            # until a frozen holder's transaction would have been ended, then left.
            busy_until: float | None = None
            try:
                while True:
                    size = self._size(p)
                    try:
                        n = self.run_once(p)
                    except DatabaseError as e:
                        # A batch the server ended for idling: run_once halved it; again,
                        # unless a single event's fold outlasts stall_seconds.
                        if e.sqlstate != _IDLE_TIMEOUT or size == 1:
                            raise
                        continue
                    total += n
                    if p.name in self._busy:  # its row was held longer than a wait: again
                        if busy_until is None:  # (counted from when it was first found held)
                            busy_until = (time.monotonic() + self.stall_ms / 1000
                                          + _BUSY_MARGIN_SECONDS)
                        if time.monotonic() < busy_until:
                            continue
                    else:
                        busy_until = None
                    if n < size and p.name not in self._rebuilding:  # (the batch's size)
                        break
            except ProjectionFailed as e:
                total += self._applied_before_failure.pop(p.name, 0)
                failures.append(e)
            except DatabaseError as e:
                if e.transient:
                    raise
                _record_database_failure(self.store, p.name, e)
                failures.append(e)
        return total, failures

    def run(self, stop: threading.Event) -> None:
        """Project until ``stop`` is set, then give up the leases.

        A failed projection applies nothing (``status`` shows it) while the rest go on; once an
        operator restarts it, this worker retries it.  A transient database error
        (:attr:`DatabaseError.transient`: a write lock held longer than the busy timeout, a
        lost connection) is logged and retried after a pause that grows to 5 s, instead of
        ending the worker; any other database error (a row the database refuses) fails that
        projection, as a failing fold does.  Any other error ends the worker, leases given up
        on the way out (an event only newer code can read: a worker of that code goes on).
        """
        pause = self.poll_interval
        self._stop = stop
        try:
            self._run_until(stop, pause)
        finally:
            self._stop = None

    def _run_until(self, stop: threading.Event, pause: float) -> None:
        try:
            while not stop.is_set():
                busy = errored = False
                for p in self.projections:
                    if stop.is_set():  # (a stopping worker takes no more work)
                        break
                    try:
                        size = self._size(p)
                        n = self.run_once(p)
                        busy = n >= size or p.name in self._rebuilding or busy
                    except ProjectionFailed:
                        pass  # recorded (status: failed) and logged by run_once
                    except DatabaseError as e:
                        if not e.transient:
                            # The same batch would fail the same way (a row the database
                            # refuses): this projection stops there, in status; the rest go on.
                            with contextlib.suppress(DatabaseError):  # else: retried below
                                _record_database_failure(self.store, p.name, e)
                                continue
                        errored = True
                        self._log.warning("projector_database_error", projection=p.name,
                                          error=error_text(e), retry_in=round(pause, 3))
                if errored:
                    stop.wait(pause)
                    pause = min(pause * 2, _MAX_ERROR_PAUSE)
                    continue
                pause = self.poll_interval
                if not busy:
                    stop.wait(self.poll_interval)
        except BaseException:
            with contextlib.suppress(Exception):  # the error that ends the worker goes up
                self.release()
            raise
        try:
            self.release()
        except DatabaseError as e:
            if not e.transient:
                raise
            # Stopping while the database is out of reach: the leases run out by themselves.
            self._log.warning("projector_leases_not_released", error=error_text(e))

    @property
    def held_elsewhere(self) -> frozenset[str]:
        """The projections whose last batch found their row held by another transaction
        longer than it waits (see :meth:`run_once`), so this worker left them for now."""
        return frozenset(self._busy)

    @property
    def rebuilt_elsewhere(self) -> frozenset[str]:
        """The projections whose last turn found another process rebuilding them (their rows
        come with that rebuild's swap)."""
        return frozenset(self._rebuilt_elsewhere)

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def _size(self, p: Projection[Any]) -> int:
        return self._sizes.get(p.name, self.batch_size)


    def release(self) -> None:
        """Give up this worker's leases (a clean shutdown lets another take over at once)."""
        with translate(), transaction(self.store, write=True) as conn:
            conn.execute(update(projections)
                         .where(projections.c.owner == self.worker_id,
                                projections.c.name.in_([p.name for p in self.projections]))
                         .values(owner=None, lease_until=None))


_MAX_ERROR_PAUSE = _MAX_RETRY_PAUSE  # seconds, as a subscription's (eventstore._core)


def _check_seconds(value: object, what: str) -> float:
    """A finite number of seconds from a millisecond to a billion (leases are kept in int64
    microseconds)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 1e-3 <= value <= 1e9:  # NaN fails this comparison too
        raise InvalidArgument(f"{what} must be a number of seconds in [0.001, 1e9], "
                              f"got {value!r}")
    return float(value)


# -- rebuild and verify --


ProgressFn = Callable[[int, int], None]


def _fill(store: EventStore, projection: Projection[Any], generation: int, start: int,
          until: Callable[[], int], progress: ProgressFn | None, *, track: bool,
          stall_ms: int | None = None, page: int | None = None) -> int:
    """Fold the log into ``generation`` page by page from ``start``; returns the last position.

    Each page commits its rows (and, when ``track``, the rebuild position) in one transaction, so
    an interrupted rebuild resumes where it stopped.
    """
    rows: _Rows[Any] = _Rows(projection, generation)
    last = start
    cats = projection.categories or None
    size = page or _PAGE * 5
    while True:
        bound = until()
        if last >= bound:
            return last
        with transaction(store, write=True) as conn:
            if stall_ms is not None:
                # A projector's: its folds may leave the transaction idle for stall_seconds
                # (else the session's limit holds, EVENTSTORE_PG_IDLE_TIMEOUT or the server's).
                _limit_waits(conn, stall_ms)
            events = store.read_page(conn, from_position=last + 1, limit=size, categories=cats,
                                     to_position=bound)
            if not events:
                return last
            # The fold first, without the projection's lock (on PostgreSQL: the others wait
            # for no fold, however slow); then the lock, and the check that this rebuild still
            # has the generation where it left it, before any row is written.
            try:
                rows.apply(conn, events)
            except (ProjectionFailed, EventDecodeError):
                if track:  # folded onto rows another rebuild took over (and changed)?
                    _own_rebuild(conn, projection.name, generation, last, projection.version)
                raise  # (still this rebuild's: the failure is the fold's own)
            if track:
                if stall_ms is None:  # (the projection's lock is held from here)
                    _limit_waits(conn, _DEFAULT_STALL_MS)
                _own_rebuild(conn, projection.name, generation, last, projection.version)
            rows.flush(conn, _now_us(store) if generation > 0 else _machine_now_us())
            last = events[-1].position
            if track:
                conn.execute(update(projections).where(projections.c.name == projection.name)
                             .values(rebuild_position=last))
        if progress is not None:
            progress(last, bound)


def rebuild(store: EventStore, projection: Projection[Any], *,
            progress: ProgressFn | None = None) -> int:
    """Replay the log from position 0 into a new generation and swap it in when caught up (a
    rebuild interrupted before resumes its generation when the fold version is the same).

    Queries keep reading the current generation until the swap, which happens in one
    transaction holding the projection's lock (so inline appends and projector batches wait for
    it and then continue on the new rows).  Returns the new generation.
    """
    return _rebuild(store, check_projection(projection), progress=progress,
                    only_if_stale=False)


class _RebuildStopped(Exception):
    """A rebuild left off between pages (its projector is stopping); it resumes from there."""


def _rebuild(store: EventStore, projection: Projection[Any], *, progress: ProgressFn | None,
             only_if_stale: bool, stopping: Callable[[], bool] | None = None,
             stall_ms: int | None = None, moved: dict[str, int] | None = None,
             page: int | None = None) -> int:
    """:func:`rebuild`; with ``only_if_stale``, none when the rows are of this fold version or a
    newer one by the time the lock is held (another process rebuilt them meanwhile).  Raises
    :class:`_RebuildStopped` after a page once ``stopping()`` is true.  Each transaction holding
    the projection's lock ends if idle for ``stall_ms`` (see :func:`_limit_waits`; a projector's,
    which also bounds its pages' folds; None: 60 s, the folds under the session's limit); ``moved``
    gets the number of events ``replayed``; ``page``: events per page (and transaction)."""
    ensure_registered(store, projection)
    name = projection.name
    lock_stall_ms = stall_ms if stall_ms is not None else _DEFAULT_STALL_MS
    with transaction(store, write=True) as conn:
        _limit_waits(conn, lock_stall_ms)
        row = _lock_row(conn, name)
        if only_if_stale and row.code_version >= projection.version:
            _log.info("projection_rebuilt_elsewhere", projection=name,
                      stored=row.code_version, code=projection.version)
            return int(row.generation)
        gen: int
        start: int
        if row.rebuild_generation is not None \
                and row.rebuild_code_version == projection.version:
            gen, start = int(row.rebuild_generation), int(row.rebuild_position or 0)  # resume
            keep: int | None = gen
        else:
            # A fresh generation; one another version of the fold left half-built (a release
            # rolled out or back meanwhile) is started over, never finished with this fold.
            if row.rebuild_generation is not None:
                _log.info("projection_rebuild_restarted", projection=name,
                          generation=row.rebuild_generation,
                          folded_by=row.rebuild_code_version, code=projection.version)
            gen = int(row.generation) + 1
            start = 0
            keep = None
            conn.execute(update(projections).where(projections.c.name == name)
                         .values(rebuild_generation=gen, rebuild_position=0,
                                 rebuild_code_version=projection.version))
        _drop_newer_generations(conn, name, int(row.generation), keep)
    _log.info("projection_rebuild_started", projection=name, generation=gen, position=start)
    committed = [start]  # where this rebuild's last committed page left the generation

    def tracked(position: int, bound: int) -> None:
        committed[0] = position
        if moved is not None:
            moved["replayed"] = position - start
        if progress is not None:
            progress(position, bound)
        if stopping is not None and stopping():
            _log.info("projection_rebuild_paused", projection=name, generation=gen,
                      position=position)
            raise _RebuildStopped(name)

    try:
        last = _fill(store, projection, gen, start, store.last_position, tracked, track=True,
                     stall_ms=stall_ms, page=page)
        with transaction(store, write=True) as conn:
            _limit_waits(conn, lock_stall_ms)
            _own_rebuild(conn, name, gen, last, projection.version)
            rows: _Rows[Any] = _Rows(projection, gen)
            last = _catch_up(store, conn, rows, last, None)
            rows.flush(conn, _now_us(store))
            if moved is not None:
                moved["replayed"] = last - start
            conn.execute(update(projections).where(projections.c.name == name).values(
                generation=gen, position=max(last, 0), code_version=projection.version,
                status="running", error=None, failed_position=None, rebuild_generation=None,
                rebuild_position=None, rebuild_code_version=None, updated_at=_now_us(store)))
    except (ProjectionFailed, EventDecodeError) as e:
        _record_rebuild_failure(store, name, gen, committed[0], projection.version, e)
        raise
    _drop_older_generations(store, name, gen)
    _log.info("projection_rebuilt", projection=name, generation=gen, position=last)
    if progress is not None:
        progress(last, last)
    return gen


def _drop_older_generations(store: EventStore, name: str, live: int) -> None:
    """After a rebuild's swap to ``live``: delete the rows of the generations before it, which
    no reader or writer takes again (the live number only grows).  The one it swapped out, and
    any an earlier rebuild swapped out and never deleted (its process died, or was
    interrupted, between its swap and this).  Not under the projection's lock; one index
    range."""
    with transaction(store, write=True) as conn:
        pr = projection_rows
        conn.execute(delete(pr).where(pr.c.projection == name, pr.c.generation > 0,
                                      pr.c.generation < live))


def _drop_newer_generations(conn: Connection, name: str, live: int, keep: int | None) -> None:
    """Under the projection's lock: delete the rows of the generations after the live one but
    ``keep`` (a rebuild resumed): the next one, left half built by a fold of another version.
    Index ranges around the live rows and ``keep``'s, which are not read through."""
    pr = projection_rows
    bounds = [(live, keep), (keep, None)] if keep is not None else [(live, None)]
    for lo, hi in bounds:
        conn.execute(delete(pr).where(pr.c.projection == name, pr.c.generation > lo,
                                      *([pr.c.generation < hi] if hi is not None else [])))


def _record_rebuild_failure(store: EventStore, name: str, generation: int, at: int,
                            code_version: int, err: ProjectionFailed | EventDecodeError
                            ) -> None:
    """Show a rebuild stopped by an event in ``status`` (``error``, ``failed_position``), and
    drop its partial generation.

    The projection's status is left as it is: its live rows are still those of the generation
    in use, and a failed status would stop inline appends and projectors on them (a failure a
    projector recorded stays as it was).  The partial rows go: they were folded by the code
    that failed, and the fix may fold earlier events differently, so the next rebuild starts
    from position 0.  Its swap clears the error, as ``restart`` does.  All this only while the
    generation is still this rebuild's (at ``at``, where it left it): another process's
    rebuild that took it over keeps it.
    """
    position = err.position
    if isinstance(err, EventDecodeError) and (position is None or err.newer_schema):
        position = None  # newer code can read the event: nothing of this code's to show
    with transaction(store, write=True) as conn:
        row = _lock_row(conn, name)
        if not _owns_rebuild(row, generation, at, code_version):
            return  # another rebuild moved it on: its rows are not ours to drop
        values: dict[str, Any] = {"rebuild_generation": None, "rebuild_position": None,
                                  "rebuild_code_version": None, "updated_at": _now_us(store)}
        if position is not None and row.status != "failed":
            values.update(error=f"rebuild of generation {generation} stopped: {error_text(err)}",
                          failed_position=position)
        conn.execute(update(projections).where(projections.c.name == name).values(**values))
        conn.execute(delete(projection_rows).where(projection_rows.c.projection == name,
                                                   projection_rows.c.generation == generation))
    _log.error("projection_rebuild_failed", projection=name, generation=generation,
               position=position, error=error_text(err))


def _own_rebuild(conn: Connection, name: str, generation: int, position: int,
                 code_version: int) -> Any:
    """Lock the projection's row and check that this rebuild still owns ``generation`` at
    ``position``; raises :class:`RebuildInProgress` otherwise.

    Two rebuilds of one projection (two operators, or workers of a new code version each
    rebuilding at start-up) resume the same generation: whichever moves it first carries on,
    and the other stops before it writes a row, so it can neither overwrite rows the first
    one wrote nor, once the first has swapped that generation in, delete the live rows.
    """
    row = _lock_row(conn, name)
    if not _owns_rebuild(row, generation, position, code_version):
        raise RebuildInProgress(
            f"projection {name} is being rebuilt by another process (generation "
            f"{row.rebuild_generation if row.rebuild_generation is not None else generation})",
            reason="rebuilding")
    return row


def _owns_rebuild(row: Any, generation: int, position: int, code_version: int) -> bool:
    """Whether the projection's row still has the rebuild of ``generation`` where this one
    left it (at ``position``, folded by ``code_version``)."""
    return (row.rebuild_generation == generation and (row.rebuild_position or 0) == position
            and row.rebuild_code_version == code_version)


class UndecodableRow(msgspec.Struct, frozen=True, tag_field="undecodable_row", tag=True):
    """A live row's state that its projection cannot decode (damaged, or of another shape):
    its stored text (up to 200 characters) and the decode error.  (In JSON, an object with
    ``"undecodable_row": "UndecodableRow"``.)"""

    stored: str
    error: str


@dataclass(frozen=True)
class Difference:
    """One stream whose rebuilt row differs from the live row: in its state (``live`` and
    ``rebuilt``; ``None`` where one side has no row) or, with equal states, in the columns
    ``columns`` names (its version, or an index column: ``status``, ``group_key``,
    ``sort_key``), whose two values ``live_columns`` and ``rebuilt_columns`` give."""

    tenant_id: str
    stream_id: str
    live: Any
    rebuilt: Any
    columns: tuple[str, ...] = ()
    live_columns: tuple[Any, ...] = ()
    rebuilt_columns: tuple[Any, ...] = ()


def verify(store: EventStore, projection: Projection[Any], *,
           progress: ProgressFn | None = None) -> list[Difference]:
    """Rebuild into scratch rows and compare them with the live rows; returns the differences.

    A projection never run in this store has no rows to compare: none (and nothing written).
    A live row that does not decode differs, as an :class:`UndecodableRow`.
    """
    name = check_projection(projection).name
    with transaction(store, write=False) as conn:
        if _lock_row(conn, name, missing_ok=True) is None:
            return []
    # Negative: never an active generation; random: concurrent verifies never share rows.
    scratch = -1 - secrets.randbelow(2**31 - 2)
    _drop_abandoned_scratch(store, name)

    def live_position() -> int:
        with transaction(store, write=False) as c:
            return int(c.execute(select(projections.c.position)
                                 .where(projections.c.name == name)).scalar() or 0)

    try:
        last = _fill(store, projection, scratch, 0, live_position, progress, track=False)
        with transaction(store, write=True) as conn:
            _limit_waits(conn, _DEFAULT_STALL_MS)
            row = _lock_row(conn, name)
            rows: _Rows[Any] = _Rows(projection, scratch)
            _catch_up(store, conn, rows, last, row.position)
            rows.flush(conn, _machine_now_us())
            # Both sets of rows as they are under the lock; compared after it is let go.
            live, rebuilt = (_stored_rows(conn, name, row.generation),
                             _stored_rows(conn, name, scratch))
        return _compare(projection, live, rebuilt)
    finally:
        with transaction(store, write=True) as conn:
            conn.execute(delete(projection_rows).where(projection_rows.c.projection == name,
                                                       projection_rows.c.generation == scratch))


# A verify writes its scratch rows batch by batch; one whose newest row is this old was killed
# before its cleanup ran (SIGKILL skips the ``finally``).  A day: far longer than a verify goes
# without writing a row (a projection of rare events in a busy log) or clocks disagree.
_SCRATCH_ABANDONED_US = 24 * 3600 * 1_000_000


def _drop_abandoned_scratch(store: EventStore, name: str) -> None:
    """Delete the scratch rows of verifies that died before removing them."""
    pr = projection_rows.c
    stale = (select(pr.generation).where(pr.projection == name, pr.generation < 0)
             .group_by(pr.generation)
             .having(func.max(pr.updated_at) < _machine_now_us() - _SCRATCH_ABANDONED_US))
    with transaction(store, write=True) as conn:
        gone = conn.execute(delete(projection_rows).where(
            pr.projection == name, pr.generation.in_(stale.scalar_subquery()))).rowcount
    if gone:
        _log.info("projection_scratch_dropped", projection=name, rows=gone)


_COMPARED = ("version", "status", "group_key", "sort_key")  # besides the state


def _stored_bytes(state: Any) -> bytes:
    """A stored state as bytes: SQLite gives back text for a value written as TEXT into the
    BLOB column (an operator's ``UPDATE … SET state = replace(state, …)``), which the reads
    decode as it is."""
    return state.encode("utf-8", "surrogatepass") if isinstance(state, str) else bytes(state)


def _stored_rows(conn: Connection, name: str, generation: int
                 ) -> dict[tuple[str, str], tuple[bytes, tuple[Any, ...]]]:
    pr = projection_rows.c
    found = conn.execute(select(pr.tenant_id, pr.stream_id, pr.state,
                                *(pr[n] for n in _COMPARED))
                         .where(pr.projection == name, pr.generation == generation))
    return {(r.tenant_id, r.stream_id): (_stored_bytes(r.state), tuple(r[3:]))
            for r in found}


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same types, all the way down: Python's ``==`` takes ``1``, ``1.0``
    and ``True`` for one another, and a row where one became the other is a difference (it
    reads back as another type); NaN is the same as NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, msgspec.Struct):
        return all(_same(getattr(a, f), getattr(b, f)) for f in a.__struct_fields__)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return all(_same(getattr(a, f.name), getattr(b, f.name))
                   for f in dataclasses.fields(a))
    if isinstance(a, (set, frozenset)):
        return {(type(x), x) for x in a} == {(type(x), x) for x in b}
    if isinstance(a, float) and a != a:
        return bool(b != b)
    if isinstance(a, decimal.Decimal):  # 1.0 and 1.00 are equal, and differ
        return bool(a.as_tuple() == b.as_tuple())
    if isinstance(a, datetime):  # the same instant at another offset is another value
        return bool(a == b) and a.utcoffset() == b.utcoffset()
    return bool(a == b)


def _compare(projection: Projection[Any],
             live: dict[tuple[str, str], tuple[bytes, tuple[Any, ...]]],
             rebuilt: dict[tuple[str, str], tuple[bytes, tuple[Any, ...]]]
             ) -> list[Difference]:
    def decoded(raw: bytes) -> Any:
        try:
            return projection.decode(raw)
        except Exception as e:  # a damaged row: reported, not the end of the comparison
            return UndecodableRow(raw.decode("utf-8", "replace")[:200],
                                  f"{type_name(e)}: {error_text(e)}")

    out = []
    for key in sorted(set(live) | set(rebuilt)):
        a, b = live.get(key), rebuilt.get(key)
        da = decoded(a[0]) if a is not None else None
        db = decoded(b[0]) if b is not None else None
        if not (a is not None and b is not None and a[0] == b[0]) and not _same(da, db):
            out.append(Difference(key[0], key[1], da, db))
        elif a is not None and b is not None and a[1] != b[1]:
            differ = [i for i in range(len(_COMPARED)) if a[1][i] != b[1][i]]
            out.append(Difference(key[0], key[1], da, db, tuple(_COMPARED[i] for i in differ),
                                  tuple(a[1][i] for i in differ),
                                  tuple(b[1][i] for i in differ)))
    return out

