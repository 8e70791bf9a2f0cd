"""Appending: versions, optimistic concurrency, atomic batches, immutability."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from sqlalchemy import Connection

from eventstore import (
    ANY,
    STREAM_EXISTS,
    EventStore,
    EventTooLarge,
    RecordedEvent,
    WrongExpectedVersion,
)
from tests._events import Blob, CounterIncremented, NoteAdded


def texts(store: EventStore, stream: str, tenant: str = "default") -> list[str]:
    return [e.data.text for e in store.read_stream(stream, tenant_id=tenant)]  # type: ignore[union-attr]


def test_first_append_starts_at_version_and_position_one(store: EventStore) -> None:
    """The first event of a new store has position 1 and version 1."""
    r = store.append("conversation-1", [NoteAdded(text="a")], expected_version=0)
    assert (r.first_position, r.last_position, r.stream_version, r.duplicate) == (1, 1, 1, False)


def test_batch_gets_contiguous_versions_and_positions(store: EventStore) -> None:
    """A batch of three after one event gets versions 2..4 and positions 2..4."""
    store.append("conversation-1", [NoteAdded(text="a")])
    r = store.append("conversation-1", [NoteAdded(text=t) for t in "bcd"], expected_version=1)
    assert (r.first_position, r.last_position, r.stream_version) == (2, 4, 4)
    evs = list(store.read_stream("conversation-1"))
    assert [e.version for e in evs] == [1, 2, 3, 4]
    assert [e.position for e in evs] == [1, 2, 3, 4]
    assert texts(store, "conversation-1") == ["a", "b", "c", "d"]


def test_append_with_stale_version_raises_with_details(store: EventStore) -> None:
    """A stale expected version raises WrongExpectedVersion naming stream, tenant, both versions."""
    store.append("conversation-ab12", [NoteAdded(text="x")] * 5, tenant_id="acme")
    with pytest.raises(WrongExpectedVersion) as info:
        store.append("conversation-ab12", [NoteAdded(text="y")], expected_version=3,
                     tenant_id="acme")
    err = info.value
    assert (err.stream_id, err.tenant_id, err.expected, err.actual) == (
        "conversation-ab12", "acme", 3, 5)
    assert "expected version 3" in str(err) and "acme" in str(err) and "at 5" in str(err)
    assert store.stream_version("conversation-ab12", tenant_id="acme") == 5


def test_expected_zero_fails_when_stream_exists(store: EventStore) -> None:
    """expected_version=0 means the stream must not exist yet."""
    store.append("job-1", [NoteAdded(text="a")], expected_version=0)
    with pytest.raises(WrongExpectedVersion) as info:
        store.append("job-1", [NoteAdded(text="b")], expected_version=0)
    assert info.value.actual == 1
    assert texts(store, "job-1") == ["a"]


def test_stream_exists_requires_an_event(store: EventStore) -> None:
    """STREAM_EXISTS fails on a new stream and succeeds once it has an event."""
    with pytest.raises(WrongExpectedVersion) as info:
        store.append("job-2", [NoteAdded(text="a")], expected_version=STREAM_EXISTS)
    assert info.value.actual == 0 and info.value.expected is STREAM_EXISTS
    assert store.stream_version("job-2") == 0
    store.append("job-2", [NoteAdded(text="a")])
    r = store.append("job-2", [NoteAdded(text="b")], expected_version=STREAM_EXISTS)
    assert r.stream_version == 2


def test_any_and_none_skip_the_check(store: EventStore) -> None:
    """ANY (and None) append whatever the stream's version."""
    store.append("flow-1", [NoteAdded(text="a")], expected_version=ANY)
    store.append("flow-1", [NoteAdded(text="b")], expected_version=None)
    assert store.stream_version("flow-1") == 2


def test_stream_version_is_zero_when_absent(store: EventStore) -> None:
    """stream_version of an unknown stream is 0."""
    assert store.stream_version("nothing-here") == 0


def test_batch_with_one_oversized_event_writes_nothing(store: EventStore) -> None:
    """One event over the size limit rejects the whole batch."""
    big = Blob(payload="x" * (1024 * 1024 + 10))
    with pytest.raises(EventTooLarge) as info:
        store.append("conversation-1", [NoteAdded(text="ok"), big])
    assert info.value.limit == 1024 * 1024 and info.value.size > info.value.limit
    assert store.stream_version("conversation-1") == 0
    assert list(store.read_all()) == []


def test_size_limit_is_configurable(url: str) -> None:
    """max_event_bytes changes the limit."""
    with EventStore.open(url, max_event_bytes=100) as small:
        small.append("c-1", [Blob(payload="x" * 50)])
        with pytest.raises(EventTooLarge):
            small.append("c-1", [Blob(payload="x" * 200)])
        assert small.stream_version("c-1") == 1


def test_the_size_limit_admits_exactly_its_bytes_and_counts_the_metadata(url: str) -> None:
    """An event whose encoding is exactly ``max_event_bytes`` goes in, one byte more does not;
    metadata is held to the same limit (the batch is refused whole, nothing written)."""
    with EventStore.open(url, max_event_bytes=100) as small:
        with pytest.raises(EventTooLarge) as info:
            small.append("c-1", [Blob(payload="x" * 200)])
        overhead = info.value.size - 200  # the encoding's bytes around the payload
        small.append("c-1", [Blob(payload="x" * (100 - overhead))])
        with pytest.raises(EventTooLarge) as info:
            small.append("c-1", [Blob(payload="x" * (101 - overhead))])
        assert (info.value.size, info.value.limit) == (101, 100)
        with pytest.raises(EventTooLarge, match="metadata") as info:
            small.append("c-1", [NoteAdded(text="ok")], metadata={"note": "x" * 100})
        assert info.value.size > 100
        small.append("c-1", [NoteAdded(text="ok")], metadata={"note": "x" * 50})
        assert [e.version for e in small.read_stream("c-1")] == [1, 2]


def test_metadata_of_exactly_the_size_limit_goes_in(url: str) -> None:
    with EventStore.open(url, max_event_bytes=100) as small:
        with pytest.raises(EventTooLarge) as info:
            small.append("c-1", [NoteAdded(text="ok")], metadata={"note": "x" * 200})
        overhead = info.value.size - 200
        small.append("c-1", [NoteAdded(text="ok")], metadata={"note": "x" * (100 - overhead)})
        assert small.stream_version("c-1") == 1


def test_failure_inside_the_transaction_rolls_back_the_batch(store: EventStore) -> None:
    """An error raised inside the append transaction leaves no event of the batch."""

    def boom(conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        assert [e.version for e in recorded] == [1, 2, 3]
        raise RuntimeError("crash after insert")

    with pytest.raises(RuntimeError):
        store.append_with("conversation-9", [NoteAdded(text=t) for t in "abc"],
                          before_commit=boom)
    assert store.stream_version("conversation-9") == 0
    assert list(store.read_all()) == []
    r = store.append("conversation-9", [NoteAdded(text="d")], expected_version=0)
    assert r.first_position == 1


def test_an_inline_handler_added_twice_runs_once_and_not_after_removal(store: EventStore
                                                                       ) -> None:
    calls: list[list[int]] = []

    def handler(conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        calls.append([e.version for e in recorded])

    store.add_inline_handler(handler)
    store.add_inline_handler(handler)
    store.append("c-1", [NoteAdded(text="a")])
    assert calls == [[1]]
    getattr(store, "inner", store).remove_inline_handler(handler)  # (the async shim's store)
    store.append("c-1", [NoteAdded(text="b")])
    assert calls == [[1]]


def test_appends_never_change_committed_events(store: EventStore) -> None:
    """Later appends, conflicts and duplicates leave earlier events byte-for-byte unchanged."""
    store.append("conversation-1", [NoteAdded(text="a"), NoteAdded(text="b")],
                 idempotency_key="k1", metadata={"m": 1})
    before = list(store.read_all())
    store.append("conversation-1", [NoteAdded(text="c")])
    store.append("conversation-1", [NoteAdded(text="a"), NoteAdded(text="b")],
                 idempotency_key="k1")
    with pytest.raises(WrongExpectedVersion):
        store.append("conversation-1", [NoteAdded(text="z")], expected_version=1)
    after = list(store.read_all())
    assert after[:2] == before
    assert len(after) == 3


def test_store_has_no_update_or_delete_api() -> None:
    """The public API offers no way to change or remove a committed event."""
    public = {n for n in dir(EventStore) if not n.startswith("_")}
    assert not {n for n in public if any(w in n for w in ("update", "delete", "remove_event",
                                                          "truncate", "overwrite"))}


def test_concurrent_writers_with_same_expected_version_one_wins(store: EventStore) -> None:
    """Eight threads append with the same expected version: exactly one wins."""
    store.append("conversation-race", [NoteAdded(text="seed")])
    barrier = threading.Barrier(8)
    outcomes: list[str] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        barrier.wait()
        try:
            store.append("conversation-race", [CounterIncremented(writer=str(i))],
                         expected_version=1)
            res = "won"
        except WrongExpectedVersion as e:
            assert e.actual == 2
            res = "lost"
        with lock:
            outcomes.append(res)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]
    assert store.stream_version("conversation-race") == 2


def test_metadata_round_trips(store: EventStore) -> None:
    """Metadata is stored per event and read back equal."""
    meta = {"correlation_id": "c1", "nested": {"a": [1, 2]}, "unicode": "żółw"}
    store.append("conversation-1", [NoteAdded(text="a"), NoteAdded(text="b")], metadata=meta)
    assert [e.metadata for e in store.read_stream("conversation-1")] == [meta, meta]
    store.append("conversation-1", [NoteAdded(text="c")])
    assert list(store.read_stream("conversation-1"))[-1].metadata == {}
