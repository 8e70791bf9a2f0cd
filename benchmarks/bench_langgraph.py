"""Our LangGraph savers beside LangGraph's ``SqliteSaver`` and ``PostgresSaver``, one run.

Rows (counts at ``--scale 1``), each contender on a fresh database of its own:

* ``put``        puts/s: 2,000 ``put`` calls on one thread, the checkpoints a real graph makes:
                 six channels (a 4 kB document that never changes, a counter, a note, a short
                 list and two trigger channels), two of which change per checkpoint
                 (``new_versions``), with ``versions_seen`` of three nodes;
                 Also, for reference: ``EventStore.append`` of the same events with the index
                 handler off, the store's own cost per put; and the raw driver's limit: the
                 rows our put writes, in its transaction's shape, through bare ``sqlite3`` /
                 ``psycopg`` (``driver_floor``);
* ``get_tuple``  latency (median of 300 calls, latest checkpoint) on a 100-checkpoint and on a
                 10,000-checkpoint thread of that shape (PostgreSQL: after ``ANALYZE``, for
                 both contenders);
* ``history``    seconds to list the whole 10,000-checkpoint thread (``list(saver.list(config))``);
                 the threads of these two rows also hold each checkpoint's pending writes (one
                 task writing two channels), as a graph run leaves them;
* ``bytes``      bytes on disk after a 1,000-step thread: a real graph (one node looping 1,000
                 supersteps, each changing a counter and a note) run to the end, once with a
                 4 kB word-like document and a short list in the state (never changed after
                 the input) and once with the counter and note only; then the database's size:
                 the SQLite file after a WAL checkpoint (page_count x page_size), or the summed
                 ``pg_total_relation_size`` of the saver's tables (ours: the log's tables, the
                 index tables and their indexes; theirs: ``checkpoints``, ``checkpoint_blobs``,
                 ``checkpoint_writes`` and their indexes);
* ``invoke``     invokes/s: 300 ``invoke()`` calls of a compiled one-node graph on one thread,
                 one call per incoming event (LangGraph's default durability).
* ``async``      the async savers (``AsyncEventStoreSaver`` on ``AsyncEventStore`` beside
                 ``AsyncSqliteSaver`` / ``AsyncPostgresSaver``): ``aput`` puts/s (the ``put``
                 row's checkpoints), ``aget_tuple`` latency on that thread afterwards (median of
                 300) and ``ainvoke()`` invokes/s of the one-node graph.

SQLite runs with ``synchronous=FULL`` for every contender (our store's default; SqliteSaver's
connection gets the same pragma; ``--synchronous NORMAL`` changes both).  PostgreSQL uses the
server of ``--pg-url`` (default ``$EVENTSTORE_BENCH_PG_URL``, else ``$EVENTSTORE_TEST_PG_URL``):
a scratch database per contender, dropped afterwards; the output shows the server's ``fsync``.

Run ``python benchmarks/bench_langgraph.py --help``; ``--rows put,invoke`` runs only those rows
(``get_tuple`` includes ``history``).  On PostgreSQL the ``get_tuple`` rows are measured after
``ANALYZE``; ours is also shown before it (a new table, as before autovacuum's first pass).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import operator
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, TypedDict

import structlog
from langgraph.checkpoint.base import BaseCheckpointSaver, Checkpoint, empty_checkpoint
from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from eventstore import EventStore
from eventstore._backend import APPEND_LOCK_ID
from eventstore.aio import AsyncEventStore
from projections.langgraph_saver import AsyncEventStoreSaver, EventStoreSaver


def _document(size: int = 4096, seed: int = 7) -> str:
    """~4 kB of word-like text (compresses about as well as prose; a repeated phrase would
    let PostgreSQL's TOAST compression hide what a saver stores)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "en", "ar", "is", "ou", "st",
                 "pr", "gl", "th", "ch", "an", "er", "ly"]
    vocabulary = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
                  for _ in range(600)]
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < size:
        words.append(rng.choice(vocabulary))
    return " ".join(words)[:size]


DOC = _document()  # a context document the graph reads and never changes
OUR_TABLES = ("es_events", "es_streams", "es_idempotency", "es_lg_checkpoints", "es_lg_blobs",
              "es_lg_writes")
THEIR_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")


# -- contenders ------------------------------------------------------------------------------


class Backend:
    def __init__(self, name: str, workdir: Path, synchronous: str, pg_url: str | None) -> None:
        self.name = name
        self.workdir = workdir
        self.synchronous = synchronous
        self.pg_url = pg_url

    @contextmanager
    def ours(self) -> Iterator[EventStoreSaver]:
        if self.name == "sqlite":
            path = self.workdir / f"ours-{uuid.uuid4().hex[:8]}.db"
            with EventStore.open(f"sqlite:///{path}?synchronous={self.synchronous}",
                                 migrate=True) as store:
                saver = EventStoreSaver(store)
                saver.size = lambda: sqlite_size(path)  # type: ignore[attr-defined]
                saver.analyze = lambda: None  # type: ignore[attr-defined]
                yield saver
        else:
            assert self.pg_url
            with scratch_pg(self.pg_url) as url, EventStore.open(url, migrate=True) as store:
                saver = EventStoreSaver(store)
                saver.size = lambda: pg_size(url, OUR_TABLES)  # type: ignore[attr-defined]
                saver.analyze = lambda: pg_analyze(url)  # type: ignore[attr-defined]
                yield saver

    @contextmanager
    def theirs(self) -> Iterator[BaseCheckpointSaver[Any]]:
        if self.name == "sqlite":
            path = self.workdir / f"theirs-{uuid.uuid4().hex[:8]}.db"
            conn = sqlite3.connect(str(path), check_same_thread=False)
            saver = SqliteSaver(conn)
            saver.setup()
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            saver.size = lambda: sqlite_size(path)  # type: ignore[attr-defined]
            saver.analyze = lambda: None  # type: ignore[attr-defined]
            try:
                yield saver
            finally:
                conn.close()
        else:
            assert self.pg_url
            with scratch_pg(self.pg_url) as url:
                raw = make_url(url).set(drivername="postgresql").render_as_string(
                    hide_password=False)
                with PostgresSaver.from_conn_string(raw) as saver:
                    saver.setup()
                    saver.size = lambda: pg_size(url, THEIR_TABLES)  # type: ignore[attr-defined]
                    saver.analyze = lambda: pg_analyze(url)  # type: ignore[attr-defined]
                    yield saver

    @asynccontextmanager
    async def ours_async(self) -> AsyncIterator[AsyncEventStoreSaver]:
        with self._database("ours-async") as url:
            store = await AsyncEventStore.open(url, migrate=True)
            try:
                yield AsyncEventStoreSaver(store)
            finally:
                await store.close()

    @asynccontextmanager
    async def theirs_async(self) -> AsyncIterator[BaseCheckpointSaver[Any]]:
        if self.name == "sqlite":
            path = self.workdir / f"theirs-async-{uuid.uuid4().hex[:8]}.db"
            async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
                await saver.setup()
                await saver.conn.execute(f"PRAGMA synchronous = {self.synchronous}")
                yield saver
        else:
            with self._database("theirs-async") as url:
                raw = make_url(url).set(drivername="postgresql").render_as_string(
                    hide_password=False)
                async with AsyncPostgresSaver.from_conn_string(raw) as saver:
                    await saver.setup()
                    yield saver

    @contextmanager
    def _database(self, prefix: str) -> Iterator[str]:
        if self.name == "sqlite":
            path = self.workdir / f"{prefix}-{uuid.uuid4().hex[:8]}.db"
            yield f"sqlite:///{path}?synchronous={self.synchronous}"
        else:
            assert self.pg_url
            with scratch_pg(self.pg_url) as url:
                yield url

    @property
    def their_name(self) -> str:
        return "SqliteSaver" if self.name == "sqlite" else "PostgresSaver"


def sqlite_size(path: Path) -> int:
    conn = sqlite3.connect(str(path))
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        return int(pages * size)
    finally:
        conn.close()


def pg_size(url: str, tables: tuple[str, ...]) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            total = 0
            for t in tables:
                total += int(conn.execute(
                    text("SELECT coalesce(pg_total_relation_size(to_regclass(:t)), 0)"),
                    {"t": t}).scalar() or 0)
            return total
    finally:
        engine.dispose()


def pg_analyze(url: str) -> None:
    """Fresh planner statistics (autovacuum would get there; a benchmark cannot wait)."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))
    finally:
        engine.dispose()


@contextmanager
def scratch_pg(server: str) -> Iterator[str]:
    base = make_url(server).set(drivername="postgresql+psycopg")
    name = f"lgbench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# -- workloads -------------------------------------------------------------------------------


class Steps:
    """The checkpoints a three-node graph makes, step after step (two channels change per step)."""

    def __init__(self, saver: BaseCheckpointSaver[Any]) -> None:
        self.saver = saver
        nv = saver.get_next_version
        self.versions: dict[str, Any] = {c: nv(None, None) for c in
                                         ("doc", "count", "note", "items", "branch:to:a",
                                          "branch:to:b")}
        self.values: dict[str, Any] = {"doc": DOC, "count": 0, "note": "start",
                                       "items": ["x", "y"], "branch:to:a": None,
                                       "branch:to:b": None}
        self.step = 0
        self.first = True

    def next(self) -> tuple[Checkpoint, dict[str, Any], dict[str, Any]]:
        nv = self.saver.get_next_version
        if self.first:
            new = dict(self.versions)
            self.first = False
        else:
            self.step += 1
            top = max(self.versions.values())
            trigger = "branch:to:a" if self.step % 2 else "branch:to:b"
            changed = ("count", trigger) if self.step % 3 else ("note", trigger)
            new = {}
            for ch in changed:
                self.versions[ch] = nv(top, None)
                new[ch] = self.versions[ch]
            self.values["count"] = self.step
            if "note" in changed:
                self.values["note"] = f"note {self.step}"
        cp = empty_checkpoint()
        cp["channel_values"] = dict(self.values)
        cp["channel_versions"] = dict(self.versions)
        cp["versions_seen"] = {n: {"branch:to:a": self.versions["branch:to:a"],
                                   "count": self.versions["count"]} for n in ("a", "b", "c")}
        metadata = {"source": "loop", "step": self.step, "parents": {},
                    "run_id": "1f0e4b2a-0000-6000-8000-000000000001"}
        return cp, metadata, new


def fill(saver: BaseCheckpointSaver[Any], thread_id: str, n: int, *, writes: bool = False
         ) -> float:
    """Put n checkpoints on a thread; returns puts/s (of the puts alone).

    With ``writes``, each checkpoint also gets its task's pending writes (two channels), as a
    graph run leaves them; those calls are not timed.
    """
    steps = Steps(saver)
    config: dict[str, Any] = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    prepared = [steps.next() for _ in range(n)]
    gc.collect()
    spent = 0.0
    for i, (cp, md, new) in enumerate(prepared):
        t = time.perf_counter()
        config = saver.put(config, cp, md, new)  # type: ignore[arg-type]
        spent += time.perf_counter() - t
        if writes:
            task = f"{i:08x}-0000-4000-8000-000000000000"
            saver.put_writes(config, [("count", i + 1), ("branch:to:b", None)],  # type: ignore
                             task, "~__pregel_pull, a")
    return n / spent


def store_alone(saver: EventStoreSaver, n: int) -> float:
    """appends/s of the events our put() appends, with the index handler off: the store's own
    cost, which bounds our puts/s."""
    from projections.langgraph_saver import index_events, stream_id_of

    steps = Steps(saver)
    config: dict[str, Any] = {"configurable": {"thread_id": "floor", "checkpoint_ns": ""}}
    events = []
    for cp, md, new in (steps.next() for _ in range(n)):
        _t, ev, config = saver._checkpoint_events(config, cp, md, new)  # type: ignore[arg-type]
        events.append(ev)
    store = saver.store
    store.remove_inline_handler(index_events)
    try:
        gc.collect()
        t = time.perf_counter()
        for ev in events:
            store.append(stream_id_of("floor"), [ev])
        return n / (time.perf_counter() - t)
    finally:
        store.add_inline_handler(index_events)


def driver_floor(backend: Backend, n: int) -> float:
    """puts/s of our put's writes through the bare driver (``sqlite3`` / ``psycopg``), with no
    Python of ours around them: the rows our ``put`` writes for the ``put`` row's checkpoints
    (the event, the stream's row, the checkpoint's and its values' index rows), in the same
    transaction shape (SQLite: ``BEGIN IMMEDIATE``, the probe of the stream's version and the
    log's end, the writes, ``COMMIT``; PostgreSQL: the append lock and the writes in one round
    trip, as one implicit transaction).  The limit our put could reach on this driver and schema."""
    from eventstore.codec import encode_event
    from projections.langgraph_saver import _versions_stored, checkpoint_key, stream_id_of

    with backend.ours() as saver:  # (a scratch store: the events, encoded as the store does)
        steps = Steps(saver)
        config: Any = {"configurable": {"thread_id": "floor", "checkpoint_ns": ""}}
        rows = []
        for i in range(1, n + 1):
            cp, md, new = steps.next()
            _t, ev, config = saver._checkpoint_events(config, cp, md, new)  # type: ignore
            tag, schema_version, data = encode_event(ev)
            rows.append((i, uuid.uuid4(), tag, schema_version, data, checkpoint_key(ev.id),
                         None if ev.parent is None else checkpoint_key(ev.parent),
                         list(_versions_stored(ev))))
    stream, tenant, run_id = stream_id_of("floor"), "default", "run"
    event_sql = ("INSERT INTO es_events (position, tenant_id, stream_id, category, version, "
                 "event_id, type, schema_version, data, metadata, recorded_at) "
                 "VALUES ({0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}, NULL, {0})")
    stream_sql = ("UPDATE es_streams SET version = {0}, updated_at = {0} "
                  "WHERE tenant_id = {0} AND stream_id = {0}")
    cp_sql = ("INSERT INTO es_lg_checkpoints (tenant_id, thread_id, checkpoint_ns, "
              "checkpoint_id, parent_id, position, run_id) VALUES ({0}, {0}, '', {0}, {0}, {0}, "
              "{0})")
    blob_sql = ("INSERT INTO es_lg_blobs (tenant_id, thread_id, checkpoint_ns, version, channel, "
                "position) VALUES {1} ON CONFLICT DO NOTHING")

    def writes(mark: str, as_id: Callable[[uuid.UUID], Any], now: int
               ) -> list[list[tuple[str, tuple[Any, ...]]]]:
        """Each put's write statements and parameters, built before the clock starts."""
        out = []
        for pos, eid, tag, sv, data, key, parent, versions in rows:
            values = ", ".join(f"({mark}, {mark}, '', {mark}, '', {mark})" for _ in versions)
            out.append([
                (event_sql.format(mark), (pos, tenant, stream, "lgthread", pos, as_id(eid), tag,
                                          sv, data, now)),
                (stream_sql.format(mark), (pos, now, tenant, stream)),
                (cp_sql.format(mark), (tenant, "floor", key, parent, pos, run_id)),
                (blob_sql.format(mark, values),
                 tuple(x for k in versions for x in (tenant, "floor", k, pos)))])
        return out

    with backend._database("floor") as url:
        EventStore.open(url, migrate=True).close()
        now = time.time_ns() // 1000
        if backend.name == "sqlite":
            conn = sqlite3.connect(make_url(url).database or "", isolation_level=None)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {backend.synchronous}")
            conn.execute("INSERT INTO es_streams VALUES (?, ?, 0, ?, ?)",
                         (tenant, stream, now, now))
            puts = writes("?", operator.attrgetter("hex"), now)
            probe = ("SELECT (SELECT version FROM es_streams WHERE tenant_id = ? AND "
                     "stream_id = ?), (SELECT max(position) FROM es_events)")
            gc.collect()
            t = time.perf_counter()
            for statements in puts:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(probe, (tenant, stream)).fetchone()
                for sql, params in statements:
                    conn.execute(sql, params)
                conn.execute("COMMIT")
            spent = time.perf_counter() - t
            conn.close()
            return n / spent
        import psycopg

        raw = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(raw, autocommit=True) as pg:
            pg.execute("INSERT INTO es_streams VALUES (%s, %s, 0, %s, %s)",
                       (tenant, stream, now, now))
            puts = writes("%s", lambda eid: eid, now)
            gc.collect()
            t = time.perf_counter()
            for statements in puts:
                with pg.pipeline():  # (one implicit transaction, up to the sync at its end)
                    cur = pg.cursor()
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK_ID,))
                    for sql, params in statements:
                        cur.execute(sql, params)
            return n / (time.perf_counter() - t)


def get_latency(saver: BaseCheckpointSaver[Any], thread_id: str, calls: int) -> float:
    """Median seconds of get_tuple (latest checkpoint)."""
    config: Any = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    assert saver.get_tuple(config) is not None
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        saver.get_tuple(config)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def history_seconds(saver: BaseCheckpointSaver[Any], thread_id: str, expect: int) -> float:
    config: Any = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    gc.collect()
    t = time.perf_counter()
    n = sum(1 for _ in saver.list(config))
    dt = time.perf_counter() - t
    assert n == expect, (n, expect)
    return dt


class LoopState(TypedDict, total=False):
    doc: str
    count: int
    note: str
    items: Annotated[list[str], operator.add]


def loop_graph(saver: BaseCheckpointSaver[Any], steps: int) -> Any:
    def work(state: LoopState) -> LoopState:
        n = state.get("count", 0) + 1
        return {"count": n, "note": f"step {n}"}

    g = StateGraph(LoopState)
    g.add_node("work", work)
    g.add_edge(START, "work")
    g.add_conditional_edges("work", lambda s: END if s["count"] >= steps else "work")
    return g.compile(checkpointer=saver)


def bytes_after_thread(saver: BaseCheckpointSaver[Any], steps: int, *, document: bool = True
                       ) -> int:
    graph = loop_graph(saver, steps)
    start: dict[str, Any] = {"count": 0, "note": ""}
    if document:
        start.update(doc=DOC, items=["x"])
    out = graph.invoke(start, {"configurable": {"thread_id": "bytes"},
                               "recursion_limit": steps + 10})
    assert out["count"] == steps
    return int(saver.size())  # type: ignore[attr-defined]


class EventState(TypedDict, total=False):
    count: int
    last: str


def one_node_graph(saver: BaseCheckpointSaver[Any]) -> Any:
    """A compiled graph of one node that counts the events it was invoked with."""
    def handle(state: EventState) -> EventState:
        return {"count": state.get("count", 0) + 1}

    g = StateGraph(EventState)
    g.add_node("handle", handle)
    g.add_edge(START, "handle")
    g.add_edge("handle", END)
    return g.compile(checkpointer=saver)


def invokes_per_second(saver: BaseCheckpointSaver[Any], n: int) -> float:
    graph = one_node_graph(saver)
    config: Any = {"configurable": {"thread_id": "events"}}
    graph.invoke({"last": "warm-up"}, config)
    gc.collect()
    t = time.perf_counter()
    for i in range(n):
        graph.invoke({"last": f"event {i}"}, config)
    dt = time.perf_counter() - t
    assert graph.get_state(config).values["count"] == n + 1
    return n / dt


async def async_rows(saver: BaseCheckpointSaver[Any], n_put: int, n_invoke: int
                     ) -> tuple[float, float, float]:
    """aput puts/s, aget_tuple median seconds on that thread, ainvoke invokes/s."""
    steps = Steps(saver)
    config: Any = {"configurable": {"thread_id": "puts", "checkpoint_ns": ""}}
    prepared = [steps.next() for _ in range(n_put)]
    gc.collect()
    t = time.perf_counter()
    for cp, md, new in prepared:
        config = await saver.aput(config, cp, md, new)
    puts = n_put / (time.perf_counter() - t)
    latest: Any = {"configurable": {"thread_id": "puts", "checkpoint_ns": ""}}
    times = []
    for _ in range(300):
        t = time.perf_counter()
        assert await saver.aget_tuple(latest) is not None
        times.append(time.perf_counter() - t)
    graph = one_node_graph(saver)
    thread: Any = {"configurable": {"thread_id": "events"}}
    await graph.ainvoke({"last": "warm-up"}, thread)
    gc.collect()
    t = time.perf_counter()
    for i in range(n_invoke):
        await graph.ainvoke({"last": f"event {i}"}, thread)
    invokes = n_invoke / (time.perf_counter() - t)
    assert (await graph.aget_state(thread)).values["count"] == n_invoke + 1
    return puts, statistics.median(times), invokes


async def async_both(backend: Backend, n_put: int, n_invoke: int
                     ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    async with backend.ours_async() as ours:
        o = await async_rows(ours, n_put, n_invoke)
    print(f"  {backend.name} async ours: {o}", file=sys.stderr)
    async with backend.theirs_async() as theirs:
        t = await async_rows(theirs, n_put, n_invoke)
    print(f"  {backend.name} async theirs: {t}", file=sys.stderr)
    return o, t


# -- the run ---------------------------------------------------------------------------------


ROWS = ("put", "get_tuple", "bytes", "invoke", "async")


def run_backend(backend: Backend, scale: float, out: list[tuple[str, str, str, str, str]],
                rows: tuple[str, ...] = ROWS) -> None:
    n_put = max(50, int(2000 * scale))
    n_small, n_big = 100, max(200, int(10_000 * scale))
    n_steps = max(50, int(1000 * scale))
    n_invoke = max(20, int(300 * scale))
    theirs = backend.their_name
    b = backend.name

    def both(label: str, fn: Callable[[BaseCheckpointSaver[Any]], float]) -> tuple[float, float]:
        with backend.ours() as s:
            ours = fn(s)
        print(f"  {b} {label} ours: {ours:.6g}", file=sys.stderr)
        with backend.theirs() as s:
            their = fn(s)
        print(f"  {b} {label} {theirs}: {their:.6g}", file=sys.stderr)
        return ours, their

    if "put" in rows:
        ours, their = both("put", lambda s: fill(s, "puts", n_put))
        out.append((b, "puts/s", f"{ours:,.0f}", f"{their:,.0f}", ratio(ours, their, True)))
        with backend.ours() as s:
            alone = store_alone(s, n_put)
        out.append((b, "  ours: the store's append alone (same events, no index)",
                    f"{alone:,.0f}", "", ""))
        floor = driver_floor(backend, n_put)
        print(f"  {b} put raw driver: {floor:.6g}", file=sys.stderr)
        out.append((b, "  raw driver: our put's statements alone (ours vs it)", f"{floor:,.0f}",
                    "", ratio(ours, floor, True)))
    if "get_tuple" in rows:
        latency_rows(backend, n_small, n_big, out)
    if "bytes" in rows:
        ours, their = both("bytes", lambda s: bytes_after_thread(s, n_steps))
        out.append((b, f"bytes after a {n_steps:,}-step thread (4 kB document in the state)",
                    f"{ours:,.0f}", f"{their:,.0f}", ratio(their, ours, True)))
        ours, their = both("bytes-small",
                           lambda s: bytes_after_thread(s, n_steps, document=False))
        out.append((b, f"bytes after a {n_steps:,}-step thread (counter and note only)",
                    f"{ours:,.0f}", f"{their:,.0f}", ratio(their, ours, True)))
    if "invoke" in rows:
        ours, their = both("invoke", lambda s: invokes_per_second(s, n_invoke))
        out.append((b, "invokes/s (one-node graph)", f"{ours:,.0f}", f"{their:,.0f}",
                    ratio(ours, their, True)))
    if "async" in rows:
        (o_put, o_get, o_inv), (t_put, t_get, t_inv) = asyncio.run(
            async_both(backend, n_put, n_invoke))
        out.append((b, "async: aput puts/s", f"{o_put:,.0f}", f"{t_put:,.0f}",
                    ratio(o_put, t_put, True)))
        out.append((b, f"async: aget_tuple, {n_put:,}-checkpoint thread (ms)",
                    f"{o_get * 1e3:.3f}", f"{t_get * 1e3:.3f}", ratio(t_get, o_get, True)))
        out.append((b, "async: ainvoke invokes/s (one-node graph)", f"{o_inv:,.0f}",
                    f"{t_inv:,.0f}", ratio(o_inv, t_inv, True)))


def latency_rows(backend: Backend, n_small: int, n_big: int,
                 out: list[tuple[str, str, str, str, str]]) -> None:
    """The get_tuple and history rows (they share their threads)."""
    theirs = backend.their_name
    b = backend.name

    def latency(s: BaseCheckpointSaver[Any]) -> tuple[float, float, float]:
        fill(s, "small", n_small, writes=True)
        fill(s, "big", n_big, writes=True)
        if backend.name == "postgresql":
            fresh.append(get_latency(s, "big", 300))
        s.analyze()  # type: ignore[attr-defined]
        small = get_latency(s, "small", 300)
        big = get_latency(s, "big", 300)
        hist = history_seconds(s, "big", n_big)
        return small, big, hist

    fresh: list[float] = []  # PostgreSQL: big-thread get_tuple before ANALYZE (ours, theirs)
    with backend.ours() as s:
        o_small, o_big, o_hist = latency(s)
    print(f"  {b} latency ours: {o_small:.6f} {o_big:.6f} {o_hist:.4f}", file=sys.stderr)
    with backend.theirs() as s:
        t_small, t_big, t_hist = latency(s)
    print(f"  {b} latency {theirs}: {t_small:.6f} {t_big:.6f} {t_hist:.4f}", file=sys.stderr)
    out.append((b, f"get_tuple, {n_small}-checkpoint thread (ms)", f"{o_small * 1e3:.3f}",
                f"{t_small * 1e3:.3f}", ratio(t_small, o_small, True)))
    out.append((b, f"get_tuple, {n_big:,}-checkpoint thread (ms)", f"{o_big * 1e3:.3f}",
                f"{t_big * 1e3:.3f}", ratio(t_big, o_big, True)))
    out.append((b, f"  ours: {n_big:,} vs {n_small} checkpoints", f"{o_big / o_small:.2f}x",
                f"{t_big / t_small:.2f}x", ""))
    if fresh:
        out.append((b, f"  get_tuple, {n_big:,}-checkpoint thread, before ANALYZE (ms)",
                    f"{fresh[0] * 1e3:.3f}", f"{fresh[1] * 1e3:.3f}",
                    ratio(fresh[1], fresh[0], True)))
    out.append((b, f"history of {n_big:,} checkpoints (s)", f"{o_hist:.3f}", f"{t_hist:.3f}",
                ratio(t_hist, o_hist, True)))


def ratio(good: float, other: float, higher_is_better: bool) -> str:
    return f"{good / other:.2f}x" if other else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--synchronous", default="FULL", choices=("FULL", "NORMAL"))
    parser.add_argument("--rows", default=",".join(ROWS),
                        help="comma-separated subset of put,get_tuple,bytes,invoke,async "
                             "(get_tuple includes history; default: all)")
    parser.add_argument("--pg-url", default=os.environ.get("EVENTSTORE_BENCH_PG_URL")
                        or os.environ.get("EVENTSTORE_TEST_PG_URL"))
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    workdir = Path(tempfile.mkdtemp(prefix="lgbench-"))
    rows: list[tuple[str, str, str, str, str]] = []
    try:
        for name in args.backends.split(","):
            if name == "postgresql" and not args.pg_url:
                print("no --pg-url: skipping postgresql", file=sys.stderr)
                continue
            backend = Backend(name, workdir, args.synchronous, args.pg_url)
            if name == "postgresql":
                eng = create_engine(make_url(args.pg_url).set(drivername="postgresql+psycopg"))
                with eng.connect() as conn:
                    print(f"postgresql fsync={conn.execute(text('show fsync')).scalar()}, "
                          f"synchronous_commit="
                          f"{conn.execute(text('show synchronous_commit')).scalar()}")
                eng.dispose()
            else:
                print(f"sqlite synchronous={args.synchronous}, journal_mode=WAL")
            run_backend(backend, args.scale, rows, tuple(args.rows.split(",")))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("| backend | measure | ours | theirs (SqliteSaver / PostgresSaver) | ours vs theirs |")
    print("|---|---|---:|---:|---:|")
    for b, what, ours, theirs, r in rows:
        print(f"| {b} | {what} | {ours} | {theirs} | {r} |")
    print("\n`ours vs theirs` > 1 means ours is better (faster, fewer bytes).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
