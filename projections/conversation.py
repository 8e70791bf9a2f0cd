"""Conversation variables: assigned by workflow runs, folded into the current state.

Stream per conversation: ``conversation-<conversation_id>``.  The projection runs inline, so
``get`` right after ``assign`` sees the write; past states come from live folds (with snapshots).
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import msgspec

from eventstore import EventStore, RecordedEvent, StreamSlice
from eventstore.errors import IdempotencyKeyReused, InvalidArgument
from eventstore.events import Event

from ._command import check_text
from ._engine import Projection, current, fold_live, inline, register, snapshot_now
from ._stores import check_sync_store
from .events import VariablesAssigned, VariablesDeleted, VariablesReset, VariableValue

__all__ = ["ConversationProjection", "ConversationState", "Conversations", "VariableChange",
           "value_type_of"]

CATEGORY = "conversation"


class ConversationState(msgspec.Struct, kw_only=True):
    """A conversation's variables at one version.

    ``version`` is the stream's version (every event of ``conversation-<id>`` counts, also
    ones that change no variable), so it can be passed back as ``expected_version``;
    ``updated_at``, ``workflow_run_id`` and ``node_id`` are those of the last change.
    """

    conversation_id: str
    variables: dict[str, Any] = msgspec.field(default_factory=dict)
    value_types: dict[str, str] = msgspec.field(default_factory=dict)
    version: int = 0
    updated_at: datetime | None = None
    workflow_run_id: str | None = None
    node_id: str | None = None


class VariableChange(msgspec.Struct, frozen=True, kw_only=True):
    """One change of one variable: who made it, when, and old -> new."""

    name: str
    kind: str  # "assigned", "reset" or "deleted"
    old: Any
    new: Any
    value_type: str | None
    version: int
    position: int
    at: datetime
    workflow_run_id: str | None
    node_id: str | None


# Stored as JSON text: datetimes, dates, times and durations in ISO 8601, UUIDs and decimals
# as their strings, bytes in base64.
_AS_STRING = (str, _dt.date, _dt.time, _dt.timedelta, uuid.UUID, decimal.Decimal, bytes,
              bytearray, memoryview)


def value_type_of(value: Any) -> str:
    """The value type recorded for a variable's value: the JSON type it is stored as."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, _AS_STRING):  # (a datetime is a date)
        return "string"
    if isinstance(value, list | tuple | set | frozenset):
        return "array"
    if isinstance(value, enum.Enum):  # stored as its value
        return value_type_of(value.value)
    if isinstance(value, msgspec.Struct) and value.__struct_config__.array_like:
        return "array"
    return "object"


def _conversation_id(stream_id: str) -> str:
    return stream_id[len(CATEGORY) + 1:]


class ConversationProjection(Projection[ConversationState]):
    """Folds variable events into the conversation's current variables."""

    name = "conversations"
    version = 2  # 2: ``version`` counts every event of the stream, not only variable changes
    categories = (CATEGORY,)
    state_type = ConversationState

    def __init__(self, *, snapshot_every: int | None = 100) -> None:
        self.snapshot_every = snapshot_every

    def initial(self, tenant_id: str, stream_id: str) -> ConversationState:
        return ConversationState(conversation_id=_conversation_id(stream_id))

    def evolve(self, state: ConversationState, event: RecordedEvent) -> ConversationState:
        data = event.data
        variables = dict(state.variables)
        types = dict(state.value_types)
        if not _change(variables, types, data):
            # Another kind of event on the stream: no variable changes, but the version is the
            # stream's, which read-modify-write passes as expected_version.
            return msgspec.structs.replace(state, version=event.version)
        assert isinstance(data, _CHANGES)
        return ConversationState(
            conversation_id=state.conversation_id, variables=variables, value_types=types,
            version=event.version, updated_at=event.recorded_at,
            workflow_run_id=data.workflow_run_id, node_id=data.node_id,
        )

    def evolve_slice(self, state: ConversationState, events: StreamSlice) -> ConversationState:
        """:meth:`evolve` over a slice, copying the variables once instead of once per event."""
        variables = dict(state.variables)
        types = dict(state.value_types)
        last = -1
        for i, data in enumerate(events.data):
            if _change(variables, types, data):
                last = i
        if last < 0:
            return msgspec.structs.replace(state, version=events.versions[-1])
        data = events.data[last]
        assert isinstance(data, _CHANGES)
        return ConversationState(
            conversation_id=state.conversation_id, variables=variables, value_types=types,
            version=events.versions[-1], updated_at=events.recorded_at(last),
            workflow_run_id=data.workflow_run_id, node_id=data.node_id,
        )


_CHANGES = (VariablesAssigned, VariablesReset, VariablesDeleted)


def _change(variables: dict[str, Any], types: dict[str, str], data: object) -> bool:
    """Apply one event to the variables and their types in place; False: not a change."""
    if isinstance(data, (VariablesAssigned, VariablesReset)):
        for v in data.variables:
            variables[v.name] = v.value
            types[v.name] = v.value_type
        return True
    if isinstance(data, VariablesDeleted):
        for name in data.names:
            variables.pop(name, None)
            types.pop(name, None)
        return True
    return False


register("conversations", ConversationProjection)


def _check_conversation_id(conversation_id: object, *, write: bool = False) -> str:
    """A conversation id; for a ``write`` at most 200 characters, as every facade's.  Reads
    take longer ones, which releases before that limit stored."""
    if write:
        return check_text(conversation_id, "conversation_id")
    if not isinstance(conversation_id, str) or not conversation_id:
        raise InvalidArgument("conversation_id must be a non-empty string")
    return conversation_id


def _check_names(names: object) -> list[str]:
    if not isinstance(names, Iterable):
        raise InvalidArgument(f"names must be a variable name or an iterable of them, got "
                              f"{type(names).__name__}")
    out = []
    for n in names:
        if not isinstance(n, str) or not n:
            raise InvalidArgument(f"variable names must be non-empty strings, got {n!r}")
        out.append(n)
    return out


_T = TypeVar("_T")


def _value_name(value: VariableValue) -> str:
    return value.name


def _in_name_order(items: list[_T], event: Callable[[list[_T]], Event],
                   name: Callable[[_T], str]) -> tuple[Event, Event | None]:
    """The event with its variables in name order: the same mapping makes the same event
    whatever its keys' order, so an idempotent retry built from another copy of it (a JSON
    request parsed again) is a duplicate, not a conflict.  And, when the call's order was
    another, the event in that order, as releases before name order recorded it."""
    ordered = sorted(items, key=name)
    if ordered == items:
        return event(items), None
    return event(ordered), event(items)


class Conversations:
    """Conversation variables on the event log.

    ``assign``/``reset``/``delete`` append one event each; ``get`` answers from the inline
    projection rows (topped up from the log if another writer left them behind), or folds the
    stream live for ``at_version`` / ``at_time``.
    """

    def __init__(self, store: EventStore, *, snapshot_every: int | None = 100) -> None:
        check_sync_store(store, "Conversations", "projections.aio.AsyncConversations")
        self.store = store
        self.projection = ConversationProjection(snapshot_every=snapshot_every)
        inline(store, self.projection)

    @staticmethod
    def stream_id(conversation_id: str) -> str:
        return f"{CATEGORY}-{conversation_id}"

    def _append(self, conversation_id: str, event: Event, as_given: Event | None = None, *,
                tenant_id: str, expected_version: int | None, idempotency_key: str | None,
                metadata: dict[str, Any] | None) -> int:
        """Append ``event``; ``as_given``: the same event with its names in the order the
        call gave them (when that is not name order, see :func:`_in_name_order`), for a key
        an earlier release recorded with them so: its retry is still a duplicate."""
        stream = self.stream_id(conversation_id)
        try:
            result = self.store.append(
                stream, [event], tenant_id=tenant_id, expected_version=expected_version,
                idempotency_key=idempotency_key, metadata=metadata)
        except IdempotencyKeyReused as reused:
            if as_given is None:
                raise
            try:  # (the key is taken: this either finds it the same request or writes nothing)
                result = self.store.append(
                    stream, [as_given], tenant_id=tenant_id,
                    expected_version=expected_version, idempotency_key=idempotency_key,
                    metadata=metadata)
            except IdempotencyKeyReused:
                raise reused from None
        return result.stream_version

    def assign(
        self,
        conversation_id: str,
        variables: Mapping[str, Any],
        *,
        tenant_id: str = "default",
        expected_version: int | None = None,
        workflow_run_id: str | None = None,
        node_id: str | None = None,
        value_types: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> int:
        """Set variables (add or overwrite) as one ``VariablesAssigned``; returns the version.

        With ``expected_version`` the write succeeds only if nobody wrote since that version
        (read-modify-write), else :class:`eventstore.WrongExpectedVersion`.  ``value_types``
        names the type of some of these variables (by default the JSON type each is stored
        as); naming a variable the call does not assign is an ``InvalidArgument``.
        """
        cid = _check_conversation_id(conversation_id, write=True)
        values = self._values(variables, value_types)
        return self._append(cid, *_in_name_order(values, lambda v: VariablesAssigned(
            conversation_id=cid, variables=v, workflow_run_id=workflow_run_id,
            node_id=node_id), _value_name), tenant_id=tenant_id,
            expected_version=expected_version, idempotency_key=idempotency_key,
            metadata=metadata)

    def reset(
        self,
        conversation_id: str,
        defaults: Mapping[str, Any],
        *,
        tenant_id: str = "default",
        expected_version: int | None = None,
        workflow_run_id: str | None = None,
        node_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> int:
        """Put variables back to their defaults (``{name: default}``) as one event."""
        cid = _check_conversation_id(conversation_id, write=True)
        values = self._values(defaults, None)
        return self._append(cid, *_in_name_order(values, lambda v: VariablesReset(
            conversation_id=cid, variables=v, workflow_run_id=workflow_run_id,
            node_id=node_id), _value_name), tenant_id=tenant_id,
            expected_version=expected_version, idempotency_key=idempotency_key, metadata=None)

    def delete(
        self,
        conversation_id: str,
        names: Iterable[str],
        *,
        tenant_id: str = "default",
        expected_version: int | None = None,
        workflow_run_id: str | None = None,
        node_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> int:
        """Remove variables as one ``VariablesDeleted`` event."""
        cid = _check_conversation_id(conversation_id, write=True)
        if isinstance(names, str):
            names = [names]
        checked = _check_names(names)
        if not checked:
            raise InvalidArgument("delete needs at least one variable name")
        return self._append(cid, *_in_name_order(checked, lambda n: VariablesDeleted(
            conversation_id=cid, names=n, workflow_run_id=workflow_run_id,
            node_id=node_id), str), tenant_id=tenant_id, expected_version=expected_version,
            idempotency_key=idempotency_key, metadata=None)

    @staticmethod
    def _values(variables: Mapping[str, Any], types: Mapping[str, str] | None
                ) -> list[VariableValue]:
        if not isinstance(variables, Mapping):
            raise InvalidArgument("variables must be a mapping of name to value")
        if not variables:
            raise InvalidArgument("assign needs at least one variable")
        names = _check_names(variables.keys())  # (in the mapping's order: see _in_name_order)
        if types is None:
            types = {}
        elif not isinstance(types, Mapping):
            raise InvalidArgument("value_types must be a mapping of variable name to type name")
        else:
            unknown = [n for n in types if n not in variables]
            if unknown:
                raise InvalidArgument(f"value_types names variables this call does not assign: "
                                      f"{sorted(map(str, unknown))}")
        return [VariableValue(name=n, value=variables[n],
                              value_type=types.get(n) or value_type_of(variables[n]))
                for n in names]

    def get(
        self,
        conversation_id: str,
        *,
        tenant_id: str = "default",
        at_version: int | None = None,
        at_time: datetime | None = None,
    ) -> ConversationState:
        """The variables now, at a version, or as they were at a time (empty when unknown).

        ``at_version`` past the conversation's end is its current state; with both, the state
        at whichever comes first."""
        cid = _check_conversation_id(conversation_id)
        stream = self.stream_id(cid)
        if at_version is not None or at_time is not None:
            state, _ = fold_live(self.store, self.projection, stream, tenant_id=tenant_id,
                                 at_version=at_version, at_time=at_time)
            return state
        return current(self.store, self.projection, stream, tenant_id=tenant_id)[0]

    def snapshot(self, conversation_id: str, *, tenant_id: str = "default") -> int:
        """Save a snapshot of the conversation now (on demand); returns its version."""
        return snapshot_now(self.store, self.projection,
                            self.stream_id(_check_conversation_id(conversation_id)),
                            tenant_id=tenant_id)

    def history(self, conversation_id: str, *, tenant_id: str = "default",
                name: str | None = None) -> list[VariableChange]:
        """Every change of every variable (or of ``name``), oldest first, with old -> new."""
        cid = _check_conversation_id(conversation_id)
        if name is not None and not isinstance(name, str):
            raise InvalidArgument(f"name must be a variable name or None, got {name!r:.80}")
        current: dict[str, Any] = {}
        out: list[VariableChange] = []
        for ev in self.store.read_stream(self.stream_id(cid), tenant_id=tenant_id):
            data = ev.data
            changes: list[tuple[str, Any, str | None]]
            if isinstance(data, (VariablesAssigned, VariablesReset)):
                kind = "assigned" if isinstance(data, VariablesAssigned) else "reset"
                changes = [(v.name, v.value, v.value_type) for v in data.variables]
            elif isinstance(data, VariablesDeleted):
                kind = "deleted"
                changes = [(n, None, None) for n in data.names]
            else:
                continue
            for var, new, vtype in changes:
                old = current.get(var)
                if kind == "deleted":
                    current.pop(var, None)
                else:
                    current[var] = new
                if name is None or var == name:
                    out.append(VariableChange(
                        name=var, kind=kind, old=old, new=new, value_type=vtype,
                        version=ev.version, position=ev.position, at=ev.recorded_at,
                        workflow_run_id=data.workflow_run_id, node_id=data.node_id))
        return out
