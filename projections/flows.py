"""Flow state: the state a flow saves after each completed step, and human feedback.

One stream per flow: ``flow-<flow_id>``.  State is stored as type-keeping JSON
(:mod:`projections.typed_json`), so datetimes, UUIDs, decimals and sets come back equal.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from eventstore import Event, EventStore, RecordedEvent
from eventstore.errors import EventDecodeError

from ._command import Clock, check_text, decide, utc_clock
from ._engine import Projection, RowIndex, current, inline, register
from ._stores import check_sync_store
from .errors import NoPendingFeedback
from .events import FeedbackRequested, FeedbackResolved, FlowStateSaved
from .typed_json import from_json, to_json

__all__ = ["FlowProjection", "FlowSave", "FlowState", "Flows", "PendingFeedback"]

CATEGORY = "flow"


class FlowState(msgspec.Struct, kw_only=True):
    """A flow's latest saved state (as stored JSON) and its pending feedback request."""

    flow_id: str = ""
    state: Any = None
    method_name: str | None = None
    saves: int = 0
    saved_at: datetime | None = None
    feedback_pending: bool = False
    feedback_context: Any = None
    feedback_state: Any = None
    feedback_requested_at: datetime | None = None
    last_feedback: Any = None
    resolutions: int = 0  # feedback requests resolved so far (an answer may be None)


class FlowSave(msgspec.Struct, frozen=True, kw_only=True):
    """One saved step of a flow's history."""

    method_name: str
    state: Any
    at: datetime
    version: int


class PendingFeedback(msgspec.Struct, frozen=True, kw_only=True):
    """A flow's open request for human feedback."""

    flow_id: str
    context: Any
    state: Any
    requested_at: datetime


class FlowProjection(Projection[FlowState]):
    """Folds a flow stream into its latest state and pending feedback."""

    name = "flows"
    version = 1  # rows without ``resolutions`` read it as 0 (see resolve_feedback)
    categories = (CATEGORY,)
    state_type = FlowState
    snapshot_every = None

    def initial(self, tenant_id: str, stream_id: str) -> FlowState:
        return FlowState(flow_id=stream_id[len(CATEGORY) + 1:])

    def evolve(self, state: FlowState, event: RecordedEvent) -> FlowState:
        d = event.data
        if isinstance(d, FlowStateSaved):
            return msgspec.structs.replace(state, state=d.state, method_name=d.method_name,
                                           saves=state.saves + 1, saved_at=d.at)
        if isinstance(d, FeedbackRequested):
            return msgspec.structs.replace(state, feedback_pending=True,
                                           feedback_context=d.context, feedback_state=d.state,
                                           feedback_requested_at=d.at)
        if isinstance(d, FeedbackResolved):
            return msgspec.structs.replace(state, feedback_pending=False, feedback_context=None,
                                           feedback_state=None, feedback_requested_at=None,
                                           last_feedback=d.feedback,
                                           resolutions=state.resolutions + 1)
        return state

    def index(self, state: FlowState) -> RowIndex:
        return RowIndex(status="awaiting_feedback" if state.feedback_pending else "running")


register("flows", FlowProjection)


class Flows:
    """Save and load flow state; request, read and resolve human feedback."""

    def __init__(self, store: EventStore, *, clock: Clock | None = None) -> None:
        check_sync_store(store, "Flows", "projections.aio.AsyncFlows")
        self.store = store
        self.now = utc_clock(clock)
        self.projection = FlowProjection()
        inline(store, self.projection)

    @staticmethod
    def stream_id(flow_id: str) -> str:
        return f"{CATEGORY}-{check_text(flow_id, 'flow_id')}"

    def _state(self, flow_id: str, tenant_id: str) -> FlowState:
        return current(self.store, self.projection, self.stream_id(flow_id),
                       tenant_id=tenant_id)[0]

    def save(self, flow_id: str, method_name: str, state: Any, *,
             tenant_id: str = "default") -> int:
        """Record the flow's state after step ``method_name``; returns the stream version."""
        check_text(method_name, "method_name")
        event = FlowStateSaved(flow_id=flow_id, method_name=method_name, state=to_json(state),
                               at=self.now())
        return self.store.append(self.stream_id(flow_id), [event],
                                 tenant_id=tenant_id).stream_version

    def load(self, flow_id: str, *, tenant_id: str = "default") -> Any | None:
        """The latest saved state, or ``None`` when the flow saved none."""
        st = self._state(flow_id, tenant_id)
        return from_json(st.state) if st.saves else None

    def history(self, flow_id: str, *, tenant_id: str = "default") -> list[FlowSave]:
        """Every saved step, oldest first."""
        saves = []
        for e in self.store.read_stream(self.stream_id(flow_id), tenant_id=tenant_id):
            if isinstance(e.data, FlowStateSaved):
                try:
                    state = from_json(e.data.state)
                except EventDecodeError as err:  # (stored before appends were checked)
                    raise EventDecodeError.at(err, position=e.position, type=e.type,
                                              stream_id=e.stream_id,
                                              tenant_id=e.tenant_id) from None
                saves.append(FlowSave(method_name=e.data.method_name, state=state,
                                      at=e.data.at, version=e.version))
        return saves

    def request_feedback(self, flow_id: str, context: Any, state: Any, *,
                         tenant_id: str = "default") -> int:
        """Pause the flow for human feedback (replacing an open request); returns the version."""
        event = FeedbackRequested(flow_id=flow_id, context=to_json(context),
                                  state=to_json(state), at=self.now())
        return self.store.append(self.stream_id(flow_id), [event],
                                 tenant_id=tenant_id).stream_version

    def pending_feedback(self, flow_id: str, *, tenant_id: str = "default"
                         ) -> PendingFeedback | None:
        """The open feedback request, or ``None``."""
        st = self._state(flow_id, tenant_id)
        if not st.feedback_pending or st.feedback_requested_at is None:
            return None
        return PendingFeedback(flow_id=flow_id, context=from_json(st.feedback_context),
                               state=from_json(st.feedback_state),
                               requested_at=st.feedback_requested_at)

    def resolve_feedback(self, flow_id: str, feedback: Any, *,
                         tenant_id: str = "default") -> PendingFeedback:
        """Answer the open request; of concurrent resolutions exactly one wins.

        Returns the request it resolved; raises :class:`NoPendingFeedback` when there is none
        (never requested, or another caller resolved it first).
        """
        stream = self.stream_id(flow_id)
        encoded = to_json(feedback)
        now = self.now()

        def decision(st: FlowState, version: int) -> list[Event]:
            if not st.feedback_pending:
                raise NoPendingFeedback(f"flow {flow_id} has no pending feedback request",
                                        reason="resolved" if st.resolutions
                                        or st.last_feedback is not None else "none")
            return [FeedbackResolved(flow_id=flow_id, feedback=encoded, at=now)]

        st, _v, _r = decide(self.store, self.projection, stream, tenant_id=tenant_id,
                            decision=decision)
        assert st.feedback_requested_at is not None  # a pending request always has its time
        return PendingFeedback(flow_id=flow_id, context=from_json(st.feedback_context),
                               state=from_json(st.feedback_state),
                               requested_at=st.feedback_requested_at)
