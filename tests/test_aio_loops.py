"""AsyncEventStore across event loops, as applications run it: ``asyncio.run`` per job, a
test framework's loop per test, a store opened once and used from several."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest
from sqlalchemy.engine import make_url

from eventstore import EventStore
from eventstore.aio import AsyncEventStore

from ._events import NoteAdded


def _pg_sessions(url: str) -> int:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as watcher:
        row = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                              "current_database() AND pid <> pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
def test_close_after_the_first_append_s_loop_ended_releases_the_kept_connection(
        backend_name: str, request: pytest.FixtureRequest, tmp_path: object) -> None:
    """The kept write connection belongs to the loop of the store's first append.  When that
    loop has ended and ``close`` runs on another, the connection is closed all the same: no
    aiosqlite thread and no open database file on SQLite, no server session on PostgreSQL
    (it used to wait for the garbage collector, and aiosqlite's thread never ended)."""
    if backend_name == "sqlite":
        url = f"sqlite:///{tmp_path}/loops.db"
    else:
        url = request.getfixturevalue("fresh_pg")
    EventStore.open(url, migrate=True).close()
    threads_before = threading.active_count()
    for round_ in range(3):
        store = asyncio.run(AsyncEventStore.open(url))
        asyncio.run(store.append("s-1", [NoteAdded(text=str(round_))]))  # the writer's loop
        asyncio.run(store.close())  # another loop; the first has ended
    deadline = time.monotonic() + 5
    while True:
        left = (threading.active_count() - threads_before if backend_name == "sqlite"
                else _pg_sessions(url))
        if left == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == 0
    with EventStore.open(url) as check:
        assert [e.data.text for e in check.read_stream("s-1")] == ["0", "1", "2"]  # type: ignore[attr-defined]
