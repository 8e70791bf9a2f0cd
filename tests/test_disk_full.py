"""A full disk under an SQLite store: every write that does not fit fails with a typed error
(``DatabaseError``) and leaves nothing of itself, and once there is room again the same store
goes on, its log, inline projections and LangGraph index all agreeing with the writes that
returned.

Two ways to run out of room, at the two places SQLite meets it:

* ``PRAGMA max_page_count``: the database cannot grow, so the statement needing a new page fails
  ("database or disk is full"): the event's insert, an inline projection's row, an index row.
* ``RLIMIT_FSIZE`` (in a child process, the limit being process-wide): the write-ahead log cannot
  grow, so the COMMIT fails while writing it ("disk I/O error"), as on a full file system, where
  a 2 MB tmpfs gave the same outcome with "database or disk is full" at COMMIT (a mount is not
  something the suite can count on).

Each round lets the file grow by a different amount, so failures land at different points.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import empty_checkpoint
from sqlalchemy import Connection, Engine, event

from eventstore import EventStore
from eventstore.aio import AsyncEventStore
from eventstore.errors import DatabaseError
from projections import Conversations
from projections.langgraph_saver import EventStoreSaver
from tests._events import NoteAdded

PAYLOAD = "z" * 1500  # about a third of a page: each write needs a new page now and then
ROOT = Path(__file__).resolve().parent.parent


class _Writes:
    """Appends, conversation assigns and checkpoint puts on one store, and what each that
    returned wrote: what the store must show afterwards."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.conversations = Conversations(store)
        self.saver = EventStoreSaver(store)
        self.notes: dict[str, list[str]] = {"notes-a": [], "notes-b": []}
        self.variables: dict[str, Any] = {}
        self.puts: list[tuple[str, str]] = []  # (checkpoint id, its document)
        self.failures: dict[str, int] = {"note": 0, "assign": 0, "put": 0}
        self._config: Any = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
        self._version: Any = None
        self._i = 0

    def note(self, i: int) -> None:
        stream = "notes-a" if i % 2 else "notes-b"
        text = f"{i}:{PAYLOAD}"
        self.store.append(stream, [NoteAdded(text=text)])
        self.notes[stream].append(text)

    def assign(self, i: int) -> None:
        change = {f"v{i % 4}": f"{i}:{PAYLOAD}", "count": i}
        self.conversations.assign("c", change)
        self.variables.update(change)

    def put(self, i: int) -> None:
        following = self.saver.get_next_version(self._version, None)
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"doc": f"{i}:{PAYLOAD}"}
        checkpoint["channel_versions"] = {"doc": following}
        self._config = self.saver.put(self._config, checkpoint,
                                      {"source": "loop", "step": i, "parents": {}},
                                      {"doc": following})
        self._version = following
        self.puts.append((checkpoint["id"], f"{i}:{PAYLOAD}"))

    def round(self, times: int, failure: Callable[[DatabaseError], bool]) -> None:
        """Each kind of write ``times`` times; the ones that fail must fail as ``failure``
        says."""
        for _ in range(times):
            for write in (self.note, self.assign, self.put):
                self._i += 1
                try:
                    write(self._i)
                except DatabaseError as e:
                    assert failure(e), e
                    self.failures[write.__name__] += 1

    def expected(self) -> dict[str, Any]:
        return {"notes": self.notes, "variables": self.variables, "puts": self.puts}


def _matches(store: EventStore, expected: dict[str, Any]) -> None:
    """The store shows the writes that returned, and only those."""
    notes: dict[str, list[str]] = expected["notes"]
    for stream, texts in notes.items():
        assert [e.data.text for e in store.read_stream(stream)] == texts  # type: ignore[attr-defined]
        assert store.stream_version(stream) == len(texts)
    assert Conversations(store).get("c").variables == expected["variables"]
    saver = EventStoreSaver(store)
    puts = [tuple(p) for p in expected["puts"]]
    listed = [t.checkpoint["id"] for t in saver.list({"configurable": {"thread_id": "t"}})]
    assert listed == [cid for cid, _doc in reversed(puts)]
    latest = saver.get_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": ""}})
    assert latest is not None and puts
    assert (latest.checkpoint["id"], latest.checkpoint["channel_values"]["doc"]) == puts[-1]
    events = list(store.read_all())
    assert sum(isinstance(e.data, NoteAdded) for e in events) == sum(map(len, notes.values()))
    positions = [e.position for e in events]
    assert positions == sorted(set(positions))


def _integrity(path: Path) -> None:
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def _pages(path: Path) -> int:
    with closing(sqlite3.connect(path)) as db:
        pages: int = db.execute("PRAGMA page_count").fetchone()[0]
        return pages


# -- the database cannot grow: a statement fails --


class _PageLimit:
    """The database's page limit, applied at the start of every transaction on SQLite (every
    engine's: the async store runs its transactions on engines of its own over aiosqlite's
    connections), for the life of the ``with`` block."""

    def __init__(self) -> None:
        self.pages = 1 << 30

    def __enter__(self) -> _PageLimit:
        event.listen(Engine, "begin", self._apply)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(Engine, "begin", self._apply)

    def _apply(self, conn: Connection) -> None:
        if conn.dialect.name == "sqlite":
            cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cur.execute(f"PRAGMA max_page_count = {self.pages}")
            finally:
                cur.close()


def _is_full(error: DatabaseError) -> bool:
    return "database or disk is full" in str(error)


def test_writes_the_database_has_no_page_for_fail_typed_and_leave_nothing(
        tmp_path: Path) -> None:
    path = tmp_path / "full.db"
    with _PageLimit() as limit, EventStore.open(f"sqlite:///{path}") as store:
        writes = _Writes(store)
        writes.round(1, lambda _e: False)  # (nothing fails yet)
        for room in [0, 1, 2, 3, 1, 0, 2, 4, 1, 3] * 3:
            limit.pages = _pages(path) + room
            writes.round(6, _is_full)
        assert all(writes.failures.values()), writes.failures  # each kind ran out of room
        _matches(store, writes.expected())

        limit.pages = 1 << 30
        writes.round(1, lambda _e: False)  # room again: the same store goes on
        _matches(store, writes.expected())
    _integrity(path)
    with EventStore.open(f"sqlite:///{path}") as store:  # and so does a later process
        _matches(store, writes.expected())


def test_async_appends_the_database_has_no_page_for_fail_typed_and_leave_nothing(
        tmp_path: Path) -> None:
    path = tmp_path / "full.db"

    async def main() -> None:
        with _PageLimit() as limit:
            async with await AsyncEventStore.open(f"sqlite:///{path}") as store:
                written: list[str] = []
                failed = i = 0
                for room in [0, 1, 2, 0, 3, 1] * 2:
                    limit.pages = _pages(path) + room
                    for _ in range(8):
                        i += 1
                        try:
                            await store.append("notes", [NoteAdded(text=f"{i}:{PAYLOAD}")])
                        except DatabaseError as e:
                            assert _is_full(e), e
                            failed += 1
                        else:
                            written.append(f"{i}:{PAYLOAD}")
                assert failed and written
                read = [e.data.text async for e in store.read_stream("notes")]  # type: ignore[attr-defined]
                assert read == written
                limit.pages = 1 << 30
                await store.append("notes", [NoteAdded(text="after")])
                assert await store.stream_version("notes") == len(written) + 1

    asyncio.run(main())
    _integrity(path)


# -- the write-ahead log cannot grow: the COMMIT fails --


def _failed_write(error: DatabaseError) -> bool:
    return "disk I/O error" in str(error) or _is_full(error)


def commit_failures(path: str, report: str) -> None:
    """In a child process (``RLIMIT_FSIZE`` holds for every file it writes): rounds of writes,
    each round allowed a few more kB of write-ahead log; then the limit lifted and one more
    round.  What returned goes to ``report`` (as JSON), with the failure counts."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    with EventStore.open(f"sqlite:///{path}") as store:
        writes = _Writes(store)
        writes.round(1, lambda _e: False)
        for rnd in range(30):
            files = [path, path + "-wal"]
            grown = max(os.path.getsize(f) for f in files if os.path.exists(f))
            resource.setrlimit(resource.RLIMIT_FSIZE,
                               (grown + (rnd % 6) * 5000, resource.RLIM_INFINITY))
            try:
                writes.round(2, _failed_write)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)
        failed = dict(writes.failures)
        writes.round(1, lambda _e: False)  # room again: the same store goes on
        _matches(store, writes.expected())
    Path(report).write_text(json.dumps({**writes.expected(), "failures": failed}))


def test_commits_the_write_ahead_log_has_no_room_for_fail_typed_and_leave_nothing(
        tmp_path: Path) -> None:
    path, report = tmp_path / "full.db", tmp_path / "report.json"
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.test_disk_full import commit_failures; "
         "commit_failures(sys.argv[1], sys.argv[2])", str(path), str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert child.returncode == 0, child.stderr[-3000:]
    outcome = json.loads(report.read_text())
    assert all(outcome["failures"].values()), outcome["failures"]
    assert all(outcome["notes"].values()) and outcome["puts"]  # and some went through
    _integrity(path)
    with EventStore.open(f"sqlite:///{path}") as store:
        _matches(store, outcome)
