"""Schema migrations: concurrent migrators, refusing unmigrated or newer schemas, defaults."""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import queue as queue_mod
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from structlog.testing import capture_logs

from eventstore import EventStore, InvalidArgument, SchemaVersionMismatch, _migrate
from eventstore._migrate import known_revisions, migrate_url
from eventstore._schema import VERSION_TABLE
from eventstore._schema import metadata as schema_metadata
from eventstore.aio import AsyncEventStore
from eventstore.errors import DatabaseError
from projections import inline, langgraph_saver, status
from tests import _workers
from tests._events import NoteAdded
from tests._projections import TallyProjection
from tests.conftest import drop_pg_database, fresh_pg_database

CTX = multiprocessing.get_context("spawn")
STORE_TABLES = {"es_events", "es_streams", "es_idempotency"}


@pytest.fixture
def fresh_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database of the backend under test that no migration has touched."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    url = fresh_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVENTSTORE_AUTO_MIGRATE", raising=False)
    monkeypatch.delenv("EVENTSTORE_URL", raising=False)


def head() -> str:
    return known_revisions()[0]


def version_rows(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))]
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def set_version(url: str, revision: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = :v"), {"v": revision})
    finally:
        engine.dispose()


def migrate_to(url: str, revision: str) -> None:
    """Upgrade a database to ``revision`` only, with Alembic directly."""
    cfg = _migrate._config()
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def assert_appends_work(url: str, **open_kwargs: object) -> None:
    with EventStore.open(url, **open_kwargs) as store:  # type: ignore[arg-type]
        r = store.append("check-1", [NoteAdded(text="hello")], expected_version=0)
        assert (r.first_position, r.stream_version) == (1, 1)
        assert [e.data.text for e in store.read_stream("check-1")] == ["hello"]  # type: ignore[union-attr]


@pytest.mark.slow
def test_four_processes_migrating_at_once_all_succeed_once(fresh_url: str) -> None:
    """Four processes migrating one fresh database together all succeed; the schema is at head."""
    n = 4
    barrier = CTX.Barrier(n)
    q = CTX.Queue()
    procs = [CTX.Process(target=_workers.migrator, args=(fresh_url, barrier, q), daemon=True)
             for _ in range(n)]
    for p in procs:
        p.start()
    try:
        reports = []
        for _ in range(n):
            try:
                reports.append(q.get(timeout=60))
            except queue_mod.Empty:
                pytest.fail(f"migrators did not report; exit codes {[p.exitcode for p in procs]}")
        errors = [payload for kind, payload in reports if kind == "error"]
        assert not errors, "\n".join(errors)
        assert reports == [("ok", head())] * n
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
    assert version_rows(fresh_url) == [head()]
    assert table_names(fresh_url) >= STORE_TABLES | {VERSION_TABLE}
    assert_appends_work(fresh_url, migrate=False)


def test_unmigrated_postgres_refuses_to_open_until_migrated(fresh_pg: str) -> None:
    """PostgreSQL never migrated: open raises SchemaVersionMismatch naming `eventstore migrate`."""
    with pytest.raises(SchemaVersionMismatch) as info:
        EventStore.open(fresh_pg)
    assert "eventstore migrate" in str(info.value)
    assert table_names(fresh_pg) == set(), "a refused open must not create tables"
    assert migrate_url(fresh_pg) == head()
    assert_appends_work(fresh_pg)


def test_sqlite_migrates_itself_on_first_open(tmp_path: Path) -> None:
    """A new SQLite file is migrated by the first open without being asked to."""
    url = f"sqlite:///{tmp_path / 'new.db'}"
    with EventStore.open(url) as store:
        assert set(inspect(store.engine).get_table_names()) >= STORE_TABLES
    assert version_rows(url) == [head()]
    assert_appends_work(url)


@pytest.mark.parametrize("migrate", [True, False], ids=["migrate", "no-migrate"])
def test_newer_schema_revision_is_refused(fresh_url: str, migrate: bool) -> None:
    """A revision unknown to the code raises SchemaVersionMismatch saying the schema is newer."""
    migrate_url(fresh_url)
    set_version(fresh_url, "9999_future")
    with pytest.raises(SchemaVersionMismatch) as info:
        EventStore.open(fresh_url, migrate=migrate)
    assert "9999_future" in str(info.value) and "newer" in str(info.value)
    assert "pip install --upgrade" in str(info.value)  # the command to run
    assert version_rows(fresh_url) == ["9999_future"]


def test_older_schema_revision_is_refused_until_migrated(fresh_url: str) -> None:
    """A database at an older revision: open(migrate=False) names the fix, migrate=True upgrades."""
    oldest = ScriptDirectory.from_config(_migrate._config()).get_base()
    if oldest is None or oldest == head():
        pytest.skip("the code ships a single revision")
    migrate_to(fresh_url, oldest)
    with pytest.raises(SchemaVersionMismatch) as info:
        EventStore.open(fresh_url, migrate=False)
    assert "eventstore migrate" in str(info.value) and f"is at schema {oldest}" in str(info.value)
    assert version_rows(fresh_url) == [oldest]
    assert_appends_work(fresh_url, migrate=True)
    assert version_rows(fresh_url) == [head()]


def alembic_cli_config(url: str | None, out: io.StringIO | None = None) -> Config:
    """The configuration of the plain ``alembic`` command line: no connection handed over."""
    cfg = Config(str(_migrate.MIGRATIONS_DIR / "alembic.ini"), stdout=out or io.StringIO())
    cfg.set_main_option("script_location", str(_migrate.MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def test_the_alembic_command_line_runs_the_command_it_is_given(
        fresh_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``alembic downgrade`` (and ``current``, ``upgrade``) from the command line do what they
    say on the URL given; a downgrade used to exit 0 having upgraded instead."""
    revisions = [r.revision for r in ScriptDirectory.from_config(_migrate._config())
                 .walk_revisions()]  # newest first
    if len(revisions) < 2:
        pytest.skip("the code ships a single revision")
    previous = revisions[1]
    migrate_url(fresh_url)
    with EventStore.open(fresh_url, migrate=False) as store:
        store.append("keep-1", [NoteAdded(text="kept")])
    command.downgrade(alembic_cli_config(fresh_url), previous)
    assert version_rows(fresh_url) == [previous]
    with pytest.raises(SchemaVersionMismatch, match=f"is at schema {previous}"):
        EventStore.open(fresh_url, migrate=False)
    monkeypatch.setenv("EVENTSTORE_URL", fresh_url)  # no URL in the config: the store's own
    out = io.StringIO()
    command.current(alembic_cli_config(None, out))
    assert out.getvalue().split() == [previous]
    monkeypatch.delenv("EVENTSTORE_URL")  # no database named at all: refused, nothing made
    with pytest.raises(InvalidArgument, match="give the database"):
        command.current(alembic_cli_config(None))
    command.upgrade(alembic_cli_config(fresh_url), "head")
    assert version_rows(fresh_url) == [head()]
    with EventStore.open(fresh_url, migrate=False) as store:
        assert [e.data.text for e in store.read_stream("keep-1")] == ["kept"]  # type: ignore[union-attr]


def test_the_alembic_command_line_prints_sql_offline(
        fresh_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``alembic upgrade head --sql`` prints the DDL and touches no database."""
    command.upgrade(alembic_cli_config(fresh_url), "head", sql=True)
    out = capsys.readouterr().out
    assert "CREATE TABLE es_events" in out and VERSION_TABLE in out
    if fresh_url.startswith("sqlite"):
        assert not Path(fresh_url.removeprefix("sqlite:///")).exists()
    else:
        assert table_names(fresh_url) == set()


def test_second_migrate_is_a_no_op(fresh_url: str) -> None:
    """Migrating an up-to-date database changes nothing and keeps its data."""
    with capture_logs() as first_logs:
        assert migrate_url(fresh_url) == head()
    assert [e["event"] for e in first_logs] == ["schema_migrated"]
    with EventStore.open(fresh_url, migrate=False) as store:
        store.append("keep-1", [NoteAdded(text="kept")])
    tables = table_names(fresh_url)
    with capture_logs() as second_logs:
        assert migrate_url(fresh_url) == head()
    assert [e["event"] for e in second_logs] == []
    assert version_rows(fresh_url) == [head()]
    assert table_names(fresh_url) == tables
    with EventStore.open(fresh_url, migrate=False) as store:
        assert [e.data.text for e in store.read_stream("keep-1")] == ["kept"]  # type: ignore[union-attr]


def test_open_without_url_uses_eventstore_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """EventStore.open() with no argument opens the database named by EVENTSTORE_URL."""
    path = tmp_path / "from-env.db"
    monkeypatch.setenv("EVENTSTORE_URL", f"sqlite:///{path}")
    monkeypatch.chdir(tmp_path)
    with EventStore.open() as store:
        assert store.url.database == str(path)
        store.append("env-1", [NoteAdded(text="x")])
    assert path.is_file() and not (tmp_path / "eventstore.db").exists()
    with EventStore.open(f"sqlite:///{path}") as store:
        assert store.stream_version("env-1") == 1


def test_open_without_url_or_env_uses_eventstore_db_in_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without an argument or EVENTSTORE_URL, open() uses sqlite:///./eventstore.db."""
    monkeypatch.chdir(tmp_path)
    with EventStore.open() as store:
        assert store.url.render_as_string() == "sqlite:///./eventstore.db"
        store.append("default-1", [NoteAdded(text="x")])
    assert (tmp_path / "eventstore.db").is_file()
    with EventStore.open(f"sqlite:///{tmp_path / 'eventstore.db'}") as store:
        assert store.stream_version("default-1") == 1


def test_bad_environment_settings_raise_typed_errors(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """EVENTSTORE_MAX_EVENT_BYTES / _POLL_INTERVAL that are not numbers raise InvalidArgument."""

    url = f"sqlite:///{tmp_path}/env.db"
    monkeypatch.setenv("EVENTSTORE_MAX_EVENT_BYTES", "lots")
    with pytest.raises(InvalidArgument, match="EVENTSTORE_MAX_EVENT_BYTES"):
        EventStore.open(url)
    monkeypatch.setenv("EVENTSTORE_MAX_EVENT_BYTES", "100")
    monkeypatch.setenv("EVENTSTORE_POLL_INTERVAL", "soon")
    with pytest.raises(InvalidArgument, match="EVENTSTORE_POLL_INTERVAL"):
        EventStore.open(url)
    monkeypatch.setenv("EVENTSTORE_POLL_INTERVAL", "1")  # a number, out of range
    with pytest.raises(InvalidArgument, match="EVENTSTORE_POLL_INTERVAL must be in"):
        EventStore.open(url)
    monkeypatch.delenv("EVENTSTORE_POLL_INTERVAL")
    monkeypatch.setenv("EVENTSTORE_MAX_EVENT_BYTES", "-3")
    with pytest.raises(InvalidArgument, match="EVENTSTORE_MAX_EVENT_BYTES must be >= 1"):
        EventStore.open(url)
    monkeypatch.setenv("EVENTSTORE_MAX_EVENT_BYTES", "100")
    with EventStore.open(url) as store, pytest.raises(InvalidArgument):
        store.append("c-1", [NoteAdded(text="x" * 200)])


@pytest.mark.parametrize(("value", "migrates"), [
    ("on", True), ("ON", True), ("yes", True), ("1", True), ("true", True),
    ("off", False), ("No", False), ("0", False), ("false", False)])
def test_auto_migrate_env_reads_on_and_off(fresh_url: str, monkeypatch: pytest.MonkeyPatch,
                                           value: str, migrates: bool) -> None:
    """EVENTSTORE_AUTO_MIGRATE takes on/off, yes/no, true/false and 1/0 in any case, on both
    backends (``on`` was read as off)."""
    monkeypatch.setenv("EVENTSTORE_AUTO_MIGRATE", value)
    if migrates:
        with EventStore.open(fresh_url) as store:
            store.append("c-1", [NoteAdded(text="a")])
        assert version_rows(fresh_url) == [head()]
    else:
        with pytest.raises(SchemaVersionMismatch, match="no eventstore schema"):
            EventStore.open(fresh_url)


def test_auto_migrate_env_refuses_other_values(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A value that is neither on nor off is an InvalidArgument, not a silent off."""

    monkeypatch.setenv("EVENTSTORE_AUTO_MIGRATE", "enabled")
    with pytest.raises(InvalidArgument, match="EVENTSTORE_AUTO_MIGRATE"):
        EventStore.open(f"sqlite:///{tmp_path / 'x.db'}")
    assert not (tmp_path / "x.db").exists() or table_names(f"sqlite:///{tmp_path / 'x.db'}") \
        == set()


@pytest.mark.asyncio
async def test_a_store_that_will_not_migrate_creates_no_sqlite_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """migrate=False (or EVENTSTORE_AUTO_MIGRATE=off) on a SQLite path that is not there is
    refused, sync and async, and leaves no file (an empty one made the CLI call the path
    another application's database)."""

    path = tmp_path / "missing.db"
    url = f"sqlite:///{path}"
    with pytest.raises(SchemaVersionMismatch, match=f"no file at {path}.*eventstore migrate"):
        EventStore.open(url, migrate=False)
    with pytest.raises(SchemaVersionMismatch, match="no file at"):
        await AsyncEventStore.open(url, migrate=False)
    monkeypatch.setenv("EVENTSTORE_AUTO_MIGRATE", "off")
    with pytest.raises(SchemaVersionMismatch, match="no file at"):
        EventStore.open(url)
    assert not path.exists()
    migrate_url(url)
    with EventStore.open(url) as store:  # there now: opens without migrating
        store.append("c-1", [NoteAdded(text="x")])


@pytest.mark.asyncio
async def test_opening_a_current_sqlite_database_does_not_wait_for_a_writer(
        tmp_path: Path) -> None:
    """Auto-migrate only reads a database already at the newest schema: a store opens (sync
    and async) while another connection holds SQLite's write lock, with a short busy timeout."""


    path = tmp_path / "busy.db"
    with EventStore.open(f"sqlite:///{path}") as store:
        store.append("c-1", [NoteAdded(text="a")])
    writer = sqlite3.connect(str(path), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        url = f"sqlite:///{path}?busy_timeout=50"
        with EventStore.open(url, migrate=True) as store:
            assert [e.data for e in store.read_stream("c-1")] == [NoteAdded(text="a")]
        astore = await AsyncEventStore.open(url, migrate=True)
        try:
            assert [e.data async for e in astore.read_stream("c-1")] == [NoteAdded(text="a")]
        finally:
            await astore.close()
    finally:
        writer.rollback()
        writer.close()


@pytest.mark.slow
def test_projection_categories_recorded_by_a_migrated_database(fresh_url: str) -> None:
    """A projection row from before migration 0005 has no categories (its lag counts every
    event after it); once code of its fold registers it again, they are recorded."""

    migrate_to(fresh_url, "0004")
    engine = create_engine(fresh_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO es_projections (name, generation, position, code_version, status,"
                " updated_at) VALUES ('tally_old', 1, 0, 1, 'running', 0)"))
    finally:
        engine.dispose()
    with EventStore.open(fresh_url, migrate=True) as store:
        store.append("note-1", [NoteAdded(text="x")])
        (st,) = status(store, "tally_old")
        assert (st.categories, st.lag) == (None, 1)  # not known: every event counts
        inline(store, TallyProjection("tally_old"))
        (st,) = status(store, "tally_old")
        assert (st.categories, st.lag) == (("counter",), 0)


@pytest.mark.parametrize("migrate", [False, True])
def test_a_server_refusing_the_connection_at_open_is_a_transient_database_error(
        migrate: bool) -> None:
    """Opening a store, sync or async, with or without migrating, on a PostgreSQL address where
    nothing listens: the store's DatabaseError (transient: worth a retry), not the driver's."""
    url = "postgresql+psycopg://app@127.0.0.1:1/app"
    with pytest.raises(DatabaseError) as sync_refused:
        EventStore.open(url, migrate=migrate)

    async def open_async() -> None:
        await AsyncEventStore.open(url, migrate=migrate)

    with pytest.raises(DatabaseError) as async_refused:
        asyncio.run(open_async())
    for refused in (sync_refused.value, async_refused.value):
        assert refused.transient is True
        assert "connection failed" in str(refused)


def test_the_core_tables_declare_what_the_migrations_build(fresh_url: str) -> None:
    """The tables of ``eventstore._schema`` (and the LangGraph index tables) describe the
    database the migrations build: same columns, types, nullability, primary keys, indexes and
    unique constraints.  The migrations, not the tables, make the schema, so a table edited
    without a migration (or the other way round) would only show as statements failing."""

    migrate_url(fresh_url)
    engine = create_engine(fresh_url)
    try:
        with engine.connect() as conn:
            diffs = []
            for declared in (schema_metadata, langgraph_saver.metadata):
                context = MigrationContext.configure(conn, opts={
                    "compare_type": True,
                    "include_name": lambda name, kind, parent, tables=declared.tables: (
                        kind != "table" or name in tables)})
                diffs += compare_metadata(context, declared)
                for table in declared.tables.values():
                    built = inspect(conn).get_pk_constraint(table.name)["constrained_columns"]
                    if built != [c.name for c in table.primary_key.columns]:
                        diffs.append(("primary key", table.name, built))
    finally:
        engine.dispose()
    assert diffs == []
