"""Throughput of ``eventstore.EventStore`` against the bare driver and against ``eventsourcing``.

What it measures, in events per second, on SQLite (a WAL file in a temp dir) and on PostgreSQL:

* ``append 1/txn``   single-event appends, one transaction each, round-robin over 200 streams
                     (20,000 events), each with the expected version of its stream;
* ``append 100/txn`` batched appends, 100 events per transaction, round-robin over 10 streams
                     (100,000 events);
* ``read stream``    reading one 10,000-event stream (written by the batched workload) and
                     decoding every event into its type;
* ``read all``       reading the whole log (100,000 events) in position order, decoding every event.

Against what, for every workload:

* ``ours``  the public API: ``EventStore.append`` / ``read_stream`` / ``read_all``;
* ``bare``  the bare driver (stdlib ``sqlite3`` / ``psycopg``) on the same tables (created by our
            migrations) doing the SQL work our store does: BEGIN IMMEDIATE on SQLite (on
            PostgreSQL a transaction that first takes the same advisory lock), select the stream's
            version and the last position, insert the events (msgspec-encoded, a fresh uuid4 and
            a timestamp each), insert or update the ``es_streams`` row, COMMIT; reads page through
            the same SELECT (2,000 rows per page, a short transaction per page, as the store does)
            and msgspec-decode the data column into the event struct;
* ``es``    the ``eventsourcing`` library (9.x), its Python peer: its own ``EventStore`` (mapper
            with its JSON transcoder + application recorder) built by its infrastructure factory
            from ``PERSISTENCE_MODULE=eventsourcing.sqlite`` / ``eventsourcing.postgres``, with its
            default settings.  Appends are ``EventStore.put`` of frozen-dataclass domain events;
            a stream read is ``EventStore.get``; the log read is the recorder's
            ``select_notifications`` in pages of 2,000, each notification mapped to its domain
            event.  Its SQLite connections get the same ``PRAGMA synchronous`` as the others.

Every contender starts each append repetition on an empty store (a new SQLite file, or TRUNCATEd
tables on PostgreSQL after a CHECKPOINT); the reads run on a store the batched workload filled,
and check the count and the last event they decoded.  Event objects are built before the clock
starts, and moved out of the cyclic GC's reach (``gc.freeze``; ``--no-gc-freeze`` keeps them in).
Each row is the median of ``--repeat`` (3) runs; the repetitions of the contenders are interleaved
so machine noise hits all of them alike.  Besides events/s (wall clock) the script reports this
process's CPU time per event, the client-side cost without the disk's and the server's waits.
structlog is set to WARNING, as an application would: the store logs every append at debug level,
which unconfigured structlog prints to stdout.

Run ``python benchmarks/bench_store.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import logging
import os
import platform
import pstats
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from eventsourcing.domain import DomainEvent

from eventstore import Event, EventStore

TENANT = "default"
PAGE = 2000  # the store's page size (eventstore.store._PAGE); bare and es read in pages as large
SINGLE_EVENTS = 20_000
SINGLE_STREAMS = 200
BATCH_EVENTS = 100_000
BATCH_SIZE = 100
BATCH_STREAMS = 10  # so each batched stream holds BATCH_EVENTS / 10 = 10,000 events

WORKLOADS = ("append1", "append100", "read_stream", "read_all")
TITLES = {
    "append1": "append 1/txn",
    "append100": "append 100/txn",
    "read_stream": "read stream",
    "read_all": "read all",
}
CONTENDERS = ("ours", "bare", "es")
TARGET_BARE = 0.5  # ours >= half the bare driver's speed
TARGET_ES = 3.0  # ours >= three times eventsourcing's


class Assigned(Event, tag="bench.Assigned"):
    name: str
    value: int
    run_id: str


RUN_ID = uuid.uuid4().hex


def make_event(i: int) -> Assigned:
    # ~100 bytes of JSON: {"type":"bench.Assigned","name":"worker-0042","value":…,"run_id":"…"}
    return Assigned(name=f"worker-{i % 1000:04d}", value=i, run_id=RUN_ID)


def stream_name(k: int) -> str:
    return f"bench-{k}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- workload plans -------------------------------------------------------------------------------


@dataclass
class Plan:
    """Appends as (stream index, first event number, count, expected version before the append)."""

    events: int
    streams: int
    batch: int
    calls: list[tuple[int, int, int, int]] = field(default_factory=list)

    @classmethod
    def round_robin(cls, events: int, streams: int, batch: int) -> Plan:
        plan = cls(events, streams, batch)
        versions = [0] * streams
        n = 0
        while n < events:
            k = (n // batch) % streams
            count = min(batch, events - n)
            plan.calls.append((k, n, count, versions[k]))
            versions[k] += count
            n += count
        return plan


@dataclass
class Sizes:
    single: int
    batched: int

    @property
    def stream_len(self) -> int:
        return self.batched // BATCH_STREAMS

    def count(self, workload: str) -> int:
        return {"append1": self.single, "append100": self.batched,
                "read_stream": self.stream_len, "read_all": self.batched}[workload]


def sizes_for(scale: float) -> Sizes:
    unit = BATCH_SIZE * BATCH_STREAMS  # keep the batched streams equally long
    return Sizes(single=max(SINGLE_STREAMS, round(SINGLE_EVENTS * scale)),
                 batched=max(unit, round(BATCH_EVENTS * scale / unit) * unit))


# -- contenders -----------------------------------------------------------------------------------


class Contender:
    """One way of storing events on one backend."""

    name = ""

    def reset(self) -> None:
        """Start over on an empty store (not timed)."""
        raise NotImplementedError

    def prepare(self, plan: Plan, events: Sequence[Assigned]) -> Any:
        """Turn a plan into whatever ``appends`` iterates over (not timed)."""
        return [(stream_name(k), list(events[first:first + count]), expected)
                for k, first, count, expected in plan.calls]

    def appends(self, prepared: Any) -> None:
        raise NotImplementedError

    def open_existing(self) -> None:
        """Open the store the last batched fill wrote, for the reads (not timed)."""
        raise NotImplementedError

    def read_stream(self, k: int) -> tuple[int, int]:
        """Read stream ``k``: (events read, ``value`` of the last one)."""
        raise NotImplementedError

    def read_all(self) -> tuple[int, int]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


# ---- ours


class Ours(Contender):
    name = "ours"

    def __init__(self, db: Database) -> None:
        self.db = db
        self.store: EventStore | None = None

    def reset(self) -> None:
        if self.store is not None and self.db.fresh_per_run:
            self.store.close()
            self.store = None
        url = self.db.reset_ours()
        if self.store is None:
            self.store = EventStore.open(url, migrate=True)

    def open_existing(self) -> None:
        if self.store is None:
            self.store = EventStore.open(self.db.ours_url(), migrate=True)

    def appends(self, prepared: Any) -> None:
        assert self.store is not None
        append = self.store.append
        for sid, evs, expected in prepared:
            append(sid, evs, expected_version=expected)

    def read_stream(self, k: int) -> tuple[int, int]:
        assert self.store is not None
        n, last = 0, -1
        for rec in self.store.read_stream(stream_name(k)):
            n += 1
            last = rec.data.value  # type: ignore[union-attr]
        return n, last

    def read_all(self) -> tuple[int, int]:
        assert self.store is not None
        n, last = 0, -1
        for rec in self.store.read_all():
            n += 1
            last = rec.data.value  # type: ignore[union-attr]
        return n, last

    def settings(self) -> dict[str, Any]:
        assert self.store is not None
        return self.db.settings_of_engine(self.store)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


# ---- bare drivers

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Assigned)
_TAG = "bench.Assigned"

SQLITE_PROBE = ("SELECT (SELECT version FROM es_streams WHERE tenant_id = ? AND stream_id = ?), "
                "(SELECT max(position) FROM es_events)")
SQLITE_INSERT = ("INSERT INTO es_events (position, tenant_id, stream_id, category, version, "
                 "event_id, type, schema_version, data, metadata, recorded_at) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
SQLITE_INSERT_STREAM = ("INSERT INTO es_streams (tenant_id, stream_id, version, created_at, "
                        "updated_at) VALUES (?, ?, ?, ?, ?)")
SQLITE_UPDATE_STREAM = ("UPDATE es_streams SET version = ?, updated_at = ? "
                        "WHERE tenant_id = ? AND stream_id = ?")
_COLUMNS = ("position, tenant_id, stream_id, category, version, event_id, type, schema_version, "
            "data, metadata, recorded_at")
SQLITE_READ_STREAM = (f"SELECT {_COLUMNS} FROM es_events WHERE tenant_id = ? AND stream_id = ? "
                      "AND version >= ? ORDER BY version LIMIT ?")
SQLITE_READ_ALL = f"SELECT {_COLUMNS} FROM es_events WHERE position >= ? ORDER BY position LIMIT ?"

PG_LOCK = "SELECT pg_advisory_xact_lock(%s)"
PG_PROBE = ("SELECT (SELECT version FROM es_streams WHERE tenant_id = %s AND stream_id = %s), "
            "(SELECT max(position) FROM es_events)")
PG_INSERT = ("INSERT INTO es_events (position, tenant_id, stream_id, category, version, event_id, "
             "type, schema_version, data, metadata, recorded_at) "
             "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)")
PG_INSERT_STREAM = ("INSERT INTO es_streams (tenant_id, stream_id, version, created_at, "
                    "updated_at) VALUES (%s, %s, %s, %s, %s)")
PG_UPDATE_STREAM = ("UPDATE es_streams SET version = %s, updated_at = %s "
                    "WHERE tenant_id = %s AND stream_id = %s")
PG_READ_STREAM = (f"SELECT {_COLUMNS} FROM es_events WHERE tenant_id = %s AND stream_id = %s "
                  "AND version >= %s ORDER BY version LIMIT %s")
PG_READ_ALL = f"SELECT {_COLUMNS} FROM es_events WHERE position >= %s ORDER BY position LIMIT %s"


def _now_micros() -> int:
    return time.time_ns() // 1000


def _rows(stream_id: str, events: Sequence[Assigned], version: int, last: int,
          uuid_hex: bool) -> list[tuple[Any, ...]]:
    category = stream_id.split("-", 1)[0]
    stamp = _now_micros()
    encode = _encoder.encode
    return [
        (last + i, TENANT, stream_id, category, version + i,
         uuid.uuid4().hex if uuid_hex else uuid.uuid4(), _TAG, 1, encode(ev), None, stamp)
        for i, ev in enumerate(events, start=1)
    ]


class WrongVersion(Exception):
    pass


class BareSQLite(Contender):
    name = "bare"

    def __init__(self, db: SQLiteDatabase) -> None:
        self.db = db
        self.conn: sqlite3.Connection | None = None

    def _connect(self, path: str) -> None:
        if self.conn is not None:
            self.conn.close()
        # Autocommit mode: the transactions below are explicit, as in the store.
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout = 30000")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(f"PRAGMA synchronous = {self.db.synchronous}")

    def reset(self) -> None:
        self._connect(self.db.fresh_migrated_file("bare"))

    def open_existing(self) -> None:
        self._connect(self.db.fixture_path())

    def appends(self, prepared: Any) -> None:
        assert self.conn is not None
        cur = self.conn.cursor()
        execute = cur.execute
        for stream_id, evs, expected in prepared:
            execute("BEGIN IMMEDIATE")
            try:
                version, last = execute(SQLITE_PROBE, (TENANT, stream_id)).fetchone()
                version = version or 0
                if version != expected:
                    raise WrongVersion(stream_id)
                rows = _rows(stream_id, evs, version, last or 0, uuid_hex=True)
                if len(rows) == 1:
                    execute(SQLITE_INSERT, rows[0])
                else:
                    cur.executemany(SQLITE_INSERT, rows)
                stamp = rows[0][-1]
                if version == 0:
                    execute(SQLITE_INSERT_STREAM,
                            (TENANT, stream_id, version + len(rows), stamp, stamp))
                else:
                    execute(SQLITE_UPDATE_STREAM,
                            (version + len(rows), stamp, TENANT, stream_id))
                execute("COMMIT")
            except BaseException:
                execute("ROLLBACK")
                raise
        cur.close()

    def _paged(self, sql: str, params: tuple[Any, ...], key: int) -> tuple[int, int]:
        assert self.conn is not None
        cur = self.conn.cursor()
        decode = _decoder.decode
        n, last, lo = 0, -1, 1 if key == 4 else 0
        while True:
            cur.execute("BEGIN")
            rows = cur.execute(sql, (*params, lo, PAGE)).fetchall()
            cur.execute("COMMIT")
            for row in rows:
                last = decode(row[8]).value
            n += len(rows)
            if len(rows) < PAGE:
                return n, last
            lo = rows[-1][key] + 1

    def read_stream(self, k: int) -> tuple[int, int]:
        return self._paged(SQLITE_READ_STREAM, (TENANT, stream_name(k)), 4)

    def read_all(self) -> tuple[int, int]:
        return self._paged(SQLITE_READ_ALL, (), 0)

    def settings(self) -> dict[str, Any]:
        assert self.conn is not None
        return sqlite_settings(self.conn.cursor())

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class BarePostgres(Contender):
    name = "bare"

    def __init__(self, db: PostgresDatabase) -> None:
        import psycopg

        self.db = db
        self.conn = psycopg.connect(db.conninfo)  # not autocommit: the first statement begins

    def reset(self) -> None:
        self.db.reset_ours()

    def open_existing(self) -> None:
        pass

    def appends(self, prepared: Any) -> None:
        from eventstore._backend import APPEND_LOCK_KEY, _signed

        lock_key = _signed(APPEND_LOCK_KEY)
        conn = self.conn
        cur = conn.cursor()
        execute = cur.execute
        for stream_id, evs, expected in prepared:
            try:
                execute(PG_LOCK, (lock_key,))
                version, last = execute(PG_PROBE, (TENANT, stream_id)).fetchone()  # type: ignore[misc]
                version = version or 0
                if version != expected:
                    raise WrongVersion(stream_id)
                rows = _rows(stream_id, evs, version, last or 0, uuid_hex=False)
                if len(rows) == 1:
                    execute(PG_INSERT, rows[0])
                else:
                    cur.executemany(PG_INSERT, rows)
                stamp = rows[0][-1]
                if version == 0:
                    execute(PG_INSERT_STREAM,
                            (TENANT, stream_id, version + len(rows), stamp, stamp))
                else:
                    execute(PG_UPDATE_STREAM, (version + len(rows), stamp, TENANT, stream_id))
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        cur.close()

    def _paged(self, sql: str, params: tuple[Any, ...], key: int) -> tuple[int, int]:
        conn = self.conn
        cur = conn.cursor()
        decode = _decoder.decode
        n, last, lo = 0, -1, 1 if key == 4 else 0
        while True:
            rows = cur.execute(sql, (*params, lo, PAGE)).fetchall()
            conn.commit()
            for row in rows:
                last = decode(row[8]).value
            n += len(rows)
            if len(rows) < PAGE:
                return n, last
            lo = rows[-1][key] + 1

    def read_stream(self, k: int) -> tuple[int, int]:
        return self._paged(PG_READ_STREAM, (TENANT, stream_name(k)), 4)

    def read_all(self) -> tuple[int, int]:
        return self._paged(PG_READ_ALL, (), 0)

    def close(self) -> None:
        self.conn.close()


# ---- eventsourcing


class EsAssigned(DomainEvent):
    """The same event for eventsourcing: a frozen dataclass with its id, version and timestamp."""

    name: str
    value: int
    run_id: str


def es_originator_id(k: int) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, stream_name(k))


class EventSourcing(Contender):
    """eventsourcing's own EventStore (mapper + application recorder) from its factory."""

    name = "es"

    def __init__(self, db: Database) -> None:
        self.db = db
        self.factory: Any = None
        self.store: Any = None

    def _build(self, env: dict[str, str]) -> None:
        from eventsourcing.persistence import (
            DatetimeAsISO,
            DecimalAsStr,
            InfrastructureFactory,
            JSONTranscoder,
            UUIDAsHex,
        )

        self.close()
        factory: Any = InfrastructureFactory.construct(env)
        # As eventsourcing.application.Application.construct_transcoder does.
        transcoder = factory.transcoder()
        assert isinstance(transcoder, JSONTranscoder)
        transcoder.register(UUIDAsHex())
        transcoder.register(DecimalAsStr())
        transcoder.register(DatetimeAsISO())
        self.factory = factory
        self.store = factory.event_store(mapper=factory.mapper(transcoder=transcoder),
                                         recorder=factory.application_recorder())

    def reset(self) -> None:
        env = self.db.reset_es()
        if env is not None or self.store is None:
            self._build(env or self.db.es_env())
            self.db.configure_es(self.factory)

    def open_existing(self) -> None:
        if self.store is None:
            self._build(self.db.es_env())
            self.db.configure_es(self.factory)

    def prepare(self, plan: Plan, events: Sequence[Assigned]) -> Any:
        out = []
        stamp = datetime.now(UTC)
        for k, first, count, expected in plan.calls:
            oid = es_originator_id(k)
            out.append([
                EsAssigned(originator_id=oid, originator_version=expected + i + 1,
                           timestamp=stamp, name=ev.name, value=ev.value, run_id=ev.run_id)
                for i, ev in enumerate(events[first:first + count])
            ])
        return out

    def appends(self, prepared: Any) -> None:
        put = self.store.put
        for evs in prepared:
            put(evs)

    def read_stream(self, k: int) -> tuple[int, int]:
        n, last = 0, -1
        for ev in self.store.get(es_originator_id(k)):
            n += 1
            last = ev.value
        return n, last

    def read_all(self) -> tuple[int, int]:
        recorder = self.store.recorder
        to_event = self.store.mapper.to_domain_event
        n, last, start = 0, -1, 1
        while True:
            page = recorder.select_notifications(start, PAGE)
            for notification in page:
                last = to_event(notification).value
            n += len(page)
            if len(page) < PAGE:
                return n, last
            start = page[-1].id + 1

    def settings(self) -> dict[str, Any]:
        return self.db.settings_of_es(self.factory)

    def close(self) -> None:
        if self.factory is not None:
            self.factory.close()
            self.factory = None
            self.store = None


# -- databases ------------------------------------------------------------------------------------


def sqlite_settings(cur: Any) -> dict[str, Any]:
    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    cur.execute("PRAGMA journal_mode")
    journal = cur.fetchone()[0]
    cur.execute("PRAGMA synchronous")
    sync = cur.fetchone()[0]
    return {"journal_mode": str(journal).upper(), "synchronous": names.get(sync, sync)}


class Database:
    backend = ""
    fresh_per_run = False

    def reset_ours(self) -> str:
        raise NotImplementedError

    def ours_url(self) -> str:
        raise NotImplementedError

    def reset_es(self) -> dict[str, str] | None:
        raise NotImplementedError

    def es_env(self) -> dict[str, str]:
        raise NotImplementedError

    def configure_es(self, factory: Any) -> None:
        pass

    def settings_of_engine(self, store: EventStore) -> dict[str, Any]:
        raise NotImplementedError

    def settings_of_es(self, factory: Any) -> dict[str, Any]:
        raise NotImplementedError

    def bare(self) -> Contender:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SQLiteDatabase(Database):
    backend = "sqlite"
    fresh_per_run = True

    def __init__(self, synchronous: str) -> None:
        self.synchronous = synchronous
        self.dir = tempfile.mkdtemp(prefix="eventstore-bench-")
        self.n = 0
        self.current: dict[str, str] = {}

    def _new_path(self, who: str) -> str:
        old = self.current.get(who)
        if old is not None:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(old + suffix)
        self.n += 1
        path = os.path.join(self.dir, f"{who}-{self.n}.db")
        self.current[who] = path
        return path

    def _url(self, path: str) -> str:
        return f"sqlite:///{path}?synchronous={self.synchronous}"

    def reset_ours(self) -> str:
        return self._url(self._new_path("ours"))

    def ours_url(self) -> str:
        return self._url(self.fixture_path())

    def fixture_path(self) -> str:
        """The file the reads use: the last one ours filled (bare's when ours is not running)."""
        return self.current.get("ours") or self.current["bare"]

    def fresh_migrated_file(self, who: str) -> str:
        path = self._new_path(who)
        EventStore.open(self._url(path), migrate=True).close()  # our migrations make the tables
        return path

    def reset_es(self) -> dict[str, str] | None:
        return {"PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": self._new_path("es")}

    def es_env(self) -> dict[str, str]:
        return {"PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": self.current["es"]}

    def configure_es(self, factory: Any) -> None:
        # eventsourcing sets WAL but leaves synchronous at SQLite's default: give its (single,
        # pooled and reused) connection the same setting as the other contenders.
        ds = factory.datastore
        with ds.get_connection(commit=True) as conn:
            conn.cursor().execute(f"PRAGMA synchronous = {self.synchronous}")

    def settings_of_engine(self, store: EventStore) -> dict[str, Any]:
        with store.engine.connect() as conn:
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            return sqlite_settings(cur)

    def settings_of_es(self, factory: Any) -> dict[str, Any]:
        ds = factory.datastore
        with ds.get_connection(commit=False) as conn:
            got = sqlite_settings(conn.cursor())
        got["connections"] = ds.pool.num_in_pool
        return got

    def bare(self) -> Contender:
        return BareSQLite(self)

    def describe(self) -> str:
        return (f"SQLite {sqlite3.sqlite_version}, file in {self.dir}, journal_mode=WAL, "
                f"synchronous={self.synchronous}; fdatasync of that dir ~ "
                f"{fsync_latency_ms(self.dir):.2f} ms")

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresDatabase(Database):
    """A scratch database created next to the one in ``--pg-url`` and dropped at the end."""

    backend = "postgresql"

    def __init__(self, url: str) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        base = make_url(url)
        if base.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
            base = base.set(drivername="postgresql+psycopg")
        self.base = base
        self.dbname = f"eventstore_bench_{os.getpid()}"
        self.url = base.set(database=self.dbname)
        self.admin = psycopg.connect(self._conninfo(base.database or "postgres"), autocommit=True)
        self.admin.execute(f'DROP DATABASE IF EXISTS "{self.dbname}"')
        self.admin.execute(f'CREATE DATABASE "{self.dbname}"')
        self.conninfo = self._conninfo(self.dbname)
        self.conn = psycopg.connect(self.conninfo, autocommit=True)
        EventStore.open(self.ours_url(), migrate=True).close()
        self.es_created = False

    def _conninfo(self, dbname: str) -> str:
        from psycopg.conninfo import make_conninfo

        u = self.base
        return make_conninfo(host=u.host or "127.0.0.1", port=u.port or 5432,
                             user=u.username or "postgres", password=u.password or "",
                             dbname=dbname)

    def ours_url(self) -> str:
        return self.url.render_as_string(hide_password=False)

    def _fresh(self, tables: str) -> None:
        self.conn.execute(f"TRUNCATE {tables} RESTART IDENTITY")
        with contextlib.suppress(Exception):  # needs superuser or pg_checkpoint
            self.conn.execute("CHECKPOINT")

    def reset_ours(self) -> str:
        self._fresh("es_events, es_streams, es_idempotency")
        return self.ours_url()

    def reset_es(self) -> dict[str, str] | None:
        if self.es_created:
            self._fresh("stored_events")
            return None
        self.es_created = True
        return self.es_env()

    def es_env(self) -> dict[str, str]:
        u = self.base
        return {"PERSISTENCE_MODULE": "eventsourcing.postgres",
                "POSTGRES_DBNAME": self.dbname, "POSTGRES_HOST": u.host or "127.0.0.1",
                "POSTGRES_PORT": str(u.port or 5432), "POSTGRES_USER": u.username or "postgres",
                "POSTGRES_PASSWORD": u.password or ""}

    def settings_of_engine(self, store: EventStore) -> dict[str, Any]:
        return {}

    def settings_of_es(self, factory: Any) -> dict[str, Any]:
        return {}

    def bare(self) -> Contender:
        return BarePostgres(self)

    def describe(self) -> str:
        def show(name: str) -> str:
            row = self.conn.execute(f"SHOW {name}").fetchone()
            return str(row[0]) if row else "?"

        return (f"PostgreSQL {show('server_version')} at {self.base.host}:{self.base.port}, "
                f"fsync={show('fsync')}, synchronous_commit={show('synchronous_commit')}, "
                f"wal_sync_method={show('wal_sync_method')}, "
                f"full_page_writes={show('full_page_writes')}")

    def close(self) -> None:
        self.conn.close()
        with contextlib.suppress(Exception):
            self.admin.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        self.admin.close()


def fsync_latency_ms(directory: str, n: int = 50) -> float:
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            os.fdatasync(fd)
        return (time.perf_counter() - start) / n * 1000
    finally:
        os.close(fd)
        os.remove(path)


# -- running --------------------------------------------------------------------------------------


@dataclass
class Row:
    backend: str
    workload: str
    events: int
    rates: dict[str, list[float]] = field(default_factory=dict)  # events/s, wall clock
    cpu: dict[str, list[float]] = field(default_factory=dict)  # this process's CPU us/event

    def add(self, who: str, wall: float, cpu: float) -> None:
        self.rates.setdefault(who, []).append(self.events / wall)
        self.cpu.setdefault(who, []).append(cpu / self.events * 1e6)

    def rate(self, who: str) -> float | None:
        got = self.rates.get(who)
        return statistics.median(got) if got else None

    def cpu_us(self, who: str) -> float | None:
        got = self.cpu.get(who)
        return statistics.median(got) if got else None


FREEZE = True  # see --no-gc-freeze


def timed(fn: Callable[[], Any], profile: str | None = None) -> tuple[float, float, Any]:
    """Run ``fn`` once: its wall time, this process's CPU time (all threads), and its result.

    The objects alive before the run (the harness's pre-built events: 10^5 of them for each
    contender) are moved out of the cyclic GC's reach with ``gc.freeze``, so the collections
    triggered during the run scan what the contender allocates, not the harness's heap.
    """
    gc.collect()
    if FREEZE:
        gc.freeze()
    prof = cProfile.Profile() if profile else None
    try:
        cpu = time.process_time()
        start = time.perf_counter()
        if prof is not None:
            prof.enable()
        out = fn()
        if prof is not None:
            prof.disable()
        return time.perf_counter() - start, time.process_time() - cpu, out
    finally:
        if FREEZE:
            gc.unfreeze()
        if prof is not None and profile:
            print_profile(prof, profile)


def print_profile(prof: cProfile.Profile, title: str, top: int = 30) -> None:
    print(f"\n--- profile: {title} ---")
    pstats.Stats(prof).strip_dirs().sort_stats("tottime").print_stats(top)


def run_backend(db: Database, sizes: Sizes, who: Sequence[str], workloads: Sequence[str],
                repeat: int, profile: set[str], settings: dict[str, Any]) -> list[Row]:
    contenders: dict[str, Contender] = {}
    factories: dict[str, Callable[[], Contender]] = {
        "ours": lambda: Ours(db), "bare": db.bare, "es": lambda: EventSourcing(db),
    }
    for name in who:
        contenders[name] = factories[name]()
    rows = []
    plans = {
        "append1": Plan.round_robin(sizes.single, SINGLE_STREAMS, 1),
        "append100": Plan.round_robin(sizes.batched, BATCH_STREAMS, BATCH_SIZE),
    }
    need_fill = any(w.startswith("read") for w in workloads)
    appends = [w for w in workloads if w in plans]
    if need_fill and "append100" not in appends:
        appends.append("append100")  # the reads need the store it fills (timed or not)
    events = [make_event(i) for i in range(max(sizes.single, sizes.batched))]
    try:
        for w in appends:
            plan = plans[w]
            row = Row(db.backend, w, plan.events)
            prepared = {name: c.prepare(plan, events) for name, c in contenders.items()}
            reps = repeat if w in workloads else 1  # only the fill for the reads: once
            for rep in range(reps):
                order = list(contenders)[rep % len(contenders):] + \
                    list(contenders)[:rep % len(contenders)]
                if w == "append100" and rep == reps - 1 and "ours" in order:
                    order.remove("ours")  # end with ours, whose file/tables the reads use
                    order.append("ours")
                for name in order:
                    c = contenders[name]
                    c.reset()
                    title = (f"{db.backend} {TITLES[w]} {name}"
                             if f"{db.backend}/{w}/{name}" in profile and rep == 0 else None)
                    elapsed, cpu, _ = timed(lambda c=c, p=prepared[name]: c.appends(p), title)
                    row.add(name, elapsed, cpu)
                    log(f"  {db.backend:10} {TITLES[w]:15} {name:5} rep {rep + 1}: "
                        f"{plan.events / elapsed:>10,.0f} ev/s ({elapsed:.2f} s, "
                        f"CPU {cpu / plan.events * 1e6:.1f} us/event)")
                    if rep == 0:
                        settings.setdefault(db.backend, {})[name] = c.settings()
            if w in workloads:
                rows.append(row)
            del prepared
        del events  # the reads run without the harness's pre-built events around
        for w in (w for w in workloads if w.startswith("read")):
            n = sizes.count(w)
            row = Row(db.backend, w, n)
            for c in contenders.values():
                c.open_existing()
            for rep in range(repeat):
                for name, c in contenders.items():
                    title = (f"{db.backend} {TITLES[w]} {name}"
                             if f"{db.backend}/{w}/{name}" in profile and rep == 0 else None)
                    if w == "read_stream":
                        elapsed, cpu, (got, last) = timed(lambda c=c: c.read_stream(0), title)
                    else:
                        elapsed, cpu, (got, last) = timed(c.read_all, title)
                    expected_last = ((sizes.stream_len // BATCH_SIZE - 1) * BATCH_STREAMS
                                     * BATCH_SIZE + BATCH_SIZE - 1
                                     if w == "read_stream" else sizes.batched - 1)
                    if got != n or last != expected_last:
                        raise SystemExit(f"{name} {w}: read {got} events (last value {last}), "
                                         f"expected {n} (last value {expected_last})")
                    row.add(name, elapsed, cpu)
                    log(f"  {db.backend:10} {TITLES[w]:15} {name:5} rep {rep + 1}: "
                        f"{n / elapsed:>10,.0f} ev/s ({elapsed:.2f} s, "
                        f"CPU {cpu / n * 1e6:.1f} us/event)")
            rows.append(row)
    finally:
        for c in contenders.values():
            c.close()
    return rows


def fmt_rate(r: float | None) -> str:
    return "-" if r is None else f"{r:,.0f}"


def fmt_ratio(a: float | None, b: float | None, target: float) -> str:
    if a is None or b is None:
        return "-"
    ratio = a / b
    return f"{ratio:.2f}{'' if ratio >= target else ' !'}"


def render(lines: list[tuple[str, ...]]) -> str:
    """A Markdown table; the first two columns left-aligned, the others right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for j, line in enumerate(lines):
        cells = [c.ljust(w) if i < 2 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        out.append("| " + " | ".join(cells) + " |")
        if j == 0:
            out.append("|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":"
                                      for i, w in enumerate(widths)) + "|")
    return "\n".join(out)


def table(rows: Sequence[Row]) -> str:
    lines = [("backend", "workload", "events", "ours ev/s", "bare ev/s", "es ev/s",
              "ours/bare", "ours/es", "bare/es", "spread")]
    for r in rows:
        ours, bare, es = r.rate("ours"), r.rate("bare"), r.rate("es")
        spread = "-"
        if r.rates.get("ours") and len(r.rates["ours"]) > 1 and ours:
            spread = f"{(max(r.rates['ours']) - min(r.rates['ours'])) / ours:.0%}"
        lines.append((r.backend, TITLES[r.workload], f"{r.events:,}", fmt_rate(ours),
                      fmt_rate(bare), fmt_rate(es), fmt_ratio(ours, bare, TARGET_BARE),
                      fmt_ratio(ours, es, TARGET_ES), fmt_ratio(bare, es, 0), spread))
    return render(lines)


def cpu_table(rows: Sequence[Row]) -> str:
    """This process's CPU time per event: the client-side cost, free of disk and server waits."""
    lines = [("backend", "workload", "ours us/ev", "bare us/ev", "es us/ev", "bare/ours",
              "es/ours")]
    for r in rows:
        ours, bare, es = r.cpu_us("ours"), r.cpu_us("bare"), r.cpu_us("es")
        lines.append((r.backend, TITLES[r.workload], fmt_us(ours), fmt_us(bare), fmt_us(es),
                      fmt_ratio(bare, ours, TARGET_BARE), fmt_ratio(es, ours, TARGET_ES)))
    return render(lines)


def fmt_us(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def code_version() -> str:
    """The git commit of the store's code, and whether ``eventstore/`` differs from it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "eventstore"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"git {head}" + (" + uncommitted changes in eventstore/" if dirty else "")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every event count (0.1 for a quick run; default 1)")
    ap.add_argument("--synchronous", default="FULL", type=str.upper,
                    choices=("FULL", "NORMAL", "EXTRA"),
                    help="SQLite PRAGMA synchronous for every contender (default FULL)")
    ap.add_argument("--pg-url", default=os.environ.get("EVENTSTORE_BENCH_PG_URL"),
                    help="PostgreSQL URL (default $EVENTSTORE_BENCH_PG_URL); a scratch database "
                         "is created next to it and dropped at the end")
    ap.add_argument("--backends", default="sqlite,postgresql",
                    help="comma-separated: sqlite,postgresql (default both)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {','.join(WORKLOADS)}")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help="comma-separated subset of ours,bare,es")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per row (median; 3)")
    ap.add_argument("--profile", action="append", default=[], metavar="BACKEND/WORKLOAD/WHO",
                    help="cProfile the first repetition of a cell, e.g. sqlite/append1/ours "
                         "(repeatable; profiling slows that repetition down)")
    ap.add_argument("--no-gc-freeze", action="store_true",
                    help="leave the harness's pre-built events to the cyclic GC during timed runs "
                         "(as a large application heap would be); default: gc.freeze() them")
    args = ap.parse_args(argv)
    global FREEZE
    FREEZE = not args.no_gc_freeze
    # The store logs each migration at info level; keep stdout for the results.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    who = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    for c in who:
        if c not in CONTENDERS:
            ap.error(f"unknown contender {c!r}")
    if "postgresql" in backends and not args.pg_url:
        ap.error("PostgreSQL needs --pg-url or EVENTSTORE_BENCH_PG_URL "
                 "(or pass --backends sqlite)")
    sizes = sizes_for(args.scale)
    payload = statistics.mean(len(_encoder.encode(make_event(i))) for i in range(1000))

    from importlib.metadata import version

    header = [
        f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs "
        f"(nproc {len(os.sched_getaffinity(0))}), {platform.platform()}",
        f"python {platform.python_version()}, eventstore {version('eventstore')}, "
        f"eventsourcing {version('eventsourcing')}, psycopg {version('psycopg')}, "
        f"SQLAlchemy {version('sqlalchemy')}, msgspec {version('msgspec')}",
        f"code: {code_version()}",
        f"events: ~{payload:.0f} bytes of JSON data each; scale {args.scale}; "
        f"median of {args.repeat}",
    ]
    for line in header:
        log(line)
    rows: list[Row] = []
    descriptions: list[str] = []
    settings: dict[str, Any] = {}
    started = time.perf_counter()
    for backend in backends:
        db: Database
        if backend == "sqlite":
            db = SQLiteDatabase(args.synchronous)
        elif backend == "postgresql":
            db = PostgresDatabase(args.pg_url)
        else:
            ap.error(f"unknown backend {backend!r}")
        try:
            descriptions.append(f"{backend}: {db.describe()}")
            log(descriptions[-1])
            rows += run_backend(db, sizes, who, workloads, args.repeat, set(args.profile),
                                settings)
        finally:
            db.close()
    sqlite_seen = settings.get("sqlite", {})
    for name, got in sqlite_seen.items():
        if got and got.get("synchronous") != args.synchronous:
            raise SystemExit(f"{name} ran with synchronous={got.get('synchronous')}, "
                             f"not {args.synchronous}")
    print()
    for line in header:
        print(line)
    for line in descriptions:
        print(line)
    if sqlite_seen:
        print("sqlite settings checked on each contender's connection: " + "; ".join(
            f"{n}: " + ", ".join(f"{k}={v}" for k, v in s.items())
            for n, s in sqlite_seen.items()))
    print(f"total time {time.perf_counter() - started:.0f} s\n")
    print(table(rows))
    print("\nclient CPU per event (this process, all threads; median), same targets as speed "
          "ratios:\n")
    print(cpu_table(rows))
    print(f"\ntargets: ours/bare >= {TARGET_BARE}, ours/es >= {TARGET_ES}; '!' marks a miss. "
          "bare/es: what the same SQL costs without our code, against eventsourcing (the most "
          "ours/es can be at ours/bare = 1). spread = (max - min) / median of ours' repetitions. "
          f"gc.freeze of the harness's objects: {'on' if FREEZE else 'off'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
