"""A model-based test of ``EventStoreFlowPersistence`` (CrewAI flows) against a plain-Python model.

The model follows the README ("CrewAI flows", and "Flow state" for the types state keeps) and
the docstrings of ``projections.crewai_persistence`` and ``projections.flows``:

* ``save_state`` appends one ``FlowStateSaved`` (method name, whole state, time); the state is
  a dict, or a pydantic model's ``model_dump()``, in type-keeping JSON: datetimes, dates, times,
  timedeltas, UUIDs, decimals, sets, frozensets, tuples, bytes, non-string dict keys, NaN and
  infinities come back as themselves, a ``StrEnum``/``IntEnum`` member or a float subclass as
  its plain value; a state holding something type-keeping JSON cannot keep (an ``Enum``) is
  stored whole in pydantic's JSON form (``model_dump(mode="json")``, or pydantic's JSON form of
  the dict); a string with a lone surrogate is kept too.  Another type, or a state that is not
  a dict or a model, is refused with ``InvalidArgument``; a state nested deeper than the store
  takes, or holding itself, with ``InvalidEvent`` whatever else it holds (an ``Enum`` met
  first included); neither writes anything.
* ``load_state`` is the newest saved state as a dict, ``None`` for a flow that saved none;
  ``history`` every saved step, oldest first (method, state, time, stream version).
* ``save_pending_feedback`` appends ``FeedbackRequested`` and ``FlowStateSaved`` (method: the
  context's ``method_name``) in one append, and opens a request (replacing an open one).
* ``load_pending_feedback`` claims the open request (``FeedbackResolved {"resumed_by":
  "host:pid"}``) and returns its ``(state, context)``; ``None`` when there is none to claim,
  writing nothing.  ``peek_pending_feedback`` returns the same without claiming.
* ``clear_pending_feedback`` withdraws an open request (``FeedbackResolved {"cleared_by":
  …}``) and is a no-op otherwise.
* ``reopen_pending_feedback`` appends the last request again (a ``FeedbackRequested``) and
  returns its context; ``NoPendingFeedback(reason="none")`` for a flow that never paused,
  ``Conflict`` ``"pending"`` while a request is open, ``"resolved"`` when it was withdrawn rather
  than claimed, ``"progressed"`` when the flow saved a step after the claim.
* ``close`` closes only a store the persistence opened (a later call opens it again);
  ``init_db`` opens it.  A tenant id the store cannot hold is refused when given.

Hypothesis draws random calls over four flows: a short id, a 200-character one, one CrewAI
passes as the integer ``7`` (kept as ``"7"``; it is also called with ``"7"``) in one tenant,
and the short id again in a second tenant, each tenant the example's own.  Two "processes" make
the calls: a persistence on the test's store, and one built from the URL, which opens a store of
its own (``close`` closes it).  Some steps race two calls on one flow from both processes on two
threads: their outcomes and the state after must be those of one of the two orders.  After every
call the outcome (value, or exact error type and ``reason``) must match the model, and so must,
for every flow, ``load_state``, ``peek_pending_feedback``, ``history`` (times within the call
that saved), the stream's events (the README's "What is stored" table) and the store's last
position (nothing else written, bad calls included).

Ambiguities settled (the README and docstrings leave them open):

* The context comes back as CrewAI's own ``to_dict``/``from_dict`` round trip gives it (its
  ``to_dict`` turns a tuple into a list and a value it cannot serialize into its ``str``), with
  the types of what that dict holds kept, as state's are.
* A request's state is the one it was saved with: ``reopen`` opens the last request "unchanged",
  so a step saved while it was open does not change what a later claim gets.
* A save while the request is open (before the claim) is not "after the claim": reopen works;
  a save after a withdrawal leaves the reason ``"resolved"``.
* Ids: a flow id is a facade id (non-empty, at most 200 characters, no NUL or lone surrogate);
  an integer is its digits, a bool is refused (as the example tests pin).  A method name (the
  step's, or the context's) is a facade id too: the example tests refuse an empty one and one
  with NUL for a pause, and ``save_state`` is taken to check its method as ``Flows.save`` does.
  A bad id is refused by every method with ``InvalidArgument`` (a subclass will do), including
  ``load_pending_feedback`` and ``clear_pending_feedback``: "nothing pending" is for a usable id.
* Only states far below the nesting limit, or far above it (300 levels), are drawn.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pydantic_core
import pytest
from crewai.flow import PendingFeedbackContext
from crewai.flow.flow import FlowState
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import Field

from eventstore import EventStore, InvalidArgument, InvalidEvent
from projections.crewai_persistence import EventStoreFlowPersistence
from projections.errors import Conflict, NoPendingFeedback
from projections.flows import Flows, FlowSave
from tests._crewai_flows import no_network  # noqa: F401 (an autouse fixture)
from tests._examples import examples
from tests._model import Color, Label, Level, Refused, Score, is_id
from tests._model import canon as _canon

ME = f"{socket.gethostname()}:{os.getpid()}"
PLUS2 = timezone(timedelta(hours=2))
MINUS530 = timezone(-timedelta(hours=5, minutes=30))
NUL = "a\x00b"
SURROGATE = "a\ud800"
LONG = "ф" + "x" * 199  # the longest flow id there is (200 characters, not all ASCII)
TOO_LONG = "f" * 201
# The flows: (tenant index, flow id as called); 7 and "7" are one flow.
FLOWS = [(0, "f-1"), (0, LONG), (0, 7), (0, "7"), (1, "f-1")]
METHODS = ["begin", "next", "étape"]


class TypedState(FlowState):
    """A pydantic state of the types the README says are kept."""

    when: datetime | None = None
    day: date | None = None
    span: timedelta = timedelta(0)
    amount: Decimal = Decimal("0")
    ref: uuid.UUID | None = None
    tags: set[str] = Field(default_factory=set)
    pair: tuple[int, str] = (0, "")
    counts: dict[int, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    label: Label = Label.SPAM
    level: Level = Level.HIGH
    blob: bytes = b""


class MoodyState(FlowState):
    """A pydantic state holding an enum: stored in pydantic's JSON form."""

    mood: Color = Color.RED
    when: datetime | None = None
    tags: set[int] = Field(default_factory=set)


# -- what the documents say a value comes back as --

def kept(value: Any) -> Any:
    """A storable value as ``load_state`` gives it back (drawn values only: no refusals)."""
    if value is None or type(value) is bool:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bytes, Decimal, datetime, date, time, timedelta, uuid.UUID)):
        return value
    if isinstance(value, list):
        return [kept(v) for v in value]
    if isinstance(value, tuple):
        return tuple(kept(v) for v in value)
    if isinstance(value, frozenset):
        return frozenset(kept(v) for v in value)
    if isinstance(value, set):
        return {kept(v) for v in value}
    if isinstance(value, dict):
        return {kept(k): kept(v) for k, v in value.items()}
    raise AssertionError(f"not a drawn value: {value!r}")


def canon(value: Any) -> Any:
    """A value compared with its exact types (tests/_model.py), a context by its fields."""
    return _canon(value, _context_fields)


def _context_fields(value: Any) -> Any:
    if isinstance(value, PendingFeedbackContext):
        return (type(value).__name__, canon({f.name: getattr(value, f.name)
                                             for f in dataclasses.fields(value)}))
    return None


def crewai_round_trip(context: PendingFeedbackContext) -> Any:
    """The context as CrewAI's own serialization keeps it (see the ambiguities)."""
    return canon(PendingFeedbackContext.from_dict(context.to_dict()))


def deep(levels: int) -> Any:
    value: Any = 1
    for i in range(levels):
        value = [value] if i % 2 else (value,)
    return value


def cyclic() -> dict[str, Any]:
    loop: dict[str, Any] = {"a": 1}
    loop["self"] = [loop]
    return loop


@dataclasses.dataclass(frozen=True)
class Spec:
    """A drawn state: ``build`` makes it (afresh: a cycle is an object of its own), ``expect``
    is what ``load_state`` gives back for it, or the refusal."""

    kind: str  # "dict", "typed", "json_dict", "moody", "bad"
    value: Any

    def build(self, flow_id: str) -> Any:
        if self.kind == "typed":
            return TypedState(id=flow_id, **self.value)
        if self.kind == "moody":
            return MoodyState(id=flow_id, **self.value)
        if self.kind == "bad":
            return BAD[self.value]()
        return dict(self.value)

    def expect(self, state: Any) -> Any:
        if self.kind == "dict":
            return canon(kept(state))
        if self.kind == "typed":
            return canon(kept({"id": state.id, **self.value}))
        if self.kind == "json_dict":  # pydantic's JSON form of the dict
            return canon(pydantic_core.to_jsonable_python(state))
        if self.kind == "moody":
            return canon(state.model_dump(mode="json"))
        raise Refused(InvalidEvent if self.value.startswith(("deep", "cyclic"))
                      else InvalidArgument)


BAD: dict[str, Callable[[], Any]] = {
    "object": lambda: {"x": object()},
    "list": lambda: ["not", "a", "state"],
    "none": lambda: None,
    "deep": lambda: {"x": [deep(300)]},
    "cyclic": cyclic,
    # An Enum first sends the state to pydantic's JSON form, which meets the nesting first.
    "deep_enum": lambda: {"mood": Color.RED, "x": [deep(300)]},
    "cyclic_enum": lambda: {"mood": Color.RED, **cyclic()},
}


# -- the model --

class Window:
    """The time of a save: within the call that saved, in UTC."""

    def __init__(self, lo: datetime, hi: datetime) -> None:
        self.lo, self.hi = lo, hi

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, datetime) and other.tzinfo == UTC
                and self.lo <= other <= self.hi)

    def __hash__(self) -> int:  # pragma: no cover - not hashed
        return 0

    def __repr__(self) -> str:
        return f"Window({self.lo.isoformat()} .. {self.hi.isoformat()})"


@dataclasses.dataclass
class MFlow:
    saves: list[tuple[str, Any, int, Window]] = dataclasses.field(default_factory=list)
    events: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    request: tuple[Any, Any] | None = None  # the last request: (state, context), canonical
    open: bool = False
    claimed: bool = False  # the last resolution was a claim
    progressed: bool = False  # a step was saved after that claim

    def view(self) -> tuple[Any, ...]:
        return (self.saves[-1][1] if self.saves else canon(None),
                self.request if self.open else None,
                list(self.saves),
                list(self.events))


def flow_key(flow_id: Any) -> str:
    """The flow an id names, or its refusal."""
    if isinstance(flow_id, int) and not isinstance(flow_id, bool):
        return str(flow_id)
    if not is_id(flow_id, 200):
        raise Refused(InvalidArgument)
    return str(flow_id)


def check_method(method: Any) -> None:
    if not is_id(method, 200):
        raise Refused(InvalidArgument)


class Model:
    def __init__(self, base: int) -> None:
        self.flows: dict[tuple[int, str], MFlow] = {}
        self.position = base  # the store's last position

    def of(self, tenant: int, flow_id: Any) -> MFlow:
        return self.flows.setdefault((tenant, flow_key(flow_id)), MFlow())

    def append(self, flow: MFlow, *events: tuple[str, Any]) -> None:
        flow.events.extend(events)
        self.position += len(events)

    def save(self, tenant: int, flow_id: Any, method: Any, spec: Spec, state: Any,
             at: Window) -> None:
        flow = self.of(tenant, flow_id)
        check_method(method)
        value = spec.expect(state)
        self.append(flow, ("FlowStateSaved", None))
        flow.saves.append((method, value, len(flow.events), at))
        if flow.request is not None and not flow.open:
            flow.progressed = True

    def pause(self, tenant: int, flow_id: Any, context: PendingFeedbackContext, spec: Spec,
              state: Any, at: Window) -> None:
        flow = self.of(tenant, flow_id)
        check_method(context.method_name)
        value = spec.expect(state)
        self.append(flow, ("FeedbackRequested", None), ("FlowStateSaved", None))
        flow.saves.append((context.method_name, value, len(flow.events), at))
        flow.request = (value, crewai_round_trip(context))
        flow.open, flow.claimed, flow.progressed = True, False, False

    def claim(self, tenant: int, flow_id: Any) -> Any:
        flow = self.of(tenant, flow_id)
        if not flow.open:
            return None
        self.append(flow, ("FeedbackResolved", {"resumed_by": ME}))
        flow.open, flow.claimed, flow.progressed = False, True, False
        return flow.request

    def peek(self, tenant: int, flow_id: Any) -> Any:
        flow = self.of(tenant, flow_id)
        return flow.request if flow.open else None

    def clear(self, tenant: int, flow_id: Any) -> None:
        flow = self.of(tenant, flow_id)
        if flow.open:
            self.append(flow, ("FeedbackResolved", {"cleared_by": ME}))
            flow.open, flow.claimed = False, False

    def reopen(self, tenant: int, flow_id: Any) -> Any:
        flow = self.of(tenant, flow_id)
        if flow.request is None:
            raise Refused(NoPendingFeedback, "none")
        if flow.open:
            raise Refused(Conflict, "pending")
        if not flow.claimed:
            raise Refused(Conflict, "resolved")
        if flow.progressed:
            raise Refused(Conflict, "progressed")
        self.append(flow, ("FeedbackRequested", None))
        flow.open, flow.claimed = True, False
        return flow.request[1]

    def load(self, tenant: int, flow_id: Any) -> Any:
        flow = self.of(tenant, flow_id)
        return flow.saves[-1][1] if flow.saves else canon(None)

    def history(self, tenant: int, flow_id: Any) -> Any:
        return list(self.of(tenant, flow_id).saves)


# -- what the persistence returns, as comparable data --

def pair_view(got: Any) -> Any:
    if got is None:
        return None
    state, context = got
    assert isinstance(state, dict) and isinstance(context, PendingFeedbackContext), got
    return (canon(state), canon(context))


def history_view(got: list[FlowSave]) -> list[tuple[Any, ...]]:
    return [(s.method_name, canon(s.state), s.version, s.at) for s in got]


def load_view(got: Any) -> Any:
    assert got is None or isinstance(got, dict), got
    return canon(got)


def outcome(call: Callable[..., Any], *args: Any, view: Callable[[Any], Any] | None = None
            ) -> Any:
    """``call``'s result as comparable data (through ``view``), or its refusal."""
    try:
        got = call(*args)
    except Refused as e:
        return ("refused", e.kind, e.reason)
    except (Conflict, InvalidArgument) as e:
        return ("refused", type(e), getattr(e, "reason", None))
    return got if view is None else view(got)


def same(got: Any, want: Any) -> bool:
    """Equal; a refusal may be a subclass of the documented error, with the same reason."""
    if isinstance(want, tuple) and len(want) == 3 and want[0] == "refused":
        return (isinstance(got, tuple) and len(got) == 3 and got[0] == "refused"
                and isinstance(got[1], type) and issubclass(got[1], want[1])
                and got[2] == want[2])
    return bool(got == want)


# -- values --

ZONES = st.sampled_from([None, UTC, PLUS2, MINUS530])
HASHABLE = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=2) | st.dates()
    | st.uuids() | st.decimals(places=2, allow_nan=False, allow_infinity=False),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=2),
    max_leaves=3)
LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=4),
    st.binary(max_size=3),
    st.decimals(allow_nan=False, allow_infinity=False) | st.decimals(places=3)
    | st.sampled_from([Decimal("19.990"), Decimal("-0"), Decimal("NaN"), Decimal("1E+3")]),
    st.datetimes(timezones=ZONES), st.dates(), st.times(timezones=ZONES), st.timedeltas(),
    st.uuids(), st.sampled_from([Score(0.5), Label.SPAM, Level.HIGH, 1, 1.0, True, "1"]),
    st.just(SURROGATE),
)
VALUES = st.recursive(
    LEAF,
    lambda inner: (st.lists(inner, max_size=3) | st.lists(inner, max_size=3).map(tuple)
                   | st.sets(HASHABLE, max_size=3) | st.frozensets(HASHABLE, max_size=3)
                   | st.dictionaries(st.text(max_size=3), inner, max_size=3)
                   | st.dictionaries(HASHABLE, inner, max_size=3)),
    max_leaves=8)
# What pydantic's JSON form is drawn with (an enum sends the whole state there).
JSONABLE = st.one_of(
    st.text(max_size=3), st.just(SURROGATE), st.integers(-5, 5), st.datetimes(timezones=ZONES),
    st.uuids(),
    st.decimals(places=2, allow_nan=False, allow_infinity=False),
    st.sets(st.integers(0, 9), max_size=3), st.tuples(st.integers(0, 3), st.text(max_size=2)),
    st.dictionaries(st.integers(0, 3), st.text(max_size=2), max_size=2),
    st.just(Color.RED))
DICT_STATE = st.dictionaries(st.text(max_size=3)
                             | st.sampled_from(["id", 1, (1, 2), SURROGATE]),
                             VALUES, max_size=4).map(lambda d: Spec("dict", d))
TYPED_STATE = st.fixed_dictionaries({
    "when": st.none() | st.datetimes(timezones=ZONES), "day": st.none() | st.dates(),
    "span": st.timedeltas(), "amount": st.decimals(allow_nan=False, allow_infinity=False),
    "ref": st.none() | st.uuids(), "tags": st.sets(st.text(max_size=2), max_size=3),
    "pair": st.tuples(st.integers(-9, 9), st.text(max_size=2)),
    "counts": st.dictionaries(st.integers(-3, 3), st.text(max_size=2), max_size=3),
    "notes": st.lists(st.text(max_size=2), max_size=2), "label": st.just(Label.SPAM),
    "level": st.just(Level.HIGH), "blob": st.binary(max_size=3),
}).map(lambda d: Spec("typed", d))
JSON_DICT_STATE = st.dictionaries(st.text(max_size=3), JSONABLE, max_size=3).map(
    lambda d: Spec("json_dict", {**d, "mood": Color.RED}))
MOODY_STATE = st.fixed_dictionaries({
    "when": st.none() | st.datetimes(timezones=ZONES),
    "tags": st.sets(st.integers(0, 9), max_size=3),
}).map(lambda d: Spec("moody", d))
STATE = st.one_of(DICT_STATE, DICT_STATE, TYPED_STATE, JSON_DICT_STATE, MOODY_STATE)
BAD_STATE = st.sampled_from(sorted(BAD)).map(lambda name: Spec("bad", name))

# A context's content: what CrewAI's to_dict keeps, and a few it turns into text.
OUTPUT = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=4) | st.datetimes(timezones=ZONES) | st.uuids(),
    lambda inner: (st.lists(inner, max_size=3) | st.lists(inner, max_size=2).map(tuple)
                   | st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=6)


@st.composite
def contexts(draw: st.DrawFn) -> Callable[[str], PendingFeedbackContext]:
    """A PendingFeedbackContext for a flow id (as tests/test_crewai_persistence.py makes one)."""
    fields = {
        "flow_class": draw(st.sampled_from(["app.flows.ReviewFlow", "ReviewFlow"])),
        "method_name": draw(st.sampled_from(["review", "second_review", "проверка"])),
        "method_output": draw(OUTPUT),
        "message": draw(st.text(max_size=6)),
        "emit": draw(st.none() | st.lists(st.text(min_size=1, max_size=4), max_size=2)),
        "default_outcome": draw(st.none() | st.just("rejected")),
        "metadata": draw(st.dictionaries(st.text(max_size=3), OUTPUT, max_size=2)),
        "llm": draw(st.sampled_from([None, "gpt-4o-mini", {"model": "m", "temperature": 0.5}])),
        "requested_at": draw(st.datetimes(timezones=ZONES)),
        "execution_uuid": draw(st.none() | st.uuids().map(str)),
        "trace_context": draw(st.none() | st.tuples(st.integers(0, 2**64), st.integers())),
    }
    return lambda flow_id: PendingFeedbackContext(flow_id=flow_id, **copy.deepcopy(fields))


def fixed_context(flow_id: str, method_name: str = "review") -> PendingFeedbackContext:
    return PendingFeedbackContext(flow_id=flow_id, flow_class="app.flows.ReviewFlow",
                                  method_name=method_name, method_output="draft",
                                  message="Publish?", requested_at=datetime(2026, 5, 1, 10, 0))


# -- operations --

PROC = st.sampled_from([0, 1])
SLOT = st.sampled_from(["last", "last", 0, 1, 2, 3, 4])
# A call on a flow: (method, its arguments beyond the flow id)
SAVE = st.tuples(st.just("save"), st.sampled_from(METHODS), STATE)
PAUSE = st.tuples(st.just("pause"), contexts(), STATE)
CALL = st.one_of(SAVE, SAVE, PAUSE, PAUSE,
                 st.tuples(st.sampled_from(["claim", "claim", "peek", "clear", "reopen",
                                            "load", "history"])))
RACER = st.one_of(SAVE, PAUSE, st.tuples(st.sampled_from(["claim", "claim", "clear",
                                                          "reopen"])),
                  st.tuples(st.sampled_from(["claim", "reopen"])))
# What races on a request just opened: mostly resumers claiming it.
RESUMER = st.one_of(st.tuples(st.sampled_from(["claim", "claim", "claim", "clear", "reopen"])),
                    st.tuples(st.sampled_from(["claim", "claim", "claim", "clear", "reopen"])),
                    SAVE)
OPERATIONS = st.one_of(
    st.tuples(st.just("call"), PROC, SLOT, CALL),
    st.tuples(st.just("call"), PROC, SLOT, CALL),
    st.tuples(st.just("call"), PROC, SLOT, CALL),
    st.tuples(st.just("race"), SLOT, RACER, RACER),
    # A pause, then a race on it (two resumers claiming it, say), from either process.
    st.tuples(st.just("pause+race"), PROC, SLOT, contexts(), STATE, RESUMER, RESUMER),
    # A resumer claims and "dies" (or the request is withdrawn); something may happen; the
    # request is reopened and claimed.
    st.tuples(st.just("abandon"), PROC, SLOT, contexts(), STATE,
              st.sampled_from(["claim", "claim", "clear"]),
              st.one_of(st.tuples(st.just("save"), st.sampled_from(METHODS), STATE),
                        st.tuples(st.sampled_from(["none", "clear", "claim", "reopen"])))),
    st.tuples(st.just("bad_id"), PROC,
              st.sampled_from(["save", "pause", "claim", "peek", "clear", "reopen", "load",
                               "history"]),
              st.sampled_from(["", NUL, SURROGATE, TOO_LONG, True, None, 7.0])),
    st.tuples(st.just("bad_state"), PROC, SLOT, st.sampled_from(["save", "pause"]), BAD_STATE),
    st.tuples(st.just("bad_method"), PROC, SLOT, st.sampled_from(["save", "pause"]),
              st.sampled_from(["", NUL, SURROGATE, "m" * 201])),
    st.tuples(st.just("bad_tenant"), PROC, st.sampled_from([0, 1]),
              st.sampled_from(["", NUL, "t" * 256, 5, None])),
    st.tuples(st.sampled_from(["close", "init_db"]), PROC, st.sampled_from([0, 1])),
)


def expand(op: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """The calls one drawn operation stands for."""
    if op[0] == "pause+race":
        _, proc, slot, context, state, first, second = op
        return [("call", proc, slot, ("pause", context, state)), ("race", slot, first, second)]
    if op[0] != "abandon":
        return [op]
    _, proc, slot, context, state, resolution, middle = op
    steps: list[tuple[Any, ...]] = [("call", proc, slot, ("pause", context, state)),
                                    ("call", 1 - proc, slot, (resolution,))]
    if middle[0] != "none":
        steps.append(("call", proc, slot, middle))
    return [*steps, ("call", proc, slot, ("reopen",)), ("call", 1 - proc, slot, ("claim",))]


class Run:
    """One example: two processes' persistences in two tenants of its own, and the model."""

    def __init__(self, store: EventStore, url: str) -> None:
        self.store = store
        prefix = uuid.uuid4().hex[:12]
        self.tenants = [f"t-{prefix}-a", f"t-{prefix}-b"]
        # Process 0 on the test's store; process 1 opens its own from the URL (on first use).
        self.procs = [[EventStoreFlowPersistence(store, tenant_id=t) for t in self.tenants],
                      [EventStoreFlowPersistence(url, tenant_id=t) for t in self.tenants]]
        self.model = Model(store.last_position())
        self.last = 0  # the flow that paused last
        self.open = False  # whether the flow a race ran on had an open request
        self.steps = 0

    def close(self) -> None:
        for p in self.procs[1]:
            p.close()

    def flow(self, slot: Any) -> tuple[int, Any]:
        if slot == "last":
            slot = self.last
        return FLOWS[slot]

    @staticmethod
    def window(lo: datetime) -> Window:
        return Window(lo, datetime.now(UTC))

    # A call on the persistence, and on the model.

    def real(self, p: EventStoreFlowPersistence, flow_id: Any, call: tuple[Any, ...],
             built: Any) -> Any:
        name = call[0]
        if name == "save":
            return outcome(p.save_state, flow_id, call[1], built)
        if name == "pause":
            return outcome(p.save_pending_feedback, flow_id, built[0], built[1])
        if name == "claim":
            return outcome(p.load_pending_feedback, flow_id, view=pair_view)
        if name == "peek":
            return outcome(p.peek_pending_feedback, flow_id, view=pair_view)
        if name == "clear":
            return outcome(p.clear_pending_feedback, flow_id)
        if name == "reopen":
            return outcome(p.reopen_pending_feedback, flow_id, view=canon)
        if name == "load":
            return outcome(p.load_state, flow_id, view=load_view)
        assert name == "history"
        return outcome(p.history, flow_id, view=history_view)

    @staticmethod
    def modelled(m: Model, tenant: int, flow_id: Any, call: tuple[Any, ...], built: Any,
                 at: Window) -> Any:
        name = call[0]
        if name == "save":
            return outcome(m.save, tenant, flow_id, call[1], call[2], built, at)
        if name == "pause":
            return outcome(m.pause, tenant, flow_id, built[0], call[2], built[1], at)
        return outcome(getattr(m, name), tenant, flow_id)

    @staticmethod
    def build(flow_id: Any, call: tuple[Any, ...]) -> Any:
        """A call's state (and context) object, made once for the call and the model."""
        key = str(flow_id)
        if call[0] == "save":
            return call[2].build(key)
        if call[0] == "pause":
            make = call[1]
            context = make(key) if callable(make) else make
            return (context, call[2].build(key))
        return None

    def call(self, proc: int, tenant: int, flow_id: Any, call: tuple[Any, ...]
             ) -> tuple[Any, Any]:
        built = self.build(flow_id, call)
        lo = datetime.now(UTC)
        got = self.real(self.procs[proc][tenant], flow_id, call, built)
        want = self.modelled(self.model, tenant, flow_id, call, built, self.window(lo))
        return got, want

    def race(self, slot: Any, first: tuple[Any, ...], second: tuple[Any, ...]
             ) -> tuple[Any, Any]:
        """The two calls on one flow, from the two processes at once: the outcomes and the
        state after are those of one of the two orders."""
        tenant, flow_id = self.flow(slot)
        self.open = self.model.of(tenant, flow_id).open  # (for the statistics)
        calls = [first, second]
        built = [self.build(flow_id, c) for c in calls]
        got: list[Any] = [None, None]
        errors: list[BaseException] = []
        barrier = threading.Barrier(2, timeout=60)

        def racer(i: int) -> None:
            try:
                barrier.wait()
                got[i] = self.real(self.procs[i][tenant], flow_id, calls[i], built[i])
            except BaseException as e:  # re-raised below, in the test's thread
                errors.append(e)

        lo = datetime.now(UTC)
        threads = [threading.Thread(target=racer, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        at = self.window(lo)
        observed = self.observe()
        tried = []
        for order in ((0, 1), (1, 0)):
            m = copy.deepcopy(self.model)
            want: list[Any] = [None, None]
            for i in order:
                want[i] = self.modelled(m, tenant, flow_id, calls[i], built[i], at)
            tried.append((order, want))
            if all(same(g, w) for g, w in zip(got, want, strict=True)) \
                    and observed == self.expected(m):
                self.model = m
                return got, got
        raise AssertionError(("no order of the race explains it", calls, got, tried, observed,
                              self.expected(self.model)))

    def step(self, op: tuple[Any, ...]) -> tuple[Any, Any]:
        self.steps += 1
        name = op[0]
        if name == "call":
            _, proc, slot, call = op
            if call[0] == "pause" and slot != "last":
                self.last = slot
            tenant, flow_id = self.flow(slot)
            return self.call(proc, tenant, flow_id, call)
        if name == "race":
            return self.race(op[1], op[2], op[3])
        if name == "bad_id":
            _, proc, call, bad = op
            args = {"save": ("save", "begin", Spec("dict", {"ok": 1})),
                    "pause": ("pause", fixed_context("x"), Spec("dict", {"ok": 1}))}
            return self.call(proc, 0, bad, args.get(call, (call,)))
        if name == "bad_state":
            _, proc, slot, where, spec = op
            tenant, flow_id = self.flow(slot)
            call = (("save", "begin", spec) if where == "save"
                    else ("pause", fixed_context(str(flow_id)), spec))
            return self.call(proc, tenant, flow_id, call)
        if name == "bad_method":
            _, proc, slot, where, bad = op
            tenant, flow_id = self.flow(slot)
            call = (("save", bad, Spec("dict", {"ok": 1})) if where == "save"
                    else ("pause", fixed_context(str(flow_id), bad), Spec("dict", {"ok": 1})))
            return self.call(proc, tenant, flow_id, call)
        if name == "bad_tenant":  # refused when made, and when set (the tenant unchanged)
            _, proc, tenant, bad = op
            p = self.procs[proc][tenant]

            def assign() -> None:
                p.tenant_id = bad

            refused = ("refused", InvalidArgument, None)
            assigned = outcome(assign)
            assert same(assigned, refused), assigned
            assert p.tenant_id == self.tenants[tenant], p.tenant_id
            return (outcome(lambda: EventStoreFlowPersistence(self.store, tenant_id=bad),
                            view=lambda _: "made"), refused)
        # close, init_db: a store passed in stays open; one opened from the URL is closed and
        # opened again on the next call.
        _, proc, tenant = op
        p = self.procs[proc][tenant]
        return outcome(getattr(p, name)), None

    # What every flow looks like, to the persistence and to the model.

    def observe(self) -> Any:
        """Every flow through the persistence (the two processes in turn) and the store."""
        views = []
        proc = self.steps % 2
        for tenant, flow_id in FLOWS:
            if flow_id == 7 and proc == 1:
                continue  # "7" is read instead
            if flow_id == "7" and proc == 0:
                continue
            p = self.procs[proc][tenant]
            events = []
            for e in self.store.read_stream(Flows.stream_id(str(flow_id)),
                                            tenant_id=self.tenants[tenant]):
                feedback = getattr(e.data, "feedback", None) if e.type == "FeedbackResolved" \
                    else None
                events.append((e.type, feedback))
            views.append(((tenant, str(flow_id)),
                          outcome(p.load_state, flow_id, view=load_view),
                          outcome(p.peek_pending_feedback, flow_id, view=pair_view),
                          outcome(p.history, flow_id, view=history_view),
                          events))
        return views, self.store.last_position()

    def expected(self, m: Model) -> Any:
        views = []
        proc = self.steps % 2
        for tenant, flow_id in FLOWS:
            if (flow_id == 7 and proc == 1) or (flow_id == "7" and proc == 0):
                continue
            key = (tenant, str(flow_id))
            flow = m.flows.get(key, MFlow())
            views.append((key, *flow.view()))
        return views, m.position

    def check(self) -> None:
        got, want = self.observe(), self.expected(self.model)
        assert got == want, (got, want)


def label(run: Run, op: tuple[Any, ...], want: Any) -> str:
    name = op[0] if op[0] != "call" else op[3][0]
    if isinstance(want, tuple) and len(want) == 3 and want[0] == "refused":
        return f"{name}: refused {want[1].__name__}({want[2]})"
    if name == "claim":
        return f"claim: {'none' if want is None else 'claimed'}"
    if name == "race":
        return f"race: {op[2][0]} vs {op[3][0]}{' (open)' if run.open else ''}"
    if op[0] == "call" and name in ("save", "pause"):
        return f"{name}: {op[3][2].kind}"
    if name == "reopen":
        return "reopen: reopened"
    return name


@pytest.fixture
def run_factory(store: EventStore, url: str) -> Callable[[], Run]:
    return lambda: Run(store, url)


@settings(max_examples=examples(20), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(ops=st.lists(OPERATIONS, min_size=8, max_size=25))
def test_crewai_persistence_behaves_as_documented(run_factory: Callable[[], Run],
                                                  ops: list[tuple[Any, ...]]) -> None:
    """Random calls on two processes' persistences and on the model have the same outcomes,
    and every flow the same state, history, open request and events."""
    run = run_factory()
    try:
        for index, op in enumerate(step for drawn in ops for step in expand(drawn)):
            got, want = run.step(op)
            assert same(got, want), (index, op, got, want)
            event(label(run, op, want))
            run.check()
    finally:
        run.close()


def test_the_model_s_flow_ids_are_the_stream_ids_the_readme_names() -> None:
    """One stream per flow, ``flow-<state id>``; an integer id as its digits."""
    assert Flows.stream_id("f-1") == "flow-f-1"
    assert Flows.stream_id(LONG) == f"flow-{LONG}"
    assert flow_key(7) == "7"
    with pytest.raises(Refused):
        flow_key(True)
