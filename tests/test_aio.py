"""AsyncEventStore specifics: async iteration, asyncio stop events, inline projections."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from eventstore import EventStore, WrongExpectedVersion
from eventstore.aio import AsyncEventStore
from projections import ConversationProjection, inline
from projections._engine import load_row
from projections.events import VariablesAssigned, VariableValue
from tests._events import NoteAdded

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
    from eventstore import AsyncEventStore as Exported

    assert Exported is AsyncEventStore


async def test_sqlite_transactions_take_one_trip_to_aiosqlites_thread(tmp_path: Any) -> None:
    """On SQLite an async append or read runs whole on the aiosqlite connection's thread: one
    hand-over for the transaction and one for the pool's reset, not one per statement."""
    import aiosqlite

    trips: list[str] = []
    real = aiosqlite.Connection._execute

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        trips.append(getattr(fn, "__name__", repr(fn)))
        return await real(self, fn, *args, **kwargs)

    async with await AsyncEventStore.open(f"sqlite:///{tmp_path / 'trips.db'}") as store:
        await store.append("c-1", [NoteAdded(text="warm")])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(aiosqlite.Connection, "_execute", counted)
            r = await store.append("c-1", [NoteAdded(text="a"), NoteAdded(text="b")],
                                   expected_version=1)
            appended = list(trips)
            trips.clear()
            texts = [e.data.text async for e in store.read_stream("c-1")]  # type: ignore
            read = list(trips)
        assert (r.first_position, r.stream_version) == (2, 3)
        assert texts == ["warm", "a", "b"]
        assert len(appended) <= 2, appended
        assert len(read) <= 2, read


async def test_async_transactions_see_the_callers_context_variables(url: str) -> None:
    """Inline handlers run with the context of the task that appends (structlog's bound
    context lives there), on SQLite's worker thread as on PostgreSQL's event loop."""
    import contextvars

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
