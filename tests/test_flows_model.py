"""A model-based test of ``projections.Flows`` against a plain-Python model.

The model follows the README ("Flow state") and the docstrings of ``projections.flows``: one
stream per flow, ``flow-<flow_id>``; ``save`` appends a step and returns the stream version;
``load`` is the newest saved state (``None`` before the first save); ``history`` is every saved
step, oldest first, with its method, state, time and version; ``request_feedback`` opens a
request (replacing an open one) and returns the version; ``pending_feedback`` is the open
request; ``resolve_feedback`` closes it and returns it, or raises ``NoPendingFeedback``.  State
values come back with their types (datetimes, dates, times, timedeltas, UUIDs, decimals, sets,
frozensets, tuples, bytes, non-string keys, NaN and infinities, strings with lone surrogates; a
subclass of a plain value as that plain value); any other type is refused with
``InvalidArgument``, state too deep or holding itself with ``InvalidEvent``, and neither writes
anything.  Hypothesis draws random
calls over two flows in two tenants (one of them the default, reached by leaving ``tenant_id``
out; the flow ids are the example's own) with an injected clock in another zone (recorded
times are UTC); after every call the outcome (value, or exact error type and ``reason``) and
every flow's ``load``, ``history``, ``pending_feedback`` and stream version must match the
model.  Values are compared with their types: ``1``, ``1.0`` and ``True`` differ, as do a set
and a frozenset, and a decimal keeps its digits.

Ambiguities settled (the README and docstrings leave them open):

* A feedback request's ``context`` and ``state``, and the answer, are kept with their types as a
  saved state is (``PendingFeedback`` holds them as ``Any``); a request is not a save: ``load``
  and ``history`` do not change, but the version does.  A resolution is one event too.
* ``NoPendingFeedback``'s ``reason`` is ``none`` for a flow that never asked and ``resolved``
  once a request was answered, as the example tests pin (tests/test_flows.py).
* Nesting: "256 levels, type wrappers included" leaves where a wrapper counts open, so only
  states far below (a few levels) or far above (300 levels) are drawn.
* An unstorable answer to a flow with no open request may be refused for either reason: which
  check comes first is not said.
* A wall time its zone skips (02:30 in Paris on the day clocks go forward) exists in Python,
  which compares times of one zone by wall time: it must come back as itself, not as the same
  instant at 03:30 (it did, until this test's hunt found it).
* Ids: at most 200 characters for a flow id, 255 for a tenant id, none empty, no NUL or lone
  surrogate (the README's limits); a method name with NUL is refused as the example tests say.
"""

from __future__ import annotations

import enum
import pathlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from eventstore import EventStore, InvalidArgument, InvalidEvent
from projections.errors import Conflict, NoPendingFeedback
from projections.flows import Flows, FlowSave, PendingFeedback
from tests._clock import Clock
from tests._examples import examples
from tests._model import Color, Label, Level, Refused, Score, canon, is_id

PLUS2 = timezone(timedelta(hours=2))
MINUS530 = timezone(-timedelta(hours=5, minutes=30))
PARIS = ZoneInfo("Europe/Paris")
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=PLUS2)
NUL = "a\x00b"
SURROGATE = "a\ud800"
METHODS = ["start", "next", "étape"]


# -- what the documents say a value comes back as --

def kept(value: Any, depth: int = 0, path: tuple[int, ...] = ()) -> Any:
    """The value as ``load`` gives it back, or the refusal the README names."""
    if id(value) in path:
        raise Refused(InvalidEvent)  # holds itself
    if depth > 280:
        raise Refused(InvalidEvent)  # deeper than the store takes, whatever a wrapper counts
    if value is None or type(value) is bool:
        return value
    if isinstance(value, enum.Enum) and not isinstance(value, (int, str)):
        raise Refused(InvalidArgument)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)  # lone surrogates too (README: strings UTF-8 cannot hold are kept)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (Decimal, datetime, date, time, timedelta, uuid.UUID)):
        return value
    inner = (*path, id(value))
    if isinstance(value, list):
        return [kept(v, depth + 1, inner) for v in value]
    if isinstance(value, tuple):
        return tuple(kept(v, depth + 1, inner) for v in value)
    if isinstance(value, frozenset):
        return frozenset(kept(v, depth + 1, inner) for v in value)
    if isinstance(value, set):
        return {kept(v, depth + 1, inner) for v in value}
    if isinstance(value, dict):
        return {kept(k, depth + 1, inner): kept(v, depth + 1, inner) for k, v in value.items()}
    raise Refused(InvalidArgument)


# -- the model --

@dataclass
class MFlow:
    saves: list[tuple[str, Any, datetime, int]] = field(default_factory=list)
    version: int = 0
    pending: tuple[Any, Any, datetime] | None = None
    asked: bool = False  # ever requested feedback

    def history_view(self) -> list[tuple[Any, ...]]:
        return [(m, canon(s), at, v) for m, s, at, v in self.saves]

    def load_view(self) -> Any:
        return canon(self.saves[-1][1] if self.saves else None)  # a saved None loads as None


class Model:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.flows: dict[tuple[str, str], MFlow] = {}

    def now(self) -> datetime:
        return self.clock.now.astimezone(UTC)

    def of(self, flow_id: Any, tenant: Any) -> MFlow:
        if not is_id(flow_id, 200) or not is_id(tenant, 255):
            raise Refused(InvalidArgument)
        return self.flows.setdefault((flow_id, tenant), MFlow())

    def save(self, flow_id: Any, method: Any, state: Any, tenant: Any) -> int:
        flow = self.of(flow_id, tenant)
        if not isinstance(method, str) or "\x00" in method:
            raise Refused(InvalidArgument)
        value = kept(state)
        flow.version += 1
        flow.saves.append((method, value, self.now(), flow.version))
        return flow.version

    def request(self, flow_id: Any, context: Any, state: Any, tenant: Any) -> int:
        flow = self.of(flow_id, tenant)
        pending = (kept(context), kept(state), self.now())
        flow.version += 1
        flow.pending, flow.asked = pending, True
        return flow.version

    def resolve(self, flow_id: Any, feedback: Any, tenant: Any) -> Any:
        flow = self.of(flow_id, tenant)
        if flow.pending is None:
            raise Refused(NoPendingFeedback, "resolved" if flow.asked else "none")
        kept(feedback)
        resolved = flow.pending
        flow.version += 1
        flow.pending = None
        return pending_view_of(flow_id, resolved)


def pending_view_of(flow_id: str, pending: tuple[Any, Any, datetime] | None) -> Any:
    """A model's request as ``pending_view`` shows a real one."""
    if pending is None:
        return None
    return (flow_id, canon(pending[0]), canon(pending[1]), pending[2])


def pending_view(got: PendingFeedback | None) -> Any:
    if got is None:
        return None
    assert got.requested_at.tzinfo == UTC, got.requested_at
    return (got.flow_id, canon(got.context), canon(got.state), got.requested_at)


def history_view(got: list[FlowSave]) -> list[tuple[Any, ...]]:
    assert all(s.at.tzinfo == UTC for s in got), got
    return [(s.method_name, canon(s.state), s.at, s.version) for s in got]


# -- values --

ZONES = st.sampled_from([None, UTC, PLUS2, MINUS530])
# Strings UTF-8 cannot hold: a file name read with surrogateescape, a cut surrogate pair.
SURROGATES = st.sampled_from(["caf\udce9", "\ud83d", "\udfff\ud800"])
HASHABLE = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=2) | SURROGATES | st.dates()
    | st.uuids() | st.decimals(places=2, allow_nan=False, allow_infinity=False),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=2),
    max_leaves=3)
LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=4),
    SURROGATES, st.binary(max_size=3), st.binary(max_size=2).map(bytearray),
    st.decimals(allow_nan=False, allow_infinity=False) | st.decimals(places=3)
    | st.sampled_from([Decimal("19.990"), Decimal("-0"), Decimal("NaN"), Decimal("-Infinity"),
                       Decimal("1E+3")]),
    st.datetimes(timezones=ZONES), st.datetimes(timezones=st.just(PARIS)),
    st.dates(), st.times(timezones=ZONES), st.timedeltas(), st.uuids(),
    st.sampled_from([Score(0.5), Score("inf"), Label.SPAM, Level.HIGH, 1, 1.0, True, "1"]),
)
# A dict shaped as the stored form of a typed value: user data, to come back as it is.
LOOKALIKE = st.fixed_dictionaries({"$type": st.sampled_from(["uuid", "set", "dict", "x"]),
                                   "value": LEAF})
VALUES = st.recursive(
    LEAF | LOOKALIKE,
    lambda inner: (st.lists(inner, max_size=3) | st.lists(inner, max_size=3).map(tuple)
                   | st.sets(HASHABLE, max_size=3) | st.frozensets(HASHABLE, max_size=3)
                   | st.dictionaries(st.text(max_size=3) | SURROGATES, inner, max_size=3)
                   | st.dictionaries(HASHABLE, inner, max_size=3)),
    max_leaves=10)
STATE = st.dictionaries(st.text(max_size=3), VALUES, max_size=4) | VALUES


def deep(levels: int) -> Any:
    value: Any = 1
    for i in range(levels):
        value = [value] if i % 2 else (value,)
    return value


def cyclic() -> Any:
    loop: dict[str, Any] = {"a": 1}
    loop["self"] = [loop]
    return loop


# Built afresh for each use: a cycle is an object of its own.
BAD_VALUES = st.sampled_from([
    lambda: object(), lambda: complex(1, 2), lambda: pathlib.Path("x"), lambda: Color.RED,
    lambda: {"s": SURROGATE}, lambda: {"when": [date(2020, 1, 1), object()]},
    lambda: deep(300), lambda: {"x": [deep(299)]}, cyclic, lambda: (cyclic(),),
]).map(lambda make: make())


# -- operations --

# An answer: often none at all (a resolution all the same: a second one is told "resolved").
FEEDBACK = st.one_of(st.none(), VALUES)
# A flow: the one that asked last, one of the two flows in one of the two tenants.
SLOT = st.sampled_from(["asked", "asked", (0, 0), (0, 1), (1, 0), (1, 1)])
OPERATIONS = st.sampled_from([
    st.tuples(st.just("save"), SLOT, st.sampled_from(METHODS), STATE),
    st.tuples(st.just("save"), SLOT, st.sampled_from(METHODS), STATE),
    st.tuples(st.just("save"), SLOT, st.sampled_from(METHODS), STATE),
    st.tuples(st.just("request"), SLOT, VALUES, STATE),
    st.tuples(st.just("request"), SLOT, VALUES, STATE),
    st.tuples(st.just("resolve"), SLOT, FEEDBACK),
    st.tuples(st.just("resolve"), SLOT, FEEDBACK),
    st.tuples(st.just("advance"), st.sampled_from([0.25, 1, 3600])),
    # A request answered, and answered again: the second is refused, whatever the first answer.
    st.tuples(st.just("ask+answer+again"), SLOT, VALUES, STATE, FEEDBACK, FEEDBACK),
    st.tuples(st.sampled_from(["load", "history", "pending"]), SLOT),
    st.tuples(st.just("bad_value"), SLOT,
              st.sampled_from(["save", "context", "request_state", "feedback"]), BAD_VALUES),
    st.tuples(st.just("bad_id"),
              st.sampled_from(["save", "load", "history", "request", "pending", "resolve"]),
              st.sampled_from(["flow", "tenant"]),
              st.sampled_from(["", NUL, SURROGATE, "long", 5, None])),
    st.tuples(st.just("bad_method"), SLOT, st.sampled_from([NUL, 5, None])),
]).flatmap(lambda op: op)


def outcome(call: Any, *args: Any, view: Any = None, **kwargs: Any) -> Any:
    """``call``'s result as comparable data (through ``view``), or its refusal."""
    try:
        got = call(*args, **kwargs)
    except Refused as e:
        return ("refused", e.kind, e.reason)
    except InvalidEvent:
        return ("refused", InvalidEvent, None)
    except InvalidArgument:
        return ("refused", InvalidArgument, None)
    except Conflict as e:
        return ("refused", type(e), e.reason)
    return got if view is None else view(got)


def same(got: Any, want: Any) -> bool:
    """Equal; a refusal the documents name ``InvalidArgument`` for may be a subclass of it."""
    if (isinstance(want, tuple) and len(want) == 3 and want[0] == "refused"
            and want[1] is InvalidArgument and isinstance(got, tuple) and len(got) == 3
            and got[0] == "refused" and isinstance(got[1], type)):
        return issubclass(got[1], InvalidArgument)
    return bool(got == want)


class Run:
    """One example: the facade, the model, the example's flows and tenants."""

    def __init__(self, flows: Flows, model: Model, store: EventStore) -> None:
        self.flows, self.model, self.store = flows, model, store
        prefix = uuid.uuid4().hex[:12]
        self.tenants: list[str | None] = [None, f"t-{prefix}"]  # None: the default tenant
        self.ids = [f"{prefix}-f1", f"{prefix}-f2"]
        self.asked: tuple[int, int] = (0, 0)  # the slot that asked last

    def slot(self, which: str | tuple[int, int]) -> tuple[str, str | None]:
        t, f = self.asked if isinstance(which, str) else which  # str: "asked"
        return self.ids[f], self.tenants[t]

    @staticmethod
    def kw(tenant: Any) -> dict[str, Any]:
        """The facade's tenant argument: left out for the default tenant."""
        return {} if tenant is None else {"tenant_id": tenant}

    @staticmethod
    def mt(tenant: Any) -> Any:
        return "default" if tenant is None else tenant

    def step(self, op: tuple[Any, ...]) -> tuple[Any, Any]:
        f, m, name = self.flows, self.model, op[0]
        if name == "advance":
            m.clock.advance(seconds=op[1])
            return None, None
        if name == "bad_id":
            return self.bad_id(op[1], op[2], op[3])
        if name == "request" and op[1] != "asked":
            self.asked = op[1]
        flow_id, tenant = self.slot(op[1])
        kw, mt = self.kw(tenant), self.mt(tenant)
        if name == "save":
            _, _, method, state = op
            return (outcome(f.save, flow_id, method, state, **kw),
                    outcome(m.save, flow_id, method, state, mt))
        if name == "request":
            _, _, context, state = op
            return (outcome(f.request_feedback, flow_id, context, state, **kw),
                    outcome(m.request, flow_id, context, state, mt))
        if name == "resolve":
            return (outcome(f.resolve_feedback, flow_id, op[2], **kw, view=pending_view),
                    outcome(m.resolve, flow_id, op[2], mt))
        if name in ("load", "history", "pending"):
            return self.read(name, flow_id, tenant)
        if name == "bad_method":
            return (outcome(f.save, flow_id, op[2], {"ok": 1}, **kw),
                    outcome(m.save, flow_id, op[2], {"ok": 1}, mt))
        assert name == "bad_value"
        where, bad = op[2], op[3]
        if where == "save":
            return (outcome(f.save, flow_id, "step", bad, **kw),
                    outcome(m.save, flow_id, "step", bad, mt))
        if where in ("context", "request_state"):
            context, state = (bad, {}) if where == "context" else ({}, bad)
            return (outcome(f.request_feedback, flow_id, context, state, **kw),
                    outcome(m.request, flow_id, context, state, mt))
        got = outcome(f.resolve_feedback, flow_id, bad, **kw, view=pending_view)
        want = outcome(m.resolve, flow_id, bad, mt)
        if want[:2] == ("refused", NoPendingFeedback) and same(
                got, ("refused", InvalidArgument, None)):
            return got, got  # nothing to resolve and a bad answer: either refusal will do
        return got, want

    def read(self, name: str, flow_id: Any, tenant: Any,
             kw: dict[str, Any] | None = None) -> tuple[Any, Any]:
        """A read of the flow; ``kw``: the facade's tenant argument, if not ``kw(tenant)``."""
        f, m = self.flows, self.model
        mt = self.mt(tenant) if kw is None else kw["tenant_id"]
        kw = self.kw(tenant) if kw is None else kw
        if name == "load":
            return (outcome(f.load, flow_id, **kw, view=canon),
                    outcome(m.of, flow_id, mt, view=MFlow.load_view))
        if name == "history":
            return (outcome(f.history, flow_id, **kw, view=history_view),
                    outcome(m.of, flow_id, mt, view=MFlow.history_view))
        return (outcome(f.pending_feedback, flow_id, **kw, view=pending_view),
                outcome(m.of, flow_id, mt, view=lambda fl: pending_view_of(flow_id, fl.pending)))

    def bad_id(self, call: str, where: str, bad: Any) -> tuple[Any, Any]:
        flow_id, tenant = self.ids[0], self.tenants[1]
        if bad == "long":
            bad = flow_id.ljust(201, "x") if where == "flow" else "t" * 256
        flow_id, tenant = (bad, tenant) if where == "flow" else (flow_id, bad)
        f, m, kw = self.flows, self.model, {"tenant_id": tenant}  # None too: not the default
        if call == "save":
            return (outcome(f.save, flow_id, "step", {}, **kw),
                    outcome(m.save, flow_id, "step", {}, tenant))
        if call == "request":
            return (outcome(f.request_feedback, flow_id, {}, {}, **kw),
                    outcome(m.request, flow_id, {}, {}, tenant))
        if call == "resolve":
            return (outcome(f.resolve_feedback, flow_id, "ok", **kw, view=pending_view),
                    outcome(m.resolve, flow_id, "ok", tenant))
        return self.read(call, flow_id, tenant, kw)

    def check(self) -> None:
        """Every flow of the example agrees with the model, and with the store."""
        for tenant in self.tenants:
            for flow_id in self.ids:
                for name in ("load", "history", "pending"):
                    got, want = self.read(name, flow_id, tenant)
                    assert got == want, (name, flow_id, tenant, got, want)
                stream = Flows.stream_id(flow_id)
                assert stream == f"flow-{flow_id}"
                assert self.store.stream_version(stream, tenant_id=self.mt(tenant)) == (
                    self.model.of(flow_id, self.mt(tenant)).version)


def label(want: Any) -> str:
    if isinstance(want, tuple) and want and want[0] == "refused":
        return f"refused {want[1].__name__}({want[2]})"
    return type(want).__name__


def expand(op: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """The calls one drawn operation stands for."""
    if op[0] == "ask+answer+again":
        _, slot, context, state, first, second = op
        return [("request", slot, context, state), ("resolve", slot, first),
                ("resolve", slot, second)]
    return [op]


@settings(max_examples=examples(25), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(OPERATIONS, min_size=10, max_size=35))
def test_flows_behave_as_documented(store: EventStore, ops: list[tuple[Any, ...]]) -> None:
    """Random calls on the facade and on the model have the same outcomes and states."""
    clock = Clock(T0)
    run = Run(Flows(store, clock=clock), Model(clock), store)
    ops = [step for op in ops for step in expand(op)]
    for step, op in enumerate(ops):
        got, want = run.step(op)
        assert same(got, want), (step, op, got, want)
        event(f"{op[0]}: {label(want)}")
        run.check()
