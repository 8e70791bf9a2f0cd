"""Catch-up subscriptions: every event exactly once, in order, and a prompt stop."""

from __future__ import annotations

import inspect
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import Connection
from structlog.testing import capture_logs

from eventstore import EventStore, RecordedEvent
from eventstore.errors import DatabaseError
from tests._events import CounterIncremented, NoteAdded


def test_subscribe_catches_up_then_follows(store: EventStore) -> None:
    """A subscriber gets past events, then new ones as they commit."""
    store.append("c-1", [NoteAdded(text="old")])
    stop = threading.Event()
    seen: list[RecordedEvent] = []

    def follow() -> None:
        for ev in store.subscribe(from_position=0, stop=stop):
            seen.append(ev)
            if len(seen) == 3:
                stop.set()

    t = threading.Thread(target=follow)
    t.start()
    time.sleep(0.3)
    store.append("c-2", [NoteAdded(text="new1"), NoteAdded(text="new2")])
    t.join(timeout=10)
    assert not t.is_alive()
    assert [e.position for e in seen] == [1, 2, 3]


def test_subscribe_resumes_from_position_inclusive(store: EventStore) -> None:
    """from_position is inclusive: resuming with last + 1 continues after the last seen."""
    store.append("c-1", [NoteAdded(text=str(i)) for i in range(5)])
    assert _positions_until(store, 3, stop_at=5) == [3, 4, 5]


def test_subscribe_ends_at_the_event_during_which_stop_was_set(store: EventStore) -> None:
    """A stop set while an event is handled ends the iteration there, not at the end of the
    page read with it (here all ten events are one page)."""
    store.append("c-1", [NoteAdded(text=str(i)) for i in range(10)])
    assert _positions_until(store, 1, stop_at=3) == [1, 2, 3]


def _positions_until(store: EventStore, from_position: int, *, stop_at: int) -> list[int]:
    """The positions a subscription gives until its stop, set while handling ``stop_at``."""
    stop = threading.Event()
    got = []
    for ev in store.subscribe(from_position=from_position, stop=stop):
        got.append(ev.position)
        if ev.position == stop_at:
            stop.set()
    return got


def test_subscribe_stops_within_half_a_second(store: EventStore) -> None:
    """Setting stop ends an idle subscription within 0.5 s."""
    stop = threading.Event()
    done = threading.Event()

    def follow() -> None:
        for _ in store.subscribe(stop=stop):
            pass
        done.set()

    t = threading.Thread(target=follow)
    t.start()
    time.sleep(0.2)
    stop.set()
    t0 = time.monotonic()
    assert done.wait(2)
    assert time.monotonic() - t0 < 0.6
    t.join()


def test_subscribe_filters_categories(store: EventStore) -> None:
    """subscribe(categories=…) yields only those streams."""
    store.append("job-1", [NoteAdded(text="j")])
    store.append("c-1", [NoteAdded(text="c")])
    store.append("job-2", [NoteAdded(text="k")])
    stop = threading.Event()
    got = []
    for ev in store.subscribe(categories=["job"], stop=stop):
        got.append(ev.stream_id)
        if len(got) == 2:
            stop.set()
    assert got == ["job-1", "job-2"]


def test_subscriber_sees_every_event_once_while_writers_commit_late(store: EventStore) -> None:
    """Writers that hold their transactions open at random never make a subscriber skip."""
    writers, per_writer = 6, 25
    total = writers * per_writer
    stop = threading.Event()
    seen: list[int] = []

    def slow_commit(conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        time.sleep(random.uniform(0, 0.004))

    def follow() -> None:
        for ev in store.subscribe(stop=stop):
            seen.append(ev.position)
            if len(seen) >= total:
                stop.set()

    def write(w: int) -> None:
        for i in range(per_writer):
            store.append_with(f"c-{w}-{i % 3}", [CounterIncremented(writer=str(w))],
                              before_commit=slow_commit)

    sub = threading.Thread(target=follow)
    sub.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sub.join(timeout=20)
    stop.set()
    assert seen == list(range(1, total + 1))


def _failing_fetch(store: Any, errors: list[Exception | None]) -> Any:
    """Make the store's page reads raise ``errors`` first, one per read (``None``: read),
    then read."""
    target = getattr(store, "inner", store)  # the AsyncEventStore behind the blocking shim
    real = target._fetch
    if inspect.iscoroutinefunction(real):
        async def afetch(*args: Any) -> Any:
            if errors and (error := errors.pop(0)) is not None:
                raise error
            return await real(*args)
        target._fetch = afetch
    else:
        def fetch(*args: Any) -> Any:
            if errors and (error := errors.pop(0)) is not None:
                raise error
            return real(*args)
        target._fetch = fetch
    return target


def test_subscribe_rides_out_transient_database_errors(store: EventStore) -> None:
    """A lost connection (a transient DatabaseError) is retried from where the subscription
    was: every event still comes once, in order."""
    store.append("c-1", [NoteAdded(text=str(i)) for i in range(3)])
    lost = [DatabaseError("the connection is lost") for _ in range(2)]
    for e in lost:
        e.transient = True
    _failing_fetch(store, lost)
    stop = threading.Event()
    got = []
    for ev in store.subscribe(from_position=2, stop=stop):
        got.append(ev.position)
        if ev.position == 3:
            stop.set()
    assert got == [2, 3] and lost == []


def test_subscribe_pauses_from_50_ms_again_after_a_read_that_worked(store: EventStore) -> None:
    store.append("c-1", [NoteAdded(text="1")])
    lost = DatabaseError("the connection is lost")
    lost.transient = True
    _failing_fetch(store, [lost, lost, None, lost])
    stop = threading.Event()
    with capture_logs() as logs:
        for ev in store.subscribe(stop=stop):
            if ev.position == 1:
                store.append("c-1", [NoteAdded(text="2")])
            else:
                stop.set()
    assert [e["retry_in"] for e in logs if e["event"] == "subscribe_retrying"] == [
        0.05, 0.1, 0.05]


def test_subscribe_raises_a_database_error_that_is_not_transient(store: EventStore) -> None:
    store.append("c-1", [NoteAdded(text="x")])
    _failing_fetch(store, [DatabaseError("no such table: es_events")])
    with pytest.raises(DatabaseError, match="no such table"):
        next(iter(store.subscribe(stop=threading.Event())))


def test_subscribe_filters_by_tenant_and_type(store: EventStore) -> None:
    """subscribe(tenant_id=…) and subscribe(types=…) yield only those events."""
    store.append("c-1", [NoteAdded(text="a")], tenant_id="a")
    store.append("c-1", [NoteAdded(text="b")], tenant_id="b")
    store.append("counter-1", [CounterIncremented(by=1)], tenant_id="a")
    store.append("c-2", [NoteAdded(text="a")], tenant_id="a")
    assert _first_positions(store, 3, tenant_id="a") == [1, 3, 4]
    assert _first_positions(store, 3, types=["test.NoteAdded"]) == [1, 2, 4]


def _first_positions(store: EventStore, n: int, **filters: Any) -> list[int]:
    """The positions of the first ``n`` events a filtered subscription gives."""
    stop = threading.Event()
    got = []
    for ev in store.subscribe(stop=stop, **filters):
        got.append(ev.position)
        if len(got) == n:
            stop.set()
    return got
