"""AsyncEventStore specifics: async iteration, asyncio stop events, inline projections."""

from __future__ import annotations

import asyncio
import time

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
