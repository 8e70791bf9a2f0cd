"""Conversation variables: assign, reset, delete, get, time travel and history."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from eventstore import EventStore, IdempotencyKeyReused, InvalidArgument, WrongExpectedVersion
from eventstore.store import DEFAULT_TENANT
from projections import ConversationProjection, Conversations
from projections.events import VariablesAssigned, VariablesDeleted, VariableValue
from tests._events import NoteAdded


class Clock:
    """A settable clock for the store's recorded_at."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def conv_store(url: str, clock: Clock) -> EventStore:
    s = EventStore.open(url, clock=clock)
    yield s  # type: ignore[misc]
    s.close()


@pytest.fixture
def conversations(conv_store: EventStore) -> Conversations:
    return Conversations(conv_store)


def test_assign_upserts_variables(conversations: Conversations) -> None:
    """A second assign overwrites existing variables and keeps the others."""
    v = conversations.assign("c-42", {"count": 1, "topic": "billing"}, tenant_id="acme",
                             workflow_run_id="run-7", node_id="assigner-1")
    assert v == 1
    assert conversations.assign("c-42", {"count": 2}, tenant_id="acme", expected_version=v) == 2
    state = conversations.get("c-42", tenant_id="acme")
    assert state.variables == {"count": 2, "topic": "billing"}
    assert state.version == 2
    assert state.value_types == {"count": "integer", "topic": "string"}


def test_assign_is_one_event_with_names_values_types_and_origin(
        conversations: Conversations, conv_store: EventStore) -> None:
    """A batch assign appends exactly one VariablesAssigned with run and node."""
    conversations.assign("c-1", {"a": 1, "b": [1, 2], "c": None, "d": {"x": 1.5}},
                         workflow_run_id="run-1", node_id="node-1")
    (ev,) = conv_store.read_stream("conversation-c-1")
    assert isinstance(ev.data, VariablesAssigned)
    assert [(v.name, v.value, v.value_type) for v in ev.data.variables] == [
        ("a", 1, "integer"), ("b", [1, 2], "array"), ("c", None, "null"),
        ("d", {"x": 1.5}, "object")]
    assert (ev.data.workflow_run_id, ev.data.node_id) == ("run-1", "node-1")


def test_read_modify_write_race_has_one_winner(conversations: Conversations) -> None:
    """Two writers that both read count=0 and write count+1: exactly one succeeds."""
    conversations.assign("c-1", {"count": 0})
    state = conversations.get("c-1")
    barrier = threading.Barrier(2)
    results: list[str] = []

    def bump() -> None:
        barrier.wait()
        try:
            conversations.assign("c-1", {"count": state.variables["count"] + 1},
                                 expected_version=state.version)
            results.append("ok")
        except WrongExpectedVersion:
            results.append("conflict")

    threads = [threading.Thread(target=bump) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["conflict", "ok"]
    assert conversations.get("c-1").variables == {"count": 1}


def test_reset_and_delete_are_events(conversations: Conversations,
                                     conv_store: EventStore) -> None:
    """Reset puts defaults back, delete removes; both are recorded as events."""
    conversations.assign("c-1", {"count": 5, "topic": "x", "tmp": True})
    conversations.reset("c-1", {"count": 0})
    conversations.delete("c-1", ["tmp"])
    assert conversations.get("c-1").variables == {"count": 0, "topic": "x"}
    assert [e.type for e in conv_store.read_stream("conversation-c-1")] == [
        "VariablesAssigned", "VariablesReset", "VariablesDeleted"]
    conversations.delete("c-1", "topic")  # one name, not its letters
    assert conversations.get("c-1").variables == {"count": 0}


def test_a_retry_with_the_same_variables_in_another_order_is_a_duplicate(
        conversations: Conversations, conv_store: EventStore) -> None:
    """An idempotent retry rebuilt from another copy of the same mapping (keys in another
    order: a JSON request parsed again) gets the first answer back, and writes nothing."""
    c = conversations
    assert c.assign("c-1", {"a": 1, "b": 2, "c": 3}, idempotency_key="k1") == 1
    assert c.assign("c-1", {"c": 3, "a": 1, "b": 2}, idempotency_key="k1") == 1
    assert c.reset("c-1", {"b": 0, "a": 0}, idempotency_key="k2") == 2
    assert c.reset("c-1", {"a": 0, "b": 0}, idempotency_key="k2") == 2
    assert c.delete("c-1", ["c", "a"], idempotency_key="k3") == 3
    assert c.delete("c-1", ["a", "c"], idempotency_key="k3") == 3
    assert conv_store.stream_version("conversation-c-1") == 3
    assert c.get("c-1").variables == {"b": 0}
    with pytest.raises(IdempotencyKeyReused):  # other values are still another request
        c.assign("c-1", {"c": 3, "a": 2, "b": 2}, idempotency_key="k1")
    with pytest.raises(IdempotencyKeyReused):  # also in name order
        c.assign("c-1", {"a": 2, "b": 2, "c": 3}, idempotency_key="k1")


def test_a_retry_of_a_key_recorded_in_the_calls_own_order_is_still_a_duplicate(
        conversations: Conversations, conv_store: EventStore) -> None:
    """Releases before name order recorded variables in the mapping's order: the same call
    retried across the upgrade still gets its first answer back, and writes nothing."""
    c = conversations
    conv_store.append("conversation-c-1", [VariablesAssigned(conversation_id="c-1", variables=[
        VariableValue(name="b", value=2, value_type="integer"),
        VariableValue(name="a", value=1, value_type="integer")])], idempotency_key="k1")
    conv_store.append("conversation-c-1", [VariablesDeleted(
        conversation_id="c-1", names=["b", "a"])], idempotency_key="k2")
    assert c.assign("c-1", {"b": 2, "a": 1}, idempotency_key="k1") == 1
    assert c.delete("c-1", ["b", "a"], idempotency_key="k2") == 2
    assert conv_store.stream_version("conversation-c-1") == 2
    with pytest.raises(IdempotencyKeyReused):  # other values: another request, as before
        c.assign("c-1", {"b": 3, "a": 1}, idempotency_key="k1")
    assert conv_store.stream_version("conversation-c-1") == 2


@pytest.mark.parametrize("names", [5, None, [""], [3]])
def test_delete_refuses_names_that_are_not_variable_names(conversations: Conversations,
                                                          conv_store: EventStore,
                                                          names: Any) -> None:
    from eventstore import InvalidArgument

    with pytest.raises(InvalidArgument):
        conversations.delete("c-1", names)
    assert list(conv_store.read_all()) == []


def test_get_at_version_and_at_time(conversations: Conversations, clock: Clock) -> None:
    """Time travel by version and by time returns the past variables."""
    t0 = clock.now
    conversations.assign("c-1", {"count": 1})
    clock.now = t0 + timedelta(minutes=5)
    conversations.assign("c-1", {"count": 2, "topic": "billing"})
    clock.now = t0 + timedelta(minutes=10)
    conversations.delete("c-1", ["topic"])
    assert conversations.get("c-1", at_version=1).variables == {"count": 1}
    assert conversations.get("c-1", at_version=2).variables == {"count": 2, "topic": "billing"}
    assert conversations.get("c-1", at_time=t0 + timedelta(minutes=1)).variables == {"count": 1}
    assert conversations.get("c-1", at_time=t0 + timedelta(minutes=7)).version == 2
    assert conversations.get("c-1", at_time=t0 - timedelta(minutes=1)).variables == {}
    assert conversations.get("c-1").variables == {"count": 2}


def test_history_lists_who_when_old_and_new(conversations: Conversations, clock: Clock) -> None:
    """history() gives every change with run, node, time and old -> new."""
    conversations.assign("c-1", {"count": 1}, workflow_run_id="r1", node_id="n1")
    clock.now += timedelta(seconds=30)
    conversations.assign("c-1", {"count": 2}, workflow_run_id="r2", node_id="n2")
    conversations.delete("c-1", ["count"], workflow_run_id="r3")
    hist = conversations.history("c-1")
    assert [(h.kind, h.old, h.new, h.workflow_run_id, h.version) for h in hist] == [
        ("assigned", None, 1, "r1", 1), ("assigned", 1, 2, "r2", 2),
        ("deleted", 2, None, "r3", 3)]
    assert hist[1].at - hist[0].at == timedelta(seconds=30)
    assert conversations.history("c-1", name="other") == []
    conversations.assign("c-1", {"count": 5}, workflow_run_id="r4")  # back after its delete
    assert [(h.kind, h.old, h.new) for h in conversations.history("c-1", name="count")][-1] == (
        "assigned", None, 5)


def test_unknown_conversation_is_empty(conversations: Conversations) -> None:
    """get of a conversation with no events has no variables and version 0."""
    state = conversations.get("nobody")
    assert state.variables == {} and state.version == 0


def test_tenants_do_not_see_each_other(conversations: Conversations) -> None:
    """Variables are per tenant."""
    conversations.assign("c-1", {"secret": "a"}, tenant_id="a")
    assert conversations.get("c-1", tenant_id="b").variables == {}
    assert conversations.get("c-1", tenant_id=DEFAULT_TENANT).variables == {}
    assert conversations.history("c-1", tenant_id="b") == []
    assert conversations.get("c-1", tenant_id="a", at_version=1).variables == {"secret": "a"}
    assert [h.new for h in conversations.history("c-1", tenant_id="a")] == ["a"]
    conversations.reset("c-1", {"secret": "r", "other": 1}, tenant_id="a")
    conversations.delete("c-1", ["other"], tenant_id="a")
    assert conversations.get("c-1", tenant_id="a").variables == {"secret": "r"}
    assert conversations.get("c-1").variables == {}
    assert conversations.snapshot("c-1", tenant_id="a") == 3


def test_ids_of_200_characters_are_taken_and_ids_that_are_not_text_refused(
        conversations: Conversations) -> None:
    conversations.assign("c" * 200, {"a": 1})
    assert conversations.get("c" * 200).variables == {"a": 1}
    with pytest.raises(InvalidArgument):
        conversations.assign(7, {"a": 1})  # type: ignore[arg-type]


def test_bad_input_writes_nothing(conversations: Conversations, conv_store: EventStore) -> None:
    """Empty or malformed variables raise InvalidArgument and append nothing."""
    for bad in ({}, {"": 1}, {1: "x"}, ["a"]):
        with pytest.raises(InvalidArgument):
            conversations.assign("c-1", bad)  # type: ignore[arg-type]
    for read in (conversations.get, conversations.history, conversations.snapshot):
        with pytest.raises(InvalidArgument):
            read("")
    with pytest.raises(InvalidArgument):
        conversations.assign("", {"a": 1})
    with pytest.raises(InvalidArgument, match="longer than 200 characters"):
        conversations.assign("c" * 201, {"a": 1})  # facade ids: at most 200, as the others
    # One stored before that limit is still read.
    old_id = "o" * 201
    conv_store.append(Conversations.stream_id(old_id), [VariablesAssigned(
        conversation_id=old_id, variables=[VariableValue(name="a", value=1,
                                                         value_type="integer")])])
    assert conversations.get(old_id).variables == {"a": 1}
    assert len(conversations.history(old_id)) == 1
    with pytest.raises(InvalidArgument):
        conversations.delete("c-1", [])
    with pytest.raises(InvalidArgument):
        conversations.assign("c-1", {"a": object()})
    with pytest.raises(InvalidArgument):
        conversations.assign("c-1", {"a": float("nan")})
    with pytest.raises(InvalidArgument):
        conversations.assign("c-1", {"a": {"deep": [1.0, float("inf")]}})
    with pytest.raises(InvalidArgument, match="are one key in JSON"):
        conversations.assign("c-1", {"a": {1: "lost", "1": "kept"}})  # one JSON key
    assert conv_store.stream_version("conversation-c-1") == 0


def test_failed_append_raises_and_leaves_state(conversations: Conversations) -> None:
    """A stale expected_version raises to the caller; the state is unchanged."""
    conversations.assign("c-1", {"a": 1})
    with pytest.raises(WrongExpectedVersion):
        conversations.assign("c-1", {"a": 2}, expected_version=0)
    with pytest.raises(WrongExpectedVersion):
        conversations.reset("c-1", {"a": 0}, expected_version=0)
    with pytest.raises(WrongExpectedVersion):
        conversations.delete("c-1", ["a"], expected_version=0)
    assert conversations.get("c-1").variables == {"a": 1}


def test_get_sees_writes_from_a_writer_without_the_projection(
        conversations: Conversations, conv_store: EventStore) -> None:
    """Events appended by a process that did not run the inline projection still show."""
    conversations.assign("c-1", {"a": 1})
    with EventStore.open(conv_store.url) as bare:
        bare.append("conversation-c-1", [VariablesAssigned(conversation_id="c-1",
                                                           variables=[])])
        from projections.events import VariableValue
        bare.append("conversation-c-1", [VariablesAssigned(
            conversation_id="c-1", variables=[VariableValue(name="b", value=2,
                                                            value_type="integer")])])
    assert conversations.get("c-1").variables == {"a": 1, "b": 2}
    conversations.assign("c-1", {"c": 3})
    assert conversations.get("c-1").version == 4


def test_version_is_the_streams_also_after_other_events(conversations: Conversations,
                                                         conv_store: EventStore,
                                                         clock: Clock) -> None:
    """An event on the conversation's stream that changes no variable (an engine's own note)
    still moves the version: ``get().version`` is what read-modify-write must pass as
    ``expected_version``, now and as of an earlier version or time."""
    conversations.assign("c-1", {"count": 1})
    clock.now += timedelta(minutes=1)
    conv_store.append("conversation-c-1", [NoteAdded(text="engine note")])
    state = conversations.get("c-1")
    assert (state.version, state.variables) == (2, {"count": 1})
    assert state.updated_at == datetime(2026, 1, 1, 12, 0, tzinfo=UTC)  # the last change's
    noted = clock.now
    clock.now += timedelta(minutes=1)
    assert conversations.assign("c-1", {"count": state.variables["count"] + 1},
                                expected_version=state.version) == 3
    assert conversations.get("c-1", at_version=2).version == 2
    assert conversations.get("c-1", at_time=noted).version == 2
    # A stream holding only other events: no variables, the stream's version.
    conv_store.append("conversation-c-2", [NoteAdded(text="a"), NoteAdded(text="b")])
    assert conversations.get("c-2").version == 2
    conversations.assign("c-2", {"x": 1}, expected_version=2)
    assert [c.name for c in conversations.history("c-2")] == ["x"]


def test_snapshot_every_n_assigns_and_time_travel_from_them(conv_store: EventStore,
                                                            clock: Clock) -> None:
    """``snapshot_every=N``: the assign that takes a conversation to each multiple of N saves
    a snapshot; time travel by version and by time gives what the history says."""
    from sqlalchemy import select

    from eventstore._schema import snapshots

    conversations = Conversations(conv_store, snapshot_every=5)
    times = []
    for i in range(1, 13):
        clock.now += timedelta(seconds=1)
        times.append(clock.now)
        conversations.assign("c-9", {"n": i, f"v{i % 3}": i})
    with conv_store.engine.connect() as c:
        versions = c.execute(select(snapshots.c.version).where(
            snapshots.c.stream_id == Conversations.stream_id("c-9"))
            .order_by(snapshots.c.version)).scalars().all()
    assert versions == [5, 10]
    for at in (4, 5, 7, 10, 12):
        state = conversations.get("c-9", at_version=at)
        assert state.version == at and state.variables["n"] == at
        assert conversations.get("c-9", at_time=times[at - 1]).variables == state.variables


def test_value_type_is_the_json_type_a_value_is_stored_as(
        conversations: Conversations) -> None:
    """Sets and tuples are stored as arrays, datetimes, UUIDs, decimals and bytes as strings,
    an enum member as its value: the recorded value type says so."""
    import decimal
    import enum
    import uuid

    class Colour(enum.Enum):
        RED = "red"
        TWO = 2

    class Point(msgspec.Struct, array_like=True):
        x: int
        y: int

    class Pair(msgspec.Struct):
        x: int

    values = {"set": {1, 2}, "frozen": frozenset({3}), "tuple": (1,), "when": datetime.now(UTC),
              "day": datetime.now(UTC).date(), "id": uuid.uuid4(),
              "price": decimal.Decimal("1.5"), "blob": b"\x00\xff", "colour": Colour.RED,
              "two": Colour.TWO, "map": {"a": 1}, "none": None, "flag": True, "n": 3, "x": 1.5,
              "time": datetime.now(UTC).time(), "span": timedelta(minutes=5),
              "buf": bytearray(b"ab"), "view": memoryview(b"cd"), "point": Point(1, 2),
              "pair": Pair(x=1)}
    conversations.assign("c-t", values)
    state = conversations.get("c-t")
    json_type = {str: "string", list: "array", dict: "object", type(None): "null",
                 bool: "boolean", int: "integer", float: "number"}
    assert state.value_types == {name: json_type[type(value)]
                                 for name, value in state.variables.items()}
    assert state.value_types["set"] == "array" and state.value_types["blob"] == "string"
    assert state.value_types["two"] == "integer"
    assert state.value_types["point"] == "array" and state.value_types["pair"] == "object"


def test_history_lists_each_events_variables_in_name_order_with_type_origin_and_position(
        conversations: Conversations, conv_store: EventStore) -> None:
    conversations.assign("other", {"x": 1})  # positions != versions
    assert conversations.assign("c-1", {"b": 1, "a": "x"}, workflow_run_id="r1",
                                node_id="n1") == 1
    conversations.reset("c-1", {"b": 0}, workflow_run_id="r2", node_id="n2")
    conversations.delete("c-1", ["a"], workflow_run_id="r3", node_id="n3")
    conversations.assign("c-1", {"b": 2, "a": "y"})
    events = list(conv_store.read_stream("conversation-c-1"))
    assert [v.name for v in events[0].data.variables] == ["a", "b"]
    hist = conversations.history("c-1")
    assert [(h.name, h.kind, h.old, h.new, h.value_type, h.version, h.workflow_run_id,
             h.node_id) for h in hist] == [
        ("a", "assigned", None, "x", "string", 1, "r1", "n1"),
        ("b", "assigned", None, 1, "integer", 1, "r1", "n1"),
        ("b", "reset", 1, 0, "integer", 2, "r2", "n2"),
        ("a", "deleted", "x", None, None, 3, "r3", "n3"),
        ("a", "assigned", None, "y", "string", 4, None, None),
        ("b", "assigned", 0, 2, "integer", 4, None, None)]
    positions = {e.version: e.position for e in events}
    assert [h.position for h in hist] == [positions[h.version] for h in hist]
    state = conversations.get("c-1", at_version=3)
    assert (state.workflow_run_id, state.node_id) == ("r3", "n3")
    assert (state.variables, state.value_types) == ({"b": 0}, {"b": "integer"})


def test_state_has_the_last_changes_run_node_and_time_now_and_as_of_a_version(
        conversations: Conversations, conv_store: EventStore, clock: Clock) -> None:
    t0 = clock.now
    conversations.assign("c-1", {"a": 1}, workflow_run_id="r1", node_id="n1")
    clock.now += timedelta(minutes=1)
    conv_store.append("conversation-c-1", [NoteAdded(text="engine note")])
    for state in (conversations.get("c-1"), conversations.get("c-1", at_version=2)):
        assert (state.version, state.updated_at, state.workflow_run_id, state.node_id) == (
            2, t0, "r1", "n1")
    clock.now += timedelta(minutes=1)
    conversations.assign("c-1", {"a": 2}, workflow_run_id="r2", node_id="n2")
    state = conversations.get("c-1")
    assert (state.version, state.updated_at, state.workflow_run_id, state.node_id) == (
        3, clock.now, "r2", "n2")


def test_get_with_both_a_version_and_a_time_is_the_state_at_the_earlier(
        conversations: Conversations, clock: Clock) -> None:
    t0 = clock.now
    for i in range(1, 4):
        conversations.assign("c-1", {"n": i})
        clock.now += timedelta(minutes=5)
    assert conversations.get("c-1", at_version=1, at_time=t0 + timedelta(minutes=7)).version == 1
    assert conversations.get("c-1", at_version=3, at_time=t0 + timedelta(minutes=7)).version == 2


def test_value_types_names_a_variables_type(conversations: Conversations) -> None:
    conversations.assign("c-1", {"day": "2026-01-01", "n": 1}, value_types={"day": "date"})
    assert conversations.get("c-1").value_types == {"day": "date", "n": "integer"}
    assert [h.value_type for h in conversations.history("c-1")] == ["date", "integer"]


def test_assign_records_its_metadata(conversations: Conversations,
                                     conv_store: EventStore) -> None:
    conversations.assign("c-1", {"a": 1}, metadata={"trace": "t-1"})
    (ev,) = conv_store.read_stream("conversation-c-1")
    assert ev.metadata.get("trace") == "t-1"


def test_the_fold_leaves_the_state_it_is_given_unchanged(conversations: Conversations,
                                                          conv_store: EventStore) -> None:
    conversations.assign("c-1", {"a": 1})
    conversations.delete("c-1", ["a"])
    first, second = conv_store.read_stream("conversation-c-1")
    projection = ConversationProjection()
    empty = projection.initial(DEFAULT_TENANT, "conversation-c-1")
    assigned = projection.evolve(empty, first)
    assert (empty.variables, empty.value_types) == ({}, {})
    assert projection.evolve(assigned, second).variables == {}
    assert (assigned.variables, assigned.value_types) == ({"a": 1}, {"a": "integer"})


# The stored shape of every event type of the catalogue (projections.events): tag -> field ->
# its type, or (type, default) for a field with a default.  Tags never change and a field
# never changes type; an added field's default is what older events read with.
CATALOGUE: dict[str, dict[str, Any]] = {
    "VariablesAssigned": {"conversation_id": str, "variables": list[VariableValue],
                          "workflow_run_id": (str | None, None), "node_id": (str | None, None)},
    "VariablesReset": {"conversation_id": str, "variables": list[VariableValue],
                       "workflow_run_id": (str | None, None), "node_id": (str | None, None)},
    "VariablesDeleted": {"conversation_id": str, "names": list[str],
                         "workflow_run_id": (str | None, None), "node_id": (str | None, None)},
    "ToolCallsPaused": {"conversation_id": str, "user_id": str, "pause_id": str,
                        "messages": list[Any], "pending_tool_calls": list[Any],
                        "tools": list[Any], "tool_schemas": list[Any],
                        "agent_config": dict[str, Any], "expires_at": datetime,
                        "client_tools": (list[Any] | None, None),
                        "paused_at": (datetime | None, None), "ttl": (timedelta | None, None)},
    "ResumeStarted": {"pause_id": str, "claim_id": str, "claimed_at": datetime},
    "ToolCallsResumed": {"pause_id": str, "claim_id": str, "tool_results": list[Any]},
    "ResumeReleased": {"pause_id": str, "claim_id": str, "expires_at": datetime,
                       "error": (str | None, None)},
    "ResumeTimedOut": {"pause_id": str, "claim_id": str, "expires_at": datetime},
    "ContinuationExpired": {"pause_id": str, "expired_at": datetime},
    "SessionSnapshotSaved": {"tenant_id": str, "workflow_run_id": str, "node_id": str,
                             "binding_id": str, "agent_id": str, "snapshot": Any,
                             "layer_specs": Any, "saved_at": datetime,
                             "pending_form_id": (str | None, None),
                             "pending_tool_call_id": (str | None, None)},
    "SessionRetired": {"reason": str, "retired_at": datetime},
    "JobSubmitted": {"job_id": str, "workflow_id": str, "inputs": Any, "user_id": str,
                     "submitted_at": datetime, "dedupe_key": (str | None, None),
                     "max_attempts": (int, 3)},
    "JobClaimed": {"worker_id": str, "attempt": int, "lease_until": datetime,
                   "at": (datetime | None, None)},
    "JobHeartbeat": {"worker_id": str, "lease_until": datetime, "at": (datetime | None, None)},
    "MilestoneRecorded": {"worker_id": str, "milestone": Any, "at": datetime},
    "JobSuspended": {"worker_id": str, "request_id": str, "prompt": Any,
                     "deadline": (datetime | None, None), "at": (datetime | None, None)},
    "JobResumed": {"request_id": str, "input": Any, "at": datetime},
    "JobRequeued": {"reason": str, "at": datetime},
    "JobCompleted": {"worker_id": str, "at": datetime, "result": (Any, None)},
    "JobFailed": {"error": str, "at": datetime, "worker_id": (str | None, None)},
    "JobCancelled": {"at": datetime, "reason": (str | None, None)},
    "FlowStateSaved": {"flow_id": str, "method_name": str, "state": Any, "at": datetime},
    "FeedbackRequested": {"flow_id": str, "context": Any, "state": Any, "at": datetime},
    "FeedbackResolved": {"flow_id": str, "feedback": Any, "at": datetime},
}


def test_the_event_catalogue_keeps_its_tags_field_types_and_defaults() -> None:
    import projections.events as catalogue
    from eventstore import Event

    stored = {cls.event_tag(): {f.name: f.type if f.default is msgspec.NODEFAULT
                                else (f.type, f.default) for f in msgspec.structs.fields(cls)}
              for cls in vars(catalogue).values()
              if isinstance(cls, type) and issubclass(cls, Event) and cls is not Event}
    assert stored == CATALOGUE


def test_a_variable_value_is_frozen_keyword_only_and_needs_its_type() -> None:
    value = VariableValue(name="n", value=1, value_type="integer")
    with pytest.raises(AttributeError):
        value.value = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        VariableValue("n", 1, "integer")  # type: ignore[misc]
    with pytest.raises(TypeError):
        VariableValue(name="n", value=1)  # type: ignore[call-arg]
