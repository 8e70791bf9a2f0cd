"""Resource leaks across the public API, on both backends, failure paths included.

Each scenario runs once to warm up (imports, lazily started threads, the pool's first
connections), takes a baseline, runs many more times and then checks that what the process
holds is back at the baseline once the documented close has run (and the garbage collector):

- open file descriptors (``/proc/self/fd``: SQLite's database, ``-wal`` and ``-shm`` files,
  sockets to PostgreSQL, aiosqlite's and asyncio's pipes);
- server sessions on the test database (``pg_stat_activity``, from a separate watcher);
- threads (``threading.active_count()``: aiosqlite's, projectors', asyncio's executors);
- asyncio tasks left on the loop (``asyncio.all_tasks()``).

A per-iteration leak shows as a count that grows with the number of iterations.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from eventstore import (
    DatabaseError,
    EventStore,
    EventStoreError,
    InvalidEvent,
    InvalidStreamId,
    SchemaVersionMismatch,
    StoreClosed,
    WrongExpectedVersion,
)
from eventstore.aio import AsyncEventStore

from ._events import NoteAdded

ROUNDS = 20  # iterations of the cheap scenarios
HEAVY_ROUNDS = 6  # ... of those that open several stores or run graphs of calls


# -- measuring --------------------------------------------------------------------------------


def _open_fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
    return out


class Held:
    """What the process holds: open fds, threads and (PostgreSQL) sessions on the database."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.sqlite_path = parsed.database if parsed.get_backend_name() == "sqlite" else None
        self._watcher: psycopg.Connection[Any] | None = None
        if parsed.get_backend_name() == "postgresql":
            dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
            # Opened before the baseline, so its own socket is in both counts.
            self._watcher = psycopg.connect(dsn, autocommit=True)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()

    def sessions(self) -> int:
        if self._watcher is None:
            return 0
        row = self._watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()").fetchone()
        assert row is not None
        return int(row[0])

    def sqlite_files(self) -> int:
        """Descriptors on the SQLite database and its -wal and -shm files."""
        if not self.sqlite_path:
            return 0
        names = {self.sqlite_path, self.sqlite_path + "-wal", self.sqlite_path + "-shm"}
        return sum(1 for f in _open_fds() if f in names)

    def now(self) -> dict[str, int]:
        return {"fds": len(_open_fds()), "sqlite_files": self.sqlite_files(),
                "threads": threading.active_count(), "pg_sessions": self.sessions()}

    def settled(self, baseline: dict[str, int], timeout: float = 5.0, *,
                collect: bool = True) -> dict[str, int]:
        """The counts once none is above ``baseline`` (or ``timeout`` passed): a server
        session ends a moment after its client closed it, a thread after it was told to.
        Looked at first without the garbage collector (what a close released), then, with
        ``collect``, collecting (what is waiting in a cycle)."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.now()
            if all(now[k] <= baseline[k] for k in now) or time.monotonic() > deadline:
                return now
            if collect:
                gc.collect()
            time.sleep(0.02)


@pytest.fixture
def held(url: str) -> Iterator[Held]:
    h = Held(url)
    try:
        yield h
    finally:
        h.close()


def no_growth(held: Held, scenario: Callable[[], object], rounds: int = ROUNDS, *,
              dropped: bool = False) -> None:
    """Run ``scenario`` once, take the baseline, run it ``rounds`` times, and check the process
    holds no more than it held at the baseline (fds, threads, server sessions).

    ``dropped``: a scenario that leaves what it opened to the garbage collector: the
    baseline after one full collection, and after the rounds one full collection must let
    everything go (see
    ``test_unclosed_stores_with_facades_are_released_by_the_garbage_collector``)."""
    scenario()
    if dropped:
        gc.collect()
    baseline = held.now()
    if baseline["pg_sessions"]:  # (server sessions the warm-up closed may still be ending)
        baseline = held.settled({**baseline, "pg_sessions": 0}, timeout=1)
    for _ in range(rounds):
        scenario()
    if dropped:
        gc.collect()
    after = held.settled(baseline, collect=not dropped)
    assert all(after[k] <= baseline[k] for k in after), \
        f"after {rounds} rounds: {after}, baseline {baseline}"


def in_loop(make: Callable[[], Awaitable[object]]) -> Callable[[], None]:
    """A scenario running ``make()`` in a fresh event loop, checking it leaves no task."""

    def scenario() -> None:
        async def main() -> list[asyncio.Task[Any]]:
            await make()
            # An abandoned async generator is closed by a task the loop starts for it when
            # the generator is collected: given a moment to end.
            deadline = time.monotonic() + 2
            while True:
                await asyncio.sleep(0)
                left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                if not left or time.monotonic() > deadline:
                    return left
                await asyncio.sleep(0.005)

        left = asyncio.run(main())
        assert left == [], f"tasks left on the loop: {left}"

    return scenario


def unmigrated_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A database without the store's schema: a new PostgreSQL database, an empty SQLite
    file."""
    if backend == "postgres":
        return str(request.getfixturevalue("fresh_pg"))
    path = tmp_path / "unmigrated.db"
    sqlite3.connect(path).close()
    return f"sqlite:///{path}"


def newer_schema(url: str) -> None:
    """Mark the migrated database at ``url`` as at a schema newer than the code knows."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE eventstore_alembic_version SET version_num = 'ffff_newer'"))
    finally:
        engine.dispose()


@pytest.fixture
def newer_pg(backend: str) -> Iterator[str]:
    """PostgreSQL: a new database at a schema newer than the code (dropped afterwards)."""
    if backend != "postgres":
        yield ""
        return
    from tests.conftest import drop_pg_database, fresh_pg_database

    url = fresh_pg_database()
    try:
        EventStore.open(url, migrate=True).close()
        newer_schema(url)
        yield url
    finally:
        drop_pg_database(url)


def failing_opens(backend: str, url: str, tmp_path: Path, newer_pg: str,
                  request: pytest.FixtureRequest
                  ) -> list[tuple[str, bool | None, type[Exception]]]:
    """Opens that fail, sync and async alike: (url, migrate, the error): a bad URL, a refused
    connection (wrong port, unknown role), a SQLite path in a missing directory, a database
    without the schema (not migrating) and one newer than the code (the SQLite one at
    ``tmp_path/newer.db``)."""
    EventStore.open(url, migrate=True).close()
    unmigrated = unmigrated_url(backend, tmp_path, request)
    newer_url = f"sqlite:///{tmp_path}/newer.db"
    EventStore.open(newer_url, migrate=True).close()
    newer_schema(newer_url)
    pg = make_url(os.environ.get("EVENTSTORE_TEST_PG_URL", "postgresql+psycopg://x@127.0.0.1/x"))
    attempts: list[tuple[str, bool | None, type[Exception]]] = [
        ("nosuchdriver://x/y", None, EventStoreError),
        (pg.set(port=1).render_as_string(hide_password=False), None, DatabaseError),
        (pg.set(username="no_such_role", password="wrong").render_as_string(
            hide_password=False), None, DatabaseError),
        (f"sqlite:///{tmp_path}/missing-dir/x.db", None, DatabaseError),
        (unmigrated, False, SchemaVersionMismatch),
        (newer_url, None, SchemaVersionMismatch),
        (newer_url, True, SchemaVersionMismatch),
    ]
    if backend == "postgres":
        attempts += [(newer_pg, None, SchemaVersionMismatch),
                     (newer_pg, True, SchemaVersionMismatch)]
    return attempts


# -- 1. the sync store ---------------------------------------------------------------------------


def test_open_use_close_leaves_nothing_open(url: str, held: Held) -> None:
    """open, append, read (an iterator left half-read), subscribe left by ``break``, close."""
    EventStore.open(url, migrate=True).close()

    def scenario() -> None:
        store = EventStore.open(url)
        store.append("s-1", [NoteAdded(text="a"), NoteAdded(text="b")])
        assert len(list(store.read_stream("s-1"))) >= 2
        half = store.read_all()
        next(half)  # left unfinished
        for _ev in store.subscribe(from_position=1, stop=threading.Event()):
            break
        assert store.stats()["events"] >= 2
        store.close()
        with contextlib.suppress(StoreClosed):  # (events of a page already read, else this)
            list(half)

    no_growth(held, scenario)


def test_a_store_used_as_a_context_manager_closes_when_its_block_raises(url: str,
                                                                        held: Held) -> None:
    EventStore.open(url, migrate=True).close()

    def scenario() -> None:
        with pytest.raises(RuntimeError), EventStore.open(url) as store:
            store.append("s-1", [NoteAdded(text="x")])
            follow = store.subscribe(from_position=1, stop=threading.Event())
            next(follow)  # a subscription under way when the block raises
            raise RuntimeError("inside the with")

    no_growth(held, scenario)


def test_iterators_left_open_hold_no_connection(url: str, held: Held) -> None:
    """Many half-read reads and subscriptions of one store hold no pooled connection, and
    closing the store releases everything also while they are alive."""
    EventStore.open(url, migrate=True).close()

    def scenario() -> None:
        store = EventStore.open(url)
        store.append("s-1", [NoteAdded(text=str(i)) for i in range(300)])
        alive = []
        for _ in range(10):
            for it in (store.read_all(), store.read_stream("s-1"),
                       store.subscribe(stop=threading.Event())):
                next(it)
                alive.append(it)
        pool: Any = store.engine.pool
        assert pool.checkedout() <= 1  # (the kept write connection)
        store.close()
        del alive

    no_growth(held, scenario, HEAVY_ROUNDS)


# -- 2. failure paths ----------------------------------------------------------------------------


def test_opens_that_fail_leave_nothing_open(backend: str, url: str, held: Held,
                                            tmp_path: Path, newer_pg: str,
                                            request: pytest.FixtureRequest) -> None:
    """A bad URL, a refused connection (wrong port, unknown role), a SQLite path in a missing
    directory, a database without the schema (not migrating) and one newer than the code
    (migrating or not), tried again and again."""
    attempts = failing_opens(backend, url, tmp_path, newer_pg, request)
    newer_url = f"sqlite:///{tmp_path}/newer.db"
    attempts += [(f"sqlite:///{tmp_path}/missing-dir/x.db", False, SchemaVersionMismatch),
                 (newer_url, False, SchemaVersionMismatch)]

    def scenario() -> None:
        for target, migrate, error in attempts:
            with pytest.raises(error):
                EventStore.open(target, migrate=migrate)

    no_growth(held, scenario, 8)


def test_failing_appends_leave_nothing_open(url: str, held: Held) -> None:
    """Appends refused before the database (bad input), by it (WrongExpectedVersion), and a
    DatabaseError inside the append's transaction, many times on one store."""
    EventStore.open(url, migrate=True).close()
    store = EventStore.open(url)

    def failing_hook(conn: Any, recorded: Any) -> None:
        conn.exec_driver_sql("SELECT no_such_column FROM no_such_table")

    def scenario() -> None:
        with pytest.raises(WrongExpectedVersion):
            store.append("s-1", [NoteAdded(text="x")], expected_version=999)
        with pytest.raises(InvalidEvent):
            store.append("s-1", [NoteAdded(text="\ud800")])
        with pytest.raises(InvalidStreamId):
            store.append("", [NoteAdded(text="x")])
        with pytest.raises(DatabaseError):
            store.append_with("s-1", [NoteAdded(text="x")], before_commit=failing_hook)
        store.append("s-2", [NoteAdded(text="ok")])  # the store still works

    try:
        no_growth(held, scenario)
        pool: Any = store.engine.pool
        assert pool.checkedout() <= 1
    finally:
        store.close()
    with EventStore.open(url) as check:
        assert check.stream_version("s-1") == 0


def test_sqlite_appends_refused_for_the_write_lock_leave_nothing_open(tmp_path: Path) -> None:
    """SQLite: appends that give up waiting for the write lock another connection holds
    (a transient DatabaseError), sync and async."""
    path = tmp_path / "locked.db"
    url = f"sqlite:///{path}?busy_timeout=5"
    EventStore.open(url).close()
    held = Held(url)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        sync = EventStore.open(url)

        def scenario() -> None:
            with pytest.raises(DatabaseError) as caught:
                sync.append("s-1", [NoteAdded(text="x")])
            assert caught.value.transient

        no_growth(held, scenario)
        sync.close()

        async def attempts() -> None:
            async with await AsyncEventStore.open(url) as store:
                for _ in range(ROUNDS):
                    with pytest.raises(DatabaseError):
                        await store.append("s-1", [NoteAdded(text="x")])

        no_growth(held, in_loop(attempts), 2)
    finally:
        holder.rollback()
        holder.close()


# -- 3. the async store --------------------------------------------------------------------------


def test_async_open_use_close_leaves_nothing_open(url: str, held: Held) -> None:
    """AsyncEventStore: open, append, read, a subscription left by ``break``, one closed
    early (``aclose``), one abandoned half-read; then close."""
    EventStore.open(url, migrate=True).close()

    async def use() -> None:
        store = await AsyncEventStore.open(url)
        await store.append("s-1", [NoteAdded(text="a"), NoteAdded(text="b")])
        assert len([e async for e in store.read_stream("s-1")]) >= 2
        async for _ev in store.subscribe(from_position=1, stop=asyncio.Event()):
            break
        early = store.subscribe(from_position=1)
        await early.__anext__()
        await early.aclose()  # type: ignore[attr-defined]
        abandoned = store.subscribe(from_position=1, stop=threading.Event())
        await abandoned.__anext__()
        half = store.read_all()
        await half.__anext__()
        await store.close()
        del abandoned, half

    no_growth(held, in_loop(use))


def test_async_store_closes_when_its_async_with_block_raises(url: str, held: Held) -> None:
    EventStore.open(url, migrate=True).close()

    async def use() -> None:
        with pytest.raises(RuntimeError):
            async with await AsyncEventStore.open(url) as store:
                await store.append("s-1", [NoteAdded(text="x")])
                follow = store.subscribe(from_position=1)
                await follow.__anext__()
                raise RuntimeError("inside the async with")

    no_growth(held, in_loop(use))


def test_cancelled_async_calls_leave_nothing_open(url: str, held: Held) -> None:
    """Appends, reads and subscriptions cancelled at several points, many times on one
    store: the pool does not grow past its size, and close releases everything."""
    EventStore.open(url, migrate=True).close()

    async def use() -> None:
        store = await AsyncEventStore.open(url)
        await store.append("s-1", [NoteAdded(text=str(i)) for i in range(200)])

        async def read() -> int:
            return len([e async for e in store.read_all()])

        async def follow() -> None:
            async for _ev in store.subscribe(from_position=1):
                pass

        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.append("s-2", [NoteAdded(text="y")]), read, follow,
            store.last_position]
        for round_ in range(40):
            task = asyncio.ensure_future(calls[round_ % len(calls)]())
            for _ in range(round_ % 5):
                await asyncio.sleep(0)  # cancelled at different points of the call
            if round_ % 7 == 6:
                await asyncio.sleep(0.002)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        pool: Any = store.engine.sync_engine.pool
        assert pool.checkedout() <= 1  # (the kept write connection)
        assert (await store.append("s-3", [NoteAdded(text="z")])).stream_version >= 1
        await store.close()

    no_growth(held, in_loop(use), 3)


def test_async_opens_that_fail_leave_nothing_open(backend: str, url: str, held: Held,
                                                  tmp_path: Path, newer_pg: str,
                                                  request: pytest.FixtureRequest) -> None:
    attempts = failing_opens(backend, url, tmp_path, newer_pg, request)

    async def attempt() -> None:
        for target, migrate, error in attempts:
            with pytest.raises(error):
                await AsyncEventStore.open(target, migrate=migrate)

    no_growth(held, in_loop(attempt), 8)


# -- 4. facades, their async twins, projectors -----------------------------------------------


def test_facades_and_their_async_twins_leave_nothing_open(url: str, held: Held) -> None:
    from projections import AgentSessions, Continuations, Conversations, Flows, Jobs, SessionKey
    from projections.aio import (
        AsyncAgentSessions,
        AsyncContinuations,
        AsyncConversations,
        AsyncFlows,
        AsyncJobs,
    )

    EventStore.open(url, migrate=True).close()
    n = iter(range(10_000))

    def sync_facades() -> None:
        k = next(n)
        with EventStore.open(url) as store:
            Conversations(store).assign(f"c{k}", {"a": k})
            conts = Continuations(store)
            conts.pause(f"c{k}", "u", messages=[], pending_tool_calls=[], tools=[],
                        tool_schemas=[], agent_config={})
            conts.sweep()
            AgentSessions(store).save(SessionKey("t", f"r{k}", "n", "b", "a"), snapshot={},
                                      layer_specs=[])
            jobs = Jobs(store)
            job = jobs.submit("wf", {}, user_id="u")
            assert jobs.claim("w") is not None
            jobs.complete(job.job_id, "w", {})
            assert len(list(jobs.events(job.job_id, follow=True, timeout=1))) >= 3
            half = jobs.events(job.job_id)
            next(half)  # left unfinished
            Flows(store).save(f"f{k}", "m", {"x": k})

    async def async_facades() -> None:
        k = next(n)
        async with await AsyncEventStore.open(url) as store:
            await AsyncConversations(store).assign(f"c{k}", {"a": k})
            conts = AsyncContinuations(store)
            await conts.pause(f"c{k}", "u", messages=[], pending_tool_calls=[], tools=[],
                              tool_schemas=[], agent_config={})
            await conts.sweep()
            await AsyncAgentSessions(store).save(SessionKey("t", f"r{k}", "n", "b", "a"),
                                                 snapshot={}, layer_specs=[])
            jobs = AsyncJobs(store)
            job = await jobs.submit("wf", {}, user_id="u")
            assert await jobs.claim("w") is not None
            await jobs.complete(job.job_id, "w", {})
            async for _ev in jobs.events(job.job_id, follow=True, timeout=1):
                break
            await AsyncFlows(store).save(f"f{k}", "m", {"x": k})

    no_growth(held, sync_facades, HEAVY_ROUNDS)
    no_growth(held, in_loop(async_facades), HEAVY_ROUNDS)


def test_projectors_started_and_stopped_end_their_threads(url: str, held: Held) -> None:
    """``Projector(...).run(stop)`` on a thread, stopped with its event, again and again (one
    store, and a store per run); and one whose store is closed under it: the thread ends."""
    from projections import ConversationProjection, Conversations, Projector, status

    EventStore.open(url, migrate=True).close()
    shared = EventStore.open(url)
    Conversations(shared).assign("c-1", {"a": 1})

    def run_and_stop(store: EventStore, close_store_instead: bool = False) -> None:
        projector = Projector(store, [ConversationProjection()], poll_interval=0.01)
        stop = threading.Event()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                projector.run(stop)
            except BaseException as e:  # (a closed store ends the worker with StoreClosed)
                failure.append(e)

        worker = threading.Thread(target=work)
        worker.start()
        time.sleep(0.02)
        if close_store_instead:
            store.close()
        else:
            stop.set()
        worker.join(10)
        assert not worker.is_alive(), "the projector's thread did not end"
        if not close_store_instead:
            assert failure == []
            assert status(store, "conversations")[0].owner is None  # lease given up

    try:
        no_growth(held, lambda: run_and_stop(shared))
    finally:
        shared.close()

    def own_store() -> None:
        with EventStore.open(url) as store:
            run_and_stop(store)

    no_growth(held, own_store, HEAVY_ROUNDS)
    no_growth(held, lambda: run_and_stop(EventStore.open(url), close_store_instead=True),
              HEAVY_ROUNDS)


# -- 5. integrations -----------------------------------------------------------------------------


def test_langgraph_savers_leave_nothing_open(url: str, held: Held) -> None:
    pytest.importorskip("langgraph.checkpoint.base")
    from langgraph.checkpoint.base import empty_checkpoint

    from projections.langgraph_saver import AsyncEventStoreSaver, EventStoreSaver

    EventStore.open(url, migrate=True).close()
    n = iter(range(10_000))

    def config() -> Any:
        return {"configurable": {"thread_id": f"t-{next(n)}", "checkpoint_ns": ""}}

    def from_url() -> None:
        with EventStoreSaver.from_url(url) as saver:
            saved = saver.put(config(), empty_checkpoint(), {}, {})
            assert saver.get_tuple(saved) is not None
            assert len(list(saver.list(saved))) == 1
        with pytest.raises(RuntimeError), EventStoreSaver.from_url(url) as saver:
            saver.put(config(), empty_checkpoint(), {}, {})
            raise RuntimeError("inside the with")

    def owned_store_async_methods() -> None:
        store = EventStore.open(url)
        saver = EventStoreSaver(store)  # its a* methods run its sync ones on worker threads

        async def use() -> None:
            saved = await saver.aput(config(), empty_checkpoint(), {}, {})
            assert await saver.aget_tuple(saved) is not None
            assert len([c async for c in saver.alist(saved)]) == 1

        in_loop(use)()
        store.close()

    async def async_from_url() -> None:
        async with AsyncEventStoreSaver.from_url(url) as saver:
            saved = await saver.aput(config(), empty_checkpoint(), {}, {})
            assert await saver.aget_tuple(saved) is not None
            listing = saver.alist(None)
            await listing.__anext__()  # left unfinished
            # (its sync methods are for other threads)
            assert await asyncio.to_thread(saver.get_tuple, saved) is not None
        with pytest.raises(RuntimeError):
            async with AsyncEventStoreSaver.from_url(url) as saver:
                await saver.aput(config(), empty_checkpoint(), {}, {})
                raise RuntimeError("inside the async with")

    no_growth(held, from_url, HEAVY_ROUNDS)
    no_growth(held, owned_store_async_methods, HEAVY_ROUNDS)
    no_growth(held, in_loop(async_from_url), HEAVY_ROUNDS)


def test_crewai_persistence_leaves_nothing_open(url: str, held: Held, tmp_path: Path) -> None:
    """``EventStoreFlowPersistence(url)`` opens its store lazily and ``close()`` closes it
    (also after a reopen, and for copies CrewAI makes with ``model_copy`` / from a dump); on a
    store the caller owns it closes nothing; a URL it cannot open leaves nothing either."""
    pytest.importorskip("crewai")
    from projections.crewai_persistence import EventStoreFlowPersistence

    EventStore.open(url, migrate=True).close()
    newer_url = f"sqlite:///{tmp_path}/newer.db"
    EventStore.open(newer_url, migrate=True).close()
    newer_schema(newer_url)

    def own_store() -> None:
        persistence = EventStoreFlowPersistence(url)
        persistence.save_state("f-1", "step", {"x": 1})
        assert persistence.load_state("f-1") == {"x": 1}
        persistence.close()
        assert persistence.load_state("f-1") == {"x": 1}  # opens it again ...
        copy = persistence.model_copy()
        restored = EventStoreFlowPersistence.model_validate(persistence.model_dump())
        assert copy.load_state("f-1") == restored.load_state("f-1") == {"x": 1}
        for p in (persistence, copy, restored):
            p.close()  # ... and closes it again
        persistence.close()  # (twice: nothing to do)

    def callers_store() -> None:
        with EventStore.open(url) as store:
            persistence = EventStoreFlowPersistence(store)
            persistence.save_state("f-2", "step", {"x": 2})
            persistence.close()  # leaves the caller's store open
            assert persistence.load_state("f-2") == {"x": 2}

    def cannot_open() -> None:
        for target in (f"sqlite:///{tmp_path}/missing-dir/x.db", newer_url):
            persistence = EventStoreFlowPersistence(target)
            with pytest.raises(EventStoreError):
                persistence.save_state("f-3", "step", {"x": 3})
            with pytest.raises(EventStoreError):
                persistence.init_db()
            persistence.close()

    no_growth(held, own_store, HEAVY_ROUNDS)
    no_growth(held, callers_store, HEAVY_ROUNDS)
    no_growth(held, cannot_open, HEAVY_ROUNDS)


def test_unclosed_stores_with_facades_are_released_by_the_garbage_collector(
        url: str, held: Held) -> None:
    """Created and dropped without ``close()``: an ``EventStoreFlowPersistence(url)`` that
    opened its store, and a store with a facade (whose inline handler refers to the store, so
    the store is freed by the cyclic garbage collector, not when its last name goes).  What
    they held is let go by one full collection (it took two once: the kept write connection's
    clean-up handed it back to the pool, which lived on for one more collection, sessions and
    files open; the store now closes what it holds when the collector frees it)."""
    pytest.importorskip("crewai")
    from projections import Flows
    from projections.crewai_persistence import EventStoreFlowPersistence

    EventStore.open(url, migrate=True).close()

    def dropped_persistence() -> None:
        persistence = EventStoreFlowPersistence(url)
        persistence.save_state("f-1", "step", {"x": 1})
        assert persistence.load_state("f-1") == {"x": 1}

    def dropped_store_with_facade() -> None:
        store = EventStore.open(url)
        Flows(store).save("f-2", "step", {"x": 2})

    def dropped_plain_store() -> None:
        store = EventStore.open(url)
        store.append("s-1", [NoteAdded(text="x")])

    no_growth(held, dropped_persistence, HEAVY_ROUNDS, dropped=True)
    no_growth(held, dropped_store_with_facade, HEAVY_ROUNDS, dropped=True)
    no_growth(held, dropped_plain_store, HEAVY_ROUNDS, dropped=True)


# -- 6. the command line -------------------------------------------------------------------------


def test_command_line_in_process_leaves_nothing_open(backend: str, url: str, held: Held,
                                                     tmp_path: Path) -> None:
    """``eventstore.cli.main`` run again and again in one process, commands that succeed and
    commands that fail (a conflict, bad input, a missing database, a refused connection)."""
    from eventstore.cli import main

    pg = make_url(os.environ.get("EVENTSTORE_TEST_PG_URL", "postgresql+psycopg://x@127.0.0.1/x"))
    note = '{"type": "NoteAdded", "data": {"text": "hi"}}'
    commands: list[tuple[list[str], str, int]] = [
        (["migrate", "--url", url], "", 0),
        (["append", "s-1", "--url", url], note, 0),
        (["append", "s-1", "--url", url, "--expected-version", "0"], note, 3),
        (["append", "s-1", "--url", url], "not json", 2),
        (["read", "s-1", "--url", url], "", 0),
        (["read", "s-1", "--url", url, "--json", "--limit", "1"], "", 0),
        (["tail", "--url", url, "--from-position", "1", "--limit", "1"], "", 0),
        (["stats", "--url", url], "", 0),
        (["projections", "status", "--url", url], "", 0),
        (["projections", "run", "--once", "--url", url], "", 0),
        (["projections", "rebuild", "conversations", "--url", url], "", 0),
        (["projections", "verify", "conversations", "--url", url], "", 0),
        (["read", "s-1", "--url", f"sqlite:///{tmp_path}/missing.db"], "", 2),
        (["stats", "--url", pg.set(port=1).render_as_string(hide_password=False)], "", 1),
        (["no-such-command"], "", 2),
    ]

    def run_all() -> None:
        for argv, stdin, code in commands:
            saved = sys.stdin
            sys.stdin = io.StringIO(stdin)
            try:
                with contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):
                    assert main(argv) == code, argv
            finally:
                sys.stdin = saved

    no_growth(held, run_all, 4)
