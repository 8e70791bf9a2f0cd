"""A model-based test of ``projections.Continuations`` against a plain-Python model.

The model follows the README ("Tool-call continuations") and the docstrings of
``projections.continuations`` and ``projections.errors``: pending -> resuming -> consumed, a
release or a swept stale claim back to pending with a fresh time to live, expiry from the
instant ``expires_at`` is reached, a new pause replacing the one there.  Hypothesis draws random
calls over a few conversations of one user (time moves by an injected clock); after each call
the outcome (value or exact error type and ``reason``) and every ``get`` and
``pending_for_user`` must match the model.  Each example works under a tenant of its own.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstore import EventStore
from projections.continuations import Continuation, Continuations
from projections.errors import Conflict, NoPendingContinuation, ResumeInProgress
from tests._clock import Clock
from tests._examples import examples
from tests._model import Refused

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(seconds=60)
CLAIM_TIMEOUT = timedelta(seconds=20)
USER = "alice"
CONVERSATIONS = ["c0", "c1", "c2"]


@dataclass
class MCont:
    status: str = "absent"
    pause_id: str | None = None
    ttl: timedelta | None = None
    expires_at: datetime | None = None
    claim_id: str | None = None
    claimed_at: datetime | None = None
    tool_results: Any = None
    messages: Any = None

    def observable(self) -> dict[str, Any]:
        return {"status": self.status, "pause_id": self.pause_id, "expires_at": self.expires_at,
                "claim_id": self.claim_id, "claimed_at": self.claimed_at,
                "messages": self.messages}


def observed(c: Continuation) -> dict[str, Any]:
    return {"status": c.status, "pause_id": c.pause_id, "expires_at": c.expires_at,
            "claim_id": c.claim_id, "claimed_at": c.claimed_at, "messages": c.messages}


class Model:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.conts = {c: MCont() for c in CONVERSATIONS}

    def lapsed(self, c: MCont) -> bool:
        """A pending pause expires at its ``expires_at``, swept or not."""
        return c.expires_at is not None and self.clock.now >= c.expires_at

    def pause(self, conv: str, messages: Any, ttl: timedelta | None, pause_id: str) -> None:
        own = ttl or TTL
        self.conts[conv] = MCont("pending", pause_id, own, self.clock.now + own, messages=messages)

    def get(self, conv: str) -> MCont | None:
        c = self.conts[conv]
        if c.status == "resuming" or (c.status == "pending" and not self.lapsed(c)):
            return c
        return None

    def claim(self, conv: str, claim_id: str | None) -> MCont:
        c = self.conts[conv]
        if c.status == "resuming":
            raise Refused(ResumeInProgress, "resuming")
        if c.status == "pending":
            if self.lapsed(c):
                raise Refused(NoPendingContinuation, "expired")
            c.status, c.claim_id, c.claimed_at = "resuming", claim_id, self.clock.now
            return c
        raise Refused(NoPendingContinuation, c.status)

    def resumer(self, conv: str, claim_id: str | None) -> MCont:
        """The checks of ``complete`` and ``release``."""
        c = self.conts[conv]
        if c.status == "resuming":
            if claim_id is not None and claim_id != c.claim_id:
                raise Refused(ResumeInProgress, "resuming")
            return c
        if c.status == "pending":
            raise Refused(NoPendingContinuation, "expired" if self.lapsed(c) else "not_claimed")
        raise Refused(NoPendingContinuation, c.status)

    def complete(self, conv: str, claim_id: str | None, results: Any) -> MCont:
        c = self.resumer(conv, claim_id)
        c.status, c.tool_results = "consumed", results
        return c

    def release(self, conv: str, claim_id: str | None) -> MCont:
        c = self.resumer(conv, claim_id)
        assert c.ttl is not None
        c.status, c.claim_id, c.claimed_at = "pending", None, None
        c.expires_at = self.clock.now + c.ttl
        return c

    def sweep(self) -> tuple[list[str], list[str]]:
        reverted, expired = [], []
        now = self.clock.now
        for conv, c in self.conts.items():
            if (c.status == "resuming" and c.claimed_at is not None
                    and now - c.claimed_at > CLAIM_TIMEOUT):
                assert c.ttl is not None
                c.status, c.claim_id, c.claimed_at = "pending", None, None
                c.expires_at = now + c.ttl
                reverted.append(conv)
            elif c.status == "pending" and self.lapsed(c):
                c.status = "expired"
                expired.append(conv)
        return reverted, expired


CONV = st.sampled_from(CONVERSATIONS)
# Whole ttls (reaching an ``expires_at`` exactly: expired from that instant) and odd steps (that
# never land on the claim timeout, where "older than" is not said to be strict or not).
ADVANCES = st.sampled_from([7.3, 13.1, 30, 31.7, 45.9, 60])
CLAIM_REF = st.sampled_from(["current", "current", "none", "stale"])
OPERATIONS = st.one_of(
    st.tuples(st.just("pause"), CONV, st.integers(0, 3), st.sampled_from([None, 30, 90])),
    st.tuples(st.just("claim"), CONV), st.tuples(st.just("claim"), CONV),
    st.tuples(st.just("complete"), CONV, CLAIM_REF),
    st.tuples(st.just("release"), CONV, CLAIM_REF),
    st.tuples(st.just("advance"), ADVANCES),
    st.tuples(st.just("advance"), ADVANCES),
    st.tuples(st.just("sweep")),
    st.tuples(st.just("get"), CONV),
)


def outcome(call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call``'s result as comparable data, or its refusal as (error type, reason)."""
    try:
        got = call(*args, **kwargs)
    except (Refused, Conflict) as e:
        return (e.kind if isinstance(e, Refused) else type(e), e.reason)
    if isinstance(got, Continuation):
        return observed(got)
    if isinstance(got, MCont):
        return got.observable()
    return got


@settings(max_examples=examples(25), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(OPERATIONS, min_size=10, max_size=40))
def test_continuations_behave_as_documented(store: EventStore,
                                            ops: list[tuple[Any, ...]]) -> None:
    """Random calls on the facade and on the model have the same outcomes and states."""
    tenant = f"t-{uuid.uuid4().hex}"
    clock = Clock(T0)
    conts = Continuations(store, ttl=TTL, claim_timeout=CLAIM_TIMEOUT, clock=clock)
    model = Model(clock)
    stale: dict[str, str] = {}  # per conversation, a claim id it no longer holds
    for step, op in enumerate(ops):
        name = op[0]
        if name == "advance":
            clock.advance(seconds=op[1])
            continue
        if name == "pause":
            _, conv, n, ttl_s = op
            ttl = None if ttl_s is None else timedelta(seconds=ttl_s)
            messages = [{"role": "user", "content": f"m{i}"} for i in range(n)]
            old = model.conts[conv].claim_id
            if old is not None:
                stale[conv] = old
            paused = conts.pause(conv, USER, messages=messages, pending_tool_calls=[],
                                 tools=[], tool_schemas=[], agent_config={},
                                 tenant_id=tenant, ttl=ttl)
            model.pause(conv, messages, ttl, paused.pause_id)
            assert paused.expires_at == model.conts[conv].expires_at
        elif name == "sweep":
            result = conts.sweep(tenant_id=tenant)
            reverted, expired = model.sweep()
            assert sorted(t[1] for t in result.reverted) == reverted, step
            assert sorted(t[1] for t in result.expired) == expired, step
        elif name == "get":
            conv = op[1]
            real = conts.get(conv, USER, tenant_id=tenant)
            want = model.get(conv)
            assert (None if real is None else observed(real)) == (
                None if want is None else want.observable()), step
        elif name == "claim":
            conv = op[1]
            before = model.conts[conv].claim_id
            got = outcome(conts.claim, conv, USER, tenant_id=tenant)
            new_id = got["claim_id"] if isinstance(got, dict) else None
            want = outcome(model.claim, conv, new_id)
            assert got == want, (step, op, got, want)
            if before is not None and isinstance(got, dict):
                stale[conv] = before
        else:
            conv, ref = op[1], op[2]
            current = model.conts[conv].claim_id
            claim_id = {"current": current, "none": None,
                        "stale": stale.get(conv, "never-claimed")}[ref]
            if name == "complete":
                results = [{"id": "call-1", "output": step}]
                got = outcome(conts.complete, conv, USER, tool_results=results,
                              claim_id=claim_id, tenant_id=tenant)
                want = outcome(model.complete, conv, claim_id, results)
            else:
                got = outcome(conts.release, conv, USER, error="boom", claim_id=claim_id,
                              tenant_id=tenant)
                want = outcome(model.release, conv, claim_id)
            assert got == want, (step, op, got, want)
            if current is not None and model.conts[conv].claim_id is None:
                stale[conv] = current
        # Every conversation, and the user's pending list, agree with the model.
        for conv in CONVERSATIONS:
            real = conts.get(conv, USER, tenant_id=tenant)
            want = model.get(conv)
            assert (None if real is None else observed(real)) == (
                None if want is None else want.observable()), (step, op, conv)
        pending = [c for c in CONVERSATIONS
                   if model.conts[c].status == "pending" and not model.lapsed(model.conts[c])]
        listed = conts.pending_for_user(USER, tenant_id=tenant)
        assert sorted(c.conversation_id for c in listed) == pending, (step, op)
        assert [c.expires_at for c in listed] == sorted(
            model.conts[c].expires_at for c in pending), (step, op)  # type: ignore[type-var]
