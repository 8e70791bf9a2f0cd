"""The compiled statements the store runs on the DBAPI cursor (eventstore._sql)."""

from __future__ import annotations

import pickle
import uuid
from typing import Any

import pytest
from sqlalchemy import Integer, bindparam, select

from eventstore import EventStore
from eventstore._sql import Compiled, as_uuid, statement, uuid_param
from tests._events import NoteAdded


def fetch_all(cur: Any) -> list[tuple[Any, ...]]:
    rows = [tuple(r) for r in cur.fetchall()]
    cur.close()
    return rows


def test_names_left_out_take_the_statement_s_defaults(store: EventStore) -> None:
    """``Compiled.run`` fills a name the values leave out with the statement's default, and a
    value given wins over the default, in either parameter style (named and positional)."""
    stmt = select(bindparam("given", type_=Integer), bindparam("preset", 7, type_=Integer))
    with store.engine.connect() as conn:
        c = Compiled(stmt, conn.dialect)
        assert fetch_all(c.run(conn, {"given": 1})) == [(1, 7)]
        assert fetch_all(c.run(conn, {"given": 2, "preset": 8})) == [(2, 8)]
        assert fetch_all(c.run(conn, {"preset": 9, "given": 3})) == [(3, 9)]


def test_binary_results_only_where_asked_on_sync_psycopg(store: EventStore,
                                                         backend: str) -> None:
    """``binary=True`` has psycopg (sync) send the rows in PostgreSQL's binary format, and
    only then; SQLite takes the flag and returns the same rows."""
    store.append("note-1", [NoteAdded(text="a"), NoteAdded(text="b")])
    params = {"tenant_id": "default", "stream_id": "note-1", "lo": 1, "hi": 9, "page": 10}
    with store.engine.connect() as conn:
        query = statement("read_slice", conn.dialect)
        binary, text = query.run(conn, params, binary=True), query.run(conn, params)
        if backend == "postgres":
            assert (binary.pgresult.fformat(0), text.pgresult.fformat(0)) == (1, 0)
        b_rows, t_rows = fetch_all(binary), fetch_all(text)
    assert [r[0] for r in b_rows] == [1, 2]
    assert b_rows == t_rows


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"])
def test_stored_event_ids_read_back_as_whole_uuids(dialect_name: str) -> None:
    """An id as stored (32 hex digits on SQLite, a UUID on PostgreSQL) reads back as the UUID
    written, which compares, hashes, prints and pickles like one made by ``uuid.UUID``."""

    written = uuid.uuid4()
    read = as_uuid(uuid_param(written, dialect_name))
    assert read == written and hash(read) == hash(written) and str(read) == str(written)
    assert read.is_safe is uuid.SafeUUID.unknown
    assert pickle.loads(pickle.dumps(read)) == written
