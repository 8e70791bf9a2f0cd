"""The append's fast path: its kept connection and, on PostgreSQL, its one pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import Connection

from eventstore import EventStore, RecordedEvent
from eventstore.errors import DatabaseError, WrongExpectedVersion

from ._events import NoteAdded


class _FailingWriter:
    """An inline handler that only writes, and whose write fails."""

    def __call__(self, conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        cur = conn.connection.cursor()
        cur.execute("INSERT INTO no_such_table VALUES (1)")
        cur.close()

    @staticmethod
    def writes_only(conn: Connection, recorded: Sequence[RecordedEvent]) -> bool:
        return True


def test_failed_write_in_append_writes_nothing_and_store_recovers(store: EventStore) -> None:
    """A write that fails inside the append raises; nothing is written; the next append works."""
    handler = _FailingWriter()
    store.add_inline_handler(handler)
    with pytest.raises(DatabaseError, match="no_such_table"):
        store.append("x-1", [NoteAdded(text="1")], expected_version=0)
    store.remove_inline_handler(handler)
    assert store.stream_version("x-1") == 0
    assert store.last_position() == 0
    result = store.append("x-1", [NoteAdded(text="1")], expected_version=0)
    assert (result.first_position, result.stream_version) == (1, 1)


def test_conflict_leaves_the_kept_connection_usable(store: EventStore) -> None:
    """A version conflict rolls back; the following appends commit."""
    store.append("x-2", [NoteAdded(text="1")], expected_version=0)
    with pytest.raises(WrongExpectedVersion):
        store.append("x-2", [NoteAdded(text="2")], expected_version=0)
    store.append("x-2", [NoteAdded(text="3")], expected_version=1)
    assert [e.data.text for e in store.read_stream("x-2")] == ["1", "3"]  # type: ignore[attr-defined]


class _PreparedWriter:
    """An inline handler that reads first, then hands back writes that fail."""

    def __init__(self) -> None:
        self.seen_positions: list[int] = []

    def __call__(self, conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        write = self.prepare(conn, recorded)
        write(conn)

    def prepare(self, conn: Connection, recorded: Sequence[RecordedEvent]) -> Any:
        cur = conn.connection.cursor()
        cur.execute("SELECT count(*) FROM es_events")
        self.seen_positions.append(cur.fetchone()[0])
        cur.close()

        def write(c: Connection) -> None:
            w = c.connection.cursor()
            w.execute("INSERT INTO no_such_table VALUES (1)")
            w.close()

        return write


def test_prepared_handler_reads_then_its_failed_write_writes_nothing(store: EventStore) -> None:
    """A handler's prepare reads inside the append; when its writes fail, nothing is written
    and the error is a DatabaseError; the store keeps working."""
    store.append("x-0", [NoteAdded(text="before")])
    handler = _PreparedWriter()
    store.add_inline_handler(handler)
    with pytest.raises(DatabaseError, match="no_such_table"):
        store.append("x-3", [NoteAdded(text="1")], expected_version=0)
    store.remove_inline_handler(handler)
    # It ran inside the append: before the append's row was written where its writes are
    # pipelined (PostgreSQL), after it elsewhere; never in another transaction.
    expected_count = 1 if store.backend == "postgresql" else 2
    assert handler.seen_positions == [expected_count]
    assert store.stream_version("x-3") == 0
    assert store.last_position() == 1
    assert store.append("x-3", [NoteAdded(text="1")], expected_version=0).first_position == 2


def test_inline_projection_rows_commit_with_the_append(store: EventStore) -> None:
    """The conversation projection's row is written in the append's transaction, on both the
    pipelined (PostgreSQL) and the plain path: a query right after append sees it, and a
    refused append leaves the row as it was."""
    from projections import Conversations

    conversations = Conversations(store)
    v = conversations.assign("c-1", {"n": 1})
    assert conversations.get("c-1").variables == {"n": 1}
    with pytest.raises(WrongExpectedVersion):
        conversations.assign("c-1", {"n": 2}, expected_version=v - 1)
    assert conversations.get("c-1").variables == {"n": 1}
    assert conversations.assign("c-1", {"n": 3}, expected_version=v) == v + 1
    assert conversations.get("c-1").variables == {"n": 3}
