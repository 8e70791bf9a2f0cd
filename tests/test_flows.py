"""Flow state: save, load, history, typed round trips and feedback."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import threading
import uuid
from decimal import Decimal

import pytest

from eventstore import EventStore, InvalidArgument, InvalidEvent
from eventstore.aio import AsyncEventStore
from projections import load_row, query_rows, registered, status
from projections.errors import NoPendingFeedback
from projections.flows import FlowProjection, Flows
from projections.typed_json import from_json, to_json
from tests._clock import Clock
from tests._events import NoteAdded


@pytest.fixture
def flows(store: EventStore) -> Flows:
    return Flows(store, clock=Clock())


def test_save_and_load_latest(flows: Flows) -> None:
    """load returns the state of the last completed step; history lists every step."""
    assert flows.load("f1") is None
    flows.save("f1", "start", {"step": 1})
    flows.save("f1", "next", {"step": 2})
    assert flows.load("f1") == {"step": 2}
    assert [(h.method_name, h.state) for h in flows.history("f1")] == [
        ("start", {"step": 1}), ("next", {"step": 2})]


def test_typed_state_round_trips_equal(flows: Flows) -> None:
    """Datetimes, times, timedeltas, UUIDs, decimals, sets, tuples, infinities and non-string
    keys come back equal."""
    state = {
        "when": dt.datetime(2026, 5, 1, 10, 30, tzinfo=dt.UTC),
        "naive": dt.datetime(2026, 5, 1, 10, 30),
        "day": dt.date(2026, 5, 1),
        "id": uuid.uuid4(),
        "price": Decimal("19.990"),
        "tags": {"a", "b"},
        "frozen": frozenset({1, 2}),
        "pair": (1, "x"),
        "by_int": {1: "one", 2: "two"},
        "raw": b"\x00\xff",
        "nested": [{"$type": "not a tag"}, {"s": {dt.date(2020, 1, 1)}}],
        "inf": float("inf"),
        "-inf": float("-inf"),
        "took": dt.timedelta(days=-1, seconds=1, microseconds=250_000),
        "at": dt.time(9, 30, 15, 500),
        "at_utc": dt.time(9, 30, tzinfo=dt.UTC),
    }
    flows.save("f1", "step", state)
    assert flows.load("f1") == state
    assert flows.history("f1")[0].state == state


def test_times_of_a_named_zone_come_back_in_that_zone(flows: Flows) -> None:
    """A datetime of a ZoneInfo zone loads back in that zone, so it compares equal also in a
    repeated hour (Python never finds a time of that hour equal to one of another zone, its
    fixed offset included) and at a wall time the zone skips (times of one zone compare by wall
    time: the same instant at 03:30 is not equal to 02:30); a fixed offset stays one."""
    from datetime import datetime, timedelta, timezone
    from zoneinfo import ZoneInfo

    paris = ZoneInfo("Europe/Paris")
    times = [datetime(2024, 6, 1, 12, 0, tzinfo=paris),
             datetime(2024, 10, 27, 2, 30, tzinfo=paris),  # the hour that comes twice
             datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=paris),
             datetime(2024, 3, 31, 2, 30, tzinfo=paris),  # the hour that never comes
             datetime(2024, 3, 31, 2, 30, fold=1, tzinfo=paris),
             datetime(2024, 10, 27, 2, 30, tzinfo=timezone(timedelta(hours=5)))]
    flows.save("f-tz", "step", {"times": times})
    back = flows.load("f-tz")["times"]
    assert back == times
    assert [t.tzinfo for t in back] == [paris] * 5 + [timezone(timedelta(hours=5))]
    assert [(t.hour, t.minute, t.utcoffset()) for t in back] == \
        [(t.hour, t.minute, t.utcoffset()) for t in times]
    assert [t.fold for t in back[1:5]] == [0, 1, 0, 1]
    # The range's edges in a zone, where converting to the zone overflows ("no deadline").
    edges = [datetime.max.replace(tzinfo=ZoneInfo("America/New_York")),
             datetime.min.replace(tzinfo=ZoneInfo("Asia/Tokyo"))]
    flows.save("f-tz", "edges", {"edges": edges})
    assert flows.load("f-tz")["edges"] == edges
    assert [t.tzinfo for t in flows.load("f-tz")["edges"]] == [t.tzinfo for t in edges]
    assert flows.history("f-tz")[-1].state == {"edges": edges}


def test_typed_state_keeps_each_value_s_exact_type(flows: Flows) -> None:
    """Bools stay bools, sets stay sets (not frozensets), decimals keep their digits, and
    keys of any type (mixed with strings, tuples, dates) come back as they were."""
    state = {"flag": True, "off": False, "tags": {"a"}, "frozen": frozenset({"b"}),
             "price": Decimal("19.990"), "precise": Decimal("0.1000000000000000000001"),
             "mixed": {"a": 1, 2: "b"}, "keyed": {(1, 2): "pair", dt.date(2020, 1, 1): "day"},
             "blob": b"\x00", "buffer": bytearray(b"\x01")}
    flows.save("f1", "step", state)
    loaded = flows.load("f1")
    assert loaded == {**state, "buffer": b"\x01"}
    assert {k: type(v) for k, v in loaded.items()} == {
        "flag": bool, "off": bool, "tags": set, "frozen": frozenset, "price": Decimal,
        "precise": Decimal, "mixed": dict, "keyed": dict, "blob": bytes, "buffer": bytes}
    assert [str(loaded["price"]), str(loaded["precise"])] == ["19.990",
                                                              "0.1000000000000000000001"]
    assert [type(k) for k in loaded["mixed"]] == [str, int]


def test_strings_with_lone_surrogates_come_back_as_they_were(flows: Flows) -> None:
    """A str UTF-8 cannot hold (a file name os.fsdecode read with surrogateescape, a cut
    surrogate pair) is kept, as a value, a key, in a set or tuple, in a request's context and
    state and in its answer; other non-ASCII text is stored as plain JSON text."""
    name = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    cut = "\ud83d"
    state = {"files": [name, "ok.txt"], name: cut, "seen": {cut, "x"}, "pair": (cut, 1),
             "label": Label.SPAM, "plain": "caf\u00e9 \U0001f600", "keyed": {cut: 1, 2: name}}
    flows.save("f1", "scan", state)
    assert flows.load("f1") == {**state, "label": "spam"}
    assert flows.history("f1")[-1].state == {**state, "label": "spam"}
    flows.request_feedback("f1", {"message": f"rename {name}?"}, {"files": [name]})
    pending = flows.pending_feedback("f1")
    assert pending is not None and pending.context == {"message": f"rename {name}?"}
    assert pending.state == {"files": [name]}
    assert flows.resolve_feedback("f1", cut).state == {"files": [name]}
    answer = list(flows.store.read_stream(Flows.stream_id("f1")))[-1].data
    assert from_json(answer.feedback) == cut  # type: ignore[attr-defined]
    assert to_json({"plain": "caf\u00e9"}) == {"plain": "caf\u00e9"}
    assert to_json(name) != name  # a wrapper, as for the types JSON does not have


def test_equal_sets_are_stored_as_equal_json() -> None:
    # 8 and 16 share a hash slot: the two sets iterate in their insertion order
    assert list({8, 16}) != list({16, 8})
    assert to_json({8, 16}) == to_json({16, 8})
    assert to_json(frozenset({"b", "a"})) == to_json(frozenset({"a", "b"}))


def test_a_time_of_a_zone_this_machine_cannot_load_comes_back_at_its_offset(
        flows: Flows, store: EventStore) -> None:
    from eventstore import RawEvent

    at = {"$type": "datetime", "value": "2026-01-01T12:00:00+02:00"}
    state = {"unknown": {**at, "zone": "Mars/Olympus_Mons"}, "bad": {**at, "zone": "../x"}}
    store.append(Flows.stream_id("f"), [RawEvent(type="FlowStateSaved", data={
        "flow_id": "f", "at": "2026-01-01T00:00:00+00:00", "method_name": "m", "state": state})])
    noon = dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    loaded = flows.load("f")
    assert loaded == {"unknown": noon, "bad": noon}
    assert [v.utcoffset() for v in loaded.values()] == [dt.timedelta(hours=2)] * 2


def test_a_pydantic_model_in_state_is_stored_as_its_fields(flows: Flows) -> None:
    import pydantic

    class Step(pydantic.BaseModel):
        n: int
        on: dt.date

    flows.save("f1", "step", {"step": Step(n=1, on=dt.date(2026, 1, 1))})
    assert flows.load("f1") == {"step": {"n": 1, "on": dt.date(2026, 1, 1)}}


def test_unstorable_state_is_rejected(flows: Flows, store: EventStore) -> None:
    """A value that cannot be stored raises InvalidArgument and writes nothing."""
    with pytest.raises(InvalidArgument):
        flows.save("f1", "step", {"x": object()})
    assert store.stats()["events"] == 0


class Score(float):
    """A float subclass, as numpy.float64 is."""


class Label(enum.StrEnum):
    SPAM = "spam"


class Level(enum.IntEnum):
    HIGH = 3


def test_subclasses_of_plain_values_are_stored_as_those_values(flows: Flows) -> None:
    """A float, str or int subclass (numpy.float64, a str or int enum) is stored as its plain
    value, as JSON would hold it (the store's encoder refused the state)."""
    flows.save("f1", "step", {"score": Score(0.93), "label": Label.SPAM, "level": Level.HIGH,
                              "nan": Score("nan"), "in": [Score(1.5)]})
    loaded = flows.load("f1")
    assert loaded is not None
    assert {k: (v, type(v)) for k, v in loaded.items() if k not in ("nan", "in")} == {
        "score": (0.93, float), "label": ("spam", str), "level": (3, int)}
    assert loaded["nan"] != loaded["nan"] and loaded["in"] == [1.5]


def test_state_too_deep_or_holding_itself_is_a_typed_error(flows: Flows,
                                                          store: EventStore) -> None:
    """Nesting past what the store takes, or a state that holds itself, raises InvalidEvent
    (it was a RecursionError) and writes nothing."""
    deep: object = 1
    for _ in range(600):
        deep = [deep]
    cyclic: dict[str, object] = {"a": 1}
    cyclic["self"] = cyclic
    for state in ({"v": deep}, cyclic, {"t": (cyclic,)}):
        with pytest.raises(InvalidEvent, match="nested deeper"):
            flows.save("f1", "step", state)
    assert store.stats()["events"] == 0


def test_state_saved_from_a_deep_stack_is_refused_with_a_typed_error(flows: Flows,
                                                                     store: EventStore) -> None:
    """State within the nesting limit, saved with too little stack left to walk it, is an
    InvalidEvent too (not RecursionError), and writes nothing."""
    import sys

    deep: object = 1
    for _ in range(200):
        deep = [deep]

    def save_at(depth: int) -> None:
        if depth:
            save_at(depth - 1)
        else:
            flows.save("f1", "step", {"v": deep})

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(400)
    try:
        with pytest.raises(InvalidEvent, match="stack"):
            save_at(150)
    finally:
        sys.setrecursionlimit(limit)
    assert store.stats()["events"] == 0
    flows.save("f1", "step", {"v": deep})  # from a shallow stack it is stored
    assert flows.load("f1") == {"v": deep}


def test_feedback_request_and_resolve(flows: Flows) -> None:
    """A pending request is visible until resolved; resolving twice is refused."""
    assert flows.pending_feedback("f1") is None
    flows.request_feedback("f1", {"question": "ok?"}, {"draft": "text"})
    pending = flows.pending_feedback("f1")
    assert pending is not None and pending.context == {"question": "ok?"}
    assert pending.state == {"draft": "text"}
    resolved = flows.resolve_feedback("f1", "approved")
    assert resolved.context == {"question": "ok?"}
    assert flows.pending_feedback("f1") is None
    with pytest.raises(NoPendingFeedback):
        flows.resolve_feedback("f1", "again")
    flows.request_feedback("f1", {"question": "first"}, {"draft": 1})
    flows.request_feedback("f1", {"question": "second"}, {"draft": 2})  # replaces the open one
    pending = flows.pending_feedback("f1")
    assert pending is not None and (pending.context, pending.state) == (
        {"question": "second"}, {"draft": 2})
    assert flows.resolve_feedback("f1", "ok").context == {"question": "second"}
    assert flows.pending_feedback("f1") is None


def test_concurrent_resolutions_exactly_one_wins(flows: Flows) -> None:
    """Of six threads resolving the same request, exactly one succeeds."""
    flows.request_feedback("f1", "ctx", {"s": 1})
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def resolve(i: int) -> None:
        barrier.wait()
        try:
            flows.resolve_feedback("f1", f"answer {i}")
            outcomes.append("won")
        except NoPendingFeedback:
            outcomes.append("lost")

    threads = [threading.Thread(target=resolve, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost"] * 5 + ["won"]


def test_flows_are_per_tenant(flows: Flows) -> None:
    """Another tenant sees neither state nor feedback."""
    flows.save("f1", "s", {"a": 1}, tenant_id="t1")
    flows.request_feedback("f1", "c", {}, tenant_id="t1")
    assert flows.load("f1", tenant_id="t2") is None
    assert flows.pending_feedback("f1", tenant_id="t2") is None
    with pytest.raises(NoPendingFeedback):
        flows.resolve_feedback("f1", "x", tenant_id="t2")


def test_a_request_resolved_with_no_answer_still_counts_as_resolved(flows: Flows) -> None:
    """Resolving with ``None`` (an answer may be empty) is a resolution: a second attempt says
    ``resolved``, not ``none`` (which means the flow never asked)."""
    with pytest.raises(NoPendingFeedback) as never:
        flows.resolve_feedback("f-none", None)
    assert never.value.reason == "none"
    flows.request_feedback("f-none", {"q": "ok?"}, {})
    flows.resolve_feedback("f-none", None)
    with pytest.raises(NoPendingFeedback) as again:
        flows.resolve_feedback("f-none", "late")
    assert again.value.reason == "resolved"


MALFORMED = [{"$type": "uuid", "value": "not-a-uuid"}, {"$type": "datetime"},
             {"$type": "timedelta", "value": 5}, {"$type": "decimal", "value": "1.2.3"},
             {"$type": "set", "value": [[1]]}, {"$type": "no-such-type", "value": 1},
             {"$type": "uuid", "value": 5}]


def test_feedback_and_its_context_with_a_malformed_typed_value_are_refused_at_append(
        store: EventStore) -> None:
    from eventstore import RawEvent

    at = "2026-01-01T00:00:00+00:00"
    stream = Flows.stream_id("f")
    for event in (RawEvent(type="FeedbackResolved", data={"flow_id": "f", "at": at,
                                                          "feedback": [MALFORMED[0]]}),
                  RawEvent(type="FeedbackRequested", data={"flow_id": "f", "at": at,
                                                           "context": MALFORMED[0],
                                                           "state": {}})):
        with pytest.raises(InvalidEvent, match="malformed typed value"):
            store.append(stream, [event])
    assert store.stream_version(stream) == 0


@pytest.mark.parametrize("bad", MALFORMED, ids=["uuid", "no-value", "timedelta", "decimal",
                                                "unhashable", "unknown", "uuid-int"])
def test_a_malformed_typed_value_is_refused_at_append_and_typed_at_read(
        flows: Flows, store: EventStore, bad: dict[str, object],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A flow event appended as raw JSON whose state holds a ``$type`` value the flow facade
    would not have written is refused (InvalidEvent, nothing written); one stored before that
    check reads back from the log as it is (other readers go on), and the flow facade says
    EventDecodeError (naming the event for history), not a bare ValueError/KeyError/TypeError."""
    from eventstore import EventDecodeError, RawEvent
    from projections import events as flow_events

    def raw(kind: str, **fields: object) -> RawEvent:
        return RawEvent(type=kind, data={"flow_id": "f", "at": "2026-01-01T00:00:00+00:00",
                                         **fields})

    stream = Flows.stream_id("f")
    saved = raw("FlowStateSaved", method_name="m", state={"x": bad})
    asked = raw("FeedbackRequested", context={"q": 1}, state=[bad])
    for event in (saved, asked):
        with pytest.raises(InvalidEvent, match="malformed typed value"):
            store.append(stream, [event])
    assert store.stream_version(stream) == 0
    # Stored before the check (an older release): typed errors when read.
    monkeypatch.setattr(flow_events, "check_typed", lambda value, what: None)
    store.append(stream, [saved, asked])
    monkeypatch.undo()
    assert [e.type for e in store.read_all()] == ["FlowStateSaved", "FeedbackRequested"]
    with pytest.raises(EventDecodeError) as got:
        flows.history("f")
    assert got.value.position is not None and got.value.stream_id == stream
    with pytest.raises(EventDecodeError, match="malformed typed value"):
        flows.load("f")
    with pytest.raises(EventDecodeError, match="malformed typed value"):
        flows.pending_feedback("f")


def test_the_flows_row_lists_flows_awaiting_feedback_and_is_cleared_on_resolution(
    store: EventStore,
) -> None:
    """The "flows" projection row is what an application queries to list the flows waiting for
    a human (query_rows(status="awaiting_feedback")): it holds the open request while it is
    open, and once resolved the flow is "running" again with the request cleared, the answer
    kept and the resolution counted."""
    clock = Clock()
    flows = Flows(store, clock=clock)
    flows.save("f1", "start", {"n": 1})
    asked_at = clock.advance(minutes=1)
    flows.request_feedback("f1", {"q": "ok?"}, {"n": 1})
    flows.save("f2", "start", {"n": 2})
    projection = FlowProjection()

    waiting = query_rows(store, projection, tenant_id="default", status="awaiting_feedback")
    assert [(stream, version) for _t, stream, _s, version in waiting] == [("flow-f1", 2)]
    row = waiting[0][2]
    assert (row.flow_id, row.method_name, row.saves, row.feedback_pending) == (
        "f1", "start", 1, True)
    assert (row.feedback_context, row.feedback_state, row.feedback_requested_at) == (
        to_json({"q": "ok?"}), to_json({"n": 1}), asked_at)
    running = query_rows(store, projection, tenant_id="default", status="running")
    assert [stream for _t, stream, _s, _v in running] == ["flow-f2"]

    flows.resolve_feedback("f1", {"answer": "yes"})
    assert query_rows(store, projection, tenant_id="default", status="awaiting_feedback") == []
    loaded = load_row(store, projection, "default", Flows.stream_id("f1"))
    assert loaded is not None
    row, version = loaded
    assert version == 3
    assert (row.feedback_pending, row.feedback_context, row.feedback_state,
            row.feedback_requested_at) == (False, None, None, None)
    assert (row.last_feedback, row.resolutions, row.saves) == (to_json({"answer": "yes"}), 1, 1)
    flows.save("f1", "finish", {"n": 3})
    row = load_row(store, projection, "default", Flows.stream_id("f1"))[0]  # type: ignore[index]
    assert (row.saves, row.method_name, row.saved_at) == (2, "finish", asked_at)


def test_a_feedback_request_lands_in_its_tenant(flows: Flows) -> None:
    """request_feedback(tenant_id="t1") opens the request in t1 -- visible and resolvable
    there -- and in no other tenant, the default one included (the existing per-tenant test
    only checks that t2 sees nothing, which a request written to the default tenant passes)."""
    flows.request_feedback("f1", {"q": 1}, {"s": 1}, tenant_id="t1")
    assert flows.pending_feedback("f1") is None
    pending = flows.pending_feedback("f1", tenant_id="t1")
    assert pending is not None and (pending.context, pending.state) == ({"q": 1}, {"s": 1})
    assert flows.resolve_feedback("f1", "ok", tenant_id="t1").context == {"q": 1}
    with pytest.raises(NoPendingFeedback):
        flows.resolve_feedback("f1", "ok")


def test_a_flow_lives_in_the_stream_flow_dash_id_and_the_flows_projection_is_registered(
    flows: Flows, store: EventStore,
) -> None:
    """The stream name ``flow-<flow id>`` (the module docstring's contract, which data written
    by earlier releases and CrewAI imports depend on) and the projection's name "flows",
    registered so ``eventstore projections rebuild flows`` finds it."""
    assert Flows.stream_id("f1") == "flow-f1"
    flows.save("f1", "start", {"n": 1})
    assert [(e.stream_id, e.type) for e in store.read_all()] == [("flow-f1", "FlowStateSaved")]
    assert "flows" in registered() and isinstance(registered()["flows"](), FlowProjection)
    assert [s.name for s in status(store, "flows")] == ["flows"]


def test_flows_refuses_an_async_store_naming_the_async_twin(url: str) -> None:
    """Flows(AsyncEventStore) is refused with InvalidArgument pointing at AsyncFlows, and
    something that is no store at all is refused too."""

    async def refused() -> None:
        async with await AsyncEventStore.open(url) as astore:
            with pytest.raises(InvalidArgument, match="AsyncFlows"):
                Flows(astore)  # type: ignore[arg-type]

    asyncio.run(refused())
    with pytest.raises(InvalidArgument, match="takes an EventStore"):
        Flows(object())  # type: ignore[arg-type]


def test_an_event_of_another_kind_in_a_flow_stream_is_ignored(
    flows: Flows, store: EventStore,
) -> None:
    """An event the flow fold does not know, appended to a flow stream (another tool, a later
    release's event type), leaves the flow's state and pending request as they were."""
    flows.save("f1", "start", {"n": 1})
    flows.request_feedback("f1", {"q": 1}, {"n": 1})
    store.append(Flows.stream_id("f1"), [NoteAdded(text="annotated by an operator")])
    assert flows.load("f1") == {"n": 1}
    pending = flows.pending_feedback("f1")
    assert pending is not None and pending.context == {"q": 1}
    assert flows.resolve_feedback("f1", "ok").state == {"n": 1}
