"""``AsyncEventStore``: the store for asyncio applications, with the same API and guarantees.

Native on both backends: psycopg's async driver on PostgreSQL, aiosqlite on SQLite, both through
SQLAlchemy's asyncio extension.  The SQL is not written twice: every transaction body is the
sync store's own code (:mod:`eventstore._core`).  On PostgreSQL it runs with
``AsyncConnection.run_sync``, on SQLAlchemy's greenlet bridge, where :mod:`eventstore._pg_async`
lets it drive psycopg's async pipelines (an append is one or two round trips, as on the sync
store).  On SQLite it runs whole on the pooled aiosqlite connection's own thread
(:class:`_SQLiteThreadTransactions`).  Neither blocks the event loop, and inline projection
handlers work unchanged in both stores.

::

    store = await AsyncEventStore.open("postgresql+psycopg://app@db/app")
    await store.append("conversation-42", [NoteAdded(text="hi")], expected_version=0)
    async for ev in store.read_stream("conversation-42"):
        ...
    async for ev in store.subscribe(from_position=1, stop=stop):  # an asyncio.Event
        ...
    await store.close()
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncTransaction,
    create_async_engine,
)
from sqlalchemy.pool import AsyncAdaptedQueuePool, StaticPool
from sqlalchemy.util.concurrency import await_only
from sqlalchemy.util.queue import Empty as PoolQueueEmpty
from sqlalchemy.util.queue import Full as PoolQueueFull

from . import _migrate
from ._backend import (
    _FILE_KEY,
    PG_ISOLATION,
    _begin,
    _broken,
    _sqlite_listeners,
    _sqlite_settings,
    close_when_retired,
    end_transaction,
    explained_open_error,
    hung_up,
    is_retired,
    is_sqlite,
    missing_extra,
    one_trip_possible,
    pg_connect_args,
    pg_listeners,
    refuse_orphaned_wal,
    resolve_url,
    retire,
    shown_url,
    sqlite_file,
    translate,
)
from ._core import (
    DEFAULT_TENANT,
    AppendPlan,
    BeforeCommit,
    BusyWait,
    ExpectedVersion,
    Options,
    Pager,
    PartialPage,
    RetryAppend,
    StoreCore,
    auto_migrate,
    check_pool_size,
    no_stop_iteration,
)
from ._sql import Compiled
from .errors import DatabaseError, InvalidArgument, StoreClosed
from .events import ANY, AppendResult, Event, RawEvent, RecordedEvent
from .logs import get_logger

__all__ = ["AsyncEventStore"]

_log = get_logger("eventstore")
T = TypeVar("T")

StopEvent = asyncio.Event | threading.Event


class AsyncEventStore(StoreCore):
    """An append-only event log for asyncio code; see :class:`eventstore.EventStore`.

    Safe to share between the tasks of an event loop, and between event loops (``asyncio.run``
    per job, a loop per thread).
    """

    _engine: AsyncEngine

    def __init__(self, engine: AsyncEngine, url: URL, options: Options) -> None:
        super().__init__(options)
        self._engine = engine
        self._url = url
        self._sqlite = _SQLiteThreadTransactions(url) if is_sqlite(url) else None
        # An in-memory SQLite database is one connection that every transaction shares.
        self._writer = None if self._sqlite is not None and self._sqlite.memory else (
            _KeptWriter(engine, sqlite=self._sqlite is not None))
        self._released = False  # close() has released every connection
        self._preparations: list[Preparation] = []

    def prepare_before_use(self, fn: Callable[[], None]) -> Preparation:
        """Run the sync ``fn()`` once, on a worker thread, before the next call that appends
        or runs a transaction (``append``, ``append_with``, ``run_sync``, ``run_read``); those
        calls wait for it, and the event loop does not.

        Why: an inline projection whose rows an older fold built is rebuilt before it is used
        (``projections.inline``): a replay of the log, too long to run on the event loop, and
        a facade's constructor cannot wait for it.

        If ``fn`` raises a transient :class:`DatabaseError` (or is cancelled), the call that
        waited raises it and the next call tries again.  Any other error is final: it is
        logged and kept on the returned :class:`Preparation` (``failed``), for whoever asked to
        raise; the calls that waited go on, so ``fn`` must leave the store usable when it
        fails (``inline`` takes its handler off again: as with the sync store, whose facade
        constructor raises, the other appends and reads are not affected).
        """
        prep = Preparation(fn)
        self._preparations.append(prep)
        return prep

    async def _prepared(self) -> None:
        """Wait for what :meth:`prepare_before_use` asked (on worker threads)."""
        for prep in list(self._preparations):
            if not prep.done:
                await asyncio.to_thread(prep.run)
                if prep.failed is not None:
                    _log.error("preparation_failed", error=f"{type(prep.failed).__name__}: "
                                                           f"{prep.failed}")
            with contextlib.suppress(ValueError):
                self._preparations.remove(prep)

    @classmethod
    async def open(
        cls,
        url: str | URL | None = None,
        *,
        max_event_bytes: int | None = None,
        migrate: bool | None = None,
        clock: Callable[[], datetime] | None = None,
        poll_interval: float | None = None,
        pool_size: int | None = None,
    ) -> AsyncEventStore:
        """Open a store; the arguments and defaults are those of :meth:`EventStore.open`."""
        resolved = resolve_url(url)
        options = Options.resolve(max_event_bytes=max_event_bytes, poll_interval=poll_interval,
                                  clock=clock)
        migrating = auto_migrate(migrate, is_sqlite(resolved))
        if not migrating:
            _migrate.check_file(resolved)
        engine = create_async_store_engine(resolved, pool_size=check_pool_size(pool_size))
        try:
            if migrating:
                async with abegin(engine, write=False) as conn:
                    current = await conn.run_sync(_migrate.is_current)
                if not current:  # as EventStore.open: the write lock only to upgrade
                    async with abegin(engine, write=True) as conn:
                        await conn.run_sync(_migrate.migrate_on)
            else:
                async with abegin(engine, write=False) as conn:
                    await conn.run_sync(_migrate.check_on, resolved)
        except DatabaseError as e:
            await engine.dispose()
            explained = explained_open_error(resolved, e)
            if explained is e:
                raise
            raise explained from e
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine, resolved, options)

    async def close(self) -> None:
        """Release every connection; later calls raise :class:`StoreClosed`.

        Waits for an append in progress.  A close that is cancelled meanwhile (a shutdown's
        timeout) leaves the store closed to new calls; calling ``close`` again releases what
        is left."""
        self._closed = True
        if self._released:
            return
        retire(self._engine.sync_engine)
        if self._writer is not None:
            await self._writer.close()
        await self._engine.dispose()
        self._released = True

    async def __aenter__(self) -> AsyncEventStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def engine(self) -> AsyncEngine:
        self._check_open()
        return self._engine

    async def run_sync(self, fn: Callable[..., T], *args: Any, write: bool = False) -> T:
        """Run ``fn(conn, *args)`` in one transaction (a write transaction with ``write``).

        The way to use the sync projection code (which takes a ``Connection``) from async code.
        On SQLite ``fn`` runs on the aiosqlite connection's worker thread (see
        :class:`_SQLiteThreadTransactions`), so it must not use the event loop; on PostgreSQL
        it runs on the event loop's thread.
        """
        await self._ready()
        return await self._transact(fn, args, write=write)

    async def run_read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)``, which only reads, as the sync store runs its reads: on
        PostgreSQL without a transaction (no BEGIN and COMMIT round trips; each statement reads
        its own snapshot, as it would in a READ COMMITTED transaction), on SQLite in one read
        transaction (one snapshot)."""
        await self._ready()
        return await self._transact(fn, args, write=False, autocommit=True)

    async def _ready(self) -> None:
        """Open, and the preparations (``prepare_before_use``) done: before a transaction."""
        self._check_open()
        if self._preparations:
            await self._prepared()

    async def _run_snapshot(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`run_read`, its statements all on one snapshot (``begin_snapshot``'s twin:
        REPEATABLE READ on PostgreSQL)."""
        await self._ready()
        return await self._transact(fn, args, write=False, snapshot=True)

    async def _transact(self, fn: Callable[..., T], args: Sequence[Any], *, write: bool,
                        autocommit: bool = False, snapshot: bool = False) -> T:
        """``fn(conn, *args)`` in one transaction (``autocommit``: PostgreSQL reads without).

        On SQLite the whole transaction runs on the thread of the pooled aiosqlite connection,
        in one trip (see :class:`_SQLiteThreadTransactions`); elsewhere on SQLAlchemy's greenlet
        bridge.
        """
        if self._sqlite is not None:
            with translate():
                _refuse_retired(self._engine)
                aconn = await self._engine.connect()
                try:
                    return await self._on_sqlite(aconn, fn, args, write=write)
                finally:
                    await _hand_back(aconn)
        async with abegin(self._engine, write=write, autocommit=autocommit,
                          snapshot=snapshot) as conn:
            return await conn.run_sync(fn, *args)

    async def _on_sqlite(self, aconn: AsyncConnection, fn: Callable[..., T],
                         args: Sequence[Any], *, write: bool) -> T:
        """``fn(conn, *args)`` in a transaction on this aiosqlite connection: whole on its
        thread when possible, else on the greenlet bridge."""
        assert self._sqlite is not None
        raw = await aconn.get_raw_connection()
        aio = raw.driver_connection
        if one_trip_possible(aio):
            return await self._sqlite.run(aio, fn, args, write=write,
                                          opened=raw.info.get(_FILE_KEY))
        if write:
            aconn = await aconn.execution_options(sqlite_write=True)
        async with aconn.begin():
            return await aconn.run_sync(fn, *args)

    # -- appending --------------------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Sequence[Event | RawEvent],
        *,
        expected_version: ExpectedVersion = ANY,
        idempotency_key: str | None = None,
        tenant_id: str = DEFAULT_TENANT,
        metadata: dict[str, Any] | None = None,
    ) -> AppendResult:
        """Append ``events`` as one atomic batch; see :meth:`EventStore.append`."""
        return await self.append_with(stream_id, events, expected_version=expected_version,
                                      idempotency_key=idempotency_key, tenant_id=tenant_id,
                                      metadata=metadata)

    async def append_with(
        self,
        stream_id: str,
        events: Sequence[Event | RawEvent],
        *,
        expected_version: ExpectedVersion = ANY,
        idempotency_key: str | None = None,
        tenant_id: str = DEFAULT_TENANT,
        metadata: dict[str, Any] | None = None,
        before_commit: BeforeCommit | None = None,
    ) -> AppendResult:
        """:meth:`append`, calling the sync ``before_commit(conn, recorded)`` in its transaction
        (on SQLite on aiosqlite's worker thread, as :meth:`run_sync`'s functions)."""
        plan = self._plan_append(stream_id, events, expected_version, idempotency_key,
                                 tenant_id, metadata)
        if self._preparations:
            await self._prepared()
        if self._sqlite is None:
            result = await self._append_pg(plan, before_commit)
        else:
            result = await self._append_sqlite(plan, before_commit)
        self._log_appended(plan, result)
        return result

    async def _append_sqlite(self, plan: AppendPlan, before_commit: BeforeCommit | None
                             ) -> AppendResult:
        """The append on SQLite: on the kept write connection (:class:`_KeptWriter`) when
        called from its event loop, whole on that connection's aiosqlite thread."""
        writer = self._writer
        turns = writer.turns_here() if writer is not None else None
        if writer is not None and turns is not None:
            with translate():
                return await writer.run(turns, lambda conn: self._on_sqlite(
                    conn, self._append_locked, (plan, before_commit), write=True))
        return await self._transact(self._append_locked, (plan, before_commit), write=True)

    async def _append_pg(self, plan: AppendPlan, before_commit: BeforeCommit | None
                         ) -> AppendResult:
        """The append on PostgreSQL, as the sync store's: on a connection in autocommit mode,
        so that the append sends its own BEGIN and COMMIT in its pipelines (two round trips,
        or one when this process knows the end of the log; see ``_core``), driven through the
        greenlet bridge by :mod:`eventstore._pg_async`.  On the kept write connection
        (:class:`_KeptWriter`) when called from its event loop."""
        with translate():
            queue = False
            while True:
                try:
                    return await self._in_own_transaction(
                        self._append_committed, plan, before_commit, not queue)
                except RetryAppend as busy:  # (see StoreCore._append_own)
                    queue = await self._until_free(busy, tenant=plan.tenant_id,
                                                   stream=plan.stream_id)
                plan = dataclasses.replace(plan, now=self.now())  # (recorded_at: at commit)

    async def _run_again_when_busy(self, fn: Callable[[Connection, bool], T]) -> T:
        """``fn(conn, nowait)`` in a write transaction, as :meth:`run_sync`; when an inline
        handler's lock was busy (``RetryAppend``, raised only with ``nowait``), run again once
        it is free.  Only for ``fn`` that may run again from its start (the projection
        facades' twins: a rolled-back command has done nothing, and decides again)."""
        queue = False
        while True:
            try:
                return await self.run_sync(fn, not queue, write=True)
            except RetryAppend as busy:
                with translate():
                    queue = await self._until_free(busy)

    async def _until_free(self, busy: RetryAppend, **context: Any) -> bool:
        """:func:`_core.wait_until_free` for asyncio: a look at the lock now and then, each on
        a pooled connection taken for it (never the kept write connection)."""
        wait = BusyWait(busy, **context)
        while (holder := await self._in_own_transaction(busy.probe, kept=False)) is not None:
            pause = wait.pause_after(holder)
            if pause is None:
                return True
            await asyncio.sleep(pause)
        return False

    async def _in_own_transaction(self, fn: Callable[..., T], *args: Any,
                                  kept: bool = True) -> T:
        """``fn(conn, *args)`` in a transaction of its own, on a connection in autocommit mode
        (the kept write connection when called from its event loop, unless not ``kept``)."""
        writer = self._writer
        turns = writer.turns_here() if kept and writer is not None else None
        if writer is not None and turns is not None:
            return await writer.run(turns, lambda conn: _own_transaction(conn, fn, *args))
        _refuse_retired(self._engine)
        async with self._engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            return await _own_transaction(conn, fn, *args)

    def _append_committed(self, conn: Any, plan: AppendPlan,
                          before_commit: BeforeCommit | None, nowait: bool) -> AppendResult:
        return self._append_locked(conn, plan, before_commit, commit=True, nowait=nowait)

    # -- reading ----------------------------------------------------------------------------------

    async def stream_version(self, stream_id: str, *, tenant_id: str = DEFAULT_TENANT) -> int:
        """The number of events in the stream; 0 when it does not exist."""
        return await self.run_read(self._stream_version_on, stream_id, tenant_id)

    def read_stream(
        self,
        stream_id: str,
        *,
        tenant_id: str = DEFAULT_TENANT,
        from_version: int = 1,
        to_version: int | None = None,
        backwards: bool = False,
        limit: int | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """``async for`` over a stream's events; see :meth:`EventStore.read_stream`."""
        return self._paged(self._stream_pager(self._engine.dialect, stream_id, tenant_id,
                                              from_version, to_version, backwards, limit))

    def read_all(
        self,
        *,
        from_position: int = 0,
        limit: int | None = None,
        categories: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        tenant_id: str | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """``async for`` over the log in position order; see :meth:`EventStore.read_all`."""
        return self._paged(self._all_pager(self._engine.dialect, from_position, limit,
                                           categories, types, tenant_id))

    async def _paged(self, pager: Pager) -> AsyncIterator[RecordedEvent]:
        while (params := pager.next_params()) is not None:
            batch = await self._fetch(pager.query, params)
            for ev in batch:
                yield ev
            if not pager.advance(batch, params["page"]):
                return

    async def _fetch(self, query: Compiled, params: dict[str, Any]) -> list[RecordedEvent]:
        return await self.run_read(
            lambda conn: self._fetch_on(conn, query, params, partial=True))

    async def last_position(self) -> int:
        """The highest committed position (0 for an empty store)."""
        return await self.run_read(self._last_position_on)

    async def stats(self, *, tenant_id: str | None = None) -> dict[str, int]:
        """Counts of events, streams and tenants, and the last position."""
        return await self.run_read(self._stats_on, tenant_id)

    def subscribe(
        self,
        *,
        from_position: int = 0,
        categories: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        tenant_id: str | None = None,
        stop: StopEvent | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """Every event from ``from_position`` on, waiting for new ones until ``stop`` is set.

        ``stop`` is an :class:`asyncio.Event` (or a :class:`threading.Event`); the wait for new
        events polls every ``poll_interval`` seconds (at most 0.5 s).  Transient database
        errors are retried as :meth:`EventStore.subscribe` retries them.
        """
        pager = self._all_pager(self._engine.dialect, from_position, None, categories, types,
                                tenant_id)
        if stop is not None and not isinstance(stop, (asyncio.Event, threading.Event)):
            raise InvalidArgument("stop must be an asyncio.Event or a threading.Event")
        return self._follow(pager, stop if stop is not None else asyncio.Event())

    async def _follow(self, pager: Pager, stop: StopEvent) -> AsyncIterator[RecordedEvent]:
        pause = 0.0
        while not stop.is_set():
            page = pager.size
            try:
                batch = await self._fetch(pager.query, {**pager.params, "lo": pager.lo,
                                                        "page": page})
            except DatabaseError as e:
                pause = self._retry_pause(e, pager, pause)
                await _wait(stop, pause)
                continue
            pause = 0.0
            for ev in batch:
                yield ev
                if stop.is_set():
                    return
            if batch:
                pager.lo = batch[-1].position + 1
            pager.resize(batch)
            if len(batch) < page and not isinstance(batch, PartialPage):
                await _wait(stop, self._options.poll_interval)

    def __repr__(self) -> str:
        return f"AsyncEventStore({shown_url(self._url)!r})"


class Preparation:
    """A sync function run once (see :meth:`AsyncEventStore.prepare_before_use`), by whichever
    waiting caller's thread gets to it first; ``failed``: its final error, if any."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self.done = False
        self.failed: Exception | None = None

    def run(self) -> None:
        with self._lock:
            if self.done:
                return
            try:
                self._fn()
            except Exception as e:
                if isinstance(e, DatabaseError) and e.transient:
                    raise  # tried again by the next call
                self.failed = e
            self.done = True


async def _wait(stop: StopEvent, seconds: float) -> None:
    """Sleep ``seconds``, ending early once ``stop`` is set (a ``threading.Event`` is looked at
    every 0.5 s at most, so a long retry pause still honours it)."""
    if isinstance(stop, asyncio.Event):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)
        return
    ends = time.monotonic() + seconds
    while not stop.is_set() and (left := ends - time.monotonic()) > 0:
        await asyncio.sleep(min(left, 0.5))


# -- the asyncio engine (here, so that the sync store never imports SQLAlchemy's asyncio) --


async def _own_transaction(conn: AsyncConnection, fn: Callable[..., T], *args: Any) -> T:
    """``fn(conn, *args)`` on the bridge in a transaction of its own (:func:`_transaction`)."""
    async with _transaction(conn):
        return await conn.run_sync(fn, *args)


@contextlib.asynccontextmanager
async def _transaction(conn: AsyncConnection) -> AsyncIterator[None]:
    """A transaction of ``conn`` on the bridge, as ``_backend.own_transaction``: a rollback that
    fails too (psycopg closed the connection: a failed pipeline's clean-up, a cancelled query)
    must not replace the error, or a cancellation would come out as a DatabaseError; the
    connection is invalidated instead."""
    try:
        trans = await conn.begin()
    except BaseException:
        await _roll_back(conn, None)
        raise
    try:
        yield
        if trans.is_active:
            await trans.commit()
    except BaseException:
        await _roll_back(conn, trans)  # (keeps the first error)
        raise


async def _roll_back(conn: AsyncConnection, trans: AsyncTransaction | None) -> None:
    """Roll back after an error, SQLAlchemy's transaction and the driver's (see
    ``_backend.end_transaction``: also after a failed COMMIT or BEGIN); if that fails too,
    invalidate the connection (the caller raises the first error)."""
    sync_trans = None if trans is None else trans.sync_transaction
    try:
        await conn.run_sync(lambda sync_conn: end_transaction(sync_conn, sync_trans))
    except Exception:
        with contextlib.suppress(Exception):
            await conn.invalidate()


class _KeptWriter:
    """One connection kept for the async store's appends, as the sync store's
    ``_backend.Writer``.

    Why: an append on a pooled connection paid a checkout, an autocommit switch and a return
    (about 85 us of CPU); worse, the one-round-trip append (``_core._Tail``) guesses only on the
    connection it learned on.  Where appends overlap (a LangGraph run's puts go on in the
    background while its next step writes), they were spread over the pool's connections, and
    almost every append paid a missed guess and then the two-round-trip path.  On SQLite the
    pool's reset cost a second hand-over to aiosqlite's thread per append, and overlapping
    appends on two connections waited for the write lock in SQLite's busy handler, which
    sleeps.  Appends take turns on this connection (an asyncio lock): that costs no
    concurrency, as appends run one at a time under the append lock anyway
    (``_backend.lock_appends``; SQLite's write lock).

    The connection belongs to the event loop that first appended; appends from another loop use
    a pooled connection, as before.  After an error the transaction is rolled back and the
    connection kept; after a failed rollback, a broken connection or (PostgreSQL) a
    cancellation it is dropped, and the next append opens another.
    """

    def __init__(self, engine: AsyncEngine, *, sqlite: bool) -> None:
        self._engine = engine
        self._sqlite = sqlite
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._adopting = threading.Lock()
        self._conn: AsyncConnection | None = None
        self._closed = False

    def turns_here(self) -> asyncio.Lock | None:
        """The lock of the kept connection's turns when the connection serves the running loop
        (the first loop to ask adopts it, and so does a later one once that loop has closed
        without it), else ``None``.

        Under a thread lock: loops in several threads ask at once, and two that both adopted it
        shared one connection and one ``asyncio.Lock`` (an append failed with "bound to a
        different event loop", or waited for ever for a wake-up sent from another thread)."""
        loop = asyncio.get_running_loop()
        with self._adopting:
            if self._loop is None or (self._loop.is_closed() and self._conn is None):
                self._loop, self._lock = loop, asyncio.Lock()
            return self._lock if self._loop is loop else None

    async def run(self, turns: asyncio.Lock,
                  body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """``await body(conn)`` (an append in a transaction of its own) on the kept
        connection, in a turn of ``turns`` (from :meth:`turns_here`)."""
        async with turns:
            if self._closed:
                raise StoreClosed("the event store is closed")
            conn = self._conn
            if conn is not None and not self._sqlite and hung_up(conn.sync_connection):  # type: ignore[arg-type]
                await self._drop()  # the server hung up since the last append
                conn = None
            if conn is None or conn.invalidated or conn.closed:
                conn = self._conn = await self._open()
            try:
                return await body(conn)
            except BaseException as e:
                # After a cancellation a PostgreSQL connection's state is unknown (psycopg may
                # have cancelled the query mid-pipeline); an abandoned SQLite transaction rolls
                # back on aiosqlite's thread, ahead of anything queued there after it.
                if _abroken(conn) or (not isinstance(e, Exception) and not self._sqlite):
                    await self._drop()
                raise

    async def _open(self) -> AsyncConnection:
        conn = await self._engine.connect()
        if self._sqlite:
            return conn
        try:
            # The append sends its own BEGIN with its first statements (see _append_locked).
            return await conn.execution_options(isolation_level="AUTOCOMMIT")
        except BaseException:
            await conn.close()
            raise

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
                await conn.close()

    async def close(self) -> None:
        """Release the kept connection (after an append in progress); later appends raise
        :class:`StoreClosed`."""
        self._closed = True
        loop = self._loop
        if loop is None:
            return  # never appended
        if loop is not asyncio.get_running_loop():
            # Another loop's connection (left to the garbage collector, it was found with
            # SQLAlchemy's warning): closed from here, not handed back to the pool (whose
            # waiters belong to loops); psycopg's close needs no loop, aiosqlite's answers on
            # this one, once an append in progress on that loop (if it still runs) is done;
            # later appends find the store closed.  (Closed on that loop instead, the close was
            # cancelled half-way when the loop ended meanwhile, ``asyncio.run`` returning as
            # its appends failed: SQLAlchemy and aiosqlite's thread printed tracebacks.)
            if loop.is_running() and not await self._turn_on(loop):
                # Still in use there after the wait: closed on that loop once its append is
                # done (not from here, under the append).
                _call_on(loop, self._close_here)
                return
            await self._drop()
            return
        await self._close_here()

    async def _turn_on(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Wait for a turn of the kept connection on ``loop`` (another thread's): ``True`` once
        had, or once that loop no longer runs (it may stop or close at any moment, the turn
        then never given); ``False`` after :data:`_CLOSE_ELSEWHERE_WAIT` seconds."""
        turn = _call_on(loop, self._turn_here)
        if turn is None:  # (closed since the caller saw it running)
            return True
        waited = asyncio.wrap_future(turn)
        ends = time.monotonic() + _CLOSE_ELSEWHERE_WAIT
        try:
            while not waited.done() and loop.is_running():
                if time.monotonic() >= ends:
                    return False
                await asyncio.wait({waited}, timeout=0.05)
        finally:
            if not waited.done():
                waited.cancel()
            elif not waited.cancelled():
                waited.exception()  # (looked at: an ended loop's cancellation is no news)
        return True

    async def _turn_here(self) -> None:
        async with self._lock:  # after an append in progress
            pass

    async def _close_here(self) -> None:
        # Always through the lock: an append may hold it while it opens the connection.
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.close()


_CLOSE_ELSEWHERE_WAIT = 10.0  # seconds a close waits for the kept connection's own loop


def _call_on(loop: asyncio.AbstractEventLoop, make: Callable[[], Coroutine[Any, Any, T]]
             ) -> concurrent.futures.Future[T] | None:
    """``make()`` run as a task of another thread's ``loop``; ``None`` when that loop has
    closed.  The coroutine is made there, once the loop gets to it: a loop that stops and
    closes first leaves none behind never awaited (``run_coroutine_threadsafe``'s warning)."""
    outcome: concurrent.futures.Future[T] = concurrent.futures.Future()

    def settle(task: asyncio.Task[T]) -> None:
        _running_elsewhere.discard(task)
        if task.cancelled():
            outcome.set_exception(asyncio.CancelledError())
        elif (error := task.exception()) is not None:
            outcome.set_exception(error)
        else:
            outcome.set_result(task.result())

    def start() -> None:
        if outcome.set_running_or_notify_cancel():
            task = loop.create_task(make())
            _running_elsewhere.add(task)  # (a loop keeps only weak references to its tasks)
            task.add_done_callback(settle)

    try:
        loop.call_soon_threadsafe(start)
    except RuntimeError:
        return None
    return outcome


_running_elsewhere: set[asyncio.Task[Any]] = set()


def _abroken(conn: AsyncConnection) -> bool:
    """Whether the kept connection can no longer be used (``_backend._broken``)."""
    return conn.invalidated or conn.closed or _broken(conn.sync_connection)  # type: ignore[arg-type]


class _SQLiteThreadTransactions:
    """Transactions run whole on the thread of an aiosqlite connection.

    Why: aiosqlite runs every call on a thread of its own, one hand-over between threads per
    call (about 70 us here, more than a one-row statement).  Through SQLAlchemy's greenlet
    bridge an append made nine of them (BEGIN, each statement, COMMIT, the pool's reset);
    here it makes one (the pool's reset is skipped, see :func:`_no_idle_rollback`).  The
    transaction body is the sync store's code, as on the greenlet bridge, on a sync
    SQLAlchemy connection over the same sqlite3 connection (a sync engine per aiosqlite
    connection, set up like the sync store's), in the caller's context variables (for
    structlog's bound context).
    """

    def __init__(self, url: URL) -> None:
        self._settings = _sqlite_settings(url)
        self.memory = self._settings[3]
        self._engines: weakref.WeakKeyDictionary[Any, Engine] = weakref.WeakKeyDictionary()

    async def run(self, aio: Any, fn: Callable[..., T], args: Sequence[Any], *, write: bool,
                  opened: Any = None) -> T:
        """``opened``: the database file's identity when the pool opened this connection."""
        engine = self._engines.get(aio)
        if engine is None:
            engine = self._engines[aio] = self._engine_over(aio._conn, opened)
        context = contextvars.copy_context()
        hand = _Handover()
        try:
            result: T = await _on_thread(aio, context.run, _in_transaction, engine, write,
                                         fn, args, hand)
        except BaseException:
            # Cancelled (a timeout, a task cancelled, the loop shutting down) while the
            # function runs on aiosqlite's thread.  Before its commit it rolls back at its next
            # check, instead of committing what its caller gave up on; once committing, the
            # caller waits for the commit (short of a second cancellation), so that a read
            # after the cancellation does not see the log without what commits next.
            if not hand.abandon():
                with contextlib.suppress(asyncio.CancelledError):
                    while not hand.finished.is_set():
                        await asyncio.sleep(0.001)
            raise
        return result

    def _engine_over(self, raw: sqlite3.Connection, opened: Any) -> Engine:
        _clean, synchronous, busy_ms, memory = self._settings
        borrowed = _Borrowed(raw)
        engine = create_engine("sqlite://", creator=lambda: borrowed, poolclass=StaticPool)
        _sqlite_listeners(engine, synchronous, busy_ms, memory)

        @event.listens_for(engine, "connect")
        def _same_file_as_opened(_dbapi_conn: Any, record: Any) -> None:
            # The file this connection opened, as the pool saw it then (the listener above
            # looks at the path now, which may be another file by this first use).
            record.info.pop(_FILE_KEY, None)
            if opened is not None:
                record.info[_FILE_KEY] = opened

        return engine


async def _hand_back(aconn: AsyncConnection) -> None:
    """Hand a SQLite connection back to the pool, whatever cancels its caller meanwhile.

    Why not ``async with``: that closes in a task of its own, which ``asyncio.run`` cancels
    with the caller's when it ends a loop whose tasks still read, before it has begun; the
    connection then stayed out of the pool, and its aiosqlite thread and file for good.  An
    idle connection goes back inline, with nothing to wait for (see _no_idle_rollback), so
    nothing can interrupt it.  One still in a transaction (its caller was cancelled while the
    transaction ran on aiosqlite's thread) waits for the pool's rollback, queued behind the
    transaction: that close runs shielded to its end, as ``async with``'s would (a second
    cancellation meanwhile invalidated the connection, with an error in the log).
    """
    sync: Any = aconn.sync_connection
    try:
        pooled = sync.connection
    except Exception:  # (closed, invalidated: not known to be idle)
        pooled = None
    if _outside_transaction(pooled):
        await aconn.close()
        return
    closing = asyncio.ensure_future(aconn.close())
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            await asyncio.shield(closing)
            break
        except asyncio.CancelledError as e:
            if closing.done():  # the close itself was cancelled (a loop's shutdown)
                raise
            cancelled = e
    if cancelled is not None:
        raise cancelled


async def _on_thread(aio: Any, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the aiosqlite connection's thread, as its ``_execute`` runs it, except
    that the answer to a caller whose event loop has closed meanwhile is dropped.

    Why: aiosqlite's thread hands each result to the caller's loop, and when that loop is
    closed the hand-over raises on the thread, which ends it: the connection's every later
    call waits for ever (and so does the store's ``close``).  A caller cancelled before its
    transaction had begun (an append waiting for the write lock, under ``asyncio.wait_for``)
    leaves without waiting for its function, which rolls back on the thread once it gets to
    run, and ``asyncio.run`` then closes the caller's loop.  (aiosqlite 0.17 to 0.22 queue
    ``(future, function)`` items on ``_tx``; an aiosqlite without that queue gets
    ``_execute``.)
    """
    tx = getattr(aio, "_tx", None)
    if tx is None or not callable(getattr(tx, "put_nowait", None)):
        result: T = await aio._execute(no_stop_iteration, fn, *args)
        return result
    if not getattr(aio, "_running", True) or getattr(aio, "_connection", True) is None:
        raise ValueError("Connection closed")  # (as _execute)
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    tx.put_nowait((_Answer(future), functools.partial(no_stop_iteration, fn, *args)))
    return await future


class _Answer:
    """The future an aiosqlite thread answers (see :func:`_on_thread`): it stands for its own
    loop, whose ``call_soon_threadsafe`` drops an answer to a closed loop."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self._future = future

    def get_loop(self) -> _Answer:
        return self

    def call_soon_threadsafe(self, callback: Callable[[Any, Any], None], _future: Any,
                             value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for it
            self._future.get_loop().call_soon_threadsafe(callback, self._future, value)


class _Handover:
    """Whether a transaction on aiosqlite's thread goes on to its commit or its caller gave up
    first: whichever of the two comes first decides, under a lock."""

    __slots__ = ("_lock", "abandoned", "committing", "finished")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.abandoned = False
        self.committing = False
        self.finished = threading.Event()  # the transaction committed or rolled back

    def abandon(self) -> bool:
        """The caller gives up; false when the commit is already under way."""
        with self._lock:
            self.abandoned = True
            return not self.committing

    def commit(self) -> bool:
        """The transaction is about to commit; false when its caller gave up."""
        with self._lock:
            self.committing = not self.abandoned
            return self.committing


def _in_transaction(engine: Engine, write: bool, fn: Callable[..., T], args: Sequence[Any],
                    hand: _Handover) -> T:
    """On aiosqlite's thread: ``fn`` in a transaction, rolled back if its caller gave up
    (checked once the transaction has begun, possibly after waiting for the write lock, and
    again right before the commit, which its caller then waits for)."""
    try:
        if hand.abandoned:  # given up while queued: not even a wait for the write lock
            raise _Abandoned
        with _begin(engine, write=write) as conn:
            if hand.abandoned:
                raise _Abandoned
            result = fn(conn, *args)
            if not hand.commit():
                raise _Abandoned
            return result
    finally:
        hand.finished.set()


class _Abandoned(Exception):
    """The caller of a transaction on aiosqlite's thread was cancelled: roll it back."""


class _Borrowed:
    """An aiosqlite connection's sqlite3 connection lent to a sync engine, which must not
    close it (aiosqlite does, with its pooled connection)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: sqlite3.Connection) -> None:
        object.__setattr__(self, "_raw", raw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._raw, name, value)

    def close(self) -> None:
        """Left to aiosqlite."""


class _AnyLoopQueue:
    """The async pool's idle connections, which tasks of any event loop may wait for.

    Why: SQLAlchemy's queue waits on an ``asyncio.Queue``, bound to the first event loop that
    ever waited for a connection: a store shared by loops (``asyncio.run`` per job, a loop
    per thread) then failed every later wait on another loop with a RuntimeError.  Here each
    waiter waits on a future of its own loop; a connection put back wakes the oldest waiter of
    each loop (see :meth:`_wake_next`), which takes a connection if one is left, else waits
    again.
    """

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        self.maxsize = maxsize
        self.use_lifo = use_lifo
        self._items: collections.deque[Any] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._mutex = threading.Lock()  # (loops of other threads put and get too)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    def qsize(self) -> int:
        return len(self._items)

    def put_nowait(self, item: Any) -> None:
        with self._mutex:
            if self.full():
                raise PoolQueueFull()
            self._items.append(item)
        self._wake_next()

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self.put_nowait(item)  # (the pool never waits to put back: when full, it closes one)

    def get_nowait(self) -> Any:
        with self._mutex:
            return self._take()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        try:
            return self.get_nowait()
        except PoolQueueEmpty:
            if not block:
                raise
        return await_only(self._wait_for_one(timeout))

    def _take(self) -> Any:
        if not self._items:
            raise PoolQueueEmpty()
        return self._items.pop() if self.use_lifo else self._items.popleft()

    async def _wait_for_one(self, timeout: float | None) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            woken = loop.create_future()
            with self._mutex:
                if self._items:
                    return self._take()
                self._waiters.append(woken)
            try:
                if deadline is None:
                    await woken
                else:
                    await asyncio.wait_for(woken, max(0.0, deadline - loop.time()))
            except BaseException as e:
                with self._mutex:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(woken)
                    if isinstance(e, TimeoutError) and self._items:
                        return self._take()  # (put back as the time ran out)
                if woken.done() and not woken.cancelled():
                    self._wake_next()  # (woken, but leaving: the next waiter's turn)
                if isinstance(e, TimeoutError):
                    raise PoolQueueEmpty() from None
                raise

    def _wake_next(self) -> None:
        """Wake the oldest waiter of each event loop: one loop that is not running (a loop
        kept between ``run_until_complete`` calls) or is busy must not hold back the waiters
        of the others while a connection is idle.  Those that find none left wait again."""
        with self._mutex:
            if not self._waiters or not self._items:
                return
            heads: dict[asyncio.AbstractEventLoop, asyncio.Future[None]] = {}
            for waiter in self._waiters:
                heads.setdefault(waiter.get_loop(), waiter)
            for waiter in heads.values():
                self._waiters.remove(waiter)
        for loop, waiter in heads.items():
            with contextlib.suppress(RuntimeError):  # its loop is closed: it waits no more
                loop.call_soon_threadsafe(self._wake, waiter)

    def _wake(self, woken: asyncio.Future[None]) -> None:
        if woken.done():  # it stopped waiting meanwhile (timed out, cancelled)
            self._wake_next()
        else:
            woken.set_result(None)


class _AnyLoopPool(AsyncAdaptedQueuePool):
    """SQLAlchemy's async queue pool, waiting on :class:`_AnyLoopQueue`."""

    _queue_class = _AnyLoopQueue  # type: ignore[assignment]


def create_async_store_engine(url: URL, *, pool_size: int | None = None) -> AsyncEngine:
    """An asyncio engine: psycopg's async driver, or aiosqlite, set up like the sync one."""
    if is_sqlite(url):
        clean, synchronous, busy_ms, memory = _sqlite_settings(url)
        with missing_extra("async"):
            engine = create_async_engine(clean.set(drivername="sqlite+aiosqlite"),
                                         poolclass=StaticPool if memory else _AnyLoopPool)
        refuse_orphaned_wal(engine.sync_engine, url)
        _sqlite_listeners(engine.sync_engine, synchronous, busy_ms, memory, sqlite_file(url))
        _no_idle_rollback(engine.sync_engine.dialect)
    else:
        with missing_extra("async"):
            engine = create_async_engine(url, pool_size=pool_size or 5, max_overflow=10,
                                         poolclass=_AnyLoopPool,
                                         connect_args=pg_connect_args(url),
                                         isolation_level=PG_ISOLATION)
        pg_listeners(engine.sync_engine)
    close_when_retired(engine.sync_engine)
    return engine


def _no_idle_rollback(dialect: Any) -> None:
    """The aiosqlite dialect's rollback skips a connection with no transaction open.

    Why: the pool rolls back every connection handed back to it whose transaction SQLAlchemy
    did not end itself, as after each transaction run whole on aiosqlite's thread (see
    :class:`_SQLiteThreadTransactions`): a second hand-over to that thread per read, which
    doubled the cost of an ``aget_tuple``.  Such a transaction has always ended by then (or
    ends itself, ahead in the thread's queue, when its caller gave up), and a rollback with
    no transaction is a no-op in sqlite3; aiosqlite's ``in_transaction`` asks SQLite
    without a hand-over.  (An abandoned transaction's caller does not wait for it here any
    more: :func:`_on_thread` keeps its answer from ending the thread.)
    """
    rollback = dialect.do_rollback

    def do_rollback(dbapi_connection: Any) -> None:
        if not _outside_transaction(dbapi_connection):
            rollback(dbapi_connection)

    dialect.do_rollback = do_rollback


def _outside_transaction(pooled: Any) -> bool:
    """Whether a pooled aiosqlite connection is outside any transaction, asked without a
    hand-over to its thread; false when it cannot tell (closed: a rollback says so)."""
    try:
        return pooled.driver_connection.in_transaction is False
    except Exception:
        return False


@contextlib.asynccontextmanager
async def abegin(engine: AsyncEngine, *, write: bool, autocommit: bool = False,
                 snapshot: bool = False) -> AsyncIterator[AsyncConnection]:
    """The async twin of :func:`begin_write` / :func:`begin_read` (``autocommit``: a
    PostgreSQL read without a transaction, as ``begin_read``'s; ``snapshot``: a PostgreSQL
    read in REPEATABLE READ, as ``begin_snapshot``'s)."""
    with translate():
        _refuse_retired(engine)
        async with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                if write:
                    conn = await conn.execution_options(sqlite_write=True)
            elif snapshot:
                conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            elif autocommit and not write:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            async with _transaction(conn):
                yield conn


def _refuse_retired(engine: AsyncEngine) -> None:
    """StoreClosed for a transaction begun once the store is closing: no new connection (an
    in-memory database's would be a new, empty one)."""
    if is_retired(engine.sync_engine):
        raise StoreClosed("the event store is closed")
