"""Worker functions run in child processes (spawn) by the multi-process and migration tests.

Each worker reports through a multiprocessing queue: ``("ok", payload)`` when it finished, or
``("error", traceback_text)`` so that the parent test fails with the child's traceback rather than
hanging or guessing.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

from eventstore import EventStore, WrongExpectedVersion
from eventstore._migrate import migrate_url
from tests._events import Anything, CounterIncremented, NoteAdded

BARRIER_TIMEOUT = 60.0
PAD = "x" * 2000


def _guard(queue: Any, name: str, body: Callable[[], None]) -> None:
    """Run ``body``; if it raises, put ("error", traceback) on the queue and re-raise."""
    try:
        body()
    except BaseException:
        queue.put(("error", f"{name}: {traceback.format_exc()}"))
        raise


def version_racer(url: str, worker: str, streams: list[str], attempts: int, seconds: float,
                  barrier: Any, queue: Any) -> None:
    """Loop: read a stream's version, append expecting it; count wins and conflicts.

    Stops after ``attempts`` tries or ``seconds`` of racing, whichever comes first.  Reports
    ``{"worker", "attempts", "wins", "losses", "wins_by_stream"}``.
    """

    def body() -> None:
        wins = losses = tried = 0
        wins_by_stream = dict.fromkeys(streams, 0)
        with EventStore.open(url) as store:
            barrier.wait(BARRIER_TIMEOUT)
            deadline = time.monotonic() + seconds
            for i in range(attempts):
                if time.monotonic() > deadline:
                    break
                stream = streams[i % len(streams)]
                version = store.stream_version(stream)
                tried += 1
                try:
                    store.append(stream, [CounterIncremented(by=1, writer=worker)],
                                 expected_version=version)
                except WrongExpectedVersion:
                    losses += 1
                else:
                    wins += 1
                    wins_by_stream[stream] += 1
        queue.put(("ok", {"worker": worker, "attempts": tried, "wins": wins, "losses": losses,
                          "wins_by_stream": wins_by_stream}))

    _guard(queue, f"version_racer {worker}", body)


def mixed_appender(url: str, worker: str, rounds: int, barrier: Any, queue: Any) -> None:
    """Unchecked appends, interleaved with other workers': to a stream of its own (which this
    store then knows, so on PostgreSQL it appends on what it committed last and must notice
    the others' events), to a shared stream, and two-event batches.  Reports what it wrote:
    ``{"worker", "own": n, "shared": n}``."""

    def body() -> None:
        own = shared = 0
        with EventStore.open(url) as store:
            barrier.wait(BARRIER_TIMEOUT)
            for i in range(rounds):
                if i % 3 == 2:
                    store.append("mixed-shared", [CounterIncremented(by=1, writer=worker)])
                    shared += 1
                elif i % 5 == 4:
                    store.append(f"mixed-{worker}", [CounterIncremented(by=1, writer=worker),
                                                     CounterIncremented(by=2, writer=worker)])
                    own += 2
                else:
                    store.append(f"mixed-{worker}", [CounterIncremented(by=1, writer=worker)])
                    own += 1
        queue.put(("ok", {"worker": worker, "own": own, "shared": shared}))

    _guard(queue, f"mixed_appender {worker}", body)


def idempotency_racer(url: str, worker: str, keys: list[tuple[str, str]], barrier: Any,
                      queue: Any) -> None:
    """For each ``(key, stream)``: wait for every worker, then append the same two events with it.

    Reports a list of ``(key, duplicate, first_position, last_position, stream_version)``.
    """

    def body() -> None:
        results = []
        with EventStore.open(url) as store:
            for key, stream in keys:
                barrier.wait(BARRIER_TIMEOUT)
                r = store.append(stream, [NoteAdded(text=f"{key}/a"), NoteAdded(text=f"{key}/b")],
                                 idempotency_key=key)
                results.append((key, r.duplicate, r.first_position, r.last_position,
                                r.stream_version))
        queue.put(("ok", {"worker": worker, "results": results}))

    _guard(queue, f"idempotency_racer {worker}", body)


def batch_appender(url: str, stream: str, first_batch: int, batch_size: int, queue: Any) -> None:
    """Append batches of ``batch_size`` ~2 KB events forever, reporting each committed batch.

    Every event's value is ``{"batch": n, "index": i, "pad": ...}``.  Puts ``("batch", n)`` on the
    queue after batch ``n`` committed.  Runs until killed.
    """

    def body() -> None:
        with EventStore.open(url) as store:
            queue.put(("ready", first_batch))
            batch = first_batch
            while True:
                events = [Anything(value={"batch": batch, "index": i, "pad": PAD})
                          for i in range(batch_size)]
                store.append(stream, events)
                queue.put(("batch", batch))
                batch += 1

    _guard(queue, f"batch_appender {stream}", body)


def migrator(url: str, barrier: Any, queue: Any) -> None:
    """Wait for every worker, then migrate ``url``; reports the head revision."""

    def body() -> None:
        barrier.wait(BARRIER_TIMEOUT)
        head = migrate_url(url)
        queue.put(("ok", head))

    _guard(queue, "migrator", body)
