"""Real CrewAI flows for the differential feature tests (tests/test_crewai_features.py), and the
worker that resumes them in another process.

Each factory takes the persistence and returns a new flow class (``@persist(...)`` binds a
backend when the class is defined); the class's ``ran`` list records which methods ran, in
order.  No flow calls a model: the ``emit`` flows classify the human's answer with
:func:`classify` (see :class:`KeywordClassifier`).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import traceback
from collections.abc import Sequence
from typing import Any, ClassVar

from crewai.flow import (
    Flow,
    HumanFeedbackPending,
    HumanFeedbackResult,
    PendingFeedbackContext,
    and_,
    human_feedback,
    listen,
    or_,
    persist,
    router,
    start,
)
from crewai.flow.flow import FlowState
from crewai.flow.persistence import FlowPersistence, SQLiteFlowPersistence
from pydantic import Field

from tests._crewai_flows import NO_MEMORY, offline

# The model name @human_feedback(emit=...) is given.  CrewAI builds an LLM object from it (no
# call, no key needed) when the flow pauses and when it resumes; the answer is then classified
# by KeywordClassifier instead of by that model.
CLASSIFIER_MODEL = "gpt-4o-mini"


def classify(feedback: str, outcomes: Sequence[str]) -> str:
    """The deterministic stand-in for the LLM that maps an answer to an ``emit`` outcome: the
    first outcome the answer names, else the last one."""
    lowered = feedback.lower()
    return next((o for o in outcomes if o in lowered), outcomes[-1])


class KeywordClassifier:
    """Mixin for flows with ``@human_feedback(emit=...)``: CrewAI asks
    ``Flow._collapse_to_outcome`` to classify a non-empty answer (with an LLM); this answers
    with :func:`classify` instead, on the first run and on a resume in another process alike."""

    def _collapse_to_outcome(self, feedback: str, outcomes: Sequence[str], llm: Any) -> str:
        return classify(feedback, outcomes)


class PauseProvider:
    """A ``HumanFeedbackProvider`` that never blocks: the flow pauses for a later answer."""

    def request_feedback(self, context: PendingFeedbackContext, flow: Flow[Any]) -> str:
        raise HumanFeedbackPending(context=context)


class AsyncPauseProvider:
    """The same, as a coroutine (CrewAI awaits what ``request_feedback`` returns)."""

    async def request_feedback(self, context: PendingFeedbackContext, flow: Flow[Any]) -> str:
        await asyncio.sleep(0)
        raise HumanFeedbackPending(context=context)


# -- routers, or_ / and_ ----------------------------------------------------------------------


class OrderState(FlowState):
    amount: int = 0
    path: list[str] = Field(default_factory=list)


def order_flow(persistence: FlowPersistence) -> Any:
    """Two starts joined by ``and_`` into a router; ``big``/``small`` branches joined by
    ``or_``."""

    @persist(persistence)
    class OrderFlow(Flow[OrderState]):
        _skip_auto_memory = NO_MEMORY
        ran: ClassVar[list[str]] = []

        @start()
        def intake(self) -> None:
            self.ran.append("intake")
            self.state.path.append("intake")

        @start()
        def enrich(self) -> None:
            self.ran.append("enrich")
            self.state.path.append("enrich")

        @router(and_(intake, enrich))
        def decide(self) -> str:
            self.ran.append("decide")
            return "big" if self.state.amount > 100 else "small"

        @listen("big")
        def escalate(self) -> str:
            self.ran.append("escalate")
            self.state.path.append("escalate")
            return "escalated"

        @listen("small")
        def approve(self) -> str:
            self.ran.append("approve")
            self.state.path.append("approve")
            return "approved"

        @listen(or_(escalate, approve))
        def notify(self) -> str:
            self.ran.append("notify")
            self.state.path.append("notify")
            return f"notified {self.state.amount}"

    return OrderFlow


# -- human feedback with emit, a loop, and two feedback points -----------------------------


class ArticleState(FlowState):
    topic: str = ""
    draft: str = ""
    revisions: int = 0
    answers: list[str] = Field(default_factory=list)
    live: bool = False


def article_flow(persistence: FlowPersistence) -> Any:
    """``write`` -> ``review`` (feedback, ``emit=["approved", "rejected"]``); ``rejected``
    goes to ``revise``, which routes back to ``review`` (a second pause of the same step);
    ``approved`` goes to ``publish``, a second feedback point (no ``emit``), then ``go_live``."""

    @persist(persistence)
    class ArticleFlow(KeywordClassifier, Flow[ArticleState]):
        _skip_auto_memory = NO_MEMORY
        ran: ClassVar[list[str]] = []

        @start()
        def write(self) -> None:
            self.ran.append("write")
            self.state.draft = f"About {self.state.topic}"

        @listen(or_(write, "revised"))
        @human_feedback(message="Approve the draft?", emit=["approved", "rejected"],
                        default_outcome="rejected", llm=CLASSIFIER_MODEL,
                        provider=PauseProvider(), metadata={"step": 1})
        def review(self) -> str:
            self.ran.append("review")
            return str(self.state.draft)

        @router("rejected")
        def revise(self, result: HumanFeedbackResult) -> str:
            self.ran.append("revise")
            self.state.revisions += 1
            self.state.answers.append(result.feedback)
            self.state.draft = f"{self.state.draft} (v{self.state.revisions + 1})"
            return "revised"

        @listen("approved")
        @human_feedback(message="Go live now?", provider=PauseProvider())
        def publish(self, result: HumanFeedbackResult) -> str:
            self.ran.append("publish")
            self.state.answers.append(result.feedback)
            return f"publishing {self.state.draft}"

        @listen(publish)
        def go_live(self, result: HumanFeedbackResult) -> str:
            self.ran.append("go_live")
            self.state.answers.append(result.feedback)
            self.state.live = True
            return f"{result.output} [{result.feedback}]"

    return ArticleFlow


# -- async ------------------------------------------------------------------------------------


class JoinState(FlowState):
    topic: str = ""
    parts: list[str] = Field(default_factory=list)
    verdict: str = ""


def join_flow(persistence: FlowPersistence) -> Any:
    """An async start and a sync start (run at once), joined by ``and_`` into an async
    feedback step with an async provider, then an async step."""

    @persist(persistence)
    class JoinFlow(Flow[JoinState]):
        _skip_auto_memory = NO_MEMORY
        ran: ClassVar[list[str]] = []

        @start()
        async def left(self) -> None:
            await asyncio.sleep(0.01)
            self.ran.append("left")
            self.state.parts.append("L")

        @start()
        def right(self) -> None:
            self.ran.append("right")
            self.state.parts.append("R")

        @listen(and_(left, right))
        @human_feedback(message="Join them?", provider=AsyncPauseProvider())
        async def check(self) -> str:
            self.ran.append("check")
            return "+".join(sorted(self.state.parts))

        @listen(check)
        async def done(self, result: HumanFeedbackResult) -> str:
            await asyncio.sleep(0)
            self.ran.append("done")
            self.state.verdict = str(result.feedback)
            return f"{self.state.topic}: {result.output} [{result.feedback}]"

    return JoinFlow


# -- the worker -------------------------------------------------------------------------------


def resume_article(tmp_dir: str, sqlite_path: str, url: str, flow_ids: dict[str, str],
                   answer: str, queue: Any) -> None:
    """In a process of its own: resume the paused article flow on CrewAI's SQLite backend
    (``sqlite_path``) and on the store (``url``) with ``answer``; report per backend what the
    resumed flow returned (``"pending:<method>"`` when it paused again), which methods ran, and
    its state."""
    from projections.crewai_persistence import EventStoreFlowPersistence

    try:
        tempfile.tempdir = tmp_dir  # (CrewAI's SQLite backend locks through a file there)
        with offline() as guard:
            report: dict[str, Any] = {"pid": os.getpid()}
            ours = EventStoreFlowPersistence(url)
            backends: dict[str, FlowPersistence] = {
                "crewai": SQLiteFlowPersistence(sqlite_path), "store": ours}
            for name, persistence in backends.items():
                flow_class = article_flow(persistence)
                flow = flow_class.from_pending(flow_ids[name], persistence)
                result = flow.resume(answer)
                if isinstance(result, HumanFeedbackPending):
                    result = f"pending:{result.context.method_name}"
                state = flow.state.model_dump()
                state["id"] = "<id>"
                report[name] = {"result": result, "ran": list(flow_class.ran), "state": state}
            ours.close()
            report["network"] = list(guard.attempts)
        queue.put(("ok", report))
    except BaseException:
        queue.put(("error", f"resume {answer!r}: {traceback.format_exc()}"))
        raise
