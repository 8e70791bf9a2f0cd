"""Projector processes for the distributed-projector tests (run under the "spawn" start method).

A worker opens the store, says ``("started", worker_id)`` on its queue, runs a projector of
``TallyProjection(name)`` until the parent creates the file ``stop_file`` (or ``seconds`` pass),
then says ``("ok", worker_id)``; on an exception it says ``("error", traceback)`` instead.

The stop signal is a file, not a ``multiprocessing.Event``: the tests SIGKILL workers, and a
process killed inside ``Event.wait`` leaves the event's condition variable expecting a waiter
that never wakes, so the parent's ``Event.set()`` would block forever.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

from eventstore import EventStore
from projections import Projector
from tests._projections import TallyProjection

LEASE_SECONDS = 1.0
BATCH_SIZE = 20


class _StopOrDeadline:
    """What ``Projector.run`` needs of a stop event: the stop file exists, or ``seconds`` passed."""

    def __init__(self, stop_file: str, seconds: float) -> None:
        self.stop_file = stop_file
        self.deadline = time.monotonic() + seconds

    def is_set(self) -> bool:
        return os.path.exists(self.stop_file) or time.monotonic() >= self.deadline

    def wait(self, timeout: float | None = None) -> bool:
        end = self.deadline if timeout is None else min(self.deadline,
                                                        time.monotonic() + timeout)
        while not self.is_set() and time.monotonic() < end:
            time.sleep(min(0.02, max(0.0, end - time.monotonic())))
        return self.is_set()


def run_projector(url: str, worker_id: str, name: str, stop_file: str, seconds: float,
                  queue: Any) -> None:
    """Run a tally projector named ``name`` as ``worker_id`` until stopped."""
    try:
        with EventStore.open(url) as store:
            projector = Projector(store, [TallyProjection(name)], worker_id=worker_id,
                                  lease_seconds=LEASE_SECONDS, batch_size=BATCH_SIZE)
            queue.put(("started", worker_id))
            projector.run(_StopOrDeadline(stop_file, seconds))  # type: ignore[arg-type]
        queue.put(("ok", worker_id))
    except BaseException:
        queue.put(("error", f"{worker_id}: {traceback.format_exc()}"))
        raise
