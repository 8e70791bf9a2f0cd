"""Backends for the suite: every store test runs on SQLite and on a real PostgreSQL.

PostgreSQL comes from ``EVENTSTORE_TEST_PG_URL`` (``scripts/test.sh`` starts a throwaway server
and sets it).  Without it the PostgreSQL half of the suite fails loudly rather than skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from eventstore import EventStore
from eventstore._migrate import migrate_url

BACKENDS = ["sqlite", "postgres"]

_migrated: set[str] = set()


def pg_url() -> str:
    url = os.environ.get("EVENTSTORE_TEST_PG_URL")
    if not url:
        pytest.fail("EVENTSTORE_TEST_PG_URL is not set: run the suite with scripts/test.sh, "
                    "which starts a throwaway PostgreSQL", pytrace=False)
    return url


def reset_pg(url: str) -> None:
    """Empty every table of the shared test database (migrating it once)."""
    if url not in _migrated:
        migrate_url(url)
        _migrated.add(url)
    engine = create_engine(url)
    try:
        names = [t for t in inspect(engine).get_table_names()
                 if t != "eventstore_alembic_version"]
        with engine.begin() as conn:
            if names:
                conn.execute(text("TRUNCATE " + ", ".join(f'"{n}"' for n in names)))
    finally:
        engine.dispose()


def fresh_pg_database() -> str:
    """A new, empty PostgreSQL database on the test server; returns its URL."""
    base = make_url(pg_url())
    name = f"es_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(backend: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated, empty database of the backend under test."""
    if backend == "sqlite":
        path = tmp_path_factory.mktemp("db") / "events.db"
        return f"sqlite:///{path}"
    u = pg_url()
    reset_pg(u)
    return u


@pytest.fixture
def store(url: str) -> Iterator[EventStore]:
    s = EventStore.open(url, migrate=True)
    try:
        yield s
    finally:
        s.close()
