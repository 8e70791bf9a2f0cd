"""Tool-call continuations: pause, claim, complete, release, expiry, sweep and isolation."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from eventstore import EventStore, InvalidArgument
from projections import registered
from projections.continuations import ContinuationProjection, Continuations, SweepResult
from projections.errors import NoPendingContinuation, ResumeInProgress
from tests._clock import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def conts(store: EventStore, clock: Clock) -> Iterator[Continuations]:
    yield Continuations(store, clock=clock)


def pause(c: Continuations, conv: str = "conv-1", user: str = "u1", **kw: Any) -> Any:
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return c.pause(conv, user,
                   pending_tool_calls=[{"id": "call-1", "name": "approve"}],
                   tools=["approve"], tool_schemas=[{"name": "approve"}],
                   agent_config={"model": "m"}, **kw)


def test_pause_then_get_returns_the_full_state(conts: Continuations, clock: Clock) -> None:
    """A pause keeps messages, tool calls, tools, schemas and config until resumed."""
    pause(conts, client_tools=[{"name": "browser"}])
    got = conts.get("conv-1", "u1")
    assert got is not None and got.status == "pending"
    assert got.pending_tool_calls == [{"id": "call-1", "name": "approve"}]
    assert got.agent_config == {"model": "m"} and got.client_tools == [{"name": "browser"}]
    assert got.expires_at == clock.now + timedelta(minutes=30)
    assert got.paused_at == clock.now  # the facade's clock, as expires_at (not the store's)


def test_pause_returns_the_tool_calls_paused_event(conts: Continuations, clock: Clock) -> None:
    """``pause`` gives the ``ToolCallsPaused`` it recorded: the one the log holds, whose pause
    id is the pending continuation's."""
    from projections.events import ToolCallsPaused

    paused = conts.pause("conv-1", "u1", messages=[{"role": "user"}],
                         pending_tool_calls=[{"id": "call-1"}], tools=["t"], tool_schemas=[],
                         agent_config={"model": "m"}, tenant_id="acme")
    assert isinstance(paused, ToolCallsPaused)
    assert (paused.conversation_id, paused.user_id, paused.pending_tool_calls) == (
        "conv-1", "u1", [{"id": "call-1"}])
    assert paused.expires_at == clock.now + timedelta(minutes=30)
    got = conts.get("conv-1", "u1", tenant_id="acme")
    assert got is not None and got.pause_id == paused.pause_id
    (recorded,) = [e.data for e in conts.store.read_stream(conts.stream_id("conv-1", "u1"),
                                                          tenant_id="acme")]
    assert recorded == paused


def test_sweep_checks_its_arguments(conts: Continuations) -> None:
    """As Jobs.sweep: a ``now`` that is not an aware datetime, or a bad tenant, is refused."""
    from eventstore import InvalidArgument

    for now in ("2026", 5, datetime(2026, 1, 1)):
        with pytest.raises(InvalidArgument, match="now"):
            conts.sweep(now)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        conts.sweep(tenant_id="")


def test_claim_complete_consumes(conts: Continuations) -> None:
    """claim -> complete consumes the continuation; get is then None."""
    pause(conts)
    claimed = conts.claim("conv-1", "u1")
    assert claimed.status == "resuming" and claimed.claim_id
    done = conts.complete("conv-1", "u1", tool_results=[{"id": "call-1", "ok": True}])
    assert done.status == "consumed" and done.tool_results == [{"id": "call-1", "ok": True}]
    assert conts.get("conv-1", "u1") is None
    with pytest.raises(NoPendingContinuation) as info:
        conts.claim("conv-1", "u1")
    assert info.value.reason == "consumed"


def test_second_claim_gets_resume_in_progress(conts: Continuations) -> None:
    """A claim on a resuming continuation raises ResumeInProgress."""
    pause(conts)
    conts.claim("conv-1", "u1")
    with pytest.raises(ResumeInProgress):
        conts.claim("conv-1", "u1")


def test_concurrent_claims_exactly_one_wins(conts: Continuations) -> None:
    """Of eight threads claiming at once, one wins and seven get ResumeInProgress."""
    pause(conts)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def claim() -> None:
        barrier.wait()
        try:
            conts.claim("conv-1", "u1")
            outcomes.append("won")
        except ResumeInProgress:
            outcomes.append("busy")

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["busy"] * 7 + ["won"]


def test_absent_and_expired_are_told_apart(conts: Continuations, clock: Clock) -> None:
    """Claiming nothing says absent; claiming after the time to live says expired."""
    with pytest.raises(NoPendingContinuation) as info:
        conts.claim("conv-1", "u1")
    assert info.value.reason == "absent"
    pause(conts)
    clock.advance(minutes=31)
    assert conts.get("conv-1", "u1") is None
    with pytest.raises(NoPendingContinuation) as info:
        conts.claim("conv-1", "u1")
    assert info.value.reason == "expired"


def test_a_pause_expires_at_the_instant_of_its_expires_at(conts: Continuations,
                                                          clock: Clock) -> None:
    """From ``expires_at`` on (that instant included) a pause is neither returned, listed nor
    claimable, even before a sweep records its expiry; a moment before, it is all three."""
    paused = pause(conts)
    clock.now = paused.expires_at - timedelta(microseconds=1)
    assert conts.get("conv-1", "u1") is not None
    assert [c.conversation_id for c in conts.pending_for_user("u1")] == ["conv-1"]
    clock.now = paused.expires_at
    assert conts.get("conv-1", "u1") is None
    assert conts.pending_for_user("u1") == []
    with pytest.raises(NoPendingContinuation) as info:
        conts.claim("conv-1", "u1")
    assert info.value.reason == "expired"


def test_release_returns_to_pending_with_fresh_ttl(conts: Continuations, clock: Clock) -> None:
    """release puts the claim back with a new time to live and the error."""
    pause(conts)
    conts.claim("conv-1", "u1")
    clock.advance(minutes=20)
    back = conts.release("conv-1", "u1", error="client crashed")
    assert back.status == "pending" and back.last_error == "client crashed"
    assert back.expires_at == clock.now + timedelta(minutes=30)
    clock.advance(minutes=25)  # past the first ttl, within the fresh one
    assert conts.claim("conv-1", "u1").status == "resuming"


def test_a_pause_with_its_own_ttl_gets_it_again_when_released_or_swept_back(
        conts: Continuations, clock: Clock) -> None:
    """The fresh time to live of a release, and of a claim the sweep puts back, is the pause's
    own (a 4-hour approval stays 4 hours), not the facade's default."""
    pause(conts, ttl=timedelta(hours=4))
    conts.claim("conv-1", "u1")
    back = conts.release("conv-1", "u1", error="client crashed")
    assert back.ttl == timedelta(hours=4)
    assert back.expires_at == clock.now + timedelta(hours=4)
    conts.claim("conv-1", "u1")
    clock.advance(minutes=11)  # past the claim timeout
    assert conts.sweep().reverted == [("default", "conv-1", "u1")]
    swept = conts.get("conv-1", "u1")
    assert swept is not None and swept.expires_at == clock.now + timedelta(hours=4)


def test_new_pause_replaces_pending_one(conts: Continuations) -> None:
    """A loop that pauses again replaces the pending pause."""
    first = pause(conts)
    second = conts.pause("conv-1", "u1", messages=[], pending_tool_calls=[{"id": "call-2"}],
                         tools=[], tool_schemas=[], agent_config={})
    assert second.pause_id != first.pause_id
    got = conts.get("conv-1", "u1")
    assert got is not None and got.pending_tool_calls == [{"id": "call-2"}]


def test_sweep_reverts_stale_claims_and_records_expiry(conts: Continuations, clock: Clock,
                                                       store: EventStore) -> None:
    """sweep puts claims past the claim timeout back and expires pauses past their ttl."""
    pause(conts, "conv-a")
    claimed = conts.claim("conv-a", "u1")
    pause(conts, "conv-b")
    clock.advance(minutes=11)
    res = conts.sweep()
    assert res.reverted == [("default", "conv-a", "u1")] and res.expired == []
    assert conts.get("conv-a", "u1").status == "pending"  # type: ignore[union-attr]
    # The resumer whose claim was put back learns it (the reason is documented).
    with pytest.raises(NoPendingContinuation, match="timed out") as late:
        conts.complete("conv-a", "u1", tool_results=[], claim_id=claimed.claim_id)
    assert late.value.reason == "not_claimed"
    clock.advance(minutes=25)
    res = conts.sweep()
    assert res.expired == [("default", "conv-b", "u1")]
    assert conts.sweep().expired == []
    types = [e.type for e in store.read_stream(Continuations.stream_id("conv-b", "u1"))]
    assert types == ["ToolCallsPaused", "ContinuationExpired"]


def test_sweeps_and_clocks_at_the_ends_of_the_datetime_range(conts: Continuations,
                                                             clock: Clock,
                                                             store: EventStore) -> None:
    """A sweep less than the claim timeout after the first datetime finds no stale claim, one
    at the last datetime reverts a claim (its new expiry the last datetime) and expires it;
    a clock so late that the pause's expiry or a release's would be past the last datetime
    is refused with InvalidArgument and nothing is written (each was a bare OverflowError)."""
    first = datetime.min.replace(tzinfo=UTC)
    last = datetime.max.replace(tzinfo=UTC)
    pause(conts, "conv-a")
    conts.claim("conv-a", "u1")
    for now in (first, first + timedelta(minutes=5)):
        assert conts.sweep(now=now) == SweepResult(reverted=[], expired=[])
    assert conts.sweep(now=last) == SweepResult(reverted=[("default", "conv-a", "u1")],
                                                expired=[("default", "conv-a", "u1")])
    stream = Continuations.stream_id("conv-a", "u1")
    timed_out = [e.data for e in store.read_stream(stream) if e.type == "ResumeTimedOut"]
    assert [e.expires_at for e in timed_out] == [last]  # type: ignore[union-attr]
    pause(conts, "conv-b")
    conts.claim("conv-b", "u1")
    written = store.stream_version(Continuations.stream_id("conv-b", "u1"))
    clock.now = last - timedelta(minutes=1)
    with pytest.raises(InvalidArgument, match="past the last datetime"):
        pause(conts, "conv-c")
    with pytest.raises(InvalidArgument, match="past the last datetime"):
        conts.release("conv-b", "u1")
    assert store.stream_version(Continuations.stream_id("conv-c", "u1")) == 0
    assert store.stream_version(Continuations.stream_id("conv-b", "u1")) == written


def test_racing_sweepers_record_each_expiry_once(conts: Continuations, clock: Clock,
                                                 store: EventStore) -> None:
    """Four sweepers at once expire each pause exactly once."""
    for i in range(3):
        pause(conts, f"conv-{i}")
    clock.advance(hours=1)
    barrier = threading.Barrier(4)
    counts: list[int] = []

    def sweep() -> None:
        barrier.wait()
        counts.append(len(conts.sweep().expired))

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 3
    expiries = [e for e in store.read_all() if e.type == "ContinuationExpired"]
    assert len(expiries) == 3


def test_users_and_tenants_are_isolated(conts: Continuations) -> None:
    """Another user or tenant can neither read nor claim a continuation."""
    pause(conts, user="alice", tenant_id="acme")
    assert conts.get("conv-1", "bob", tenant_id="acme") is None
    assert conts.get("conv-1", "alice", tenant_id="other") is None
    with pytest.raises(NoPendingContinuation):
        conts.claim("conv-1", "bob", tenant_id="acme")
    with pytest.raises(NoPendingContinuation):
        conts.claim("conv-1", "alice")
    assert conts.claim("conv-1", "alice", tenant_id="acme").status == "resuming"


def test_ids_cannot_be_confused(conts: Continuations) -> None:
    """(conversation "a.b", user "c") and ("a", "b.c") are different continuations."""
    pause(conts, "a.b", "c")
    assert conts.get("a", "b.c") is None


def test_a_continuation_s_stream_is_named_by_its_length_prefixed_ids(
        conts: Continuations, store: EventStore) -> None:
    pause(conts, "conv-1", "alice")
    (ev,) = store.read_all()
    assert ev.stream_id == "continuation-6:conv-1.5:alice"


def test_pending_for_user_lists_pending_pauses(conts: Continuations) -> None:
    """pending_for_user lists only that user's pending pauses."""
    pause(conts, "conv-1", "alice")
    pause(conts, "conv-2", "alice")
    pause(conts, "conv-3", "bob")
    conts.claim("conv-2", "alice")
    assert [c.conversation_id for c in conts.pending_for_user("alice")] == ["conv-1"]


def test_bad_input_is_rejected(conts: Continuations, store: EventStore) -> None:
    """Empty ids or malformed state raise InvalidArgument and write nothing."""
    with pytest.raises(InvalidArgument):
        pause(conts, "", "u1")
    with pytest.raises(InvalidArgument):
        conts.pause("conv-1", "u1", messages="nope", pending_tool_calls=[], tools=[],
                    tool_schemas=[], agent_config={})
    with pytest.raises(InvalidArgument):
        conts.complete("conv-1", "u1", tool_results="x")  # type: ignore[arg-type]
    # Durations past a century (their end overflowed the datetime: OverflowError).
    for ttl in (timedelta(days=10**8), timedelta.max, timedelta(0)):
        with pytest.raises(InvalidArgument, match="ttl must be positive and at most"):
            conts.pause("conv-1", "u1", messages=[], pending_tool_calls=[], tools=[],
                        tool_schemas=[], agent_config={}, ttl=ttl)
        with pytest.raises(InvalidArgument, match="ttl must be"):
            Continuations(store, ttl=ttl)
    with pytest.raises(InvalidArgument, match="claim_timeout must be"):
        Continuations(store, claim_timeout=timedelta.max)
    assert store.stats()["events"] == 0


def test_each_command_answers_with_the_state_its_own_append_made(
        store: EventStore, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """pause, claim, complete and release return the continuation right after their own event,
    not the stream re-read later: another process acting right after the append (here, a hook
    on the store's append) must not make a claimer see the other's claim_id, a pauser the
    other's pause, or complete a pending continuation."""
    conts = Continuations(store, claim_timeout=timedelta(minutes=10), clock=clock)
    real_append = store.append

    def then(event_type: str, action: Any) -> None:
        def append(stream_id: str, events: Any, **kw: Any) -> Any:
            result = real_append(stream_id, events, **kw)
            if type(events[0]).__name__ == event_type:
                monkeypatch.setattr(store, "append", real_append)
                action()
            return result
        monkeypatch.setattr(store, "append", append)

    pause(conts, "c1")
    other: dict[str, Any] = {}
    then("ResumeStarted", lambda: (conts.sweep(now=clock.now + timedelta(minutes=11)),
                                   other.setdefault("claim", conts.claim("c1", "u1"))))
    mine = conts.claim("c1", "u1")
    assert mine.status == "resuming" and mine.claim_id != other["claim"].claim_id
    with pytest.raises(ResumeInProgress):  # the sweep took mine back: the other holds it now
        conts.complete("c1", "u1", tool_results=["r"], claim_id=mine.claim_id)

    then("ToolCallsPaused", lambda: pause(conts, "c2", messages=["other"]))
    assert pause(conts, "c2", messages=["mine"]).messages == ["mine"]

    claim = conts.claim("c2", "u1")
    then("ToolCallsResumed", lambda: pause(conts, "c2", messages=["next"]))
    done = conts.complete("c2", "u1", tool_results=["r"], claim_id=claim.claim_id)
    assert done.status == "consumed" and done.tool_results == ["r"]

    claim = conts.claim("c2", "u1")
    then("ResumeReleased", lambda: conts.claim("c2", "u1"))
    released = conts.release("c2", "u1", claim_id=claim.claim_id)
    assert released.status == "pending" and released.claim_id is None


def test_release_checks_the_claim_as_complete_does(conts: Continuations,
                                                   store: EventStore) -> None:
    """release of a pause nobody claimed, or with another resumer's claim id, raises the typed
    errors complete raises (not a bare AssertionError) and writes nothing; with the holder's
    claim id it puts the pause back."""
    with pytest.raises(NoPendingContinuation) as info:
        conts.release("conv-1", "u1")
    assert info.value.reason == "absent"
    pause(conts)
    with pytest.raises(NoPendingContinuation) as info:
        conts.release("conv-1", "u1", error="boom")
    assert info.value.reason == "not_claimed"
    claimed = conts.claim("conv-1", "u1")
    written = store.stream_version(conts.stream_id("conv-1", "u1"))
    with pytest.raises(ResumeInProgress):
        conts.release("conv-1", "u1", claim_id="someone-else")
    with pytest.raises(ResumeInProgress):
        conts.complete("conv-1", "u1", tool_results=[], claim_id="someone-else")
    assert store.stream_version(conts.stream_id("conv-1", "u1")) == written
    back = conts.release("conv-1", "u1", claim_id=claimed.claim_id)
    assert back.status == "pending" and back.claim_id is None and back.claimed_at is None


def test_sweep_rechecks_each_candidate_when_it_writes(conts: Continuations, clock: Clock,
                                                      store: EventStore,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A pause found expired, or a claim found stale, that changed before the sweep writes (the
    pause made afresh, the claim released and made again) is left alone: the sweep's
    compare-and-set decides on the state it writes at, not on the query's rows."""
    pause(conts, "conv-a")
    pause(conts, "conv-b")
    conts.claim("conv-b", "u1")
    clock.advance(hours=1)  # conv-a past its ttl, conv-b's claim stale
    real = conts._sweep_candidates

    def candidates(kind: str, at: datetime, tenant_id: str | None) -> Any:
        found = real(kind, at, tenant_id)
        if kind == "claim":
            conts.release("conv-b", "u1")
            conts.claim("conv-b", "u1")  # a fresh claim, at clock.now
        else:
            pause(conts, "conv-a")  # a fresh pause, expiring in 30 minutes
        return found

    monkeypatch.setattr(conts, "_sweep_candidates", candidates)
    assert conts.sweep() == SweepResult(reverted=[], expired=[])
    got = conts.get("conv-a", "u1")
    assert got is not None and got.status == "pending"
    assert conts.get("conv-b", "u1").status == "resuming"  # type: ignore[union-attr]
    types = [e.type for e in store.read_all()]
    assert "ContinuationExpired" not in types and "ResumeTimedOut" not in types


def test_a_claim_exactly_the_claim_timeout_old_is_not_put_back(
        conts: Continuations, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stale means older than the claim timeout: a claim made exactly ``claim_timeout`` before
    the sweep's ``now`` stays, whether the query finds it or a stale claim found by the query
    was made again at that instant before the sweep wrote."""
    pause(conts, "conv-a")
    conts.claim("conv-a", "u1")
    at = clock.now + timedelta(minutes=10)
    assert conts.sweep(now=at).reverted == []
    clock.advance(minutes=1)
    real = conts._sweep_candidates

    def candidates(kind: str, when: datetime, tenant_id: str | None) -> Any:
        found = real(kind, when, tenant_id)
        if kind == "claim" and found:
            conts.release("conv-a", "u1")
            conts.claim("conv-a", "u1")  # made again at clock.now, exactly the timeout old
        return found

    monkeypatch.setattr(conts, "_sweep_candidates", candidates)
    assert conts.sweep(now=clock.now + timedelta(minutes=10)).reverted == []
    assert conts.get("conv-a", "u1").status == "resuming"  # type: ignore[union-attr]


def test_only_a_put_back_claim_is_told_it_was_released_or_timed_out(
        conts: Continuations) -> None:
    """The "released, or timed out" hint is for a resumer whose claim was put back (a
    ``claim_id`` and a pending pause), not for a completion without a claim id nor for a
    consumed continuation."""
    pause(conts)
    with pytest.raises(NoPendingContinuation) as info:
        conts.complete("conv-1", "u1", tool_results=[])
    assert info.value.reason == "not_claimed" and "timed out" not in str(info.value)
    claimed = conts.claim("conv-1", "u1")
    conts.complete("conv-1", "u1", tool_results=[], claim_id=claimed.claim_id)
    with pytest.raises(NoPendingContinuation) as info:
        conts.complete("conv-1", "u1", tool_results=[], claim_id=claimed.claim_id)
    assert info.value.reason == "consumed" and "timed out" not in str(info.value)


def test_pending_for_user_refuses_a_bad_user_id(conts: Continuations) -> None:
    """An empty or non-text user id is refused as get's is (not answered with an empty list)."""
    for bad in ("", 5, None):
        with pytest.raises(InvalidArgument, match="user_id"):
            conts.pending_for_user(bad)  # type: ignore[arg-type]


def test_each_id_and_agent_config_are_checked(conts: Continuations, store: EventStore) -> None:
    """An empty or non-text user id is refused by every command, as the conversation id is, and
    an agent_config that is not a dict by pause; nothing is written."""
    for bad in ("", 5):
        with pytest.raises(InvalidArgument, match="user_id"):
            pause(conts, "conv-1", bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="user_id"):
            conts.get("conv-1", bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="user_id"):
            conts.claim("conv-1", bad)  # type: ignore[arg-type]
    for config in ([("model", "m")], "model=m", None):
        with pytest.raises(InvalidArgument, match="agent_config must be a dict"):
            conts.pause("conv-1", "u1", messages=[], pending_tool_calls=[], tools=[],
                        tool_schemas=[], agent_config=config)  # type: ignore[arg-type]
    assert store.stats()["events"] == 0


def test_the_whole_execution_state_is_kept_through_claim_and_release(
        conts: Continuations) -> None:
    """get, claim and release give back every part of the paused state: messages, tool
    calls, tools, schemas, config, client tools and the pause's ttl."""
    paused = pause(conts, client_tools=[{"name": "browser"}], ttl=timedelta(hours=1),
                   messages=[{"role": "user", "content": "hi"}, {"role": "assistant"}])
    expected = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}],
                "pending_tool_calls": [{"id": "call-1", "name": "approve"}],
                "tools": ["approve"], "tool_schemas": [{"name": "approve"}],
                "agent_config": {"model": "m"}, "client_tools": [{"name": "browser"}],
                "pause_id": paused.pause_id, "ttl": timedelta(hours=1)}

    def kept(c: Any) -> dict[str, Any]:
        return {k: getattr(c, k) for k in expected}

    assert kept(conts.get("conv-1", "u1")) == expected
    assert kept(conts.claim("conv-1", "u1")) == expected
    assert kept(conts.release("conv-1", "u1", error="x")) == expected
    assert kept(conts.pending_for_user("u1")[0]) == expected


def test_the_projection_is_registered_for_the_command_line() -> None:
    """``eventstore projections … continuations`` knows the projection by name."""
    factory = registered()["continuations"]
    assert isinstance(factory(), ContinuationProjection)
    assert factory().name == "continuations"


def test_a_late_resumer_is_told_why_and_the_pause_records_it(conts: Continuations,
                                                             clock: Clock) -> None:
    """A claim put back by the sweep leaves ``last_error`` "claim timed out"; once the pause
    has expired (and the sweep recorded it) a complete or release by that resumer says
    ``reason="expired"``, not ``not_claimed``."""
    pause(conts)
    claimed = conts.claim("conv-1", "u1")
    clock.advance(minutes=11)
    conts.sweep()
    back = conts.get("conv-1", "u1")
    assert back is not None and back.status == "pending" and back.last_error == "claim timed out"
    clock.advance(minutes=31)
    assert conts.sweep().expired == [("default", "conv-1", "u1")]
    for command in (lambda: conts.complete("conv-1", "u1", tool_results=[],
                                           claim_id=claimed.claim_id),
                    lambda: conts.release("conv-1", "u1", claim_id=claimed.claim_id)):
        with pytest.raises(NoPendingContinuation) as info:
            command()
        assert info.value.reason == "expired"


def test_a_late_resumer_is_told_expired_before_any_sweep_records_it(conts: Continuations,
                                                                    clock: Clock) -> None:
    """Once a pause put back by a sweep is past its ``expires_at``, complete and release by the
    old claim say ``reason="expired"`` as claim does, whether or not a sweep recorded it."""
    pause(conts)
    claimed = conts.claim("conv-1", "u1")
    clock.advance(minutes=11)
    assert conts.sweep().reverted == [("default", "conv-1", "u1")]
    clock.advance(minutes=31)
    for command in (lambda: conts.claim("conv-1", "u1"),
                    lambda: conts.complete("conv-1", "u1", tool_results=[],
                                           claim_id=claimed.claim_id),
                    lambda: conts.release("conv-1", "u1", claim_id=claimed.claim_id)):
        with pytest.raises(NoPendingContinuation, match="expired") as info:
            command()
        assert info.value.reason == "expired"
    assert conts.sweep().expired == [("default", "conv-1", "u1")]


def test_an_expiry_recorded_ahead_of_the_facade_clock_is_final(conts: Continuations,
                                                               clock: Clock) -> None:
    """A sweep given a later ``now`` (another process's clock) records an expiry before this
    facade's clock reaches ``expires_at``; the recorded expiry holds: get is None, claim says
    expired, pending_for_user leaves it out."""
    pause(conts)
    assert conts.sweep(now=clock.now + timedelta(hours=1)).expired == [
        ("default", "conv-1", "u1")]
    assert conts.get("conv-1", "u1") is None
    assert conts.pending_for_user("u1") == []
    with pytest.raises(NoPendingContinuation) as info:
        conts.claim("conv-1", "u1")
    assert info.value.reason == "expired"


def test_a_new_pause_replaces_a_claimed_one_and_the_old_claim_is_refused(
        conts: Continuations) -> None:
    """The agent paused again while a resumer held the claim: the new pause is pending, and
    the old claim can neither complete nor release it."""
    old = conts.claim("conv-1", "u1") if pause(conts) else None
    assert old is not None
    again = pause(conts, messages=[{"role": "user", "content": "again"}])
    got = conts.get("conv-1", "u1")
    assert got is not None and got.status == "pending" and got.claim_id is None
    assert got.pause_id == again.pause_id != old.pause_id
    for finish in (lambda: conts.complete("conv-1", "u1", tool_results=[], claim_id=old.claim_id),
                   lambda: conts.release("conv-1", "u1", claim_id=old.claim_id)):
        with pytest.raises(NoPendingContinuation) as refused:
            finish()
        assert refused.value.reason == "not_claimed"
    assert conts.claim("conv-1", "u1").pause_id == again.pause_id
