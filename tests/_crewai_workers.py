"""Worker run in child processes (spawn) by the CrewAI persistence tests.

A worker is a separate application process: it opens the store by URL, defines the flow class
with its own ``EventStoreFlowPersistence``, and reports through a queue -- ``("ok", report)`` or
``("error", traceback_text)`` -- as tests/_workers.py does.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

from projections.crewai_persistence import EventStoreFlowPersistence
from tests._crewai_flows import offline, review_flow

BARRIER_TIMEOUT = 120.0


def resume_racer(url: str, flow_id: str, feedback: str, barrier: Any, queue: Any) -> None:
    """Resume the paused review flow ``flow_id`` with ``feedback``, at once with the others.

    Waits at ``barrier`` after CrewAI is imported and the flow class built, so that the racers
    call ``from_pending`` together.  Reports ``outcome`` ``"won"`` (with the flow's result and
    state) or ``"lost"`` (with the ``ValueError`` ``from_pending`` raised: nothing left to
    claim), its pid, and any network access.
    """
    try:
        with offline() as guard:
            persistence = EventStoreFlowPersistence(url)
            persistence.init_db()
            review = review_flow(persistence)
            report: dict[str, Any] = {"pid": os.getpid(), "feedback": feedback}
            barrier.wait(BARRIER_TIMEOUT)
            try:
                flow = review.from_pending(flow_id, persistence)
            except ValueError as e:  # (what CrewAI raises when nothing is pending)
                report.update(outcome="lost", reason=str(e))
            else:
                result = flow.resume(feedback)
                report.update(outcome="won", result=result, state=flow.state.model_dump())
            persistence.close()
            report["network"] = list(guard.attempts)
        queue.put(("ok", report))
    except BaseException:
        queue.put(("error", f"racer {feedback!r}: {traceback.format_exc()}"))
        raise
