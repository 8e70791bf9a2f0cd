"""Replay is the truth: every way of reading a conversation's state equals the fold of its log.

Hypothesis generates histories of variable operations (assign, reset, delete) over a few
conversations.  After each history, the live fold, the inline rows, the projector's rows, a fold
from a snapshot plus the tail after it, and the rows after a rebuild must all be the same state,
``verify`` must find no difference, and that state must equal a plain dict model of the
operations.  Each example writes under a tenant of its own, so it starts from an empty store
while the database (and its cost) is shared by the examples of one test.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from eventstore import EventStore
from eventstore._schema import snapshots
from projections import (
    ConversationProjection,
    Conversations,
    ConversationState,
    Projection,
    Projector,
    fold_live,
    rebuild,
    verify,
)
from projections._engine import load_row, save_snapshot
from tests._examples import examples

CONVERSATIONS = ["c0", "c-1", "ü-😀", "c3"]

# A few recurring names (so assigns overwrite and deletes hit), plus arbitrary ones.
NAMES = st.sampled_from(["count", "topic", "ключ", "emoji😀", "a b", "x"]) | st.text(
    min_size=1, max_size=6)

LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
RUN_IDS = st.none() | st.sampled_from(["run-1", "run-2", "läuft"])


def operations(n_conversations: int) -> st.SearchStrategy[tuple[Any, ...]]:
    """One operation on one of the first ``n_conversations`` conversations."""
    conv = st.integers(min_value=0, max_value=n_conversations - 1)
    values = st.dictionaries(NAMES, JSON_VALUES, min_size=1, max_size=4)
    return st.one_of(
        st.tuples(st.just("assign"), conv, values, RUN_IDS),
        st.tuples(st.just("reset"), conv, values, RUN_IDS),
        st.tuples(st.just("delete"), conv, st.lists(NAMES, min_size=1, max_size=3), RUN_IDS),
    )


@st.composite
def histories(draw: st.DrawFn) -> dict[str, Any]:
    """Conversations, the operations before the snapshots, the tail after them, snapshot picks."""
    n = draw(st.integers(min_value=1, max_value=4))
    ops = operations(n)
    return {
        "n": n,
        "before": draw(st.lists(ops, min_size=1, max_size=14)),
        "tail": draw(st.lists(ops, min_size=1, max_size=4)),
        "picks": draw(st.lists(st.integers(min_value=0, max_value=10**6), min_size=n,
                               max_size=n)),
    }


def json_type(value: Any) -> str:
    """The value type a variable of this value must be recorded with (written independently)."""
    for kind, name in ((type(None), "null"), (bool, "boolean"), (int, "integer"),
                       (float, "number"), (str, "string"), (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    raise AssertionError(f"unexpected value {value!r}")


def same(a: Any, b: Any) -> bool:
    """Deep equality that tells 1 from 1.0 from True, and -0.0 from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


class Model:
    """What a conversation's variables must be: a dict per conversation, and its history."""

    def __init__(self) -> None:
        self.variables: dict[int, dict[str, Any]] = {}
        self.run_ids: dict[int, str | None] = {}
        self.versions: dict[int, list[dict[str, Any]]] = {}  # state after version i+1

    def apply(self, op: tuple[Any, ...]) -> None:
        kind, conv, arg, run_id = op
        current = dict(self.variables.get(conv, {}))
        if kind in ("assign", "reset"):
            current.update(arg)
        else:
            for name in arg:
                current.pop(name, None)
        self.variables[conv] = current
        self.run_ids[conv] = run_id
        self.versions.setdefault(conv, []).append(current)

    def version(self, conv: int) -> int:
        return len(self.versions.get(conv, []))


def perform(conversations: Conversations, tenant: str, op: tuple[Any, ...]) -> int:
    kind, conv, arg, run_id = op
    cid = CONVERSATIONS[conv]
    if kind == "assign":
        return conversations.assign(cid, arg, tenant_id=tenant, workflow_run_id=run_id)
    if kind == "reset":
        return conversations.reset(cid, arg, tenant_id=tenant, workflow_run_id=run_id)
    return conversations.delete(cid, arg, tenant_id=tenant, workflow_run_id=run_id)


def identical(a: Any, b: Any) -> bool:
    """Two states (or (state, version) pairs) are equal, value types included."""
    return same(msgspec.to_builtins(a), msgspec.to_builtins(b))


def assert_matches_model(state: ConversationState, model: Model, conv: int, what: str) -> None:
    expected = model.variables.get(conv, {})
    assert same(state.variables, expected), f"{what}: {state.variables!r} != {expected!r}"
    assert state.value_types == {k: json_type(v) for k, v in expected.items()}, what
    assert state.version == model.version(conv), what
    assert state.workflow_run_id == model.run_ids.get(conv), what
    assert state.conversation_id == CONVERSATIONS[conv], what


class RecordFold(ConversationProjection):
    """The conversation fold without its batch fold: live folds go through ``evolve`` alone."""

    evolve_slice = None  # type: ignore[assignment]


def row_state(store: EventStore, projection: Projection[ConversationState], tenant: str,
              stream: str) -> tuple[ConversationState, int]:
    row = load_row(store, projection, tenant, stream)
    return row if row is not None else (projection.initial(tenant, stream), 0)


@settings(max_examples=examples(25), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(history=histories())
def test_every_reading_of_a_conversation_equals_its_replay(
        store: EventStore, history: dict[str, Any]) -> None:
    """Live fold, inline rows, projector rows, snapshot+tail and rebuilt rows equal the model."""
    tenant = f"t-{uuid.uuid4().hex}"
    conversations = Conversations(store)
    inline_p = conversations.projection
    async_p = ConversationProjection(snapshot_every=None).renamed("conversations_async")
    snap_p = ConversationProjection(snapshot_every=100)
    record_p = RecordFold(snapshot_every=None)
    model = Model()
    n = history["n"]

    for op in history["before"]:
        model.apply(op)
        assert perform(conversations, tenant, op) == model.version(op[1])

    # A snapshot at a random version of each conversation that has events, then a tail after it.
    snapped: dict[int, int] = {}
    for conv in range(n):
        total = model.version(conv)
        if total == 0:
            continue
        k = 1 + history["picks"][conv] % total
        stream = Conversations.stream_id(CONVERSATIONS[conv])
        state, version = fold_live(store, snap_p, stream, tenant_id=tenant, at_version=k,
                                   use_snapshots=False)
        assert version == k
        assert same(state.variables, model.versions[conv][k - 1]), "time travel"
        (last,) = store.read_stream(stream, tenant_id=tenant, from_version=k, to_version=k)
        save_snapshot(store, snap_p, tenant, stream, state, last)
        snapped[conv] = k
    for op in history["tail"]:
        model.apply(op)
        assert perform(conversations, tenant, op) == model.version(op[1])

    # One worker id for every example: a projector of an earlier example still holds the lease.
    Projector(store, [async_p], worker_id="replay-truth").catch_up()

    for conv in range(n):
        cid = CONVERSATIONS[conv]
        stream = Conversations.stream_id(cid)
        expected_version = model.version(conv)

        live, live_version = fold_live(store, inline_p, stream, tenant_id=tenant,
                                       use_snapshots=False)
        assert live_version == expected_version
        assert_matches_model(live, model, conv, "live fold")
        assert identical(fold_live(store, record_p, stream, tenant_id=tenant),
                         (live, live_version)), "record-by-record fold"
        k = 1 + history["picks"][conv] % expected_version if expected_version else 0
        assert identical(fold_live(store, record_p, stream, tenant_id=tenant, at_version=k),
                         fold_live(store, inline_p, stream, tenant_id=tenant, at_version=k,
                                   use_snapshots=False)), "time travel, both folds"

        assert identical(conversations.get(cid, tenant_id=tenant), live), "Conversations.get"
        assert identical(row_state(store, inline_p, tenant, stream), (live, expected_version)), \
            "inline row"
        assert identical(row_state(store, async_p, tenant, stream), (live, expected_version)), \
            "projector row"

        if conv in snapped:
            with store.engine.connect() as c:
                snap_versions = c.execute(select(snapshots.c.version).where(
                    snapshots.c.tenant_id == tenant, snapshots.c.stream_id == stream,
                    snapshots.c.projection == snap_p.name)).scalars().all()
            assert snap_versions == [snapped[conv]]
        from_snapshot = fold_live(store, snap_p, stream, tenant_id=tenant, use_snapshots=True)
        assert identical(from_snapshot, (live, expected_version)), "snapshot + tail"

    assert verify(store, inline_p) == []
    assert verify(store, async_p) == []
    rebuild(store, inline_p)
    rebuild(store, async_p)
    for conv in range(n):
        stream = Conversations.stream_id(CONVERSATIONS[conv])
        live, version = fold_live(store, inline_p, stream, tenant_id=tenant,
                                  use_snapshots=False)
        assert identical(row_state(store, inline_p, tenant, stream), (live, version)), \
            "rebuilt inline"
        assert identical(row_state(store, async_p, tenant, stream), (live, version)), \
            "rebuilt async"
    assert verify(store, inline_p) == []
