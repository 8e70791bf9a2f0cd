"""PostgreSQL: an inline projection never waits for a projector's lock under the append lock.

A projector's batch holds its projection's ``es_projections`` row (``FOR UPDATE``) while it
writes; one that froze mid-batch (SIGSTOP, a paused VM) holds it until the server ends its
session.  An inline append of that projection that waited for the row while holding the
append lock held every appender of the database, of every stream, behind the frozen worker.
Here a transaction of the test's own holds the row as such a worker would.
(SQLite has one write lock for everything: the README says a frozen worker holds appenders.)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from eventstore import EventStore, RawEvent
from eventstore._schema import projections
from eventstore.aio import AsyncEventStore
from projections import Conversations
from projections.aio import AsyncConversations
from projections.conversation import ConversationProjection
from projections.events import VariableValue

CONVERSATIONS = ConversationProjection().name


class FrozenWorker:
    """Holds a projection's checkpoint row locked, as a projector frozen mid-batch."""

    def __init__(self, url: str, name: str) -> None:
        self.engine = create_engine(url)
        self.conn = self.engine.connect()
        self.trans = self.conn.begin()
        self.conn.execute(select(projections.c.name).where(projections.c.name == name)
                          .with_for_update())

    def thaw(self) -> None:
        self.trans.rollback()
        self.conn.close()
        self.engine.dispose()


@pytest.fixture
def pg(fresh_pg: str) -> Iterator[EventStore]:
    store = EventStore.open(fresh_pg, migrate=True)
    try:
        yield store
    finally:
        store.close()


def _appends_elsewhere_go_on(url: str) -> None:
    """Another process's plain append (a store of its own) completes within 2 s."""
    other = EventStore.open(url)

    def append_and_close() -> None:
        with other:
            other.append("notes-1", [RawEvent(type="t.Note", data={"text": "hi"})])

    _within(2.0, append_and_close)


def _within(seconds: float, fn: Callable[[], object]) -> None:
    """``fn()`` completes within ``seconds`` (run in a thread: one that waits for the held row
    fails the test, and ends once the test lets the row go)."""
    worker = threading.Thread(target=fn, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still waiting after {seconds} s"


@pytest.mark.parametrize("stream", ["known", "new"],
                         ids=["one-round-trip-guess", "probing-path"])
def test_a_frozen_projector_holds_only_the_appends_of_its_projection(
        pg: EventStore, fresh_pg: str, stream: str) -> None:
    """While the projection's row is held, an inline append of it waits (nothing half-done) and
    appends of other streams, from this store and another, go through at once; when it is let
    go, the waiting append completes and its row holds it."""
    conversations = Conversations(pg)
    conversations.assign("known", {"n": 0})  # this process then guesses the next append's row
    frozen = FrozenWorker(fresh_pg, CONVERSATIONS)
    done: list[Any] = []
    waiter = threading.Thread(target=lambda: done.append(
        conversations.assign(stream, {"n": 1})))
    try:
        waiter.start()
        time.sleep(0.5)  # (it met the held row, and let go of the append lock)
        assert waiter.is_alive() and not done
        _appends_elsewhere_go_on(fresh_pg)
        _within(2.0, lambda: pg.append("notes-2", [RawEvent(type="t.Note",
                                                            data={"text": "here too"})]))
        assert waiter.is_alive() and pg.stream_version(f"conversation-{stream}") == (
            1 if stream == "known" else 0)
    finally:
        frozen.thaw()
    waiter.join(10)
    assert not waiter.is_alive() and len(done) == 1
    state = conversations.get(stream)
    assert state is not None and state.variables == {"n": 1}
    assert [e.stream_id for e in pg.read_all()][-1] == f"conversation-{stream}"


def test_a_command_deciding_under_the_append_lock_waits_outside_it_too(
        pg: EventStore, fresh_pg: str) -> None:
    """A facade command that lost a few conflicts decides under the append lock, in a
    transaction of its own: met with a held projection, it lets the append lock go, waits,
    and decides again."""
    from projections._command import _decide_locked
    from projections.events import VariablesAssigned

    conversations = Conversations(pg)
    conversations.assign("c", {"n": 0})
    frozen = FrozenWorker(fresh_pg, CONVERSATIONS)
    seen: list[int] = []

    def decision(state: Any, version: int) -> list[VariablesAssigned]:
        seen.append(version)
        return [VariablesAssigned(conversation_id="c", variables=[
            VariableValue(name="n", value=state.variables["n"] + 1, value_type="number")])]

    done: list[Any] = []
    waiter = threading.Thread(target=lambda: done.append(_decide_locked(
        pg, conversations.projection, "conversation-c", tenant_id="default",
        decision=decision, metadata=None)))
    try:
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not done
        _appends_elsewhere_go_on(fresh_pg)
    finally:
        frozen.thaw()
    waiter.join(10)
    assert len(done) == 1 and seen[-1] == 1
    state = conversations.get("c")
    assert state is not None and state.variables == {"n": 1} and state.version == 2


def test_a_callers_own_transaction_waits_for_the_row(pg: EventStore, fresh_pg: str) -> None:
    """In a transaction of the caller's (``AsyncEventStore.run_sync``), which cannot be run
    again for it, the append waits for the row, as before, and completes once it is let go."""
    from eventstore._bound import BoundStore

    async def scenario() -> None:
        store = await AsyncEventStore.open(fresh_pg)
        try:
            conversations = AsyncConversations(store)
            await conversations.assign("u", {"n": 0})
            frozen = FrozenWorker(fresh_pg, CONVERSATIONS)

            def in_transaction(conn: Any) -> int:
                bound = BoundStore(store, conn)  # type: ignore[arg-type]
                return bound.append("conversation-u", [RawEvent(
                    type="VariablesAssigned", data={"conversation_id": "u", "variables": [
                        {"name": "n", "value": 1, "value_type": "number"}]})]).stream_version

            try:
                waiting = asyncio.create_task(store.run_sync(in_transaction, write=True))
                await asyncio.sleep(0.5)
                assert not waiting.done()
            finally:
                frozen.thaw()
            assert await asyncio.wait_for(waiting, 10) == 2
            state = await conversations.get("u")
            assert state is not None and state.variables == {"n": 1}
        finally:
            await store.close()

    asyncio.run(scenario())


def test_the_async_store_waits_outside_the_append_lock_too(
        pg: EventStore, fresh_pg: str) -> None:
    """AsyncEventStore's appends run the same way."""

    async def scenario() -> None:
        store = await AsyncEventStore.open(fresh_pg)
        try:
            conversations = AsyncConversations(store)
            await conversations.assign("a", {"n": 0})
            frozen = FrozenWorker(fresh_pg, CONVERSATIONS)
            try:
                waiting = asyncio.create_task(conversations.assign("a", {"n": 1}))
                await asyncio.sleep(0.5)
                assert not waiting.done()
                await asyncio.to_thread(_appends_elsewhere_go_on, fresh_pg)
                assert not waiting.done()
            finally:
                frozen.thaw()
            assert await asyncio.wait_for(waiting, 10) == 2
            state = await conversations.get("a")
            assert state is not None and state.variables == {"n": 1}
        finally:
            await store.close()

    asyncio.run(scenario())


def test_many_waiting_appends_hold_no_connections_while_they_wait(fresh_pg: str) -> None:
    """Appends waiting for a held projection look at it now and then, each look on a pooled
    connection taken for it: more waiters than the pool holds leave this process's reads and
    other appends going (they waited the whole time each on a connection of their own, and the
    pool ran dry: QueuePool limit reached after 30 s)."""
    with EventStore.open(fresh_pg, migrate=True, pool_size=1) as store:
        conversations = Conversations(store)
        for i in range(12):
            conversations.assign(f"c{i}", {"n": 0})
        frozen = FrozenWorker(fresh_pg, CONVERSATIONS)
        errors: list[BaseException] = []

        def assign(i: int) -> None:
            try:
                conversations.assign(f"c{i}", {"n": 1})
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        waiters = [threading.Thread(target=assign, args=(i,)) for i in range(12)]
        try:
            for w in waiters:
                w.start()
            time.sleep(1.0)
            assert all(w.is_alive() for w in waiters)
            _within(2.0, lambda: store.stream_version("conversation-c0"))
            _within(2.0, lambda: store.append("notes-3", [RawEvent(type="t.Note",
                                                                   data={"text": "go"})]))
        finally:
            frozen.thaw()
        for w in waiters:
            w.join(15)
        assert errors == [] and not any(w.is_alive() for w in waiters)
        for i in range(12):
            state = conversations.get(f"c{i}")
            assert state is not None and state.variables == {"n": 1} and state.version == 2


def test_a_facade_command_decides_again_after_the_wait(fresh_pg: str) -> None:
    """A command that met the held projection decides again once it is free, at the time it
    is then: a resume called before its request's deadline, let through after it, is refused
    with deadline_passed (the decision made before the wait was appended as it was)."""
    from datetime import UTC, datetime, timedelta

    from projections import Jobs
    from projections.errors import Conflict
    from tests._clock import Clock

    clock = Clock(datetime(2026, 1, 1, 12, 0, tzinfo=UTC))
    with EventStore.open(fresh_pg, migrate=True, clock=clock) as store:
        jobs = Jobs(store, clock=clock)
        job = jobs.submit("wf", {}, user_id="u1")
        assert jobs.claim("w1") is not None
        jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?",
                     deadline=clock.now + timedelta(minutes=1))
        frozen = FrozenWorker(fresh_pg, "jobs")
        outcome: list[BaseException | object] = []

        def resume() -> None:
            try:
                outcome.append(jobs.resume(job.job_id, request_id="r1", input="yes"))
            except BaseException as e:
                outcome.append(e)

        waiter = threading.Thread(target=resume)
        try:
            waiter.start()
            time.sleep(0.5)
            assert waiter.is_alive()
            clock.advance(minutes=2)  # the deadline passes while it waits
        finally:
            frozen.thaw()
        waiter.join(10)
        (got,) = outcome
        assert isinstance(got, Conflict) and got.reason == "deadline_passed", got
        assert jobs.get(job.job_id).status == "suspended"  # (until a sweep or a cancel)


def test_an_append_that_waited_is_recorded_at_its_commit_without_psycopg_warnings(
        fresh_pg: str, caplog: pytest.LogCaptureFixture) -> None:
    """The events of an append that waited carry the store's time when it ran again (the
    README: recorded_at is the clock at commit), and the expected wait logs nothing from the
    driver (an aborted pipeline made psycopg warn on each one)."""
    from datetime import UTC, datetime

    from tests._clock import Clock

    clock = Clock(datetime(2026, 1, 1, 12, 0, tzinfo=UTC))
    with EventStore.open(fresh_pg, migrate=True, clock=clock) as store:
        conversations = Conversations(store)
        conversations.assign("r", {"n": 0})
        frozen = FrozenWorker(fresh_pg, CONVERSATIONS)
        waiter = threading.Thread(target=lambda: conversations.assign("r", {"n": 1}))
        with caplog.at_level("WARNING", logger="psycopg"):
            try:
                waiter.start()
                time.sleep(0.5)
                clock.advance(minutes=5)
            finally:
                frozen.thaw()
            waiter.join(10)
        last = list(store.read_stream("conversation-r"))[-1]
        assert last.recorded_at == clock.now == datetime(2026, 1, 1, 12, 5, tzinfo=UTC)
        assert not [r for r in caplog.records if r.name.startswith("psycopg")]


def test_an_append_gets_through_a_projector_that_keeps_the_row_busy(fresh_pg: str) -> None:
    """A projector catching up holds the row batch after batch, with gaps too short to land
    in: an append that saw it change hands queues for it (one batch, under the append lock)
    and gets through, sync, as a facade command, and async (it waited for the whole backlog)."""
    from projections import Jobs
    from projections.aio import AsyncJobs

    with EventStore.open(fresh_pg, migrate=True) as store:
        conversations, jobs = Conversations(store), Jobs(store)
        conversations.assign("b", {"n": 0})
        jobs.submit("wf", {}, user_id="u")
        stop = threading.Event()

        def busy_projector(name: str) -> None:
            engine = create_engine(fresh_pg)
            try:
                while not stop.is_set():
                    with engine.begin() as conn:
                        conn.execute(select(projections.c.name)
                                     .where(projections.c.name == name).with_for_update())
                        time.sleep(0.05)
            finally:
                engine.dispose()

        holders = [threading.Thread(target=busy_projector, args=(n,))
                   for n in (CONVERSATIONS, "jobs")]
        for h in holders:
            h.start()
        try:
            time.sleep(0.2)
            _within(5.0, lambda: conversations.assign("b", {"n": 1}))
            _within(5.0, lambda: jobs.submit("wf", {}, user_id="u2"))

            async def async_append() -> None:
                astore = await AsyncEventStore.open(fresh_pg)
                try:
                    await AsyncConversations(astore).assign("b", {"n": 2})
                    await AsyncJobs(astore).submit("wf", {}, user_id="u3")
                finally:
                    await astore.close()

            _within(10.0, lambda: asyncio.run(async_append()))
        finally:
            stop.set()
            for h in holders:
                h.join(5)
        state = conversations.get("b")
        assert state is not None and state.variables == {"n": 2} and state.version == 3
        assert len(jobs.list()) == 3
