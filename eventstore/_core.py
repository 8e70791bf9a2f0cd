"""What the sync and the async store share: argument checks, the append transaction body,
paging, and the reads, all written against a SQLAlchemy ``Connection``.

:class:`eventstore.EventStore` runs these on a connection it opens; :class:`eventstore.aio.
AsyncEventStore` runs the very same functions inside ``AsyncConnection.run_sync`` (SQLAlchemy's
greenlet bridge over psycopg's async driver; ``_pg_async`` gives them psycopg's pipelines there)
or, on SQLite, on aiosqlite's thread, so the SQL exists once.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import decimal
import functools
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import msgspec
from sqlalchemy import Connection, bindparam, func, literal_column, select, true
from sqlalchemy import cast as sql_cast
from sqlalchemy.engine import URL, Dialect

from ._backend import APPEND_LOCK_ID, lock_appends
from ._pg_async import facade_of, is_async_psycopg
from ._schema import MAX_ID_LENGTH, events, streams
from ._sql import Compiled, as_uuid, read_query, statement, uuid_param
from ._time import from_micros, to_micros
from .codec import (
    decode_event,
    decode_events,
    decode_metadata,
    encode_checked,
    encode_metadata,
)
from .errors import (
    DatabaseError,
    EventDecodeError,
    EventStoreError,
    EventTooLarge,
    IdempotencyKeyReused,
    InvalidArgument,
    InvalidEvent,
    InvalidStreamId,
    StoreClosed,
    WrongExpectedVersion,
)
from .events import (
    ANY,
    STREAM_EXISTS,
    AppendResult,
    Event,
    ExpectedState,
    RawEvent,
    RecordedEvent,
    StreamSlice,
)
from .logs import get_logger

_log = get_logger("eventstore")
_MAX_RETRY_PAUSE = 5.0  # seconds a subscription waits at most between reads that fail

# PostgreSQL: whether an inline handler's row locks, taken under the append lock, must not wait
# (the append is in a transaction that can be run again; see RetryAppend).
_nowait: contextvars.ContextVar[bool] = contextvars.ContextVar("eventstore_nowait",
                                                              default=False)
# Whether an append that met a busy lock raises RetryAppend to its caller (a facade command,
# which then decides again) instead of running the same events again itself.
_decides_again: contextvars.ContextVar[bool] = contextvars.ContextVar("eventstore_decides_again",
                                                                     default=False)
_BUSY_PAUSE = 0.01, 0.25  # a wait's first pause between looks at a busy lock, and its longest


def locks_must_not_wait() -> bool:
    """For an inline handler on PostgreSQL: take a lock another transaction may hold with
    ``SKIP LOCKED``, and raise :class:`RetryAppend` when it is held (see there)."""
    return _nowait.get()


@contextlib.contextmanager
def deciding_again() -> Iterator[None]:
    """Appends in this block raise :class:`RetryAppend` when a lock was busy (after rolling
    back): the caller waits (:func:`wait_until_free`) and decides again."""
    token = _decides_again.set(True)
    try:
        yield
    finally:
        _decides_again.reset(token)


class RetryAppend(EventStoreError):
    """Raised by an inline handler whose lock is held by another transaction (a projector's
    batch; one frozen mid-batch holds it until the server ends its session).  Waiting for it
    under the append lock would hold every appender of the database, of every stream, behind
    that one: the append's transaction is rolled back instead, and the append waits until
    ``probe(conn)`` finds the lock free (looking now and then, on a connection taken for each
    look, outside any append), then runs again.  Never reaches the store's caller."""

    def __init__(self, what: str, probe: Callable[[Connection], str | None]) -> None:
        super().__init__(f"{what} is locked by another transaction; the append waits for it")
        self.probe = probe  # None when the lock is free, else who holds it


# Holders a wait saw in turn before it queues for the lock under the append lock: the lock
# changes hands (a projector catching up, batch after batch, leaving gaps too short to land
# in), so the wait there is one batch; one holder all along (frozen) is never queued behind.
_HOLDERS_BEFORE_QUEUEING = 3


class BusyWait:
    """One wait for a busy lock (:func:`wait_until_free`, and the async store's twin): the
    holders seen so far and the pause before the next look."""

    def __init__(self, busy: RetryAppend, **context: Any) -> None:
        _log.info("append_waits_for_lock", lock=str(busy), **context)
        self.pause = _BUSY_PAUSE[0]
        self.holders: set[str] = set()

    def pause_after(self, holder: str) -> float | None:
        """Seconds to pause before the next look at a lock ``holder`` holds; None when it
        changed hands often enough that the next attempt should queue for it."""
        self.holders.add(holder)
        if len(self.holders) >= _HOLDERS_BEFORE_QUEUEING:
            return None
        pause, self.pause = self.pause, min(self.pause * 2, _BUSY_PAUSE[1])
        return pause


def wait_until_free(busy: RetryAppend,
                    probe_on: Callable[[], contextlib.AbstractContextManager[Connection]],
                    **context: Any) -> bool:
    """Wait, outside any append, until ``busy``'s lock is free (see :class:`RetryAppend`);
    True when it kept changing hands instead: the next attempt should queue for it."""
    wait = BusyWait(busy, **context)
    while True:
        with probe_on() as conn:
            holder = busy.probe(conn)
        if holder is None:
            return False
        pause = wait.pause_after(holder)
        if pause is None:
            return True
        time.sleep(pause)

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
DEFAULT_TENANT = "default"
PAGE = 2000  # events a read fetches at a time, at most
# ... and about this many bytes of stored JSON: a page of large events is shorter (2,000 events
# near the 1 MiB limit took GBs of memory to read one).  A read's first page, before the size of
# its events is known, is FIRST_PAGE_BYTES / the store's event size limit long.
PAGE_BYTES = 8 * 1024 * 1024
FIRST_PAGE_BYTES = 128 * 1024 * 1024  # (128 events at the default limit: one query up to there)
_NO_END = 2**62

ExpectedVersion = int | ExpectedState | None
BeforeCommit = Callable[[Connection, Sequence[RecordedEvent]], None]


class InlineHandler(Protocol):
    """Called inside an append's transaction with the events it is about to commit.

    Raising aborts the append: the events and every row the handler wrote roll back together.

    A handler may also have a method ``writes_only(conn, recorded) -> bool``, returning true when,
    for these events, it only executes statements on the DBAPI cursor and never looks at their
    results (no rows, no ``rowcount``, no ``description``).  On PostgreSQL the store then runs it
    inside psycopg's pipeline with the append's own writes and the COMMIT, so the whole append
    is two round trips (see ``StoreCore._append_locked``), or one when the store knows the end
    of the log (``StoreCore._append_guessed``).  Its statements may then go out in an implicit
    transaction: if it raises after sending some, the store makes that transaction fail.

    Or a method ``prepare(conn, recorded) -> Callable[[Connection], None] | None``: it does the
    handler's reads (before the append's own rows are written, so it must not look for them) and
    returns the handler's writes, a function that only executes statements as above (``None``:
    nothing to write).  The store sends those writes with its own and the COMMIT.

    A handler with ``prepare`` may also have ``guess(conn, recorded)``, for the one-round-trip
    append: the same writes computed without reading, from what the handler remembers of the
    appends it saw commit, guarded so that a statement fails with division by zero (SQLSTATE
    22012) when that memory is stale; ``None``: it cannot say.  The store then falls back to
    the probing path, where ``prepare`` runs.  ``committed(recorded)``, if present, is called
    once the store knows that an append of these events committed (not after every commit:
    a handler must treat its memory as a guess).
    """

    def __call__(self, conn: Connection, recorded: Sequence[RecordedEvent]) -> None: ...


# -- argument checks ----------------------------------------------------------------------------


def check_id(value: object, what: str, error: type[InvalidArgument]) -> str:
    if not isinstance(value, str):
        raise error(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise error(f"{what} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise error(f"{what} is {len(value)} characters long, the limit is {MAX_ID_LENGTH}")
    return check_storable(value, what, error)


def check_storable(value: str, what: str, error: type[InvalidArgument]) -> str:
    """Text both databases store as it is: no NUL (PostgreSQL's text refuses it) and no lone
    surrogate (not UTF-8)."""
    if "\x00" in value:
        raise error(f"{what} must not contain NUL characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise error(f"{what} is not valid Unicode text (a lone surrogate?)") from e
    return value


MAX_INT = 2**63 - 1  # the largest integer both databases' columns and parameters hold


def check_int(value: object, what: str, *, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{what} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise InvalidArgument(f"{what} must be >= {minimum}, got {value}")
    if value > MAX_INT:
        raise InvalidArgument(f"{what} must be at most 2**63 - 1, got {value}")
    return value


def check_limit(limit: object) -> int | None:
    return None if limit is None else check_int(limit, "limit", minimum=0)


MAX_NAMES = 10_000  # categories or types one read may filter on


def check_names(values: object, what: str) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = (values,)
    if not isinstance(values, Iterable):
        raise InvalidArgument(f"{what} must be a list of strings")
    given = tuple(values)
    if not given:
        raise InvalidArgument(f"{what} must name at least one (None means no filter)")
    for v in given:
        check_id(v, what, InvalidArgument)
    out = tuple(dict.fromkeys(given))  # each once, in the order given
    if len(out) > MAX_NAMES:
        raise InvalidArgument(f"{what} names {len(out)} values; at most {MAX_NAMES} (each is a "
                              f"query parameter, and PostgreSQL takes 65,535 per statement)")
    return out


def category_of(stream_id: str) -> str:
    """The category of a stream id: the part before the first ``-`` (the whole id without one)."""
    return stream_id.split("-", 1)[0]


@dataclass(frozen=True)
class Options:
    """Settings shared by both stores, from arguments first, then ``EVENTSTORE_*`` variables."""

    max_event_bytes: int
    poll_interval: float
    clock: Callable[[], datetime] | None

    @classmethod
    def resolve(cls, *, max_event_bytes: int | None, poll_interval: float | None,
                clock: Callable[[], datetime] | None) -> Options:
        limit = max_event_bytes
        limit_name = "max_event_bytes"
        if limit is None:
            limit = _env_number("EVENTSTORE_MAX_EVENT_BYTES", int, DEFAULT_MAX_EVENT_BYTES)
            limit_name = "EVENTSTORE_MAX_EVENT_BYTES"  # the error names what to change
        check_int(limit, limit_name, minimum=1)
        poll_name = "poll_interval"
        if poll_interval is None:
            poll_interval = _env_number("EVENTSTORE_POLL_INTERVAL", float, 0.2)
            poll_name = "EVENTSTORE_POLL_INTERVAL"
        if isinstance(poll_interval, bool) or not isinstance(poll_interval, (int, float)) \
                or not 0 < poll_interval <= 0.5:
            raise InvalidArgument(f"{poll_name} must be in (0, 0.5] seconds, "
                                  f"got {poll_interval!r}")
        if clock is not None and not callable(clock):
            raise InvalidArgument(f"clock must be a callable returning a datetime, got {clock!r}")
        return cls(limit, poll_interval, clock)


_T = TypeVar("_T")


def no_stop_iteration(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)``, a ``StopIteration`` out of it raised as a ``RuntimeError`` (as out of a
    coroutine), for functions run on another thread for an event loop: a future refuses
    ``StopIteration``, and the caller waited for ever."""
    try:
        return fn(*args)
    except StopIteration as e:
        raise RuntimeError("a function run on a worker thread raised StopIteration") from e


def check_pool_size(pool_size: object) -> int | None:
    if pool_size is None:
        return None
    return check_int(pool_size, "pool_size", minimum=1)


def _env_number(name: str, kind: type[Any], default: Any) -> Any:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError as e:
        raise InvalidArgument(f"{name}={raw!r} is not a valid {kind.__name__}") from e


def auto_migrate(migrate: bool | None, sqlite: bool) -> bool:
    if migrate is not None:
        if not isinstance(migrate, int):  # bool, or 0 / 1
            raise InvalidArgument(f"migrate must be True, False or None, got {migrate!r}")
        return bool(migrate)
    env = os.environ.get("EVENTSTORE_AUTO_MIGRATE", "").strip().lower()
    if not env:
        return sqlite
    if env in _TRUE:
        return True
    if env in _FALSE:
        return False
    raise InvalidArgument(f"EVENTSTORE_AUTO_MIGRATE={env!r} is not one of "
                          f"{', '.join(_TRUE)} / {', '.join(_FALSE)}")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


# -- appending ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AppendPlan:
    """A checked, encoded append, ready to run in a transaction."""

    stream_id: str
    tenant_id: str
    reads: Sequence[Event | RawEvent]  # the events as reads of the log give them
    encoded: list[tuple[str, int, bytes]]
    meta_raw: bytes | None
    metadata: dict[str, Any]
    expected: int | ExpectedState
    key: str | None
    fingerprint: bytes
    now: datetime


class StoreCore:
    """State and logic common to :class:`EventStore` and :class:`AsyncEventStore`."""

    def __init__(self, options: Options) -> None:
        self._options = options
        self._closed = False
        self._inline: list[InlineHandler] = []
        self._tail = _Tail()

    _url: URL
    _engine: Any  # an Engine or an AsyncEngine

    @property
    def url(self) -> URL:
        return self._url

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return str(self._engine.dialect.name)

    def now(self) -> datetime:
        """The store's clock, in UTC (a clock giving naive times raises InvalidArgument)."""
        clock = self._options.clock
        if clock is None:
            return datetime.now(UTC)
        when = clock()
        if not isinstance(when, datetime) or when.utcoffset() is None:
            raise InvalidArgument(f"the store's clock must give timezone-aware datetimes, "
                                  f"got {when!r}")
        return when.astimezone(UTC)

    def add_inline_handler(self, handler: InlineHandler) -> None:
        """Run ``handler`` inside every append's transaction (read-your-writes projections)."""
        if handler not in self._inline:
            self._inline.append(handler)

    def remove_inline_handler(self, handler: InlineHandler) -> None:
        if handler in self._inline:
            self._inline.remove(handler)

    @property
    def inline_handlers(self) -> tuple[InlineHandler, ...]:
        return tuple(self._inline)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the event store is closed")

    def _plan_append(self, stream_id: object, events: object, expected_version: object,
                     idempotency_key: object, tenant_id: object, metadata: object) -> AppendPlan:
        """Check and encode everything before any I/O: bad input never reaches the database."""
        self._check_open()
        stream = check_id(stream_id, "stream id", InvalidStreamId)
        tenant = check_id(tenant_id, "tenant id", InvalidArgument)
        key = None
        if idempotency_key is not None:
            key = check_id(idempotency_key, "idempotency key", InvalidArgument)
        expected: int | ExpectedState
        if expected_version is None:
            expected = ANY
        elif isinstance(expected_version, ExpectedState):
            expected = expected_version
        else:
            expected = check_int(expected_version, "expected_version", minimum=0)
        if not isinstance(events, Sequence) or isinstance(events, (str, bytes)):
            one = " (a single event goes in a list of one)" if isinstance(
                events, (Event, RawEvent)) else ""
            raise InvalidEvent(f"events must be a list of Event instances{one}")
        if not events:
            raise InvalidEvent(f"empty batch for stream {stream}: append needs an event")
        encoded, meta_raw, reads = encode_within(events, metadata,
                                                 self._options.max_event_bytes)
        fingerprint = _fingerprint(stream, encoded) if key is not None else b""
        return AppendPlan(stream, tenant, reads, encoded, meta_raw,
                          metadata if isinstance(metadata, dict) else {}, expected, key,
                          fingerprint, self.now())

    @staticmethod
    def _retry_pause(err: DatabaseError, pager: Pager, pause: float) -> float:
        """The pause before a subscription reads again after ``err``, which is raised unless
        transient: 50 ms, doubling up to 5 s while the errors go on."""
        if not err.transient:
            raise err
        pause = min(max(pause * 2, 0.05), _MAX_RETRY_PAUSE)
        _log.warning("subscribe_retrying", position=pager.lo, error=str(err),
                     retry_in=round(pause, 3))
        return pause

    @staticmethod
    def _log_appended(plan: AppendPlan, result: AppendResult) -> None:
        _log.debug("events_appended", tenant=plan.tenant_id, stream=plan.stream_id,
                   position=result.last_position, version=result.stream_version,
                   count=len(plan.encoded), duplicate=result.duplicate)

    def _append_locked(self, conn: Connection, plan: AppendPlan,
                       before_commit: BeforeCommit | None, *, commit: bool = False,
                       nowait: bool = False) -> AppendResult:
        """The body of the append transaction (see ``_backend.lock_appends`` for the order).

        ``commit``: the transaction is the append's own, so on psycopg it may be committed here,
        in the pipeline of the writes (the caller's commit then finds nothing left to do).
        ``nowait`` (on PostgreSQL; only where the whole transaction can be run again): inline
        handlers raise :class:`RetryAppend` rather than wait for a lock under the append lock
        (see ``_append_own``).
        """
        token = _nowait.set(nowait and conn.dialect.name == "postgresql")
        try:
            return self._append_in(conn, plan, before_commit, commit)
        finally:
            _nowait.reset(token)

    def _append_own(self, begin: Callable[[], contextlib.AbstractContextManager[Connection]],
                    plan: AppendPlan, before_commit: BeforeCommit | None,
                    probe_on: Callable[[], contextlib.AbstractContextManager[Connection]]
                    ) -> AppendResult:
        """The append in a transaction of its own, ``begin()``; when an inline handler's lock
        was busy (:class:`RetryAppend`), run again once it is free (looked at in transactions
        of ``probe_on()``: not the kept write connection, so this process's other appends go
        on), at the store's time then; or, in :func:`deciding_again`, raised to the caller."""
        queue = False
        while True:
            try:
                with begin() as conn:
                    return self._append_locked(conn, plan, before_commit, commit=True,
                                               nowait=not queue)
            except RetryAppend as busy:
                if _decides_again.get():
                    raise
                queue = wait_until_free(busy, probe_on, tenant=plan.tenant_id,
                                        stream=plan.stream_id)
            plan = dataclasses.replace(plan, now=self.now())  # (recorded_at: at its commit)

    def _append_in(self, conn: Connection, plan: AppendPlan,
                   before_commit: BeforeCommit | None, commit: bool) -> AppendResult:
        psycopg_conn = _psycopg(conn)
        if (commit and psycopg_conn is not None and before_commit is None and plan.key is None
                and _idle_autocommit(psycopg_conn)):
            # Autocommit and idle: the implicit transaction below is the append's own, and
            # it has committed when the pipeline ends.
            guess = self._tail.guess(psycopg_conn, plan.tenant_id, plan.stream_id)
            if guess is not None:
                done = self._append_guessed(conn, psycopg_conn, plan, *guess)
                if done is not None:
                    return done
        dialect = conn.dialect
        stream_id, tenant_id, key = plan.stream_id, plan.tenant_id, plan.key
        ids = {"tenant_id": tenant_id, "stream_id": stream_id}
        with contextlib.ExitStack() as pipeline:
            # On psycopg the append is two round trips: BEGIN, the lock, the key lookup and the
            # probe; then the writes with the COMMIT (see below).  The server runs them in
            # order, so the probe's snapshot (READ COMMITTED: taken when the statement starts)
            # is taken after the lock is granted, as lock_appends requires.
            if psycopg_conn is not None:
                pipeline.enter_context(_psycopg_pipeline(psycopg_conn))
                if _idle_autocommit(psycopg_conn):
                    # The store's own write connection runs in autocommit mode so that its BEGIN
                    # goes out with the statements (psycopg's own BEGIN costs a round trip).
                    # At READ COMMITTED, whatever the database's default: the probe must see
                    # what committed while this transaction waited for the lock (see
                    # _backend.PG_ISOLATION, also the session's default).
                    _execute(psycopg_conn, "BEGIN ISOLATION LEVEL READ COMMITTED")
            lock_appends(conn)
            key_cur = None
            if key is not None:
                key_cur = statement("find_key", dialect).run(
                    conn, {"tenant_id": tenant_id, "key": key})
            probe_cur = statement("probe", dialect).run(conn, ids)
        # Leaving the pipeline synced it (the one round trip): the results are here.
        row = key_cur.fetchone() if key_cur is not None else None
        probed = probe_cur.fetchone()
        if key_cur is not None:
            key_cur.close()
        probe_cur.close()
        # Idempotency first: a retried request must get its first answer back, not a version
        # conflict caused by its own earlier success.
        if row is not None:
            first_stream, first_print, first_pos, last_pos, version = row
            if first_stream != stream_id or (
                    bytes(first_print) != plan.fingerprint
                    and bytes(first_print) != _stored_bytes_fingerprint(stream_id, plan.encoded)):
                raise IdempotencyKeyReused(key=key or "", tenant_id=tenant_id,
                                           stream_id=stream_id, first_stream_id=first_stream)
            return AppendResult(first_pos, last_pos, version, True)
        current: int = probed[0] or 0
        last_position: int = probed[1] or 0
        if commit:
            self._tail.probed(last_position)
        expected = plan.expected
        if (expected is STREAM_EXISTS and current == 0) or (
                isinstance(expected, int) and expected != current):
            _log.info("append_conflict", tenant=tenant_id, stream=stream_id,
                      expected=getattr(expected, "name", expected), actual=current)
            raise WrongExpectedVersion(stream_id=stream_id, tenant_id=tenant_id,
                                       expected=expected, actual=current)
        rows, recorded, stamp = _event_rows(plan, current, last_position, probed[2],
                                            dialect.name, bool(self._inline or before_commit))
        new_version = current + len(rows)
        result = AppendResult(last_position + 1, last_position + len(rows), new_version, False)
        # When the transaction is ours, the handlers' writes and the COMMIT join the append's
        # writes in one pipeline, provided every handler can say what it writes up front: it
        # only writes (writes_only), or it reads first and hands back its writes (prepare).  If
        # any statement fails, PostgreSQL skips the rest of the pipeline, COMMIT included, and
        # psycopg raises when the pipeline ends: nothing half-written, nothing swallowed.
        pipelined = commit and before_commit is None and psycopg_conn is not None
        if pipelined:
            kinds = [(h, _writes_only(h, conn, recorded)) for h in self._inline]
            pipelined = all(only or hasattr(h, "prepare") for h, only in kinds)
        late_writes: list[Callable[[Connection], None]] = []
        if pipelined:
            for handler, only in kinds:
                if only:
                    late_writes.append(functools.partial(_call, handler, recorded))
                else:
                    writes_of = handler.prepare(conn, recorded)  # type: ignore[attr-defined]
                    if writes_of is not None:
                        late_writes.append(writes_of)
        writes = []
        with _pipeline(conn):
            writes.extend(_write_events(conn, plan, rows, current, stamp))
            if key is not None:
                writes.append(statement("insert_key", dialect).run(conn, {
                    "tenant_id": tenant_id, "key": key, "stream_id": stream_id,
                    "fingerprint": plan.fingerprint, "first_position": result.first_position,
                    "last_position": result.last_position, "stream_version": new_version,
                    "recorded_at": stamp}))
            if pipelined:
                for write in late_writes:
                    write(conn)
                # A plain statement, not psycopg's commit(), which would sync once more; the
                # caller's commit then finds the transaction over and does nothing.
                _execute(psycopg_conn, "COMMIT")
        for cur in writes:
            cur.close()
        if pipelined:
            self._tail.committed(psycopg_conn, tenant_id, stream_id, new_version,
                                 result.last_position, stamp)
            self._committed(recorded)
        else:
            if commit:
                # Committed (or not) by the caller, after this returns: unknown here.
                self._tail.forget()
            for handler in self._inline:
                handler(conn, recorded)
            if before_commit is not None:
                before_commit(conn, recorded)
        return result

    def _committed(self, recorded: Sequence[RecordedEvent]) -> None:
        """Tell the inline handlers that care that the append of ``recorded`` has committed
        (called only where that is known: the append committed in its own pipeline)."""
        for handler in self._inline:
            committed = getattr(handler, "committed", None)
            if committed is not None:
                committed(recorded)

    def _append_guessed(self, conn: Connection, psycopg_conn: Any, plan: AppendPlan,
                        current: int, last_position: int, updated_at: int
                        ) -> AppendResult | None:
        """The append in one round trip, on what this process last committed (``_Tail``).

        The lock, the writes and the handlers' writes go out in one pipeline with no BEGIN and
        no COMMIT: PostgreSQL runs the statements up to the pipeline's sync as one implicit
        transaction.  Nothing is read: the guess that the log still ends at ``last_position``
        and the stream at version ``current`` is checked by the unique keys themselves.  Under
        the append lock, the event at ``last_position + 1`` can be inserted only if the log ends
        at ``last_position`` (positions are dense and never removed), and the stream's event
        ``current + 1`` only if the stream is at ``current`` (which it was, and versions only
        grow); then its last time is ``updated_at`` too.  A wrong guess (another process
        appended) breaks one of those keys, the transaction rolls back, and ``None`` sends the
        caller down the probing path.  A handler that must read first declines it too.
        """
        expected = plan.expected
        if isinstance(expected, int) and expected != current:
            return None  # the probing path raises, with the version it reads
        rows, recorded, stamp = _event_rows(plan, current, last_position, updated_at,
                                            conn.dialect.name, bool(self._inline))
        late_writes: list[Callable[[Connection], None]] = []
        for handler in self._inline:
            if _writes_only(handler, conn, recorded):
                late_writes.append(functools.partial(_call, handler, recorded))
                continue
            guess = getattr(handler, "guess", None)
            if guess is None:
                return None
            try:
                writes_of = guess(conn, recorded)
            except Exception:
                # Its memory may be stale (this is a guess): the probing path folds the events
                # onto the rows as they are, and raises there if the failure is real.
                return None
            if writes_of is None:
                return None
            late_writes.append(writes_of)
        writes: list[Any] = []

        def send() -> None:
            if len(rows) == 1:
                writes.append(_append_one(conn.dialect).run(conn, rows[0]))
            else:
                lock_appends(conn)
                writes.extend(_write_events(conn, plan, rows, current, stamp))
            for write in late_writes:
                write(conn)

        try:
            _in_implicit_transaction(psycopg_conn, send)
        except Exception as e:
            if not _stale_guess(e):
                self._tail.reset()  # unsure what the database holds now: learn it again
                raise
            _log.debug("append_guess_missed", tenant=plan.tenant_id, stream=plan.stream_id,
                       position=last_position)
            self._tail.missed()
            return None
        for cur in writes:
            cur.close()
        self._committed(recorded)
        new_version = current + len(rows)
        self._tail.committed(psycopg_conn, plan.tenant_id, plan.stream_id, new_version,
                             last_position + len(rows), stamp)
        return AppendResult(last_position + 1, last_position + len(rows), new_version, False)

    # -- reading ----------------------------------------------------------------------------------

    def _stream_pager(self, dialect: Dialect, stream_id: object, tenant_id: object,
                      from_version: object, to_version: object, backwards: object,
                      limit: object) -> Pager:
        self._check_open()
        stream = check_id(stream_id, "stream id", InvalidStreamId)
        tenant = check_id(tenant_id, "tenant id", InvalidArgument)
        lo = check_int(from_version, "from_version", minimum=0)
        hi = None if to_version is None else check_int(to_version, "to_version", minimum=0)
        if not isinstance(backwards, bool):
            raise InvalidArgument("backwards must be a bool")
        lim = check_limit(limit)
        if backwards and hi is None:
            hi = _NO_END  # backwards paging moves the upper bound down page by page
        query = read_query(dialect, by_stream=True, backwards=backwards, upper=hi is not None,
                           tenant=True, n_categories=0, n_types=0)
        return Pager(query, {"tenant_id": tenant, "stream_id": stream}, "version", lo, hi,
                     backwards, lim, self._first_page())

    def _all_pager(self, dialect: Dialect, from_position: object, limit: object,
                   categories: object, types: object, tenant_id: object) -> Pager:
        self._check_open()
        lim = check_limit(limit)
        start = check_int(from_position, "from_position", minimum=0)
        query, params = self._all_query(dialect, start, categories, types, tenant_id)
        return Pager(query, params, "position", start, None, False, lim, self._first_page())

    def _first_page(self) -> int:
        """Events a read's first page holds (see ``FIRST_PAGE_BYTES``)."""
        return min(PAGE, max(32, FIRST_PAGE_BYTES // self._options.max_event_bytes))

    def _all_query(self, dialect: Dialect, from_position: object, categories: object,
                   types: object, tenant_id: object, *, upper: bool = False
                   ) -> tuple[Compiled, dict[str, Any]]:
        check_int(from_position, "from_position", minimum=0)
        cats = check_names(categories, "categories")
        kinds = check_names(types, "types")
        params: dict[str, Any] = {}
        if tenant_id is not None:
            params["tenant_id"] = check_id(tenant_id, "tenant id", InvalidArgument)
        for i, c in enumerate(cats):
            params[f"cat{i}"] = c
        for i, t in enumerate(kinds):
            params[f"type{i}"] = t
        query = read_query(dialect, by_stream=False, backwards=False, upper=upper,
                           tenant=tenant_id is not None, n_categories=len(cats),
                           n_types=len(kinds))
        return query, params

    def _fetch_on(self, conn: Connection, query: Compiled, params: dict[str, Any], *,
                  partial: bool = False) -> list[RecordedEvent]:
        """A page of events.  An event that does not decode raises, naming it; with
        ``partial``, the events before it come first (a :class:`PartialPage`: the next page,
        which starts at that event, raises)."""
        cur = query.run(conn, params, binary=True)
        rows = cur.fetchall()
        cur.close()
        if not rows:
            return Page()
        cols = tuple(zip(*rows, strict=True))
        out = Page()
        # Pages are sized by what they hold: data and metadata (up to the event limit each).
        out.nbytes = sum(map(len, cols[7])) + sum(len(m) for m in cols[8] if m is not None)
        try:
            data = decode_events(cols[5], cols[6], cols[7])
        except EventDecodeError as e:
            data, error = _decodable_prefix(rows)
            if error is None:  # (every row decodes alone: not expected)
                raise
            if not partial or not data:
                raise error from e
            rows, out = rows[:len(data)], PartialPage()
        last_at, when = None, None
        for (pos, tenant, stream_id, version, event_id, tag, sv, _raw, meta, at), event in zip(
                rows, data, strict=True):
            if at != last_at:  # the events of one batch share their time: convert it once
                last_at, when = at, from_micros(at)
            try:
                meta_dict = decode_metadata(meta)
            except EventDecodeError as e:
                error = EventDecodeError.at(e, position=pos, type=tag, stream_id=stream_id,
                                            tenant_id=tenant)
                if not partial or not out:
                    raise error from e
                short = PartialPage(out)
                short.nbytes = out.nbytes
                return short
            out.append(RecordedEvent(pos, stream_id, version, tenant, as_uuid(event_id), tag,
                                     sv, event, meta_dict, when))  # type: ignore[arg-type]
        return out

    def iter_slices_on(self, conn: Connection, stream_id: str, tenant_id: str, lo: int,
                       hi: int | None, page: int) -> Iterator[StreamSlice]:
        """One stream's events from version ``lo`` to ``hi`` as slices of up to ``page``.

        On psycopg (sync) the query for the next page goes out, in a pipeline, before the
        current page is decoded, so the server reads ahead while this process decodes and folds.
        The stream and tenant ids must already be checked (the engine's live fold does).
        """
        query = statement("read_slice", conn.dialect)
        params = {"tenant_id": tenant_id, "stream_id": stream_id,
                  "hi": _NO_END if hi is None else hi, "page": page}

        def send(start: int) -> Any:
            return query.run(conn, {**params, "lo": start}, binary=True)

        def fetch(cur: Any) -> list[Any]:
            rows: list[Any] = cur.fetchall()
            cur.close()
            return rows

        def columns(rows: list[Any]) -> StreamSlice:
            versions, tags, svs, raws, at, _positions = zip(*rows, strict=True)
            try:
                data = decode_events(tags, svs, raws)
            except EventDecodeError as e:  # name the event, as a read of records does
                for _version, tag, sv, raw, _at, position in rows:
                    try:
                        decode_event(tag, sv, raw)
                    except EventDecodeError as bad:
                        raise EventDecodeError.at(bad, position=position, type=tag,
                                                  stream_id=stream_id,
                                                  tenant_id=tenant_id) from e
                raise
            return StreamSlice(tenant_id, stream_id, versions, tags, data, at)

        rows = fetch(send(lo))
        if len(rows) < page:  # one page (a tail after a snapshot, a short stream): no pipeline
            if rows:
                yield columns(rows)
            return
        with _pipeline(conn):
            while True:
                ahead = send(rows[-1][0] + 1) if len(rows) == page else None
                yield columns(rows)
                if ahead is None:
                    return
                rows = fetch(ahead)
                if not rows:
                    return

    def read_page(
        self,
        conn: Connection,
        *,
        from_position: int,
        limit: int,
        categories: Iterable[str] | None = None,
        tenant_id: str | None = None,
        to_position: int | None = None,
    ) -> list[RecordedEvent]:
        """One page of the log read on ``conn``, inside the caller's transaction (events up
        to ``to_position`` when given, inclusive).

        For projectors, which must read events and write their rows and checkpoint in one
        transaction.
        """
        query, params = self._all_query(conn.dialect, from_position, categories, None,
                                        tenant_id, upper=to_position is not None)
        params.update(lo=from_position, page=limit)
        if to_position is not None:
            params["hi"] = to_position
        return self._fetch_on(conn, query, params)

    def _stream_version_on(self, conn: Connection, stream_id: object, tenant_id: object) -> int:
        stream = check_id(stream_id, "stream id", InvalidStreamId)
        tenant = check_id(tenant_id, "tenant id", InvalidArgument)
        v = conn.execute(select(streams.c.version).where(
            streams.c.tenant_id == tenant, streams.c.stream_id == stream)).scalar()
        return int(v or 0)

    @staticmethod
    def _last_position_on(conn: Connection) -> int:
        return int(conn.execute(select(func.max(events.c.position))).scalar() or 0)

    @staticmethod
    def _stats_on(conn: Connection, tenant_id: object) -> dict[str, int]:
        ev_q = select(func.count(), func.max(events.c.position))
        st_q = select(func.count(), func.count(streams.c.tenant_id.distinct()))
        if tenant_id is not None:
            tenant = check_id(tenant_id, "tenant id", InvalidArgument)
            ev_q = ev_q.where(events.c.tenant_id == tenant)
            st_q = st_q.where(streams.c.tenant_id == tenant)
        # One statement (one snapshot on PostgreSQL, where reads run in autocommit): counts
        # read by two could pair events of one moment with streams of another.
        ev_sq = ev_q.select_from(events).subquery()
        st_sq = st_q.select_from(streams).subquery()
        count, last, n_streams, n_tenants = conn.execute(
            select(*ev_sq.c, *st_sq.c).select_from(ev_sq.join(st_sq, true()))).one()
        return {"events": int(count), "streams": int(n_streams), "tenants": int(n_tenants),
                "last_position": int(last or 0)}


@dataclass
class Pager:
    """Where a paged read stands: the next page's parameters, and moving past a page."""

    query: Compiled
    params: dict[str, Any]
    key: str  # "version" or "position": the column pages move along
    lo: int
    hi: int | None
    backwards: bool
    remaining: int | None
    size: int = PAGE  # events the next page asks for (see PAGE_BYTES)

    def next_params(self) -> dict[str, Any] | None:
        """Parameters of the next page, or ``None`` when the read is complete."""
        if self.remaining is not None and self.remaining <= 0:
            return None
        page = self.size if self.remaining is None else min(self.size, self.remaining)
        return {**self.params, "lo": self.lo, "hi": self.hi, "page": page}

    def resize(self, batch: Sequence[RecordedEvent]) -> None:
        """Size the next page after this one's events: about ``PAGE_BYTES`` of them."""
        nbytes = getattr(batch, "nbytes", 0)
        if batch and nbytes:
            self.size = max(1, min(PAGE, PAGE_BYTES * len(batch) // nbytes))

    def advance(self, batch: Sequence[RecordedEvent], page: int) -> bool:
        """Move past ``batch``; returns whether more may follow."""
        self.resize(batch)
        if len(batch) < page and not isinstance(batch, PartialPage):
            return False
        if self.remaining is not None:
            self.remaining -= len(batch)
        last = getattr(batch[-1], self.key)
        if self.backwards:
            self.hi = last - 1
        else:
            self.lo = last + 1
        return True


# The unique keys that a stale guess of the log's end breaks (see _append_guessed).
_GUESS_KEYS = frozenset({"es_events_pkey", "es_events_stream_version"})


class Page(list):  # type: ignore[type-arg]
    """A page of events, and the bytes of stored JSON they came from (for the next page's
    size)."""

    nbytes: int = 0


class PartialPage(Page):
    """The events of a page before one that does not decode: more follow (the next page
    starts at that event, and raises), though the page is short."""


def _decodable_prefix(rows: Sequence[Any]
                      ) -> tuple[list[Event | RawEvent], EventDecodeError | None]:
    """The events of ``rows`` before the first that does not decode, and that one's decode
    error, naming the event (``None`` if every row decodes)."""
    decoded: list[Event | RawEvent] = []
    for pos, tenant, stream_id, _version, _event_id, tag, sv, raw, *_rest in rows:
        try:
            decoded.append(decode_event(tag, sv, raw))
        except EventDecodeError as e:
            return decoded, EventDecodeError.at(e, position=pos, type=tag,
                                                stream_id=stream_id, tenant_id=tenant)
    return decoded, None


def _stale_guess(error: Exception) -> bool:
    """Whether the one-round-trip append failed because what it guessed was stale: one of the
    unique keys above, or a handler's guard (``InlineHandler.guess``: division by zero).  The
    driver's error, also when a handler's statement through SQLAlchemy met it (its ``orig``)."""
    error = getattr(error, "orig", None) or error
    if getattr(getattr(error, "diag", None), "constraint_name", None) in _GUESS_KEYS:
        return True
    return getattr(error, "sqlstate", None) == "22012"


def _event_rows(plan: AppendPlan, current: int, last_position: int, updated_at: int | None,
                dialect_name: str, handed: bool
                ) -> tuple[list[dict[str, Any]], list[RecordedEvent], int]:
    """The event rows and records of an append after ``last_position`` and stream version
    ``current``; and its time, never before the stream's last (``updated_at``).

    ``handed``: the records go to inline handlers or a hook, which get each its own metadata
    as readers will (decoded from what is stored: a datetime as its ISO string, a tuple as a
    list), so inline rows and a rebuild fold the same values.
    """
    now = plan.now
    stamp = to_micros(now)
    if updated_at is not None and stamp < updated_at:
        # A stream's times never go back: the clock was read before the lock, so a
        # concurrent append (or a clock stepping back) could otherwise commit an earlier
        # time after a later one, and "the stream as of time T" would not be a prefix.
        stamp = updated_at
        now = from_micros(stamp)
    stream_id, tenant_id = plan.stream_id, plan.tenant_id
    category = category_of(stream_id)
    rows = []
    recorded = []
    for i, (tag, schema_version, raw) in enumerate(plan.encoded, start=1):
        event_id = uuid.uuid4()
        rows.append({
            "position": last_position + i, "tenant_id": tenant_id,
            "stream_id": stream_id, "category": category, "version": current + i,
            "event_id": uuid_param(event_id, dialect_name), "type": tag,
            "schema_version": schema_version, "data": raw, "metadata": plan.meta_raw,
            "recorded_at": stamp,
        })
        recorded.append(RecordedEvent(
            last_position + i, stream_id, current + i, tenant_id, event_id, tag,
            schema_version, plan.reads[i - 1],
            decode_metadata(plan.meta_raw) if handed else plan.metadata, now,
        ))
    return rows, recorded, stamp


def _write_events(conn: Connection, plan: AppendPlan, rows: list[dict[str, Any]], current: int,
                  stamp: int) -> list[Any]:
    """Insert the event rows and create or move the stream's row; returns open cursors."""
    dialect = conn.dialect
    ids = {"tenant_id": plan.tenant_id, "stream_id": plan.stream_id}
    writes = []
    insert = statement("insert_events", dialect)
    if len(rows) == 1:
        writes.append(insert.run(conn, rows[0]))
    else:
        insert.run_many(conn, rows)
    new_version = current + len(rows)
    if current == 0:
        writes.append(statement("insert_stream", dialect).run(conn, {
            **ids, "version": new_version, "created_at": stamp, "updated_at": stamp}))
    else:
        writes.append(statement("update_stream", dialect).run(conn, {
            **ids, "new_version": new_version, "updated_at": stamp}))
    return writes


_append_one_pg: Compiled | None = None


def _append_one(dialect: Dialect) -> Compiled:
    """PostgreSQL: one statement that takes the append lock, inserts one event row and moves
    its stream's row (which must exist) to the event's version and time.

    The lock comes first because the insert reads from it, and the update second because it
    reads the insert's result; the event row's parameters are those of ``insert_events``.
    """
    global _append_one_pg
    if _append_one_pg is None:
        lock = select(func.pg_advisory_xact_lock(literal_column(str(APPEND_LOCK_ID)))
                      .label("locked")).cte("append_lock")
        row = select(*[sql_cast(bindparam(c.name), c.type) for c in events.c]).select_from(lock)
        appended = (events.insert().from_select([c.name for c in events.c], row)
                    .returning(events.c.version).cte("appended"))
        stmt = (streams.update()
                .where(streams.c.tenant_id == bindparam("tenant_id"),
                       streams.c.stream_id == bindparam("stream_id"),
                       streams.c.version < appended.c.version)
                .values(version=appended.c.version, updated_at=bindparam("recorded_at")))
        _append_one_pg = Compiled(stmt, dialect)
    return _append_one_pg


class _Tail:
    """What this process last committed on PostgreSQL: the log's last position and, for recent
    streams, their version and last time; the guess of :meth:`StoreCore._append_guessed`.

    Only committed facts go in (positions and versions never go back, so a fact may grow stale
    but never wrong the other way).  ``contended``: the last probe found another process's
    events after ours, so guessing would mostly miss; the next probe that finds none resumes it.

    The facts hold for the database the connection that learned them talks to: a new write
    connection (after a failover or a restore, the database may have lost commits, and then
    positions do go back) starts from nothing, and so does any failure of a guessed append
    other than a stale guess.
    """

    MAX_STREAMS = 4096

    def __init__(self) -> None:
        self.conn: Any = None  # the connection the facts were learned on
        self.position: int | None = None
        self.streams: collections.OrderedDict[tuple[str, str], tuple[int, int]] = (
            collections.OrderedDict())
        self.contended = False

    def guess(self, conn: Any, tenant_id: str, stream_id: str) -> tuple[int, int, int] | None:
        if self.contended or self.position is None or conn is not self.conn:
            return None
        known = self.streams.get((tenant_id, stream_id))
        if known is None:
            return None
        return known[0], self.position, known[1]

    def probed(self, last_position: int) -> None:
        self.contended = self.position is not None and last_position != self.position

    def committed(self, conn: Any, tenant_id: str, stream_id: str, version: int,
                  position: int, stamp: int) -> None:
        if conn is not self.conn:
            self.reset()
            self.conn = conn
        self.position = position
        key = (tenant_id, stream_id)
        streams = self.streams
        streams[key] = (version, stamp)
        streams.move_to_end(key)
        if len(streams) > self.MAX_STREAMS:
            streams.popitem(last=False)

    def missed(self) -> None:
        # The position stays: still a committed fact, and the next probe compares against it.
        self.contended = True

    def forget(self) -> None:
        self.position = None

    def reset(self) -> None:
        self.conn = None
        self.position = None
        self.streams.clear()
        self.contended = False


def encode_within(events: Sequence[object], metadata: object, limit: int
                  ) -> tuple[list[tuple[str, int, bytes]], bytes | None, list[Event | RawEvent]]:
    """The events and metadata encoded, each checked against the size ``limit``; and the
    events as reads of the log will give them (see :func:`codec.encode_checked`)."""
    meta_raw = encode_metadata(metadata)
    encoded = []
    reads = []
    for ev in events:
        tag, sv, raw, read = encode_checked(ev)
        if len(raw) > limit:
            raise _too_large(tag, len(raw), limit)
        encoded.append((tag, sv, raw))
        reads.append(read)
    if meta_raw is not None and len(meta_raw) > limit:
        raise _too_large("metadata", len(meta_raw), limit)
    return encoded, meta_raw, reads


def _too_large(what: str, size: int, limit: int) -> InvalidEvent:
    return EventTooLarge(f"{what} is {size} bytes encoded, over the limit of {limit} bytes",
                         size=size, limit=limit)


# The stored data's canonical form (see _fingerprint): any JSON value as plain Python, its
# numbers exact (a float as the Decimal of its digits), then encoded back with object keys in
# one order and those numbers as they were written.
_any_json = msgspec.json.Decoder(float_hook=decimal.Decimal)
_canonical = msgspec.json.Encoder(order="sorted", decimal_format="number")


def _fingerprint(stream_id: str, encoded: list[tuple[str, int, bytes]]) -> bytes:
    """What an idempotency key's append is compared by: the stream and each event's type,
    schema version and stored JSON, canonical: object keys in one order (nested ones, and those
    inside a ``msgspec.Raw``, too), numbers as written, and a ``type`` tag where the data has
    none (a ``RawEvent`` of a type is stored without it, the typed event with it).  It depends
    on the stored bytes only, never on whether this process knows the type: the retry may come
    from one that does not (the command line, another release).  (An object that repeats a key
    counts by its last value, as JSON readers take it.)"""
    return _digest(b"v3\x00" + stream_id.encode(),
                   [(tag, sv, _canonical_json(tag, raw)) for tag, sv, raw in encoded])


def _canonical_json(tag: str, raw: bytes) -> bytes:
    try:
        value = _any_json.decode(raw)
        if isinstance(value, dict) and "type" not in value:
            value["type"] = tag
        return _canonical.encode(value)
    except (msgspec.DecodeError, TypeError, ValueError, OverflowError, RecursionError):
        return raw  # (checked JSON: not expected)


def _stored_bytes_fingerprint(stream_id: str, encoded: list[tuple[str, int, bytes]]) -> bytes:
    """The fingerprint of keys recorded by earlier code (the stored bytes as they were): a
    retry across an upgrade is still a duplicate."""
    return _digest(stream_id.encode(), encoded)


def _digest(seed: bytes, encoded: Iterable[tuple[str, int, bytes]]) -> bytes:
    h = hashlib.sha256(seed)
    for tag, sv, data in encoded:
        h.update(b"\x00%s\x00%d\x00%d\x00" % (tag.encode(), sv, len(data)))
        h.update(data)
    return h.digest()


def _psycopg(conn: Connection) -> Any:
    """The psycopg connection under ``conn`` (on the async driver, its sync facade, see
    :mod:`eventstore._pg_async`), else ``None``."""
    pooled = conn.connection
    dbapi: Any = pooled.dbapi_connection
    if conn.dialect.name != "postgresql":
        return None
    if type(dbapi).__module__.startswith("psycopg"):
        return dbapi
    if is_async_psycopg(dbapi):
        return facade_of(pooled.driver_connection)
    return None


_IDLE = 0  # libpq's PQTRANS_IDLE: no transaction open


def _idle_autocommit(dbapi: Any) -> bool:
    """Whether a psycopg connection is in autocommit mode with no transaction open (so a
    pipeline's statements are a transaction of their own)."""
    return bool(dbapi.autocommit) and dbapi.pgconn.transaction_status == _IDLE


def _pipeline(conn: Connection) -> contextlib.AbstractContextManager[Any]:
    """psycopg's pipeline mode (statements sent together; on the async driver through
    ``_pg_async``'s facade), else nothing.

    Inside a pipeline already, nothing: leaving a nested pipeline would sync (a round trip).
    """
    dbapi = _psycopg(conn)
    if dbapi is not None and not dbapi.pgconn.pipeline_status:
        return _psycopg_pipeline(dbapi)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _psycopg_pipeline(dbapi: Any) -> Iterator[Any]:
    """``dbapi.pipeline()``, keeping psycopg's prepared statements in step when it fails.

    psycopg prepares a statement on the server the fifth time it runs.  When that run is in a
    pipeline that fails, psycopg can count the statement as prepared though the server does
    not have it, and its next run fails ("prepared statement does not exist"; seen with
    psycopg 3.3 in tests/test_append_path.py).
    psycopg forgets its prepared statements, and deallocates them, on ``rollback()``; a
    failure that left no transaction to roll back (autocommit, a pipeline's implicit
    transaction) gets one opened here for that ``rollback()`` to end.

    A pipeline whose end was interrupted (a cancelled task, Ctrl-C) can leave libpq in pipeline
    mode, results uncollected, while psycopg takes the pipeline as over: each later statement
    on that connection would read the result of another.  Such a connection is closed here, so
    that its owner (the pool, the store's writer) replaces it.
    """
    nested = bool(dbapi.pgconn.pipeline_status)
    try:
        with dbapi.pipeline() as p:
            _exit_without_flush(p)
            yield p
    except BaseException as e:
        if not nested and not dbapi.closed and dbapi.pgconn.pipeline_status:
            dbapi.pgconn.finish()  # left in pipeline mode: closed, for its owner to replace
        elif not isinstance(e, GeneratorExit):  # (a reader that stopped early: no failure)
            _forget_prepared(dbapi)
        raise


def _exit_without_flush(pipeline: Any) -> None:
    """Have psycopg end ``pipeline`` with a Sync alone, not a Sync and then a Flush request.

    Why: PostgreSQL arms ``idle_in_transaction_session_timeout`` when it answers a Sync, and
    disarms it on the next message, a Flush included, until the next Sync.  psycopg asks for a
    Flush at the end of a pipeline whose results have not all come yet (nearly always), so a
    transaction left idle after a pipeline (an appender frozen between its two round trips,
    holding the append lock) was never ended.  The Sync alone makes the server send every
    result.  libpq's output buffer is still sent whole before the results are awaited: a large
    statement (an event of tens of MB) does not fit the socket at once, and psycopg's exit sends
    the rest along with its Flush request (without it, both sides waited for ever).  (psycopg's
    own steps, when it has them: else its exit as it is.)"""
    steps = ("_enqueue_sync", "_communicate_gen", "_fetch_gen")
    send = _psycopg_send()
    if send is None or not all(callable(getattr(pipeline, name, None)) for name in steps) \
            or not hasattr(pipeline, "command_queue"):
        return

    def exit_gen() -> Iterator[Any]:
        synced = False
        try:
            pipeline._enqueue_sync()
            synced = True
            yield from pipeline._communicate_gen()
        except IndexError as lost:
            # The server refused the implicit transaction's commit, and its error came in one
            # read with the results before it: psycopg took it for the Sync's result (keeping
            # the error to raise once the read is done), then found nothing queued for the
            # Sync's own and failed on that.  Its traceback still has the error it kept.
            kept = _kept_server_error(lost)
            if kept is None:
                raise
            raise kept from lost
        finally:
            # An interrupt (Ctrl-C) before the Sync was queued: no result will come, and the
            # wait below would never end (holding the append lock); the connection, left in
            # pipeline mode, is closed by _psycopg_pipeline.  One during the sending: psycopg's
            # queued sends (the Sync among them) go to libpq first, in order.
            if synced:
                queued = pipeline.command_queue
                while queued:
                    queued.popleft()()
                yield from send(pipeline.pgconn)
                yield from pipeline._fetch_gen(flush=False)

    pipeline._exit_gen = exit_gen


@functools.cache
def _psycopg_send() -> Any:
    """psycopg's generator that sends libpq's output buffer whole (None: not found)."""
    try:
        from psycopg import generators
    except ImportError:  # pragma: no cover - a pipeline means psycopg is there
        return None
    return getattr(generators, "send", None)


def _forget_prepared(dbapi: Any) -> None:
    if dbapi.closed or dbapi.pgconn.transaction_status != _IDLE:  # rollback() will
        return
    try:
        dbapi.execute("BEGIN", prepare=False)  # not a prepared statement: it may be the lost one
        dbapi.rollback()
    except Exception:
        dbapi.close()  # unsure of its state: the owner replaces a closed connection


def _execute(dbapi: Any, sql: str) -> None:
    cur = dbapi.cursor()
    cur.execute(sql)
    cur.close()


# Fails on the server, so that the transaction it is part of rolls back.
_ABANDON_SQL = "SELECT 1/0 AS abandon_append"


def _in_implicit_transaction(dbapi: Any, send: Callable[[], None]) -> None:
    """Run ``send`` (statements, results unread) in one psycopg pipeline on an autocommit
    connection: the statements up to the pipeline's sync are one implicit transaction, which
    the sync commits, or rolls back if any statement failed (psycopg then raises).

    The sync comes even when ``send`` raises in Python after some statements went out (psycopg
    leaves the pipeline that way), and it would commit them: so a statement that fails goes out
    first, the sync rolls back, and ``send``'s own error is raised.  Should even that statement
    not go out, the connection is closed instead, which also rolls back.
    """
    failed: BaseException | None = None
    try:
        with _psycopg_pipeline(dbapi):
            try:
                send()
            except BaseException as exc:
                failed = exc
                try:
                    _execute(dbapi, _ABANDON_SQL)
                except Exception as abandon_error:
                    if type(abandon_error).__name__ != "PipelineAborted":
                        dbapi.close()  # the server rolls back a client that went away
    except Exception as e:
        if failed is None:
            refused = _refused_commit(e)
            # (The server's error recovered from psycopg's IndexError: _exit_without_flush.)
            if refused is not None or isinstance(e.__cause__, IndexError):
                dbapi.close()  # psycopg lost count of the pipeline's results: a new connection
            if refused is None:
                raise
            raise refused from e
    if failed is not None:
        raise failed


def _refused_commit(error: Exception) -> Exception | None:
    """The server's error when the implicit transaction's commit failed (a deferred constraint
    or trigger that an inline handler's write broke); else None.

    Why: the server answers such a commit with one result more than psycopg's pipeline
    expects (the error, when the Sync comes), and psycopg then fails on its own bookkeeping:
    an ``IndexError``, or "cannot exit pipeline mode while busy" over the server's error.
    Either way the server rolled the implicit transaction back.
    """
    if getattr(error, "sqlstate", None):
        return None  # the server's own answer, as psycopg reported it
    cause = error.__context__
    while cause is not None:
        if getattr(cause, "sqlstate", None):
            return cause if isinstance(cause, Exception) else None
        cause = cause.__context__
    if isinstance(error, IndexError):
        return DatabaseError(
            "the database refused to commit the append (a deferred constraint or a trigger "
            "failing at commit, as an inline handler's write may); nothing was written, and "
            "the driver could not read the server's reason")
    return None


def _kept_server_error(error: BaseException) -> Exception | None:
    """The server error (one with a SQLSTATE) a frame of ``error``'s traceback holds in a
    local named ``exception``, as psycopg's pipeline keeps one while it reads a batch of
    results (psycopg 3.1 to 3.3); else None."""
    tb = error.__traceback__
    kept = None
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("exception")
        if isinstance(candidate, Exception) and getattr(candidate, "sqlstate", None):
            kept = candidate
        tb = tb.tb_next
    return kept


def _call(handler: InlineHandler, recorded: Sequence[RecordedEvent], conn: Connection) -> None:
    handler(conn, recorded)


def _writes_only(handler: InlineHandler, conn: Connection,
                 recorded: Sequence[RecordedEvent]) -> bool:
    check = getattr(handler, "writes_only", None)
    return check is not None and bool(check(conn, recorded))
