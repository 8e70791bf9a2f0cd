"""AsyncEventStore specifics: async iteration, asyncio stop events, inline projections."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import gc
import os
import random
import sqlite3
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import aiosqlite
import psycopg
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection
from structlog.testing import capture_logs

import eventstore._backend as backend
import eventstore._core as core
import eventstore._pg_async as pg_async
from eventstore import AsyncEventStore as Exported
from eventstore import EventStore, StoreClosed, WrongExpectedVersion, _migrate, aio
from eventstore._backend import APPEND_LOCK_ID
from eventstore._bound import BoundStore
from eventstore.aio import AsyncEventStore, _wait
from eventstore.errors import DatabaseError, EventTooLarge, InvalidArgument, SchemaVersionMismatch
from projections import (
    ConversationProjection,
    current,
    fold_live,
    inline,
    query_rows,
    rebuild,
    snapshot_now,
    status,
    verify,
)
from projections import _engine as engine_module
from projections._engine import load_row
from projections.aio import AsyncConversations, AsyncJobs, run_read
from projections.events import VariablesAssigned, VariableValue
from tests._events import Blob, CounterIncremented, NoteAdded
from tests._projections import TallyProjection
from tests.conftest import pg_url, reset_pg, terminate_other_sessions
from tests.test_append_path import _ConstantWriter, _count_guesses, _FailingWriter, _RaisingWriter

pytestmark = pytest.mark.asyncio


async def test_async_iteration_reads_what_was_appended(url: str) -> None:
    """append, read_stream and read_all work with await and async for."""
    async with await AsyncEventStore.open(url) as store:
        r = await store.append("c-1", [NoteAdded(text="a"), NoteAdded(text="b")],
                               expected_version=0)
        assert (r.first_position, r.stream_version) == (1, 2)
        assert [e.data async for e in store.read_stream("c-1")] == [
            NoteAdded(text="a"), NoteAdded(text="b")]
        assert [e.position async for e in store.read_all(from_position=2)] == [2]
        with pytest.raises(WrongExpectedVersion):
            await store.append("c-1", [NoteAdded(text="c")], expected_version=1)


async def test_concurrent_tasks_with_same_expected_version_one_wins(url: str) -> None:
    """Ten tasks append at the same expected version: one wins."""
    async with await AsyncEventStore.open(url) as store:
        async def attempt(i: int) -> bool:
            try:
                await store.append("c-1", [NoteAdded(text=str(i))], expected_version=0)
                return True
            except WrongExpectedVersion:
                return False

        results = await asyncio.gather(*(attempt(i) for i in range(10)))
        assert sorted(results) == [False] * 9 + [True]
        assert await store.stream_version("c-1") == 1


async def test_subscribe_stops_promptly_on_asyncio_event(url: str) -> None:
    """An asyncio.Event stop ends an idle subscription within 0.5 s."""
    async with await AsyncEventStore.open(url) as store:
        await store.append("c-1", [NoteAdded(text="a")])
        stop = asyncio.Event()
        seen: list[int] = []

        async def follow() -> None:
            async for ev in store.subscribe(stop=stop):
                seen.append(ev.position)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.2)
        await store.append("c-2", [NoteAdded(text="b")])
        for _ in range(20):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.05)
        stop.set()
        t0 = time.monotonic()
        await asyncio.wait_for(task, 2)
        assert time.monotonic() - t0 < 0.6
        assert seen == [1, 2]


async def test_inline_projection_runs_in_the_async_append(url: str) -> None:
    """A sync inline projection handler updates its rows inside an async append."""
    with EventStore.open(url) as sync_store:
        projection = ConversationProjection()
        inline(sync_store, projection)  # registers the projection's bookkeeping row
        async with await AsyncEventStore.open(url) as store:
            inline(store, projection)  # type: ignore[arg-type]
            await store.append("conversation-x", [VariablesAssigned(
                conversation_id="x", variables=[VariableValue(name="n", value=1,
                                                              value_type="integer")])])
            row = load_row(sync_store, projection, "default", "conversation-x")
            assert row is not None and row[0].variables == {"n": 1}


async def test_sync_and_async_stores_share_one_log(url: str) -> None:
    """Events from the sync store are read by the async one, in one order."""
    with EventStore.open(url) as sync_store:
        sync_store.append("c-1", [NoteAdded(text="sync")])
        async with await AsyncEventStore.open(url) as store:
            await store.append("c-1", [NoteAdded(text="async")], expected_version=1)
            assert [e.data.text async for e in store.read_stream("c-1")] == [  # type: ignore[union-attr]
                "sync", "async"]
        assert sync_store.stream_version("c-1") == 2


async def test_async_store_is_exported_from_the_package() -> None:
    """``from eventstore import AsyncEventStore`` gives the asyncio store."""

    assert Exported is AsyncEventStore


async def test_sqlite_transactions_take_one_trip_to_aiosqlites_thread(tmp_path: Any) -> None:
    """On SQLite an async append or read runs whole on the aiosqlite connection's thread, not
    one hand-over per statement: an append one (on the kept write connection), a read one too
    (the pool's rollback of a connection with no transaction open is skipped)."""


    trips: list[str] = []
    real = aiosqlite.Connection._execute
    real_on_thread = aio._on_thread

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        trips.append(getattr(fn, "__name__", repr(fn)))
        return await real(self, fn, *args, **kwargs)

    async def counted_on_thread(conn: Any, fn: Any, *args: Any) -> Any:
        trips.append(getattr(fn, "__name__", repr(fn)))
        return await real_on_thread(conn, fn, *args)

    async with await AsyncEventStore.open(f"sqlite:///{tmp_path / 'trips.db'}") as store:
        await store.append("c-1", [NoteAdded(text="warm")])
        assert await store.stream_version("c-1") == 1  # the reading connection is open too
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(aiosqlite.Connection, "_execute", counted)  # (SQLAlchemy's calls)
            mp.setattr(aio, "_on_thread", counted_on_thread)  # (the store's own)
            r = await store.append("c-1", [NoteAdded(text="a"), NoteAdded(text="b")],
                                   expected_version=1)
            appended = list(trips)
            trips.clear()
            texts = [e.data.text async for e in store.read_stream("c-1")]  # type: ignore
            read = list(trips)
        assert (r.first_position, r.stream_version) == (2, 3)
        assert texts == ["warm", "a", "b"]
        assert len(appended) == 1, appended
        assert read == ["run"], read


async def test_async_transactions_see_the_callers_context_variables(url: str) -> None:
    """Inline handlers run with the context of the task that appends (structlog's bound
    context lives there), on SQLite's worker thread as on PostgreSQL's event loop."""

    request: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")
    seen: list[str] = []

    def handler(conn: Any, recorded: Any) -> None:
        seen.append(request.get())

    async with await AsyncEventStore.open(url) as store:
        store.add_inline_handler(handler)

        async def append_as(name: str) -> None:
            request.set(name)
            await store.append(f"c-{name}", [NoteAdded(text=name)])

        await asyncio.gather(append_as("first"), append_as("second"))
    assert sorted(seen) == ["first", "second"]


async def test_failing_handler_in_async_append_writes_nothing_and_store_goes_on(
        url: str) -> None:
    """A handler's error reaches the caller of an async append, which then wrote nothing; the
    connection is fine for the next append."""
    calls: list[int] = []

    def handler(conn: Any, recorded: Any) -> None:
        calls.append(len(recorded))
        if len(calls) == 1:
            raise RuntimeError("projection broke")

    async with await AsyncEventStore.open(url) as store:
        store.add_inline_handler(handler)
        with pytest.raises(RuntimeError, match="projection broke"):
            await store.append("c-1", [NoteAdded(text="lost")])
        assert await store.stream_version("c-1") == 0
        assert await store.last_position() == 0
        r = await store.append("c-1", [NoteAdded(text="kept")], expected_version=0)
        assert r.stream_version == 1
        assert [e.data.text async for e in store.read_stream("c-1")] == ["kept"]  # type: ignore


async def test_postgresql_async_append_pipelines_like_the_sync_store() -> None:
    """On psycopg's async driver the append's statements go out in pipelines as on the sync
    store: the second append to a stream is one pipeline and no statement on its own (one
    round trip), its events and the inline projection's rows committed together."""

    url = pg_url()
    reset_pg(url)
    with EventStore.open(url) as sync_store:
        projection = ConversationProjection()
        inline(sync_store, projection)
    async with await AsyncEventStore.open(url) as store:
        inline(store, projection)  # type: ignore[arg-type]

        def assigned(n: int) -> VariablesAssigned:
            return VariablesAssigned(conversation_id="x", variables=[
                VariableValue(name="n", value=n, value_type="integer")])

        await store.append("conversation-x", [assigned(1)])
        with pytest.MonkeyPatch.context() as mp:
            pipelines, alone = _count_trips(mp)
            r = await store.append("conversation-x", [assigned(2)], expected_version=1)
            appended = (len(pipelines), list(alone))
        assert r.stream_version == 2
        assert appended == (1, []), appended
        assert await store.stream_version("conversation-x") == 2
    with EventStore.open(url) as sync_store:
        row = load_row(sync_store, projection, "default", "conversation-x")
        assert row is not None and row[0].variables == {"n": 2}


@pytest.mark.parametrize("failing", ["statement-fails", "python-raises"])
async def test_failing_handler_on_a_known_stream_writes_nothing_async(url: str,
                                                                      failing: str) -> None:
    """The async store's one-round-trip and pipelined appends (PostgreSQL) and its
    transactions on aiosqlite's thread (SQLite) leave nothing written when a handler's
    statement fails or the handler raises after its statement went out; appends go on."""

    handler: Any = _FailingWriter() if failing == "statement-fails" else _RaisingWriter()
    error = DatabaseError if failing == "statement-fails" else ValueError
    async with await AsyncEventStore.open(url) as store:
        guesses = _count_guesses(store)  # type: ignore[arg-type]
        texts: list[str] = []

        async def texts_of(stream: str) -> list[str]:
            return [e.data.text async for e in store.read_stream(stream)]  # type: ignore

        for refused in ([NoteAdded(text="refused")],
                        [NoteAdded(text="refused"), NoteAdded(text="too")]):
            for _ in range(2):
                texts.append(str(len(texts) + 1))
                await store.append("k-1", [NoteAdded(text=texts[-1])],
                                   expected_version=len(texts) - 1)
            store.add_inline_handler(handler)
            with pytest.raises(error):
                await store.append("k-1", refused)
            store.remove_inline_handler(handler)
            assert await store.stream_version("k-1") == len(texts)
            assert await store.last_position() == len(texts)
            assert await texts_of("k-1") == texts
        result = await store.append("k-1", [NoteAdded(text="5")], expected_version=4)
        assert (result.first_position, result.stream_version) == (5, 5)
        assert (await store.append("k-1", [NoteAdded(text="6"),
                                           NoteAdded(text="7")])).last_position == 7
        assert await texts_of("k-1") == [*texts, "5", "6", "7"]
        if store.engine.dialect.name == "postgresql":
            assert guesses == [True, "raised", True, "raised", True]


async def test_two_async_stores_interleave_and_keep_prepared_statements_in_step(
        url: str) -> None:
    """Two async stores append to one database: stale guesses (PostgreSQL) fall back, failed
    pipelines leave psycopg's prepared statements usable, and every event lands once, in
    order."""

    a = await AsyncEventStore.open(url)
    b = await AsyncEventStore.open(url)
    try:
        a.add_inline_handler(_ConstantWriter())
        texts: list[str] = []

        async def a_appends(n: int) -> None:
            for _ in range(n):
                texts.append(f"a{len(texts)}")
                await a.append("p-1", [NoteAdded(text=texts[-1])])

        await a_appends(5)
        for gap in (4, 1, 2, 3, 6):
            await b.append("p-2", [NoteAdded(text="b")])
            await a_appends(gap)
        assert [e.data.text async for e in a.read_stream("p-1")] == texts  # type: ignore
        assert [e.position async for e in a.read_all()] == list(range(1, len(texts) + 6))
    finally:
        await a.close()
        await b.close()


async def test_async_postgresql_connections_are_not_kept_alive_by_the_store() -> None:
    """The pipeline facades the async store keeps per psycopg connection do not keep the
    connections alive: after bursts of concurrent appends (the kept write connection's, and
    facade commands' in transactions of their own, for which the pool opens and drops overflow
    connections) and close(), every psycopg connection it used can be collected."""


    url = pg_url()
    reset_pg(url)
    seen: list[weakref.ref[Any]] = []
    real = pg_async.facade_of

    def tracking(aconn: Any) -> Any:
        seen.append(weakref.ref(aconn))
        return real(aconn)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pg_async, "facade_of", tracking)
        mp.setattr(backend, "facade_of", tracking)
        mp.setattr(core, "facade_of", tracking)
        store = await AsyncEventStore.open(url, pool_size=1)
        conversations = AsyncConversations(store)
        for round_ in range(3):
            await asyncio.gather(*(store.append(f"c-{round_}-{i}", [NoteAdded(text="x")])
                                   for i in range(6)),
                                 *(conversations.assign(f"v-{round_}-{i}", {"n": i})
                                   for i in range(6)))
        assert await store.last_position() == 36
        await store.close()
    del store
    gc.collect()
    assert len({id(r) for r in seen}) > 1  # overflow connections came and went
    assert [r for r in seen if r() is not None] == []


async def test_the_async_postgresql_pool_keeps_pool_size_idle_connections_after_a_burst(
        ) -> None:
    """Reads that overlap beyond ``pool_size`` open overflow connections; once they are done
    the pool keeps ``pool_size`` of them idle and closes the others."""

    url = pg_url()
    reset_pg(url)
    async with await AsyncEventStore.open(url, pool_size=2) as store:
        opened: list[int] = []
        event.listen(store.engine.sync_engine, "connect", lambda *a: opened.append(1))
        await asyncio.gather(*(store.stream_version(f"p-{i}") for i in range(6)))
        assert len(opened) > 2  # overflow connections were opened
        assert store.engine.sync_engine.pool.checkedout() == 0
        assert store.engine.sync_engine.pool.checkedin() == 2


async def test_a_kept_connection_that_fails_to_switch_to_autocommit_is_not_left_checked_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: the kept write connection's switch to autocommit cancelled (or failing)
    fails that append and hands the connection back (it was left to the garbage collector,
    with SQLAlchemy's warning); the next append opens one anew."""

    url = pg_url()
    reset_pg(url)
    real = AsyncConnection.execution_options
    failures = [asyncio.CancelledError()]

    async def switch(self: Any, **options: Any) -> Any:
        if options.get("isolation_level") == "AUTOCOMMIT" and failures:
            raise failures.pop()
        return await real(self, **options)

    async with await AsyncEventStore.open(url) as store:
        monkeypatch.setattr(AsyncConnection, "execution_options", switch)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with pytest.raises(asyncio.CancelledError):
                await store.append("a-1", [NoteAdded(text="never")])
            gc.collect()
        assert [str(w.message) for w in seen if "non-checked-in" in str(w.message)] == []
        assert store.engine.sync_engine.pool.checkedout() == 0
        assert (await store.append("a-1", [NoteAdded(text="1")])).stream_version == 1


async def test_async_transactions_run_at_read_committed_where_the_database_defaults_otherwise(
        fresh_pg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database whose default isolation is REPEATABLE READ, and no session setting of the
    store's (``EVENTSTORE_PG_IDLE_TIMEOUT=0``, for a pooler's shared sessions): the async
    store's transactions begun by SQLAlchemy still run at READ COMMITTED."""

    monkeypatch.setenv("EVENTSTORE_PG_IDLE_TIMEOUT", "0")
    EventStore.open(fresh_pg, migrate=True).close()
    dsn = make_url(fresh_pg).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{make_url(fresh_pg).database}" SET '
                      "default_transaction_isolation = 'repeatable read'")

    def isolation(conn: Any) -> str:
        return str(conn.exec_driver_sql("SHOW transaction_isolation").scalar())

    async with await AsyncEventStore.open(fresh_pg) as store:
        for _ in range(3):
            assert await store.run_sync(isolation, write=True) == "read committed"


async def test_cancelled_async_appends_roll_back_or_complete_never_fail_otherwise(
        url: str) -> None:
    """Cancelling async appends at random moments (PostgreSQL: also while a stale
    one-round-trip guess fails) gives either a completed append or CancelledError, never a
    DatabaseError; every completed append committed (a cancellation that comes after the
    commit may hide one that did), and the log stays dense."""

    rng = random.Random(5)
    a = await AsyncEventStore.open(url)
    b = await AsyncEventStore.open(url)
    try:
        await a.append("x-1", [NoteAdded(text="first")])
        completed = 0
        for _ in range(40):
            await a.append("x-1", [NoteAdded(text="a")])  # a learns the end of the log
            await b.append("x-2", [NoteAdded(text="b")])  # a's next guess is stale
            task = asyncio.create_task(a.append("x-1", [NoteAdded(text="maybe")]))
            await asyncio.sleep(rng.random() * 0.003)
            task.cancel()
            try:
                await task
                completed += 1
            except asyncio.CancelledError:
                pass
        maybe = [e async for e in a.read_stream("x-1")
                 if e.data.text == "maybe"]  # type: ignore[attr-defined]
        assert completed <= len(maybe) <= 40
        assert [e.position async for e in a.read_all()] == list(
            range(1, await a.last_position() + 1))
        assert await a.last_position() == 1 + 40 + 40 + len(maybe)
    finally:
        await a.close()
        await b.close()


async def test_a_task_cancelled_as_its_pipeline_opens_leaves_no_connection_astray(
        fresh_pg: str) -> None:
    """psycopg's async pipeline can be cancelled after libpq entered pipeline mode (its last
    ``sleep(0)``), leaving a connection on which each statement reads another's result.  Such
    a connection is closed and replaced: the calls after it answer right (stream versions
    read 0 and job lists failed, from the pool and from the store's kept connection)."""


    real_enter = psycopg.AsyncPipeline.__aenter__
    cancels = 0

    async def cancelled_enter(self: Any) -> Any:
        nonlocal cancels
        await real_enter(self)
        if cancels:
            cancels -= 1
            raise asyncio.CancelledError
        return self

    async with await AsyncEventStore.open(fresh_pg, migrate=True) as store:
        jobs = AsyncJobs(store)
        await store.append("s-1", [NoteAdded(text="x")] * 3)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(psycopg.AsyncPipeline, "__aenter__", cancelled_enter)
            for call in (lambda: jobs.submit("wf", {"k": 1}, user_id="u"),
                         lambda: store.append("s-2", [NoteAdded(text="y")])):
                cancels = 1
                with pytest.raises(asyncio.CancelledError):
                    await call()
                assert cancels == 0
        for _ in range(6):  # the pool's connections in turn, and the kept one
            assert await store.stream_version("s-1") == 3
            assert await store.last_position() == 3
            assert await jobs.list() == []
        await jobs.submit("wf", {"k": 2}, user_id="u")
        r = await store.append("s-2", [NoteAdded(text="z")], expected_version=0)
        assert (r.first_position, r.stream_version) == (5, 1)
        assert [j.inputs for j in await jobs.list()] == [{"k": 2}]


async def test_an_append_cancelled_while_it_waits_for_the_append_lock_drops_the_kept_connection(
        fresh_pg: str) -> None:
    """PostgreSQL: an append cancelled while it waits for the append lock (psycopg cancels the
    query, and the rollback after it works) writes nothing, and the kept write connection,
    whose state after a cancellation is not known, is closed for good (not handed back to the
    pool) and replaced for the next append."""

    dsn = make_url(fresh_pg).set(drivername="postgresql").render_as_string(hide_password=False)
    async with await AsyncEventStore.open(fresh_pg, migrate=True) as store:
        await store.append("c-1", [NoteAdded(text="1")])
        writer: Any = store._writer
        kept = writer._conn.sync_connection.connection.driver_connection
        holder = psycopg.connect(dsn, autocommit=True)
        try:
            holder.execute("SELECT pg_advisory_lock(%s)", (APPEND_LOCK_ID,))
            task = asyncio.create_task(store.append("c-1", [NoteAdded(text="cancelled")]))
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = " \
                      "current_database() AND wait_event_type = 'Lock'"
            deadline = time.monotonic() + 10
            while holder.execute(waiting).fetchone() != (1,):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            holder.execute("SELECT pg_advisory_unlock(%s)", (APPEND_LOCK_ID,))
        finally:
            holder.close()
        assert kept.closed
        assert writer._conn is None
        assert store.engine.sync_engine.pool.checkedout() == 0
        assert (await store.append("c-1", [NoteAdded(text="2")])).stream_version == 2
        assert writer._conn.sync_connection.connection.driver_connection is not kept
        assert [e.data.text async for e in store.read_stream("c-1")] == ["1", "2"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("flavour", ["sync-read", "async-read", "async-append-other-loop"])
async def test_close_during_a_call_closes_its_connection_when_the_call_ends(
        fresh_pg: str, flavour: str) -> None:
    """A store closed while a call waits on the server (a read; an async append from another
    event loop, which takes a pooled connection): when the call ends, its connection is
    closed, not put back in the discarded pool (where it stayed open until the garbage
    collector came by)."""


    dsn = make_url(fresh_pg).set(drivername="postgresql").render_as_string(hide_password=False)
    sync = EventStore.open(fresh_pg, migrate=True)
    sync.append("s-1", [NoteAdded(text="x")])
    store: EventStore | AsyncEventStore = sync
    if flavour != "sync-read":
        sync.close()
        store = await AsyncEventStore.open(fresh_pg)
        await store.append("s-1", [NoteAdded(text="x")])  # its kept connection: this loop's
    locker = psycopg.connect(dsn)
    watcher = psycopg.connect(dsn, autocommit=True)  # (a transaction's view of the stats stays)
    outcome: list[object] = []

    def record(call: Any) -> None:
        try:
            outcome.append(call())
        except Exception as e:
            outcome.append(type(e))

    async def aread() -> None:
        assert isinstance(store, AsyncEventStore)
        try:
            outcome.append(len([e async for e in store.read_all()]))
        except Exception as e:
            outcome.append(type(e))

    try:
        locker.execute("LOCK TABLE es_events IN ACCESS EXCLUSIVE MODE")
        thread = task = None
        if isinstance(store, EventStore):
            thread = threading.Thread(target=record, args=(lambda: len(list(store.read_all())),))
        elif flavour == "async-append-other-loop":
            astore = store
            thread = threading.Thread(target=record, args=(lambda: asyncio.run(
                astore.append("s-2", [NoteAdded(text="y")])).last_position,))
        else:
            task = asyncio.create_task(aread())
        if thread is not None:
            thread.start()
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() " \
                  "AND wait_event_type = 'Lock'"
        deadline = time.monotonic() + 10
        while watcher.execute(waiting).fetchone() != (1,):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        if isinstance(store, EventStore):
            store.close()
        else:
            await store.close()
        locker.rollback()  # the call goes on, and ends
        if thread is not None:
            thread.join(10)
        else:
            assert task is not None
            await asyncio.wait_for(task, 10)
        assert outcome and outcome[-1] in (1, 2, 3, StoreClosed), outcome
        others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() " \
                 "AND pid <> pg_backend_pid()"
        deadline = time.monotonic() + 10
        locker.close()
        while (n := watcher.execute(others).fetchone()[0]) != 0:  # type: ignore[index]
            assert time.monotonic() < deadline, f"{n} connections left open"
            await asyncio.sleep(0.05)
    finally:
        locker.close()
        watcher.close()


@contextlib.contextmanager
def writer_on_another_loop(store: AsyncEventStore, stream: str = "s-1"
                           ) -> Iterator[asyncio.AbstractEventLoop]:
    """A second event loop in a thread of its own, on which ``store`` appends first (to
    ``stream``), so the store's kept write connection belongs to it; stopped and closed on
    exit."""
    other = asyncio.new_event_loop()
    runner = threading.Thread(target=other.run_forever)
    runner.start()
    try:
        asyncio.run_coroutine_threadsafe(
            store.append(stream, [NoteAdded(text="1")]), other).result(10)
        yield other
    finally:
        other.call_soon_threadsafe(other.stop)
        runner.join(10)
        other.close()


async def test_close_from_another_loop_closes_the_kept_connection_on_its_own_loop(
        fresh_pg: str) -> None:
    """The kept write connection belongs to the loop that first appended; a close from another
    loop closes it on that loop while it runs (it was dropped, for the garbage collector to
    close with SQLAlchemy's warning)."""

    dsn = make_url(fresh_pg).set(drivername="postgresql").render_as_string(hide_password=False)
    EventStore.open(fresh_pg, migrate=True).close()
    store = await AsyncEventStore.open(fresh_pg)
    with writer_on_another_loop(store):
        writer: Any = store._writer
        kept = writer._conn.sync_connection.connection.driver_connection
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await store.close()
            assert kept.closed  # closed by the time close returns (that loop was idle)
            gc.collect()
        assert [str(w.message) for w in caught if "garbage collector" in str(w.message)] == []
        with psycopg.connect(dsn, autocommit=True) as watcher:
            left = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                   "current_database() AND pid <> pg_backend_pid()").fetchone()
        assert left == (0,)


async def test_cancelled_sqlite_append_waiting_for_the_write_lock_rolls_back(
        tmp_path: Any) -> None:
    """On SQLite the append runs on aiosqlite's thread; when its caller gives up (a timeout)
    while it waits for the write lock, it rolls back instead of committing later."""

    path = tmp_path / "lock.db"
    async with await AsyncEventStore.open(f"sqlite:///{path}") as store:
        await store.append("s-1", [NoteAdded(text="before")])
        holder = sqlite3.connect(path, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        release = threading.Timer(0.5, holder.commit)
        release.start()
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await store.append("s-1", [NoteAdded(text="given up")])
        finally:
            release.join()
            holder.close()
        await asyncio.sleep(0.1)
        assert await store.stream_version("s-1") == 1
        assert (await store.append("s-1", [NoteAdded(text="after")])).stream_version == 2


async def test_a_sqlite_append_cancelled_during_its_commit_is_settled_when_it_raises(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancellation that lands while the commit is under way on aiosqlite's thread waits for
    it: the caller hears of the cancellation with the append committed, so a read right after
    agrees with every read later (it saw nothing, and then the whole batch)."""


    real_begin = aio._begin

    @contextlib.contextmanager
    def slow_commit(engine: Any, *, write: bool) -> Iterator[Any]:
        with real_begin(engine, write=write) as conn:
            yield conn
            if write:
                time.sleep(0.6)  # the body is done and committing: a slow fsync

    async with await AsyncEventStore.open(f"sqlite:///{tmp_path / 'c.db'}") as store:
        await store.append("warm-1", [NoteAdded(text="x")])
        monkeypatch.setattr(aio, "_begin", slow_commit)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):  # the body (about 1 ms) is done by then
                await store.append("s-1", [NoteAdded(text="x")] * 3)
        monkeypatch.setattr(aio, "_begin", real_begin)
        right_after = await store.stream_version("s-1")
        await asyncio.sleep(0.7)
        assert right_after == await store.stream_version("s-1") == 3


async def test_a_sqlite_append_cancelled_with_every_other_task_rolls_back(
        tmp_path: Any) -> None:
    """A shutdown cancels every task at once (asyncio.run's end, a SIGTERM handler), in any
    order: an append whose body is still running on aiosqlite's thread rolls back instead of
    committing after its caller was cancelled."""

    async with await AsyncEventStore.open(f"sqlite:///{tmp_path / 'all.db'}") as store:
        await store.append("warm-1", [NoteAdded(text="x")])
        in_body = threading.Event()

        def slow(conn: Any, recorded: Any) -> None:
            in_body.set()
            time.sleep(0.2)

        task = asyncio.create_task(store.append_with("s-1", [NoteAdded(text="given up")],
                                                     before_commit=slow))
        while not in_body.is_set():
            await asyncio.sleep(0.005)
        for other in reversed(list(asyncio.all_tasks())):  # the newest first
            if other is not asyncio.current_task():
                other.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.4)
        assert await store.stream_version("s-1") == 0


async def test_run_sync_is_one_transaction_on_both_backends(url: str) -> None:
    """run_sync(fn) (a read transaction by default) rolls back what fn wrote when fn raises;
    run_read runs reads only."""

    async with await AsyncEventStore.open(url) as store:
        await store.append("r-1", [NoteAdded(text="x")])

        def writes_then_fails(conn: Any) -> None:
            conn.execute(text("UPDATE es_streams SET version = 99"))
            raise ValueError("after a write")

        with pytest.raises(ValueError):
            await store.run_sync(writes_then_fails)
        assert await store.stream_version("r-1") == 1
        assert await store.run_read(
            lambda conn: conn.execute(text("SELECT count(*) FROM es_events")).scalar()) == 1


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_handler_that_breaks_the_connection_keeps_its_own_error(url: str,
                                                                      flavour: str) -> None:
    """When a handler's failure also closes the connection, the append raises the handler's
    error (not the failed rollback's), writes nothing, and the store appends on afterwards on
    a new connection."""
    def breaks(conn: Any, recorded: Any) -> None:
        conn.connection.dbapi_connection.close()
        raise ValueError("handler broke the connection")

    if flavour == "sync":
        with EventStore.open(url) as sync_store:
            sync_store.append("b-1", [NoteAdded(text="1")])
            sync_store.add_inline_handler(breaks)
            with pytest.raises(ValueError, match="broke the connection"):
                sync_store.append("b-1", [NoteAdded(text="lost")])
            sync_store.remove_inline_handler(breaks)
            assert sync_store.append("b-1", [NoteAdded(text="2")]).stream_version == 2
        return
    async with await AsyncEventStore.open(url) as store:
        await store.append("b-1", [NoteAdded(text="1")])
        store.add_inline_handler(breaks)
        with pytest.raises(ValueError, match="broke the connection"):
            await store.append("b-1", [NoteAdded(text="lost")])
        store.remove_inline_handler(breaks)
        assert (await store.append("b-1", [NoteAdded(text="2")])).stream_version == 2


def _count_trips(mp: pytest.MonkeyPatch) -> tuple[list[int], list[str]]:
    """Count psycopg async pipelines, and statements sent outside one (a round trip each)."""

    alone: list[str] = []
    pipelines: list[int] = []
    real_execute = psycopg.AsyncCursor.execute
    real_pipeline = psycopg.AsyncConnection.pipeline

    async def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if self._conn._pipeline is None:
            alone.append(str(query)[:40])
        return await real_execute(self, query, *args, **kwargs)

    def pipeline(self: Any) -> Any:
        pipelines.append(1)
        return real_pipeline(self)

    mp.setattr(psycopg.AsyncCursor, "execute", execute)
    mp.setattr(psycopg.AsyncConnection, "pipeline", pipeline)
    return pipelines, alone


async def test_overlapping_async_appends_each_take_one_round_trip() -> None:
    """Appends that overlap (as a LangGraph run's background puts overlap its next step), with
    reads going on beside them, each still take one round trip: they share the store's kept
    write connection, on which the store knows the end of the log.  (On pooled connections
    they were spread over several, and nearly every one missed its guess: three trips.)"""

    url = pg_url()
    reset_pg(url)
    async with await AsyncEventStore.open(url) as store:
        for s in ("o-1", "o-2"):
            await store.append(s, [NoteAdded(text="first")])
        with pytest.MonkeyPatch.context() as mp:
            pipelines, alone = _count_trips(mp)
            for _ in range(10):
                await asyncio.gather(store.append("o-1", [NoteAdded(text="a")]),
                                     store.append("o-1", [NoteAdded(text="b")]),
                                     store.append("o-2", [NoteAdded(text="c")]))
            appends = (len(pipelines), list(alone))
            pipelines.clear()
            await asyncio.gather(*(store.stream_version("o-1") for _ in range(3)))
        assert appends == (30, []), appends
        assert await store.stream_version("o-1") == 21
        assert await store.stream_version("o-2") == 11
        assert [e.position async for e in store.read_all()] == list(range(1, 33))


async def test_kept_write_connection_outlives_errors_and_is_replaced_when_killed() -> None:
    """A conflict or a failing handler leaves the kept connection usable (the next append is
    one round trip again); a connection the server killed while idle is replaced before the
    next append uses it, and one killed during an append fails that append with a
    DatabaseError, the next opening a new one."""

    url = pg_url()
    reset_pg(url)
    async with await AsyncEventStore.open(url) as store:
        await store.append("k-1", [NoteAdded(text="1")])
        with pytest.raises(WrongExpectedVersion):
            await store.append("k-1", [NoteAdded(text="stale")], expected_version=0)

        def fails(conn: Any, recorded: Any) -> None:
            raise ValueError("handler failed")

        store.add_inline_handler(fails)
        with pytest.raises(ValueError, match="handler failed"):
            await store.append("k-1", [NoteAdded(text="lost")])
        store.remove_inline_handler(fails)
        await store.append("k-1", [NoteAdded(text="2")])
        with pytest.MonkeyPatch.context() as mp:
            pipelines, alone = _count_trips(mp)
            await store.append("k-1", [NoteAdded(text="3")])
            assert (len(pipelines), alone) == (1, [])

        terminate_other_sessions(url)
        # The server hung up on the idle kept connection: the next append notices before it
        # sends anything and opens another, instead of failing (reads too, from the pool).
        assert (await store.append("k-1", [NoteAdded(text="4")])).stream_version == 4
        assert [e.data.text async for e in store.read_stream("k-1")] == [  # type: ignore[attr-defined]
            "1", "2", "3", "4"]
        # Killed in the middle of an append, the append fails with a typed error and the next
        # one works.
        def kill_now(conn: Any, recorded: Any) -> None:
            conn.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")

        store.add_inline_handler(kill_now)
        with pytest.raises(DatabaseError):
            await store.append("k-1", [NoteAdded(text="on a dying connection")])
        store.remove_inline_handler(kill_now)
        assert (await store.append("k-1", [NoteAdded(text="5")])).stream_version == 5


async def test_close_waits_for_an_append_on_the_kept_connection(url: str) -> None:
    """close() lets an append in progress finish; appends after it raise StoreClosed."""

    store = await AsyncEventStore.open(url, migrate=True)
    await store.append("w-1", [NoteAdded(text="1")])
    slow_started = asyncio.Event()

    def slow(conn: Any, recorded: Any) -> None:
        slow_started.set()
        time.sleep(0.2)  # a slow handler, inside the append's transaction

    store.add_inline_handler(slow)
    appending = asyncio.create_task(store.append("w-1", [NoteAdded(text="2")]))
    while not slow_started.is_set():
        await asyncio.sleep(0.001)
    await store.close()
    assert appending.done() and (await appending).stream_version == 2
    with pytest.raises(StoreClosed):
        await store.append("w-1", [NoteAdded(text="3")])
    async with await AsyncEventStore.open(url) as again:
        assert await again.stream_version("w-1") == 2


async def test_close_from_another_loop_waits_for_an_append_in_progress_there(url: str) -> None:
    """close() called from another loop than the kept connection's, while an append runs on
    it there: it returns once that append is done, with the kept connection closed."""

    store = await AsyncEventStore.open(url, migrate=True)
    with writer_on_another_loop(store, "w-1") as other:
        writer: Any = store._writer
        kept = writer._conn
        slow_started = threading.Event()

        def slow(conn: Any, recorded: Any) -> None:
            slow_started.set()
            time.sleep(0.3)  # a slow handler, inside the append's transaction

        store.add_inline_handler(slow)
        appending = asyncio.run_coroutine_threadsafe(
            store.append("w-1", [NoteAdded(text="2")]), other)
        assert await asyncio.to_thread(slow_started.wait, 10)
        await store.close()
        assert appending.done() and appending.result().stream_version == 2
        assert kept.closed or kept.invalidated
        assert writer._conn is None
    async with await AsyncEventStore.open(url) as again:
        assert await again.stream_version("w-1") == 2


async def test_appends_from_another_event_loop_use_a_pooled_connection(url: str) -> None:
    """The kept connection belongs to the loop that first appended; a store used from a second
    loop (another thread) appends there on pooled connections, both correctly."""

    async with await AsyncEventStore.open(url, migrate=True) as store:
        await store.append("l-1", [NoteAdded(text="main")])
        errors: list[BaseException] = []

        def other_loop() -> None:
            async def appends() -> None:
                for i in range(5):
                    await store.append("l-2", [NoteAdded(text=f"other {i}")])
            try:
                asyncio.run(appends())
            except BaseException as e:  # reported below
                errors.append(e)

        thread = threading.Thread(target=other_loop)
        thread.start()
        for i in range(5):
            await store.append("l-1", [NoteAdded(text=f"main {i}")])
            await asyncio.sleep(0)
        await asyncio.to_thread(thread.join)
        assert errors == []
        assert await store.stream_version("l-1") == 6
        assert await store.stream_version("l-2") == 5
        assert [e.position async for e in store.read_all()] == list(range(1, 12))


async def test_close_while_the_first_append_opens_the_kept_connection(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() called while the first append is still opening the kept connection waits for
    that append (which commits) and then closes the connection: none is left checked out."""

    real_open = aio._KeptWriter._open

    async def slow_open(self: Any) -> Any:
        await asyncio.sleep(0.05)  # a server slow to accept the connection
        return await real_open(self)

    monkeypatch.setattr(aio._KeptWriter, "_open", slow_open)
    store = await AsyncEventStore.open(url, migrate=True)
    task = asyncio.create_task(store.append("r-1", [NoteAdded(text="racing close")]))
    await asyncio.sleep(0.01)  # the append holds the writer's lock, opening its connection
    await store.close()
    assert task.done()
    assert (await task).stream_version == 1
    assert store._engine.pool.checkedout() == 0
    async with await AsyncEventStore.open(url) as again:
        assert await again.stream_version("r-1") == 1


@pytest.mark.asyncio
async def test_a_long_pause_still_ends_soon_after_a_threading_stop_is_set() -> None:
    """A subscription's retry pause (up to 5 s) with a threading.Event as ``stop``: the wait
    looks at it at least every 0.5 s, as the README promises for ``stop``."""


    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    await _wait(stop, 5.0)
    assert time.monotonic() - t0 < 1.0


@pytest.mark.asyncio
async def test_a_cancelled_close_leaves_the_rest_to_the_next_close(url: str) -> None:
    """close() waits for an append in progress; cancelled meanwhile (a shutdown's deadline),
    the store refuses new calls, and a second close() still releases the kept connection and
    the pool (it returned at once before, leaving both open)."""



    store = await AsyncEventStore.open(url, migrate=True)
    await store.append("x-1", [NoteAdded(text="first")])
    parsed = make_url(url)
    holder: Any
    if parsed.get_backend_name() == "sqlite":  # another connection holds the write lock
        holder = sqlite3.connect(parsed.database or "", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    else:  # another session holds the append lock
        holder = psycopg.connect(parsed.set(drivername="postgresql").render_as_string(
            hide_password=False), autocommit=True)
        holder.execute("SELECT pg_advisory_lock(%s)", (APPEND_LOCK_ID,))
    slow = asyncio.create_task(store.append("x-1", [NoteAdded(text="in progress")]))
    await asyncio.sleep(0.2)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(store.close(), timeout=0.3)
    with pytest.raises(StoreClosed):
        await store.stream_version("x-1")
    if parsed.get_backend_name() == "sqlite":
        holder.execute("COMMIT")
    else:
        holder.execute("SELECT pg_advisory_unlock(%s)", (APPEND_LOCK_ID,))
    holder.close()
    assert (await slow).stream_version == 2  # the append in progress finished
    writer: Any = store._writer
    assert writer._conn is not None  # what the cancelled close left
    await store.close()
    assert writer._conn is None
    assert store._engine.sync_engine.pool.checkedout() == 0
    with EventStore.open(url) as sync:
        assert [e.data.text for e in sync.read_stream("x-1")] == ["first", "in progress"]  # type: ignore[attr-defined]


@pytest.mark.asyncio
@pytest.mark.parametrize("memory", [True, False])
async def test_calls_begun_before_close_raise_store_closed_not_a_new_empty_database(
        tmp_path: Any, memory: bool) -> None:
    """Calls begun before close() that reach the database after it (they waited for a
    preparation): StoreClosed, also for an in-memory store (whose calls connected to a new,
    empty database: 'no such table')."""
    url = "sqlite://" if memory else f"sqlite:///{tmp_path}/c.db"
    store = await AsyncEventStore.open(url)
    await store.append("s-1", [NoteAdded(text="a")])
    store.prepare_before_use(lambda: time.sleep(0.3))  # as an inline rebuild asks
    calls = [asyncio.create_task(store.stream_version("s-1")),
             asyncio.create_task(store.append("s-1", [NoteAdded(text="b")]))]
    await asyncio.sleep(0.05)  # both have begun, waiting for the preparation
    await store.close()
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        assert isinstance(outcome, StoreClosed) or not isinstance(outcome, BaseException), \
            repr(outcome)


async def test_transactions_begun_before_close_that_reach_the_database_after_it_are_refused(
        url: str) -> None:
    """A read, a ``run_sync`` or an append begun before close() (waiting for a preparation)
    that gets to the database after it raises StoreClosed on both backends: it opens no new
    connection on the closed store's engine (the append: no new kept write connection, left
    open for good), and does not answer as if the store were open."""
    store = await AsyncEventStore.open(url)
    await store.append("s-1", [NoteAdded(text="a")])
    store.prepare_before_use(lambda: time.sleep(0.3))
    calls = [asyncio.create_task(store.stream_version("s-1")),
             asyncio.create_task(store.run_sync(lambda conn: "ran")),
             asyncio.create_task(store.run_sync(lambda conn: "wrote", write=True)),
             asyncio.create_task(store.append("s-1", [NoteAdded(text="b")]))]
    await asyncio.sleep(0.05)  # all have begun, waiting for the preparation
    await store.close()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert [type(o) for o in outcomes] == [StoreClosed] * 4, outcomes
    assert store._engine.pool.checkedout() == 0  # (the append opened no kept connection)


@pytest.mark.asyncio
async def test_closing_while_reads_run_leaves_no_connection_open(url: str) -> None:
    """close() while other tasks read: every connection is closed, also one a read was handing
    back to the pool as close disposed of it.  That one went into the discarded pool, open
    (on SQLite for good: aiosqlite's thread holds it, one thread and one file each store)."""



    parsed = make_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"

    def open_connections() -> int:
        if sqlite:
            files = []
            for fd in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):
                    files.append(os.readlink(f"/proc/self/fd/{fd}"))
            return files.count(parsed.database)
        with psycopg.connect(parsed.set(drivername="postgresql").render_as_string(
                hide_password=False), autocommit=True) as c:
            row = c.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                            "current_database() AND pid <> pg_backend_pid()").fetchone()
            return int(row[0]) if row else 0

    async with await AsyncEventStore.open(url, migrate=True) as store:
        await store.append("s-1", [NoteAdded(text="a")])
    before = open_connections()
    rng = random.Random(7)

    async def reader(store: AsyncEventStore) -> None:
        while True:
            await store.stream_version("s-1")

    for _ in range(20):
        store = await AsyncEventStore.open(url)
        tasks = [asyncio.create_task(reader(store)) for _ in range(2)]
        await asyncio.sleep(rng.random() * 0.05)
        await store.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, StoreClosed) for r in results), results
    await asyncio.sleep(0.2)  # (PostgreSQL: the server's count catches up with the closes)
    assert open_connections() <= before


async def test_projection_reads_run_on_an_async_store_through_run_read(url: str) -> None:
    """The projection engine's sync reads (query_rows, current, fold_live, load_row, status)
    run for an AsyncEventStore through ``projections.aio.run_read`` and answer as on the sync
    store; called with the async store itself they (and the operators' tools) raise
    InvalidArgument naming that way, where they raised an untyped TypeError."""

    tally = TallyProjection(snapshot_every=2)
    with EventStore.open(url, migrate=True) as sync_store:
        inline(sync_store, tally)
        sync_store.append("counter-1", [CounterIncremented(by=4), CounterIncremented(by=7)])
        sync_store.append("counter-2", [CounterIncremented(by=1)])
        calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = [
            (query_rows, (tally,), {"tenant_id": "default", "status": "big"}),
            (current, (tally, "counter-1"), {"tenant_id": "default"}),
            (fold_live, (tally, "counter-1"), {"tenant_id": "default", "at_version": 1}),
            (load_row, (tally, "default", "counter-2"), {}),
        ]
        expected = [fn(sync_store, *args, **kw) for fn, args, kw in calls]
        expected_status = [(s.name, s.position) for s in status(sync_store, "tally")]
        async with await AsyncEventStore.open(url) as store:
            got = [await run_read(store, fn, *args, **kw) for fn, args, kw in calls]
            assert got == expected
            assert expected[0][0][1] == "counter-1" and expected[1][0].total == 11
            assert [(s.name, s.position) for s in await run_read(store, status, "tally")] == (
                expected_status)
            for fn, args, kw in [*calls, (rebuild, (tally,), {}), (verify, (tally,), {}),
                                 (snapshot_now, (tally, "counter-1"), {"tenant_id": "default"})]:
                with pytest.raises(InvalidArgument, match="run_read"):
                    fn(store, *args, **kw)
            with pytest.raises(InvalidArgument, match="AsyncEventStore"):
                await run_read(sync_store, status)  # type: ignore[arg-type]


async def test_a_live_fold_in_an_async_read_survives_a_commit_made_meanwhile(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live fold that would save a snapshot inside an async read (``run_read``, a twin
    facade's read) failed on SQLite with "database is locked" when another connection
    committed while it folded: SQLite cannot turn a read transaction into a write one then.
    The snapshot is a cache: on SQLite such a read folds and answers without saving one."""


    with EventStore.open(url, migrate=True) as sync_store:
        sync_store.append("counter-1", [CounterIncremented(by=1) for _ in range(5)])
        real = engine_module._fold_records

        def folded_then_another_commits(*args: Any, **kwargs: Any) -> Any:
            folded = real(*args, **kwargs)
            other = threading.Thread(target=sync_store.append,
                                     args=("other-1", [CounterIncremented(by=1)]))
            other.start()
            other.join(10)
            return folded

        monkeypatch.setattr(engine_module, "_fold_records", folded_then_another_commits)
        async with await AsyncEventStore.open(url) as store:
            state, version = await run_read(store, fold_live, TallyProjection(snapshot_every=2),
                                            "counter-1", tenant_id="default")
        assert (state.total, version) == (5, 5)
        assert sync_store.stream_version("other-1") == 1


async def test_a_function_raising_stop_iteration_fails_its_call_instead_of_hanging(
        url: str) -> None:
    """A ``run_sync`` function that raises ``StopIteration`` (``next()`` past the last row)
    fails the call with a ``RuntimeError``, as a coroutine's does on PostgreSQL; on SQLite a
    future refused the ``StopIteration`` handed over from aiosqlite's thread, and the caller
    waited for ever."""
    def first_row(conn: Any) -> Any:
        return next(iter([]))

    async with await AsyncEventStore.open(url) as store:
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(store.run_sync(first_row), 5)
        assert await asyncio.wait_for(store.last_position(), 5) == 0


async def test_a_second_cancellation_does_not_cut_short_the_hand_back_of_a_connection(
        tmp_path: Any) -> None:
    """A read cancelled while its transaction runs on aiosqlite's thread hands its connection
    back once the pool's rollback, queued behind that transaction, is done; a second
    cancellation meanwhile (a timeout around a timeout) no longer interrupts that: the
    connection went back invalidated, with an error in the log, and the next call opened a
    new one."""


    url = f"sqlite:///{tmp_path / 'twice.db'}"

    def slow_read(conn: Any) -> str:
        time.sleep(0.5)
        return "done"

    async with await AsyncEventStore.open(url) as store:
        await store.stream_version("x")  # one pooled connection, opened
        opened: list[int] = []
        event.listen(store.engine.sync_engine, "connect", lambda *a: opened.append(1))
        invalidated: list[int] = []
        event.listen(store.engine.sync_engine, "invalidate", lambda *a: invalidated.append(1))
        task = asyncio.create_task(store.run_sync(slow_read))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.stream_version("x")
        assert (opened, invalidated) == ([], [])


async def test_a_call_on_a_closed_aiosqlite_connection_raises_instead_of_waiting_for_ever(
        tmp_path: Any) -> None:
    """A transaction sent to an aiosqlite connection already closed (its thread gone) fails
    at once, as aiosqlite's own calls do, instead of waiting for an answer that never
    comes."""

    conn = await aiosqlite.connect(str(tmp_path / "closed.db"))
    await conn.close()
    with pytest.raises(ValueError, match="closed"):
        await asyncio.wait_for(aio._on_thread(conn, lambda: 1), 5)


def _in_a_transaction_closing_until(release: asyncio.Event, closers: list[Any]) -> Any:
    """A stand-in for a pooled aiosqlite connection still in a transaction, whose close (the
    pool's rollback) lasts until ``release`` is set; the task running that close is noted."""

    async def close() -> None:
        closers.append(asyncio.current_task())
        await release.wait()

    driver = SimpleNamespace(in_transaction=True)
    return SimpleNamespace(sync_connection=SimpleNamespace(
        connection=SimpleNamespace(driver_connection=driver)), close=close)


async def test_a_cancellation_during_the_hand_back_of_a_connection_is_raised_once_it_is_back(
        ) -> None:
    """The caller of a hand-back cancelled while the connection's close (shielded) goes on is
    cancelled once the close is done: the cancellation is not lost (the call returned as if
    nothing had happened)."""

    release = asyncio.Event()
    closers: list[Any] = []
    handing = asyncio.create_task(aio._hand_back(
        _in_a_transaction_closing_until(release, closers)))
    while not closers:
        await asyncio.sleep(0)
    handing.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    assert not handing.done()  # the close goes on
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(handing, 5)
    assert closers[0].done() and not closers[0].cancelled()


async def test_a_hand_back_whose_close_is_cancelled_raises_instead_of_waiting_again() -> None:
    """A hand-back whose close is itself cancelled (a loop's shutdown cancels every task)
    raises the cancellation at once: it does not wait again for the close that ended (an
    endless loop that never gave the event loop back)."""

    outcome: list[str] = []

    async def main() -> None:
        closers: list[Any] = []
        handing = asyncio.create_task(aio._hand_back(
            _in_a_transaction_closing_until(asyncio.Event(), closers)))
        while not closers:
            await asyncio.sleep(0)
        closers[0].cancel()
        try:
            await handing
        except asyncio.CancelledError:
            outcome.append("cancelled")

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive(), "the hand-back went round for ever"
    assert outcome == ["cancelled"]


async def test_a_preparation_runs_once_before_the_next_append_and_a_final_failure_is_kept(
        url: str) -> None:
    async with await AsyncEventStore.open(url) as store:
        runs: list[str] = []
        prep = store.prepare_before_use(lambda: runs.append("ran"))
        assert runs == [] and not prep.done
        await store.append("s-1", [NoteAdded(text="a")])
        assert runs == ["ran"] and prep.done and prep.failed is None
        await store.append("s-1", [NoteAdded(text="b")])
        assert runs == ["ran"]

        def fails() -> None:
            runs.append("failed")
            raise RuntimeError("rebuild failed")

        broken = store.prepare_before_use(fails)
        assert (await store.append("s-1", [NoteAdded(text="c")])).stream_version == 3
        assert isinstance(broken.failed, RuntimeError) and broken.done
        assert await store.stream_version("s-1") == 3
        assert runs == ["ran", "failed"]


@pytest.mark.parametrize("call", ["run_read", "run_sync"])
async def test_reads_and_transactions_wait_for_a_preparation(url: str, call: str) -> None:
    async with await AsyncEventStore.open(url) as store:
        runs: list[str] = []
        prep = store.prepare_before_use(lambda: runs.append("ran"))
        await getattr(store, call)(lambda conn: None)
        assert runs == ["ran"] and prep.done


async def test_a_preparation_failing_transiently_fails_its_call_and_runs_again_on_the_next(
        url: str) -> None:
    busy = DatabaseError("database is locked")
    busy.transient = True
    failures = [busy]
    runs: list[str] = []

    def prepare() -> None:
        runs.append("ran")
        if failures:
            raise failures.pop()

    async with await AsyncEventStore.open(url) as store:
        prep = store.prepare_before_use(prepare)
        with pytest.raises(DatabaseError, match="locked"):
            await store.append("s-1", [NoteAdded(text="a")])
        assert not prep.done and prep.failed is None
        assert await store.stream_version("s-1") == 0
        await store.append("s-1", [NoteAdded(text="a")])
        assert runs == ["ran", "ran"] and prep.done and prep.failed is None
        assert await store.stream_version("s-1") == 1


async def test_open_without_migrate_refuses_a_missing_sqlite_file_and_creates_none(
        tmp_path: Any) -> None:
    path = tmp_path / "missing.db"
    with pytest.raises(SchemaVersionMismatch, match="no file"):
        await AsyncEventStore.open(f"sqlite:///{path}", migrate=False)
    assert not path.exists()


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
async def test_open_without_migrate_refuses_a_database_without_the_schema(
        backend_name: str, tmp_path: Any, request: pytest.FixtureRequest) -> None:


    if backend_name == "sqlite":
        sqlite3.connect(tmp_path / "empty.db").close()
        url = f"sqlite:///{tmp_path}/empty.db"
    else:
        url = request.getfixturevalue("fresh_pg")
    with pytest.raises(SchemaVersionMismatch, match="no eventstore schema"):
        await AsyncEventStore.open(url, migrate=False)


async def test_open_names_the_missing_folder_of_a_sqlite_file(tmp_path: Any) -> None:
    path = tmp_path / "no-such-folder" / "events.db"
    with pytest.raises(DatabaseError, match="does not exist"):
        await AsyncEventStore.open(f"sqlite:///{path}")


async def test_open_applies_its_size_limit_clock_and_poll_interval(url: str) -> None:
    when = dt.datetime(2300, 5, 6, 7, 8, 9, 123457, tzinfo=dt.UTC)
    async with await AsyncEventStore.open(url, max_event_bytes=100,
                                          clock=lambda: when) as store:
        await store.append("c-1", [Blob(payload="x" * 50)])
        with pytest.raises(EventTooLarge):
            await store.append("c-1", [Blob(payload="x" * 200)])
        assert [e.recorded_at async for e in store.read_stream("c-1")] == [when]
    with pytest.raises(InvalidArgument, match="poll_interval"):
        await AsyncEventStore.open(url, poll_interval=5)
    with pytest.raises(InvalidArgument, match="pool_size"):
        await AsyncEventStore.open(url, pool_size=0)


async def test_every_call_after_close_raises_store_closed(url: str) -> None:
    async with await AsyncEventStore.open(url) as store:
        await store.append("s-1", [NoteAdded(text="a")])
    with pytest.raises(StoreClosed):
        store.engine  # noqa: B018
    await store.close()  # a second close is a no-op
    with pytest.raises(StoreClosed):
        await store.append("s-1", [NoteAdded(text="b")])
    with pytest.raises(StoreClosed):
        await store.stream_version("s-1")
    with pytest.raises(StoreClosed):
        await store.run_sync(lambda conn: None)
    with pytest.raises(StoreClosed):
        [e async for e in store.read_stream("s-1")]
    with pytest.raises(StoreClosed):
        [e async for e in store.read_all()]


async def test_run_sync_with_write_holds_the_sqlite_write_lock_from_its_start(
        tmp_path: Any) -> None:

    path = tmp_path / "w.db"

    def another_writer_is_locked_out(conn: Any) -> bool:
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return True
        else:
            other.execute("ROLLBACK")
            return False
        finally:
            other.close()

    async with await AsyncEventStore.open(f"sqlite:///{path}") as store:
        assert await store.run_sync(another_writer_is_locked_out, write=True) is True
        assert await store.run_sync(another_writer_is_locked_out) is False


async def test_open_migrates_a_new_sqlite_file_holding_the_write_lock_from_its_start(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The migration that ``open`` runs on a new SQLite file takes the write lock before its
    first statement (``BEGIN IMMEDIATE``), as the sync store's: two processes opening the same
    new file wait for each other instead of deadlocking on a read lock each."""


    path = tmp_path / "new.db"
    real = _migrate.migrate_on
    locked_out: list[bool] = []

    def migrate_on(conn: Any) -> str:
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            locked_out.append(False)
        except sqlite3.OperationalError:
            locked_out.append(True)
        finally:
            other.close()
        return real(conn)

    monkeypatch.setattr(_migrate, "migrate_on", migrate_on)
    async with await AsyncEventStore.open(f"sqlite:///{path}", migrate=True) as store:
        assert (await store.append("m-1", [NoteAdded(text="x")])).stream_version == 1
    assert locked_out == [True]


async def test_an_async_append_logs_tenant_stream_and_position(url: str) -> None:
    async with await AsyncEventStore.open(url) as store:
        with capture_logs() as logs:
            await store.append("conversation-1", [NoteAdded(text="a"), NoteAdded(text="b")],
                               tenant_id="acme")
    (entry,) = [e for e in logs if e["event"] == "events_appended"]
    assert (entry["tenant"], entry["stream"], entry["position"], entry["count"]) == (
        "acme", "conversation-1", 2, 2)


async def test_a_bound_store_passes_every_argument_through(url: str) -> None:
    """The BoundStore that runs sync code inside the async store's transactions (run_sync,
    run_read, the async facades) hands every argument of append and of the reads through."""


    noon = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
    async with await AsyncEventStore.open(url, clock=lambda: noon) as store:
        def writes(conn: Any) -> list[Any]:
            bound = BoundStore(store, conn)
            notes = [NoteAdded(text=t) for t in "abcd"]
            first = bound.append("note-1", notes, tenant_id="acme", expected_version=0,
                                 idempotency_key="k-1", metadata={"by": "me"})
            again = bound.append("note-1", notes, tenant_id="acme", idempotency_key="k-1")
            bound.append("blob-1", [Blob(payload="p")])
            with pytest.raises(WrongExpectedVersion):
                bound.append("blob-1", [Blob(payload="q")], expected_version=0)
            return [first.stream_version, again.duplicate, again.stream_version]

        assert await store.run_sync(writes, write=True) == [4, True, 4]

        def reads(bound: Any) -> list[Any]:
            return [
                [e.data.text for e in bound.read_stream("note-1", tenant_id="acme",
                                                        from_version=2, to_version=3)],
                [e.version for e in bound.read_stream("note-1", tenant_id="acme",
                                                      backwards=True, limit=2)],
                [e.metadata.get("by") for e in bound.read_stream("note-1", tenant_id="acme")],
                [e.position for e in bound.read_all(from_position=2, limit=2)],
                [e.stream_id for e in bound.read_all(categories=["blob"])],
                [e.type for e in bound.read_all(types=["test.Blob"])],
                [e.position for e in bound.read_all(tenant_id="default")],
                bound.stream_version("note-1", tenant_id="acme"),
                bound.stats(tenant_id="acme")["events"],
                bound.last_position(),
                bound.now(),
                bound.backend,
            ]

        assert await run_read(store, reads) == [
            ["b", "c"], [4, 3], ["me"] * 4, [2, 3], ["blob-1"], ["test.Blob"], [5], 4, 4, 5, noon,
            store.backend]
