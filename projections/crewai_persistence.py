"""CrewAI flow persistence on the event store: ``EventStoreFlowPersistence``.

A :class:`crewai.flow.persistence.FlowPersistence` backed by :class:`projections.Flows`, so a
CrewAI ``Flow`` decorated with ``@persist(EventStoreFlowPersistence(store))`` keeps its state, and
its pauses for asynchronous human feedback, in the stream ``flow-<flow id>`` of the store (SQLite
or PostgreSQL) instead of CrewAI's local SQLite file.

* ``save_state`` appends one ``FlowStateSaved`` per completed step; ``load_state`` returns the
  newest state as a dict (``None`` when the flow saved none), like CrewAI's SQLite backend.
  Pydantic state is stored as its ``model_dump()`` in type-keeping JSON, so datetimes, UUIDs,
  decimals and sets come back as themselves (subclasses of plain values, such as numpy.float64
  or a StrEnum member, as those values); state holding other values (enums, paths, ...) is
  stored in pydantic's JSON form instead, as CrewAI's SQLite backend always does.
* ``save_pending_feedback`` appends ``FeedbackRequested`` (the whole resume context and the
  state) and ``FlowStateSaved`` in one atomic append.
* ``load_pending_feedback`` -- what ``Flow.from_pending`` calls -- *claims* the request with
  :meth:`Flows.resolve_feedback`'s compare-and-set: of any number of processes resuming the same
  pause, exactly one gets the state and context; for every other one it returns ``None``, as
  ``FlowPersistence`` says for "nothing pending", and ``from_pending`` raises its
  ``ValueError`` before it has built a flow, written anything or run a step.
  ``peek_pending_feedback`` reads the request without claiming it.
* ``clear_pending_feedback`` (called by ``Flow.resume`` once the paused step completed) resolves a
  request that is still open and is a no-op otherwise.

A resumer that dies after claiming leaves the flow without an open request;
:meth:`EventStoreFlowPersistence.reopen_pending_feedback` re-opens the last request once nobody
is resuming it any more.  :func:`import_crewai_sqlite` copies the flows of CrewAI's own SQLite
backend into the store.  Importing this module imports CrewAI (``pip install
'eventstore[crewai]'``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydantic_core
from crewai.flow.async_feedback.types import PendingFeedbackContext
from crewai.flow.persistence.base import FlowPersistence
from pydantic import BaseModel, Field, PrivateAttr, field_serializer
from sqlalchemy.engine import URL

from eventstore import Event, EventStore, WrongExpectedVersion
from eventstore._backend import _masked, resolve_url, translate
from eventstore._core import check_id
from eventstore.errors import InvalidArgument, InvalidEvent, error_text
from eventstore.logs import get_logger

from ._command import check_text
from .errors import Conflict, NoPendingFeedback
from .events import FeedbackRequested, FeedbackResolved, FlowStateSaved
from .flows import Flows, FlowSave
from .typed_json import from_json, to_json

__all__ = ["EventStoreFlowPersistence", "SqliteImport", "import_crewai_sqlite"]

_OPEN_LOCK = threading.Lock()
_MAX_ATTEMPTS = 50
_log = get_logger("eventstore.crewai")


def _resumer() -> str:
    """Who resolves a request: ``host:pid`` (kept in the ``FeedbackResolved`` event)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _flow_id(value: Any) -> Any:
    """A flow id as a string: an integer one (an unstructured state's ``"id": 42``, which
    CrewAI's SQLite backend stores as the text ``42``) as its digits; anything else as given
    (the facade refuses what is not a usable id)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _storable(state_data: dict[str, Any] | BaseModel) -> dict[str, Any]:
    """The dict form of a flow state that the store can hold.

    Type-keeping first (``model_dump()``: datetimes, UUIDs, decimals, sets stay themselves);
    when the state holds a value type-keeping JSON cannot (an enum, a path, a secret), pydantic's
    JSON form, which is what CrewAI's own SQLite backend stores.
    """
    if isinstance(state_data, BaseModel):
        data = state_data.model_dump()
    elif isinstance(state_data, dict):
        data = dict(state_data)
    else:
        raise InvalidArgument("flow state must be a pydantic model or a dict, got "
                              f"{type(state_data).__name__}")
    try:
        to_json(data)
        return data
    except InvalidEvent:
        raise  # nested too deep, or holding itself: no form of it can be stored
    except InvalidArgument:
        pass
    try:
        if isinstance(state_data, BaseModel):
            return state_data.model_dump(mode="json")
        jsonable = pydantic_core.to_jsonable_python(data)
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as e:
        if "Circular reference" in str(e):
            # pydantic's words for a state nested deeper than it walks ("depth exceeded", a
            # little short of the store's 256 levels) or holding itself ("id repeated"): a
            # nesting error, as the type-keeping form raises when it meets it first.
            raise InvalidEvent(f"flow state is nested too deeply (or holds itself): {e}") from e
        raise InvalidArgument(f"cannot store this flow state: {e}") from e
    if not isinstance(jsonable, dict):  # pragma: no cover - a dict stays a dict
        raise InvalidArgument("flow state did not serialize to an object")
    return jsonable


def _without_password(url: str | URL) -> str:
    """The URL to show and serialize: no password (a restored persistence connects with the
    driver's own sources of one, as libpq's ``PGPASSWORD`` or ``~/.pgpass``)."""
    try:
        parsed = resolve_url(url)
    except InvalidArgument:  # left for EventStore.open to refuse; the password hidden here
        return str(_masked(url if isinstance(url, str) else str(url)))
    return (parsed._replace(password=None).difference_update_query(["password"])
            .render_as_string(hide_password=False))


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class EventStoreFlowPersistence(FlowPersistence):
    """CrewAI ``FlowPersistence`` on an :class:`~eventstore.EventStore` (via :class:`Flows`).

    ``EventStoreFlowPersistence(store, tenant_id="acme")`` uses an open store (the caller closes
    it); ``EventStoreFlowPersistence("postgresql+psycopg://app@db/app")`` or with no argument
    (``EVENTSTORE_URL``, else ``sqlite:///./eventstore.db``) opens its own on first use, and
    :meth:`close` closes it.  The ``flow_uuid`` CrewAI passes (the state's ``id``) is the flow id.
    """

    persistence_type: str = Field(default="EventStoreFlowPersistence")
    url: str | None = Field(
        default=None,
        description="Store URL, without its password (this persistence keeps the password out "
                    "of model_dump, which CrewAI writes into its checkpoints); None means "
                    "EVENTSTORE_URL, else sqlite:///./eventstore.db.",
    )
    tenant_id: str = Field(default="default", description="Tenant every flow stream belongs to.")

    _store: EventStore | None = PrivateAttr(default=None)
    _flows: Flows | None = PrivateAttr(default=None)
    _owns_store: bool = PrivateAttr(default=False)
    _secret_url: str | None = PrivateAttr(default=None)  # the URL as given, password included

    def __init__(self, store: EventStore | str | URL | None = None, /, **data: Any) -> None:
        given: str | None = None
        if isinstance(store, EventStore):
            own = _without_password(store.url)
            other = data.get("url")
            if other is not None and (not isinstance(other, str)
                                      or _without_password(other) != own):
                # (Kept, it would be what CrewAI's checkpoints name, and not where the flows
                # are: a persistence rebuilt from one would open that other database.)
                raise InvalidArgument(
                    f"EventStoreFlowPersistence got a store and url="
                    f"{_without_password(other) if isinstance(other, str) else repr(other)}, "
                    f"which is not the store's URL ({own}): pass one of them")
            data["url"] = own
        elif isinstance(store, str):
            given = store
        elif isinstance(store, URL):
            given = store.render_as_string(hide_password=False)
        elif store is not None:
            raise InvalidArgument(
                f"EventStoreFlowPersistence takes an EventStore or a database URL, not "
                f"{type(store).__name__} (CrewAI calls its persistence synchronously)")
        elif isinstance(data.get("url"), str):
            given = data["url"]
        if given is not None:
            data["url"] = _without_password(given)
        unknown = sorted(set(data) - set(type(self).model_fields))
        if unknown:  # (pydantic would drop them: a misspelt tenant_id, and the wrong tenant)
            raise InvalidArgument(
                f"EventStoreFlowPersistence got unknown argument(s) {', '.join(unknown)}: it "
                "takes a store or URL, and url=, tenant_id=")
        if "tenant_id" in data:  # refused here, not after the flow's first step ran
            check_id(data["tenant_id"], "tenant id", InvalidArgument)
        super().__init__(**data)
        self._secret_url = given
        if isinstance(store, EventStore):
            self._store = store
            self._flows = Flows(store)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "tenant_id":
            check_id(value, "tenant id", InvalidArgument)
        if name == "url" and isinstance(value, str):
            # Set after construction: the password kept privately too, not in the field.
            super().__setattr__("_secret_url", value)
            value = _without_password(value)
        super().__setattr__(name, value)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, (_without_password(value) if name == "url" and isinstance(value, str)
                         else value)

    def _open_url(self) -> str | None:
        """The URL to open: as given (password included) while it is the one in ``url``."""
        secret = self._secret_url
        if secret is not None and self.url is not None \
                and _without_password(secret) == _without_password(self.url):
            return secret
        return self.url

    @field_serializer("url")
    def _url_without_password(self, url: str | None) -> str | None:
        """What CrewAI writes into its checkpoints: never the password (also for a model
        made without ``__init__``, as ``model_copy(update=…)`` makes one)."""
        return None if url is None else _without_password(url)

    # -- the store ---------------------------------------------------------------------------

    @property
    def flows(self) -> Flows:
        """The :class:`Flows` facade this persistence writes through (opens the store lazily)."""
        flows = self._flows
        if flows is None:
            with _OPEN_LOCK:
                if self._flows is None:
                    store = EventStore.open(self._open_url())
                    try:
                        facade = Flows(store)
                    except BaseException:
                        store.close()
                        raise
                    self._store, self._flows, self._owns_store = store, facade, True
                flows = self._flows
        assert flows is not None
        return flows

    @property
    def store(self) -> EventStore:
        """The event store (opened on first use when built from a URL)."""
        _ = self.flows
        assert self._store is not None
        return self._store

    def close(self) -> None:
        """Close the store if this persistence opened it; a store passed in stays open."""
        with _OPEN_LOCK:
            if self._owns_store and self._store is not None:
                self._store.close()
                self._store, self._flows, self._owns_store = None, None, False

    def init_db(self) -> None:
        """Open the store now (migrating SQLite; checking PostgreSQL's schema)."""
        _ = self.flows

    # -- state -------------------------------------------------------------------------------

    def save_state(self, flow_uuid: str, method_name: str,
                   state_data: dict[str, Any] | BaseModel) -> None:
        """Record the flow's state after ``method_name`` completed (one ``FlowStateSaved``)."""
        flow_uuid = _flow_id(flow_uuid)
        self.flows.save(flow_uuid, method_name, _storable(state_data), tenant_id=self.tenant_id)

    def load_state(self, flow_uuid: str) -> dict[str, Any] | None:
        """The newest saved state as a dict, or ``None`` when the flow saved none."""
        flow_uuid = _flow_id(flow_uuid)
        state = self.flows.load(flow_uuid, tenant_id=self.tenant_id)
        return state if isinstance(state, dict) else None

    def history(self, flow_uuid: str) -> list[FlowSave]:
        """Every state the flow saved, oldest first (method name, state, time, version)."""
        flow_uuid = _flow_id(flow_uuid)
        return self.flows.history(flow_uuid, tenant_id=self.tenant_id)

    # -- asynchronous human feedback ---------------------------------------------------------

    def save_pending_feedback(self, flow_uuid: str, context: PendingFeedbackContext,
                              state_data: dict[str, Any] | BaseModel) -> None:
        """Pause the flow: ``FeedbackRequested`` (context and state) and ``FlowStateSaved``.

        One atomic append of both events, so the request and the newest state never disagree,
        also when the process dies mid-call.  An open request is replaced, as in :class:`Flows`.
        """
        flow_uuid = _flow_id(flow_uuid)
        method_name = check_text(context.method_name, "method_name")
        state = to_json(_storable(state_data))
        at = self.flows.now()
        events: list[Event] = [
            FeedbackRequested(flow_id=flow_uuid, context=to_json(context.to_dict()), state=state,
                              at=at),
            FlowStateSaved(flow_id=flow_uuid, method_name=method_name, state=state, at=at),
        ]
        self.store.append(Flows.stream_id(flow_uuid), events, tenant_id=self.tenant_id)

    def load_pending_feedback(
        self, flow_uuid: str,
    ) -> tuple[dict[str, Any], PendingFeedbackContext] | None:
        """Claim the open request for resuming: ``(state, context)``, for exactly one caller;
        ``None`` when there is no open request to claim, as ``FlowPersistence`` says.

        ``Flow.from_pending`` calls this.  The claim is :meth:`Flows.resolve_feedback`'s
        compare-and-set, so of concurrent resumers (threads or processes, any host) exactly one
        wins; for the others (and for a flow that never paused, or whose request was
        withdrawn) this returns ``None`` and ``from_pending`` raises CrewAI's ``ValueError``
        ("No pending feedback found"), before anything is built or written.  Why there was
        none is logged (``crewai_feedback_not_claimed``, debug; ``reason`` ``"none"`` or
        ``"resolved"``).  To look without claiming, use :meth:`peek_pending_feedback`.
        """
        flow_uuid = _flow_id(flow_uuid)
        try:
            pending = self.flows.resolve_feedback(flow_uuid, {"resumed_by": _resumer()},
                                                  tenant_id=self.tenant_id)
        except NoPendingFeedback as e:
            _log.debug("crewai_feedback_not_claimed", tenant=self.tenant_id, flow_id=flow_uuid,
                       reason=e.reason)
            return None
        return _as_dict(pending.state), PendingFeedbackContext.from_dict(pending.context)

    def peek_pending_feedback(
        self, flow_uuid: str,
    ) -> tuple[dict[str, Any], PendingFeedbackContext] | None:
        """The open request as ``(state, context)`` without claiming it, or ``None``."""
        flow_uuid = _flow_id(flow_uuid)
        pending = self.flows.pending_feedback(flow_uuid, tenant_id=self.tenant_id)
        if pending is None:
            return None
        return _as_dict(pending.state), PendingFeedbackContext.from_dict(pending.context)

    def clear_pending_feedback(self, flow_uuid: str) -> None:
        """Resolve the flow's open request, if any (idempotent).

        ``Flow.resume`` calls this after the paused step completed; by then the resumer's
        :meth:`load_pending_feedback` already resolved the request, so this writes nothing.
        Called directly, it withdraws an open request (recorded as ``cleared_by``).
        """
        flow_uuid = _flow_id(flow_uuid)
        with contextlib.suppress(NoPendingFeedback):
            self.flows.resolve_feedback(flow_uuid, {"cleared_by": _resumer()},
                                        tenant_id=self.tenant_id)

    def reopen_pending_feedback(self, flow_uuid: str) -> PendingFeedbackContext:
        """Open the flow's last feedback request again, after its resumer died.

        A resume that was claimed (``from_pending``) but never completed -- the process crashed,
        or it gave up -- leaves the flow with no open request.  This appends the last request
        again, unchanged, so ``from_pending`` can claim it once more.  Call it only when no
        resumer is still working on the flow: a resumer that is merely slow would otherwise
        run the step twice.  Concurrent reopens are safe (one wins; the others raise
        :class:`Conflict` with ``reason="pending"``).  Raises :class:`NoPendingFeedback`
        (``reason="none"``) when the flow never requested feedback, and :class:`Conflict`
        (``reason="pending"``) while a request is open, (``reason="resolved"``) when the last
        request was not claimed by ``from_pending`` but withdrawn (:meth:`clear_pending_feedback`)
        or answered through :class:`Flows`, and (``reason="progressed"``) when the flow saved a
        step after the claim: the resume went on.
        """
        flow_uuid = _flow_id(flow_uuid)
        stream = Flows.stream_id(flow_uuid)
        conflict: WrongExpectedVersion | None = None
        for _ in range(_MAX_ATTEMPTS):
            last: FeedbackRequested | None = None
            open_request = claimed = progressed = False
            version = 0
            for event in self.store.read_stream(stream, tenant_id=self.tenant_id):
                version = event.version
                data = event.data
                if isinstance(data, FeedbackRequested):
                    last, open_request, claimed, progressed = data, True, False, False
                elif isinstance(data, FeedbackResolved):
                    open_request = False
                    claimed = isinstance(data.feedback, dict) and "resumed_by" in data.feedback
                elif last is not None and not open_request:
                    progressed = True  # a save after the resolution: the resume went on
            if last is None:
                raise NoPendingFeedback(f"flow {flow_uuid} never requested feedback",
                                        reason="none")
            if open_request:
                raise Conflict(f"flow {flow_uuid} has an open feedback request",
                               reason="pending")
            if not claimed:
                raise Conflict(f"flow {flow_uuid}'s last feedback request was withdrawn or "
                               "answered, not claimed by a resumer", reason="resolved")
            if progressed:
                raise Conflict(f"flow {flow_uuid} went on after its last feedback request",
                               reason="progressed")
            again = FeedbackRequested(flow_id=flow_uuid, context=last.context, state=last.state,
                                      at=self.flows.now())
            try:
                self.store.append(stream, [again], expected_version=version,
                                  tenant_id=self.tenant_id)
            except WrongExpectedVersion as e:
                conflict = e  # the stream moved: decide again on what it holds now
                continue
            return PendingFeedbackContext.from_dict(_as_dict(from_json(last.context)))
        assert conflict is not None
        raise conflict


# -- moving an application off CrewAI's SQLite backend ----------------------------------------


@dataclass(frozen=True)
class SqliteImport:
    """What :func:`import_crewai_sqlite` did: flow ids imported, skipped (already here), and
    failed (what the store refuses, with why: a state over the event size limit, an id it
    does not take), which the import went on past."""

    imported: list[str]
    skipped: list[str]
    states: int
    pending: int
    failed: dict[str, str] = field(default_factory=dict)


def _when(text: str | None) -> datetime:
    """A stored SQLite timestamp as an aware UTC datetime (naive ones are taken as UTC)."""
    if not text:
        return datetime.now(UTC)
    when = datetime.fromisoformat(text)
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def import_crewai_sqlite(db_path: str | os.PathLike[str],
                         persistence: EventStoreFlowPersistence) -> SqliteImport:
    """Copy every flow of a ``SQLiteFlowPersistence`` database into the store.

    Each flow's saved states (oldest first, with their original times) and its pending feedback
    request, if any, become one atomic append to a new stream ``flow-<flow_uuid>``, so a flow is
    imported whole or not at all.  A flow whose stream already exists is skipped, so running the
    import again (say, after an interruption) imports only what is missing.  The SQLite file is
    opened read-only and never changed.
    """
    path = Path(db_path)
    if not path.is_file():
        raise InvalidArgument(f"no CrewAI SQLite database at {str(path)!r}")
    uri = f"{path.resolve().as_uri()}?mode=ro"
    with translate(), contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        tables = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        states: dict[str, list[tuple[str, str, str]]] = {}
        if "flow_states" in tables:
            for flow_uuid, method_name, timestamp, state_json in conn.execute(
                    "SELECT flow_uuid, method_name, timestamp, state_json FROM flow_states "
                    "ORDER BY id"):
                states.setdefault(flow_uuid, []).append((method_name, timestamp, state_json))
        pending: dict[str, tuple[str, str, str]] = {}
        if "pending_feedback" in tables:
            for flow_uuid, context_json, state_json, created_at in conn.execute(
                    "SELECT flow_uuid, context_json, state_json, created_at "
                    "FROM pending_feedback ORDER BY id"):
                pending[flow_uuid] = (context_json, state_json, created_at)

    # What would refuse every flow (the store's URL, the tenant) raises here, before any flow.
    store = persistence.store
    tenant_id = check_id(persistence.tenant_id, "tenant id", InvalidArgument)
    imported: list[str] = []
    skipped: list[str] = []
    failed: dict[str, str] = {}
    for flow_uuid in [*states, *(f for f in pending if f not in states)]:
        try:
            events = _imported_events(flow_uuid, states.get(flow_uuid, []),
                                      pending.get(flow_uuid))
            store.append(Flows.stream_id(flow_uuid), events, expected_version=0,
                         tenant_id=tenant_id)
        except WrongExpectedVersion:
            skipped.append(flow_uuid)
        except InvalidArgument as e:  # this flow's data or id: the others go on
            failed[flow_uuid] = f"{type(e).__name__}: {e}"
            _log.warning("crewai_flow_not_imported", tenant=persistence.tenant_id,
                         flow_id=flow_uuid, error=failed[flow_uuid])
        else:
            imported.append(flow_uuid)
    return SqliteImport(imported=imported, skipped=skipped,
                        states=sum(len(states.get(f, [])) for f in imported),
                        pending=sum(1 for f in imported if f in pending), failed=failed)


def _imported_events(flow_uuid: str, saved: list[tuple[str, str, str]],
                     pending: tuple[str, str, str] | None) -> list[Event]:
    """One imported flow's events: its saved states, then its open request (``InvalidArgument``
    for a row this flow's import cannot take: a timestamp that is not ISO 8601 text within the
    datetime range, a state that is not JSON text, JSON nested too deep)."""
    try:
        return _flow_events(flow_uuid, saved, pending)
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        raise InvalidArgument(f"flow {flow_uuid!r} holds a row this import cannot read: "
                              f"{type(e).__name__}: {error_text(e)[:200]}") from None


def _flow_events(flow_uuid: str, saved: list[tuple[str, str, str]],
                 pending: tuple[str, str, str] | None) -> list[Event]:
    events: list[Event] = [
        FlowStateSaved(flow_id=flow_uuid, method_name=check_text(method, "method_name"),
                       state=to_json(json.loads(state)), at=_when(timestamp))
        for method, timestamp, state in saved]
    if pending is not None:
        context_json, state_json, created_at = pending
        events.append(FeedbackRequested(flow_id=flow_uuid,
                                        context=to_json(json.loads(context_json)),
                                        state=to_json(json.loads(state_json)),
                                        at=_when(created_at)))
    return events
