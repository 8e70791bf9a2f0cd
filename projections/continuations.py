"""Tool-call continuations: an agent paused on tool calls, kept until the client resumes it.

One stream per (conversation, user): ``continuation-<len>:<conversation>.<len>:<user>``.  The
lifecycle is pending -> resuming -> consumed, with ``release`` (resuming -> pending), expiry
(pending past its time to live) and ``sweep`` (claims older than the claim timeout go back to
pending; pending pauses past their time to live are recorded as expired).  Every transition is a
compare-and-set on the stream version, so of two concurrent claims exactly one wins.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from eventstore import Event, EventStore, RecordedEvent
from eventstore._time import to_micros
from eventstore.errors import InvalidArgument

from ._command import (
    Clock,
    check_duration,
    check_tenant,
    check_text,
    composite_id,
    decide,
    decide_folded,
    sweep_time,
    time_after,
    utc_clock,
)
from ._engine import Projection, RowIndex, current, inline, query_rows, register
from ._stores import check_sync_store
from .errors import NoPendingContinuation, ResumeInProgress
from .events import (
    ContinuationExpired,
    ResumeReleased,
    ResumeStarted,
    ResumeTimedOut,
    ToolCallsPaused,
    ToolCallsResumed,
)

__all__ = ["Continuation", "ContinuationProjection", "Continuations", "SweepResult"]

CATEGORY = "continuation"


SWEEP_KINDS = ("claim", "expiry")  # stale claims put back, then expiries recorded
DEFAULT_TTL = timedelta(minutes=30)  # how long a pause waits for its resume
DEFAULT_CLAIM_TIMEOUT = timedelta(minutes=10)  # a claim older than this is swept back
_LAST = datetime.max.replace(tzinfo=UTC)


class Continuation(msgspec.Struct, kw_only=True):
    """A paused agent's execution state and where it is in its lifecycle.

    ``status`` is ``absent``, ``pending``, ``resuming``, ``consumed`` or ``expired``.
    """

    conversation_id: str = ""
    user_id: str = ""
    status: str = "absent"
    pause_id: str | None = None
    messages: list[Any] = msgspec.field(default_factory=list)
    pending_tool_calls: list[Any] = msgspec.field(default_factory=list)
    tools: list[Any] = msgspec.field(default_factory=list)
    tool_schemas: list[Any] = msgspec.field(default_factory=list)
    agent_config: dict[str, Any] = msgspec.field(default_factory=dict)
    client_tools: list[Any] | None = None
    expires_at: datetime | None = None
    claim_id: str | None = None
    claimed_at: datetime | None = None
    tool_results: list[Any] | None = None
    last_error: str | None = None
    paused_at: datetime | None = None
    # The time to live the pause was given (or the facade's then), which a release starts
    # afresh; None for a pause recorded before events carried it: the facade's now.
    ttl: timedelta | None = None


class ContinuationProjection(Projection[Continuation]):
    """Folds a (conversation, user) stream into its current continuation."""

    name = "continuations"
    version = 3  # 2: paused_at from the event (the facade clock); 3: the pause's own ttl
    categories = (CATEGORY,)
    state_type = Continuation
    snapshot_every = None

    def initial(self, tenant_id: str, stream_id: str) -> Continuation:
        return Continuation()

    def evolve(self, state: Continuation, event: RecordedEvent) -> Continuation:
        d = event.data
        if isinstance(d, ToolCallsPaused):
            return Continuation(
                conversation_id=d.conversation_id, user_id=d.user_id, status="pending",
                pause_id=d.pause_id, messages=d.messages, pending_tool_calls=d.pending_tool_calls,
                tools=d.tools, tool_schemas=d.tool_schemas, agent_config=d.agent_config,
                client_tools=d.client_tools, expires_at=d.expires_at,
                paused_at=d.paused_at or event.recorded_at, ttl=d.ttl)
        if state.pause_id is None or getattr(d, "pause_id", None) != state.pause_id:
            return state
        if isinstance(d, ResumeStarted):
            return msgspec.structs.replace(state, status="resuming", claim_id=d.claim_id,
                                           claimed_at=d.claimed_at)
        if isinstance(d, ToolCallsResumed):
            return msgspec.structs.replace(state, status="consumed",
                                           tool_results=d.tool_results)
        if isinstance(d, (ResumeReleased, ResumeTimedOut)):
            error = d.error if isinstance(d, ResumeReleased) else "claim timed out"
            return msgspec.structs.replace(state, status="pending", claim_id=None,
                                           claimed_at=None, expires_at=d.expires_at,
                                           last_error=error)
        if isinstance(d, ContinuationExpired):
            return msgspec.structs.replace(state, status="expired")
        return state

    def index(self, state: Continuation) -> RowIndex:
        # Sweeps look for claims by claim time and for pending pauses by expiry.
        when = state.claimed_at if state.status == "resuming" else state.expires_at
        return RowIndex(status=state.status, group_key=state.user_id or None,
                        sort_key=to_micros(when) if when is not None else None)


register("continuations", ContinuationProjection)


class SweepResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one sweep changed."""

    reverted: list[tuple[str, str, str]]  # (tenant, conversation, user) claims put back
    expired: list[tuple[str, str, str]]  # (tenant, conversation, user) pauses expired


class Continuations:
    """Pause, get, claim, complete, release and sweep tool-call continuations."""

    def __init__(self, store: EventStore, *, ttl: timedelta = DEFAULT_TTL,
                 claim_timeout: timedelta = DEFAULT_CLAIM_TIMEOUT,
                 clock: Clock | None = None) -> None:
        check_duration(ttl, "ttl")
        check_duration(claim_timeout, "claim_timeout")
        check_sync_store(store, "Continuations", "projections.aio.AsyncContinuations")
        self.store = store
        self.ttl = ttl
        self.claim_timeout = claim_timeout
        self.now = utc_clock(clock)
        self.projection = ContinuationProjection()
        inline(store, self.projection)

    @staticmethod
    def stream_id(conversation_id: str, user_id: str) -> str:
        return f"{CATEGORY}-{composite_id(conversation_id, user_id)}"

    def _ids(self, conversation_id: str, user_id: str) -> str:
        check_text(conversation_id, "conversation_id")
        check_text(user_id, "user_id")
        return self.stream_id(conversation_id, user_id)

    def pause(
        self,
        conversation_id: str,
        user_id: str,
        *,
        messages: Sequence[Any],
        pending_tool_calls: Sequence[Any],
        tools: Sequence[Any],
        tool_schemas: Sequence[Any],
        agent_config: dict[str, Any],
        client_tools: Sequence[Any] | None = None,
        tenant_id: str = "default",
        ttl: timedelta | None = None,
    ) -> ToolCallsPaused:
        """Keep the execution state until the client resumes; replaces the pause there,
        pending or claimed (a resumer still holding the old claim is then refused:
        ``NoPendingContinuation``, ``reason="not_claimed"``).

        Returns the ``ToolCallsPaused`` event recorded (its ``pause_id``, ``expires_at``, ...);
        :meth:`get` gives the continuation it made pending."""
        stream = self._ids(conversation_id, user_id)
        if not isinstance(agent_config, dict):
            raise InvalidArgument("agent_config must be a dict")
        for what, value in (("messages", messages), ("pending_tool_calls", pending_tool_calls),
                            ("tools", tools), ("tool_schemas", tool_schemas),
                            ("client_tools", [] if client_tools is None else client_tools)):
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise InvalidArgument(f"{what} must be a list")
        life = check_duration(ttl if ttl is not None else self.ttl, "ttl")
        now = self.now()
        event = ToolCallsPaused(
            conversation_id=conversation_id, user_id=user_id, pause_id=uuid.uuid4().hex,
            messages=list(messages), pending_tool_calls=list(pending_tool_calls),
            tools=list(tools), tool_schemas=list(tool_schemas), agent_config=agent_config,
            client_tools=list(client_tools) if client_tools is not None else None,
            expires_at=time_after(now, life, "the pause's expiry"), paused_at=now, ttl=life)
        # At the version its state was read at (retried on a conflict): whatever the pending
        # pause is by then, this one replaces it.
        decide_folded(self.store, self.projection, stream, tenant_id=tenant_id,
                      decision=lambda _state, _version: [event])
        return event

    def _state(self, stream: str, tenant_id: str) -> Continuation:
        return current(self.store, self.projection, stream, tenant_id=tenant_id)[0]

    def _expired(self, state: Continuation, now: datetime) -> bool:
        return state.status == "expired" or (
            state.status == "pending" and state.expires_at is not None
            and state.expires_at <= now)

    def get(self, conversation_id: str, user_id: str, *,
            tenant_id: str = "default") -> Continuation | None:
        """The pending (or resuming) continuation; ``None`` when absent, consumed or expired."""
        state = self._state(self._ids(conversation_id, user_id), tenant_id)
        if state.status in ("absent", "consumed") or self._expired(state, self.now()):
            return None
        return state

    def claim(self, conversation_id: str, user_id: str, *,
              tenant_id: str = "default") -> Continuation:
        """pending -> resuming, atomically; returns the continuation with its ``claim_id``.

        Raises :class:`ResumeInProgress` when another resumer holds it and
        :class:`NoPendingContinuation` (``reason``: absent, expired or consumed) otherwise.
        """
        stream = self._ids(conversation_id, user_id)
        claim_id = uuid.uuid4().hex
        now = self.now()

        def decision(state: Continuation, version: int) -> list[Event]:
            self._require_pending(state, now, conversation_id, user_id)
            assert state.pause_id is not None
            return [ResumeStarted(pause_id=state.pause_id, claim_id=claim_id, claimed_at=now)]

        return decide_folded(self.store, self.projection, stream, tenant_id=tenant_id,
                             decision=decision)

    def _require_pending(self, state: Continuation, now: datetime, cid: str, uid: str) -> None:
        where = f"conversation {cid}, user {uid}"
        if state.status == "resuming":
            raise ResumeInProgress(f"continuation of {where} is already being resumed")
        if state.status == "absent":
            raise NoPendingContinuation(f"no paused tool calls for {where}", reason="absent")
        if state.status == "consumed":
            raise NoPendingContinuation(f"the continuation of {where} was already resumed",
                                        reason="consumed")
        if self._expired(state, now):
            raise NoPendingContinuation(f"the continuation of {where} expired at "
                                        f"{state.expires_at}", reason="expired")

    def _require_claim(self, state: Continuation, claim_id: str | None, cid: str,
                       uid: str) -> None:
        where = f"conversation {cid}, user {uid}"
        if state.status != "resuming":
            # A pending pause past its expiry is expired for every command, swept or not.
            status = "expired" if self._expired(state, self.now()) else state.status
            reason = status if status in ("absent", "consumed", "expired") else "not_claimed"
            why = ""
            if reason == "not_claimed" and claim_id is not None:
                why = (" (this claim was released, or timed out and was put back by a sweep; "
                       "claim it again to resume)")
            raise NoPendingContinuation(f"the continuation of {where} is {status}, "
                                        f"not being resumed{why}", reason=reason)
        if claim_id is not None and claim_id != state.claim_id:
            raise ResumeInProgress(f"the continuation of {where} is claimed by another resumer")

    def complete(self, conversation_id: str, user_id: str, *, tool_results: Sequence[Any],
                 claim_id: str | None = None, tenant_id: str = "default") -> Continuation:
        """resuming -> consumed, recording the tool results.

        Raises :class:`NoPendingContinuation` when nothing is being resumed: ``reason``
        absent, expired (also a pending pause past its ``expires_at`` that no sweep recorded)
        or consumed, or ``not_claimed`` when the pause is pending again (the claim was released,
        or timed out and a sweep put it back); :class:`ResumeInProgress`
        when another resumer's claim holds it (``claim_id`` differs).
        """
        stream = self._ids(conversation_id, user_id)
        if isinstance(tool_results, (str, bytes)) or not isinstance(tool_results, Sequence):
            raise InvalidArgument("tool_results must be a list")

        def decision(state: Continuation, version: int) -> list[Event]:
            self._require_claim(state, claim_id, conversation_id, user_id)
            assert state.pause_id is not None and state.claim_id is not None
            return [ToolCallsResumed(pause_id=state.pause_id, claim_id=state.claim_id,
                                     tool_results=list(tool_results))]

        return decide_folded(self.store, self.projection, stream, tenant_id=tenant_id,
                             decision=decision)

    def release(self, conversation_id: str, user_id: str, *, error: str | None = None,
                claim_id: str | None = None, tenant_id: str = "default") -> Continuation:
        """resuming -> pending with a fresh time to live, the pause's own (the resume failed).
        Raises as :meth:`complete` does."""
        stream = self._ids(conversation_id, user_id)

        def decision(state: Continuation, version: int) -> list[Event]:
            self._require_claim(state, claim_id, conversation_id, user_id)
            assert state.pause_id is not None and state.claim_id is not None
            return [ResumeReleased(pause_id=state.pause_id, claim_id=state.claim_id,
                                   error=error, expires_at=time_after(
                                       self.now(), state.ttl or self.ttl, "the new expiry"))]

        return decide_folded(self.store, self.projection, stream, tenant_id=tenant_id,
                             decision=decision)

    def pending_for_user(self, user_id: str, *, tenant_id: str = "default"
                         ) -> list[Continuation]:
        """The user's pending (not expired) continuations, soonest to expire first."""
        check_text(user_id, "user_id")
        check_tenant(tenant_id)  # None would read every tenant's
        now = self.now()
        rows = query_rows(self.store, self.projection, tenant_id=tenant_id, status="pending",
                          group_key=user_id)
        return [st for _t, _s, st, _v in rows if not self._expired(st, now)]

    def sweep(self, now: datetime | None = None, *, tenant_id: str | None = None) -> SweepResult:
        """Put stale claims back to pending and record expiries as events; returns them.

        Safe to run from several processes at once: each change is a compare-and-set, so each
        claim is reverted and each pause expired exactly once.
        """
        at = sweep_time(now, tenant_id, self.now)
        done: dict[str, list[tuple[str, str, str]]] = {kind: [] for kind in SWEEP_KINDS}
        for kind in SWEEP_KINDS:
            for tenant, stream, who in self._sweep_candidates(kind, at, tenant_id):
                if self._sweep_one(stream, tenant, at, kind):
                    done[kind].append(who)
        return SweepResult(reverted=done["claim"], expired=done["expiry"])

    # sweep's steps (each change its own transaction; AsyncContinuations runs them one by one)

    def _sweep_candidates(self, kind: str, at: datetime, tenant_id: str | None
                          ) -> list[tuple[str, str, tuple[str, str, str]]]:
        """(tenant, stream, (tenant, conversation, user)) of the stale claims ("claim") or
        the pauses past their time to live ("expiry") at ``at``."""
        if kind == "claim":
            stale_before = self._stale_before(at)
            if stale_before is None:
                return []
            rows = query_rows(self.store, self.projection, tenant_id=tenant_id,
                              status="resuming", sort_before=to_micros(stale_before))
        else:
            rows = query_rows(self.store, self.projection, tenant_id=tenant_id,
                              status="pending", sort_before=to_micros(at) + 1)
        return [(tenant, stream, (tenant, st.conversation_id, st.user_id))
                for tenant, stream, st, _v in rows]

    def _stale_before(self, at: datetime) -> datetime | None:
        """A claim made before this time (older than the claim timeout), seen at ``at``, is
        stale; None: none is (``at`` is less than the claim timeout after the first
        datetime)."""
        try:
            return at - self.claim_timeout
        except OverflowError:
            return None

    def _sweep_one(self, stream: str, tenant_id: str, at: datetime, kind: str) -> bool:
        def decision(state: Continuation, version: int) -> list[Event]:
            if kind == "claim":
                stale_before = self._stale_before(at)
                if (state.status != "resuming" or state.claimed_at is None
                        or stale_before is None or state.claimed_at >= stale_before):
                    return []
                assert state.pause_id is not None and state.claim_id is not None
                try:
                    expires_at = at + (state.ttl or self.ttl)
                except OverflowError:  # a sweep at the end of time: it never expires
                    expires_at = _LAST
                return [ResumeTimedOut(pause_id=state.pause_id, claim_id=state.claim_id,
                                       expires_at=expires_at)]
            if state.status != "pending" or state.expires_at is None or state.expires_at > at:
                return []
            assert state.pause_id is not None
            return [ContinuationExpired(pause_id=state.pause_id, expired_at=at)]

        _s, _v, result = decide(self.store, self.projection, stream, tenant_id=tenant_id,
                                decision=decision)
        return result is not None
