"""Applying the Alembic migrations in ``migrations/`` and checking a database's schema on open."""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL

from ._backend import (
    begin_write,
    create_store_engine,
    lock_migrations,
    missing_sqlite_file,
    resolve_url,
    shown_url,
    translate,
)
from ._schema import VERSION_TABLE
from .errors import SchemaVersionMismatch
from .logs import get_logger

_log = get_logger("eventstore.migrate")

# Installed from a wheel they are eventstore/_migrations; in a checkout, migrations/ beside it.
_HERE = Path(__file__).resolve().parent
MIGRATIONS_DIR = next((d for d in (_HERE / "_migrations", _HERE.parent / "migrations")
                       if (d / "env.py").is_file()), _HERE / "_migrations")


def _config() -> Config:
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise SchemaVersionMismatch(f"eventstore migrations not found at {MIGRATIONS_DIR}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("version_table", VERSION_TABLE)
    return cfg


@functools.cache
def known_revisions() -> tuple[str, frozenset[str]]:
    """The head revision and every revision the code knows."""
    script = ScriptDirectory.from_config(_config())
    head = script.get_current_head()
    if head is None:
        raise SchemaVersionMismatch("eventstore ships no migrations")
    return head, frozenset(rev.revision for rev in script.walk_revisions())


def current_revision(conn: Connection) -> str | None:
    ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def migrate(engine: Engine) -> str:
    """Upgrade the database to the newest schema; safe when several processes do it at once.

    A database already at the newest schema is only read.  Otherwise the whole upgrade runs in
    one transaction that first takes the migration lock (an advisory lock on PostgreSQL, the
    write lock on SQLite): a second migrator waits, then finds the schema current and does
    nothing.
    """
    with translate(), engine.connect() as conn:
        current = is_current(conn)
        conn.rollback()
    if current:  # nothing to do: no write lock (on SQLite, no wait behind a writer)
        return known_revisions()[0]
    with begin_write(engine) as conn:
        return migrate_on(conn)


def is_current(conn: Connection) -> bool:
    """Whether the database is at this code's schema (a read)."""
    return current_revision(conn) == known_revisions()[0]


def migrate_on(conn: Connection) -> str:
    """:func:`migrate` on a connection already in a write transaction (also for run_sync)."""
    head, known = known_revisions()
    lock_migrations(conn)
    before = current_revision(conn)
    if before is not None and before not in known:
        raise _newer(before, head)
    if before != head:
        cfg = _config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        _log.info("schema_migrated", from_revision=before, to_revision=head)
    return head


def migrate_url(url: str | URL | None) -> str:
    engine = create_store_engine(resolve_url(url))
    try:
        return migrate(engine)
    finally:
        engine.dispose()


def check(engine: Engine, url: URL) -> None:
    """Raise :class:`SchemaVersionMismatch` unless the database is at this code's schema."""
    with translate(), engine.connect() as conn:
        check_on(conn, url)
        conn.rollback()


def check_on(conn: Connection, url: URL) -> None:
    """:func:`check` on an open connection (also for run_sync)."""
    head, known = known_revisions()
    rev = current_revision(conn)
    if rev == head:
        return
    if rev is not None and rev not in known:
        raise _newer(rev, head)
    raise _unmigrated(url, "has no eventstore schema" if rev is None
                      else f"is at schema {rev}, older than {head}")


def check_file(url: URL) -> None:
    """Before a store that will not migrate opens a SQLite file: refuse one that is not there,
    rather than have the driver create an empty database only to refuse it."""
    path = missing_sqlite_file(url)
    if path is not None:
        raise _unmigrated(url, f"has no eventstore schema (no file at {path})")


def _unmigrated(url: URL, state: str) -> SchemaVersionMismatch:
    shown = shown_url(url)
    return SchemaVersionMismatch(
        f"database {shown} {state}: run `eventstore migrate --url '{shown}'`")


def _newer(rev: str, head: str) -> SchemaVersionMismatch:
    return SchemaVersionMismatch(
        f"database schema {rev} is newer than this eventstore code (newest known: {head}): "
        "upgrade the eventstore package before opening this database (`pip install --upgrade "
        "<a newer eventstore checkout>`; `eventstore migrate` never takes a schema back)"
    )
