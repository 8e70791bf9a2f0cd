"""Appends whose COMMIT or BEGIN fails: the caller gets a typed error, nothing is written, and
the store's kept write connection (and, on SQLite, the database's write lock) is left usable.

A deferred constraint is what makes a COMMIT fail here: the application's own table, written
in the append's transaction (a ``before_commit`` hook, an inline handler), checked only at
COMMIT.  (On SQLite a full disk does the same.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, text

from eventstore import EventStore, RecordedEvent
from eventstore._backend import dbapi_cursor
from eventstore.aio import AsyncEventStore
from eventstore.errors import DatabaseError
from tests._async_shim import BlockingAsyncStore
from tests.conftest import pg_url, reset_pg

from ._events import NoteAdded


def _deferred_table(engine: Engine) -> str:
    """A table whose constraint is checked at COMMIT; returns the statement that breaks it."""
    with engine.begin() as conn:
        return _deferred_table_on(conn)


def _deferred_table_on(conn: Connection) -> str:
    """:func:`_deferred_table` in the caller's transaction (tables of their own: the
    PostgreSQL test database outlives a test)."""
    name = f"app_{uuid.uuid4().hex[:8]}"
    if conn.dialect.name == "sqlite":
        conn.execute(text(f"CREATE TABLE {name}_parent (id INTEGER PRIMARY KEY)"))
        conn.execute(text(f"CREATE TABLE {name} (parent INTEGER REFERENCES "
                          f"{name}_parent (id) DEFERRABLE INITIALLY DEFERRED)"))
        return f"INSERT INTO {name} VALUES (42)"  # no such parent
    conn.execute(text(f"CREATE TABLE {name} (k INTEGER, CONSTRAINT {name}_once "
                      "UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)"))
    conn.execute(text(f"INSERT INTO {name} VALUES (1)"))
    return f"INSERT INTO {name} VALUES (1)"  # a duplicate


def _foreign_keys_on(engine: Engine) -> None:
    """SQLite checks foreign keys only when asked, per connection."""
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _on(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys = ON")
            cur.close()


@pytest.fixture
def checked_store(url: str) -> Iterator[EventStore]:
    with EventStore.open(url, migrate=True) as store:
        _foreign_keys_on(store.engine)
        store.engine.dispose()  # (migrate's connections)
        yield store


def _is_the_constraint(error: DatabaseError) -> bool:
    """The database's refusal itself, not a later symptom (a transaction left open)."""
    return error.transient is False and (error.sqlstate == "23505"
                                         or "FOREIGN KEY constraint failed" in str(error))


def _texts(store: EventStore, stream: str) -> list[str]:
    return [e.data.text for e in store.read_stream(stream)]  # type: ignore[attr-defined]


def test_a_refused_commit_raises_writes_nothing_and_the_store_goes_on(
        checked_store: EventStore, url: str) -> None:
    """A COMMIT the database refuses is a non-transient DatabaseError; the next appends of
    the same store commit, and another store (another process) is not kept waiting for
    SQLite's write lock."""
    store = checked_store
    breaking = _deferred_table(store.engine)
    store.append("o-1", [NoteAdded(text="1")])
    for _ in range(2):
        with pytest.raises(DatabaseError) as refused:
            store.append_with("o-1", [NoteAdded(text="refused")],
                              before_commit=lambda conn, _rec: conn.execute(text(breaking)))
        assert _is_the_constraint(refused.value)
        assert _texts(store, "o-1") == ["1"]
    assert store.append("o-1", [NoteAdded(text="2")]).stream_version == 2
    with EventStore.open(f"{url}{'&' if '?' in url else '?'}busy_timeout=2000"
                         if url.startswith("sqlite") else url) as other:
        assert other.append("o-2", [NoteAdded(text="other")]).stream_version == 1
    assert store.append("o-1", [NoteAdded(text="3")]).stream_version == 3
    assert _texts(store, "o-1") == ["1", "2", "3"]


class _DeferredWriter:
    """An inline handler that only writes: a row into the application's table that breaks its
    deferred constraint (on the driver's cursor, as the store's own handlers write)."""

    def __init__(self, breaking: str) -> None:
        self.breaking = breaking

    def __call__(self, conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        cur = dbapi_cursor(conn)
        cur.execute(self.breaking)
        cur.close()

    @staticmethod
    def writes_only(conn: Connection, recorded: Sequence[RecordedEvent]) -> bool:
        return True


def test_a_handler_breaking_a_deferred_constraint_on_a_known_stream_is_a_typed_error(
        checked_store: EventStore) -> None:
    """On a stream the store appended to before (PostgreSQL: the one-round-trip append, whose
    commit is the pipeline's end), a commit refused for a deferred constraint comes out as the
    same typed error as on the probing path, with the server's SQLSTATE: not psycopg's own
    confusion over the extra result (an IndexError, or "cannot exit pipeline mode while busy",
    flagged transient)."""
    store = checked_store
    handler = _DeferredWriter(_deferred_table(store.engine))
    stream = f"k-{uuid.uuid4().hex[:6]}"
    store.append(stream, [NoteAdded(text="1")])
    store.append(stream, [NoteAdded(text="2")])  # the store now knows the stream's end
    store.add_inline_handler(handler)
    for kwargs in ({}, {"idempotency_key": "probing-path"}, {}):
        with pytest.raises(DatabaseError) as refused:
            store.append(stream, [NoteAdded(text="refused")], **kwargs)  # type: ignore[arg-type]
        assert _is_the_constraint(refused.value)
        assert _texts(store, stream) == ["1", "2"]
    store.remove_inline_handler(handler)
    for i in range(3, 6):
        assert store.append(stream, [NoteAdded(text=str(i))]).stream_version == i
    assert store.last_position() == 5


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_refused_commit_whose_answer_came_in_one_read_keeps_the_server_s_reason(
        face: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: when the server's refusal of the one-round-trip append's commit arrives in
    the same read as the results before it (a client slower than the server: a loaded
    machine), psycopg takes it for the Sync's result and then fails on its own bookkeeping (an
    IndexError).  The append still raises the server's error, with its SQLSTATE (it gave a
    DatabaseError with no reason; the test above met it under load), and the store goes on.
    Here the client waits for every answer before it reads (psycopg's Sync, then a pause)."""
    from psycopg._pipeline_base import BasePipeline

    url = pg_url()
    reset_pg(url)
    store: Any = BlockingAsyncStore(url) if face == "async" else EventStore.open(url)
    try:
        stream = f"k-{uuid.uuid4().hex[:6]}"
        store.append(stream, [NoteAdded(text="1")])
        store.append(stream, [NoteAdded(text="2")])  # the store now knows the stream's end
        with EventStore.open(url) as side:
            handler = _DeferredWriter(_deferred_table(side.engine))
        store.add_inline_handler(handler)
        sync = BasePipeline._enqueue_sync

        def sync_then_pause(pipeline: Any) -> None:
            sync(pipeline)
            pipeline.command_queue.append(lambda: time.sleep(0.2))

        monkeypatch.setattr(BasePipeline, "_enqueue_sync", sync_then_pause)
        for _ in range(2):
            with pytest.raises(DatabaseError) as refused:
                store.append(stream, [NoteAdded(text="refused")])
            assert _is_the_constraint(refused.value), refused.value
        monkeypatch.undo()
        store.remove_inline_handler(handler)
        assert store.append(stream, [NoteAdded(text="3")]).stream_version == 3
        assert [e.data.text for e in store.read_stream(stream)] == ["1", "2", "3"]
    finally:
        store.close()


def test_an_append_after_a_refused_keyed_commit_takes_the_next_version_and_position(
        checked_store: EventStore) -> None:
    store = checked_store
    handler = _DeferredWriter(_deferred_table(store.engine))
    stream = f"r-{uuid.uuid4().hex[:6]}"
    store.append(stream, [NoteAdded(text="1")])
    store.append(stream, [NoteAdded(text="2")])
    store.add_inline_handler(handler)
    with pytest.raises(DatabaseError):
        store.append(stream, [NoteAdded(text="refused")], idempotency_key="refused-key")
    store.remove_inline_handler(handler)
    result = store.append(stream, [NoteAdded(text="3")])
    assert (result.first_position, result.stream_version) == (3, 3)
    assert [(e.position, e.version) for e in store.read_stream(stream)] == [(1, 1), (2, 2), (3, 3)]


def test_an_interrupt_right_after_begin_leaves_the_store_usable(
        checked_store: EventStore, url: str) -> None:
    """Ctrl-C delivered just after the append's BEGIN (IMMEDIATE, on SQLite: the write lock is
    then held) escapes SQLAlchemy's begin(): the driver's transaction is rolled back, so this
    store's next append commits and other writers are not locked out."""
    store = checked_store
    store.append("i-1", [NoteAdded(text="1")])
    armed = [True]

    @event.listens_for(store.engine, "begin")
    def interrupt(_conn: Connection) -> None:  # runs after the store's own BEGIN
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.append("i-1", [NoteAdded(text="interrupted")])
    assert armed == [False]
    with EventStore.open(f"{url}{'&' if '?' in url else '?'}busy_timeout=2000"
                         if url.startswith("sqlite") else url) as other:
        assert other.append("i-2", [NoteAdded(text="other")]).stream_version == 1
    assert store.append("i-1", [NoteAdded(text="2")]).stream_version == 2
    assert _texts(store, "i-1") == ["1", "2"]


def test_async_a_refused_commit_raises_and_the_store_goes_on(url: str) -> None:
    """The async store: the same refused COMMIT, then its kept connection appends again."""
    async def main() -> None:
        async with await AsyncEventStore.open(url, migrate=True) as store:
            _foreign_keys_on(store.engine.sync_engine)
            await store.engine.dispose()
            breaking = await store.run_sync(lambda c: _deferred_table_on(c), write=True)
            await store.append("o-1", [NoteAdded(text="1")])
            for _ in range(2):
                with pytest.raises(DatabaseError) as refused:
                    await store.append_with(
                        "o-1", [NoteAdded(text="refused")],
                        before_commit=lambda conn, _rec: conn.execute(text(breaking)))
                assert _is_the_constraint(refused.value)
            assert (await store.append("o-1", [NoteAdded(text="2")])).stream_version == 2
            assert [e.data.text async for e in store.read_stream("o-1")] == ["1", "2"]  # type: ignore[attr-defined]

    asyncio.run(main())



def test_psycopg_s_confusion_over_a_refused_pipeline_commit_is_read_as_the_refusal() -> None:
    """How the one-round-trip append reads psycopg's failures at a pipeline's end: the
    server's own error as it is; psycopg's bookkeeping error over a server error gives that
    server error; a bare IndexError (psycopg lost the server's reason) a non-transient
    DatabaseError; anything else (a lost connection) is left to the caller as it is."""
    from eventstore._core import _refused_commit

    class ServerError(Exception):
        sqlstate = "23505"

    assert _refused_commit(ServerError("duplicate key")) is None
    server = ServerError("duplicate key")
    try:
        try:
            raise server
        except ServerError:
            raise RuntimeError("cannot exit pipeline mode while busy") from None
    except RuntimeError as busy:
        assert _refused_commit(busy) is server
    refused = _refused_commit(IndexError("pop from an empty deque"))
    assert isinstance(refused, DatabaseError) and refused.transient is False
    assert "nothing was written" in str(refused)
    assert _refused_commit(ConnectionError("server closed the connection")) is None


def test_a_missing_sqlite_file_beside_its_write_ahead_log_is_not_opened(tmp_path: Path) -> None:
    """A database moved away while in use leaves its -wal file behind, which may hold its last
    commits.  Opening the old path used to create an empty database there, and SQLite reset
    that log: the commits were gone.  The store now refuses to connect while the file is
    missing and its log is there (sync and async, also a new pooled connection of a running
    store); with the file put back, every commit is there."""
    path = tmp_path / "a.db"
    archive = tmp_path / "archive.db"
    url = f"sqlite:///{path}"
    store = EventStore.open(url)
    try:
        store.append("s-1", [NoteAdded(text=str(i)) for i in range(3)])
        os.replace(path, archive)  # moved while the store holds it open: its log stays
        wal = path.with_name("a.db-wal")
        size = wal.stat().st_size
        assert size > 0
        for opening in (url, f"sqlite:///file:{path}?uri=true&mode=rwc"):
            with pytest.raises(DatabaseError, match="missing but its write-ahead log"):
                EventStore.open(opening)
        with pytest.raises(DatabaseError, match="missing but its write-ahead log"):
            EventStore.open(url, migrate=False)  # (not "no schema, run migrate")

        async def open_async() -> None:
            await AsyncEventStore.open(url)

        with pytest.raises(DatabaseError, match="missing but its write-ahead log"):
            asyncio.run(open_async())
        with (pytest.raises(DatabaseError, match="missing but its write-ahead log"),
              store.engine.connect()):  # a new pooled connection of the running store
            pass
        assert not path.exists() and wal.stat().st_size == size
        os.replace(archive, path)
    finally:
        store.close()
    with EventStore.open(url) as again:
        assert [e.data.text for e in again.read_stream("s-1")] == ["0", "1", "2"]  # type: ignore[union-attr]


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_sqlite_appends_to_a_removed_or_replaced_file_are_refused(
        tmp_path: Path, how: str) -> None:
    """SQLite keeps writing to the file it holds open: in WAL mode it does not notice that the
    file was deleted (or another put in its place), so every append was acknowledged, read
    back, and gone when the process closed it.  A write now checks the file first: a typed
    error, nothing written."""
    folder = tmp_path / "data"
    path = folder / "a.db"
    refused = f"was {how} while the store had it open"

    def pull_the_file() -> None:
        if how == "removed":
            shutil.rmtree(folder)
            return
        EventStore.open(f"sqlite:///{tmp_path / 'other.db'}").close()
        os.replace(tmp_path / "other.db", path)

    folder.mkdir()
    with EventStore.open(f"sqlite:///{path}") as store:
        store.append("s-1", [NoteAdded(text="before")])
        pull_the_file()
        with pytest.raises(DatabaseError, match=refused):
            store.append("s-1", [NoteAdded(text="after")])
        with pytest.raises(DatabaseError, match=refused):  # refused again, not half-written
            store.append("s-1", [NoteAdded(text="again")], expected_version=1)
    # (A file replaced under SQLite's write-ahead log is the operator's to mend: SQLite may
    # then carry the old log's pages into it.  The point here: no append was acknowledged.)
    shutil.rmtree(folder, ignore_errors=True)

    async def run_async() -> None:
        folder.mkdir()
        store = await AsyncEventStore.open(f"sqlite:///{path}")
        try:
            await store.append("s-1", [NoteAdded(text="before")])
            pull_the_file()
            with pytest.raises(DatabaseError, match=refused):
                await store.append("s-1", [NoteAdded(text="after")])
        finally:
            await store.close()

    asyncio.run(run_async())
    shutil.rmtree(folder, ignore_errors=True)

    async def before_the_first_append() -> None:
        # The async store's transactions run on a sync engine made over each pooled
        # connection at its first use: the file is the one the pool opened, not the one the
        # path names by then.
        folder.mkdir()
        EventStore.open(f"sqlite:///{path}").close()
        store = await AsyncEventStore.open(f"sqlite:///{path}")
        try:
            pull_the_file()  # (open() checked the schema: the pool's connection is open)
            with pytest.raises(DatabaseError, match=refused):
                await store.append("s-1", [NoteAdded(text="after")])
        finally:
            await store.close()

    asyncio.run(before_the_first_append())


def test_a_database_reached_through_a_symlink_is_watched_as_the_link_names_it(
        tmp_path: Path) -> None:
    """A symlinked database path: its write-ahead log is found by the file the link points to
    (SQLite's name for it), so a missing file beside its log is not opened through the link
    either (it was: SQLite made an empty database there and reset the log, losing its
    commits); and the link repointed at another database while a store has it open is a
    replaced file to appends (they went on into the old file, while the store's reads came
    from the new one: acknowledged appends the store itself could not read)."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link.db"
    link.symlink_to(real / "x.db")
    url = f"sqlite:///{link}"
    store = EventStore.open(url)
    try:
        store.append("s-1", [NoteAdded(text=str(i)) for i in range(3)])
        os.replace(real / "x.db", tmp_path / "moved.db")  # its log stays, as x.db-wal
        wal = real / "x.db-wal"
        size = wal.stat().st_size
        assert size > 0
        with pytest.raises(DatabaseError, match="missing but its write-ahead log"):
            EventStore.open(url)
        assert not (real / "x.db").exists() and wal.stat().st_size == size
        os.replace(tmp_path / "moved.db", real / "x.db")
    finally:
        store.close()

    EventStore.open(f"sqlite:///{real / 'other.db'}").close()
    for opening in (EventStore.open, BlockingAsyncStore):
        link.unlink()
        link.symlink_to(real / "x.db")
        store = opening(url)
        try:
            store.append("s-1", [NoteAdded(text="before")])
            link.unlink()
            link.symlink_to(real / "other.db")
            with pytest.raises(DatabaseError, match="was replaced while the store had it"):
                store.append("s-1", [NoteAdded(text="after")])
        finally:
            store.close()
    with EventStore.open(f"sqlite:///{real / 'x.db'}") as first:
        assert [e.data.text for e in first.read_stream("s-1")] == [  # type: ignore[union-attr]
            "0", "1", "2", "before", "before"]


def _swallow_a_failed_statement(conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
    """The application's code inside the append: a statement fails, and it carries on."""
    with contextlib.suppress(Exception):
        conn.execute(text("SELECT 1/0"))


def _matches_the_log(store: EventStore, stream: str, outcome: Any) -> None:
    """What the append said is what the log holds: an error and nothing written (PostgreSQL,
    whose transaction a failed statement aborts), or its positions, written (SQLite, where a
    failed statement leaves the transaction going)."""
    written = list(store.read_stream(stream))
    if isinstance(outcome, DatabaseError):
        assert store.engine.dialect.name == "postgresql"
        assert "nothing was written" in str(outcome) and written == []
    else:
        assert store.engine.dialect.name == "sqlite"
        assert [e.position for e in written] == [outcome.first_position]


def test_an_error_caught_inside_the_append_is_not_a_silent_rollback(url: str) -> None:
    """A before_commit hook or an inline handler that catches a failed statement's error: on
    PostgreSQL the transaction is aborted and its COMMIT rolls back without an error, so the
    append returned positions it never wrote, and the next append was given them again (a
    tester's find).  Now the commit raises a DatabaseError."""
    with EventStore.open(url) as store:
        outcomes: dict[str, Any] = {}
        stream = f"hook-{uuid.uuid4().hex[:8]}"
        try:
            outcomes[stream] = store.append_with(stream, [NoteAdded(text="a")],
                                                 before_commit=_swallow_a_failed_statement)
        except DatabaseError as e:
            outcomes[stream] = e
        handled = f"handled-{uuid.uuid4().hex[:8]}"

        def handler(conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
            if recorded[0].stream_id == handled:
                _swallow_a_failed_statement(conn, recorded)

        store.add_inline_handler(handler)
        try:
            outcomes[handled] = store.append(handled, [NoteAdded(text="b")])
        except DatabaseError as e:
            outcomes[handled] = e
        for stream_id, outcome in outcomes.items():
            _matches_the_log(store, stream_id, outcome)
        after = store.append(f"after-{uuid.uuid4().hex[:8]}", [NoteAdded(text="c")])
        assert after.first_position == store.last_position()  # (no position given twice)
        assert len({e.position for e in store.read_all()}) == len(list(store.read_all()))


def test_async_an_error_caught_inside_the_transaction_is_not_a_silent_rollback(
        url: str) -> None:
    """As above, on the async store: append_with's hook, and a run_sync function that writes a
    row and catches a failed statement's error (it returned its value, the row rolled back)."""
    stream = f"ahook-{uuid.uuid4().hex[:8]}"

    async def attempt() -> tuple[Any, Any]:
        async with await AsyncEventStore.open(url) as store:
            try:
                appended: Any = await asyncio.wait_for(store.append_with(
                    stream, [NoteAdded(text="a")], before_commit=_swallow_a_failed_statement), 10)
            except DatabaseError as e:
                appended = e

            def write_then_swallow(conn: Connection) -> str:
                _deferred_table_on(conn)
                _swallow_a_failed_statement(conn, ())
                return "returned"

            try:
                ran: Any = await asyncio.wait_for(
                    store.run_sync(write_then_swallow, write=True), 10)
            except DatabaseError as e:
                ran = e
            return appended, ran

    appended, ran = asyncio.run(attempt())
    with EventStore.open(url) as store:
        _matches_the_log(store, stream, appended)
        if store.engine.dialect.name == "postgresql":
            assert isinstance(ran, DatabaseError)
        else:
            assert ran == "returned"


def _refusing_trigger(conn: Connection, prefix: str) -> str:
    """A trigger refusing the insert of an event into a stream named ``prefix...``; returns the
    statement that drops it (the PostgreSQL test database outlives a test)."""
    name = f"refuse_{uuid.uuid4().hex[:8]}"
    if conn.dialect.name == "sqlite":
        conn.execute(text(
            f"CREATE TRIGGER {name} BEFORE INSERT ON es_events "
            f"WHEN NEW.stream_id LIKE '{prefix}%' "
            "BEGIN SELECT RAISE(ABORT, 'refused by the trigger'); END"))
        return f"DROP TRIGGER {name}"
    conn.execute(text(
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.stream_id LIKE '{prefix}%' THEN RAISE EXCEPTION 'refused by the trigger'; "
        "END IF; RETURN NEW; END $$"))
    conn.execute(text(f"CREATE TRIGGER {name} BEFORE INSERT ON es_events "
                      f"FOR EACH ROW EXECUTE FUNCTION {name}()"))
    return f"DROP TRIGGER {name} ON es_events; DROP FUNCTION {name}()"


@pytest.mark.parametrize("face", ["sync", "async"])
def test_an_insert_the_database_refuses_raises_and_writes_nothing(url: str, face: str) -> None:
    """An append whose INSERT the database refuses (a trigger here): the caller gets a
    DatabaseError each time, nothing of it is written, and appends around it go on -- on the
    store's every append path (a first append, then the one-round-trip guesses; several runs,
    psycopg preparing statements on their fifth)."""
    prefix = f"refused{uuid.uuid4().hex[:8]}-"
    with EventStore.open(url, migrate=True) as admin:
        with admin.engine.begin() as conn:
            drop = _refusing_trigger(conn, prefix)
        try:
            store: Any = (BlockingAsyncStore(url) if face == "async" else EventStore.open(url))
            try:
                for i in range(6):
                    before = store.last_position()
                    with pytest.raises(DatabaseError, match="refused by the trigger"):
                        store.append(f"{prefix}{i % 2}", [NoteAdded(text=f"no {i}")],
                                     expected_version=0)
                    assert store.last_position() == before
                    store.append(f"ok-{prefix}", [NoteAdded(text=f"ok {i}")])
            finally:
                store.close()
            assert admin.stream_version(f"{prefix}0") == 0
            assert admin.stream_version(f"{prefix}1") == 0
            assert _texts(admin, f"ok-{prefix}") == [f"ok {i}" for i in range(6)]
        finally:
            with admin.engine.begin() as conn:
                for statement in drop.split("; "):
                    conn.execute(text(statement))
