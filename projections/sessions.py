"""Agent-session snapshots: the state an agent run leaves for the next run of the same node.

One stream per :class:`SessionKey`: ``session-<sha256 of the key>`` (the key's parts are in the
events).  ``save`` appends a snapshot; ``retire`` and ``finish_run`` end a session so that a
workflow loop never resumes a stale snapshot.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

import msgspec

from eventstore import Event, EventStore, RecordedEvent
from eventstore._time import to_micros
from eventstore.errors import InvalidArgument

from ._command import Clock, check_message, check_tenant, check_text, decide, utc_clock
from ._engine import Projection, RowIndex, current, inline, query_rows, register
from ._stores import check_sync_store
from .events import SessionRetired, SessionSnapshotSaved

__all__ = ["AgentSessions", "SessionEntry", "SessionKey", "SessionProjection", "SessionSnapshot",
           "SessionState"]

CATEGORY = "session"


class SessionKey(msgspec.Struct, frozen=True):
    """Which agent session: one agent of one binding of one node in one workflow run."""

    tenant_id: str
    workflow_run_id: str
    node_id: str
    binding_id: str
    agent_id: str

    def stream_id(self) -> str:
        for name in self.__struct_fields__:
            if name == "tenant_id":
                check_tenant(self.tenant_id)
            else:
                check_text(getattr(self, name), name)
        digest = hashlib.sha256(msgspec.json.encode(list(msgspec.structs.astuple(self))))
        return f"{CATEGORY}-{digest.hexdigest()}"


class SessionSnapshot(msgspec.Struct, kw_only=True):
    """One saved snapshot of an agent session."""

    snapshot: Any
    layer_specs: Any
    pending_form_id: str | None = None
    pending_tool_call_id: str | None = None
    saved_at: datetime
    version: int


class SessionState(msgspec.Struct, kw_only=True):
    """A session's newest snapshot and whether it may still be resumed."""

    key: SessionKey | None = None
    active: bool = False
    latest: SessionSnapshot | None = None
    saves: int = 0
    retired_reason: str | None = None
    retired_at: datetime | None = None


class SessionEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One line of a session's history: a save or a retirement."""

    kind: str  # "saved" or "retired"
    version: int
    at: datetime
    snapshot: SessionSnapshot | None = None
    reason: str | None = None


class SessionProjection(Projection[SessionState]):
    """Folds a session stream into its newest snapshot and its active flag."""

    name = "agent_sessions"
    version = 1
    categories = (CATEGORY,)
    state_type = SessionState
    snapshot_every = None

    def initial(self, tenant_id: str, stream_id: str) -> SessionState:
        return SessionState()

    def evolve(self, state: SessionState, event: RecordedEvent) -> SessionState:
        d = event.data
        if isinstance(d, SessionSnapshotSaved):
            key = SessionKey(d.tenant_id, d.workflow_run_id, d.node_id, d.binding_id, d.agent_id)
            snap = SessionSnapshot(snapshot=d.snapshot, layer_specs=d.layer_specs,
                                   pending_form_id=d.pending_form_id,
                                   pending_tool_call_id=d.pending_tool_call_id,
                                   saved_at=d.saved_at, version=event.version)
            return SessionState(key=key, active=True, latest=snap, saves=state.saves + 1)
        if isinstance(d, SessionRetired):
            return msgspec.structs.replace(state, active=False, retired_reason=d.reason,
                                           retired_at=d.retired_at)
        return state

    def index(self, state: SessionState) -> RowIndex:
        key = state.key
        return RowIndex(status="active" if state.active else "retired",
                        group_key=key.workflow_run_id if key is not None else None,
                        sort_key=to_micros(state.latest.saved_at) if state.latest else None)


register("agent_sessions", SessionProjection)


def _check_key(key: object) -> SessionKey:
    if not isinstance(key, SessionKey):
        raise InvalidArgument(f"expected a SessionKey, got {type(key).__name__}")
    key.stream_id()
    return key


class AgentSessions:
    """Save, read and retire agent-session snapshots."""

    def __init__(self, store: EventStore, *, clock: Clock | None = None) -> None:
        check_sync_store(store, "AgentSessions", "projections.aio.AsyncAgentSessions")
        self.store = store
        self.now = utc_clock(clock)
        self.projection = SessionProjection()
        inline(store, self.projection)

    def save(self, key: SessionKey, *, snapshot: Any, layer_specs: Any,
             pending_form_id: str | None = None,
             pending_tool_call_id: str | None = None) -> SessionSnapshot:
        """Append a snapshot; the session becomes (or stays) active.

        A pause saves with its pending form and tool-call ids (ids as the facades' others: at
        most 200 characters, no NUL); the session stays active.  Racing saves of one key are
        all kept, in the order they committed.
        """
        key = _check_key(key)
        for pending, what in ((pending_form_id, "pending_form_id"),
                              (pending_tool_call_id, "pending_tool_call_id")):
            if isinstance(pending, str):  # (another type: the event's InvalidEvent, below)
                check_text(pending, what)
        event = SessionSnapshotSaved(
            tenant_id=key.tenant_id, workflow_run_id=key.workflow_run_id, node_id=key.node_id,
            binding_id=key.binding_id, agent_id=key.agent_id, snapshot=snapshot,
            layer_specs=layer_specs, pending_form_id=pending_form_id,
            pending_tool_call_id=pending_tool_call_id, saved_at=self.now())
        result = self.store.append(key.stream_id(), [event], tenant_id=key.tenant_id)
        # As stored, and as active() will give it: JSON (sets and tuples become lists, keys
        # strings), never the caller's objects.
        snapshot, layer_specs = msgspec.json.decode(msgspec.json.encode([snapshot, layer_specs]))
        return SessionSnapshot(snapshot=snapshot, layer_specs=layer_specs,
                               pending_form_id=pending_form_id,
                               pending_tool_call_id=pending_tool_call_id,
                               saved_at=event.saved_at, version=result.stream_version)

    def state(self, key: SessionKey) -> SessionState:
        key = _check_key(key)
        return current(self.store, self.projection, key.stream_id(), tenant_id=key.tenant_id)[0]

    def active(self, key: SessionKey) -> SessionSnapshot | None:
        """The newest snapshot of the session if it is active, else ``None``."""
        state = self.state(key)
        return state.latest if state.active else None

    def history(self, key: SessionKey) -> list[SessionEntry]:
        """Every save and retirement of the session, oldest first."""
        key = _check_key(key)
        out: list[SessionEntry] = []
        for ev in self.store.read_stream(key.stream_id(), tenant_id=key.tenant_id):
            d = ev.data
            if isinstance(d, SessionSnapshotSaved):
                out.append(SessionEntry(kind="saved", version=ev.version, at=d.saved_at,
                                        snapshot=SessionSnapshot(
                                            snapshot=d.snapshot, layer_specs=d.layer_specs,
                                            pending_form_id=d.pending_form_id,
                                            pending_tool_call_id=d.pending_tool_call_id,
                                            saved_at=d.saved_at, version=ev.version)))
            elif isinstance(d, SessionRetired):
                out.append(SessionEntry(kind="retired", version=ev.version, at=d.retired_at,
                                        reason=d.reason))
        return out

    def retire(self, key: SessionKey, *, reason: str) -> bool:
        """End the session (failed or cancelled run); returns whether this call retired it."""
        key = _check_key(key)
        check_message(reason, "reason")
        return self._retire(key.stream_id(), key.tenant_id, reason)

    def _retire(self, stream: str, tenant_id: str, reason: str) -> bool:
        def decision(state: SessionState, version: int) -> list[Event]:
            if not state.active:
                return []
            return [SessionRetired(reason=reason, retired_at=self.now())]

        _s, _v, result = decide(self.store, self.projection, stream, tenant_id=tenant_id,
                                decision=decision)
        return result is not None

    def active_in_run(self, tenant_id: str, workflow_run_id: str) -> list[SessionKey]:
        """Keys of the run's active sessions."""
        check_tenant(tenant_id)  # None would read every tenant's
        check_text(workflow_run_id, "workflow_run_id")
        rows = query_rows(self.store, self.projection, tenant_id=tenant_id, status="active",
                          group_key=workflow_run_id)
        return [st.key for _t, _s, st, _v in rows if st.key is not None]

    def finish_run(self, tenant_id: str, workflow_run_id: str, status: str) -> list[SessionKey]:
        """Retire every active session of a finished run; returns the ones this call retired.

        Each session is retired exactly once even when several callers race: a retirement is a
        compare-and-set, and a caller that loses sees the session already retired.
        """
        check_text(status, "status")
        retired = []
        for key in self.active_in_run(tenant_id, workflow_run_id):
            if self._retire(key.stream_id(), tenant_id, f"run {status}"):
                retired.append(key)
        return retired
