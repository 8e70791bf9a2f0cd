"""Backends for the suite: every store test runs on SQLite and on a real PostgreSQL.

PostgreSQL comes from ``EVENTSTORE_TEST_PG_URL`` (``scripts/test.sh`` starts a throwaway server
and sets it).  Without it the PostgreSQL half of the suite fails loudly rather than skipping.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from eventstore import EventStore
from eventstore._migrate import migrate_url
from tests import _examples  # noqa: F401  (loads the suite's Hypothesis profile)

BACKENDS = ["sqlite", "postgres"]

_migrated: set[str] = set()


_session_db: list[str] = []


def server_url() -> str:
    """The test server's database from ``EVENTSTORE_TEST_PG_URL`` (fails when unset)."""
    url = os.environ.get("EVENTSTORE_TEST_PG_URL")
    if not url:
        pytest.fail("EVENTSTORE_TEST_PG_URL is not set: run the suite with scripts/test.sh, "
                    "which starts a throwaway PostgreSQL", pytrace=False)
    return url


def pg_url() -> str:
    """This test session's own database on the test server, created on first use.

    A database per session, so that two test runs against one server never empty each other's
    tables.
    """
    if not _session_db:
        _session_db.append(fresh_pg_database())
    return _session_db[0]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for url in _session_db:
        drop_pg_database(url)


def drop_pg_database(url: str) -> None:
    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{target.database}" WITH (FORCE)'))
    finally:
        admin.dispose()


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


def terminate_other_sessions(url: str) -> None:
    """End every other client session on the URL's database (as a server restart or an
    ``idle_session_timeout`` would) and wait until they are gone."""
    killer = create_engine(url, isolation_level="AUTOCOMMIT")
    others = ("FROM pg_stat_activity WHERE datname = current_database() "
              "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
    try:
        with killer.connect() as conn:
            killed = conn.execute(text(f"SELECT pg_terminate_backend(pid) {others}")).all()
            assert killed and all(k for (k,) in killed)
            deadline = time.monotonic() + 10
            while conn.execute(text(f"SELECT count(*) {others}")).scalar():
                assert time.monotonic() < deadline, "sessions did not end"
                time.sleep(0.01)
    finally:
        killer.dispose()


def fresh_pg_database() -> str:
    """A new, empty PostgreSQL database on the test server; returns its URL."""
    base = make_url(server_url())
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


@pytest.fixture
def fresh_pg() -> Iterator[str]:
    """A new PostgreSQL database that was never migrated (dropped afterwards)."""
    url = fresh_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


SPAWN = multiprocessing.get_context("spawn")


class Children:
    """Processes a test spawned; any still alive at the end are killed and reaped."""

    def __init__(self) -> None:
        self.procs: list[Any] = []

    def start(self, target: Callable[..., None], *args: Any, context: Any = SPAWN) -> Any:
        p = context.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(10)


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        c.cleanup()


def collect(q: Any, procs: Sequence[Any], n: int, timeout: float) -> list[Any]:
    """Wait for ``n`` ("ok", payload) reports from children; fail with a child's traceback."""
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        try:
            kind, payload = q.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            codes = [p.exitcode for p in procs]
            pytest.fail(f"only {len(out)} of {n} workers reported; exit codes {codes}")
        if kind == "error":
            pytest.fail(f"worker failed:\n{payload}")
        out.append(payload)
    for p in procs:
        p.join(timeout)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    return out
