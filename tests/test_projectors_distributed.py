"""Several projector processes on one store: leases, SIGKILL take-over, exactly-once rows.

Projectors run in child processes (tests/_projector_workers.py, "spawn") while the test appends
``CounterIncremented`` events to a few ``counter-*`` streams from a thread.  ``TallyProjection``
raises on a gap or a repeat in a stream's versions, so a projection that applied an event twice
or skipped one ends up ``failed``; its rows must end up equal to what was appended.

PostgreSQL runs three projectors and kills the active one twice; SQLite runs one projector,
kills it and starts another.  The PostgreSQL test uses a database of its own (dropped after), so
that other suites truncating the shared test database cannot disturb it.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from eventstore import EventStore
from eventstore._migrate import migrate_url
from projections import status, verify
from projections._engine import load_row
from tests import _projector_workers as workers
from tests._events import CounterIncremented
from tests._projections import TallyProjection
from tests.conftest import fresh_pg_database

pytestmark = pytest.mark.slow

CTX = multiprocessing.get_context("spawn")
NAME = "tally_async"
STREAMS = [f"counter-{i}" for i in range(5)]
LEASE = workers.LEASE_SECONDS
TAKEOVER_MARGIN = 3.0  # beyond the lease: the survivors' poll interval and a loaded machine
START_TIMEOUT = 30.0  # spawning a worker imports the whole package
WORKER_SECONDS = 60.0  # a worker that is never stopped gives up after this


@pytest.fixture
def own_pg() -> Iterator[str]:
    """A new, migrated PostgreSQL database, dropped afterwards."""
    url = fresh_pg_database()
    migrate_url(url)
    try:
        yield url
    finally:
        admin = create_engine(make_url(url).set(database="postgres"),
                              isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                name = make_url(url).database
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()


class Appender(threading.Thread):
    """Appends increments to the counter streams until stopped, remembering what it wrote."""

    def __init__(self, store: EventStore) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.stop = threading.Event()
        self.totals = dict.fromkeys(STREAMS, 0)
        self.counts = dict.fromkeys(STREAMS, 0)
        self.error: BaseException | None = None

    def run(self) -> None:
        rnd = random.Random(7)
        try:
            while not self.stop.is_set():
                stream = rnd.choice(STREAMS)
                by = rnd.randint(1, 9)
                self.store.append(stream, [CounterIncremented(by=by, writer="parent")])
                self.totals[stream] += by
                self.counts[stream] += 1
                time.sleep(0.002)
        except BaseException as e:
            self.error = e

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        assert not self.is_alive(), "the appender did not stop"
        if self.error is not None:
            raise self.error


@dataclass
class Sample:
    at: float
    owner: str | None
    position: int
    lease_until: datetime | None
    state: str


@dataclass
class Cluster:
    """Projector processes by worker id, their queue, and what polling ``status`` saw."""

    url: str
    store: EventStore
    stop_file: Path
    queue: Any = field(default_factory=CTX.Queue)
    procs: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)

    def start(self, worker_id: str) -> None:
        p = CTX.Process(target=workers.run_projector, daemon=True,
                        args=(self.url, worker_id, NAME, str(self.stop_file), WORKER_SECONDS,
                              self.queue))
        p.start()
        self.procs[worker_id] = p

    def expect(self, kind: str, n: int) -> set[str]:
        """Wait for ``n`` messages of ``kind`` from the workers; fail on a worker's error."""
        got: set[str] = set()
        deadline = time.monotonic() + START_TIMEOUT
        while len(got) < n:
            try:
                k, payload = self.queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_mod.Empty:
                codes = {w: p.exitcode for w, p in self.procs.items()}
                pytest.fail(f"got {kind} from only {sorted(got)}; exit codes {codes}")
            if k == "error":
                pytest.fail(f"projector worker failed:\n{payload}")
            assert k == kind, (k, payload)
            got.add(payload)
        return got

    def sample(self) -> Sample:
        (st,) = status(self.store, NAME)
        s = Sample(time.monotonic(), st.owner, st.position, st.lease_until, st.status)
        if self.samples:
            assert s.position >= self.samples[-1].position, "the checkpoint went back"
        assert s.state == "running", f"projection {s.state}: {st.error}"
        self.samples.append(s)
        return s

    def wait_for_owner(self, among: set[str], timeout: float) -> Sample:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.sample()
            if s.owner in among and s.position > 0:
                return s
            time.sleep(0.05)
        pytest.fail(f"no projector of {sorted(among)} took the lease within {timeout}s; "
                    f"last status {self.samples[-1]}")

    def watch(self, seconds: float) -> list[Sample]:
        """Poll status for ``seconds``; returns the samples taken."""
        out = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            out.append(self.sample())
            time.sleep(0.05)
        return out

    def kill(self, worker_id: str) -> None:
        p = self.procs.pop(worker_id)
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        assert p.exitcode == -signal.SIGKILL

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until the projection's checkpoint reaches the head of the log."""
        deadline = time.monotonic() + timeout
        head = self.store.last_position()
        while self.sample().position < head:
            if time.monotonic() > deadline:
                pytest.fail(f"projection stuck at {self.samples[-1]} behind head {head}")
            time.sleep(0.05)

    def shutdown(self) -> None:
        """Stop the live workers cleanly; each must say ok and exit 0."""
        self.stop_file.touch()
        alive = set(self.procs)
        assert self.expect("ok", len(alive)) == alive
        for w, p in self.procs.items():
            p.join(30)
            assert p.exitcode == 0, f"{w} exited with {p.exitcode}"
        self.procs.clear()

    def cleanup(self) -> None:
        self.stop_file.touch()
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
            p.join(10)


@pytest.fixture
def cluster_for(tmp_path: Path) -> Iterator[Any]:
    made: list[tuple[Cluster, EventStore]] = []

    def make(url: str) -> Cluster:
        store = EventStore.open(url, migrate=True)
        c = Cluster(url, store, tmp_path / f"stop-{len(made)}")
        made.append((c, store))
        return c

    try:
        yield make
    finally:
        for c, store in made:
            c.cleanup()
            store.close()


def kill_active(cluster: Cluster) -> Sample:
    """SIGKILL the lease holder; returns the last status seen before the kill."""
    before = cluster.sample()
    assert before.owner is not None and before.lease_until is not None
    cluster.kill(before.owner)
    return before


def await_successor(cluster: Cluster, before: Sample, candidates: set[str]) -> tuple[str, float]:
    """Wait for one of ``candidates`` to hold the lease; returns it and the seconds it took."""
    t0 = time.monotonic()
    s = cluster.wait_for_owner(candidates, LEASE + TAKEOVER_MARGIN)
    # It took the lease no earlier than the killed holder's lease (as last seen) ran out.
    assert before.lease_until is not None and datetime.now(UTC) >= before.lease_until
    assert s.owner is not None and s.owner != before.owner
    return s.owner, s.at - t0


def assert_rows_exact(store: EventStore, appender: Appender) -> None:
    """Every stream's tally row counts each appended event once, and the replay agrees."""
    p = TallyProjection(NAME)
    for stream in STREAMS:
        row = load_row(store, p, "default", stream)
        assert row is not None, stream
        tally, version = row
        assert version == store.stream_version(stream) == appender.counts[stream]
        assert (tally.count, tally.total, tally.last_version) == (
            appender.counts[stream], appender.totals[stream], appender.counts[stream])
    (st,) = status(store, NAME)
    assert st.status == "running" and st.error is None
    assert st.position == store.last_position()
    assert verify(store, p) == []


def test_postgres_projectors_take_over_after_sigkill_exactly_once(
        own_pg: str, cluster_for: Any) -> None:
    """Of 3 projectors one holds the lease; killed twice, a survivor takes over within the lease."""
    cluster: Cluster = cluster_for(own_pg)
    ids = {"w0", "w1", "w2"}
    for w in sorted(ids):
        cluster.start(w)
    assert cluster.expect("started", 3) == ids
    appender = Appender(cluster.store)
    appender.start()
    try:
        first = cluster.wait_for_owner(ids, START_TIMEOUT)
        seen = cluster.watch(1.5)
        # While the holder lives, nobody else takes the lease, and the checkpoint advances.
        assert {s.owner for s in seen} == {first.owner}
        assert seen[-1].position > first.position
        takeovers = []
        for _ in range(2):
            before = kill_active(cluster)
            successor, took = await_successor(cluster, before, set(cluster.procs))
            assert took <= LEASE + TAKEOVER_MARGIN
            takeovers.append(successor)
            seen = cluster.watch(0.8)
            assert {s.owner for s in seen} == {successor}
        assert len(set(takeovers)) == 2 and first.owner not in takeovers
    finally:
        appender.finish()
    cluster.drain()
    cluster.shutdown()
    assert status(cluster.store, NAME)[0].owner is None  # released on a clean stop
    assert_rows_exact(cluster.store, appender)


def test_sqlite_projector_killed_and_replaced_exactly_once(
        tmp_path: Path, cluster_for: Any) -> None:
    """A SQLite projector SIGKILLed mid-run is replaced by a new one; the rows are exact."""
    cluster: Cluster = cluster_for(f"sqlite:///{tmp_path / 'events.db'}")
    cluster.start("w0")
    cluster.expect("started", 1)
    appender = Appender(cluster.store)
    appender.start()
    try:
        first = cluster.wait_for_owner({"w0"}, START_TIMEOUT)
        seen = cluster.watch(1.0)
        assert seen[-1].position > first.position
        before = kill_active(cluster)
        cluster.start("w1")
        cluster.expect("started", 1)
        successor, took = await_successor(cluster, before, {"w1"})
        assert successor == "w1" and took <= LEASE + TAKEOVER_MARGIN
        assert cluster.sample().position >= before.position
        cluster.watch(0.5)
    finally:
        appender.finish()
    cluster.drain()
    cluster.shutdown()
    assert_rows_exact(cluster.store, appender)
