"""The store against a model: random appends and reads through two stores on one database.

Hypothesis runs sequences of appends (one to three events, every kind of expected version,
idempotency keys reused for the same or other events and streams, metadata) and reads
(``read_stream`` forwards and backwards with bounds and limits, ``read_all`` by position,
category, type and tenant, ``stream_version``, ``last_position``, ``stats``) over a few streams
of two tenants.  Each call goes to one of two stores opened on the same database (two
EventStores, or an EventStore and an AsyncEventStore), so each store keeps meeting appends it
did not make (its guesses of a stream's version and of the log's end go stale).  A plain model
predicts every answer: versions, global positions (gap-free, in commit order), the typed errors
of refused appends (which write nothing), and the first answer given back for a repeated
idempotency key.  Subscriptions opened on both stores when the example starts (each with its
own start, tenant, category and type filters) are read a few events at a time between the
calls: each yields exactly the model's matching events, once, in position order, whether it
learns of them from its own store's appends or by polling for the other's, and nothing more
once stopped.
"""

from __future__ import annotations

import concurrent.futures
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstore import (
    ANY,
    STREAM_EXISTS,
    AppendResult,
    EventStore,
    IdempotencyKeyReused,
    WrongExpectedVersion,
)
from tests._async_shim import BlockingAsyncStore
from tests._events import CounterIncremented, NoteAdded
from tests._examples import examples

STREAMS = ["order-1", "order-2", "chat-1"]
KEYS = ["k-1", "k-2"]

EVENT = st.one_of(st.builds(NoteAdded, text=st.sampled_from(["a", "b", "ü"])),
                  st.builds(CounterIncremented, by=st.integers(1, 3)))
# Which store: mostly the first, so that it often appends again to a stream it knows (its
# one-round-trip path on PostgreSQL), and now and then the other.
WHICH = st.sampled_from([0, 0, 0, 1])
APPEND = st.tuples(
    st.just("append"), WHICH, st.integers(0, 1), st.sampled_from(STREAMS),
    st.lists(EVENT, min_size=1, max_size=3),
    # expected version: none, ANY, STREAM_EXISTS, the right number, a wrong one, 0
    st.sampled_from(["none", "any", "exists", "right", "right", "wrong", "zero"]),
    st.sampled_from([None, None, *KEYS]),
    st.one_of(st.none(), st.fixed_dictionaries({"by": st.sampled_from(["x", "y"])})))
READ_STREAM = st.tuples(
    st.just("read_stream"), st.integers(0, 1), st.integers(0, 1), st.sampled_from(STREAMS),
    st.integers(1, 6), st.one_of(st.none(), st.integers(0, 8)), st.booleans(),
    st.one_of(st.none(), st.integers(1, 4)))
READ_ALL = st.tuples(
    st.just("read_all"), st.integers(0, 1), st.one_of(st.none(), st.integers(0, 1)),
    st.integers(0, 20), st.one_of(st.none(), st.integers(1, 5)),
    st.one_of(st.none(), st.sampled_from([["order"], ["chat"], ["order", "chat"]])),
    st.one_of(st.none(), st.sampled_from([["test.NoteAdded"], ["test.CounterIncremented"]])))
SMALL_READ = st.tuples(st.sampled_from(["stream_version", "stats"]), st.integers(0, 1),
                       st.integers(0, 1), st.sampled_from(STREAMS))
# A subscription: on which store, from which position after the example's start, and filters.
SUBSCRIPTION = st.tuples(
    st.integers(0, 1), st.integers(0, 3), st.one_of(st.none(), st.integers(0, 1)),
    st.one_of(st.none(), st.sampled_from([["order"], ["chat"]])),
    st.one_of(st.none(), st.sampled_from([["test.NoteAdded"], ["test.CounterIncremented"]])))
PULL = st.tuples(st.just("pull"), st.integers(0, 1), st.integers(1, 4))  # subscription, count
OPERATIONS = st.lists(st.one_of(APPEND, APPEND, APPEND, READ_STREAM, READ_ALL, SMALL_READ, PULL),
                      min_size=8, max_size=40)


class Model:
    """What the store promises, as plain data."""

    def __init__(self, base: int, tenants: list[str]) -> None:
        self.base = base  # the log's end when the example started
        self.tenants = tenants
        self.log: list[dict[str, Any]] = []
        self.keys: dict[tuple[str, str], tuple[str, list[Any], AppendResult]] = {}

    def version(self, tenant: str, stream: str) -> int:
        return sum(1 for r in self.log if (r["tenant"], r["stream"]) == (tenant, stream))

    def matching(self, after: int, tenant: str | None, categories: list[str] | None,
                 types: list[str] | None) -> list[dict[str, Any]]:
        """The example's events past position ``after`` that pass the filters, in order."""
        return [r for r in self.log
                if r["position"] > after and (tenant is None or r["tenant"] == tenant)
                and (categories is None or r["stream"].split("-", 1)[0] in categories)
                and (types is None or r["data"].__struct_config__.tag in types)]

    def append(self, tenant: str, stream: str, events: list[Any], expected: Any,
               key: str | None, metadata: dict[str, Any] | None) -> AppendResult | type:
        if key is not None and (tenant, key) in self.keys:
            first_stream, first_events, first = self.keys[(tenant, key)]
            if first_stream != stream or first_events != events:
                return IdempotencyKeyReused
            return AppendResult(first.first_position, first.last_position,
                                first.stream_version, True)
        current = self.version(tenant, stream)
        if (expected is STREAM_EXISTS and current == 0) or (
                isinstance(expected, int) and expected != current):
            return WrongExpectedVersion
        first_position = self.base + len(self.log) + 1
        for i, ev in enumerate(events):
            self.log.append({"position": first_position + i, "tenant": tenant, "stream": stream,
                             "version": current + i + 1, "data": ev,
                             "metadata": metadata or {}})
        result = AppendResult(first_position, first_position + len(events) - 1,
                              current + len(events), False)
        if key is not None:
            self.keys[(tenant, key)] = (stream, events, result)
        return result


def seen(records: Any) -> list[tuple[Any, ...]]:
    return [(r["position"], r["tenant"], r["stream"], r["version"], r["data"], r["metadata"])
            for r in records]


def recorded(events: Iterator[Any]) -> list[tuple[Any, ...]]:
    return [(e.position, e.tenant_id, e.stream_id, e.version, e.data, e.metadata)
            for e in events]


class Subscription:
    """A store's subscription, read from a thread of its own so that a read waiting for an
    event that never comes fails the test (after 10 s) instead of hanging it."""

    def __init__(self, store: Any, model: Model, spec: tuple[Any, ...]) -> None:
        _which, offset, t, self.categories, self.types = spec
        self.tenant = model.tenants[t] if t is not None else None
        self.model = model
        self.delivered = model.base + offset  # the last position it yielded or skips
        self.stop = threading.Event()
        self.events = iter(store.subscribe(
            from_position=self.delivered + 1, categories=self.categories, types=self.types,
            tenant_id=self.tenant, stop=self.stop))
        self.reader = concurrent.futures.ThreadPoolExecutor(1)

    def due(self) -> list[dict[str, Any]]:
        return self.model.matching(self.delivered, self.tenant, self.categories, self.types)

    def pull(self, n: int) -> None:
        """The next ``n`` events it yields (no more than the model has for it) are the model's."""
        want = self.due()[:n]
        got = [self.reader.submit(next, self.events).result(timeout=10) for _ in want]
        assert recorded(iter(got)) == seen(want)
        if want:
            self.delivered = want[-1]["position"]

    def finish(self) -> None:
        """Everything still due comes, then, once stopped, nothing more."""
        self.pull(len(self.due()))
        self.stop.set()
        rest = self.reader.submit(list, self.events).result(timeout=10)
        assert recorded(iter(rest)) == []

    def close(self) -> None:
        self.stop.set()
        self.reader.shutdown(wait=True)


def run_operation(stores: list[Any], model: Model, op: tuple[Any, ...],
                  subscriptions: list[Subscription] | None = None) -> None:
    name, which, *args = op
    if name == "pull":
        if subscriptions:
            subscriptions[which].pull(args[0])
        return
    store = stores[which]
    tenants = model.tenants
    if name == "append":
        t, stream, events, expected_kind, key, metadata = args
        tenant = tenants[t]
        current = model.version(tenant, stream)
        expected = {"none": None, "any": ANY, "exists": STREAM_EXISTS, "right": current,
                    "wrong": current + 1, "zero": 0}[expected_kind]
        want = model.append(tenant, stream, events, expected if expected is not None else ANY,
                            key, metadata)
        if isinstance(want, type):
            with pytest.raises(want):
                store.append(stream, events, expected_version=expected, idempotency_key=key,
                             tenant_id=tenant, metadata=metadata)
        else:
            got = store.append(stream, events, expected_version=expected, idempotency_key=key,
                               tenant_id=tenant, metadata=metadata)
            assert got == want
    elif name == "read_stream":
        t, stream, lo, hi, backwards, limit = args
        tenant = tenants[t]
        want = [r for r in model.log if (r["tenant"], r["stream"]) == (tenant, stream)
                and r["version"] >= lo and (hi is None or r["version"] <= hi)]
        if backwards:
            want.reverse()
        got = recorded(store.read_stream(stream, tenant_id=tenant, from_version=lo,
                                         to_version=hi, backwards=backwards, limit=limit))
        assert got == seen(want[:limit] if limit is not None else want)
    elif name == "read_all":
        t, offset, limit, categories, types = args
        tenant = tenants[t] if t is not None else None
        want = model.matching(model.base + offset, tenant, categories, types)
        got = recorded(store.read_all(from_position=model.base + 1 + offset, limit=limit,
                                      categories=categories, types=types, tenant_id=tenant))
        if tenant is None:  # other tests' events are older than the example's (base)
            assert all(g[1] in tenants for g in got)
        assert got == seen(want[:limit] if limit is not None else want)
    elif name == "stream_version":
        t, stream = args
        assert store.stream_version(stream, tenant_id=tenants[t]) == \
            model.version(tenants[t], stream)
    else:  # stats, and the log's end
        t, _stream = args
        mine = [r for r in model.log if r["tenant"] == tenants[t]]
        assert store.stats(tenant_id=tenants[t]) == {
            "events": len(mine), "streams": len({r["stream"] for r in mine}),
            "tenants": 1 if mine else 0,
            "last_position": max((r["position"] for r in mine), default=0)}
        assert store.last_position() == model.base + len(model.log)


@pytest.fixture(params=["sync", "async"])
def two_stores(request: pytest.FixtureRequest, store: EventStore, url: str
               ) -> Iterator[list[Any]]:
    """The ``store`` fixture and a second store on its database: an EventStore, or an
    AsyncEventStore (driven from this thread on a loop of its own).  The second polls every
    20 ms, so that its subscriptions meet the first store's appends quickly."""
    other = (EventStore.open(url, poll_interval=0.02) if request.param == "sync"
             else BlockingAsyncStore(url, poll_interval=0.02))
    try:
        yield [store, other]
    finally:
        other.close()


@settings(max_examples=examples(50), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(operations=OPERATIONS, specs=st.lists(SUBSCRIPTION, min_size=2, max_size=2))
def test_two_stores_on_one_database_answer_as_the_model(
        two_stores: list[Any], operations: list[tuple[Any, ...]],
        specs: list[tuple[Any, ...]]) -> None:
    """Every append's result or error, every read and every subscription of either store
    equal the model's."""
    base = f"t-{uuid.uuid4().hex[:12]}"
    model = Model(two_stores[0].last_position(), [f"{base}-a", f"{base}-b"])
    subscriptions = [Subscription(two_stores[spec[0]], model, spec) for spec in specs]
    try:
        for op in operations:
            run_operation(two_stores, model, op, subscriptions)
        for which in (0, 1):  # the whole of the example's log, from either store
            run_operation(two_stores, model, ("read_all", which, None, 0, None, None, None))
        for subscription in subscriptions:
            subscription.finish()
    finally:
        for subscription in subscriptions:
            subscription.close()
