"""AsyncEventStore across event loops, as applications run it: ``asyncio.run`` per job, a
test framework's loop per test, a store opened once and used from several."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sqlite3
import sys
import threading
import time
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.util.queue import Empty, Full

from eventstore import EventStore
from eventstore import aio as aio_module
from eventstore.aio import AsyncEventStore, _AnyLoopQueue
from eventstore.errors import StoreClosed

from ._events import NoteAdded


def _pg_sessions(url: str) -> int:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as watcher:
        row = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                              "current_database() AND pid <> pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def _migrated(backend_name: str, request: pytest.FixtureRequest, tmp_path: object,
              name: str) -> str:
    """A migrated database of the backend: an SQLite file ``name``.db, or a fresh PostgreSQL
    database."""
    url = (f"sqlite:///{tmp_path}/{name}.db" if backend_name == "sqlite"
           else str(request.getfixturevalue("fresh_pg")))
    EventStore.open(url, migrate=True).close()
    return url


def _left_open(backend_name: str, url: str, threads_before: int) -> int:
    """What a closed store may still hold, once given up to 5 s to let go: aiosqlite threads
    (on SQLite: threads beyond ``threads_before``) or server sessions (PostgreSQL)."""
    deadline = time.monotonic() + 5
    while True:
        left = (threading.active_count() - threads_before if backend_name == "sqlite"
                else _pg_sessions(url))
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
def test_close_after_the_first_append_s_loop_ended_releases_the_kept_connection(
        backend_name: str, request: pytest.FixtureRequest, tmp_path: object) -> None:
    """The kept write connection belongs to the loop of the store's first append.  When that
    loop has ended and ``close`` runs on another, the connection is closed all the same: no
    aiosqlite thread and no open database file on SQLite, no server session on PostgreSQL
    (it used to wait for the garbage collector, and aiosqlite's thread never ended)."""
    url = _migrated(backend_name, request, tmp_path, "loops")
    threads_before = threading.active_count()
    for round_ in range(3):
        store = asyncio.run(AsyncEventStore.open(url))
        asyncio.run(store.append("s-1", [NoteAdded(text=str(round_))]))  # the writer's loop
        asyncio.run(store.close())  # another loop; the first has ended
    assert _left_open(backend_name, url, threads_before) == 0
    with EventStore.open(url) as check:
        assert [e.data.text for e in check.read_stream("s-1")] == ["0", "1", "2"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
def test_loops_that_wait_for_a_pooled_connection_one_after_another_and_at_once(
        backend_name: str, request: pytest.FixtureRequest, tmp_path: object) -> None:
    """More tasks than the pool holds make them wait for a connection.  The pool's waiting
    used to be bound to the first event loop that ever waited: every later wait on another
    loop (the next ``asyncio.run``, or a loop of another thread) failed with a RuntimeError
    from SQLAlchemy's queue.  Now any loop may wait, also two at once, and nothing is lost."""
    url = _migrated(backend_name, request, tmp_path, "waits")
    store = asyncio.run(AsyncEventStore.open(url, pool_size=1))

    async def busy(tag: str, n: int = 24) -> int:
        async def one(k: int) -> int:
            await store.append(f"s-{tag}{k}", [NoteAdded(text=tag)])
            return len([e async for e in store.read_stream(f"s-{tag}{k}")])
        return sum(await asyncio.wait_for(asyncio.gather(*(one(k) for k in range(n))), 60))

    try:
        assert [asyncio.run(busy(f"r{i}-")) for i in range(3)] == [24, 24, 24]
        results: dict[str, object] = {}

        def in_thread(tag: str) -> None:
            try:
                results[tag] = asyncio.run(busy(tag))
            except Exception as e:  # (reported below)
                results[tag] = e

        threads = [threading.Thread(target=in_thread, args=(f"t{i}-",)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == {"t0-": 24, "t1-": 24}
    finally:
        asyncio.run(store.close())
    with EventStore.open(url) as check:
        assert check.stats()["events"] == 5 * 24


def test_the_pool_queue_times_out_and_wakes_a_waiter_on_another_loop() -> None:
    """A waiter whose time is up gets the pool's Empty, and a waiter on another thread's loop
    is woken by a put from here."""

    async def times_out() -> None:
        q = _AnyLoopQueue(2)
        with pytest.raises(Empty):
            await q._wait_for_one(0.05)
        assert not q._waiters

    asyncio.run(times_out())

    q = _AnyLoopQueue(2)
    got: list[object] = []
    waiting = threading.Thread(target=lambda: got.append(asyncio.run(q._wait_for_one(10))))
    waiting.start()
    deadline = time.monotonic() + 5
    while not q._waiters and time.monotonic() < deadline:
        time.sleep(0.01)
    q.put_nowait("conn")
    waiting.join(10)
    assert got == ["conn"] and q.qsize() == 0


def test_the_pool_queue_keeps_sqlalchemy_s_size_and_order() -> None:
    """As SQLAlchemy's queue: full at ``maxsize`` items (a put beyond raises Full, and the
    pool closes that connection), first in first out, or last in first out with
    ``use_lifo``."""

    for use_lifo, order in ((False, ["a", "b", "c"]), (True, ["c", "b", "a"])):
        q = _AnyLoopQueue(3, use_lifo=use_lifo)
        for conn in ("a", "b"):
            q.put_nowait(conn)
            assert not q.full()
        q.put_nowait("c")
        assert q.full()
        with pytest.raises(Full):
            q.put_nowait("d")
        assert [q.get_nowait() for _ in range(3)] == order
        with pytest.raises(Empty):
            q.get_nowait()


def test_the_pool_queue_serves_the_waiters_of_one_loop_in_the_order_they_came() -> None:
    """Connections put back one at a time go to one loop's waiters oldest first."""

    async def main() -> None:
        q = _AnyLoopQueue(3)
        waiters = [asyncio.ensure_future(q._wait_for_one(None)) for _ in range(3)]
        while len(q._waiters) < 3:
            await asyncio.sleep(0)
        pending = set(waiters)
        for waiter, conn in zip(waiters, ("a", "b", "c"), strict=True):
            q.put_nowait(conn)
            done, pending = await asyncio.wait(pending, timeout=5,
                                               return_when=asyncio.FIRST_COMPLETED)
            assert done == {waiter}
            assert waiter.result() == conn

    asyncio.run(main())


def test_a_loop_that_is_not_running_does_not_hold_back_another_loop_s_waiter() -> None:
    """A loop kept between ``run_until_complete`` calls can be left with a task waiting for
    a connection while it does not run.  A connection put back used to wake only the oldest
    waiter, on that loop: a waiter of a running loop waited out its whole timeout beside an
    idle connection.  Now the oldest waiter of each loop is woken; the stalled one, run
    again, finds none left and waits on for the next."""

    q = _AnyLoopQueue(2)
    stalled = asyncio.new_event_loop()
    try:
        task = stalled.create_task(q._wait_for_one(None))
        stalled.run_until_complete(asyncio.sleep(0.01))  # it waits; the loop stops running
        got: list[object] = []
        started = time.monotonic()
        waiting = threading.Thread(target=lambda: got.append(asyncio.run(q._wait_for_one(10))))
        waiting.start()
        while len(q._waiters) < 2 and time.monotonic() - started < 5:
            time.sleep(0.01)
        q.put_nowait("conn")
        waiting.join(10)
        assert got == ["conn"] and time.monotonic() - started < 5
        q.put_nowait("next")
        assert stalled.run_until_complete(asyncio.wait_for(task, 5)) == "next"
    finally:
        stalled.close()


def test_a_waiter_whose_time_runs_out_takes_a_connection_put_back_meanwhile() -> None:
    """A connection put back as a waiter's time runs out, its wake-up not yet there (here:
    never sent), goes to that waiter instead of the pool's Empty (a "pool limit reached"
    error beside an idle connection)."""

    async def put_back_unannounced() -> object:
        q = _AnyLoopQueue(2)
        waiting = asyncio.ensure_future(q._wait_for_one(0.05))
        await asyncio.sleep(0)  # it waits
        with q._mutex:
            q._items.append("conn")  # put back, its wake-up still on the way
        return await waiting

    assert asyncio.run(put_back_unannounced()) == "conn"


@pytest.mark.parametrize("loop_ran", [False, True], ids=["at-once", "after-a-turn"])
def test_a_waiter_cancelled_after_its_wake_up_passes_it_on(loop_ran: bool) -> None:
    """A waiter whose wake-up has come (its future set) but that is cancelled before it runs
    again (at once, or after the loop took a turn) takes no connection: it passes the wake-up
    on, and the next waiter gets the idle connection instead of waiting beside it until its
    timeout."""

    async def cancelled_once_woken() -> object:
        q = _AnyLoopQueue(2)
        first = asyncio.ensure_future(q._wait_for_one(None))
        second = asyncio.ensure_future(q._wait_for_one(None))
        await asyncio.sleep(0.01)  # both wait
        q.put_nowait("conn")
        if loop_ran:
            await asyncio.sleep(0)  # the wake-up is handed to the first waiter, not yet run
            assert q._waiters and not first.done()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await asyncio.wait_for(second, 2)

    assert asyncio.run(cancelled_once_woken()) == "conn"


def test_a_waiter_left_on_a_closed_loop_does_not_stop_a_connection_put_back() -> None:
    """A loop closed while a task of it still waited for a connection (stopped, then closed,
    its tasks never cancelled) leaves that waiter behind.  A connection put back wakes the
    other loops' waiters as ever: the put does not fail on the closed loop, and the waiter of
    a running loop (another thread's) gets the connection."""

    q = _AnyLoopQueue(2)
    gone = asyncio.new_event_loop()
    left = gone.create_task(q._wait_for_one(None))
    gone.run_until_complete(asyncio.sleep(0.01))  # it waits; its loop stops, then closes
    gone.close()
    assert not left.done()
    got: list[object] = []
    waiting = threading.Thread(target=lambda: got.append(asyncio.run(q._wait_for_one(10))))
    waiting.start()
    deadline = time.monotonic() + 5
    while len(q._waiters) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    q.put_nowait("conn")
    waiting.join(10)
    assert got == ["conn"] and q.qsize() == 0
    # The waiter left on the closed loop can never finish: drop it here, quietly, rather than
    # have asyncio log "Task was destroyed but it is pending!" in whichever test collects it.
    left._log_destroy_pending = False  # type: ignore[attr-defined]
    del left
    gc.collect()


@pytest.mark.parametrize("kept", [False, True])
def test_an_append_given_up_in_a_loop_that_then_ends_leaves_its_connection_usable(
        kept: bool, tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """An append cancelled while it waits for SQLite's write lock (``asyncio.wait_for``) rolls
    back on aiosqlite's thread once it gets the lock, after its caller has left and
    ``asyncio.run`` has closed the caller's loop.  aiosqlite's thread then handed the outcome
    to the closed loop, which raised there and ended the thread: the connection (pooled, or
    the kept write connection when the store's first append ran on that loop) answered no
    call again, and later reads and ``close`` waited for ever."""

    thread_errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: thread_errors.append(args.exc_value))
    path = f"{tmp_path}/given-up.db"
    EventStore.open(f"sqlite:///{path}", migrate=True).close()
    store = asyncio.run(AsyncEventStore.open(f"sqlite:///{path}"))
    if not kept:  # the kept write connection belongs to this first loop; later ones pool
        asyncio.run(store.append("s", [NoteAdded(text="first")]))
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    releaser = threading.Timer(0.6, holder.execute, ("ROLLBACK",))
    releaser.start()

    async def give_up() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(store.append("s", [NoteAdded(text="given up")]), 0.2)

    started = time.monotonic()
    asyncio.run(give_up())
    assert time.monotonic() - started < 0.5  # it left without waiting for the lock
    releaser.join()
    time.sleep(0.3)  # the abandoned append has met the closed loop by now

    async def go_on() -> list[str]:
        for _ in range(3):  # every pooled connection, whichever the pool hands out
            await asyncio.wait_for(store.last_position(), 5)
        await asyncio.wait_for(store.append("s", [NoteAdded(text="after")]), 5)
        return [e.data.text async for e in store.read_stream("s")]  # type: ignore[attr-defined]

    texts = asyncio.run(go_on())
    assert texts == (["after"] if kept else ["first", "after"])
    asyncio.run(asyncio.wait_for(store.close(), 5))
    holder.close()
    assert thread_errors == []  # (aiosqlite's thread died of the closed loop)


def test_loops_that_end_with_reads_still_running_hand_every_connection_back(
        tmp_path: object) -> None:
    """``asyncio.run`` per job, each job ending while tasks of it still read: ``asyncio.run``
    cancels them, and with them the task that ``async with`` closes a connection in.  Now and
    then that task was cancelled before it began, and its connection never went back to the
    pool: its aiosqlite thread and open file stayed after ``close`` (about one in five jobs)."""
    path = f"{tmp_path}/shutdown.db"
    EventStore.open(f"sqlite:///{path}", migrate=True).close()
    threads_before = threading.active_count()
    store = asyncio.run(AsyncEventStore.open(f"sqlite:///{path}"))

    async def reader(k: int) -> None:
        while True:
            await store.stream_version(f"s-{k}")
            async for _ev in store.read_stream(f"s-{k}"):
                pass

    async def job() -> None:
        readers = [asyncio.ensure_future(reader(k)) for k in range(4)]
        await asyncio.sleep(0.02)  # returns: asyncio.run cancels the readers
        assert not any(r.done() for r in readers)

    for _ in range(60):
        asyncio.run(job())
    asyncio.run(store.close())
    deadline = time.monotonic() + 5
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == threads_before


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
def test_loops_in_two_threads_that_first_append_at_once_share_nothing(
        backend_name: str, request: pytest.FixtureRequest, tmp_path: object,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads, each with a loop of its own, make the store's first appends at the same
    moment: one loop adopts the kept write connection, the other appends on pooled ones.  Both
    had adopted it (the check and the adoption were not one step): an append failed with
    "bound to a different event loop", or waited for ever for a wake-up sent from the other
    thread, and a connection was left open after ``close``.  Here both threads are held at the
    adoption until the other arrives (a lock made by the store waits for the other thread)."""
    url = _migrated(backend_name, request, tmp_path, "adopt")
    threads_before = threading.active_count()
    store = asyncio.run(AsyncEventStore.open(url))
    meet = threading.Barrier(2)
    real_lock = asyncio.Lock

    def lock_after_the_other_thread_arrives() -> asyncio.Lock:
        if sys._getframe(1).f_globals.get("__name__") == "eventstore.aio":
            with contextlib.suppress(threading.BrokenBarrierError):
                meet.wait(timeout=1)  # (gives up when the other thread cannot get there)
        return real_lock()

    monkeypatch.setattr(asyncio, "Lock", lock_after_the_other_thread_arrives)
    errors: list[BaseException] = []

    def appender(n: int) -> None:
        async def appends() -> None:
            for i in range(20):
                await store.append(f"s-{n}", [NoteAdded(text=str(i))])
        try:
            asyncio.run(appends())
        except BaseException as e:  # (reported below)
            errors.append(e)

    threads = [threading.Thread(target=appender, args=(n,), daemon=True) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    monkeypatch.undo()
    assert not [t for t in threads if t.is_alive()], "an append never returned"
    assert errors == []
    asyncio.run(store.close())
    assert _left_open(backend_name, url, threads_before) == 0
    with EventStore.open(url) as check:
        assert check.stream_version("s-1") == check.stream_version("s-2") == 20


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
def test_a_close_from_another_loop_as_the_appending_loop_ends_leaves_nothing_behind(
        backend_name: str, request: pytest.FixtureRequest, tmp_path: object,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread's loop appends until the store is closed from the main thread, and ends as
    soon as its append is refused.  The kept connection is closed all the same, and quietly:
    it used to be closed on the appending loop, and that close was cancelled half-way when
    ``asyncio.run`` returned (SQLAlchemy logged "Exception terminating connection" and
    aiosqlite's thread died answering a closed loop)."""
    url = _migrated(backend_name, request, tmp_path, "ending")
    died: list[str] = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: died.append(f"{args.exc_type.__name__}: {args.exc_value}"))
    threads_before = threading.active_count()
    for round_ in range(5):
        store = asyncio.run(AsyncEventStore.open(url))
        appending = threading.Event()
        refused: list[BaseException] = []

        def appender(store: AsyncEventStore = store, appending: threading.Event = appending,
                     refused: list[BaseException] = refused) -> None:
            async def until_closed() -> None:
                try:
                    while True:
                        await store.append("s-1", [NoteAdded(text="x")])
                        appending.set()
                except StoreClosed as e:
                    refused.append(e)  # and this loop ends at once

            asyncio.run(until_closed())

        t = threading.Thread(target=appender)
        t.start()
        assert appending.wait(10)
        asyncio.run(store.close())
        t.join(10)
        assert not t.is_alive() and len(refused) == 1, round_
    assert _left_open(backend_name, url, threads_before) == 0
    assert died == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
@pytest.mark.parametrize("how_it_ends", ["asyncio.run", "stopped, then closed"])
def test_a_close_from_another_loop_that_ends_just_as_close_looks_releases_everything(
        backend_name: str, how_it_ends: str, request: pytest.FixtureRequest, tmp_path: object,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The appending loop is running when ``close`` (on another loop) looks, and has ended by
    the time ``close`` hands it the wait for its turn (``_call_on``, held here until then).
    ``close`` still returns at once and releases the kept connection: it raised "Event loop is
    closed" (a loop of ``asyncio.run``), or waited 10 s for a turn a stopped loop never gave
    and left the connection open."""
    url = _migrated(backend_name, request, tmp_path, "ended")
    threads_before = threading.active_count()
    store = asyncio.run(AsyncEventStore.open(url))
    appended, looked, ended, handed = (threading.Event() for _ in range(4))
    real = aio_module._call_on

    def after_that_loop_ended(loop: Any, make: Any) -> Any:
        looked.set()
        ended.wait(10)
        try:
            return real(loop, make)
        finally:
            handed.set()

    monkeypatch.setattr(aio_module, "_call_on", after_that_loop_ended)

    async def append_then_wait() -> None:
        await store.append("s-1", [NoteAdded(text="x")])
        appended.set()
        while not looked.is_set():
            await asyncio.sleep(0.01)

    def owner() -> None:
        if how_it_ends == "asyncio.run":
            asyncio.run(append_then_wait())
            ended.set()
        else:
            loop = asyncio.new_event_loop()
            loop.run_until_complete(append_then_wait())
            ended.set()
            handed.wait(10)
            loop.close()

    t = threading.Thread(target=owner, daemon=True)
    t.start()
    assert appended.wait(10)
    started = time.monotonic()
    asyncio.run(store.close())
    assert time.monotonic() - started < 5
    t.join(10)
    monkeypatch.undo()
    assert _left_open(backend_name, url, threads_before) == 0


class _Refused(Exception):
    """A connection the server would not open (here: refused once, on purpose)."""


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
def test_the_kept_connection_goes_to_a_later_loop_only_once_its_loop_closed_without_it(
        backend_name: str, request: pytest.FixtureRequest, tmp_path: object,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first loop to append adopts the kept write connection.  When it could not open one
    (refused), it keeps the claim while it is open: another loop's append goes on a pooled
    connection, handed back after it.  Once that first loop has closed, still without a
    connection, the next loop to append adopts the kept connection (which stays checked out),
    with turns of its own: appends that overlap there wait for each other on that loop, not
    on a lock the closed loop had waited on."""
    url = _migrated(backend_name, request, tmp_path, "adopt-later")
    store = asyncio.run(AsyncEventStore.open(url))
    real_open = aio_module._KeptWriter._open
    refusals = [_Refused("no connection for now") for _ in range(2)]

    async def refused_twice(self: Any) -> Any:
        if refusals:
            await asyncio.sleep(0.01)  # (the other append waits for its turn meanwhile)
            raise refusals.pop()
        return await real_open(self)

    monkeypatch.setattr(aio_module._KeptWriter, "_open", refused_twice)

    async def append_and_count(*texts: str) -> int:
        await asyncio.gather(*(store.append("s-1", [NoteAdded(text=t)]) for t in texts))
        return store._engine.pool.checkedout()

    async def both_refused() -> list[BaseException | Any]:
        return await asyncio.gather(
            *(store.append("s-1", [NoteAdded(text="refused")]) for _ in range(2)),
            return_exceptions=True)

    first = asyncio.new_event_loop()
    try:
        refused = first.run_until_complete(both_refused())
        assert [type(e) for e in refused] == [_Refused, _Refused]
        # The first loop is open (not running): another loop appends on a pooled connection.
        assert asyncio.run(append_and_count("pooled")) == 0
    finally:
        first.close()
    # Closed without a connection: the next loop adopts the kept one, and keeps it.
    assert asyncio.run(append_and_count("kept 1", "kept 2", "kept 3")) == 1
    # That loop closed with the connection: the next one appends on a pooled connection.
    assert asyncio.run(append_and_count("pooled again")) == 1
    asyncio.run(store.close())
    with EventStore.open(url) as check:
        assert sorted(e.data.text for e in check.read_stream("s-1")) == [  # type: ignore[attr-defined]
            "kept 1", "kept 2", "kept 3", "pooled", "pooled again"]


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
def test_a_close_that_stops_waiting_for_another_loop_s_append_closes_the_kept_one_after_it(
        backend_name: str, request: pytest.FixtureRequest, tmp_path: object,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``close`` from another loop waits a while for an append in progress on the kept
    connection's loop; when that append is still running after the wait, ``close`` returns
    and leaves the connection's close to that loop, once the append is done: the append
    commits, and the connection is closed then (no aiosqlite thread, no server session)."""
    url = _migrated(backend_name, request, tmp_path, "close-later")
    monkeypatch.setattr(aio_module, "_CLOSE_ELSEWHERE_WAIT", 0.1)
    threads_before = threading.active_count()
    store = asyncio.run(AsyncEventStore.open(url))
    in_append, release = threading.Event(), threading.Event()
    results: list[object] = []

    def slow(conn: Any, recorded: Any) -> None:
        in_append.set()
        release.wait(10)

    def owner() -> None:
        async def appends() -> None:
            await store.append("s-1", [NoteAdded(text="first")])
            store.add_inline_handler(slow)
            results.append(await store.append("s-1", [NoteAdded(text="slow")]))
            writer: Any = store._writer
            deadline = time.monotonic() + 5
            while writer._conn is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # (this loop goes on while its close runs)

        asyncio.run(appends())

    t = threading.Thread(target=owner, daemon=True)
    t.start()
    assert in_append.wait(10)
    started = time.monotonic()
    asyncio.run(store.close())
    assert time.monotonic() - started < 5  # it did not wait for the append
    release.set()
    t.join(10)
    assert not t.is_alive()
    assert [r.stream_version for r in results] == [2]  # type: ignore[attr-defined]
    assert _left_open(backend_name, url, threads_before) == 0
