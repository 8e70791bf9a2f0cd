"""Several OS processes on one store: version and idempotency races, a writer killed mid-batch.

Workers live in tests/_workers.py and run under the "spawn" start method, so each is a fresh
interpreter with its own engine and connections, as separate application processes would be.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import pytest

from eventstore import EventStore, RecordedEvent
from tests import _workers
from tests._events import NoteAdded
from tests.conftest import Children, collect

pytestmark = pytest.mark.slow

CTX = multiprocessing.get_context("spawn")
WORKERS = 4
RESULT_TIMEOUT = 60.0


def assert_log_gap_free(events: Sequence[RecordedEvent]) -> None:
    """Positions run 1..N and every stream's versions run 1..n, in log order."""
    assert [e.position for e in events] == list(range(1, len(events) + 1))
    by_stream: dict[str, list[int]] = defaultdict(list)
    for e in events:
        by_stream[e.stream_id].append(e.version)
    for stream, versions in by_stream.items():
        assert versions == list(range(1, len(versions) + 1)), stream


def test_version_races_across_processes_lose_nothing_and_duplicate_nothing(
    url: str, children: Children,
) -> None:
    """Four processes racing expected-version appends leave a gap-free log of exactly the wins."""
    EventStore.open(url, migrate=True).close()
    streams = ["counter-1", "counter-2", "counter-3"]
    barrier = CTX.Barrier(WORKERS)
    q = CTX.Queue()
    procs = [children.start(_workers.version_racer, url, f"w{i}", streams, 120, 5.0, barrier, q)
             for i in range(WORKERS)]
    reports = collect(q, procs, WORKERS, RESULT_TIMEOUT)

    for r in reports:
        assert r["wins"] + r["losses"] == r["attempts"] > 0
    total_wins = sum(r["wins"] for r in reports)
    with EventStore.open(url) as store:
        events = list(store.read_all())
        assert_log_gap_free(events)
        assert len(events) == total_wins
        for s in streams:
            assert store.stream_version(s) == sum(r["wins_by_stream"][s] for r in reports)
    writers = Counter(e.data.writer for e in events)  # type: ignore[union-attr]
    assert writers == Counter({r["worker"]: r["wins"] for r in reports if r["wins"]})


def test_unchecked_appends_from_many_processes_land_once_in_order(
    url: str, children: Children,
) -> None:
    """Four processes appending without version checks, to streams of their own and to one
    they share, leave a gap-free log holding exactly what each wrote (on PostgreSQL each
    store's guess of the log's end goes stale again and again and must be caught)."""
    EventStore.open(url, migrate=True).close()
    barrier = CTX.Barrier(WORKERS)
    q = CTX.Queue()
    procs = [children.start(_workers.mixed_appender, url, f"w{i}", 90, barrier, q)
             for i in range(WORKERS)]
    reports = collect(q, procs, WORKERS, RESULT_TIMEOUT)
    with EventStore.open(url) as store:
        events = list(store.read_all())
        assert_log_gap_free(events)
        assert len(events) == sum(r["own"] + r["shared"] for r in reports)
        for r in reports:
            mine = [e for e in events if e.stream_id == f"mixed-{r['worker']}"]
            assert len(mine) == r["own"] == store.stream_version(f"mixed-{r['worker']}")
        assert store.stream_version("mixed-shared") == sum(r["shared"] for r in reports)
    written = Counter(e.data.writer for e in events)  # type: ignore[union-attr]
    assert written == Counter({r["worker"]: r["own"] + r["shared"] for r in reports})


def test_idempotency_key_races_across_processes_write_once(
    url: str, children: Children,
) -> None:
    """Four processes using each key at once: one write per key, the rest get its positions."""
    EventStore.open(url, migrate=True).close()
    keys = [(f"req-{i}", f"conversation-{i % 3}") for i in range(8)]
    barrier = CTX.Barrier(WORKERS)
    q = CTX.Queue()
    procs = [children.start(_workers.idempotency_racer, url, f"w{i}", keys, barrier, q)
             for i in range(WORKERS)]
    reports = collect(q, procs, WORKERS, RESULT_TIMEOUT)

    by_key: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for r in reports:
        for key, duplicate, first, last, version in r["results"]:
            by_key[key].append((duplicate, first, last, version))
    assert sorted(by_key) == sorted(k for k, _ in keys)
    with EventStore.open(url) as store:
        events = list(store.read_all())
    assert_log_gap_free(events)
    assert len(events) == 2 * len(keys)
    at = {e.position: e for e in events}
    for key, stream in keys:
        answers = by_key[key]
        assert len(answers) == WORKERS
        assert sorted(dup for dup, *_ in answers) == [False] + [True] * (WORKERS - 1), key
        assert len({tuple(rest) for _, *rest in answers}) == 1, (key, answers)
        _, first, last, version = answers[0]
        assert last == first + 1
        assert [(at[p].stream_id, at[p].data.text, at[p].version)  # type: ignore[union-attr]
                for p in (first, last)] == [(stream, f"{key}/a", version - 1),
                                            (stream, f"{key}/b", version)]
    texts = Counter(e.data.text for e in events)  # type: ignore[union-attr]
    assert set(texts.values()) == {1}


BATCH = 500
BULK = "bulk-1"
# (batches to see committed before the kill, then seconds to wait): kills at different moments.
KILLS = [(1, 0.0), (2, 0.004), (1, 0.013), (3, 0.03), (1, 0.08)]


def check_batches_atomic(store: EventStore, committed: set[int]) -> set[int]:
    """Every batch in the bulk stream is whole and contiguous; returns the batches present."""
    events = list(store.read_all())
    assert_log_gap_free(events)
    batches: dict[int, list[RecordedEvent]] = defaultdict(list)
    markers = 0
    for e in events:
        if e.stream_id != BULK:
            continue
        if isinstance(e.data, NoteAdded):
            markers += 1
        else:
            batches[e.data.value["batch"]].append(e)  # type: ignore[union-attr]
    for n, evs in batches.items():
        assert [e.data.value["index"] for e in evs] == list(range(BATCH)), n  # type: ignore[union-attr]
        first = evs[0]
        assert [e.version for e in evs] == list(range(first.version, first.version + BATCH)), n
        assert [e.position for e in evs] == list(range(first.position, first.position + BATCH))
        assert all(e.data.value["pad"] == _workers.PAD for e in evs)  # type: ignore[union-attr]
    assert committed <= set(batches), f"committed batches lost: {committed - set(batches)}"
    assert store.stream_version(BULK) == BATCH * len(batches) + markers
    return set(batches)


def test_writer_killed_mid_batch_leaves_whole_batches_only(url: str, children: Children) -> None:
    """SIGKILL of a process appending big batches: the store opens, batches are all-or-nothing."""
    EventStore.open(url, migrate=True).close()
    committed: set[int] = set()
    for round_no, (wait_batches, delay) in enumerate(KILLS):
        q = CTX.Queue()
        p = children.start(_workers.batch_appender, url, BULK, round_no * 1000, BATCH, q)
        seen = 0
        while seen < wait_batches:
            kind, payload = q.get(timeout=RESULT_TIMEOUT)
            if kind == "error":
                pytest.fail(f"writer failed:\n{payload}")
            if kind == "batch":
                committed.add(payload)
                seen += 1
        time.sleep(delay)
        assert p.pid is not None and p.is_alive()
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
        while True:  # batches reported between our last read and the kill were committed too
            try:
                kind, payload = q.get(timeout=0.2)
            except queue_mod.Empty:
                break
            assert kind == "batch", payload
            committed.add(payload)

        with EventStore.open(url) as store:
            present = check_batches_atomic(store, committed)
            assert len(present) >= len(committed) > 0
            r = store.append(f"after-kill-{round_no}", [NoteAdded(text="still works")],
                             expected_version=0)
            assert r.stream_version == 1 and r.last_position == store.last_position()
            v = store.stream_version(BULK)
            r = store.append(BULK, [NoteAdded(text="marker")], expected_version=v)
            assert r.stream_version == v + 1
            check_batches_atomic(store, committed)


def test_a_store_used_before_fork_works_in_parent_and_child(url: str) -> None:
    """A prefork server (gunicorn, celery) opens the store, then forks: parent and child each
    read and append on connections of their own (the child's pool and kept write connection
    start empty; sharing the parent's sockets broke reads on both sides)."""
    with EventStore.open(url, migrate=True) as store:
        store.append("f-0", [NoteAdded(text=str(i)) for i in range(50)])
        assert sum(1 for _ in store.read_stream("f-0")) == 50  # a pooled connection, kept

        def work(stream: str) -> None:
            for i in range(30):
                assert sum(1 for _ in store.read_stream("f-0")) == 50
                store.append(stream, [NoteAdded(text=str(i))])

        pid = os.fork()
        if pid == 0:  # the child: report by exit code only, never return into pytest
            code = 1
            try:
                work("f-child")
                code = 0
            finally:
                os._exit(code)
        work("f-parent")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert store.stream_version("f-child") == 30
        assert store.stream_version("f-parent") == 30
        assert [e.position for e in store.read_all()] == list(range(1, 111))
