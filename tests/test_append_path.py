"""The append's fast path: its kept connection and, on PostgreSQL, its one pipeline."""

from __future__ import annotations

from collections.abc import Sequence

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
