"""CrewAI flow persistence on the store: the FlowPersistence contract and real CrewAI flows.

Every test runs on SQLite and PostgreSQL, offline: CrewAI's telemetry, tracing and version
check are switched off and a guard refuses (and the test then fails on) any connection or name
lookup that is not loopback, in this process and in the worker processes.  No flow calls a
model: the flows are deterministic and their human-feedback step has no ``emit``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import sqlite3
import threading
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum, StrEnum
from pathlib import Path, PurePosixPath

import pytest
from crewai.flow import HumanFeedbackPending, PendingFeedbackContext
from crewai.flow.flow import FlowState
from crewai.flow.persistence import SQLiteFlowPersistence
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from eventstore import EventStore, InvalidArgument, InvalidEvent, WrongExpectedVersion
from projections.crewai_persistence import EventStoreFlowPersistence, import_crewai_sqlite
from projections.errors import Conflict, NoPendingFeedback
from projections.events import FlowStateSaved
from projections.flows import Flows
from projections.typed_json import to_json
from tests import _crewai_workers
from tests._crewai_flows import (
    NO_MEMORY,
    STARTED_AT,
    CounterState,
    counter_flow,
    crewai_lock_files_in_tmp_path,  # noqa: F401 (an autouse fixture)
    no_network,  # noqa: F401 (an autouse fixture)
    review_flow,
)
from tests.conftest import Children, collect

# The racers come from a fork server that imported CrewAI once (some 7 s a process, three
# racers on each backend): still each a process of its own, forked from one that ran none of
# the tests' code.
CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["tests._crewai_workers"])
RACERS = 3
RESULT_TIMEOUT = 180.0


@pytest.fixture
def persistence(store: EventStore) -> EventStoreFlowPersistence:
    return EventStoreFlowPersistence(store)


def event_types(store: EventStore, flow_id: str) -> list[str]:
    return [e.type for e in store.read_stream(Flows.stream_id(flow_id))]


# -- the FlowPersistence contract -----------------------------------------------------------


def test_state_round_trips_and_load_returns_the_newest(
    persistence: EventStoreFlowPersistence, store: EventStore,
) -> None:
    """save_state takes a pydantic model or a dict; load_state returns the newest as a dict,
    with datetimes, sets and decimals as themselves; None for a flow that saved nothing."""
    assert persistence.load_state("f-1") is None
    model = CounterState(id="f-1", topic="billing", count=3, tags={"a", "b"},
                         started_at=STARTED_AT, budget=Decimal("19.990"))
    persistence.save_state("f-1", "begin", model)
    loaded = persistence.load_state("f-1")
    assert loaded == model.model_dump()
    assert CounterState.model_validate(loaded) == model

    persistence.save_state("f-1", "finish", {"id": "f-1", "when": STARTED_AT, "ids": {1, 2}})
    assert persistence.load_state("f-1") == {"id": "f-1", "when": STARTED_AT, "ids": {1, 2}}
    assert [h.method_name for h in Flows(store).history("f-1")] == ["begin", "finish"]
    assert event_types(store, "f-1") == ["FlowStateSaved", "FlowStateSaved"]


class Mood(Enum):
    CALM = "calm"


class ExoticState(FlowState):
    mood: Mood = Mood.CALM
    home: PurePosixPath = PurePosixPath("/srv/app")
    when: datetime = STARTED_AT


def test_state_json_cannot_type_is_stored_in_pydantic_json_form(
    persistence: EventStoreFlowPersistence, store: EventStore,
) -> None:
    """Values type-keeping JSON cannot hold (enums, paths) are stored the way CrewAI's SQLite
    backend stores them, and validate back into the model; unstorable state writes nothing."""
    state = ExoticState(id="f-3")
    persistence.save_state("f-3", "step", state)
    loaded = persistence.load_state("f-3")
    assert loaded == state.model_dump(mode="json")
    assert ExoticState.model_validate(loaded) == state

    with pytest.raises(InvalidArgument):
        persistence.save_state("f-4", "step", {"id": "f-4", "x": object()})
    cyclic: dict[str, object] = {"id": "f-4"}
    cyclic["self"] = cyclic
    with pytest.raises(InvalidEvent, match="nested deeper"):  # (was a RecursionError)
        persistence.save_state("f-4", "step", cyclic)
    with pytest.raises(InvalidArgument):
        persistence.save_state("f-4", "step", ["not", "a", "state"])  # type: ignore[arg-type]
    assert event_types(store, "f-4") == []


@pytest.mark.parametrize("enum_first", [True, False])
def test_a_state_too_deep_or_holding_itself_is_invalid_event_whatever_else_it_holds(
    persistence: EventStoreFlowPersistence, store: EventStore, enum_first: bool,
) -> None:
    """Nesting is refused with InvalidEvent also when the state holds a value only pydantic's
    JSON form can store (an Enum) and that value comes first, so that pydantic's form meets the
    nesting before the type-keeping form does (it raised InvalidArgument then)."""
    deep: object = 1
    for _ in range(300):
        deep = [deep]
    cyclic: list[object] = []
    cyclic.append(cyclic)
    for inner in (deep, cyclic):
        state = {"mood": Mood.CALM, "x": inner} if enum_first else {"x": inner, "mood": Mood.CALM}
        with pytest.raises(InvalidEvent):
            persistence.save_state("f-5", "step", {"id": "f-5", **state})
    assert event_types(store, "f-5") == []


class Tone(StrEnum):
    WARM = "warm"


class Score(float):
    """A float subclass, as numpy.float64 is."""


class ScoredState(FlowState):
    tone: Tone = Tone.WARM
    score: float = Score(0.93)  # (a default is not validated: it stays a Score)
    when: datetime = STARTED_AT


def test_state_with_subclasses_of_plain_values_keeps_its_other_types(
    persistence: EventStoreFlowPersistence,
) -> None:
    """A str enum or a float subclass (numpy.float64) in the state is stored as its plain
    value, as CrewAI's SQLite backend stores it, and the rest keeps its types (the whole save
    failed); the model validates back."""
    state = ScoredState(id="f-5")
    persistence.save_state("f-5", "step", state)
    loaded = persistence.load_state("f-5")
    assert loaded == {"id": "f-5", "tone": "warm", "score": 0.93, "when": STARTED_AT}
    assert ScoredState.model_validate(loaded) == state
    persistence.save_state("f-5", "step", {"score": Score(0.5), "tone": Tone.WARM})
    assert persistence.load_state("f-5") == {"score": 0.5, "tone": "warm"}


def pending_context(flow_id: str) -> PendingFeedbackContext:
    return PendingFeedbackContext(
        flow_id=flow_id, flow_class="app.flows.ReviewFlow", method_name="review",
        method_output={"draft": "text", "score": 0.5}, message="Publish?",
        emit=["approved", "rejected"], default_outcome="rejected", metadata={"channel": "#r"},
        llm="gpt-4o-mini", requested_at=datetime(2026, 5, 1, 10, 0), execution_uuid="exec-1",
        trace_context=(11, 22))


def test_pending_feedback_is_peeked_freely_and_claimed_once(
    persistence: EventStoreFlowPersistence, store: EventStore,
) -> None:
    """save_pending_feedback stores the context and state (also as the newest state);
    peek_pending_feedback reads without claiming; load_pending_feedback claims exactly once,
    and is None when there is nothing to claim (FlowPersistence's contract)."""
    assert persistence.load_pending_feedback("f-2") is None  # never paused
    assert persistence.peek_pending_feedback("f-2") is None

    context = pending_context("f-2")
    persistence.save_pending_feedback("f-2", context, {"id": "f-2", "draft": "text"})
    assert persistence.load_state("f-2") == {"id": "f-2", "draft": "text"}
    peeked = persistence.peek_pending_feedback("f-2")
    assert peeked == ({"id": "f-2", "draft": "text"}, context)
    assert persistence.peek_pending_feedback("f-2") == peeked

    assert persistence.load_pending_feedback("f-2") == peeked
    assert persistence.load_pending_feedback("f-2") is None  # claimed
    assert persistence.peek_pending_feedback("f-2") is None

    version = store.stream_version(Flows.stream_id("f-2"))
    persistence.clear_pending_feedback("f-2")  # after a claim: nothing left to clear
    persistence.clear_pending_feedback("never-paused")
    assert store.stream_version(Flows.stream_id("f-2")) == version
    assert event_types(store, "f-2") == ["FeedbackRequested", "FlowStateSaved",
                                         "FeedbackResolved"]
    resolved = list(store.read_stream(Flows.stream_id("f-2")))[-1].data
    assert resolved.feedback == {  # type: ignore[union-attr]
        "resumed_by": f"{socket.gethostname()}:{os.getpid()}"}


def test_clear_withdraws_an_open_request_and_tenants_are_apart(
    persistence: EventStoreFlowPersistence, store: EventStore,
) -> None:
    """clear_pending_feedback resolves an open request; another tenant sees none of it."""
    other = EventStoreFlowPersistence(store, tenant_id="other")
    persistence.save_pending_feedback("f-5", pending_context("f-5"), {"id": "f-5"})
    assert other.peek_pending_feedback("f-5") is None
    assert other.load_state("f-5") is None
    assert other.history("f-5") == []
    assert other.load_pending_feedback("f-5") is None
    other.clear_pending_feedback("f-5")
    assert persistence.peek_pending_feedback("f-5") is not None

    persistence.clear_pending_feedback("f-5")
    assert persistence.peek_pending_feedback("f-5") is None
    with pytest.raises(Conflict) as withdrawn:
        persistence.reopen_pending_feedback("f-5")  # withdrawn on purpose: not reopened
    assert withdrawn.value.reason == "resolved"
    assert persistence.load_pending_feedback("f-5") is None

    later = pending_context("f-5")  # the flow pauses again later: a new request to claim
    later.method_name = "second_review"
    persistence.save_pending_feedback("f-5", later, {"id": "f-5", "round": 2})
    assert persistence.load_pending_feedback("f-5") == ({"id": "f-5", "round": 2}, later)
    assert [h.method_name for h in Flows(store).history("f-5")] == ["review", "second_review"]


def test_concurrent_claims_in_one_process_exactly_one_wins(
    persistence: EventStoreFlowPersistence,
) -> None:
    """Eight threads claiming one request through one persistence: one gets it."""
    persistence.save_pending_feedback("f-6", pending_context("f-6"), {"id": "f-6"})
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def claim() -> None:
        barrier.wait()
        got = persistence.load_pending_feedback("f-6")
        outcomes.append("won" if got is not None else "lost")

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]


def test_opened_by_url_serializes_and_is_rebuilt_by_crewai(url: str) -> None:
    """Built from a URL it opens the store on first use; its JSON form (what CrewAI writes into
    flow checkpoints) rebuilds an equivalent persistence, through CrewAI's own registry."""
    persistence = EventStoreFlowPersistence(url, tenant_id="acme")
    try:
        dumped = persistence.model_dump(mode="json")
        assert dumped == {"persistence_type": "EventStoreFlowPersistence", "url": url,
                          "tenant_id": "acme"}
        persistence.init_db()
        persistence.save_state("f-7", "step", {"id": "f-7", "n": 1})

        flow = counter_flow(persistence)(persistence=dumped)
        rebuilt = flow.persistence
        assert isinstance(rebuilt, EventStoreFlowPersistence) and rebuilt is not persistence
        assert (rebuilt.url, rebuilt.tenant_id) == (url, "acme")
        assert rebuilt.load_state("f-7") == {"id": "f-7", "n": 1}
        rebuilt.close()
    finally:
        persistence.close()

    with EventStore.open(url) as store:
        from_store = EventStoreFlowPersistence(store)
        assert from_store.url == make_url(url).render_as_string(hide_password=True)
        assert from_store.load_state("f-7") is None  # tenant "default"
        from_store.close()  # a store passed in stays open
        assert store.stream_version(Flows.stream_id("f-7"), tenant_id="acme") == 1


@pytest.mark.parametrize("backend", ["postgres"])
def test_the_url_s_password_stays_out_of_what_crewai_serializes(url: str) -> None:
    """CrewAI writes ``Flow.persistence.model_dump()`` into its checkpoints: a URL's password
    is not in it (nor in repr), while this persistence still opens the store with it.  A
    persistence rebuilt from that JSON connects as the driver would without one (the test
    server trusts loopback; in production libpq's PGPASSWORD or ~/.pgpass)."""
    secret = "s3cr3t-pw"
    with_password = make_url(url).set(password=secret).render_as_string(hide_password=False)
    persistence = EventStoreFlowPersistence(with_password, tenant_id="acme")
    try:
        persistence.save_state("f-1", "step", {"id": "f-1", "n": 1})
        assert persistence.store.url.password == secret  # opened with the URL as given
        flow = counter_flow(persistence)()
        assert secret not in flow.model_dump_json() and secret not in repr(persistence)
        assert persistence.url == url
        rebuilt = counter_flow(persistence)(
            persistence=persistence.model_dump(mode="json")).persistence
        assert isinstance(rebuilt, EventStoreFlowPersistence)
        assert rebuilt.load_state("f-1") == {"id": "f-1", "n": 1}
        rebuilt.close()
    finally:
        persistence.close()
    by_keyword = EventStoreFlowPersistence(url=with_password)
    assert secret not in repr(by_keyword) and by_keyword.url == url
    for unescaped in (url.replace("postgres@", f"postgres:{secret}@x@"),  # "@" in the password
                      url.replace("postgres@", f"postgres:{secret}@x/y@")):  # and a "/"
        assert secret not in repr(EventStoreFlowPersistence(unescaped))
    head, database = url.rsplit("/", 1)
    for malformed in (f"{head}x/{database}?password={secret}",  # a port that is no number
                      f"{url}?password={secret}@x"):  # as an option, in a URL that fails
        dumped = EventStoreFlowPersistence(malformed).model_dump_json()
        assert secret not in dumped, dumped
    as_option = EventStoreFlowPersistence(f"{url}?password={secret}")  # a password option
    assert secret not in repr(as_option) and as_option.url == url
    assert as_option.load_state("f-1") is None  # (tenant "default"): it connects
    as_option.close()
    # Set after construction: by assignment, or on a copy (no __init__ there).
    assigned = EventStoreFlowPersistence("sqlite:///unused.db", tenant_id="acme")
    assigned.url = with_password
    copied = EventStoreFlowPersistence("sqlite:///unused.db", tenant_id="acme").model_copy(
        update={"url": with_password})
    for later in (assigned, copied):
        assert secret not in repr(later) and secret not in later.model_dump_json()
        assert later.load_state("f-1") == {"id": "f-1", "n": 1}  # the URL set, not the first
        later.close()


def test_a_store_opened_on_first_use_is_closed_if_the_facade_fails(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening the store lazily, then failing to build the Flows facade on it (a database
    error), closes that store: no connection is left for the garbage collector."""
    import projections.crewai_persistence as module

    opened: list[EventStore] = []
    real_open = EventStore.open

    def recording_open(*args: object, **kwargs: object) -> EventStore:
        opened.append(real_open(*args, **kwargs))  # type: ignore[arg-type]
        return opened[-1]

    def failing_flows(store: EventStore) -> Flows:
        raise InvalidArgument("no facade today")

    monkeypatch.setattr(module.EventStore, "open", recording_open)
    monkeypatch.setattr(module, "Flows", failing_flows)
    persistence = EventStoreFlowPersistence(url)
    for _ in range(2):
        with pytest.raises(InvalidArgument, match="no facade today"):
            persistence.save_state("f-1", "step", {"n": 1})
    assert len(opened) == 2 and all(s._closed for s in opened)
    monkeypatch.undo()
    persistence.save_state("f-1", "step", {"n": 1})  # and it opens once it can
    assert persistence.load_state("f-1") == {"n": 1}
    persistence.close()


def test_importing_from_a_missing_or_foreign_file_is_a_typed_error(
        tmp_path: Path, persistence: EventStoreFlowPersistence) -> None:
    """The CrewAI SQLite file to import from is missing, or not a SQLite database: a typed
    error (they were sqlite3's own), and nothing is written."""
    from eventstore.errors import DatabaseError

    with pytest.raises(InvalidArgument, match="no CrewAI SQLite database"):
        import_crewai_sqlite(tmp_path / "missing.db", persistence)
    with pytest.raises(InvalidArgument, match="no CrewAI SQLite database"):
        import_crewai_sqlite(tmp_path, persistence)  # a directory
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a database, " * 100)
    with pytest.raises(DatabaseError, match="not a database"):
        import_crewai_sqlite(foreign, persistence)
    assert persistence.store.last_position() == 0


# -- real CrewAI flows ----------------------------------------------------------------------


def test_flow_state_is_saved_after_each_step(
    persistence: EventStoreFlowPersistence, store: EventStore,
) -> None:
    """A @persist flow runs; the store holds its state after begin and after finish."""
    flow = counter_flow(persistence)()
    assert flow.kickoff(inputs={"topic": "billing"}) == "billing:1"
    flow_id = flow.state.id
    history = Flows(store).history(flow_id)
    assert [h.method_name for h in history] == ["begin", "finish"]
    assert [h.state["steps"] for h in history] == [["begin"], ["begin", "finish"]]
    assert history[-1].state["tags"] == {"billing"}
    assert history[-1].state["started_at"] == STARTED_AT
    assert history[-1].state["budget"] == Decimal("0.10")
    assert persistence.load_state(flow_id) == flow.state.model_dump()


def test_flow_is_restored_by_id_with_new_inputs_overriding(
    persistence: EventStoreFlowPersistence, store: EventStore,
) -> None:
    """kickoff(inputs={"id": ..., ...}) on a new instance restores the stored state, the new
    inputs override their fields, the rest is kept, and the run goes on from there."""
    first = counter_flow(persistence)()
    first.kickoff(inputs={"topic": "billing"})
    flow_id = first.state.id

    again = counter_flow(persistence)()
    assert again.kickoff(inputs={"id": flow_id, "topic": "refunds"}) == "refunds:2"
    state = again.state
    assert state.id == flow_id
    assert state.topic == "refunds"
    assert state.count == 2
    assert state.steps == ["begin", "finish", "begin", "finish"]
    assert state.tags == {"billing", "refunds"}
    assert state.started_at == STARTED_AT
    assert state.budget == Decimal("0.20")
    assert [h.method_name for h in persistence.history(flow_id)] == [
        "begin", "finish", "begin", "finish"]
    assert persistence.load_state(flow_id) == state.model_dump()


def test_a_misspelt_argument_is_refused_not_dropped(store: EventStore) -> None:
    """``EventStoreFlowPersistence(store, tenant="acme")`` was made without a word (pydantic
    drops unknown fields) and saved every flow in the default tenant; it is refused now."""
    with pytest.raises(InvalidArgument, match=r"unknown argument.*tenant"):
        EventStoreFlowPersistence(store, tenant="acme")
    assert EventStoreFlowPersistence(store, tenant_id="acme").tenant_id == "acme"


def test_an_integer_flow_id_is_kept_as_crewai_s_sqlite_backend_keeps_it(
    persistence: EventStoreFlowPersistence, tmp_path: Path,
) -> None:
    """An unstructured flow started with ``inputs={"id": 42}`` runs and is restored by that
    id, on the store as on CrewAI's own SQLite backend (which stores the id as the text
    ``42``); the persistence used to refuse the integer with InvalidArgument."""
    from crewai.flow.flow import Flow, start
    from crewai.flow.persistence import persist

    def counting(backend: object) -> type[Flow[dict[str, object]]]:
        @persist(backend)  # type: ignore[arg-type]
        class Counting(Flow[dict[str, object]]):
            _skip_auto_memory = NO_MEMORY

            @start()
            def step(self) -> object:
                self.state["n"] = int(self.state.get("n", 0)) + 1  # type: ignore[call-overload]
                return self.state["n"]
        return Counting

    theirs = SQLiteFlowPersistence(str(tmp_path / "crewai.db"))
    for backend in (theirs, persistence):
        flow = counting(backend)
        assert [flow().kickoff(inputs={"id": 42}) for _ in range(2)] == [1, 2]
        assert backend.load_state(42) == {"id": 42, "n": 2}  # type: ignore[arg-type]
    assert persistence.load_state("42") == {"id": 42, "n": 2}
    assert [h.method_name for h in persistence.history(42)] == ["step", "step"]  # type: ignore[arg-type]


@pytest.mark.slow
def test_paused_flow_is_resumed_from_another_process_exactly_once(
    url: str, store: EventStore, persistence: EventStoreFlowPersistence, children: Children,
) -> None:
    """The flow pauses for asynchronous feedback; three other processes race to resume it with
    their own answers: exactly one runs the rest of the flow, the others find nothing to claim
    (from_pending's ValueError) before writing anything, and the store holds the winner's
    outcome only."""
    flow = review_flow(persistence)()
    paused = flow.kickoff(inputs={"topic": "eventstore"})
    assert isinstance(paused, HumanFeedbackPending)
    assert paused.callback_info == {"ticket": f"review-{flow.state.id}"}
    flow_id = flow.state.id
    pending = persistence.peek_pending_feedback(flow_id)
    assert pending is not None
    state, context = pending
    assert state["draft"] == "Draft about eventstore" and state["published"] == ""
    assert (context.flow_id, context.method_name, context.method_output, context.message,
            context.metadata) == (flow_id, "review", "Draft about eventstore",
                                  "Publish this draft?", {"channel": "#reviews"})
    assert context.flow_class.endswith("ReviewFlow")
    assert persistence.load_state(flow_id) == state
    assert event_types(store, flow_id) == ["FlowStateSaved", "FeedbackRequested",
                                           "FlowStateSaved"]

    barrier = CTX.Barrier(RACERS)
    q = CTX.Queue()
    procs = [children.start(_crewai_workers.resume_racer, url, flow_id, f"approved by {i}",
                            barrier, q, context=CTX)
             for i in range(RACERS)]
    reports = collect(q, procs, RACERS, RESULT_TIMEOUT)

    assert all(r["network"] == [] for r in reports), reports
    won = [r for r in reports if r["outcome"] == "won"]
    lost = [r for r in reports if r["outcome"] == "lost"]
    assert len(won) == 1 and len(lost) == RACERS - 1, reports
    assert {r["reason"] for r in lost} == {f"No pending feedback found for flow_id: {flow_id}"}
    winner = won[0]
    assert winner["pid"] != os.getpid()
    published = f"Draft about eventstore [{winner['feedback']}]"
    assert winner["result"] == published
    assert winner["state"]["published_by"] == winner["pid"]

    final = persistence.load_state(flow_id)
    assert final == winner["state"]
    assert final is not None and final["published"] == published
    assert [h.method_name for h in Flows(store).history(flow_id)] == [
        "draft", "review", "review", "publish"]
    assert event_types(store, flow_id) == [
        "FlowStateSaved", "FeedbackRequested", "FlowStateSaved",   # paused
        "FeedbackResolved", "FlowStateSaved", "FlowStateSaved"]    # claimed once, went on
    resolved = list(store.read_stream(Flows.stream_id(flow_id)))[3].data
    assert resolved.feedback == {  # type: ignore[union-attr]
        "resumed_by": f"{socket.gethostname()}:{winner['pid']}"}

    with pytest.raises(ValueError, match="No pending feedback"):
        review_flow(persistence).from_pending(flow_id, persistence)


def test_a_claimed_but_abandoned_resume_can_be_reopened(
    persistence: EventStoreFlowPersistence, store: EventStore,
) -> None:
    """A resumer that claimed the request and died leaves no open request; reopening it lets
    one more resumer finish the flow, once."""
    with pytest.raises(NoPendingFeedback) as never:
        persistence.reopen_pending_feedback("nope")
    assert never.value.reason == "none"
    assert isinstance(never.value, ValueError)  # what CrewAI documents for from_pending

    review = review_flow(persistence)
    flow = review()
    assert isinstance(flow.kickoff(inputs={"topic": "ops"}), HumanFeedbackPending)
    flow_id = flow.state.id
    with pytest.raises(Conflict) as still_open:
        persistence.reopen_pending_feedback(flow_id)
    assert still_open.value.reason == "pending"

    abandoned = review.from_pending(flow_id, persistence)  # claimed; its process "dies" here
    assert abandoned.pending_feedback is not None
    assert persistence.peek_pending_feedback(flow_id) is None

    context = persistence.reopen_pending_feedback(flow_id)
    assert context == abandoned.pending_feedback
    resumed = review.from_pending(flow_id, persistence)
    assert resumed.resume("ship it") == "Draft about ops [ship it]"
    assert resumed.state.published == "Draft about ops [ship it]"

    with pytest.raises(Conflict) as progressed:
        persistence.reopen_pending_feedback(flow_id)
    assert progressed.value.reason == "progressed"
    assert [h.method_name for h in Flows(store).history(flow_id)] == [
        "draft", "review", "review", "publish"]


def test_a_persistence_given_an_async_store_or_another_object_says_what_it_takes(
        url: str) -> None:
    """An AsyncEventStore (or anything but a store or a URL) is refused with InvalidArgument
    naming what it takes (pydantic's ValidationError said the url should be a string)."""
    import asyncio

    from eventstore.aio import AsyncEventStore

    async def refused() -> None:
        async with await AsyncEventStore.open(url) as astore:
            with pytest.raises(InvalidArgument, match="takes an EventStore or a database URL, "
                                                      "not AsyncEventStore"):
                EventStoreFlowPersistence(astore)  # type: ignore[arg-type]

    asyncio.run(refused())
    with pytest.raises(InvalidArgument, match="not int"):
        EventStoreFlowPersistence(3)  # type: ignore[arg-type]
    by_url = EventStoreFlowPersistence(make_url(url))  # a SQLAlchemy URL, as EventStore.open
    try:
        by_url.save_state("f-url", "step", {"n": 1})
        assert by_url.load_state("f-url") == {"n": 1}
    finally:
        by_url.close()


def test_a_tenant_the_store_cannot_hold_is_refused_before_any_flow_runs(
        store: EventStore) -> None:
    """An empty, over-long or NUL-holding tenant id, or one that is not a string, is refused
    with InvalidArgument when the persistence is made or given it (it was taken, and the
    flow's first step ran before its state could not be saved)."""
    for bad in ("", "x" * 300, "a\x00b", 5):
        with pytest.raises(InvalidArgument, match="tenant id"):
            EventStoreFlowPersistence(store, tenant_id=bad)  # type: ignore[arg-type]
    persistence = EventStoreFlowPersistence(store, tenant_id="acme")
    with pytest.raises(InvalidArgument, match="tenant id"):
        persistence.tenant_id = ""
    assert persistence.tenant_id == "acme"


def test_an_import_goes_on_past_flows_the_store_refuses(
    tmp_path: Path, persistence: EventStoreFlowPersistence, store: EventStore,
) -> None:
    """A flow the store cannot take (a state over the event size limit, an id over 200
    characters) is reported in ``failed`` with why, writes nothing, and the flows after it
    are imported (the import stopped at it, every time it was run again)."""
    db = tmp_path / "flow_states.db"
    legacy = SQLiteFlowPersistence(str(db))
    legacy.save_state("f-ok-1", "begin", {"n": 1})
    legacy.save_state("f-big", "begin", {"n": 1})
    legacy.save_state("f-big", "grow", {"blob": "x" * 1_200_000})
    legacy.save_state("f" * 201, "begin", {"n": 1})
    legacy.save_state("f-ok-2", "begin", {"n": 2})

    for run in range(2):
        result = import_crewai_sqlite(db, persistence)
        done = ["f-ok-1", "f-ok-2"]
        assert (result.imported, result.skipped) == ((done, []) if run == 0 else ([], done))
        assert sorted(result.failed) == sorted(["f" * 201, "f-big"])
        assert result.failed["f-big"].startswith("EventTooLarge: ")
        assert "longer than 200 characters" in result.failed["f" * 201]
    assert persistence.load_state("f-ok-2") == {"n": 2}
    assert store.stream_version(Flows.stream_id("f-big")) == 0
    # What refuses every flow is raised at once, not reported once per flow.
    with pytest.raises(InvalidArgument, match="tenant id"):
        import_crewai_sqlite(db, EventStoreFlowPersistence(store, tenant_id="t" * 300))


def test_an_import_goes_on_past_rows_it_cannot_read(
    tmp_path: Path, persistence: EventStoreFlowPersistence, store: EventStore,
) -> None:
    """Rows another tool wrote into CrewAI's table (an integer timestamp, one past the datetime
    range in UTC, a state that is not JSON or is nested too deep to decode): that flow is named
    in ``failed`` with InvalidArgument and writes nothing; the others are imported."""
    db = tmp_path / "flow_states.db"
    SQLiteFlowPersistence(str(db)).save_state("f-ok-1", "begin", {"n": 1})
    when = "2026-01-01T00:00:00+00:00"
    bad = {"f-int-time": ("m", 1_700_000_000, "{}"),
           "f-overflow": ("m", "9999-12-31T23:59:59-05:00", "{}"),
           "f-not-json": ("m", when, "{n: 1"),
           "f-deep": ("m", when, "[" * 100_000 + "]" * 100_000)}
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany("INSERT INTO flow_states (flow_uuid, method_name, timestamp, "
                         "state_json) VALUES (?, ?, ?, ?)",
                         [(flow, *row) for flow, row in bad.items()])
    SQLiteFlowPersistence(str(db)).save_state("f-ok-2", "begin", {"n": 2})
    result = import_crewai_sqlite(db, persistence)
    assert result.imported == ["f-ok-1", "f-ok-2"]
    assert sorted(result.failed) == sorted(bad)
    assert all(why.startswith("InvalidArgument: ") for why in result.failed.values())
    assert all(store.stream_version(Flows.stream_id(flow)) == 0 for flow in bad)
    assert persistence.load_state("f-ok-2") == {"n": 2}


def test_flows_of_crewai_sqlite_backend_are_imported_and_go_on_here(
    tmp_path: Path, persistence: EventStoreFlowPersistence, store: EventStore,
) -> None:
    """import_crewai_sqlite copies what CrewAI's SQLiteFlowPersistence stored -- every saved
    state and the pending request -- once; the imported flows are then restored and resumed
    from the store."""
    db = tmp_path / "flow_states.db"
    legacy = SQLiteFlowPersistence(str(db))
    counter = counter_flow(legacy)()
    counter.kickoff(inputs={"topic": "old"})
    paused = review_flow(legacy)()
    assert isinstance(paused.kickoff(inputs={"topic": "legacy"}), HumanFeedbackPending)
    counter_id, review_id = counter.state.id, paused.state.id

    result = import_crewai_sqlite(db, persistence)
    assert sorted(result.imported) == sorted([counter_id, review_id])
    assert (result.skipped, result.states, result.pending) == ([], 4, 1)
    for flow_id in (counter_id, review_id):
        assert persistence.load_state(flow_id) == legacy.load_state(flow_id)
    assert persistence.peek_pending_feedback(review_id) == legacy.load_pending_feedback(review_id)
    assert [h.method_name for h in Flows(store).history(counter_id)] == ["begin", "finish"]
    assert [h.method_name for h in Flows(store).history(review_id)] == ["draft", "review"]

    again = import_crewai_sqlite(db, persistence)
    assert again.imported == [] and sorted(again.skipped) == sorted([counter_id, review_id])

    restored = counter_flow(persistence)()
    assert restored.kickoff(inputs={"id": counter_id, "topic": "new"}) == "new:2"
    assert restored.state.started_at == STARTED_AT and restored.state.tags == {"old", "new"}
    resumed = review_flow(persistence).from_pending(review_id, persistence)
    assert resumed.resume("ok") == "Draft about legacy [ok]"
    assert legacy.load_pending_feedback(review_id) is not None  # the SQLite file is untouched


ME = f"{socket.gethostname()}:{os.getpid()}"


def _last_feedback(store: EventStore, flow_id: str, tenant_id: str = "default") -> object:
    return list(store.read_stream(Flows.stream_id(flow_id), tenant_id=tenant_id))[-1].data


def test_clear_records_who_withdrew_the_request(
    persistence: EventStoreFlowPersistence, store: EventStore,
) -> None:
    """clear_pending_feedback on an open request appends one FeedbackResolved recording
    ``cleared_by`` (host:pid), not ``resumed_by``: a withdrawal is not a claim."""
    persistence.save_pending_feedback("f-c", pending_context("f-c"), {"id": "f-c"})
    persistence.clear_pending_feedback("f-c")
    assert event_types(store, "f-c") == ["FeedbackRequested", "FlowStateSaved",
                                         "FeedbackResolved"]
    assert _last_feedback(store, "f-c").feedback == {"cleared_by": ME}  # type: ignore[attr-defined]


def test_reopen_works_in_the_persistence_s_own_tenant(store: EventStore) -> None:
    """A claimed-but-abandoned request of a flow in tenant "acme" is reopened in "acme" (and
    claimable there again); the same flow id in the default tenant is not touched."""
    acme = EventStoreFlowPersistence(store, tenant_id="acme")
    default = EventStoreFlowPersistence(store)
    context = pending_context("f-t")
    acme.save_pending_feedback("f-t", context, {"id": "f-t", "n": 1})
    assert acme.load_pending_feedback("f-t") is not None  # claimed; the resumer "dies"

    assert acme.reopen_pending_feedback("f-t") == context
    assert acme.peek_pending_feedback("f-t") == ({"id": "f-t", "n": 1}, context)
    assert store.stream_version(Flows.stream_id("f-t")) == 0  # default tenant: nothing
    with pytest.raises(NoPendingFeedback) as none:
        default.reopen_pending_feedback("f-t")
    assert none.value.reason == "none"
    assert acme.load_pending_feedback("f-t") == ({"id": "f-t", "n": 1}, context)


def test_reopen_decides_again_when_the_stream_moved_under_it(
    persistence: EventStoreFlowPersistence, store: EventStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process saves a step (the slow resumer went on) between reopen's read and its
    append: the append conflicts, reopen reads again and refuses with reason "progressed"; it
    does not reopen a request whose resume went on."""
    context = pending_context("f-r")
    persistence.save_pending_feedback("f-r", context, {"id": "f-r"})
    assert persistence.load_pending_feedback("f-r") is not None
    real_append = store.append
    calls: list[int] = []

    def racing_append(stream_id, events, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:  # the slow resumer saves its next step first
            real_append(stream_id, [_saved("f-r")],
                        tenant_id=kw.get("tenant_id", "default"))
        return real_append(stream_id, events, **kw)

    monkeypatch.setattr(store, "append", racing_append)
    with pytest.raises(Conflict) as moved:
        persistence.reopen_pending_feedback("f-r")
    assert moved.value.reason == "progressed"
    monkeypatch.undo()
    assert event_types(store, "f-r") == ["FeedbackRequested", "FlowStateSaved",
                                         "FeedbackResolved", "FlowStateSaved"]
    assert persistence.peek_pending_feedback("f-r") is None


def _saved(flow_id: str) -> object:
    return FlowStateSaved(flow_id=flow_id, method_name="publish", state=to_json({"id": flow_id}),
                          at=datetime(2026, 5, 1, tzinfo=UTC))


def test_reopen_gives_up_with_the_conflict_after_its_attempts(
    persistence: EventStoreFlowPersistence, store: EventStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When every append conflicts, reopen retries a bounded number of times (50) and then
    raises the last WrongExpectedVersion (not an AssertionError, not silently returning),
    writing nothing."""
    persistence.save_pending_feedback("f-x", pending_context("f-x"), {"id": "f-x"})
    assert persistence.load_pending_feedback("f-x") is not None
    version = store.stream_version(Flows.stream_id("f-x"))
    attempts: list[int] = []

    def always_conflicts(stream_id, events, **kw):  # type: ignore[no-untyped-def]
        attempts.append(kw["expected_version"])
        raise WrongExpectedVersion(stream_id=stream_id, tenant_id=kw.get("tenant_id", "default"),
                                   expected=kw["expected_version"], actual=version + 1)

    monkeypatch.setattr(store, "append", always_conflicts)
    with pytest.raises(WrongExpectedVersion):
        persistence.reopen_pending_feedback("f-x")
    monkeypatch.undo()
    assert attempts == [version] * 50
    assert store.stream_version(Flows.stream_id("f-x")) == version


def test_a_claim_that_finds_nothing_logs_why(
    persistence: EventStoreFlowPersistence,
) -> None:
    """load_pending_feedback returning None logs crewai_feedback_not_claimed (debug) with the
    tenant, flow id and reason: "none" for a flow that never paused, "resolved" once claimed,
    as its docstring says."""
    persistence.save_pending_feedback("f-l", pending_context("f-l"), {"id": "f-l"})
    assert persistence.load_pending_feedback("f-l") is not None
    with capture_logs() as logs:
        assert persistence.load_pending_feedback("never") is None
        assert persistence.load_pending_feedback("f-l") is None
    lines = [(e["tenant"], e["flow_id"], e["reason"], e["log_level"]) for e in logs
             if e["event"] == "crewai_feedback_not_claimed"]
    assert lines == [("default", "never", "none", "debug"),
                     ("default", "f-l", "resolved", "debug")]


def test_a_pause_with_an_unusable_method_name_is_refused_naming_it(
    persistence: EventStoreFlowPersistence, store: EventStore,
) -> None:
    """A PendingFeedbackContext whose method_name the store cannot hold (empty, NUL) is
    refused with InvalidArgument naming method_name, and nothing is written."""
    for bad in ("", "re\x00view"):
        context = pending_context("f-m")
        context.method_name = bad
        with pytest.raises(InvalidArgument, match=r"^method_name "):
            persistence.save_pending_feedback("f-m", context, {"id": "f-m"})
    assert event_types(store, "f-m") == []


def test_a_boolean_flow_id_is_refused_not_taken_as_text(
    persistence: EventStoreFlowPersistence, store: EventStore,
) -> None:
    """Integer flow ids are kept as their digits (CrewAI's SQLite backend does so), but a bool
    (an int subclass) is no flow id: refused with InvalidArgument, not stored as "True"."""
    with pytest.raises(InvalidArgument):
        persistence.save_state(True, "step", {"n": 1})  # type: ignore[arg-type]
    assert store.stream_version(Flows.stream_id("True")) == 0
    persistence.save_state(7, "step", {"n": 1})  # type: ignore[arg-type]
    assert persistence.load_state("7") == {"n": 1}


def test_with_no_argument_it_opens_eventstore_url_and_close_closes_it(
    url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """EventStoreFlowPersistence() (what CrewAI's registry may build) opens EVENTSTORE_URL on
    first use, serializes url as None, and close() closes the store it opened (a later use
    opens a new one)."""
    monkeypatch.setenv("EVENTSTORE_URL", url)
    persistence = EventStoreFlowPersistence()
    assert persistence.model_dump(mode="json")["url"] is None
    persistence.save_state("f-env", "step", {"n": 1})
    opened = persistence.store
    persistence.close()
    assert opened._closed
    assert persistence.load_state("f-env") == {"n": 1}  # opens again
    again = persistence.store
    assert again is not opened
    persistence.close()
    assert again._closed
    with EventStore.open(url) as store:
        assert Flows(store).load("f-env") == {"n": 1}


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_url_assigned_later_is_opened_with_its_password_and_kept_without_it(url: str) -> None:
    """persistence.url = <URL with password> after construction: the field holds the URL
    without the password (it is what CrewAI serializes), and the store is opened with the
    password (the existing test only checks that it connects, which a loopback server that
    trusts every connection allows without one)."""
    secret = "s3cr3t-pw"
    with_password = make_url(url).set(password=secret).render_as_string(hide_password=False)
    persistence = EventStoreFlowPersistence("sqlite:///unused.db", tenant_id="acme")
    persistence.url = with_password
    try:
        assert persistence.url == url
        assert persistence.store.url.password == secret
    finally:
        persistence.close()


def test_a_malformed_url_is_refused_on_first_use_not_replaced_by_the_default_store(
    tmp_path, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """A URL that is no database URL (a port that is no number) keeps a masked form in
    ``url`` and is refused (InvalidArgument) when the store is first needed; the persistence
    does not fall back to EVENTSTORE_URL or ./eventstore.db and write the flow there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EVENTSTORE_URL", raising=False)
    persistence = EventStoreFlowPersistence("postgresql+psycopg://u:pw@127.0.0.1:notaport/db")
    assert persistence.url is not None and "notaport" in persistence.url
    assert "pw" not in persistence.url
    with pytest.raises(InvalidArgument, match="not a database URL"):
        persistence.save_state("f-1", "step", {"n": 1})
    assert list(tmp_path.iterdir()) == []


def test_an_imported_row_without_a_timestamp_gets_the_import_time(
    tmp_path, persistence: EventStoreFlowPersistence,  # type: ignore[no-untyped-def]
) -> None:
    """A CrewAI SQLite row whose timestamp is empty (written by another tool) is imported with
    the time of the import, as an aware UTC datetime."""
    db = tmp_path / "flow_states.db"
    SQLiteFlowPersistence(str(db)).save_state("f-ok", "begin", {"n": 1})
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("INSERT INTO flow_states (flow_uuid, method_name, timestamp, state_json) "
                     "VALUES ('f-blank', 'm', '', '{\"n\": 2}')")
        conn.execute("INSERT INTO flow_states (flow_uuid, method_name, timestamp, state_json) "
                     "VALUES ('f-naive', 'm', '2026-01-01T10:00:00', '{}')")
    before = datetime.now(UTC)
    result = import_crewai_sqlite(db, persistence)
    after = datetime.now(UTC)
    assert sorted(result.imported) == ["f-blank", "f-naive", "f-ok"] and result.failed == {}
    (saved,) = persistence.history("f-blank")
    assert saved.state == {"n": 2} and before <= saved.at <= after
    (naive,) = persistence.history("f-naive")  # a naive timestamp is taken as UTC
    assert naive.at == datetime(2026, 1, 1, 10, 0, tzinfo=UTC) and naive.at.tzinfo is not None


def test_an_import_goes_into_the_persistence_s_tenant(
    tmp_path, store: EventStore,  # type: ignore[no-untyped-def]
) -> None:
    """import_crewai_sqlite(db, EventStoreFlowPersistence(store, tenant_id="acme")) writes the
    flows into tenant "acme" (checked up front, used for every flow), not the default one."""
    db = tmp_path / "flow_states.db"
    SQLiteFlowPersistence(str(db)).save_state("f-1", "begin", {"n": 1})
    acme = EventStoreFlowPersistence(store, tenant_id="acme")
    result = import_crewai_sqlite(db, acme)
    assert (result.imported, result.states, result.pending) == (["f-1"], 1, 0)
    assert acme.load_state("f-1") == {"n": 1}
    assert EventStoreFlowPersistence(store).load_state("f-1") is None
    assert import_crewai_sqlite(db, acme).skipped == ["f-1"]


def test_a_store_and_another_url_are_refused(url: str, tmp_path: Path) -> None:
    """Given a store and ``url=`` naming another database, the persistence kept that URL (its
    password too): what CrewAI's checkpoints then named was not where the flows were.  It is
    refused now; the store's own URL is taken, and is what is serialized."""
    with EventStore.open(url) as store:
        with pytest.raises(InvalidArgument, match="not the store's URL"):
            EventStoreFlowPersistence(
                store, url=f"sqlite:///{tmp_path / 'other.db'}")
        with pytest.raises(InvalidArgument, match="not the store's URL"):
            EventStoreFlowPersistence(store, url="postgresql+psycopg://app:s3cret@db.example/app")
        same = EventStoreFlowPersistence(store, url=str(store.url))
        assert same.model_dump()["url"] == EventStoreFlowPersistence(store).model_dump()["url"]
        assert "s3cret" not in repr(same)
