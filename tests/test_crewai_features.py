"""Differential tests: real CrewAI flows run on ``EventStoreFlowPersistence`` and on CrewAI's own
``SQLiteFlowPersistence``, and what a user sees is compared.

Covered: ``@persist`` on the class and on one method, with pydantic and dict state; routers
with ``or_``/``and_`` and restarts by id; ``@human_feedback`` with ``emit`` routing, a loop
that pauses the same step twice and a second feedback point, resumed in-process and in other
processes; async flows (``kickoff_async``, async steps and provider, ``resume_async``); typed
state restored by id and by ``from_pending``; forks (``restore_from_state_id``), ``ask()``'s
checkpoint, a persistence given to the instance, CrewAI's default-persistence factory, and a
restart of a paused flow.  The store side runs on SQLite and PostgreSQL; CrewAI's side is its
SQLite file in the test's directory.  Where the backends differ by design (README, "Two
behaviours change": ``load_state`` keeps value types), the tests say so.

No model is called: the ``emit`` flows classify the answer with a keyword stand-in
(``tests._crewai_feature_flows.KeywordClassifier``), and every test runs under the offline
guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import sqlite3
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import Enum, IntEnum, StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from crewai.flow import (
    Flow,
    HumanFeedbackPending,
    HumanFeedbackResult,
    human_feedback,
    listen,
    start,
)
from crewai.flow import persist as crewai_persist
from crewai.flow.flow import FlowState
from crewai.flow.persistence import FlowPersistence, SQLiteFlowPersistence
from crewai.flow.persistence.factory import set_flow_persistence_factory
from pydantic import BaseModel, Field

from eventstore import EventStore
from projections.crewai_persistence import EventStoreFlowPersistence
from tests import _crewai_feature_flows as features
from tests._crewai_feature_flows import (
    CLASSIFIER_MODEL,
    KeywordClassifier,
    PauseProvider,
    article_flow,
    join_flow,
    order_flow,
)
from tests._crewai_flows import (  # the autouse fixtures too
    NO_MEMORY,
    crewai_lock_files_in_tmp_path,  # noqa: F401
    no_network,  # noqa: F401
)
from tests.conftest import Children, collect

CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["tests._crewai_workers", "tests._crewai_feature_flows"])
RESULT_TIMEOUT = 180.0


@pytest.fixture
def ours(store: EventStore) -> EventStoreFlowPersistence:
    return EventStoreFlowPersistence(store)


@pytest.fixture
def theirs(tmp_path: Path) -> SQLiteFlowPersistence:
    return SQLiteFlowPersistence(str(tmp_path / "crewai_flow_states.db"))


@pytest.fixture
def both(theirs: SQLiteFlowPersistence,
         ours: EventStoreFlowPersistence) -> dict[str, FlowPersistence]:
    return {"crewai": theirs, "store": ours}


def saved_methods(persistence: FlowPersistence, flow_id: str) -> list[str]:
    """The method names of every state the backend saved for the flow, oldest first."""
    if isinstance(persistence, EventStoreFlowPersistence):
        return [h.method_name for h in persistence.history(flow_id)]
    assert isinstance(persistence, SQLiteFlowPersistence)
    with contextlib.closing(sqlite3.connect(persistence.db_path)) as conn:
        return [row[0] for row in conn.execute(
            "SELECT method_name FROM flow_states WHERE flow_uuid = ? ORDER BY id", (flow_id,))]


def state_id(flow: Flow[Any]) -> str:
    state = flow.state
    return str(state["id"] if isinstance(state, dict) else state.id)


def without_id(state: Any) -> Any:
    """A state (model or dict) as a dict with the id masked, to compare two backends' flows."""
    data = dict(state) if isinstance(state, dict) else state.model_dump()
    data["id"] = "<id>"
    return data


def differential(both: dict[str, FlowPersistence],
                 scenario: Callable[[FlowPersistence], Any]) -> Any:
    """Run ``scenario`` on each backend; assert that what it observed is the same on both, and
    return that."""
    seen = {name: scenario(persistence) for name, persistence in both.items()}
    assert seen["store"] == seen["crewai"]
    return seen["store"]


# -- @persist on the class or on a method; pydantic or dict state ---------------------------


class TallyState(FlowState):
    n: int = 0
    log: list[str] = Field(default_factory=list)


def tally_flow(persistence: FlowPersistence, *, structured: bool, on_class: bool) -> Any:
    """``a`` -> ``b`` -> ``c``; ``@persist`` on the class (every step saved) or on ``b``
    only."""
    persist_class = crewai_persist(persistence) if on_class else (lambda cls: cls)
    persist_b = (lambda f: f) if on_class else crewai_persist(persistence)
    base: Any = Flow[TallyState] if structured else Flow[dict[str, Any]]

    @persist_class
    class Tally(base):  # type: ignore[valid-type, misc]
        _skip_auto_memory = NO_MEMORY
        ran: ClassVar[list[str]] = []

        def note(self, step: str) -> None:
            self.ran.append(step)
            if structured:
                self.state.log.append(step)
            else:
                self.state["log"] = [*self.state.get("log", []), step]

        @start()
        def a(self) -> None:
            self.note("a")
            if structured:
                self.state.n += 1
            else:
                self.state["n"] = int(self.state.get("n", 0)) + 1

        @listen(a)
        @persist_b
        def b(self) -> str:
            self.note("b")
            return "b done"

        @listen(b)
        def c(self) -> str:
            self.note("c")
            n = self.state.n if structured else self.state["n"]
            return f"c:{n}"

    return Tally


@pytest.mark.parametrize("structured", [True, False], ids=["pydantic", "dict"])
@pytest.mark.parametrize("on_class", [True, False], ids=["class", "method"])
def test_persist_on_the_class_or_a_method_saves_and_restores_alike(
    both: dict[str, FlowPersistence], structured: bool, on_class: bool,
) -> None:
    """Class-level @persist saves after every step and a kickoff by id restores the state;
    method-level @persist saves after that step only, and (CrewAI's rule: no flow-level
    backend) a kickoff by id starts afresh -- on the store as on CrewAI's SQLite file."""

    def scenario(persistence: FlowPersistence) -> Any:
        first = tally_flow(persistence, structured=structured, on_class=on_class)
        flow = first()
        result = flow.kickoff(inputs=None if structured else {"n": 5})
        flow_id = state_id(flow)
        saved = saved_methods(persistence, flow_id)
        loaded = persistence.load_state(flow_id)
        assert loaded is not None and loaded["id"] == flow_id

        again = tally_flow(persistence, structured=structured, on_class=on_class)
        restarted = again()
        second = restarted.kickoff(inputs={"id": flow_id})
        assert state_id(restarted) == flow_id
        return (result, list(first.ran), saved, without_id(loaded), second, list(again.ran),
                without_id(restarted.state), saved_methods(persistence, flow_id))

    (result, ran, saved, loaded, second, ran_again, restarted,
     all_saved) = differential(both, scenario)
    assert ran == ran_again == ["a", "b", "c"]
    if on_class:
        assert saved == ["a", "b", "c"] and all_saved == saved * 2
        assert (result, second) == (("c:1", "c:2") if structured else ("c:6", "c:7"))
        assert restarted["log"] == ["a", "b", "c", "a", "b", "c"]
    else:
        assert saved == ["b"] and all_saved == ["b", "b"]
        assert loaded["log"] == ["a", "b"]
        assert result == ("c:1" if structured else "c:6")
        assert second == "c:1"  # not restored
        assert restarted["log"] == ["a", "b", "c"]


# -- routers with and_ / or_, restarted by id -----------------------------------------------


def test_a_router_flow_restarted_by_id_takes_the_branch_its_new_input_picks(
    both: dict[str, FlowPersistence],
) -> None:
    """and_ joins two starts into a router, or_ joins its branches; a kickoff by id restores
    the state, an input overrides it and the router takes the other branch."""

    def scenario(persistence: FlowPersistence) -> Any:
        first_class = order_flow(persistence)
        first = first_class()
        result = first.kickoff(inputs={"amount": 50})
        flow_id = first.state.id
        again_class = order_flow(persistence)
        again = again_class()
        second = again.kickoff(inputs={"id": flow_id, "amount": 500})
        loaded = persistence.load_state(flow_id)
        assert loaded is not None
        return (result, sorted(first_class.ran[:2]), first_class.ran[2:], second,
                again_class.ran[2:], without_id(again.state), without_id(loaded),
                saved_methods(persistence, flow_id)[2:])

    result, starts, ran, second, ran_again, state, loaded, saved = differential(both, scenario)
    assert (result, second) == ("notified 50", "notified 500")
    assert starts == ["enrich", "intake"]
    assert ran == ["decide", "approve", "notify"]
    assert ran_again == ["decide", "escalate", "notify"]
    assert state == loaded
    assert state["amount"] == 500
    assert sorted(state["path"][:2]) == ["enrich", "intake"]
    assert state["path"][2:4] == ["approve", "notify"]
    assert sorted(state["path"][4:6]) == ["enrich", "intake"]
    assert state["path"][6:] == ["escalate", "notify"]
    assert saved[:3] == ["decide", "approve", "notify"]
    assert sorted(saved[3:5]) == ["enrich", "intake"]
    assert saved[5:] == ["decide", "escalate", "notify"]


# -- @human_feedback with emit, a loop, two feedback points ---------------------------------


ARTICLE_ANSWERS = ["rejected: too short", "approved, ship it", "yes, now"]


def check_article_ending(results: list[Any], state: dict[str, Any],
                         saved: list[str]) -> None:
    assert results == ["pending:review", "pending:review", "pending:publish",
                       "publishing About events (v2) [yes, now]"]
    assert state == {"id": "<id>", "topic": "events", "draft": "About events (v2)",
                     "revisions": 1, "answers": ARTICLE_ANSWERS, "live": True}
    assert saved == ["write", "review",                         # paused
                     "review", "revise", "review",              # rejected, looped, paused
                     "review", "publish",                       # approved, paused again
                     "publish", "go_live"]


def test_feedback_routes_on_its_outcome_through_a_loop_and_a_second_pause(
    both: dict[str, FlowPersistence],
) -> None:
    """A "rejected" answer routes to revise, which loops back and pauses the same step again;
    "approved" goes on to a second feedback point; every pause is resumed by a new flow object
    through from_pending, and a used pause cannot be resumed again."""

    def scenario(persistence: FlowPersistence) -> Any:
        flow_class = article_flow(persistence)
        flow = flow_class()
        paused = flow.kickoff(inputs={"topic": "events"})
        assert isinstance(paused, HumanFeedbackPending)
        flow_id = flow.state.id
        results: list[Any] = [f"pending:{paused.context.method_name}"]
        contexts, ran = [], [list(flow_class.ran)]
        for answer in ARTICLE_ANSWERS:
            resumer = article_flow(persistence)
            resumed = resumer.from_pending(flow_id, persistence)
            pending = resumed.pending_feedback
            assert pending is not None
            contexts.append((pending.method_name, pending.method_output, pending.emit,
                             pending.default_outcome, pending.llm, pending.metadata,
                             pending.message))
            result = resumed.resume(answer)
            results.append(f"pending:{result.context.method_name}"
                           if isinstance(result, HumanFeedbackPending) else result)
            ran.append(list(resumer.ran))
        with pytest.raises(ValueError, match="No pending feedback found"):
            article_flow(persistence).from_pending(flow_id, persistence)
        loaded = persistence.load_state(flow_id)
        return (results, contexts, ran, without_id(resumed.state), without_id(loaded),
                saved_methods(persistence, flow_id))

    results, contexts, ran, state, loaded, saved = differential(both, scenario)
    check_article_ending(results, state, saved)
    assert loaded == state
    assert ran == [["write", "review"], ["revise", "review"], ["publish"], ["go_live"]]
    review = ("Approve the draft?")
    assert contexts == [
        ("review", "About events", ["approved", "rejected"], "rejected", CLASSIFIER_MODEL,
         {"step": 1}, review),
        ("review", "About events (v2)", ["approved", "rejected"], "rejected", CLASSIFIER_MODEL,
         {"step": 1}, review),
        ("publish", "publishing About events (v2)", None, None, None, {}, "Go live now?")]


@pytest.mark.slow
def test_each_pause_is_resumed_in_another_process(
    url: str, tmp_path: Path, both: dict[str, FlowPersistence], children: Children,
) -> None:
    """The same flow, each of its three answers delivered by a process of its own (which opens
    its own persistence on each backend): the same outcome on both backends, and as
    in-process."""
    flow_ids: dict[str, str] = {}
    for name, persistence in both.items():
        flow = article_flow(persistence)()
        assert isinstance(flow.kickoff(inputs={"topic": "events"}), HumanFeedbackPending)
        flow_ids[name] = flow.state.id
    theirs = both["crewai"]
    assert isinstance(theirs, SQLiteFlowPersistence)

    reports = []
    for answer in ARTICLE_ANSWERS:
        q = CTX.Queue()
        proc = children.start(features.resume_article, str(tmp_path), theirs.db_path, url,
                              flow_ids, answer, q, context=CTX)
        (report,) = collect(q, [proc], 1, RESULT_TIMEOUT)
        assert report["network"] == []
        assert report["store"] == report["crewai"], answer
        reports.append(report["store"])

    assert [r["ran"] for r in reports] == [["revise", "review"], ["publish"], ["go_live"]]
    results = ["pending:review"] + [r["result"] for r in reports]
    for name, persistence in both.items():
        check_article_ending(results, reports[-1]["state"],
                             saved_methods(persistence, flow_ids[name]))
        assert without_id(persistence.load_state(flow_ids[name])) == reports[-1]["state"]


def test_an_empty_answer_takes_the_default_outcome_on_a_dict_state_flow(
    both: dict[str, FlowPersistence],
) -> None:
    """An empty answer needs no classifier: it routes to default_outcome.  A dict-state flow,
    resumed through from_pending, sees the state it paused with."""

    def build(persistence: FlowPersistence) -> Any:
        @crewai_persist(persistence)
        class Gate(KeywordClassifier, Flow[dict[str, Any]]):
            _skip_auto_memory = NO_MEMORY
            ran: ClassVar[list[str]] = []

            @start()
            @human_feedback(message="Let it through?", emit=["open", "closed"],
                            default_outcome="closed", llm=CLASSIFIER_MODEL,
                            provider=PauseProvider())
            def gate(self) -> str:
                self.ran.append("gate")
                self.state["asked"] = int(self.state.get("asked", 0)) + 1
                return f"visitor {self.state['who']}"

            @listen("open")
            def let_in(self, result: HumanFeedbackResult) -> str:
                self.ran.append("let_in")
                return f"in: {result.output}"

            @listen("closed")
            def turn_away(self, result: HumanFeedbackResult) -> str:
                self.ran.append("turn_away")
                self.state["outcome"] = result.outcome
                return f"away: {result.output}"

        return Gate

    def scenario(persistence: FlowPersistence) -> Any:
        flow = build(persistence)()
        assert isinstance(flow.kickoff(inputs={"id": "gate-1", "who": "ann"}),
                          HumanFeedbackPending)
        resumer = build(persistence)
        resumed = resumer.from_pending("gate-1", persistence)
        paused_state = dict(resumed.state)
        return (paused_state, resumed.resume(""), resumer.ran, dict(resumed.state),
                persistence.load_state("gate-1"), saved_methods(persistence, "gate-1"))

    paused, result, ran, state, loaded, saved = differential(both, scenario)
    assert paused == {"id": "gate-1", "who": "ann", "asked": 1}
    assert (result, ran) == ("away: visitor ann", ["turn_away"])
    assert state == loaded == {"id": "gate-1", "who": "ann", "asked": 1, "outcome": "closed"}
    assert saved == ["gate", "gate", "turn_away"]


def test_a_paused_flow_kicked_off_again_pauses_anew_and_is_resumed_once(
    both: dict[str, FlowPersistence],
) -> None:
    """Kicking off a paused flow by id runs it again from its start on the stored state and
    pauses anew (the new request replaces the open one): one resume finishes it, a second
    finds nothing."""

    def scenario(persistence: FlowPersistence) -> Any:
        flow = article_flow(persistence)()
        assert isinstance(flow.kickoff(inputs={"topic": "a"}), HumanFeedbackPending)
        flow_id = flow.state.id
        again = article_flow(persistence)()
        paused = again.kickoff(inputs={"id": flow_id, "topic": "b"})
        assert isinstance(paused, HumanFeedbackPending)
        resumed = article_flow(persistence).from_pending(flow_id, persistence)
        assert resumed.pending_feedback is not None
        output = resumed.pending_feedback.method_output
        result = resumed.resume("approved")
        # What is open now is the next step's request, not the replaced one:
        last = article_flow(persistence).from_pending(flow_id, persistence)
        assert last.pending_feedback is not None
        next_open = last.pending_feedback.method_name
        assert last.resume("yes") == "publishing About b [yes]"
        with pytest.raises(ValueError, match="No pending feedback found"):
            article_flow(persistence).from_pending(flow_id, persistence)
        return (output, f"pending:{result.context.method_name}", next_open,
                without_id(last.state), saved_methods(persistence, flow_id))

    output, result, next_open, state, saved = differential(both, scenario)
    assert (output, result, next_open) == ("About b", "pending:publish", "publish")
    assert state["answers"] == ["approved", "yes"]
    assert saved == ["write", "review", "write", "review", "review", "publish", "publish",
                     "go_live"]


# -- async flows ----------------------------------------------------------------------------


def test_async_flows_run_kicked_off_and_resumed_concurrently(
    both: dict[str, FlowPersistence],
) -> None:
    """Three flows with an async and a sync start (run at once, each saving), joined into an
    async feedback step with an async provider, kicked off together with kickoff_async and
    resumed together with resume_async."""

    async def scenario_async(persistence: FlowPersistence) -> Any:
        flow_class = join_flow(persistence)
        flows = [flow_class() for _ in range(3)]
        paused = await asyncio.gather(*(
            f.kickoff_async(inputs={"topic": f"t{i}"}) for i, f in enumerate(flows)))
        assert all(isinstance(p, HumanFeedbackPending) for p in paused)
        resumers = [join_flow(persistence).from_pending(f.state.id, persistence)
                    for f in flows]
        results = await asyncio.gather(*(
            r.resume_async(f"ok {i}") for i, r in enumerate(resumers)))
        saves = []
        for f, r in zip(flows, resumers, strict=True):
            methods = saved_methods(persistence, f.state.id)
            saves.append((sorted(methods[:2]), methods[2:]))
            assert persistence.load_state(f.state.id) == r.state.model_dump()
        return (sorted(flow_class.ran), results,
                [without_id(r.state) | {"parts": sorted(r.state.parts)} for r in resumers],
                saves)

    def scenario(persistence: FlowPersistence) -> Any:
        return asyncio.run(scenario_async(persistence))

    ran, results, states, saves = differential(both, scenario)
    assert ran == ["check"] * 3 + ["left"] * 3 + ["right"] * 3
    assert results == [f"t{i}: L+R [ok {i}]" for i in range(3)]
    assert states == [{"id": "<id>", "topic": f"t{i}", "parts": ["L", "R"],
                       "verdict": f"ok {i}"} for i in range(3)]
    assert saves == [(["left", "right"], ["check", "check", "done"])] * 3


# -- typed state ----------------------------------------------------------------------------


class Color(Enum):
    RED = "red"


class Level(IntEnum):
    HIGH = 2


class Tone(StrEnum):
    COLD = "cold"


class LineItem(BaseModel):
    sku: str
    price: Decimal
    added: datetime
    color: Color | None = None


class Address(BaseModel):
    city: str = ""
    geo: tuple[float, float] = (0.0, 0.0)


CEST = timezone(timedelta(hours=2))


class CommonLedgerState(FlowState):
    """Values both backends keep through every save: @persist's and a pause's."""

    when: datetime = datetime(2026, 5, 1, 9, 30, tzinfo=CEST)
    naive: datetime = datetime(2026, 5, 1, 9, 30)
    day: date = date(2026, 5, 1)
    at: time = time(8, 15)
    span: timedelta = timedelta(hours=1, seconds=3)
    amount: Decimal = Decimal("10.50")
    ref: uuid.UUID = uuid.UUID(int=7)
    level: Level = Level.HIGH
    tone: Tone = Tone.COLD
    items: list[LineItem] = Field(default_factory=list)
    address: Address = Field(default_factory=Address)
    by_id: dict[int, str] = Field(default_factory=dict)
    ids: set[int] = Field(default_factory=set)
    mode: Literal["a", "b"] = "a"
    runs: int = 0


class LedgerState(CommonLedgerState):
    """And values CrewAI's SQLite backend keeps through @persist's saves only (a pause saves
    the state's model_dump() there, which its JSON encoder writes with str(): "frozenset(...)",
    "Color.RED", "b'hi'", which do not validate back)."""

    tags: frozenset[str] = frozenset()
    blob: bytes = b""


class Approver:
    """A ``HumanFeedbackProvider`` that answers at once (the flow does not pause)."""

    def request_feedback(self, context: Any, flow: Flow[Any]) -> str:
        return "yes"


def ledger_flow(persistence: FlowPersistence, state: type[CommonLedgerState], *,
                enum_item: bool, pause: bool) -> Any:
    """Fills the typed state on its first run and notes what it saw each run; with ``pause``,
    then pauses for feedback."""

    @crewai_persist(persistence)
    class Ledger(Flow[state]):  # type: ignore[valid-type]
        _skip_auto_memory = NO_MEMORY
        seen: ClassVar[list[dict[str, Any]]] = []

        @start()
        def fill(self) -> int:
            self.seen.append(without_id(self.state))
            s = self.state
            s.runs += 1
            if not s.items:
                s.items = [LineItem(sku="a-1", price=Decimal("1.10"),
                                    added=datetime(2026, 1, 1, tzinfo=CEST),
                                    color=Color.RED if enum_item else None)]
                s.by_id = {1: "one", 20: "twenty"}
                s.ids = {3, 4}
                s.address = Address(city="Oslo", geo=(1.5, 2.5))
                if isinstance(s, LedgerState):
                    s.tags = frozenset({"t1"})
                    s.blob = b"hi"
            return s.runs

        @listen(fill)
        @human_feedback(message="Book it?", provider=PauseProvider() if pause else Approver())
        def book(self) -> int:
            return self.state.runs

        @listen(book)
        def booked(self, result: HumanFeedbackResult) -> str:
            self.seen.append(without_id(self.state))
            return f"booked {result.output}"

    return Ledger


def expected_ledger(state: type[CommonLedgerState], *, enum_item: bool,
                    runs: int) -> dict[str, Any]:
    extra = ({"tags": frozenset({"t1"}), "blob": b"hi"} if state is LedgerState else {})
    return state(
        id="<id>", runs=runs, by_id={1: "one", 20: "twenty"}, ids={3, 4},
        address=Address(city="Oslo", geo=(1.5, 2.5)),
        items=[LineItem(sku="a-1", price=Decimal("1.10"),
                        added=datetime(2026, 1, 1, tzinfo=CEST),
                        color=Color.RED if enum_item else None)], **extra).model_dump()


@pytest.mark.parametrize("enum_item", [False, True], ids=["typed-json", "pydantic-json"])
def test_a_typed_state_restored_by_id_is_the_same_to_the_flow(
    both: dict[str, FlowPersistence], enum_item: bool,
) -> None:
    """Datetimes (aware with their offset, naive), dates, times, timedeltas, decimals, UUIDs,
    int/str enums, nested models, a list of models, int dict keys, sets, a frozenset, bytes:
    a kickoff by id restores the same state on both backends.  With a plain Enum in a nested
    model the store keeps pydantic's JSON form, and the state validates back the same."""

    def scenario(persistence: FlowPersistence) -> Any:
        first = ledger_flow(persistence, LedgerState, enum_item=enum_item, pause=False)()
        first.kickoff()
        flow_id = first.state.id
        again_class = ledger_flow(persistence, LedgerState, enum_item=enum_item, pause=False)
        again = again_class()
        assert again.kickoff(inputs={"id": flow_id}) == "booked 2"
        loaded = persistence.load_state(flow_id)
        assert loaded is not None and LedgerState.model_validate(loaded) == again.state
        return again_class.seen[0], without_id(again.state)

    restored, final = differential(both, scenario)
    assert restored == expected_ledger(LedgerState, enum_item=enum_item, runs=1)
    assert final == expected_ledger(LedgerState, enum_item=enum_item, runs=2)
    assert restored["when"].utcoffset() == timedelta(hours=2)
    assert restored["naive"].tzinfo is None


def test_a_typed_state_paused_and_resumed_is_the_same_to_the_flow(
    both: dict[str, FlowPersistence],
) -> None:
    """The same through a pause: restored by a kickoff by id of the paused flow (its newest
    state is the pause's) and by from_pending, on both backends alike."""

    def scenario(persistence: FlowPersistence) -> Any:
        first = ledger_flow(persistence, CommonLedgerState, enum_item=False, pause=True)()
        assert isinstance(first.kickoff(), HumanFeedbackPending)
        flow_id = first.state.id
        again_class = ledger_flow(persistence, CommonLedgerState, enum_item=False, pause=True)
        assert isinstance(again_class().kickoff(inputs={"id": flow_id}), HumanFeedbackPending)
        resumer = ledger_flow(persistence, CommonLedgerState, enum_item=False, pause=True)
        resumed = resumer.from_pending(flow_id, persistence)
        assert resumed.resume("yes") == "booked 2"
        loaded = persistence.load_state(flow_id)
        assert loaded is not None and CommonLedgerState.model_validate(loaded) == resumed.state
        return again_class.seen[0], resumer.seen[0]

    restored, after_pause = differential(both, scenario)
    assert restored == expected_ledger(CommonLedgerState, enum_item=False, runs=1)
    assert after_pause == expected_ledger(CommonLedgerState, enum_item=False, runs=2)


def test_the_store_keeps_frozensets_enums_and_bytes_through_a_pause(
    ours: EventStoreFlowPersistence,
) -> None:
    """Where CrewAI's SQLite backend cannot bring back a paused state holding a frozenset, a
    plain Enum or bytes (see LedgerState), the store resumes it as it was."""
    first = ledger_flow(ours, LedgerState, enum_item=True, pause=True)()
    assert isinstance(first.kickoff(), HumanFeedbackPending)
    resumer = ledger_flow(ours, LedgerState, enum_item=True, pause=True)
    resumed = resumer.from_pending(first.state.id, ours)
    assert resumed.resume("yes") == "booked 1"
    assert resumer.seen == [expected_ledger(LedgerState, enum_item=True, runs=1)]


def test_a_dict_state_comes_back_with_its_types_on_the_store_only(
    both: dict[str, FlowPersistence],
) -> None:
    """README, "Two behaviours change": a dict state has no model to validate it back, so a
    restored dict-state flow sees the values load_state returns -- their types on the store,
    their JSON form on CrewAI's SQLite backend."""
    when = datetime(2026, 5, 1, tzinfo=UTC)

    def build(persistence: FlowPersistence) -> Any:
        @crewai_persist(persistence)
        class Loose(Flow[dict[str, Any]]):
            _skip_auto_memory = NO_MEMORY
            seen: ClassVar[list[dict[str, Any]]] = []

            @start()
            def step(self) -> None:
                self.seen.append(dict(self.state))
                self.state.update(when=when, amount=Decimal("1.5"), pair=(1, 2), by={1: "x"},
                                  ref=uuid.UUID(int=3))

        return Loose

    seen = {}
    for name, persistence in both.items():
        build(persistence)().kickoff(inputs={"id": "loose-1"})
        flow_class = build(persistence)
        flow_class().kickoff(inputs={"id": "loose-1"})
        seen[name] = flow_class.seen[0]
    assert seen["store"] == {"id": "loose-1", "when": when, "amount": Decimal("1.5"),
                             "pair": (1, 2), "by": {1: "x"}, "ref": uuid.UUID(int=3)}
    assert seen["crewai"] == {"id": "loose-1", "when": "2026-05-01T00:00:00+00:00",
                              "amount": "1.5", "pair": [1, 2], "by": {"1": "x"},
                              "ref": "00000000-0000-0000-0000-000000000003"}


# -- more of CrewAI's engine that goes through the persistence ------------------------------


class ForkState(FlowState):
    topic: str = ""
    n: int = 0
    answer: str = ""


def fork_flow(persistence: FlowPersistence) -> Any:
    @crewai_persist(persistence)
    class Forkable(Flow[ForkState]):
        _skip_auto_memory = NO_MEMORY

        @start()
        def a(self) -> None:
            self.state.n += 1
            if self.input_provider is not None:
                self.state.answer = self.ask("Which topic?") or ""

        @listen(a)
        def b(self) -> str:
            return f"{self.state.topic}:{self.state.n}:{self.state.answer}"

    return Forkable


class Answers:
    """An ``InputProvider`` for ``Flow.ask``: answers at once, noting the state saved by then."""

    def __init__(self) -> None:
        self.saved: list[dict[str, Any] | None] = []

    def request_input(self, message: str, flow: Flow[Any], metadata: Any = None) -> str:
        assert flow.persistence is not None
        self.saved.append(flow.persistence.load_state(flow.state.id))
        return f"answer to {message}"


def test_a_fork_starts_a_new_flow_from_another_s_state(
    both: dict[str, FlowPersistence],
) -> None:
    """kickoff(restore_from_state_id=...) hydrates a new flow (new id) from another flow's
    newest state; the source's history is left alone; an unknown source starts afresh."""

    def scenario(persistence: FlowPersistence) -> Any:
        source = fork_flow(persistence)()
        source.kickoff(inputs={"topic": "src"})
        fork = fork_flow(persistence)()
        result = fork.kickoff(inputs={"topic": "fork"}, restore_from_state_id=source.state.id)
        assert fork.state.id != source.state.id
        fresh = fork_flow(persistence)().kickoff(restore_from_state_id="no-such-flow")
        return (result, saved_methods(persistence, source.state.id),
                saved_methods(persistence, fork.state.id),
                without_id(persistence.load_state(fork.state.id)), fresh)

    result, source_saves, fork_saves, fork_state, fresh = differential(both, scenario)
    assert (result, fresh) == ("fork:2:", ":1:")
    assert source_saves == fork_saves == ["a", "b"]
    assert fork_state == {"id": "<id>", "topic": "fork", "n": 2, "answer": ""}


def test_ask_checkpoints_the_state_before_it_waits(both: dict[str, FlowPersistence]) -> None:
    """Flow.ask saves the state (as step "_ask_checkpoint") before it asks, so the provider
    -- or a process after a crash -- finds it in the persistence."""

    def scenario(persistence: FlowPersistence) -> Any:
        answers = Answers()
        flow = fork_flow(persistence)(input_provider=answers)
        result = flow.kickoff(inputs={"topic": "q"})
        return (result, saved_methods(persistence, flow.state.id),
                [without_id(s) for s in answers.saved])

    result, saves, saved_when_asked = differential(both, scenario)
    assert result == "q:1:answer to Which topic?"
    assert saves == ["_ask_checkpoint", "a", "b"]
    assert saved_when_asked == [{"id": "<id>", "topic": "q", "n": 1, "answer": ""}]


def test_a_persistence_given_to_the_instance_restores_and_pauses_without_persist(
    both: dict[str, FlowPersistence],
) -> None:
    """Flow(persistence=...) without @persist: no step is saved, but a kickoff by id restores
    what is there, and a pause is saved and resumed through it."""

    class Bare(Flow[ForkState]):
        _skip_auto_memory = NO_MEMORY

        @start()
        @human_feedback(message="Go?", provider=PauseProvider())
        def a(self) -> int:
            self.state.n += 1
            return self.state.n

        @listen(a)
        def b(self, result: HumanFeedbackResult) -> str:
            self.state.answer = result.feedback
            return f"{result.output}:{result.feedback}"

    def scenario(persistence: FlowPersistence) -> Any:
        persistence.save_state("bare-1", "seeded", {"id": "bare-1", "n": 10})
        flow = Bare(persistence=persistence)
        assert isinstance(flow.kickoff(inputs={"id": "bare-1"}), HumanFeedbackPending)
        resumed = Bare.from_pending("bare-1", persistence)
        result = resumed.resume("go")
        return (result, without_id(resumed.state), saved_methods(persistence, "bare-1"),
                without_id(persistence.load_state("bare-1")))

    result, state, saves, loaded = differential(both, scenario)
    assert result == "11:go"
    assert state == {"id": "<id>", "topic": "", "n": 11, "answer": "go"}
    assert saves == ["seeded", "a"]  # the pause; nothing after it (no @persist)
    assert loaded == {"id": "<id>", "topic": "", "n": 11, "answer": ""}


def test_the_default_persistence_factory_serves_bare_persist_and_from_pending(
    both: dict[str, FlowPersistence],
) -> None:
    """README step 1: registered with set_flow_persistence_factory, the backend serves a bare
    @persist() (bound when the class is defined), the pause of a flow without @persist, and
    from_pending(id) with no persistence."""

    def scenario(persistence: FlowPersistence) -> Any:
        set_flow_persistence_factory(lambda: persistence)
        try:
            @crewai_persist()
            class Defaulted(Flow[ForkState]):
                _skip_auto_memory = NO_MEMORY

                @start()
                def a(self) -> str:
                    self.state.n += 1
                    return "a"

            class Unpersisted(Flow[ForkState]):
                _skip_auto_memory = NO_MEMORY

                @start()
                @human_feedback(message="Go?", provider=PauseProvider())
                def a(self) -> int:
                    return 1

                @listen(a)
                def b(self, result: HumanFeedbackResult) -> str:
                    return f"b:{result.feedback}"

            defaulted = Defaulted()
            defaulted.kickoff(inputs={"topic": "d"})
            again = Defaulted()
            again.kickoff(inputs={"id": defaulted.state.id})
            paused = Unpersisted()
            assert isinstance(paused.kickoff(), HumanFeedbackPending)
            result = Unpersisted.from_pending(paused.state.id).resume("ok")
        finally:
            set_flow_persistence_factory(None)
        return (saved_methods(persistence, defaulted.state.id), again.state.n,
                saved_methods(persistence, paused.state.id), result)

    assert differential(both, scenario) == (["a", "a"], 2, ["a"], "b:ok")


# -- where the two backends store differently, and where the store once failed -----------


class NamesState(FlowState):
    names: list[str] = Field(default_factory=list)


def test_a_state_holding_a_lone_surrogate_is_saved_as_on_crewai_s_backend(
    both: dict[str, FlowPersistence],
) -> None:
    """A str with a lone surrogate is an ordinary Python value (a file name from os.listdir /
    os.fsdecode on undecodable bytes, surrogateescape; json.loads of a truncated "\\ud83d"
    escape).  CrewAI's SQLite backend saves and restores it, and so does the store (the store
    refused it once: @persist raised and the flow failed)."""

    def build(persistence: FlowPersistence) -> Any:
        @crewai_persist(persistence)
        class Lister(Flow[NamesState]):
            _skip_auto_memory = NO_MEMORY

            @start()
            def scan(self) -> int:
                self.state.names.append(b"caf\xe9.txt".decode("utf-8", "surrogateescape"))
                return len(self.state.names)

        return Lister

    outcome = {}
    for name, persistence in both.items():
        flow = build(persistence)()
        try:
            outcome[name] = (flow.kickoff(), without_id(persistence.load_state(flow.state.id)))
        except Exception as e:  # (the outcome compared is the failure)
            outcome[name] = (f"{type(e).__name__}: {e}", None)
    assert outcome["crewai"] == (1, {"id": "<id>", "names": ["caf\udce9.txt"]})
    assert outcome["store"] == outcome["crewai"]


def test_a_dict_state_holding_an_enum_is_stored_in_pydantic_s_json_form(
    both: dict[str, FlowPersistence],
) -> None:
    """README, "What is stored": a dict state holding a value type-keeping JSON cannot keep
    (an Enum) is stored in pydantic's JSON form (the member's value, so it validates back into
    an Enum field); CrewAI's SQLite backend writes such a dict with ``json.dumps`` and ``str()``
    (``"Color.RED"``), which the README names as a difference."""
    state = {"id": "enum-1", "color": Color.RED, "when": datetime(2026, 5, 1, tzinfo=UTC)}
    for persistence in both.values():
        persistence.save_state("enum-1", "step", state)
    assert both["crewai"].load_state("enum-1") == {
        "id": "enum-1", "color": "Color.RED", "when": "2026-05-01T00:00:00+00:00"}
    assert both["store"].load_state("enum-1") == {
        "id": "enum-1", "color": "red", "when": "2026-05-01T00:00:00Z"}
