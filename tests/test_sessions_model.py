"""A model-based test of ``projections.AgentSessions`` against a plain-Python model.

The model follows the README ("Agent-session snapshots") and the docstrings of
``projections.sessions``: ``save`` appends a snapshot and makes the session active (again),
``retire`` ends an active session once and says whether this call did, ``finish_run`` retires
the run's active sessions with the reason ``run <status>`` and returns those it retired,
``active_in_run`` lists the run's active sessions; ``state`` shows the newest snapshot, the
count of saves and the retirement until the next save; ``history`` is every save and
retirement, oldest first, each with its stream version.  Hypothesis draws random calls over two
tenants, two runs and sessions differing in one key part each (time moves by an injected clock
in another zone: recorded times are UTC); after every call the return value, or the exact typed
error, and every key's ``state``, ``active`` and ``history`` and every run query must match the
model, as must the stream version in the store.  Each example works under tenants of its own.

Ambiguities settled (the README and docstrings leave them open):

* The entry kinds (``saved``, ``retired``), the reason ``finish_run`` records (``run
  <status>``), that retiring a session never saved or already retired returns ``False`` and
  writes nothing, and that ``state`` clears the retirement on the next save, are taken from
  the example tests (tests/test_sessions.py), which pin them.
* A snapshot and its layer specs are JSON, as the example tests say ("keys as strings, tuples as
  lists"), and as the README says a conversation's values are (bytes as base64 text): the model
  compares their JSON form, value types included (``1`` is not ``1.0`` nor ``True``).  A
  mapping whose keys would collide as JSON (``1`` and ``"1"``) is refused, as the README says of
  ``Conversations``: storing it would silently drop a value.  No NaN, infinity or lone
  surrogate (the README's limits for events).
* ``state`` of a key never saved has no snapshot, no saves and is not active; whether it names
  the key is not said, so it may carry the key or ``None``.
* The order of ``active_in_run`` and of ``finish_run``'s result is not said: compared as sets
  (with no key twice).
* Bad input: a key's tenant is a tenant id (at most 255 characters), its other parts facade ids
  (at most 200, as the example tests refuse a 201-character run id); none empty, no NUL or lone
  surrogate.  The error must be an ``InvalidArgument`` (a subclass will do) and nothing may be
  written.  The pending form and tool-call ids are facade ids too (at most 200 characters, no
  NUL: the README allows NUL in no id; until this test found it, a NUL there was stored).
"""

from __future__ import annotations

import base64
import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from eventstore import EventStore, InvalidArgument
from projections.errors import Conflict
from projections.sessions import (
    AgentSessions,
    SessionEntry,
    SessionKey,
    SessionSnapshot,
    SessionState,
)
from tests._clock import Clock
from tests._examples import examples
from tests._model import Refused, is_id, is_text

PLUS2 = timezone(timedelta(hours=2))
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=PLUS2)
RUNS = ["run-1", "run-2"]
# Sessions of one run that differ in one key part each (node, binding, agent).
PARTS = [("node-1", "binding-1", "agent-1"), ("node-1", "binding-1", "agent-2"),
         ("node-1", "binding-2", "agent-1"), ("node-2", "binding-1", "agent-1")]
# Which sessions exist: (tenant index, run index, parts index); run-2 and tenant b have fewer.
SLOTS = [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 0), (0, 1, 1), (1, 0, 0)]
NUL = "a\x00b"
SURROGATE = "a\ud800"


def check_key(key: Any) -> None:
    if not isinstance(key, SessionKey):
        raise Refused(InvalidArgument)
    parts = (key.tenant_id, key.workflow_run_id, key.node_id, key.binding_id, key.agent_id)
    if not is_id(parts[0]) or not all(is_id(p, 200) for p in parts[1:]):
        raise Refused(InvalidArgument)


def as_json(value: Any) -> Any:
    """The value as JSON gives it back (refusing what JSON cannot hold)."""
    if isinstance(value, str) and not is_text(value):
        raise Refused(InvalidArgument)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Refused(InvalidArgument)
        return value
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if isinstance(k, bool) or not (isinstance(k, int) or is_text(k)):
                raise Refused(InvalidArgument)
            name = str(k)
            if name in out:
                raise Refused(InvalidArgument)  # 1 and "1": one would be lost
            out[name] = as_json(v)
        return out
    raise Refused(InvalidArgument)


def canon(value: Any) -> Any:
    """JSON data compared with its types: ``1``, ``1.0`` and ``True`` differ."""
    if isinstance(value, dict):
        return ("dict", sorted((k, canon(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("list", [canon(v) for v in value])
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


@dataclass
class MSnap:
    snapshot: Any
    layer_specs: Any
    pending_form_id: str | None
    pending_tool_call_id: str | None
    saved_at: datetime
    version: int

    def view(self) -> tuple[Any, ...]:
        return (canon(self.snapshot), canon(self.layer_specs), self.pending_form_id,
                self.pending_tool_call_id, self.saved_at, self.version)


def snap_view(snap: SessionSnapshot | None) -> tuple[Any, ...] | None:
    if snap is None:
        return None
    assert snap.saved_at.tzinfo == UTC, snap.saved_at
    return (canon(snap.snapshot), canon(snap.layer_specs), snap.pending_form_id,
            snap.pending_tool_call_id, snap.saved_at, snap.version)


@dataclass
class MSession:
    key: SessionKey
    history: list[tuple[str, int, datetime, MSnap | None, str | None]] = field(
        default_factory=list)
    active: bool = False
    latest: MSnap | None = None
    saves: int = 0
    retired_reason: str | None = None
    retired_at: datetime | None = None

    def state_view(self) -> tuple[Any, ...]:
        return (self.active, None if self.latest is None else self.latest.view(), self.saves,
                self.retired_reason, self.retired_at)

    def history_view(self) -> list[tuple[Any, ...]]:
        return [(kind, version, at, None if snap is None else snap.view(), reason)
                for kind, version, at, snap, reason in self.history]


def state_view(state: SessionState) -> tuple[Any, ...]:
    if state.retired_at is not None:
        assert state.retired_at.tzinfo == UTC
    return (state.active, snap_view(state.latest), state.saves, state.retired_reason,
            state.retired_at)


def entry_view(entry: SessionEntry) -> tuple[Any, ...]:
    assert entry.at.tzinfo == UTC
    return (entry.kind, entry.version, entry.at, snap_view(entry.snapshot), entry.reason)


class Model:
    """The sessions of one example, keyed by their SessionKey."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sessions: dict[SessionKey, MSession] = {}

    def now(self) -> datetime:
        return self.clock.now.astimezone(UTC)

    def of(self, key: SessionKey) -> MSession:
        check_key(key)
        return self.sessions.setdefault(key, MSession(key))

    def save(self, key: Any, snapshot: Any, layer_specs: Any, form: Any, call: Any) -> MSnap:
        check_key(key)
        for pending in (form, call):
            if pending is not None and not is_id(pending, 200):
                raise Refused(InvalidArgument)
        snap_json, specs_json = as_json(snapshot), as_json(layer_specs)
        s = self.of(key)
        snap = MSnap(snap_json, specs_json, form, call, self.now(), len(s.history) + 1)
        s.history.append(("saved", snap.version, snap.saved_at, snap, None))
        s.active, s.latest, s.saves = True, snap, s.saves + 1
        s.retired_reason = s.retired_at = None
        return snap

    def retire(self, key: Any, reason: Any) -> bool:
        check_key(key)
        if not isinstance(reason, str) or not reason or "\x00" in reason:
            raise Refused(InvalidArgument)
        return self._retire(self.of(key), reason)

    def _retire(self, s: MSession, reason: str) -> bool:
        if not s.active:
            return False
        s.history.append(("retired", len(s.history) + 1, self.now(), None, reason))
        s.active, s.retired_reason, s.retired_at = False, reason, self.now()
        return True

    def check_run(self, tenant: Any, run: Any) -> None:
        if not is_id(tenant) or not is_id(run, 200):
            raise Refused(InvalidArgument)

    def active_in_run(self, tenant: Any, run: Any) -> list[SessionKey]:
        self.check_run(tenant, run)
        return [k for k, s in self.sessions.items()
                if s.active and (k.tenant_id, k.workflow_run_id) == (tenant, run)]

    def finish_run(self, tenant: Any, run: Any, status: Any) -> list[SessionKey]:
        self.check_run(tenant, run)
        if not isinstance(status, str) or not status or "\x00" in status:
            raise Refused(InvalidArgument)
        return [k for k in self.active_in_run(tenant, run)
                if self._retire(self.sessions[k], f"run {status}")]


# -- operations --

# A session: one of the slots, the one saved last, or the oldest active one (else few retires
# and run finishes would find a session to end).
SLOT = st.sampled_from(["last", "last", "active", *range(len(SLOTS))])
JSON_LEAF = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4)
             | st.binary(max_size=3))
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: (st.lists(inner, max_size=3) | st.tuples(inner, inner)
                   | st.dictionaries(st.text(max_size=3) | st.integers(0, 3), inner,
                                     max_size=3)),
    max_leaves=8)
PENDING = st.sampled_from([None, None, "form-1", "call-1", "ü-2"])
SAVE = st.tuples(st.just("save"), SLOT, JSON, JSON, PENDING, PENDING)
RETIRE = st.tuples(st.just("retire"), SLOT, st.sampled_from(["cancelled", "run failed", "x"]))
# A run: the last saved session's, one of the runs of a tenant, or one no session is in.
RUN_OF = st.sampled_from(["last", "last", (0, 0), (0, 1), (1, 0), (1, 1), (0, "run-3"),
                          ("other", 0)])
FINISH = st.tuples(st.just("finish"), RUN_OF, st.sampled_from(["succeeded", "failed"]))
IN_RUN = st.tuples(st.just("in_run"), RUN_OF)
ADVANCE = st.tuples(st.just("advance"), st.sampled_from([0.5, 1, 60]))
READ = st.tuples(st.sampled_from(["state", "active", "history"]), SLOT)
# Bad input of each kind; the model says which ones are refused.
BAD_PART = st.sampled_from(["", NUL, SURROGATE, "long201", "x" * 256, 5, None])
BAD_KEY = (st.tuples(st.integers(0, 4), BAD_PART).map(lambda t: ("part", *t))
           | st.tuples(st.just("run201"))
           | st.sampled_from([("tuple",), ("str",)]))
BAD_SNAPSHOT = st.sampled_from([float("nan"), float("inf"), object(), {1: "a", "1": "b"},
                                {(1, 2): "x"}, {"k": SURROGATE}, {SURROGATE: 1}])
BAD_TEXT = st.sampled_from(["", None, NUL, 5, ["x"]])
BAD = st.one_of(
    st.tuples(st.just("bad_key"), st.sampled_from(["save", "retire", "state", "active",
                                                   "history"]), BAD_KEY),
    st.tuples(st.just("bad_save"), SLOT, st.sampled_from(["snapshot", "layer_specs"]),
              BAD_SNAPSHOT),
    st.tuples(st.just("bad_pending"), SLOT, st.booleans(),
              st.sampled_from([SURROGATE, 5, "", "form\x001", "f" * 201])),
    st.tuples(st.just("bad_reason"), SLOT, BAD_TEXT),
    st.tuples(st.just("bad_run"), st.sampled_from(["in_run", "finish"]),
              st.sampled_from(["tenant", "run"]),
              st.sampled_from(["", None, NUL, "r" * 256, "run201"])),
    st.tuples(st.just("bad_status"), RUN_OF, BAD_TEXT),
)
# Weighted by repetition: saves most, bad input of any kind as often as a retire (one_of would
# flatten BAD into its branches, each as likely as a save).
OPERATIONS = st.sampled_from([SAVE, SAVE, SAVE, SAVE, RETIRE, RETIRE, FINISH, FINISH, IN_RUN,
                              ADVANCE, ADVANCE, READ, BAD, BAD]).flatmap(lambda op: op)


def bad_key(key: SessionKey, spec: tuple[Any, ...]) -> Any:
    if spec[0] == "tuple":
        return (key.tenant_id, key.workflow_run_id, key.node_id, key.binding_id, key.agent_id)
    if spec[0] == "str":
        return key.stream_id()
    parts: list[Any] = [key.tenant_id, key.workflow_run_id, key.node_id, key.binding_id,
                        key.agent_id]
    if spec[0] == "run201":
        parts[1] = "r" * 201
    elif spec[2] == "long201":  # too long but for the tenant, whose limit is 255
        parts[spec[1]] = parts[spec[1]].ljust(201, "x")
    else:
        parts[spec[1]] = spec[2]
    return SessionKey(*parts)


def outcome(call: Any, *args: Any, view: Any = None, **kwargs: Any) -> Any:
    """``call``'s result as comparable data (through ``view``), or its refusal's error type."""
    try:
        got = call(*args, **kwargs)
    except Refused as e:
        return ("refused", e.kind)
    except InvalidArgument:
        return ("refused", InvalidArgument)
    except Conflict as e:  # no call here is documented to raise one
        return ("conflict", type(e), e.reason)
    return got if view is None else view(got)


def real_snap(got: SessionSnapshot | None) -> Any:
    return snap_view(got)


def model_snap(got: MSnap | None) -> Any:
    return None if got is None else got.view()


def keys_view(got: list[SessionKey]) -> frozenset[SessionKey]:
    assert all(isinstance(k, SessionKey) for k in got), got
    assert len(set(got)) == len(got), got
    return frozenset(got)


class Run:
    """One example: the facade, the model, and the example's own tenants."""

    def __init__(self, sessions: AgentSessions, model: Model, store: EventStore) -> None:
        self.sessions, self.model, self.store = sessions, model, store
        prefix = uuid.uuid4().hex[:12]
        self.tenants = [f"a-{prefix}", f"b-{prefix}"]
        self.keys = [SessionKey(self.tenants[t], RUNS[r], *PARTS[p]) for t, r, p in SLOTS]
        self.last = 0  # the slot saved last

    def key(self, slot: int | str) -> SessionKey:
        if slot == "last":
            return self.keys[self.last]
        if slot == "active":
            active = [k for k in self.keys if self.model.of(k).active]
            return (active or self.keys)[0]
        assert isinstance(slot, int)
        return self.keys[slot]

    def run_of(self, which: str | tuple[int | str, int | str]) -> tuple[str, str]:
        if isinstance(which, str):  # "last"
            key = self.keys[self.last]
            return key.tenant_id, key.workflow_run_id
        tenant, run = which
        return (self.tenants[tenant] if isinstance(tenant, int) else f"{tenant}-{self.tenants[0]}",
                RUNS[run] if isinstance(run, int) else run)

    def step(self, op: tuple[Any, ...]) -> tuple[Any, Any]:
        s, m = self.sessions, self.model
        name = op[0]
        if name == "advance":
            m.clock.advance(seconds=op[1])
            return None, None
        if name == "save":
            _, slot, snap, specs, form, call = op
            key = self.key(slot)
            self.last = self.keys.index(key)
            return (outcome(s.save, key, snapshot=snap, layer_specs=specs, pending_form_id=form,
                            pending_tool_call_id=call, view=real_snap),
                    outcome(m.save, key, snap, specs, form, call, view=model_snap))
        if name == "retire":
            key = self.key(op[1])
            return outcome(s.retire, key, reason=op[2]), outcome(m.retire, key, op[2])
        if name in ("finish", "in_run"):
            tenant, run = self.run_of(op[1])
            if name == "in_run":
                return (outcome(s.active_in_run, tenant, run, view=keys_view),
                        outcome(m.active_in_run, tenant, run, view=keys_view))
            return (outcome(s.finish_run, tenant, run, op[2], view=keys_view),
                    outcome(m.finish_run, tenant, run, op[2], view=keys_view))
        if name in ("state", "active", "history"):
            return self.read(name, self.key(op[1]))
        if name == "bad_key":
            call, key = op[1], bad_key(self.keys[0], op[2])
            if call == "save":
                return (outcome(s.save, key, snapshot={}, layer_specs=[], view=real_snap),
                        outcome(m.save, key, {}, [], None, None, view=model_snap))
            if call == "retire":
                return outcome(s.retire, key, reason="x"), outcome(m.retire, key, "x")
            return self.read(call, key)
        if name == "bad_save":
            _, slot, where, bad = op
            key = self.key(slot)
            args = {"snapshot": {"ok": 1}, "layer_specs": [], where: bad}
            return (outcome(s.save, key, **args, view=real_snap),
                    outcome(m.save, key, args["snapshot"], args["layer_specs"], None, None,
                            view=model_snap))
        if name == "bad_pending":
            _, slot, is_form, bad = op
            key = self.key(slot)
            form, call = (bad, None) if is_form else (None, bad)
            return (outcome(s.save, key, snapshot={}, layer_specs=[], pending_form_id=form,
                            pending_tool_call_id=call, view=real_snap),
                    outcome(m.save, key, {}, [], form, call, view=model_snap))
        if name == "bad_reason":
            key = self.key(op[1])
            return outcome(s.retire, key, reason=op[2]), outcome(m.retire, key, op[2])
        if name == "bad_run":
            _, call, where, bad = op
            tenant, run = self.tenants[0], RUNS[0]
            bad = "r" * 201 if bad == "run201" else bad
            tenant, run = (bad, run) if where == "tenant" else (tenant, bad)
            if call == "in_run":
                return (outcome(s.active_in_run, tenant, run, view=keys_view),
                        outcome(m.active_in_run, tenant, run, view=keys_view))
            return (outcome(s.finish_run, tenant, run, "done", view=keys_view),
                    outcome(m.finish_run, tenant, run, "done", view=keys_view))
        assert name == "bad_status"
        tenant, run = self.run_of(op[1])
        return (outcome(s.finish_run, tenant, run, op[2], view=keys_view),
                outcome(m.finish_run, tenant, run, op[2], view=keys_view))

    def read(self, name: str, key: Any) -> tuple[Any, Any]:
        s, m = self.sessions, self.model
        if name == "state":
            return (outcome(s.state, key, view=state_view),
                    outcome(m.of, key, view=MSession.state_view))

        def modelled() -> MSnap | None:
            session = m.of(key)
            return session.latest if session.active else None

        if name == "active":
            return outcome(s.active, key, view=real_snap), outcome(modelled, view=model_snap)
        return (outcome(s.history, key, view=lambda got: [entry_view(e) for e in got]),
                outcome(m.of, key, view=MSession.history_view))

    def check(self) -> None:
        """Every key, and every run query, agree with the model and with the store."""
        for key in self.keys:
            want = self.model.of(key)
            state = self.sessions.state(key)
            assert state_view(state) == want.state_view(), key
            assert state.key in ((key, None) if want.saves == 0 else (key,)), state.key
            active = self.sessions.active(key)
            assert snap_view(active) == (want.latest.view() if want.active and want.latest
                                         else None), key
            assert [entry_view(e) for e in self.sessions.history(key)] == want.history_view()
            assert self.store.stream_version(key.stream_id(),
                                             tenant_id=key.tenant_id) == len(want.history)
        for tenant in self.tenants:
            for run in RUNS:
                got = self.sessions.active_in_run(tenant, run)
                assert len(set(got)) == len(got)
                assert set(got) == set(self.model.active_in_run(tenant, run)), (tenant, run)


def label(want: Any) -> str:
    if isinstance(want, tuple) and want and want[0] == "refused":
        return f"refused {want[1].__name__}"
    if isinstance(want, frozenset):
        return f"{len(want)} keys"
    if isinstance(want, bool):
        return str(want)
    return type(want).__name__


@settings(max_examples=examples(25), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(OPERATIONS, min_size=10, max_size=35))
def test_sessions_behave_as_documented(store: EventStore, ops: list[tuple[Any, ...]]) -> None:
    """Random calls on the facade and on the model have the same outcomes and states."""
    clock = Clock(T0)
    run = Run(AgentSessions(store, clock=clock), Model(clock), store)
    for step, op in enumerate(ops):
        got, want = run.step(op)
        assert got == want, (step, op, got, want)
        event(f"{op[0]}: {label(want)}")
        run.check()


def test_stream_ids_are_per_key() -> None:
    """``session-<sha256 of the key>``: one stream per key, whichever part differs."""
    keys = [SessionKey(t, r, *p) for t in ("a", "b") for r in RUNS for p in PARTS]
    ids = [k.stream_id() for k in keys]
    assert len(set(ids)) == len(keys)
    assert all(i.startswith("session-") and len(i) == len("session-") + 64 for i in ids)
    assert all(int(i.removeprefix("session-"), 16) >= 0 for i in ids)
    assert [SessionKey(t, r, *p).stream_id()
            for t in ("a", "b") for r in RUNS for p in PARTS] == ids
