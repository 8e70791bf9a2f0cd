"""The facades' command layer (``projections._command.decide``): read, decide, append at the
version read; on a conflict decide again, and after a few conflicts under the append lock."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from eventstore import Event, EventStore
from projections._command import OPTIMISTIC_ATTEMPTS, decide
from projections.conversation import ConversationProjection
from projections.events import VariablesAssigned, VariableValue


def _assigned(n: int) -> VariablesAssigned:
    return VariablesAssigned(conversation_id="c-1", variables=[
        VariableValue(name="n", value=n, value_type="integer")])


def test_a_command_that_keeps_losing_decides_under_the_append_lock(url: str) -> None:
    """Another writer appends to the stream during every optimistic attempt (as a busy job's
    other writers do): the command then decides holding the append lock, so a writer that
    comes in meanwhile waits for it, and the command gets through instead of giving up with
    WrongExpectedVersion after its retries (which one that always lost used to)."""
    stream = "conversation-c-1"
    projection = ConversationProjection()
    with EventStore.open(url, migrate=True) as store, EventStore.open(url) as other:
        seen: list[int] = []
        late: list[Any] = []

        def decision(state: Any, version: int) -> list[Event]:
            seen.append(version)
            if len(seen) <= OPTIMISTIC_ATTEMPTS:  # the stream moves under each of these
                other.append(stream, [_assigned(-len(seen))])
            else:  # under the lock: a writer that comes now waits until this one commits
                writer = threading.Thread(target=lambda: late.append(
                    other.append(stream, [_assigned(99)])))
                writer.start()
                late.append(writer)
                time.sleep(0.3)
                assert late == [writer], "the other writer got in under the lock"
            return [_assigned(len(seen))]

        _state, version, result = decide(store, projection, stream, tenant_id="default",
                                         decision=decision)
        late[0].join(10)
        assert seen == list(range(OPTIMISTIC_ATTEMPTS + 1))
        assert version == OPTIMISTIC_ATTEMPTS and result is not None
        assert result.stream_version == OPTIMISTIC_ATTEMPTS + 1
        assert late[1].stream_version == OPTIMISTIC_ATTEMPTS + 2  # it came after ours
        values = [e.data.variables[0].value  # type: ignore[attr-defined]
                  for e in store.read_stream(stream)]
        assert values == [-(i + 1) for i in range(OPTIMISTIC_ATTEMPTS)] + [
            OPTIMISTIC_ATTEMPTS + 1, 99]


def test_an_append_from_inside_a_locked_decision_is_refused_not_left_waiting(
        url: str) -> None:
    """A command deciding under the append lock is inside an append as far as the store is
    concerned: an inline handler that appends from there is refused at once, as on the
    optimistic path (it waited for the lock its own command held, and on PostgreSQL the idle
    limit then committed its event without the command's)."""
    from eventstore import InvalidArgument, RecordedEvent

    stream = "conversation-c-1"
    projection = ConversationProjection()
    with EventStore.open(url, migrate=True) as store, EventStore.open(url) as other:
        def nested(conn: Any, recorded: Any) -> None:
            if any(isinstance(r, RecordedEvent) and r.stream_id == stream for r in recorded):
                store.append("notices-1", [_assigned(0)])

        store.add_inline_handler(nested)
        calls: list[int] = []

        def decision(state: Any, version: int) -> list[Event]:
            calls.append(version)
            if len(calls) <= OPTIMISTIC_ATTEMPTS:
                other.append(stream, [_assigned(-len(calls))])  # lose, until locked
            return [_assigned(len(calls))]

        started = time.monotonic()
        with pytest.raises(InvalidArgument, match="inside another append"):
            decide(store, projection, stream, tenant_id="default", decision=decision)
        assert time.monotonic() - started < 5
        assert len(calls) == OPTIMISTIC_ATTEMPTS + 1
        store.remove_inline_handler(nested)
        assert store.stream_version("notices-1") == 0
        assert store.stream_version(stream) == OPTIMISTIC_ATTEMPTS  # only the other writer's
        assert store.append(stream, [_assigned(9)]).stream_version == OPTIMISTIC_ATTEMPTS + 1


@pytest.mark.parametrize("conflicts", [0, OPTIMISTIC_ATTEMPTS])
def test_a_command_appends_all_its_events_under_its_tenant_with_its_metadata(
        url: str, conflicts: int) -> None:
    stream = "conversation-c-1"
    projection = ConversationProjection()
    with EventStore.open(url, migrate=True) as store, EventStore.open(url) as other:
        store.append(stream, [_assigned(-100)] * 5)  # the default tenant's stream of that id
        seen: list[int] = []

        def decision(state: Any, version: int) -> list[Event]:
            seen.append(version)
            if len(seen) <= conflicts:  # lose, until locked
                other.append(stream, [_assigned(-len(seen))], tenant_id="acme")
            return [_assigned(1), _assigned(2)]

        state, version, result = decide(store, projection, stream, tenant_id="acme",
                                        decision=decision, metadata={"trace_id": "t-1"})
        assert seen == list(range(conflicts + 1))
        assert version == conflicts and state.version == conflicts
        assert result is not None and result.stream_version == conflicts + 2
        mine = list(store.read_stream(stream, tenant_id="acme", from_version=conflicts + 1))
        assert [e.data for e in mine] == [_assigned(1), _assigned(2)]
        assert [e.metadata for e in mine] == [{"trace_id": "t-1"}] * 2
        assert store.stream_version(stream) == 5


def test_a_refused_event_is_raised_at_once_not_decided_again(url: str) -> None:
    from eventstore import InvalidEvent

    calls: list[int] = []

    def decision(state: Any, version: int) -> list[Event]:
        calls.append(version)
        return [VariablesAssigned(conversation_id="c-1", variables=[
            VariableValue(name="n", value=float("nan"), value_type="number")])]

    with EventStore.open(url, migrate=True) as store:
        with pytest.raises(InvalidEvent):
            decide(store, ConversationProjection(), "conversation-c-1", tenant_id="default",
                   decision=decision)
        assert calls == [0] and store.stream_version("conversation-c-1") == 0


def test_a_command_decided_under_the_append_lock_logs_its_append(url: str) -> None:
    from structlog.testing import capture_logs

    stream = "conversation-c-1"
    with EventStore.open(url, migrate=True) as store, EventStore.open(url) as other:
        calls: list[int] = []

        def decision(state: Any, version: int) -> list[Event]:
            calls.append(version)
            if len(calls) <= OPTIMISTIC_ATTEMPTS:
                other.append(stream, [_assigned(-len(calls))], tenant_id="acme")
            return [_assigned(len(calls))]

        with capture_logs() as logs:
            decide(store, ConversationProjection(), stream, tenant_id="acme",
                   decision=decision)
        mine = [e for e in logs if e["event"] == "events_appended"
                and e["position"] == OPTIMISTIC_ATTEMPTS + 1]
        assert len(calls) == OPTIMISTIC_ATTEMPTS + 1
        assert [(e["tenant"], e["stream"], e["count"]) for e in mine] == [("acme", stream, 1)]
