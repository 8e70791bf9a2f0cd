"""Agent-session snapshots: save, active, retire, finish_run, history and races."""

from __future__ import annotations

import threading

import pytest

from eventstore import EventStore, InvalidArgument
from projections.sessions import AgentSessions, SessionEntry, SessionKey
from tests._clock import Clock


def key(run: str = "run-1", node: str = "node-1", agent: str = "agent-1",
        tenant: str = "acme") -> SessionKey:
    return SessionKey(tenant, run, node, "binding-1", agent)


@pytest.fixture
def sessions(store: EventStore) -> AgentSessions:
    return AgentSessions(store, clock=Clock())


def test_save_then_active_returns_newest(sessions: AgentSessions) -> None:
    """active() returns the newest snapshot with its layer specs."""
    sessions.save(key(), snapshot={"layers": [1]}, layer_specs=[{"kind": "memory"}])
    sessions.save(key(), snapshot={"layers": [1, 2]}, layer_specs=[{"kind": "memory"}])
    snap = sessions.active(key())
    assert snap is not None and snap.snapshot == {"layers": [1, 2]} and snap.version == 2
    assert snap.layer_specs == [{"kind": "memory"}]


def test_save_returns_the_snapshot_as_stored(sessions: AgentSessions) -> None:
    """The snapshot is JSON: save() returns what active() will give back (keys as strings,
    sets and tuples as lists), not the caller's own objects."""
    given = {1: {"tags": ("a", "b")}}
    saved = sessions.save(key(), snapshot=given, layer_specs=({"kind": "memory"},))
    active = sessions.active(key())
    assert active is not None
    assert saved.snapshot == active.snapshot == {"1": {"tags": ["a", "b"]}}
    assert saved.layer_specs == active.layer_specs == [{"kind": "memory"}]
    assert saved.snapshot is not given


def test_unknown_session_is_none(sessions: AgentSessions) -> None:
    """active() of a key never saved is None."""
    assert sessions.active(key()) is None


def test_retire_makes_active_none(sessions: AgentSessions) -> None:
    """After retire, active() is None, so a loop never resumes a stale snapshot."""
    sessions.save(key(), snapshot={"s": 1}, layer_specs=[])
    assert sessions.retire(key(), reason="run failed") is True
    assert sessions.active(key()) is None
    assert sessions.retire(key(), reason="again") is False
    assert [e.kind for e in sessions.history(key())] == ["saved", "retired"]
    # A reason is free text, as long as the error message it often is (not an id's 200).
    long_reason = "Traceback (most recent call last): " + "x" * 400
    sessions.save(key(), snapshot={"s": 2}, layer_specs=[])
    assert sessions.retire(key(), reason=long_reason) is True
    assert sessions.history(key())[-1].reason == long_reason
    for bad in ("", None, "nul\x00"):
        with pytest.raises(InvalidArgument):
            sessions.retire(key(), reason=bad)  # type: ignore[arg-type]


def test_a_retire_reason_that_is_not_text_is_refused(sessions: AgentSessions) -> None:
    sessions.save(key(), snapshot={"s": 1}, layer_specs=[])
    for bad in (5, ["run failed"]):
        with pytest.raises(InvalidArgument):
            sessions.retire(key(), reason=bad)  # type: ignore[arg-type]
    assert sessions.active(key()) is not None


def test_pause_keeps_session_active_with_pending_ids(sessions: AgentSessions) -> None:
    """A save with pending form and tool-call ids keeps the session active."""
    sessions.save(key(), snapshot={"s": 1}, layer_specs=[], pending_form_id="form-1",
                  pending_tool_call_id="call-9")
    snap = sessions.active(key())
    assert snap is not None
    assert (snap.pending_form_id, snap.pending_tool_call_id) == ("form-1", "call-9")


@pytest.mark.parametrize("field", ["pending_form_id", "pending_tool_call_id"])
@pytest.mark.parametrize("bad", ["form\x001", "", "f" * 201, "\ud800"])
def test_a_bad_pending_id_is_refused_and_nothing_is_saved(
        sessions: AgentSessions, store: EventStore, field: str, bad: object) -> None:
    """Pending form and tool-call ids are ids like the facade's others (no NUL, which the
    README allows in no id; not empty; at most 200 characters); a bad one writes nothing.
    (One of another type is refused too: tests/test_argument_checks.py.)"""
    sessions.save(key(), snapshot={"s": 1}, layer_specs=[])
    with pytest.raises(InvalidArgument, match=field):
        sessions.save(key(), snapshot={"s": 2}, layer_specs=[], **{field: bad})
    assert store.stream_version(key().stream_id(), tenant_id="acme") == 1
    assert sessions.save(key(), snapshot={"s": 3}, layer_specs=[],
                         **{field: "f" * 200}).version == 2


def test_finish_run_retires_each_active_session_once(sessions: AgentSessions) -> None:
    """finish_run retires the run's active sessions and returns them; a second call none."""
    sessions.save(key(agent="a"), snapshot={}, layer_specs=[])
    sessions.save(key(agent="b"), snapshot={}, layer_specs=[])
    sessions.save(key(agent="c"), snapshot={}, layer_specs=[])
    sessions.retire(key(agent="c"), reason="cancelled")
    sessions.save(key(run="run-2"), snapshot={}, layer_specs=[])
    retired = sessions.finish_run("acme", "run-1", "succeeded")
    assert sorted(k.agent_id for k in retired) == ["a", "b"]
    assert sessions.finish_run("acme", "run-1", "succeeded") == []
    assert sessions.active(key(run="run-2")) is not None
    assert sessions.history(key(agent="a"))[-1].reason == "run succeeded"


def test_concurrent_finish_run_retires_exactly_once(sessions: AgentSessions,
                                                    store: EventStore) -> None:
    """Four concurrent finish_run calls retire every session exactly once between them."""
    for i in range(6):
        sessions.save(key(agent=f"a{i}"), snapshot={}, layer_specs=[])
    barrier = threading.Barrier(4)
    results: list[list[SessionKey]] = []

    def finish() -> None:
        barrier.wait()
        results.append(sessions.finish_run("acme", "run-1", "failed"))

    threads = [threading.Thread(target=finish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    retired = [k.agent_id for r in results for k in r]
    assert sorted(retired) == [f"a{i}" for i in range(6)]
    assert sum(1 for e in store.read_all() if e.type == "SessionRetired") == 6


def test_racing_first_saves_keep_every_snapshot(sessions: AgentSessions) -> None:
    """Eight simultaneous first saves of one key all land; none collides or is lost."""
    barrier = threading.Barrier(8)

    def save(i: int) -> None:
        barrier.wait()
        sessions.save(key(), snapshot={"writer": i}, layer_specs=[])

    threads = [threading.Thread(target=save, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hist = sessions.history(key())
    assert sorted(e.snapshot.snapshot["writer"] for e in hist if e.snapshot) == list(range(8))
    snap = sessions.active(key())
    assert snap is not None and snap.version == 8


def test_tenants_are_isolated(sessions: AgentSessions) -> None:
    """The same run and node in another tenant is another session."""
    sessions.save(key(tenant="a"), snapshot={"t": "a"}, layer_specs=[])
    assert sessions.active(key(tenant="b")) is None
    assert sessions.finish_run("b", "run-1", "done") == []
    assert sessions.active_in_run("b", "run-1") == []
    assert sessions.active_in_run("a", "run-1") == [key(tenant="a")]
    assert sessions.active(key(tenant="a")) is not None


def test_bad_key_is_rejected(sessions: AgentSessions, store: EventStore) -> None:
    """A key with an empty part raises InvalidArgument and writes nothing."""
    with pytest.raises(InvalidArgument):
        sessions.save(SessionKey("acme", "", "n", "b", "a"), snapshot={}, layer_specs=[])
    with pytest.raises(InvalidArgument):
        sessions.save("not a key", snapshot={}, layer_specs=[])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        SessionKey("", "r", "n", "b", "a").stream_id()
    assert store.stats()["events"] == 0


def test_retire_of_a_session_never_saved_is_false_and_writes_nothing(
        sessions: AgentSessions, store: EventStore) -> None:
    assert sessions.retire(key(), reason="cancelled") is False
    assert sessions.history(key()) == []
    assert store.stats()["events"] == 0


def test_state_counts_saves_and_shows_the_retirement_until_the_next_save(
        store: EventStore) -> None:
    clock = Clock()
    sessions = AgentSessions(store, clock=clock)
    sessions.save(key(), snapshot={"s": 1}, layer_specs=[])
    sessions.save(key(), snapshot={"s": 2}, layer_specs=[])
    state = sessions.state(key())
    assert (state.active, state.saves, state.retired_reason, state.retired_at) == (
        True, 2, None, None)
    retired_at = clock.advance(minutes=1)
    sessions.retire(key(), reason="cancelled")
    state = sessions.state(key())
    assert (state.active, state.saves, state.retired_reason, state.retired_at) == (
        False, 2, "cancelled", retired_at)
    assert state.key == key() and state.latest is not None and state.latest.snapshot == {"s": 2}
    clock.advance(minutes=1)
    sessions.save(key(), snapshot={"s": 3}, layer_specs=[])
    state = sessions.state(key())
    assert (state.active, state.saves, state.retired_reason, state.retired_at) == (
        True, 3, None, None)


def test_save_returns_what_active_and_history_give_back(store: EventStore) -> None:
    clock = Clock()
    sessions = AgentSessions(store, clock=lambda: clock.advance(seconds=1))
    sessions.save(key(agent="other"), snapshot={}, layer_specs=[])  # positions != versions
    first = sessions.save(key(), snapshot={"s": 1}, layer_specs=[{"kind": "memory"}],
                          pending_form_id="form-1", pending_tool_call_id="call-1")
    assert sessions.active(key()) == first
    second = sessions.save(key(), snapshot={"s": 2}, layer_specs=[])
    assert sessions.active(key()) == second
    assert (first.version, second.version) == (1, 2)
    assert (first.pending_form_id, first.pending_tool_call_id) == ("form-1", "call-1")
    sessions.retire(key(), reason="done")
    assert sessions.history(key()) == [
        SessionEntry(kind="saved", version=1, at=first.saved_at, snapshot=first),
        SessionEntry(kind="saved", version=2, at=second.saved_at, snapshot=second),
        SessionEntry(kind="retired", version=3, at=clock.now, reason="done")]


def test_run_queries_refuse_bad_run_ids_and_statuses(sessions: AgentSessions) -> None:
    sessions.save(key(), snapshot={}, layer_specs=[])
    for bad_run in ("", "r" * 201, None):
        with pytest.raises(InvalidArgument):
            sessions.active_in_run("acme", bad_run)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            sessions.finish_run("acme", bad_run, "done")  # type: ignore[arg-type]
    for bad_status in ("", None, "nul\x00"):
        with pytest.raises(InvalidArgument):
            sessions.finish_run("acme", "run-1", bad_status)  # type: ignore[arg-type]
    assert sessions.active(key()) is not None
