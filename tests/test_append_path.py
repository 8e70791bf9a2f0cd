"""The append's fast path: its kept connection and, on PostgreSQL, its one pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import inspect
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from select import select as wait_readable
from typing import Any

import psycopg
import psycopg._pipeline_base as pipeline_base
import pytest
from sqlalchemy import Connection, create_engine, event, make_url, select, text
from sqlalchemy.engine.base import RootTransaction
from sqlalchemy.exc import DBAPIError

from eventstore import EventStore, RawEvent, RecordedEvent, _backend, _migrate
from eventstore._backend import (
    APPEND_LOCK_ID,
    Writer,
    begin_snapshot,
    begin_write,
    lock_appends,
    pg_idle_timeout_ms,
    translate,
)
from eventstore._core import _pipeline
from eventstore.aio import AsyncEventStore
from eventstore.errors import (
    DatabaseError,
    InvalidArgument,
    SchemaVersionMismatch,
    StoreClosed,
    WrongExpectedVersion,
)
from projections import Conversations, Jobs
from tests._async_shim import BlockingAsyncStore
from tests.conftest import terminate_other_sessions

from ._between import AfterFirstStatement
from ._events import NoteAdded

ROOT = Path(__file__).resolve().parent.parent


class _FailingWriter:
    """An inline handler that only writes, and whose write fails."""

    def __call__(self, conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        cur = conn.connection.cursor()
        cur.execute("INSERT INTO no_such_table VALUES (1)")
        cur.close()

    @staticmethod
    def writes_only(conn: Connection, recorded: Sequence[RecordedEvent]) -> bool:
        return True


def test_stats_count_one_moment_when_an_append_commits_meanwhile(url: str) -> None:
    """``stats`` counted events in one statement and streams in another: on PostgreSQL an
    append committing between them gave counts that never held together (no events, one
    stream).  They are one statement now."""
    with EventStore.open(url, migrate=True) as store, EventStore.open(url) as other:
        store.append("s-1", [NoteAdded(text="one")])

        def new_stream_and_tenant() -> None:
            other.append("s-2", [NoteAdded(text="two")], tenant_id="another")

        before = store.stats()
        with AfterFirstStatement(store.engine, new_stream_and_tenant) as between:
            got = store.stats()
        assert between.ran
        assert before == {"events": 1, "streams": 1, "tenants": 1, "last_position": 1}
        assert got in (before, store.stats())
        assert store.stats() == {"events": 2, "streams": 2, "tenants": 2, "last_position": 2}


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

    conversations = Conversations(store)
    v = conversations.assign("c-1", {"n": 1})
    assert conversations.get("c-1").variables == {"n": 1}
    with pytest.raises(WrongExpectedVersion):
        conversations.assign("c-1", {"n": 2}, expected_version=v - 1)
    assert conversations.get("c-1").variables == {"n": 1}
    assert conversations.assign("c-1", {"n": 3}, expected_version=v) == v + 1
    assert conversations.get("c-1").variables == {"n": 3}


def test_an_in_memory_store_shared_by_threads_loses_nothing() -> None:
    """An in-memory SQLite database is one connection: threads reading while another appends
    take turns with it, so every acknowledged append is stored whole (a read beginning during
    an append used to roll the append back under it)."""
    store = EventStore.open("sqlite://")
    done = threading.Event()
    errors: list[BaseException] = []
    results = []

    def read() -> None:
        try:
            while not done.is_set():
                store.stream_version("x-1")
                list(store.read_stream("x-1", from_version=1, to_version=3))
        except BaseException as e:  # handed to the test's thread
            errors.append(e)

    def slow_hook(conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        threading.Event().wait(0.001)  # a reader's turn would come here, if turns were shared

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for i in range(300):
            results.append(store.append_with("x-1", [NoteAdded(text=str(i))],
                                             before_commit=slow_hook if i % 10 == 0 else None))
    finally:
        done.set()
        for t in readers:
            t.join()
    assert errors == []
    assert [r.stream_version for r in results] == list(range(1, 301))
    assert [e.version for e in store.read_stream("x-1")] == list(range(1, 301))
    assert store.stats()["events"] == 300
    store.close()


@pytest.mark.parametrize("flavour", ["mode=memory", "file::memory:"])
def test_an_in_memory_database_named_as_a_uri_is_one_database_too(flavour: str) -> None:
    """``file:NAME?mode=memory&uri=true`` and ``file::memory:?uri=true`` are in-memory
    databases as ``sqlite://`` is: one connection, taken in turns.  (Each pooled
    connection was a database of its own, or threads shared one connection at once: appends
    acknowledged and then missing, untyped errors, or every read failing with "no such
    table".)  Sync and async stores."""

    url = (f"sqlite:///file:mem{uuid.uuid4().hex}?mode=memory&uri=true"
           if flavour == "mode=memory" else "sqlite:///file::memory:?uri=true")
    def work(store: Any, i: int, acknowledged: list[int], errors: list[BaseException]) -> None:
        try:
            for n in range(40):
                acknowledged.append(store.append(f"m{i}-1", [NoteAdded(text=str(n))])
                                    .last_position)
                store.stream_version(f"m{(i + 1) % 3}-1")
        except BaseException as e:
            errors.append(e)

    for opening in (EventStore.open, BlockingAsyncStore):
        store: Any = opening(url)
        errors: list[BaseException] = []
        acknowledged: list[list[int]] = [[] for _ in range(3)]
        try:
            threads = [threading.Thread(target=work, args=(store, i, acknowledged[i], errors))
                       for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert errors == []
            for i in range(3):
                assert [e.position for e in store.read_stream(f"m{i}-1")] == acknowledged[i]
            assert store.stats()["events"] == 120
        finally:
            store.close()


def test_sqlite_url_options_the_store_would_override_or_cannot_use(tmp_path: Path) -> None:
    """The driver's ``timeout`` (seconds) is the busy timeout unless ``busy_timeout`` is given
    (the store's default replaced it at each connect: 30 s waits for ``?timeout=1``); a shared
    cache is refused up front (its table locks failed appends at once)."""

    path = tmp_path / "t.db"
    EventStore.open(f"sqlite:///{path}").close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for query, most in (("timeout=0.2", 5.0), ("timeout=30&busy_timeout=200", 5.0)):
            with EventStore.open(f"sqlite:///{path}?{query}") as store:
                started = time.monotonic()
                with pytest.raises(DatabaseError, match="locked"):
                    store.append("s-1", [NoteAdded(text="x")])
                assert time.monotonic() - started < most
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with pytest.raises(InvalidArgument, match="timeout"):
        EventStore.open(f"sqlite:///{path}?timeout=soon")
    for shared in (f"file:{path}?cache=shared", "file:m1?mode=memory&cache=shared"):
        # (Two stores on one shared in-memory database failed alike: "table is locked".)
        with pytest.raises(InvalidArgument, match="cache=shared"):
            EventStore.open(f"sqlite:///{shared}&uri=true")
    # SQLite reads URI options only from a file: URI; else they became part of the file name.
    with pytest.raises(InvalidArgument, match="need a file: URI"):
        EventStore.open(f"sqlite:///{path}?uri=true&psow=0")
    # A file: URI's path ends at "?", as SQLite ends it: the file it opens is the one watched.
    with EventStore.open(f"sqlite:///file:{tmp_path}/c%3Fd.db?uri=true") as store:
        assert store.append("s-1", [NoteAdded(text="x")]).last_position == 1
    assert (tmp_path / "c").exists()
    with EventStore.open(f"sqlite:///{path}") as store:
        assert store.last_position() == 0


def test_a_sqlite_file_that_cannot_be_opened_or_locked_says_which_and_why(
        tmp_path: Path) -> None:
    """SQLite says only "unable to open database file", or "database is locked": the store's
    error (still a DatabaseError) names the file and the likely reason (a folder missing, a
    '~' the URL does not expand), or the busy_timeout option; sync and async."""


    async def open_async(url: str) -> None:
        store = await AsyncEventStore.open(url)
        await store.close()

    cases = [(f"sqlite:///{tmp_path}/missing/x.db", "its folder .*missing does not exist"),
             ("sqlite:///~/no-such-folder-here/x.db", "'~' is not expanded")]
    for url, why in cases:
        with pytest.raises(DatabaseError, match=f"cannot open the SQLite database .*{why}"):
            EventStore.open(url)
        with pytest.raises(DatabaseError, match=why):
            asyncio.run(open_async(url))
    path = tmp_path / "t.db"
    EventStore.open(f"sqlite:///{path}").close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with EventStore.open(f"sqlite:///{path}?busy_timeout=50") as store, \
                pytest.raises(DatabaseError, match=r"locked .*\?busy_timeout=<ms>") as info:
            store.append("s-1", [NoteAdded(text="x")])
        assert info.value.transient
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not (tmp_path / "missing").exists()


def test_an_in_memory_store_refuses_a_transaction_inside_another_on_one_thread() -> None:
    """A read or append begun inside an append on the same thread cannot share the in-memory
    database's one connection: it is refused, and the outer append writes nothing."""
    store = EventStore.open("sqlite://")
    store.append("x-1", [NoteAdded(text="kept")])
    for inner in (lambda: store.stream_version("x-1"),
                  lambda: store.append("x-2", [NoteAdded(text="inner")])):
        with pytest.raises(InvalidArgument, match=r"one transaction at a time|inside another"):
            store.append_with("x-1", [NoteAdded(text="outer")],
                              before_commit=lambda conn, recorded, f=inner: f())  # type: ignore[misc]
    assert [e.data.text for e in store.read_all()] == ["kept"]  # type: ignore[attr-defined]
    assert store.append("x-1", [NoteAdded(text="next")]).stream_version == 2
    store.close()


def test_an_append_from_inside_an_append_is_refused_not_left_waiting(store: EventStore) -> None:
    """An append started on the thread of an append under way (its before_commit hook, an
    inline handler) would wait for the append lock its caller holds, for ever on PostgreSQL:
    it is refused at once, the outer append writes nothing, and the store goes on."""
    store.append("x-1", [NoteAdded(text="kept")])
    outcome: list[BaseException | None] = []

    def hook(conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        store.append("audit-1", [NoteAdded(text="inner")])

    def appends() -> None:
        for run in (lambda: store.append_with("x-1", [NoteAdded(text="outer")],
                                              before_commit=hook),
                    lambda: store.append("x-1", [NoteAdded(text="handled")])):
            try:
                run()
                outcome.append(None)
            except BaseException as e:  # handed to the test's thread
                outcome.append(e)
            store.add_inline_handler(hook)  # the second run: an inline handler appends
        store.remove_inline_handler(hook)

    t = threading.Thread(target=appends, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the nested append is waiting for its caller's lock"
    assert len(outcome) == 2
    for e in outcome:
        assert isinstance(e, InvalidArgument) and "inside another append" in str(e)
    assert [e.data.text for e in store.read_all()] == ["kept"]  # type: ignore[attr-defined]
    assert store.append("x-1", [NoteAdded(text="next")]).stream_version == 2


def test_a_failing_hook_keeps_an_in_memory_store() -> None:
    """An error raised inside an append (a hook, a handler) rolls it back and keeps the kept
    connection: for an in-memory SQLite database the connection is the database."""
    store = EventStore.open("sqlite://")
    store.append("x-1", [NoteAdded(text="kept")])

    def refuse(conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        raise ValueError("business rule says no")

    with pytest.raises(ValueError, match="business rule"):
        store.append_with("x-1", [NoteAdded(text="refused")], before_commit=refuse)
    store.add_inline_handler(refuse)
    with pytest.raises(ValueError):
        store.append("x-1", [NoteAdded(text="refused too")])
    store.remove_inline_handler(refuse)
    assert [e.data.text for e in store.read_stream("x-1")] == ["kept"]  # type: ignore[attr-defined]
    assert store.append("x-1", [NoteAdded(text="next")]).stream_version == 2
    store.close()


def test_append_after_close_is_refused(store: EventStore) -> None:
    """Appends after close raise StoreClosed, also one that got past the first check."""

    store.append("x-1", [NoteAdded(text="1")])
    writer = store._writer
    store.close()
    with pytest.raises(StoreClosed), writer.begin():
        pass
    with pytest.raises(StoreClosed):
        store.append("x-1", [NoteAdded(text="2")])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_appends_while_a_parent_thread_was_appending(fresh_pg: str) -> None:
    """A fork taken while another thread holds the append lock leaves the child a working
    store (its own lock and connection), not a lock held forever.

    PostgreSQL only: SQLite keeps its file locks' state in process memory, so a child forked
    while the parent is inside a write transaction cannot write that file (SQLite's own rule:
    no fork with a transaction open)."""
    store = EventStore.open(fresh_pg, migrate=True)
    store.append("fork-1", [NoteAdded(text="warm")])
    inside = threading.Event()
    release = threading.Event()

    def slow(conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        inside.set()
        release.wait(10)

    t = threading.Thread(target=lambda: store.append_with(
        "fork-1", [NoteAdded(text="parent")], before_commit=slow))
    t.start()
    assert inside.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: append, report by exit status
        code = 1
        try:
            signal.alarm(20)
            child = store.append("fork-child", [NoteAdded(text="child")])
            code = 0 if child.stream_version == 1 else 2
        finally:
            os._exit(code)
    release.set()
    t.join(10)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.stream_version("fork-1") == 2
    assert store.stream_version("fork-child") == 1
    store.close()


def test_eventstore_imports_and_runs_without_psycopg(tmp_path: Any) -> None:
    """psycopg is optional (the postgres extra), and so are greenlet and aiosqlite (the async
    extra): a SQLite-only install imports and appends."""
    script = (
        "import sys\n"
        "sys.modules['psycopg'] = None\n"
        "sys.modules['greenlet'] = None\n"
        "sys.modules['aiosqlite'] = None\n"
        "from eventstore import EventStore, Event\n"
        "class N(Event, tag='N'):\n"
        "    text: str\n"
        f"s = EventStore.open('sqlite:///{tmp_path}/p.db')\n"
        "s.append('n-1', [N(text='x')])\n"
        "print(len(list(s.read_stream('n-1'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


# -- the one-round-trip append on PostgreSQL (StoreCore._append_guessed) --------------------------


def _count_guesses(store: EventStore) -> list[bool | str]:
    """Per append that tried the one-round-trip path: whether it committed there (False: the
    guess was stale; "raised": the append failed there)."""
    seen: list[bool | str] = []
    original = store._append_guessed

    def spy(*args: Any, **kwargs: Any) -> Any:
        try:
            result = original(*args, **kwargs)
        except BaseException:
            seen.append("raised")
            raise
        seen.append(result is not None)
        return result

    store._append_guessed = spy  # type: ignore[method-assign]
    return seen


def _texts(store: EventStore, stream: str) -> list[str]:
    return [e.data.text for e in store.read_stream(stream)]  # type: ignore[attr-defined]


def test_two_stores_on_one_database_interleave_without_gaps(url: str) -> None:
    """Two stores (two processes' worth) append to one database: every append lands once, at
    the next position and version, and version checks still see the other store's events.

    On PostgreSQL the first store appends in one round trip on what it committed last; the
    other store's appends make that guess stale, which must be noticed, not written over."""
    a = EventStore.open(url, migrate=True)
    b = EventStore.open(url)
    try:
        guesses = _count_guesses(a)
        a.append("s-1", [NoteAdded(text="a1")], expected_version=0)
        a.append("s-1", [NoteAdded(text="a2")], expected_version=1)
        b.append("s-2", [NoteAdded(text="b1")])  # the log moves on under a's guess
        a.append("s-1", [NoteAdded(text="a3")], expected_version=2)
        b.append("s-1", [NoteAdded(text="b2")])  # and so does s-1
        with pytest.raises(WrongExpectedVersion) as conflict:
            a.append("s-1", [NoteAdded(text="late")], expected_version=3)
        assert conflict.value.actual == 4
        a.append("s-1", [NoteAdded(text="a4"), NoteAdded(text="a5")], expected_version=4)
        a.append("s-1", [NoteAdded(text="a6")])
        a.append("s-1", [NoteAdded(text="a7")])
        assert [e.position for e in a.read_all()] == list(range(1, 10))
        assert _texts(b, "s-1") == ["a1", "a2", "a3", "b2", "a4", "a5", "a6", "a7"]
        assert [e.version for e in b.read_stream("s-1")] == list(range(1, 9))
        assert b.stream_version("s-1") == 8
        assert b.append("s-2", [NoteAdded(text="b3")]).first_position == 10
        if a.backend == "postgresql":
            # a2 in one round trip; a3's guess missed; then, once a probe found no other
            # store's events since a's own, the one-round-trip path again (a7).
            assert guesses[:2] == [True, False]
            assert guesses[-1] is True
        else:
            assert guesses == []
    finally:
        a.close()
        b.close()


class _RaisingWriter:
    """A write-only handler that sends its statement, then raises in Python."""

    def __call__(self, conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        cur = conn.connection.cursor()
        cur.execute("UPDATE es_streams SET version = version WHERE stream_id = 'none'")
        cur.close()
        raise ValueError("handler bug after its statement went out")

    @staticmethod
    def writes_only(conn: Connection, recorded: Sequence[RecordedEvent]) -> bool:
        return True


@pytest.mark.parametrize("handler", [_FailingWriter(), _RaisingWriter()],
                         ids=["statement-fails", "python-raises"])
def test_a_failing_handler_on_a_known_stream_writes_nothing(store: EventStore,
                                                            handler: Any) -> None:
    """On a stream this store appended to before (PostgreSQL: the one-round-trip path, whose
    statements commit together at the pipeline's end), a handler whose statement fails, or
    that raises in Python after its statement went out, leaves nothing written; one event or
    a batch.  (After such a failure the store probes again before it guesses.)"""
    guesses = _count_guesses(store)
    error = DatabaseError if isinstance(handler, _FailingWriter) else ValueError
    texts: list[str] = []
    for refused in ([NoteAdded(text="refused")],
                    [NoteAdded(text="refused"), NoteAdded(text="too")]):
        for _ in range(2):  # the first probes (a new stream, or after the failure); then known
            texts.append(str(len(texts) + 1))
            store.append("k-1", [NoteAdded(text=texts[-1])], expected_version=len(texts) - 1)
        store.add_inline_handler(handler)
        with pytest.raises(error):
            store.append("k-1", refused)
        store.remove_inline_handler(handler)
        assert store.stream_version("k-1") == store.last_position() == len(texts)
        assert _texts(store, "k-1") == texts
    result = store.append("k-1", [NoteAdded(text="5")], expected_version=4)
    assert (result.first_position, result.stream_version) == (5, 5)
    assert store.append("k-1", [NoteAdded(text="6"), NoteAdded(text="7")]).last_position == 7
    assert _texts(store, "k-1") == [*texts, "5", "6", "7"]
    if store.backend == "postgresql":
        assert guesses == [True, "raised", True, "raised", True]


def test_idempotent_and_conflicting_appends_on_a_known_stream(store: EventStore) -> None:
    """Appends to a stream the store knows still answer idempotency keys and version
    conflicts exactly as the probing path does."""
    store.append("i-1", [NoteAdded(text="1")], expected_version=0)
    first = store.append("i-1", [NoteAdded(text="2")], idempotency_key="k-2")
    again = store.append("i-1", [NoteAdded(text="2")], idempotency_key="k-2")
    assert again.duplicate and again.last_position == first.last_position
    with pytest.raises(WrongExpectedVersion) as conflict:
        store.append("i-1", [NoteAdded(text="x")], expected_version=1)
    assert conflict.value.actual == 2
    with pytest.raises(WrongExpectedVersion):
        store.append("i-1", [NoteAdded(text="x")], expected_version=0)
    assert store.append("i-1", [NoteAdded(text="3")], expected_version=2).stream_version == 3
    assert _texts(store, "i-1") == ["1", "2", "3"]


class _ConstantWriter:
    """A write-only handler that runs one statement (which writes nothing) per append."""

    def __call__(self, conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        cur = conn.connection.cursor()
        cur.execute("UPDATE es_streams SET version = version WHERE stream_id = '-none-'")
        cur.close()

    @staticmethod
    def writes_only(conn: Connection, recorded: Sequence[RecordedEvent]) -> bool:
        return True


def test_failed_pipelines_leave_prepared_statements_in_step(url: str) -> None:
    """psycopg prepares a statement on its fifth run; when that run sits in a pipeline that
    fails first (here: a stale guess, the first statement), the server never prepares it
    though psycopg counts it as prepared.  Appends must keep working after such failures."""
    a = EventStore.open(url, migrate=True)
    b = EventStore.open(url)
    try:
        a.add_inline_handler(_ConstantWriter())
        guesses = _count_guesses(a)
        texts = []

        def a_appends(n: int) -> None:
            for _ in range(n):
                texts.append(f"a{len(texts)}")
                a.append("p-1", [NoteAdded(text=texts[-1])])

        # a's first append probes; the next four run the one-statement append four times; b's
        # append makes the fifth (the run psycopg prepares) fail; then a appends on.
        a_appends(5)
        b.append("p-2", [NoteAdded(text="b")])
        a_appends(4)
        # and so on, after other numbers of a's own appends
        for gap in (1, 2, 3, 6):
            b.append("p-2", [NoteAdded(text="b")])
            a_appends(gap)
        assert _texts(a, "p-1") == texts
        assert [e.position for e in a.read_all()] == list(range(1, len(texts) + 6))
        if a.backend == "postgresql":
            assert guesses[:6] == [True] * 4 + [False, True]
    finally:
        a.close()
        b.close()


def test_an_interrupt_as_a_pipeline_opens_leaves_no_connection_astray(fresh_pg: str) -> None:
    """An interrupt (Ctrl-C) landing just after psycopg put libpq in pipeline mode: the
    connection is closed and replaced, in the store's kept connection and in the pool, and
    the calls after it answer right (the sync twin of test_aio's cancelled pipeline, where
    such a connection made later statements read others' results)."""


    real_enter = psycopg.Pipeline.__enter__
    interrupts = 0

    def interrupted_enter(self: Any) -> Any:
        nonlocal interrupts
        real_enter(self)
        if interrupts:
            interrupts -= 1
            raise KeyboardInterrupt
        return self

    with EventStore.open(fresh_pg, migrate=True) as store:
        jobs = Jobs(store)
        store.append("s-1", [NoteAdded(text="x")] * 3)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(psycopg.Pipeline, "__enter__", interrupted_enter)
            for call in (lambda: store.append("s-2", [NoteAdded(text="y")]),
                         lambda: jobs.submit("wf", {"k": 1}, user_id="u")):
                interrupts = 1
                with pytest.raises(KeyboardInterrupt):
                    call()
                assert interrupts == 0
        for _ in range(6):
            assert store.stream_version("s-1") == 3
            assert store.last_position() == 3
            assert jobs.list() == []
        r = store.append("s-2", [NoteAdded(text="z")], expected_version=0)
        assert (r.first_position, r.stream_version) == (4, 1)
        jobs.submit("wf", {"k": 2}, user_id="u")
        assert [j.inputs for j in jobs.list()] == [{"k": 2}]


def test_connections_lost_again_as_the_pool_replaces_them_are_a_transient_error(
        fresh_pg: str) -> None:
    """The pooled connections were lost while idle, and each new one the pool opens in their
    place is lost as well: SQLAlchemy gives up ("This connection is closed"), a lost
    connection like any other, so the error is transient, and a subscription rides it out (it
    ended, and a projector failed its projection)."""


    dsn = make_url(fresh_pg).set(drivername="postgresql").render_as_string(hide_password=False)
    with EventStore.open(fresh_pg, migrate=True, poll_interval=0.05) as store, \
            psycopg.connect(dsn, autocommit=True) as side:
        store.append("s-1", [NoteAdded(text="x")])
        to_kill = [0]

        @event.listens_for(store.engine, "connect")
        def _terminate_new_backend(dbapi_conn: Any, _record: Any) -> None:
            if to_kill[0] > 0:
                to_kill[0] -= 1
                side.execute("SELECT pg_terminate_backend(%s)", (dbapi_conn.info.backend_pid,))
                wait_readable([dbapi_conn.pgconn.socket], [], [], 5)  # until it hangs up

        def lose_the_pool() -> None:
            side.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                         "datname = current_database() AND pid <> pg_backend_pid()")
            deadline = time.monotonic() + 5
            while side.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                               "current_database() AND pid <> pg_backend_pid()"
                               ).fetchone() != (0,):
                assert time.monotonic() < deadline
                time.sleep(0.02)

        lose_the_pool()
        to_kill[0] = 2
        with pytest.raises(DatabaseError, match="This connection is closed") as e:
            store.last_position()
        assert e.value.transient and to_kill[0] == 0
        lose_the_pool()
        to_kill[0] = 2
        stop = threading.Event()
        got = []
        for ev in store.subscribe(from_position=1, stop=stop):
            got.append(ev.position)
            break
        assert got == [1] and to_kill[0] == 0
        assert store.last_position() == 1


def test_connections_the_server_closed_while_idle_are_replaced(fresh_pg: str) -> None:
    """After the server ends idle sessions (a restart, ``idle_session_timeout``, an operator's
    pg_terminate_backend), the next append and the next reads open new connections instead
    of failing once each: the kept write connection and pooled ones are checked before use."""

    with EventStore.open(fresh_pg, migrate=True) as store:
        store.append("idle-1", [NoteAdded(text="1")])
        assert store.stream_version("idle-1") == 1  # a pooled read connection, now idle
        terminate_other_sessions(fresh_pg)
        assert store.append("idle-1", [NoteAdded(text="2")]).stream_version == 2
        terminate_other_sessions(fresh_pg)
        assert [e.data for e in store.read_stream("idle-1")] == [NoteAdded(text="1"),
                                                                NoteAdded(text="2")]
        assert store.stream_version("idle-1") == 2


@pytest.mark.parametrize("idle_limit", ["60", "0"])
def test_appends_race_as_promised_where_the_database_defaults_to_repeatable_read(
        fresh_pg: str, monkeypatch: pytest.MonkeyPatch, idle_limit: str) -> None:
    """A database (or role, or server) whose default isolation is REPEATABLE READ: the store's
    transactions still run at READ COMMITTED.  (They took the default: an append's snapshot
    was taken before it got the append lock, so it missed the append it waited for, and
    concurrent appends to streams of their own failed with a unique violation, and a lost
    version race with DatabaseError instead of WrongExpectedVersion.)  Sync and async stores,
    the store's own BEGIN and SQLAlchemy's (also after a REPEATABLE READ snapshot read)."""


    monkeypatch.setenv("EVENTSTORE_PG_IDLE_TIMEOUT", idle_limit)
    EventStore.open(fresh_pg, migrate=True).close()
    admin = create_engine(fresh_pg, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            db = conn.execute(text("SELECT current_database()")).scalar()
            conn.execute(text(f'ALTER DATABASE "{db}" SET default_transaction_isolation '
                              "= 'repeatable read'"))
    finally:
        admin.dispose()
    stores: list[Any] = [EventStore.open(fresh_pg), EventStore.open(fresh_pg),
                         BlockingAsyncStore(fresh_pg)]
    errors: list[BaseException] = []
    won = [0] * len(stores)

    def work(i: int) -> None:
        try:
            store = stores[i]
            for n in range(40):
                store.append(f"own{i}-{n}", [NoteAdded(text=str(n))])  # (ANY)
                try:
                    version = store.stream_version("shared-1")
                    store.append("shared-1", [NoteAdded(text=f"{i}.{n}")],
                                 expected_version=version)
                    won[i] += 1
                except WrongExpectedVersion:
                    pass
        except BaseException as e:
            errors.append(e)

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        check = stores[0]
        assert check.stream_version("shared-1") == sum(won) > 0
        assert [e.version for e in check.read_stream("shared-1")] == list(range(1, sum(won) + 1))
        assert [e.position for e in check.read_all()] == list(range(1, 3 * 40 + sum(won) + 1))
        engine = check.engine
        with begin_snapshot(engine) as conn:
            assert conn.execute(text("SHOW transaction_isolation")).scalar() == "repeatable read"
        for _ in range(3):  # (the pool's connections, the one the snapshot used among them)
            with begin_write(engine) as conn:
                assert conn.execute(text("SHOW transaction_isolation")).scalar() == \
                    "read committed"
                # The session's default, for the one-trip append's implicit transaction: set
                # with the idle limit; left alone without it (for a pooler's shared sessions).
                assert conn.execute(text("SHOW default_transaction_isolation")).scalar() == (
                    "read committed" if idle_limit != "0" else "repeatable read")
    finally:
        for store in stores:
            store.close()


@pytest.mark.parametrize("where", ["database", "environment"])
def test_a_client_encoding_other_than_utf8_is_not_the_stores(
        fresh_pg: str, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A database (or role) whose client_encoding is LATIN1, or PGCLIENTENCODING in the
    environment: the store's sessions are UTF-8 all the same, so any Unicode id and payload
    goes in and reads back (they raised a bare UnicodeEncodeError; a projector's batch was
    refused by the server, and marked its projection failed for every process)."""


    EventStore.open(fresh_pg, migrate=True).close()
    if where == "database":
        admin = create_engine(fresh_pg, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                db = conn.execute(text("SELECT current_database()")).scalar()
                conn.execute(text(f'ALTER DATABASE "{db}" SET client_encoding = \'LATIN1\''))
        finally:
            admin.dispose()
    else:
        monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    for opening in (EventStore.open, BlockingAsyncStore):
        store: Any = opening(fresh_pg)
        try:
            stream, tenant = f"note-日本{opening.__name__}", "tén€nt"
            store.append(stream, [NoteAdded(text="ч 😀")], tenant_id=tenant)
            assert [e.data for e in store.read_stream(stream, tenant_id=tenant)] == [
                NoteAdded(text="ч 😀")]
        finally:
            store.close()
    with EventStore.open(fresh_pg) as store:
        conversations = Conversations(store)
        conversations.assign("c-😀", {"名前": "ж"})
        assert conversations.get("c-😀").variables == {"名前": "ж"}


def test_prepared_statements_can_be_turned_off_for_a_transaction_pooler(fresh_pg: str) -> None:
    """``?prepare_threshold=none`` reaches psycopg as None (from the URL it was the string
    "none", and the first statement failed with a bare TypeError), for poolers that hand server
    sessions to other clients between transactions, where a statement one session prepared is
    missing, or already there, on the next (PgBouncer before 1.21).  That error names the fix."""


    EventStore.open(fresh_pg, migrate=True).close()
    for value, expected in (("none", None), ("0", 0)):
        url = f"{fresh_pg}?prepare_threshold={value}"
        for opening in (EventStore.open, BlockingAsyncStore):
            store: Any = opening(url)
            try:
                for n in range(8):  # (past psycopg's default of 5 executions)
                    store.append("p-1", [NoteAdded(text=str(n))])
                    assert store.stream_version("p-1") >= n + 1
                if opening is EventStore.open:
                    raw = store.engine.raw_connection()
                    try:
                        assert raw.driver_connection.prepare_threshold == expected
                    finally:
                        raw.close()
            finally:
                store.close()
    for bad in ("soon", "%C2%B2"):  # (a superscript two is a digit to str.isdigit)
        with pytest.raises(InvalidArgument, match="prepare_threshold"):
            EventStore.open(f"{fresh_pg}?prepare_threshold={bad}")

    # What a session that is not the one that prepared says, as the store reports it.
    dsn = make_url(fresh_pg).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("PREPARE _pg3_0 AS SELECT 1")
        with pytest.raises(DatabaseError, match=r"prepare_threshold=none") as info, translate():
            conn.execute("PREPARE _pg3_0 AS SELECT 1")
    assert info.value.sqlstate == "42P05"


def test_an_appender_frozen_in_its_transaction_does_not_stop_the_others(
        fresh_pg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: a transaction that holds the append lock and goes quiet (a stopped process,
    a host gone silent) is ended by the server after EVENTSTORE_PG_IDLE_TIMEOUT, so other
    appends go on; the frozen one's next statement fails instead of committing."""



    monkeypatch.setenv("EVENTSTORE_PG_IDLE_TIMEOUT", "1")
    with EventStore.open(fresh_pg, migrate=True) as frozen, EventStore.open(fresh_pg) as other:
        # Holding the append lock, then quiet: taken on its own, and taken in a pipeline, as
        # between an append's two round trips (psycopg's end of a pipeline must not disarm the
        # server's limit: a Flush after the Sync did).
        for text_, in_pipeline in (("after the freeze", False), ("after a pipeline", True)):
            conn = frozen.engine.connect()
            conn.begin()
            with _pipeline(conn) if in_pipeline else contextlib.nullcontext():
                lock_appends(conn)
            started = time.monotonic()
            other.append("s-1", [NoteAdded(text=text_)])
            assert time.monotonic() - started < 15
            with pytest.raises(DBAPIError):
                conn.execute(select(1))
            conn.invalidate()
            conn.close()
        assert [e.data.text for e in other.read_stream("s-1")] == [  # type: ignore[union-attr]
            "after the freeze", "after a pipeline"]

        def setting(url: str) -> str:
            with EventStore.open(url) as s, s.engine.connect() as c:
                return str(c.execute(text("SHOW idle_in_transaction_session_timeout")).scalar())

        assert setting(fresh_pg) == "1s"
        # One set already (here in the URL's libpq options) is left as it is.
        assert setting(fresh_pg + "?options=-c%20idle_in_transaction_session_timeout%3D7000") \
            == "7s"
        monkeypatch.setenv("EVENTSTORE_PG_IDLE_TIMEOUT", "0")  # the server's own setting
        assert setting(fresh_pg) == "0"
        # Under a millisecond is one, not 0 (which would be the server's: no limit at all).
        monkeypatch.setenv("EVENTSTORE_PG_IDLE_TIMEOUT", "0.0001")
        assert pg_idle_timeout_ms() == 1
        monkeypatch.setenv("EVENTSTORE_PG_IDLE_TIMEOUT", "soon")
        with pytest.raises(InvalidArgument, match="EVENTSTORE_PG_IDLE_TIMEOUT"):
            EventStore.open(fresh_pg)
        monkeypatch.delenv("EVENTSTORE_PG_IDLE_TIMEOUT")
        assert setting(fresh_pg) == "1min"

        async def async_setting() -> str:
            store = await AsyncEventStore.open(fresh_pg)
            try:
                async with store.engine.connect() as c:
                    got = await c.execute(text("SHOW idle_in_transaction_session_timeout"))
                    return str(got.scalar())
            finally:
                await store.close()

        assert asyncio.run(async_setting()) == "1min"


def test_events_of_tens_of_megabytes_are_appended(url: str) -> None:
    """A store opened for large events appends one of 30 MB, on a new stream and on one it
    knows (PostgreSQL's one-round-trip path), and another store appends after it.  A statement
    that large does not fit the socket at once; the pipeline's end once waited for results
    before the rest of it was sent, for ever, holding the append lock."""

    big = "x" * 30_000_000
    faulthandler.dump_traceback_later(120, exit=True)  # a hang fails the test, not the run
    try:
        with EventStore.open(url, migrate=True, max_event_bytes=64_000_000) as store:
            assert store.append("big-1", [NoteAdded(text=big)]).stream_version == 1
            assert store.append("big-1", [NoteAdded(text=big), NoteAdded(text="small")]
                                ).stream_version == 3
            with EventStore.open(url) as other:
                assert other.append("small-1", [NoteAdded(text="after")]).last_position == 4
            assert [len(e.data.text) for e in store.read_stream("big-1")  # type: ignore[attr-defined]
                    ] == [30_000_000, 30_000_000, 5]
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_postgres_connections_give_up_on_a_silent_server_within_a_minute(
        fresh_pg: str) -> None:
    """Sync and async connections carry libpq's TCP keepalive and user timeout (a network
    partition fails a call, as a transient error, in about a minute instead of the operating
    system's hours); settings the URL gives are kept."""

    def settings(conn: Any) -> dict[str, str]:
        params = conn.connection.driver_connection.info.get_parameters()
        return {k: params.get(k, "") for k in ("keepalives_idle", "tcp_user_timeout")}

    EventStore.open(fresh_pg, migrate=True).close()
    with EventStore.open(fresh_pg) as store, store.engine.connect() as conn:
        assert settings(conn) == {"keepalives_idle": "30", "tcp_user_timeout": "60000"}
    with EventStore.open(f"{fresh_pg}?keepalives_idle=5") as store, \
            store.engine.connect() as conn:
        assert settings(conn) == {"keepalives_idle": "5", "tcp_user_timeout": "60000"}

    async def async_settings() -> dict[str, str]:
        astore = await AsyncEventStore.open(fresh_pg)
        try:
            async with astore.engine.connect() as aconn:
                return await aconn.run_sync(settings)
        finally:
            await astore.close()

    assert asyncio.run(async_settings()) == {"keepalives_idle": "30",
                                             "tcp_user_timeout": "60000"}


def test_closing_an_in_memory_store_waits_for_the_transactions_of_other_threads() -> None:
    """close() of a ``sqlite://`` store while another thread reads: the reader gets
    StoreClosed (its read closed the one connection, or close() closed it under the reader's
    statement: the process crashed, or a new empty database answered "no such table")."""
    script = """
import collections, random, threading, time
from eventstore import EventStore
from tests._events import NoteAdded
seen = collections.Counter()
for _ in range(15):
    store = EventStore.open("sqlite://")
    store.append("seed-1", [NoteAdded(text="x" * 2000) for i in range(300)])
    def reader():
        try:
            while True:
                for _ in store.read_all():
                    pass
        except Exception as e:
            seen[type(e).__name__] += 1
    t = threading.Thread(target=reader)
    t.start()
    time.sleep(random.uniform(0.005, 0.05))
    store.close()
    t.join(10)
    assert not t.is_alive()
print(dict(seen))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "{'StoreClosed': 15}"
    assert "Exception during reset" not in done.stderr


@pytest.mark.parametrize("where", ["hook", "handler", "signal"])
def test_close_from_inside_an_append_on_its_thread_ends_after_it(url: str, where: str) -> None:
    """close() called by code running inside an append on the same thread (a before_commit
    hook, an inline handler, a signal handler: a graceful shutdown) returns at once; the
    append completes, and later calls raise StoreClosed (it waited for the append lock its own
    thread held: for ever)."""

    store = EventStore.open(url)
    closed: list[bool] = []

    def close(*_args: Any) -> None:
        store.close()
        closed.append(True)

    outcome: list[Any] = []

    def append() -> None:
        try:
            if where == "hook":
                outcome.append(store.append_with("c-1", [NoteAdded(text="a")],
                                                 before_commit=close))
            elif where == "handler":
                store.add_inline_handler(close)
                outcome.append(store.append("c-1", [NoteAdded(text="a")]))
            else:
                previous = signal.signal(signal.SIGUSR1, close)
                try:
                    while not closed:
                        outcome[:] = [store.append("c-1", [NoteAdded(text="a")] * 5)]
                except StoreClosed:
                    pass
                finally:
                    signal.signal(signal.SIGUSR1, previous)
        except BaseException as e:  # pragma: no cover - reported below
            outcome.append(e)

    if where == "signal":  # signal handlers run on the main thread
        killer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
        killer.start()
        append()
        killer.join()
    else:
        worker = threading.Thread(target=append, daemon=True)
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), "the append waited for itself"
    assert closed == [True]
    assert outcome and not isinstance(outcome[-1], BaseException), outcome
    with pytest.raises(StoreClosed):
        store.append("c-1", [NoteAdded(text="b")])
    with EventStore.open(url) as again:  # what the append returned is in the log
        assert again.stream_version("c-1") == outcome[-1].stream_version


def test_an_interrupt_a_driver_error_replaced_is_raised_not_translated() -> None:
    """Ctrl-C (or an exception a signal handler raised) that psycopg replaced with its own
    error while ending a pipeline ("cannot exit pipeline mode while busy") reaches the caller
    as itself, not as a transient DatabaseError (the append may have committed: a retry would
    write it twice); an interrupt the caller was already handling is not ours to raise."""


    def driver_error_over(interrupt: BaseException) -> None:
        try:
            raise interrupt
        except BaseException:
            raise sqlite3.OperationalError("cannot exit pipeline mode while busy") from None

    with pytest.raises(KeyboardInterrupt), translate():
        driver_error_over(KeyboardInterrupt())
    with pytest.raises(SystemExit), translate():
        driver_error_over(SystemExit(3))
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:  # the caller's own, being handled when it calls the store
        with pytest.raises(DatabaseError), translate():
            raise sqlite3.OperationalError("disk I/O error")  # noqa: B904 (its context)


def test_inline_handlers_get_metadata_and_raw_data_as_readers_do(store: EventStore) -> None:
    """An inline handler is handed the metadata, and an unknown type's raw data, as every
    reader gets them (decoded from what was stored: a datetime as its ISO string, a tuple as
    a list); it got the caller's objects, so inline rows and a rebuild could differ."""


    handed: list[RecordedEvent] = []
    store.add_inline_handler(lambda _conn, recorded: handed.extend(recorded))
    when = datetime(2024, 1, 1, tzinfo=UTC)
    store.append("m-1", [NoteAdded(text="a"), RawEvent(type="Unknown.Thing",
                                                       data={"pair": (1, 2), "at": when})],
                 metadata={"at": when, "ids": (1, 2)})
    read = list(store.read_stream("m-1"))
    assert [(h.metadata, h.data) for h in handed] == [(r.metadata, r.data) for r in read]
    assert handed[0].metadata == {"at": "2024-01-01T00:00:00Z", "ids": [1, 2]}
    assert handed[1].data == RawEvent(type="Unknown.Thing",
                                      data={"pair": [1, 2], "at": "2024-01-01T00:00:00Z"})


@pytest.fixture
def default_sigint() -> Iterator[None]:
    """Python's own SIGINT handler (KeyboardInterrupt) for the test, whatever the process was
    started with (a job started in the background ignores SIGINT) or a library installed since
    (CrewAI's telemetry, set up over an ignored SIGINT, exits the process instead)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_at(code: Any, line: str, raise_: Callable[[], None]) -> Callable[[], None]:
    """Trace ``code`` and call ``raise_`` (a signal) once, when it reaches the line whose text
    is ``line``: where CPython runs the handler of a signal that arrived just before.
    Returns the function that stops tracing."""
    src = Path(code.co_filename).read_text().splitlines()
    target = next(i + 1 for i in range(code.co_firstlineno, len(src)) if src[i].strip() == line)
    armed = [True]

    def local(frame: Any, event: str, _arg: Any) -> Any:
        if event == "line" and frame.f_lineno == target and armed[0]:
            armed[0] = False
            raise_()
        return local

    sys.settrace(lambda f, _e, _a: local if f.f_code is code else None)
    return lambda: sys.settrace(None)


def test_a_ctrl_c_as_the_append_begins_leaves_the_store_usable(url: str,
                                                               default_sigint: None) -> None:
    """Ctrl-C landing just after SQLAlchemy attached the append's transaction to the kept
    connection: later appends work (every one failed: 'already initialized a Transaction')."""

    with EventStore.open(url) as store:
        store.append("k-1", [NoteAdded(text="a")])
        stop = _interrupt_at(RootTransaction.__init__.__code__, "self.is_active = True",
                             lambda: signal.raise_signal(signal.SIGINT))
        try:
            with pytest.raises(KeyboardInterrupt):
                store.append("k-1", [NoteAdded(text="b")])
        finally:
            stop()
        assert store.append("k-1", [NoteAdded(text="c")]).stream_version == 2


def test_close_from_a_signal_as_the_append_takes_its_lock_returns(url: str) -> None:
    """A signal handler closing the store when the append has just taken the kept connection's
    lock (before it noted that it holds it): close() returns (it waited for that lock)."""

    store = EventStore.open(url)
    store.append("s-1", [NoteAdded(text="a")])
    previous = signal.signal(signal.SIGUSR1, lambda *_: store.close())
    code = _backend.Writer.begin.__wrapped__.__code__  # type: ignore[attr-defined]
    stop = _interrupt_at(code, "self._owner = me", lambda: signal.raise_signal(signal.SIGUSR1))
    done = threading.Event()
    watchdog = threading.Timer(20, lambda: None if done.is_set() else os._exit(3))
    watchdog.start()
    try:
        with pytest.raises(StoreClosed):
            store.append("s-1", [NoteAdded(text="b")])
    finally:
        stop()
        done.set()
        watchdog.cancel()
        signal.signal(signal.SIGUSR1, previous)
    with EventStore.open(url) as again:
        assert again.stream_version("s-1") == 1


def test_close_inside_a_command_holding_the_append_lock_returns(store: EventStore) -> None:
    """close() from code that runs while its thread holds the append lock in a command's own
    transaction (holding_appends), with another thread's append waiting on the kept
    connection: it returns at once (it waited for that append, which waited for this lock)."""
    writer = store._writer
    started, release = threading.Event(), threading.Event()

    def other_append() -> None:
        with writer.begin():
            started.set()
            release.wait(10)

    other = threading.Thread(target=other_append)
    with writer.holding_appends():
        other.start()
        assert started.wait(10)
        t0 = time.monotonic()
        store.close()
        assert time.monotonic() - t0 < 5
        release.set()
    other.join(10)
    assert not other.is_alive() and writer._conn is None  # closed by the append's end


def test_a_generator_closed_in_a_handler_is_not_taken_for_an_interrupt(
        default_sigint: None) -> None:
    """A driver error raised while a generator closes (GeneratorExit in its context) is the
    store's DatabaseError, as before; nor is a task's cancellation an interrupt; only
    SQLAlchemy's assertion over a real interrupt gives the interrupt back."""


    def steps() -> Iterator[int]:
        try:
            yield 1
        finally:
            raise sqlite3.IntegrityError("UNIQUE constraint failed")

    with pytest.raises(DatabaseError), translate():
        g = steps()
        next(g)
        g.close()

    def over(cause: BaseException, error: Exception) -> None:
        try:
            raise cause
        except BaseException:
            raise error from None

    with pytest.raises(DatabaseError), translate():
        over(asyncio.CancelledError(), sqlite3.OperationalError("interrupted"))
    with pytest.raises(AssertionError), translate():
        over(ValueError(), AssertionError())
    # An assertion of the caller's own code (a hook's), raised while it handled an interrupt
    # of its own, is the caller's to see; SQLAlchemy's, over an interrupt, gives that back.
    with pytest.raises(AssertionError), translate():
        over(SystemExit(2), AssertionError("the hook's own"))

    with EventStore.open("sqlite://") as store:
        store.append("a-1", [NoteAdded(text="a")])
        code = RootTransaction._deactivate_from_connection.__code__
        stop = _interrupt_at(code, "self.is_active = False",
                             lambda: signal.raise_signal(signal.SIGINT))
        try:
            with pytest.raises(KeyboardInterrupt):
                store.append("a-1", [NoteAdded(text="b")])
        finally:
            stop()


def test_each_event_handed_to_a_handler_has_its_own_metadata(store: EventStore) -> None:
    """The events of one append each carry their own metadata dict, as readers get them (one
    dict was shared: a handler that took a key from one took it from all)."""
    taken: list[Any] = []
    store.add_inline_handler(
        lambda _c, recorded: taken.extend(ev.metadata.pop("actor", None) for ev in recorded))
    store.append("m-1", [NoteAdded(text="a"), NoteAdded(text="b")], metadata={"actor": "u-1"})
    assert taken == ["u-1", "u-1"]


@pytest.mark.parametrize("where", ["queuing the Sync", "sending"])
def test_a_ctrl_c_as_an_append_pipeline_ends_neither_hangs_nor_holds_the_lock(
        fresh_pg: str, where: str, default_sigint: None) -> None:
    """PostgreSQL: Ctrl-C landing while the append's pipeline ends (psycopg queuing its Sync,
    or about to send what it queued): the append raises KeyboardInterrupt, the append lock is
    free for another store, and this store appends again (it waited for results that never
    came, with neither a Sync nor a Flush sent, holding the append lock for ever)."""


    _migrate.migrate_url(fresh_pg)
    with EventStore.open(fresh_pg) as store, EventStore.open(fresh_pg) as other:
        store.append("q-1", [NoteAdded(text="a")])
        store.append("q-1", [NoteAdded(text="a")])  # (next: the one-round-trip path)
        if where == "queuing the Sync":
            code, line = (pipeline_base.BasePipeline._enqueue_sync.__code__,
                          "self.result_queue.append(None)")
        else:
            code = pipeline_base.BasePipeline._communicate_gen.__code__
            line = "fetched = yield from pipeline_communicate(self.pgconn, self.command_queue)"
        done = threading.Event()
        watchdog = threading.Timer(30, lambda: None if done.is_set() else os._exit(3))
        watchdog.start()
        stop = _interrupt_at(code, line, lambda: signal.raise_signal(signal.SIGINT))
        try:
            with pytest.raises(KeyboardInterrupt):
                store.append("q-1", [NoteAdded(text="b")])
        finally:
            stop()
            done.set()
            watchdog.cancel()
        assert other.append("q-2", [NoteAdded(text="c")]).stream_version == 1
        version = store.stream_version("q-1")
        assert version in (2, 3)  # (an interrupt while sending may come after the commit)
        assert store.append("q-1", [NoteAdded(text="d")]).stream_version == version + 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_closing_its_copy_leaves_the_parents_session_alone(
        fresh_pg: str) -> None:
    """A child that closes the store it inherited and lets it go must not end its parent's
    PostgreSQL session: closing a connection handed back to a closed store's pool (done so
    that none is left open) is for the process that opened it; psycopg closing the parent's
    connection in the child said goodbye to the server on the socket both share."""


    store = EventStore.open(fresh_pg, migrate=True)
    store.append("fork-1", [NoteAdded(text="warm")])  # the kept write connection, open
    admin = psycopg.connect(make_url(fresh_pg).set(drivername="postgresql").render_as_string(
        hide_password=False), autocommit=True)
    before = {r[0] for r in admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()")}
    pid = os.fork()
    if pid == 0:  # the child: close its copy, drop it, collect, exit
        code = 1
        try:
            signal.alarm(20)
            store.close()
            del store  # (its kept connection, inherited, goes back to the pool)
            gc.collect()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    time.sleep(0.3)  # (a session ended by the child: gone from the view by then)
    after = {r[0] for r in admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()")}
    admin.close()
    assert before <= after, before - after  # the parent's sessions all still there
    store.append("fork-1", [NoteAdded(text="after the child")])
    assert store.stream_version("fork-1") == 2
    store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_its_parent_writes_to_sqlite_is_refused_at_once(
        tmp_path: Any) -> None:
    """SQLite keeps its locks' state in the process: a child forked while a parent thread
    held the write lock inherits the record that it holds it, and none of its connections
    can ever write.  Each of its appends used to wait out the busy timeout and fail as
    transient, for good.  Now it is refused, not transient, naming the fork (the first write
    after probing for the busy timeout, later ones at once); the parent, and a child forked
    while nothing writes, append as before."""


    url = f"sqlite:///{tmp_path}/forked.db?busy_timeout=1000"
    store = EventStore.open(url, migrate=True)
    inside, go_on = threading.Event(), threading.Event()

    def hold(_conn: Any, _recorded: Any) -> None:
        inside.set()
        go_on.wait(20)

    def child_appends() -> int:
        """Fork; the child appends and exits 0 (appended), 3 (refused as asked: after its
        probe of the busy timeout, then at once), or 1 (anything else)."""
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.alarm(20)
                took = []
                for _ in range(2):
                    started = time.monotonic()
                    try:
                        store.append("child", [NoteAdded(text="c")])
                        code = 0
                        break
                    except DatabaseError as e:
                        if e.transient or "forked" not in str(e):
                            raise
                    took.append(time.monotonic() - started)
                if code != 0 and took[0] < 3 and took[1] < 0.5:
                    code = 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    writer = threading.Thread(target=lambda: store.append_with(
        "parent", [NoteAdded(text="p")], before_commit=hold))
    writer.start()
    try:
        assert inside.wait(20)
        assert child_appends() == 3  # forked mid-write: refused at once
    finally:
        go_on.set()
        writer.join(20)
    assert child_appends() == 0  # forked while nothing writes: appends
    assert store.append("parent", [NoteAdded(text="q")]).stream_version == 2
    assert [e.stream_id for e in store.read_all()] == ["parent", "child", "parent"]
    store.close()


def test_an_interrupt_as_an_append_begins_leaves_the_next_append_working(
        store: EventStore) -> None:
    """A KeyboardInterrupt (Ctrl-C, a signal handler's exception) landing just after the kept
    connection marked this thread as appending: the thread's later appends were refused for
    good, as if nested in an append.  Here the interrupt is raised at the next line of
    ``Writer.begin`` after that mark, as a signal handler's exception would surface there."""


    source, first = inspect.getsourcelines(Writer.begin)
    marked = next(first + i for i, line in enumerate(source) if "self._owner = me" in line)
    fired: list[int] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not Writer.begin.__wrapped__.__code__:  # type: ignore[attr-defined]
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_lineno == marked + 1 and not fired:
                fired.append(frame.f_lineno)
                raise KeyboardInterrupt
            return local
        return local

    store.append("s-1", [NoteAdded(text="before")])
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            store.append("s-1", [NoteAdded(text="interrupted")])
    finally:
        sys.settrace(None)
    assert fired
    store.append("s-1", [NoteAdded(text="after")])
    assert [e.data.text for e in store.read_stream("s-1")] == [  # type: ignore[attr-defined]
        "before", "after"]


def test_a_stream_s_times_never_go_back_when_the_clock_does(url: str) -> None:
    def at(second: int) -> datetime:
        return datetime(2030, 1, 1, 0, 0, second, tzinfo=UTC)

    now = [at(30)]
    with EventStore.open(url, migrate=True, clock=lambda: now[0]) as a, \
            EventStore.open(url, clock=lambda: now[0]) as b:
        a.append("t-1", [NoteAdded(text="1")])
        now[0] = at(10)  # the clock steps back: a's next append is on a stream it knows
        a.append("t-1", [NoteAdded(text="2")])
        now[0] = at(50)
        a.append("t-1", [NoteAdded(text="3")])
        now[0] = at(40)  # another store appends after the stream's last time
        b.append("t-1", [NoteAdded(text="4")])
        assert [e.recorded_at for e in a.read_stream("t-1")] == [at(30), at(30), at(50), at(50)]


def test_appends_to_a_known_stream_wait_while_another_session_holds_the_append_lock(
        url: str) -> None:
    parsed = make_url(url)
    with EventStore.open(url, migrate=True) as store:
        store.append("l-1", [NoteAdded(text="1")])
        store.append("l-1", [NoteAdded(text="2")])  # known to the store (PostgreSQL: guesses)
        for batch in ([NoteAdded(text="3")], [NoteAdded(text="4"), NoteAdded(text="5")]):
            holder: Any
            if parsed.get_backend_name() == "sqlite":
                holder = sqlite3.connect(parsed.database or "", isolation_level=None)
                holder.execute("BEGIN IMMEDIATE")
            else:
                holder = psycopg.connect(parsed.set(drivername="postgresql").render_as_string(
                    hide_password=False), autocommit=True)
                holder.execute("SELECT pg_advisory_lock(%s)", (APPEND_LOCK_ID,))
            done = threading.Event()
            appender = threading.Thread(
                target=lambda batch=batch, done=done: (store.append("l-1", batch), done.set()))
            appender.start()
            try:
                assert not done.wait(0.3)  # held up by the lock
            finally:
                holder.execute("COMMIT" if isinstance(holder, sqlite3.Connection)
                               else f"SELECT pg_advisory_unlock({APPEND_LOCK_ID})")
                holder.close()
                appender.join()
            assert done.is_set()
        assert _texts(store, "l-1") == ["1", "2", "3", "4", "5"]


def _client_sessions(url: str) -> int:
    """Client sessions on the URL's database other than the one asking, once those ending have
    gone (a closed connection's server process exits a moment later): at most 10 s."""
    watcher = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with watcher.connect() as conn:
            deadline = time.monotonic() + 10
            while True:
                n = conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")).scalar()
                if n == 0 or time.monotonic() > deadline:
                    return int(n or 0)
                time.sleep(0.05)
    finally:
        watcher.dispose()


def test_a_refused_open_and_a_close_leave_no_session_on_the_server(fresh_pg: str) -> None:
    """An open refused for a database without the schema, and a close after appends, on the
    sync and async stores: no connection of theirs stays open on the server."""
    for open_refused in (lambda: EventStore.open(fresh_pg, migrate=False),
                         lambda: asyncio.run(AsyncEventStore.open(fresh_pg, migrate=False))):
        with pytest.raises(SchemaVersionMismatch):
            open_refused()
        assert _client_sessions(fresh_pg) == 0
    store = EventStore.open(fresh_pg, migrate=True)
    store.append("s-1", [NoteAdded(text="1")])
    assert list(store.read_stream("s-1"))
    store.close()
    assert _client_sessions(fresh_pg) == 0

    async def append_then_close() -> None:
        astore = await AsyncEventStore.open(fresh_pg)
        await astore.append("s-1", [NoteAdded(text="2")])
        assert [e async for e in astore.read_stream("s-1")]
        await astore.close()

    asyncio.run(append_then_close())
    assert _client_sessions(fresh_pg) == 0


def test_a_stream_s_version_and_time_are_its_own_tenant_s(url: str) -> None:
    """One stream id in two tenants: an append moves only its own tenant's stream (version and
    time), and only that stream's last time holds its clock back."""
    def at(second: int) -> datetime:
        return datetime(2030, 1, 1, 0, 0, second, tzinfo=UTC)

    now = [at(50)]
    with EventStore.open(url, migrate=True, clock=lambda: now[0]) as first, \
            EventStore.open(url, clock=lambda: now[0]) as second:
        first.append("c-1", [NoteAdded(text="a1")], tenant_id="a")
        now[0] = at(10)
        first.append("c-1", [NoteAdded(text="b1")], tenant_id="b")
        # A store that has not seen the streams probes them before it appends.
        now[0] = at(20)
        second.append("c-1", [NoteAdded(text="b2"), NoteAdded(text="b3")], tenant_id="b",
                      expected_version=1)
        now[0] = at(55)
        second.append("c-1", [NoteAdded(text="a2")], tenant_id="a", expected_version=1)
        now[0] = at(30)
        first.append("c-1", [NoteAdded(text="b4")], tenant_id="b", expected_version=3)
        assert [second.stream_version("c-1", tenant_id=t) for t in ("a", "b")] == [2, 4]
        assert [(e.data.text, e.recorded_at) for e in second.read_stream("c-1", tenant_id="a")
                ] == [("a1", at(50)), ("a2", at(55))]
        assert [(e.data.text, e.recorded_at) for e in second.read_stream("c-1", tenant_id="b")
                ] == [("b1", at(10)), ("b2", at(20)), ("b3", at(20)), ("b4", at(30))]
