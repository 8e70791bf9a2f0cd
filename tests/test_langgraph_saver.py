"""LangGraph savers: conformance (all capabilities), events as the record, index as projection."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import Checkpoint, CheckpointMetadata, empty_checkpoint
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import Capability
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.types import INTERRUPT, RESUME
from langgraph.constants import TASKS
from langgraph.types import Send
from sqlalchemy import select

from eventstore import EventStore, InvalidArgument
from eventstore.aio import AsyncEventStore
from projections.langgraph_saver import (
    AsyncEventStoreSaver,
    ChannelValuesSaved,
    CheckpointSaved,
    CheckpointsPruned,
    EventStoreSaver,
    RunsDeleted,
    ThreadCopied,
    ThreadDeleted,
    WritesSaved,
    blobs,
    checkpoints,
    import_checkpoints,
    rebuild_index,
    stream_id_of,
    writes,
)

ALL_CAPABILITIES = {c.value for c in Capability}


@pytest.fixture
def saver(store: EventStore) -> EventStoreSaver:
    return EventStoreSaver(store)


def config(thread_id: str, checkpoint_id: str | None = None, ns: str = "") -> RunnableConfig:
    conf: dict[str, Any] = {"thread_id": thread_id, "checkpoint_ns": ns}
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def put(saver: EventStoreSaver, thread_id: str, parent: RunnableConfig | None,
        values: dict[str, Any], versions: dict[str, int], new: dict[str, int],
        metadata: dict[str, Any] | None = None, ns: str = "") -> RunnableConfig:
    """Store one checkpoint whose channels ``new`` changed (LangGraph's put contract)."""
    cp: Checkpoint = empty_checkpoint()
    cp["channel_values"] = values
    cp["channel_versions"] = dict(versions)
    parent_id = parent["configurable"]["checkpoint_id"] if parent else None
    md: CheckpointMetadata = {"source": "loop", "step": 0, "parents": {}}
    md.update(metadata or {})  # type: ignore[typeddict-item]
    return saver.put(config(thread_id, parent_id, ns), cp, md, new)


def stream_types(store: EventStore, thread_id: str) -> list[type[Any]]:
    return [type(e.data) for e in store.read_stream(stream_id_of(thread_id))]


def index_rows(store: EventStore) -> dict[str, list[tuple[Any, ...]]]:
    with store.engine.connect() as conn:
        return {t.name: sorted(tuple(r) for r in conn.execute(select(t)))
                for t in (checkpoints, blobs, writes)}


def assert_conformant(report: Any) -> None:
    report.print_report()
    assert {name for name, r in report.results.items() if r.detected} == ALL_CAPABILITIES
    failures = {n: r.failures for n, r in report.results.items() if r.passed is not True}
    assert failures == {}


# -- conformance -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sync_saver_passes_conformance_with_every_capability(store: EventStore) -> None:
    """EventStoreSaver passes langgraph-checkpoint-conformance: base and extended capabilities."""

    @checkpointer_test(name="EventStoreSaver")
    async def factory() -> Any:
        yield EventStoreSaver(store)

    assert_conformant(await validate(factory))


@pytest.mark.asyncio
async def test_async_saver_passes_conformance_with_every_capability(url: str) -> None:
    """AsyncEventStoreSaver passes langgraph-checkpoint-conformance: every capability."""
    store = await AsyncEventStore.open(url, migrate=True)

    @checkpointer_test(name="AsyncEventStoreSaver")
    async def factory() -> Any:
        yield AsyncEventStoreSaver(store)

    try:
        assert_conformant(await validate(factory))
    finally:
        await store.close()


# -- events are the record ------------------------------------------------------------------------


def test_checkpoint_event_carries_only_changed_channels(saver: EventStoreSaver,
                                                        store: EventStore) -> None:
    """A CheckpointSaved event holds only new_versions' values; the unchanged ones still load."""
    c1 = put(saver, "t", None, {"doc": "x" * 1000, "n": 1}, {"doc": 1, "n": 1},
             {"doc": 1, "n": 1})
    c2 = put(saver, "t", c1, {"doc": "x" * 1000, "n": 2}, {"doc": 1, "n": 2}, {"n": 2})
    events = [e.data for e in store.read_stream(stream_id_of("t"))]
    assert [type(e) for e in events] == [CheckpointSaved, CheckpointSaved]
    assert isinstance(events[1], CheckpointSaved)
    assert [b.channel for b in events[1].blobs] == ["n"]
    loaded = saver.get_tuple(c2)
    assert loaded is not None
    assert loaded.checkpoint["channel_values"] == {"doc": "x" * 1000, "n": 2}
    assert loaded.parent_config == c1


def test_storage_grows_linearly_with_thread_length(saver: EventStoreSaver,
                                                   store: EventStore) -> None:
    """200 steps with a 20 kB channel that never changes store that channel's bytes once."""
    big = "y" * 20_000
    parent = put(saver, "long", None, {"big": big, "n": 0}, {"big": 1, "n": 1},
                 {"big": 1, "n": 1})
    for i in range(1, 200):
        parent = put(saver, "long", parent, {"big": big, "n": i}, {"big": 1, "n": i + 1},
                     {"n": i + 1})
    with store.engine.connect() as conn:
        from eventstore._schema import events
        total = sum(len(d) for (d,) in conn.execute(select(events.c.data)))
        blob_rows = conn.execute(select(blobs.c.version, blobs.c.channel)).all()
    assert total < 20_000 * 4 // 3 + 200 * 600
    assert sorted(blob_rows) == sorted((f"i:{v}", "") for v in range(1, 201))
    latest = saver.get_tuple(config("long"))
    assert latest is not None and latest.checkpoint["channel_values"]["big"] == big


def test_pending_writes_interrupts_and_resumes_are_events(saver: EventStoreSaver,
                                                          store: EventStore) -> None:
    """put_writes appends WritesSaved; special channels replace, regular writes never do."""
    c1 = put(saver, "w", None, {}, {}, {})
    saver.put_writes(c1, [("out", 1), (INTERRUPT, {"q": "ok?"})], "task-1", "path-1")
    saver.put_writes(c1, [("out", 2)], "task-1", "path-1")      # same (task, idx): ignored
    saver.put_writes(c1, [(RESUME, "first")], "task-1")
    saver.put_writes(c1, [(RESUME, "second")], "task-1")        # special: replaces
    assert stream_types(store, "w") == [CheckpointSaved] + [WritesSaved] * 4
    loaded = saver.get_tuple(c1)
    assert loaded is not None
    assert sorted(loaded.pending_writes or [], key=repr) == sorted(
        [("task-1", "out", 1), ("task-1", INTERRUPT, {"q": "ok?"}),
         ("task-1", RESUME, "second")], key=repr)


def test_delete_thread_is_a_recorded_event(saver: EventStoreSaver, store: EventStore) -> None:
    """delete_thread appends ThreadDeleted and empties the index; the events stay in the log."""
    c1 = put(saver, "d", None, {"a": 1}, {"a": 1}, {"a": 1})
    saver.put_writes(c1, [("a", 2)], "task")
    put(saver, "keep", None, {"a": 1}, {"a": 1}, {"a": 1})
    saver.delete_thread("d")
    assert stream_types(store, "d") == [CheckpointSaved, WritesSaved, ThreadDeleted]
    assert saver.get_tuple(config("d")) is None
    assert _rows_of_thread(store, "d") == {"checkpoints": 0, "blobs": 0, "writes": 0}
    assert list(saver.list(config("d"))) == []
    assert saver.get_tuple(config("keep")) is not None
    saver.delete_thread("never-existed")
    assert store.stream_version(stream_id_of("never-existed")) == 0


def _rows_of_thread(store: EventStore, thread_id: str) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {name: len(conn.execute(select(t).where(t.c.thread_id == thread_id)).all())
                for name, t in (("checkpoints", checkpoints), ("blobs", blobs),
                                ("writes", writes))}


def test_prune_keep_latest_leaves_the_latest_checkpoint_whole(saver: EventStoreSaver,
                                                              store: EventStore) -> None:
    """keep_latest: one recorded event; the kept checkpoint loads every value, even old ones."""
    c1 = put(saver, "p", None, {"doc": "old", "n": 1}, {"doc": 1, "n": 1}, {"doc": 1, "n": 1})
    c2 = put(saver, "p", c1, {"doc": "old", "n": 2}, {"doc": 1, "n": 2}, {"n": 2})
    c3 = put(saver, "p", c2, {"doc": "old", "n": 3}, {"doc": 1, "n": 3}, {"n": 3})
    saver.put_writes(c3, [("n", 4)], "task")
    saver.put_writes(c2, [("n", 3)], "task")
    saver.prune(["p"])
    assert stream_types(store, "p")[-1] is CheckpointsPruned
    remaining = list(saver.list(config("p")))
    assert [t.config for t in remaining] == [c3]
    latest = remaining[0]
    assert latest.checkpoint["channel_values"] == {"doc": "old", "n": 3}
    assert latest.pending_writes == [("task", "n", 4)]
    assert latest.parent_config is None
    assert saver.get_tuple(c2) is None
    with store.engine.connect() as conn:
        left = sorted((r.version, r.channel) for r in conn.execute(select(blobs)))
    assert left == [("i:1", ""), ("i:3", "")]
    saver.prune(["p"])  # nothing left to prune: nothing recorded
    assert stream_types(store, "p").count(CheckpointsPruned) == 1


def test_prune_keep_latest_drops_a_subgraph_namespace_with_its_root_checkpoint(
        saver: EventStoreSaver) -> None:
    """A subgraph call's namespace goes with the root checkpoint it started from; one started
    from the kept root checkpoint stays."""
    root1 = put(saver, "sub", None, {"n": 1}, {"n": 1}, {"n": 1})
    put(saver, "sub", None, {"m": 1}, {"m": 1}, {"m": 1},
        {"parents": {"": root1["configurable"]["checkpoint_id"]}}, ns="child:task-1")
    root2 = put(saver, "sub", root1, {"n": 2}, {"n": 2}, {"n": 2})
    put(saver, "sub", None, {"m": 2}, {"m": 2}, {"m": 2},
        {"parents": {"": root2["configurable"]["checkpoint_id"]}}, ns="child:task-2")
    saver.prune(["sub"])
    left = {t.config["configurable"]["checkpoint_ns"]: t.config
            for t in saver.list({"configurable": {"thread_id": "sub"}})}
    assert sorted(left) == ["", "child:task-2"] and left[""] == root2


def test_an_imported_thread_stores_only_the_channels_that_changed(saver: EventStoreSaver,
                                                                   store: EventStore) -> None:
    """import_checkpoints writes each checkpoint's changed channels only, as put does."""
    source = InMemorySaver()
    cfg = put(source, "imp", None, {"big": "x" * 1000, "n": 0}, {"big": 1, "n": 1},
              {"big": 1, "n": 1})
    for step in (1, 2, 3):
        cfg = put(source, "imp", cfg, {"big": "x" * 1000, "n": step},
                  {"big": 1, "n": step + 1}, {"n": step + 1})
    assert import_checkpoints(source, saver) == 4  # checkpoints copied
    stored = [sorted(b.channel for b in e.data.blobs) for e in store.read_stream(
        stream_id_of("imp")) if isinstance(e.data, CheckpointSaved)]
    assert stored == [["big", "n"], ["n"], ["n"], ["n"]]
    latest = saver.get_tuple(config("imp"))
    assert latest is not None and latest.checkpoint["channel_values"] == {
        "big": "x" * 1000, "n": 3}


def _busy_thread_planner(monkeypatch: pytest.MonkeyPatch, busy: Callable[[int], None]
                         ) -> list[bool]:
    """Make every keep_latest plan read without the append lock stale: ``busy(n)`` puts a
    checkpoint right after plan ``n`` was read, as a graph running on the thread does.
    Returns the plans, each True when it was read under the lock."""
    import projections.langgraph_saver as lg

    real_plan, real_locked = lg.plan_keep_latest, getattr(lg, "prune_locked", None)
    plans: list[bool] = []
    locked = [False]

    def planning(conn: Any, tenant_id: str, thread_id: str) -> Any:
        plan = real_plan(conn, tenant_id, thread_id)
        plans.append(locked[0])
        if not locked[0] and len(plans) < 50:
            busy(len(plans))
        return plan

    def under_lock(*args: Any) -> Any:
        locked[0] = True
        try:
            return real_locked(*args)  # type: ignore[misc]
        finally:
            locked[0] = False

    monkeypatch.setattr(lg, "plan_keep_latest", planning)
    monkeypatch.setattr(lg, "prune_locked", under_lock, raising=False)
    return plans


def test_prune_succeeds_on_a_thread_that_keeps_moving(saver: EventStoreSaver, store: EventStore,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph putting checkpoints while keep_latest plans (each unlocked plan is stale by its
    append) does not make prune fail: the plan and its event then go into one transaction
    holding the append lock, and keep the checkpoint that is latest by then."""
    other = EventStoreSaver(store)
    last = [put(saver, "busy", None, {"n": -1}, {"n": 0}, {"n": 0})]
    last.append(put(saver, "busy", last[-1], {"n": 0}, {"n": 1}, {"n": 1}))

    def busy(n: int) -> None:
        last.append(put(other, "busy", last[-1], {"n": n}, {"n": n + 1}, {"n": n + 1}))

    plans = _busy_thread_planner(monkeypatch, busy)
    saver.prune(["busy"])
    assert plans == [False, False, False, True]  # three stale plans, then the locked one
    assert [t.config for t in saver.list(config("busy"))] == [last[-1]]
    tup = saver.get_tuple(config("busy"))
    assert tup is not None and tup.checkpoint["channel_values"] == {"n": 3}
    assert stream_types(store, "busy").count(CheckpointsPruned) == 1


@pytest.mark.asyncio
async def test_async_prune_succeeds_on_a_thread_that_keeps_moving(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, for the async saver (the locked plan runs in ``run_sync``)."""
    async with await AsyncEventStore.open(url, migrate=True) as astore:
        asaver = AsyncEventStoreSaver(astore)
        with EventStore.open(url) as sync_store:
            other = EventStoreSaver(sync_store)
            last = [put(other, "abusy", None, {"n": -1}, {"n": 0}, {"n": 0})]
            last.append(put(other, "abusy", last[-1], {"n": 0}, {"n": 1}, {"n": 1}))

            def busy(n: int) -> None:
                last.append(put(other, "abusy", last[-1], {"n": n}, {"n": n + 1},
                                {"n": n + 1}))

            plans = _busy_thread_planner(monkeypatch, busy)
            await asaver.aprune(["abusy"])
        assert plans == [False, False, False, True]
        assert [t.config async for t in asaver.alist(config("abusy"))] == [last[-1]]


def test_prune_keeps_the_ancestors_a_delta_channel_rebuilds_from(saver: EventStoreSaver) -> None:
    """keep_latest keeps a DeltaChannel thread's chain back to the channel's last snapshot."""
    c0 = put(saver, "delta", None, {}, {}, {})
    c1 = put(saver, "delta", c0, {}, {}, {})  # snapshot: no counter for "msgs"
    counters = {"counters_since_delta_snapshot": {"msgs": [1, 1]}}
    c2 = put(saver, "delta", c1, {}, {}, {}, counters)
    c3 = put(saver, "delta", c2, {}, {}, {},
             {"counters_since_delta_snapshot": {"msgs": [2, 2]}})
    saver.prune(["delta"])
    kept = [t.config for t in saver.list(config("delta"))]
    assert kept == [c3, c2, c1]
    tup = saver.get_tuple(c1)
    assert tup is not None and tup.parent_config is None


def test_delete_for_runs_keeps_other_runs_loadable(saver: EventStoreSaver,
                                                   store: EventStore) -> None:
    """delete_for_runs records RunsDeleted; a later run's checkpoint still loads older values."""
    r1 = put(saver, "runs", None, {"doc": "from run 1"}, {"doc": 1}, {"doc": 1},
             {"run_id": "run-1"})
    r2 = put(saver, "runs", r1, {"doc": "from run 1", "n": 1}, {"doc": 1, "n": 1}, {"n": 1},
             {"run_id": "run-2"})
    put(saver, "other", None, {}, {}, {}, {"run_id": "run-1"})
    saver.delete_for_runs(["run-1", "run-unknown"])
    assert stream_types(store, "runs")[-1] is RunsDeleted
    assert stream_types(store, "other")[-1] is RunsDeleted
    assert list(saver.list(config("other"))) == []
    tup = saver.get_tuple(config("runs"))
    assert tup is not None and tup.config == r2
    assert tup.checkpoint["channel_values"] == {"doc": "from run 1", "n": 1}
    assert tup.parent_config is None


def test_copy_thread_copies_as_of_the_copy(saver: EventStoreSaver, store: EventStore) -> None:
    """copy_thread records ThreadCopied; the copy keeps values and writes, the source goes on."""
    c1 = put(saver, "src", None, {"a": "v1"}, {"a": 1}, {"a": 1})
    saver.put_writes(c1, [("a", "w")], "task")
    saver.copy_thread("src", "dst")
    put(saver, "src", c1, {"a": "v2"}, {"a": 2}, {"a": 2})
    assert stream_types(store, "dst") == [ThreadCopied]
    copied = list(saver.list(config("dst")))
    assert len(copied) == 1
    assert copied[0].checkpoint["channel_values"] == {"a": "v1"}
    assert copied[0].pending_writes == [("task", "a", "w")]
    assert len(list(saver.list(config("src")))) == 2
    saver.delete_thread("src")
    dst = saver.get_tuple(config("dst"))
    assert dst is not None and dst.checkpoint["channel_values"] == {"a": "v1"}


def test_index_is_rebuilt_from_the_events_alone(saver: EventStoreSaver, store: EventStore
                                                ) -> None:
    """rebuild_index replays the log into exactly the rows the inline handler wrote."""
    c1 = put(saver, "x", None, {"a": 1, "b": [1]}, {"a": 1, "b": 1}, {"a": 1, "b": 1},
             {"run_id": "r1"})
    c2 = put(saver, "x", c1, {"a": 2, "b": [1]}, {"a": 2, "b": 1}, {"a": 2}, {"run_id": "r2"})
    saver.put_writes(c2, [("a", 3), (INTERRUPT, "why")], "t1")
    put(saver, "x", None, {"s": "sub"}, {"s": 1}, {"s": 1}, ns="child:1")
    saver.copy_thread("x", "y")
    put(saver, "x", c2, {"a": 3, "b": [1]}, {"a": 3, "b": 1}, {"a": 3}, {"run_id": "r3"})
    saver.prune(["x"])
    saver.delete_for_runs(["r1"])
    put(saver, "z", None, {"q": 1}, {"q": 1}, {"q": 1})
    saver.delete_thread("z")
    before = index_rows(store)
    assert before["es_lg_checkpoints"]
    assert rebuild_index(store) == store.stats()["events"]
    assert index_rows(store) == before


def test_tenants_do_not_see_each_other(store: EventStore) -> None:
    """Two savers of different tenants keep the same thread id apart."""
    acme, other = EventStoreSaver(store, tenant_id="acme"), EventStoreSaver(store)
    put(acme, "shared", None, {"who": "acme"}, {"who": 1}, {"who": 1})
    put(other, "shared", None, {"who": "default"}, {"who": 1}, {"who": 1})
    a, b = acme.get_tuple(config("shared")), other.get_tuple(config("shared"))
    assert a is not None and b is not None
    assert a.checkpoint["channel_values"] == {"who": "acme"}
    assert b.checkpoint["channel_values"] == {"who": "default"}
    acme.copy_thread("shared", "copied")  # copies acme's thread only
    assert other.get_tuple(config("copied")) is None
    put(acme, "acme-only", None, {"who": "acme"}, {"who": 1}, {"who": 1}, {"run_id": "run-a"})
    events_of_default = store.stats(tenant_id="default")["events"]
    other.delete_for_runs(["run-a"])  # no run of its tenant: writes nothing, anywhere
    assert store.stats(tenant_id="default")["events"] == events_of_default
    assert acme.get_tuple(config("acme-only")) is not None
    acme.delete_thread("shared")
    assert acme.get_tuple(config("shared")) is None
    assert other.get_tuple(config("shared")) is not None


def test_values_over_the_event_size_limit_travel_in_their_own_events(url: str) -> None:
    """A checkpoint or writes larger than max_event_bytes are split into several events."""
    with EventStore.open(url, migrate=True, max_event_bytes=8192) as small:
        saver = EventStoreSaver(small)
        values = {f"c{i}": str(i) * 3000 for i in range(4)}
        versions = {k: 1 for k in values}
        c1 = put(saver, "big", None, values, versions, versions)
        saver.put_writes(c1, [(k, v) for k, v in values.items()], "task")
        types = stream_types(small, "big")
        assert types.count(ChannelValuesSaved) >= 2 and types.count(WritesSaved) >= 2
        loaded = saver.get_tuple(c1)
        assert loaded is not None
        assert loaded.checkpoint["channel_values"] == values
        assert sorted(w[2] for w in loaded.pending_writes or []) == sorted(values.values())


def test_next_version_is_increasing_and_unique_across_forks(saver: EventStoreSaver) -> None:
    """Versions sort in counter order, and two forks from one version never collide."""
    chain = [saver.get_next_version(None, None)]
    for _ in range(20):
        chain.append(saver.get_next_version(chain[-1], None))
    assert chain == sorted(chain) and len(set(chain)) == len(chain)
    forks = {saver.get_next_version(chain[5], None) for _ in range(1000)}
    assert len(forks) == 1000
    assert all(f > chain[5] and f < chain[7] for f in forks)
    assert saver.get_next_version(61, None).startswith("000010.")  # type: ignore[arg-type]
    assert saver.get_next_version("00000000000000000000000000000041.5", None) > "000000"


def test_list_across_threads_with_filter_and_before(saver: EventStoreSaver) -> None:
    """list(None) spans threads; filter, before and limit combine."""
    first = put(saver, "l1", None, {}, {}, {}, {"run_id": "a", "step": 1})
    put(saver, "l2", None, {}, {}, {}, {"run_id": "b", "step": 1})
    last = put(saver, "l1", first, {}, {}, {}, {"run_id": "a", "step": 2})
    assert len(list(saver.list(None))) == 3
    assert [t.config for t in saver.list(None, filter={"run_id": "a"})] == [last, first]
    assert [t.config for t in saver.list(config("l1"), before=last)] == [first]
    (newest_step_1,) = saver.list(None, filter={"step": 1}, limit=1)
    assert newest_step_1.config["configurable"]["thread_id"] == "l2"
    (newest,) = saver.list({"configurable": {"thread_id": "l1"}}, limit=1)
    assert newest.config == last
    # limit=0 (and below) lists nothing, as InMemorySaver and SqliteSaver do for 0.
    for limit in (0, -1):
        assert list(saver.list(None, limit=limit)) == []
        assert list(saver.list(config("l1"), limit=limit)) == []


@pytest.mark.asyncio
async def test_alist_with_limit_zero_lists_nothing(url: str) -> None:
    """alist(limit=0) gives nothing, also on the async saver."""
    with EventStore.open(url, migrate=True) as store:
        put(EventStoreSaver(store), "l1", None, {}, {}, {})
        assert [t async for t in EventStoreSaver(store).alist(None, limit=0)] == []
    astore = await AsyncEventStore.open(url)
    try:
        asaver = AsyncEventStoreSaver(astore)
        assert len([t async for t in asaver.alist(None)]) == 1
        assert [t async for t in asaver.alist(None, limit=0)] == []
        assert [t async for t in asaver.alist(config("l1"), limit=-3)] == []
    finally:
        await astore.close()


@pytest.mark.asyncio
async def test_list_across_threads_pages_through_every_checkpoint_in_order(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Across threads, pages grow (each picks its rows by a sort): every checkpoint still comes
    once, newest first, values and writes with it, for list and alist, with limit and before."""
    import projections.langgraph_saver as module

    monkeypatch.setattr(module, "_LIST_PAGE", 3)
    monkeypatch.setattr(module, "_LIST_PAGE_MAX", 16)
    with EventStore.open(url, migrate=True) as store:
        saver = EventStoreSaver(store)
        parents: dict[str, RunnableConfig | None] = {"x": None, "y": None, "z": None}
        for i in range(40):
            thread_id = "xyz"[i % 3] if i % 5 else "x"
            parents[thread_id] = put(saver, thread_id, parents[thread_id], {"n": i}, {"n": i + 1},
                                     {"n": i + 1}, {"step": i})
            saver.put_writes(parents[thread_id], [("n", -i)], f"task-{i}")
        listed = list(saver.list(None))
        steps = [t.metadata["step"] for t in listed]
        assert steps == list(range(39, -1, -1))
        assert [t.checkpoint["channel_values"]["n"] for t in listed] == steps
        assert [t.pending_writes for t in listed] == [[(f"task-{i}", "n", -i)] for i in steps]
        assert [t.metadata["step"] for t in saver.list(None, limit=25)] == steps[:25]
        middle = listed[17].config
        assert [t.metadata["step"] for t in saver.list(None, before=middle)] == steps[18:]
    astore = await AsyncEventStore.open(url)
    try:
        asaver = AsyncEventStoreSaver(astore)
        assert [t.metadata["step"] async for t in asaver.alist(None)] == steps
    finally:
        await astore.close()


@pytest.mark.parametrize("page", [1, 2, 128])
@pytest.mark.asyncio
async def test_listing_a_thread_without_namespace_merges_its_namespaces(
        url: str, monkeypatch: pytest.MonkeyPatch, page: int) -> None:
    """list({thread_id}) gives every namespace's checkpoints newest first, as one query would
    order them, across page boundaries, with before, limit and filter; sync and async alike."""
    import projections.langgraph_saver as lg

    monkeypatch.setattr(lg, "_LIST_PAGE", page)
    store = await AsyncEventStore.open(url, migrate=True)
    sync_store = EventStore.open(url)
    try:
        saver = EventStoreSaver(sync_store)
        thread = f"ns-{uuid.uuid4().hex}"
        made: list[tuple[str, str]] = []  # (checkpoint id, ns), in the order they were put
        parents: dict[str, RunnableConfig | None] = {"": None, "child:1": None, "child:2": None}
        for i, ns in enumerate(["", "child:1", "", "", "child:2", "child:1", "", "child:2"]):
            parents[ns] = put(saver, thread, parents[ns], {"i": i}, {"i": i + 1}, {"i": i + 1},
                              {"step": i, "odd": i % 2}, ns=ns)
            made.append((parents[ns]["configurable"]["checkpoint_id"], ns))  # type: ignore
        expected = sorted(made, reverse=True)  # checkpoint ids (uuid6) sort by time
        conf: RunnableConfig = {"configurable": {"thread_id": thread}}

        def ids(tuples: Any) -> list[tuple[str, str]]:
            return [(t.config["configurable"]["checkpoint_id"],
                     t.config["configurable"]["checkpoint_ns"]) for t in tuples]

        assert ids(saver.list(conf)) == expected
        assert [t.checkpoint["channel_values"]["i"] for t in saver.list(conf)] == \
            list(range(7, -1, -1))
        assert ids(saver.list(conf, limit=3)) == expected[:3]
        assert ids(saver.list(conf, filter={"odd": 1})) == expected[0::2]
        middle = {"configurable": {"thread_id": thread, "checkpoint_id": expected[3][0]}}
        assert ids(saver.list(conf, before=middle)) == expected[4:]  # type: ignore[arg-type]
        asaver = AsyncEventStoreSaver(store)
        assert ids([t async for t in asaver.alist(conf)]) == expected
        assert ids([t async for t in asaver.alist(conf, limit=5)]) == expected[:5]
        # Filtered pages come back empty before the match: the listing reads on past them.
        assert ids(saver.list(conf, filter={"step": 0})) == [made[0]]
        assert ids([t async for t in asaver.alist(conf, filter={"step": 1})]) == [made[1]]
        assert ids(saver.list({"configurable": {"thread_id": thread, "checkpoint_ns": ""}},
                              filter={"step": 0})) == [made[0]]
        assert ids(saver.list({"configurable": {"thread_id": "no-such-thread"}})) == []
    finally:
        sync_store.close()
        await store.close()


@pytest.mark.asyncio
async def test_async_saver_sync_methods_work_from_other_threads(url: str) -> None:
    """The async saver's sync methods run on its loop from a worker thread, not on the loop."""
    store = await AsyncEventStore.open(url, migrate=True)
    try:
        saver = AsyncEventStoreSaver(store)
        cp = empty_checkpoint()
        stored = await saver.aput(config("async"), cp, {"source": "input", "step": -1}, {})
        found: list[Any] = []
        worker = threading.Thread(target=lambda: found.append(saver.get_tuple(stored)))
        worker.start()
        while worker.is_alive():
            await asyncio.sleep(0.01)
        assert found and found[0].config == stored
        with pytest.raises(asyncio.InvalidStateError):
            saver.get_tuple(stored)
    finally:
        await store.close()


@pytest.fixture
def many_threads(saver: EventStoreSaver) -> Iterator[list[str]]:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for t in ids:
        put(saver, t, None, {"v": t}, {"v": 1}, {"v": 1})
    yield ids


def test_prune_delete_strategy_removes_every_checkpoint(saver: EventStoreSaver,
                                                        store: EventStore,
                                                        many_threads: list[str]) -> None:
    """prune(strategy="delete") records the deletion for each thread it empties."""
    for t in many_threads[:2]:
        tup = saver.get_tuple(config(t))
        assert tup is not None
        saver.put_writes(tup.config, [("v", "pending")], "task")
    saver.prune(many_threads[:2], strategy="delete")
    for t in many_threads[:2]:
        assert stream_types(store, t) == [CheckpointSaved, WritesSaved, CheckpointsPruned]
        assert saver.get_tuple(config(t)) is None
        assert _rows_of_thread(store, t) == {"checkpoints": 0, "blobs": 0, "writes": 0}
    assert saver.get_tuple(config(many_threads[2])) is not None
    with pytest.raises(ValueError, match="Unknown prune strategy"):
        saver.prune(many_threads, strategy="everything")
    with pytest.raises(TypeError):
        saver.prune(many_threads[0])


def test_get_tuple_cost_does_not_grow_with_the_thread(saver: EventStoreSaver,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """get_tuple runs two statements and reads the same rows on a 3- and a 300-step thread
    (on PostgreSQL, for the checkpoint this saver put last, both in one round trip)."""
    import projections.langgraph_saver as module

    def grow(thread_id: str, steps: int) -> None:
        parent = put(saver, thread_id, None, {"doc": "d", "n": 0}, {"doc": 1, "n": 1},
                     {"doc": 1, "n": 1})
        for i in range(1, steps):
            parent = put(saver, thread_id, parent, {"doc": "d", "n": i},
                         {"doc": 1, "n": i + 1}, {"n": i + 1})
            saver.put_writes(parent, [("n", i + 1)], f"task-{i}")

    grow("short", 3)
    grow("long", 300)
    seen: list[int] = []

    class Counted:
        """A cursor that counts the rows each statement of get_tuple reads."""

        def __init__(self, cur: Any) -> None:
            self.cur = cur

        @property
        def description(self) -> Any:
            return self.cur.description

        def fetchall(self) -> list[Any]:
            rows = list(self.cur.fetchall())
            seen.append(len(rows))
            return rows

        def close(self) -> None:
            self.cur.close()

    real_send = module._send  # every statement of the saver's reads goes through it
    monkeypatch.setattr(module, "_send", lambda *a: Counted(real_send(*a)))
    reads = {}
    for thread_id in ("short", "long"):
        seen.clear()
        tup = saver.get_tuple(config(thread_id))
        assert tup is not None and tup.checkpoint["channel_values"]["doc"] == "d"
        reads[thread_id] = list(seen)
    assert reads["short"] == reads["long"]
    assert len(reads["long"]) == 2


def test_an_empty_checkpoint_id_is_none_as_langgraphs_savers_take_it(
        saver: EventStoreSaver) -> None:
    """``checkpoint_id: ""`` (a caller's config built from a blank parameter) asks for the
    latest checkpoint and lists every one, as InMemorySaver, SqliteSaver and PostgresSaver
    answer, not for a checkpoint whose id is empty.  As ``before``, it is an id, as the SQL
    savers take it: nothing is before it."""
    first = put(saver, "t", None, {"n": 0}, {"n": 1}, {"n": 1})
    second = put(saver, "t", first, {"n": 1}, {"n": 2}, {"n": 2})
    got = saver.get_tuple(config("t", ""))
    assert got is not None and got.config == second
    assert [t.config for t in saver.list(config("t", ""))] == [second, first]
    assert list(saver.list(config("t"), before=config("t", ""))) == []


def test_get_tuple_finds_checkpoints_another_saver_put(url: str) -> None:
    """A saver's get_tuple is right when another saver (another process) has since put a newer
    checkpoint on the thread, re-put the same checkpoint with other channels, or written its
    pending writes: what this saver put last is only a guess that the read checks."""
    a_store = EventStore.open(url, migrate=True)
    b_store = EventStore.open(url)
    try:
        a, b = EventStoreSaver(a_store), EventStoreSaver(b_store)
        first = put(a, "shared", None, {"doc": "d", "n": 0}, {"doc": 1, "n": 1},
                    {"doc": 1, "n": 1})
        got = a.get_tuple(config("shared"))
        assert got is not None and got.checkpoint["channel_values"] == {"doc": "d", "n": 0}
        b.put_writes(first, [("n", 5)], "task-b")
        got = a.get_tuple(config("shared"))
        assert got is not None and [w[1:] for w in got.pending_writes or []] == [("n", 5)]
        second = put(b, "shared", first, {"doc": "d", "n": 1}, {"doc": 1, "n": 2}, {"n": 2})
        for who in (a, b):
            got = who.get_tuple(config("shared"))
            assert got is not None and got.config == second
            assert got.checkpoint["channel_values"] == {"doc": "d", "n": 1}
            assert got.pending_writes == []
        # b re-puts a's first checkpoint with another channel: a's guess has the old versions
        cp = empty_checkpoint()
        cp["id"] = first["configurable"]["checkpoint_id"]
        cp["channel_values"] = {"doc": "d", "n": 0, "extra": "x"}
        cp["channel_versions"] = {"doc": 1, "n": 1, "extra": 1}
        b.put(config("shared"), cp, {"source": "loop", "step": 0, "parents": {}}, {"extra": 1})
        got = a.get_tuple(first)
        assert got is not None
        assert got.checkpoint["channel_values"] == {"doc": "d", "n": 0, "extra": "x"}
    finally:
        a_store.close()
        b_store.close()


@pytest.mark.asyncio
async def test_async_get_tuple_finds_checkpoints_another_saver_put(url: str) -> None:
    """The async saver reads the checkpoint it put last in one round trip on PostgreSQL (as
    the sync saver does); another saver's newer checkpoint, writes or re-put still win."""
    a_store = await AsyncEventStore.open(url, migrate=True)
    b_store = EventStore.open(url)
    try:
        a, b = AsyncEventStoreSaver(a_store), EventStoreSaver(b_store)
        cp = empty_checkpoint()
        cp["channel_values"] = {"doc": "d", "n": 0}
        cp["channel_versions"] = {"doc": 1, "n": 1}
        md: CheckpointMetadata = {"source": "loop", "step": 0, "parents": {}}
        first = await a.aput(config("shared"), cp, md, {"doc": 1, "n": 1})
        got = await a.aget_tuple(config("shared"))
        assert got is not None and got.checkpoint["channel_values"] == {"doc": "d", "n": 0}
        b.put_writes(first, [("n", 5)], "task-b")
        got = await a.aget_tuple(config("shared"))
        assert got is not None and [w[1:] for w in got.pending_writes or []] == [("n", 5)]
        second = put(b, "shared", first, {"doc": "d", "n": 1}, {"doc": 1, "n": 2}, {"n": 2})
        got = await a.aget_tuple(config("shared"))
        assert got is not None and got.config == second and got.pending_writes == []
        assert got.checkpoint["channel_values"] == {"doc": "d", "n": 1}
        again = empty_checkpoint()
        again["id"] = first["configurable"]["checkpoint_id"]
        again["channel_values"] = {"doc": "d", "n": 0, "extra": "x"}
        again["channel_versions"] = {"doc": 1, "n": 1, "extra": 1}
        b.put(config("shared"), again, md, {"extra": 1})
        got = await a.aget_tuple(first)
        assert got is not None
        assert got.checkpoint["channel_values"] == {"doc": "d", "n": 0, "extra": "x"}
    finally:
        await a_store.close()
        b_store.close()


def test_from_url_opens_and_closes_a_store_of_its_own(url: str, store: EventStore) -> None:
    """EventStoreSaver.from_url works on a store it opens; the data is the same database's."""
    with EventStoreSaver.from_url(url, tenant_id="t1") as own:
        stored = put(own, "own", None, {"a": 1}, {"a": 1}, {"a": 1})
    again = EventStoreSaver(store, tenant_id="t1").get_tuple(stored)
    assert again is not None and again.checkpoint["channel_values"] == {"a": 1}
    with pytest.raises(Exception, match="closed"):
        own.get_tuple(stored)


def test_checkpoint_ids_that_are_not_uuids_work_and_sort(saver: EventStoreSaver) -> None:
    """Ids other than UUIDs are stored as text: latest, before and parents still work."""
    parent = None
    for i in range(3):
        cp = empty_checkpoint()
        cp["id"] = f"step-{i:04d}"
        cp["channel_values"] = {"n": i}
        cp["channel_versions"] = {"n": i + 1}
        pid = parent["configurable"]["checkpoint_id"] if parent else None
        parent = saver.put(config("ids", pid), cp, {"source": "loop", "step": i}, {"n": i + 1})
    latest = saver.get_tuple(config("ids"))
    assert latest is not None and latest.checkpoint["id"] == "step-0002"
    assert latest.parent_config == config("ids", "step-0001")
    assert [t.checkpoint["id"] for t in saver.list(config("ids"), before=config("ids",
            "step-0002"))] == ["step-0001", "step-0000"]


def test_reads_use_the_index_before_postgresql_has_statistics() -> None:
    """On tables PostgreSQL has never analyzed (a new database, before autovacuum's first
    pass), every statement of get_tuple and list looks its rows up in the index: none reads a
    thread's index rows and filters them (that made get_tuple 20x slower on a 10,000-checkpoint
    thread)."""
    from sqlalchemy import event

    from tests.conftest import drop_pg_database, fresh_pg_database

    url = fresh_pg_database()
    try:
        with EventStore.open(url, migrate=True) as store:
            with store.engine.begin() as conn:
                for table in (checkpoints, blobs, writes):
                    conn.exec_driver_sql(
                        f"ALTER TABLE {table.name} SET (autovacuum_enabled = off)")
            saver = EventStoreSaver(store)
            parent = put(saver, "t", None, {"doc": "d", "n": 0}, {"doc": 1, "n": 1},
                         {"doc": 1, "n": 1})
            for i in range(1, 400):
                parent = put(saver, "t", parent, {"doc": "d", "n": i}, {"doc": 1, "n": i + 1},
                             {"n": i + 1})
                saver.put_writes(parent, [("n", i + 1)], f"task-{i}")
            plans: list[str] = []

            @event.listens_for(store.engine, "connect")
            def explain_everything(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.add_notice_handler(lambda d: plans.append(d.message_primary))
                dbapi_conn.autocommit = True
                for setting in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                                "SET auto_explain.log_analyze = on",
                                "SET auto_explain.log_format = json",
                                "SET auto_explain.log_level = notice"):
                    dbapi_conn.execute(setting)
                dbapi_conn.autocommit = False

            store.engine.dispose()
            other = EventStoreSaver(store)  # no hint: get_tuple's statements one by one
            for reader in (saver, other):
                assert reader.get_tuple(config("t")) is not None
                first = reader.get_tuple(config("t", parent["configurable"]["checkpoint_id"]))
                assert first is not None
            assert len(list(saver.list(config("t")))) == 400
        nodes: list[dict[str, Any]] = []

        def walk(node: dict[str, Any]) -> None:
            nodes.append(node)
            for child in node.get("Plans", []):
                walk(child)

        for message in plans:
            walk(json.loads(message[message.index("{"):])["Plan"])
        assert {n.get("Relation Name") for n in nodes} >= {t.name for t in
                                                          (checkpoints, blobs, writes)}
        wasteful = [n for n in nodes if max(n.get("Rows Removed by Filter", 0),
                                            n.get("Rows Removed by Join Filter", 0)) > 20
                    and n.get("Relation Name") != "es_events"]
        assert not wasteful, wasteful[:2]
    finally:
        drop_pg_database(url)


@pytest.mark.parametrize("bad", [
    {"v": "4"}, {"v": True}, {"id": 5}, {"ts": None},
    {"channel_versions": {"a": None}}, {"channel_versions": {"a": True}},
    {"channel_versions": {"a": float("inf")}}, {"channel_versions": {"a": float("nan")}},
    {"channel_versions": {"a": 10**4200}},
    {"versions_seen": {"node": {"a": [1]}}}, {"versions_seen": {1: {}}},
    {"versions_seen": {"node": {"a": float("nan")}}},
    {"updated_channels": [1]}, {"metadata": {"score": float("nan")}},
    {"extra_field": [1.0, float("-inf")]},
], ids=["v-str", "v-bool", "id-int", "ts-none", "version-none", "version-bool", "version-inf",
        "version-nan", "version-huge-int", "seen-list", "seen-node-int", "seen-nan", "updated-int",
        "metadata-nan", "extra-inf"])
def test_put_refuses_a_checkpoint_that_would_not_read_back(saver: EventStoreSaver,
                                                           store: EventStore,
                                                           bad: dict[str, Any]) -> None:
    """The saver's events skip the store's round-trip check (decoding a large value again is
    as dear as encoding it), so put checks the fields JSON would change: a malformed checkpoint
    raises InvalidArgument and writes nothing (stored, it would fail every read of the log)."""

    cp: Any = empty_checkpoint()
    cp["channel_values"] = {"a": 1}
    cp["channel_versions"] = {"a": 1}
    md: Any = {"source": "loop", "step": 0, "parents": {}, **bad.get("metadata", {})}
    cp.update({k: v for k, v in bad.items() if k != "metadata"})
    with pytest.raises(InvalidArgument):
        saver.put(config("bad"), cp, md, {"a": 1})
    with pytest.raises(InvalidArgument):
        saver.put_writes(config("bad", "1f0e4b2a-0000-6000-8000-000000000001"),
                         [(7, "x")], "task")  # type: ignore[list-item]
    assert list(store.read_all()) == []


def test_a_thread_id_too_long_for_its_stream_is_refused_by_name(saver: EventStoreSaver,
                                                                store: EventStore) -> None:
    """Thread ids up to 246 characters work; a longer one gets an error that names the thread
    id and its limit (not the stream id's), and nothing is written."""
    from projections.langgraph_saver import MAX_THREAD_ID_LENGTH

    longest = "t" * MAX_THREAD_ID_LENGTH
    put(saver, longest, None, {"a": 1}, {"a": 1}, {"a": 1})
    assert saver.get_tuple(config(longest)) is not None
    with pytest.raises(InvalidArgument, match="thread_id is 247 characters long"):
        put(saver, longest + "x", None, {"a": 1}, {"a": 1}, {"a": 1})
    assert [e.stream_id for e in store.read_all()] == [f"lgthread-{longest}"]


@pytest.mark.parametrize("bad", ["a\x00b", "a\ud800b"])
def test_thread_ids_and_namespaces_the_databases_cannot_hold_are_refused(
        saver: EventStoreSaver, store: EventStore, bad: str) -> None:
    """A NUL (PostgreSQL's text refuses it) or a lone surrogate in a thread id or namespace is
    InvalidArgument on both backends, for reads, writes and retention, and writes nothing."""

    calls = [
        lambda: put(saver, bad, None, {"a": 1}, {"a": 1}, {"a": 1}),
        lambda: saver.get_tuple(config(bad)),
        lambda: saver.get_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": bad}}),
        lambda: list(saver.list({"configurable": {"thread_id": bad}})),
        lambda: list(saver.list({"configurable": {"thread_id": "t", "checkpoint_ns": bad}})),
        lambda: saver.delete_thread(bad),
        lambda: saver.delete_for_runs([bad]),
        lambda: saver.copy_thread("t", bad),
        lambda: saver.prune([bad]),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument):
            call()
    assert list(store.read_all()) == []


def test_channel_names_and_versions_with_nul_are_refused(saver: EventStoreSaver,
                                                         store: EventStore) -> None:
    """They are index columns: a NUL is InvalidArgument on both backends, nothing written."""

    with pytest.raises(InvalidArgument, match="NUL"):
        put(saver, "t", None, {"a\x00b": 1}, {"a\x00b": 1}, {"a\x00b": 1})
    cp: Checkpoint = empty_checkpoint()
    cp["channel_values"] = {"a": 1}
    cp["channel_versions"] = {"a": "1.\x00"}
    with pytest.raises(InvalidArgument, match="NUL"):
        saver.put(config("t"), cp, {"source": "loop", "step": 0, "parents": {}},
                  {"a": "1.\x00"})
    cp["channel_versions"] = {"a": "1.a"}  # new_versions' own version is stored when it differs
    with pytest.raises(InvalidArgument, match="NUL"):
        saver.put(config("t"), cp, {"source": "loop", "step": 0, "parents": {}},
                  {"a": "2.\x00"})
    assert list(store.read_all()) == []


@pytest.mark.parametrize("where", ["checkpoint_ns", "checkpoint_id", "channel", "version"])
def test_ids_too_long_for_an_index_key_are_refused_alike_on_both_backends(
        saver: EventStoreSaver, store: EventStore, where: str) -> None:
    """The index tables' keys (tenant, thread, namespace, and a checkpoint id or a channel with
    its version) must fit PostgreSQL's b-tree (2,704 bytes a row): one over MAX_KEY_BYTES is
    InvalidArgument on both backends and writes nothing; one just under it round-trips.  The
    text is random (PostgreSQL compresses long index values that compress)."""
    import random
    import string

    from projections.langgraph_saver import MAX_KEY_BYTES

    rng = random.Random(where)

    def key_of(size: int) -> tuple[RunnableConfig, Checkpoint, dict[str, str]]:
        text = "".join(rng.choice(string.ascii_letters) for _ in range(size))
        ns = text if where == "checkpoint_ns" else ""
        channel = text if where == "channel" else "a"
        version = text if where == "version" else "1.a"
        cp: Checkpoint = empty_checkpoint()
        if where == "checkpoint_id":
            cp["id"] = text
        cp["channel_values"] = {channel: 1}
        cp["channel_versions"] = {channel: version}
        conf: RunnableConfig = {"configurable": {"thread_id": "t", "checkpoint_ns": ns}}
        return conf, cp, {channel: version}

    # The rest of the longest key: a UUID checkpoint id is kept in 17 bytes, another id in one
    # byte more than its text; channel "a" with version "1.a" takes 4.
    rest = {"checkpoint_ns": 17, "checkpoint_id": 1, "channel": 3, "version": 1}[where]
    md: Any = {"source": "loop", "step": 0, "parents": {}}
    conf, cp, new = key_of(MAX_KEY_BYTES - len(saver.tenant_id) - len("t") - rest)  # just fits
    stored = saver.put(conf, cp, md, new)
    saver.put_writes(stored, [("a", 2)], "task")
    got = saver.get_tuple(stored)
    assert got is not None and got.checkpoint["channel_values"] == cp["channel_values"]
    assert len(got.pending_writes or []) == 1
    before = store.last_position()
    conf, cp, new = key_of(MAX_KEY_BYTES + 1)
    with pytest.raises(InvalidArgument, match="PostgreSQL's b-tree limit"):
        saver.put(conf, cp, md, new)
    if where in ("checkpoint_ns", "checkpoint_id"):
        long_conf: Any = {"configurable": {
            "thread_id": "t", "checkpoint_ns": conf["configurable"]["checkpoint_ns"],
            "checkpoint_id": cp["id"]}}
        with pytest.raises(InvalidArgument, match="PostgreSQL's b-tree limit"):
            saver.put_writes(long_conf, [("a", 2)], "task")
    assert store.last_position() == before


def test_read_arguments_of_the_wrong_type_are_invalid_argument(saver: EventStoreSaver,
                                                                store: EventStore) -> None:
    """As put's: a checkpoint id that is not a string, a limit that is not an int, a filter that
    is not a mapping, put_writes without a checkpoint's config: InvalidArgument."""

    put(saver, "t", None, {"a": 1}, {"a": 1}, {"a": 1})
    before = store.last_position()
    bad_id: Any = {"configurable": {"thread_id": "t", "checkpoint_ns": "", "checkpoint_id": 5}}
    calls = [
        lambda: saver.get_tuple(bad_id),
        lambda: list(saver.list(bad_id)),
        lambda: list(saver.list(config("t"), before=bad_id)),
        lambda: list(saver.list(config("t"), limit="1")),  # type: ignore[arg-type]
        lambda: list(saver.list(config("t"), limit=True)),
        lambda: list(saver.list(config("t"), filter=[("step", 0)])),  # type: ignore[arg-type]
        lambda: saver.put_writes(config("t"), [("a", 1)], "task"),
        lambda: saver.put_writes(bad_id, [("a", 1)], "task"),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument):
            call()
    assert store.last_position() == before


def _icu_pg_database() -> str:
    """A new PostgreSQL database whose text sorts by an ICU locale (en-US: ``y`` before
    ``Z``), as a server's default often does; returns its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from tests.conftest import server_url

    base = make_url(server_url())
    name = f"es_icu_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE template0 '
                              "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"))
    finally:
        admin.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


def test_history_holds_every_value_whatever_the_databases_text_order(
        backend: str, tmp_path: Any) -> None:
    """Every checkpoint list() gives holds the values get_tuple gives it, on a PostgreSQL
    database whose collation sorts case-insensitively (channel versions like ``00001Z...`` and
    ``00001y...`` then sorted the other way round from Python, and the range read that
    finds a page's values missed some: 34 of 302 checkpoints lacked a value, silently)."""
    from tests.conftest import drop_pg_database

    url = f"sqlite:///{tmp_path}/icu.db" if backend == "sqlite" else _icu_pg_database()
    try:
        with EventStore.open(url, migrate=True) as store:
            saver = EventStoreSaver(store)
            parent: RunnableConfig | None = None
            versions = {"n": saver.get_next_version(None, None),
                        "note": saver.get_next_version(None, None)}
            parent = put(saver, "t", None, {"n": 0, "note": "keep me"}, versions,
                         dict(versions))
            for i in range(1, 300):  # versions counting past ...Z and ...z, 1 page of 128+
                versions["n"] = saver.get_next_version(versions["n"], None)
                parent = put(saver, "t", parent, {"n": i, "note": "keep me"}, versions,
                             {"n": versions["n"]})
            listed = list(saver.list(config("t")))
            assert len(listed) == 300
            wrong = [t.checkpoint["channel_values"] for t in listed
                     if t.checkpoint["channel_values"] != saver.get_tuple(  # type: ignore
                         t.config).checkpoint["channel_values"]]
            assert wrong == []
            assert [t.checkpoint["channel_values"]["n"] for t in listed] == list(
                range(299, -1, -1))
    finally:
        if backend != "sqlite":
            drop_pg_database(url)


def test_async_saver_sync_methods_refuse_a_loop_that_is_not_running(url: str) -> None:
    """The sync methods of an async saver whose loop is stopped (or closed) raise at once:
    scheduled on a loop nothing runs, the call waited for ever."""
    loop = asyncio.new_event_loop()
    store = loop.run_until_complete(AsyncEventStore.open(url, migrate=True))
    try:
        saver = loop.run_until_complete(_async_saver(store))
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                saver.get_tuple(config("anything"))
            except BaseException as e:  # (recorded for the assertion below)
                outcome.append(e)

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "get_tuple waited on a loop that does not run"
        assert isinstance(outcome[0], RuntimeError) and "not running" in str(outcome[0])
    finally:
        loop.run_until_complete(store.close())
        loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        saver.get_tuple(config("anything"))


async def _async_saver(store: AsyncEventStore) -> AsyncEventStoreSaver:
    return AsyncEventStoreSaver(store)


def test_get_tuple_reads_each_part_of_a_split_state_once(saver: EventStoreSaver) -> None:
    """A step's values over the event limit are split over several events, whose index rows
    name single channels; get_tuple of a later checkpoint brought the whole event with each
    such row (40 channels of 100 kB in 4 parts: some 30 MB for a 4 MB state).  Each event is
    read once now: the peak memory of the call stays a small multiple of the state."""
    import tracemalloc

    big = {f"c{i:02d}": f"{i:02d}" + "x" * 100_000 for i in range(40)}
    size = sum(len(v) for v in big.values())
    versions = dict.fromkeys(big, 1)
    first = put(saver, "split", None, big, versions, versions)
    later = put(saver, "split", first, {**big, "n": 1}, {**versions, "n": 2}, {"n": 2})
    events = list(saver.store.read_stream(stream_id_of("split")))
    assert len(events) > 3  # the first step's values in parts
    tracemalloc.start()
    try:
        found = saver.get_tuple(later)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found is not None and found.checkpoint["channel_values"] == {**big, "n": 1}
    assert peak < 5 * size, (peak, size)


def test_async_saver_sync_call_waits_for_a_loop_that_stops_and_runs_again(url: str) -> None:
    """A sync call submitted while the saver's loop runs, which then stops before finishing it
    (a loop driven by run_until_complete): the call is served when the loop runs again, once
    (raising meanwhile would report a write as failed that then lands); a loop closed while
    the call waits makes it raise RuntimeError instead of waiting for ever."""
    import time

    loop = asyncio.new_event_loop()
    store = loop.run_until_complete(AsyncEventStore.open(url, migrate=True))
    saver = loop.run_until_complete(_async_saver(store))
    cp = empty_checkpoint()
    stored = loop.run_until_complete(saver.aput(config("loop"), cp, {"source": "input",
                                                                      "step": -1}, {}))
    outcome: list[Any] = []

    def call(fn: Callable[[], Any]) -> threading.Thread:
        def run() -> None:
            try:
                outcome.append(fn())
            except BaseException as e:  # (recorded for the assertions below)
                outcome.append(e)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        return worker

    def busy_then_stop() -> None:
        time.sleep(0.3)
        loop.stop()

    loop.call_soon(busy_then_stop)
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    time.sleep(0.1)  # the loop runs, busy in the callback
    worker = call(lambda: saver.put_writes(stored, [("n", 1)], "task-1"))
    runner.join(5)
    time.sleep(0.8)  # stopped, past a check or two: still waiting
    assert worker.is_alive() and not outcome
    loop.run_until_complete(asyncio.sleep(0.3))  # runs again: the call is served
    worker.join(5)
    assert outcome == [None]
    found = loop.run_until_complete(saver.aget_tuple(stored))
    assert found is not None and [w[1:] for w in found.pending_writes or []] == [("n", 1)]
    loop.run_until_complete(store.close())
    outcome.clear()
    loop.call_soon(busy_then_stop)
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    time.sleep(0.1)
    worker = call(lambda: saver.get_tuple(stored))
    runner.join(5)
    loop.close()  # never to run again
    worker.join(5)
    assert not worker.is_alive(), "get_tuple waited on a closed loop"
    assert isinstance(outcome[0], RuntimeError) and "closed" in str(outcome[0])


@pytest.mark.parametrize("tenant", ["", "t" * 256, "a\x00b", "\ud800", None, 3],
                         ids=["empty", "too-long", "nul", "surrogate", "none", "int"])
def test_savers_refuse_a_bad_tenant_id_when_built(url: str, tenant: Any) -> None:
    """The savers use their tenant id as given in every read and retention call: a bad one
    was taken, and reads found nothing, retention calls did nothing, or a bare TypeError,
    UnicodeEncodeError or DatabaseError came out later.  InvalidArgument when built, as the
    facades and the CrewAI persistence do (from_url: before the store is opened)."""

    with EventStore.open(url, migrate=True) as store, \
            pytest.raises(InvalidArgument, match="tenant_id"):
        EventStoreSaver(store, tenant_id=tenant)
    with pytest.raises(InvalidArgument, match="tenant_id"), \
            EventStoreSaver.from_url("sqlite:///nowhere/never-opened.db", tenant_id=tenant):
        pass

    async def build() -> None:
        astore = await AsyncEventStore.open(url)
        try:
            with pytest.raises(InvalidArgument, match="tenant_id"):
                AsyncEventStoreSaver(astore, tenant_id=tenant)
        finally:
            await astore.close()
        with pytest.raises(InvalidArgument, match="tenant_id"):
            async with AsyncEventStoreSaver.from_url("sqlite:///nowhere/never-opened.db",
                                                     tenant_id=tenant):
                pass

    asyncio.run(build())


def _commit_at_call(monkeypatch: pytest.MonkeyPatch, url: str, function: str,
                    change: Callable[[EventStoreSaver], None], *, call: int = 1) -> list[int]:
    """Make the ``call``-th next call of ``projections.langgraph_saver.<function>`` first
    commit ``change`` through another store (once: the change may call it too).  Returns a
    list that holds 1 once the change ran."""
    import projections.langgraph_saver as lg

    real = getattr(lg, function)
    calls: list[int] = []
    done: list[int] = []

    def change_then_call(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == call and not done:
            done.append(1)
            with EventStore.open(url) as other_store:
                change(EventStoreSaver(other_store))
        return real(*args, **kwargs)

    monkeypatch.setattr(lg, function, change_then_call)
    return done


def _delete_between_the_page_and_its_values(monkeypatch: pytest.MonkeyPatch, url: str,
                                            thread_id: str) -> list[int]:
    """Make ``list``'s first page commit a ``delete_thread`` (another store's connection)
    after reading the page's checkpoints and before looking up their values and writes."""
    return _commit_at_call(monkeypatch, url, "_resolve",
                           lambda other: other.delete_thread(thread_id))


def _three_checkpoints_with_writes(saver: EventStoreSaver, thread_id: str) -> None:
    parent = None
    for n in range(3):
        parent = put(saver, thread_id, parent, {"v": n}, {"v": n + 1}, {"v": n + 1})
        saver.put_writes(parent, [("v", f"w{n}")], f"task-{n}")


def test_a_listed_checkpoint_is_whole_when_a_retention_commits_meanwhile(
        saver: EventStoreSaver, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page of ``list`` reads its checkpoints, then their values and writes, in one snapshot:
    on PostgreSQL (statements in autocommit, each its own snapshot) a delete_thread committing
    in between left the page's checkpoints without values or writes (a tester's find, with
    prune and delete racing history listings)."""
    _three_checkpoints_with_writes(saver, "whole")
    deletes = _delete_between_the_page_and_its_values(monkeypatch, url, "whole")
    listed = list(saver.list(config("whole")))
    assert deletes == [1]
    assert [t.checkpoint["channel_values"] for t in listed] == [{"v": 2}, {"v": 1}, {"v": 0}]
    assert [[w[2] for w in t.pending_writes or ()] for t in listed] == [["w2"], ["w1"], ["w0"]]
    assert list(saver.list(config("whole"))) == []  # (the delete did commit)


@pytest.mark.asyncio
async def test_an_async_listed_checkpoint_is_whole_when_a_retention_commits_meanwhile(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, for ``alist``."""
    with EventStore.open(url, migrate=True) as sync_store:
        _three_checkpoints_with_writes(EventStoreSaver(sync_store), "awhole")
    async with await AsyncEventStore.open(url) as astore:
        asaver = AsyncEventStoreSaver(astore)
        deletes = _delete_between_the_page_and_its_values(monkeypatch, url, "awhole")
        listed = [t async for t in asaver.alist(config("awhole"))]
        assert deletes == [1]
        assert [t.checkpoint["channel_values"] for t in listed] == [{"v": 2}, {"v": 1},
                                                                     {"v": 0}]
        assert [[w[2] for w in t.pending_writes or ()] for t in listed] == [["w2"], ["w1"],
                                                                            ["w0"]]


_SUBGRAPH = "child:task-1"


def _thread_wide_changes(thread_id: str) -> dict[str, Callable[[EventStoreSaver], None]]:
    """Changes to a thread of a root checkpoint and a subgraph's (``_root_and_subgraph``)."""
    def root_then_subgraph(other: EventStoreSaver) -> None:
        (sub,) = other.list(config(thread_id, ns=_SUBGRAPH))
        (root,) = other.list(config(thread_id))
        put(other, thread_id, root.config, {"a": 2}, {"a": 2}, {"a": 2})
        put(other, thread_id, sub.config, {"b": 2}, {"b": 2}, {"b": 2}, ns=_SUBGRAPH)

    return {"delete_thread": lambda other: other.delete_thread(thread_id),
            "a root put, then a subgraph put": root_then_subgraph}


def _root_and_subgraph(saver: EventStoreSaver, thread_id: str) -> None:
    root = put(saver, thread_id, None, {"a": 1}, {"a": 1}, {"a": 1})
    put(saver, thread_id, None, {"b": 1}, {"b": 1}, {"b": 1}, ns=_SUBGRAPH,
        metadata={"parents": {"": root["configurable"]["checkpoint_id"]}})


def _commit_after_the_first_namespace_page(monkeypatch: pytest.MonkeyPatch, url: str,
                                           change: Callable[[EventStoreSaver], None]
                                           ) -> list[int]:
    """Make the next ``list`` of a whole thread commit ``change`` (through another store)
    after reading its first namespace's page and before reading the next one's."""
    return _commit_at_call(monkeypatch, url, "list_page", change, call=2)


def _listed(tuples: Iterator[Any] | list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(t.config["configurable"]["checkpoint_ns"], t.checkpoint["channel_values"])
            for t in tuples]


def test_a_whole_thread_s_listing_is_one_moment_of_all_its_namespaces(
        saver: EventStoreSaver, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``list`` of a thread without a namespace merges each namespace's pages: each was read
    on a snapshot of its own, so a ``delete_thread`` committing between them listed the root's
    checkpoints without the subgraph's, and two puts gave the later one without the earlier
    (a tester's find).  The namespaces and the pages a merge needs next read one snapshot."""
    for n, what in enumerate(_thread_wide_changes("")):
        thread_id = f"wide-{n}"
        _root_and_subgraph(saver, thread_id)
        change_it = _thread_wide_changes(thread_id)[what]
        before = _listed(saver.list({"configurable": {"thread_id": thread_id}}))
        done = _commit_after_the_first_namespace_page(monkeypatch, url, change_it)
        got = _listed(saver.list({"configurable": {"thread_id": thread_id}}))
        monkeypatch.undo()
        after = _listed(saver.list({"configurable": {"thread_id": thread_id}}))
        assert done == [1]
        assert before != after
        assert got in (before, after), what


@pytest.mark.asyncio
async def test_an_async_whole_thread_s_listing_is_one_moment_of_all_its_namespaces(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, for ``alist``."""
    with EventStore.open(url, migrate=True) as sync_store:
        for n in range(2):
            _root_and_subgraph(EventStoreSaver(sync_store), f"awide-{n}")
    async with await AsyncEventStore.open(url) as astore:
        asaver = AsyncEventStoreSaver(astore)
        for n, what in enumerate(_thread_wide_changes("")):
            thread_id = f"awide-{n}"
            change_it = _thread_wide_changes(thread_id)[what]
            whole = {"configurable": {"thread_id": thread_id}}
            before = _listed([t async for t in asaver.alist(whole)])
            done = _commit_after_the_first_namespace_page(monkeypatch, url, change_it)
            got = _listed([t async for t in asaver.alist(whole)])
            monkeypatch.undo()
            after = _listed([t async for t in asaver.alist(whole)])
            assert done == [1]
            assert before != after
            assert got in (before, after), what


def _commit_between_get_tuple_statements(monkeypatch: pytest.MonkeyPatch, url: str,
                                          change: Callable[[EventStoreSaver], None]
                                          ) -> list[int]:
    """Make the next ``get_tuple`` commit ``change`` (through another store) after reading the
    checkpoint's row and before reading its values and writes."""
    return _commit_at_call(monkeypatch, url, "_refs_args", change)


def _checkpoint_of_run_with_writes(saver: EventStoreSaver, thread_id: str) -> RunnableConfig:
    first = put(saver, thread_id, None, {"a": "value-a"}, {"a": 1}, {"a": 1},
                metadata={"run_id": "run-1"})
    saver.put_writes(first, [("a", "pending-1"), ("b", "pending-2")], "task-1")
    return first


def _a_new_head_kept_alone(thread_id: str, head: RunnableConfig
                           ) -> Callable[[EventStoreSaver], None]:
    def change(other: EventStoreSaver) -> None:
        put(other, thread_id, head, {"doc": "static", "n": 2}, {"doc": 1, "n": 3}, {"n": 3})
        other.prune([thread_id], strategy="keep_latest")
    return change


def _two_checkpoints_sharing_a_value(saver: EventStoreSaver, thread_id: str) -> RunnableConfig:
    first = put(saver, thread_id, None, {"doc": "static"}, {"doc": 1}, {"doc": 1})
    return put(saver, thread_id, first, {"doc": "static", "n": 1}, {"doc": 1, "n": 2}, {"n": 2})


def test_get_tuple_is_whole_when_a_retention_commits_between_its_statements(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``get_tuple`` reads a checkpoint's row, then its values and writes: on PostgreSQL (each
    statement its own snapshot) a ``delete_for_runs`` committing in between gave the checkpoint
    with its values and none of its writes, and a new head with a ``keep_latest`` prune gave
    the old head without the value the prune removed (a tester's find, with processes racing
    puts, prunes and reads).  It is now whole as of one moment, or gone."""
    with EventStore.open(url, migrate=True) as writer_store, EventStore.open(url) as reader_store:
        writer, reader = EventStoreSaver(writer_store), EventStoreSaver(reader_store)
        first = _checkpoint_of_run_with_writes(writer, "torn")
        done = _commit_between_get_tuple_statements(
            monkeypatch, url, lambda other: other.delete_for_runs(["run-1"]))
        got = reader.get_tuple(first)
        assert done == [1]
        assert got is None or (got.checkpoint["channel_values"] == {"a": "value-a"} and [
            w[1:] for w in got.pending_writes or ()] == [("a", "pending-1"), ("b", "pending-2")])
        assert reader.get_tuple(first) is None  # (the delete did commit)

        head = _two_checkpoints_sharing_a_value(writer, "latest")
        done = _commit_between_get_tuple_statements(
            monkeypatch, url, _a_new_head_kept_alone("latest", head))
        got = reader.get_tuple(config("latest"))
        assert done == [1]
        assert got is not None
        assert got.checkpoint["channel_values"] in ({"doc": "static", "n": 1},
                                                    {"doc": "static", "n": 2})
        assert [t.checkpoint["channel_values"] for t in reader.list(config("latest"))] == [
            {"doc": "static", "n": 2}]


@pytest.mark.asyncio
async def test_aget_tuple_is_whole_when_a_retention_commits_between_its_statements(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, for the async saver's ``aget_tuple``."""
    with EventStore.open(url, migrate=True) as writer_store:
        writer = EventStoreSaver(writer_store)
        first = _checkpoint_of_run_with_writes(writer, "atorn")
        head = _two_checkpoints_sharing_a_value(writer, "alatest")
    async with await AsyncEventStore.open(url) as astore:
        reader = AsyncEventStoreSaver(astore)
        done = _commit_between_get_tuple_statements(
            monkeypatch, url, lambda other: other.delete_for_runs(["run-1"]))
        got = await reader.aget_tuple(first)
        assert done == [1]
        assert got is None or (got.checkpoint["channel_values"] == {"a": "value-a"} and [
            w[1:] for w in got.pending_writes or ()] == [("a", "pending-1"), ("b", "pending-2")])
        assert await reader.aget_tuple(first) is None

        done = _commit_between_get_tuple_statements(
            monkeypatch, url, _a_new_head_kept_alone("alatest", head))
        got = await reader.aget_tuple(config("alatest"))
        assert done == [1]
        assert got is not None
        assert got.checkpoint["channel_values"] in ({"doc": "static", "n": 1},
                                                    {"doc": "static", "n": 2})


def test_the_sync_saver_s_async_methods_fail_on_a_stop_iteration_instead_of_hanging(
        store: EventStore) -> None:
    """``EventStoreSaver.aput`` and the other async methods run the sync ones on a worker
    thread; a ``StopIteration`` out of them (a serializer's ``next()`` past its end) could not
    be handed back to the event loop, and the caller waited for ever.  Now a RuntimeError, as
    out of a coroutine; nothing written, and the saver goes on."""
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    class Exhausted(JsonPlusSerializer):
        fail = True

        def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
            if self.fail:
                return next(iter([]))
            return super().dumps_typed(obj)

    serde = Exhausted()
    saver = EventStoreSaver(store, serde=serde)
    cp: Checkpoint = empty_checkpoint()
    cp["channel_values"] = {"v": 1}
    cp["channel_versions"] = {"v": 1}
    md: CheckpointMetadata = {"source": "loop", "step": 0, "parents": {}}
    with pytest.raises(StopIteration):
        saver.put(config("stop"), cp, md, {"v": 1})

    async def attempt() -> None:
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(saver.aput(config("stop"), cp, md, {"v": 1}), 5)
        assert await asyncio.wait_for(saver.aget_tuple(config("stop")), 5) is None
        serde.fail = False
        await asyncio.wait_for(saver.aput(config("stop"), cp, md, {"v": 1}), 5)

    asyncio.run(attempt())
    tup = saver.get_tuple(config("stop"))
    assert tup is not None and tup.checkpoint["channel_values"] == {"v": 1}


# -- ids, namespaces and retention: details a caller sees -----------------------------------------


def test_checkpoint_ids_differing_in_case_only_are_two_checkpoints(saver: EventStoreSaver
                                                                  ) -> None:
    upper = "1EF4F797-8335-6428-8001-8A1503F9B875"  # a UUID, not in str(UUID)'s lowercase
    stored = {}
    for checkpoint_id in (upper, upper.lower()):
        cp = empty_checkpoint()
        cp["id"] = checkpoint_id
        stored[checkpoint_id] = saver.put(config("case"), cp, {"source": "loop", "step": 0}, {})
    for checkpoint_id, conf in stored.items():
        got = saver.get_tuple(conf)
        assert got is not None and got.checkpoint["id"] == checkpoint_id
    assert len(list(saver.list(config("case")))) == 2


def test_prune_keeps_a_latest_checkpoint_whose_id_has_a_uuid_s_dashes_and_spaces(
        saver: EventStoreSaver) -> None:
    first = put(saver, "spaced", None, {}, {}, {})
    cp = empty_checkpoint()
    cp["id"] = "ff ff ff-ffff-ffff-ffff-ffffffffffff"  # not hex: kept as text
    latest = saver.put(config("spaced", first["configurable"]["checkpoint_id"]), cp,
                       {"source": "loop", "step": 1}, {})
    saver.prune(["spaced"])
    assert [t.config for t in saver.list(config("spaced"))] == [latest]


def test_a_namespace_too_long_for_an_index_key_in_utf8_is_refused(saver: EventStoreSaver,
                                                                  store: EventStore) -> None:

    ns = "\U0001f600" * 700  # 700 characters, 2,800 bytes in UTF-8
    cp = empty_checkpoint()
    before = store.last_position()
    with pytest.raises(InvalidArgument, match="PostgreSQL's b-tree limit"):
        saver.put(config("t", ns=ns), cp, {"source": "loop", "step": 0}, {})
    assert store.last_position() == before


def test_a_split_checkpoint_of_a_subgraph_namespace_loads_whole_with_its_updated_channels(
        url: str) -> None:
    with EventStore.open(url, migrate=True, max_event_bytes=8192) as small:
        saver = EventStoreSaver(small)
        values = {f"c{i}": str(i) * 3000 for i in range(4)}
        cp = empty_checkpoint()
        cp["channel_values"] = values
        cp["channel_versions"] = dict.fromkeys(values, 1)
        cp["updated_channels"] = sorted(values)
        stored = saver.put(config("big", ns="child:1"), cp, {"source": "loop", "step": 0},
                           dict.fromkeys(values, 1))
        assert ChannelValuesSaved in stream_types(small, "big")
        got = saver.get_tuple(stored)
        assert got is not None and got.checkpoint["channel_values"] == values
        assert got.checkpoint["updated_channels"] == sorted(values)
        (listed,) = saver.list(config("big", ns="child:1"))
        assert listed.checkpoint["channel_values"] == values


def test_delete_for_runs_takes_the_pending_writes_of_the_checkpoints_it_deletes(
        saver: EventStoreSaver, store: EventStore) -> None:
    cp = empty_checkpoint()
    md: Any = {"source": "loop", "step": 0, "run_id": "run-1"}
    stored = saver.put(config("runs-w"), cp, md, {})
    saver.put_writes(stored, [("a", "old")], "task")
    saver.delete_for_runs(["run-1"])
    assert _rows_of_thread(store, "runs-w")["writes"] == 0
    saver.put(config("runs-w"), cp, {**md, "run_id": "run-2"}, {})  # the same checkpoint again
    got = saver.get_tuple(stored)
    assert got is not None and got.pending_writes == []


def test_prune_leaves_no_parent_when_only_another_namespace_has_its_id(
        saver: EventStoreSaver) -> None:
    md: Any = {"source": "loop", "step": 0, "parents": {}}

    def put_id(checkpoint_id: str, parent: str | None, ns: str) -> RunnableConfig:
        cp = empty_checkpoint()
        cp["id"] = checkpoint_id
        return saver.put(config("ns-ids", parent, ns), cp, md, {})

    put_id("step-1", None, "")
    latest = put_id("step-2", "step-1", "")
    put_id("step-1", None, "other")  # another namespace, the same id: kept there
    saver.prune(["ns-ids"])
    got = saver.get_tuple(config("ns-ids"))
    assert got is not None and got.config == latest
    assert got.parent_config is None
    assert saver.get_tuple(config("ns-ids", ns="other")) is not None


def test_get_tuple_sees_a_re_put_of_its_last_checkpoint_at_new_versions(url: str) -> None:
    a_store = EventStore.open(url, migrate=True)
    b_store = EventStore.open(url)
    try:
        a, b = EventStoreSaver(a_store), EventStoreSaver(b_store)
        first = put(a, "re-put", None, {"n": 0}, {"n": 1}, {"n": 1})
        cp = empty_checkpoint()
        cp["id"] = first["configurable"]["checkpoint_id"]
        cp["channel_values"] = {"n": 0, "extra": "x"}
        cp["channel_versions"] = {"n": 1, "extra": 2}  # a version a's last put did not have
        b.put(config("re-put"), cp, {"source": "loop", "step": 0, "parents": {}}, {"extra": 2})
        for read in (config("re-put"), first):
            got = a.get_tuple(read)
            assert got is not None
            assert got.checkpoint["channel_values"] == {"n": 0, "extra": "x"}
    finally:
        a_store.close()
        b_store.close()


def test_copy_thread_again_adds_what_the_source_put_since(saver: EventStoreSaver) -> None:
    c1 = put(saver, "src2", None, {"a": "v1"}, {"a": 1}, {"a": 1})
    saver.put_writes(c1, [("a", "w")], "task")
    saver.copy_thread("src2", "dst2")
    c2 = put(saver, "src2", c1, {"a": "v2"}, {"a": 2}, {"a": 2})
    saver.copy_thread("src2", "dst2")
    copied = list(saver.list(config("dst2")))
    assert [t.config["configurable"]["checkpoint_id"] for t in copied] == [
        c2["configurable"]["checkpoint_id"], c1["configurable"]["checkpoint_id"]]
    assert [t.checkpoint["channel_values"] for t in copied] == [{"a": "v2"}, {"a": "v1"}]
    assert copied[1].pending_writes == [("task", "a", "w")]


def test_copy_thread_leaves_behind_writes_put_on_a_checkpoint_deleted_in_the_source(
        saver: EventStoreSaver, store: EventStore) -> None:
    """A task still running when its thread was deleted puts its writes on a checkpoint gone
    from the source; copying the source again does not hang them on the target's copy of that
    checkpoint (which never had them), before or after the index is rebuilt."""
    c1 = put(saver, "src3", None, {"a": "v1"}, {"a": 1}, {"a": 1})
    saver.copy_thread("src3", "dst3")
    saver.delete_thread("src3")
    saver.put_writes(c1, [("a", "late")], "task")  # the late task's writes
    c2 = put(saver, "src3", None, {"a": "v2"}, {"a": 2}, {"a": 2})
    saver.put_writes(c2, [("a", "kept")], "task")
    saver.copy_thread("src3", "dst3")
    for _ in ("as appended", "rebuilt"):
        copied = {t.config["configurable"]["checkpoint_id"]: t.pending_writes
                  for t in saver.list(config("dst3"))}
        assert copied == {c1["configurable"]["checkpoint_id"]: [],
                          c2["configurable"]["checkpoint_id"]: [("task", "a", "kept")]}
        rebuild_index(store)


def test_checkpoints_sharing_an_id_list_by_thread_then_namespace_newest_first(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import projections.langgraph_saver as lg

    monkeypatch.setattr(lg, "_LIST_PAGE", 2)
    monkeypatch.setattr(lg, "_LIST_PAGE_MAX", 4)
    md: Any = {"source": "loop", "step": 0, "parents": {}}
    with EventStore.open(url, migrate=True) as store:
        saver = EventStoreSaver(store)
        for ns in ("", "a", "b"):
            parent = None
            for i in range(3):
                cp = empty_checkpoint()
                cp["id"] = f"k-{i}"
                saver.put(config("same-ids", parent, ns), cp, md, {})
                parent = cp["id"]
        saver.copy_thread("same-ids", "same-ids-copy")
        expected = sorted(((f"k-{i}", thread, ns) for thread in ("same-ids", "same-ids-copy")
                           for ns in ("", "a", "b") for i in range(3)), reverse=True)

        def keys(tuples: Any) -> list[tuple[str, str, str]]:
            return [(t.config["configurable"]["checkpoint_id"], t.config["configurable"]
                     ["thread_id"], t.config["configurable"]["checkpoint_ns"]) for t in tuples]

        assert keys(saver.list(None)) == expected
        whole_thread: Any = {"configurable": {"thread_id": "same-ids"}}
        assert keys(saver.list(whole_thread)) == [k for k in expected if k[1] == "same-ids"]
        one_id: Any = {"configurable": {"thread_id": "same-ids", "checkpoint_id": "k-1"}}
        assert keys(saver.list(one_id)) == [("k-1", "same-ids", ns) for ns in ("b", "a", "")]
        assert keys(saver.list(config("same-ids", "k-1", "a"))) == [("k-1", "same-ids", "a")]


def test_pending_writes_come_in_task_path_task_and_index_order(saver: EventStoreSaver) -> None:
    c1 = put(saver, "order", None, {}, {}, {})
    saver.put_writes(c1, [("out", 1), (INTERRUPT, "why")], "task-b", "path-2")
    saver.put_writes(c1, [("out", 2), ("more", 3)], "task-a", "path-2")
    saver.put_writes(c1, [("out", 4)], "task-c", "path-1")
    expected = [("task-c", "out", 4), ("task-a", "out", 2), ("task-a", "more", 3),
                ("task-b", INTERRUPT, "why"), ("task-b", "out", 1)]
    got = saver.get_tuple(c1)
    assert got is not None and got.pending_writes == expected
    (listed,) = saver.list(config("order"))
    assert listed.pending_writes == expected
    alone = put(saver, "order-1", None, {}, {}, {})
    saver.put_writes(alone, [("out", 1), (INTERRUPT, "why")], "task")  # one event
    got = saver.get_tuple(alone)
    assert got is not None and got.pending_writes == [("task", INTERRUPT, "why"),
                                                      ("task", "out", 1)]


def test_special_writes_in_one_call_replace_each_other_as_in_two_calls(
        saver: EventStoreSaver) -> None:
    c1 = put(saver, "special", None, {}, {}, {})
    saver.put_writes(c1, [(INTERRUPT, "first"), (INTERRUPT, "second")], "task")
    got = saver.get_tuple(c1)
    assert got is not None and got.pending_writes == [("task", INTERRUPT, "second")]


def test_a_regular_write_is_not_replaced_by_a_later_call_that_also_writes_a_special_channel(
        saver: EventStoreSaver) -> None:
    c1 = put(saver, "mixed", None, {}, {}, {})
    saver.put_writes(c1, [("out", 1)], "task")
    saver.put_writes(c1, [("out", 2), (INTERRUPT, "why")], "task")
    got = saver.get_tuple(c1)
    assert got is not None
    assert got.pending_writes == [("task", INTERRUPT, "why"), ("task", "out", 1)]



def test_put_writes_of_nothing_records_nothing(saver: EventStoreSaver, store: EventStore
                                               ) -> None:
    c1 = put(saver, "no-writes", None, {}, {}, {})
    saver.put_writes(c1, [], "task")
    assert stream_types(store, "no-writes") == [CheckpointSaved]


def test_a_value_stored_at_a_new_version_the_checkpoint_does_not_list_loads_later(
        saver: EventStoreSaver) -> None:
    c1 = put(saver, "ahead", None, {"a": 1, "b": "early"}, {"a": 1}, {"a": 1, "b": 5})
    c2 = put(saver, "ahead", c1, {"a": 1, "b": "early"}, {"a": 1, "b": 5}, {})
    got = saver.get_tuple(c2)
    assert got is not None and got.checkpoint["channel_values"] == {"a": 1, "b": "early"}


def test_a_channel_with_a_new_version_and_no_value_loads_as_absent(
        saver: EventStoreSaver) -> None:
    c1 = put(saver, "emptied", None, {"a": 1, "b": 2}, {"a": 1, "b": 1}, {"a": 1, "b": 1})
    c2 = put(saver, "emptied", c1, {"a": 1}, {"a": 1, "b": 2}, {"b": 2})  # b has no value now
    got = saver.get_tuple(c2)
    assert got is not None and got.checkpoint["channel_values"] == {"a": 1}
    (latest, _first) = saver.list(config("emptied"))
    assert latest.checkpoint["channel_values"] == {"a": 1}


@pytest.mark.parametrize("updated", [["a", "b"], ["b", "a"], ["a"], ["a", "b", "c"], []])
def test_updated_channels_come_back_as_put(saver: EventStoreSaver, updated: list[str]
                                           ) -> None:
    cp = empty_checkpoint()
    cp["channel_values"] = {"a": 1, "b": 2}
    cp["channel_versions"] = {"a": 1, "b": 1}
    cp["updated_channels"] = updated
    new_versions = {"b": 1, "a": 1}  # not in sorted order
    stored = saver.put(config("updated"), cp, {"source": "loop", "step": 0}, new_versions)
    got = saver.get_tuple(stored)
    assert got is not None and got.checkpoint["updated_channels"] == updated


def test_listed_checkpoints_sharing_a_mutable_value_do_not_share_the_object(
        saver: EventStoreSaver) -> None:
    c1 = put(saver, "shared-list", None, {"items": [1], "n": 1}, {"items": 1, "n": 1},
             {"items": 1, "n": 1})
    put(saver, "shared-list", c1, {"items": [1], "n": 2}, {"items": 1, "n": 2}, {"n": 2})
    newer, older = saver.list(config("shared-list"))
    newer.checkpoint["channel_values"]["items"].append(2)
    assert older.checkpoint["channel_values"]["items"] == [1]


def test_retention_of_a_thread_only_another_tenant_has_records_nothing(
        store: EventStore) -> None:
    acme, other = EventStoreSaver(store, tenant_id="acme"), EventStoreSaver(store)
    put(acme, "acme-thread", None, {"a": 1}, {"a": 1}, {"a": 1})
    events_of_default = store.stats(tenant_id="default")["events"]
    other.delete_thread("acme-thread")
    other.prune(["acme-thread"], strategy="delete")
    other.copy_thread("acme-thread", "copy")
    assert store.stats(tenant_id="default")["events"] == events_of_default
    assert acme.get_tuple(config("acme-thread")) is not None


@pytest.mark.asyncio
async def test_alist_before_an_empty_checkpoint_id_lists_nothing(url: str) -> None:
    async with await AsyncEventStore.open(url, migrate=True) as astore:
        asaver = AsyncEventStoreSaver(astore)
        cp = empty_checkpoint()
        await asaver.aput(config("before-empty"), cp, {"source": "loop", "step": 0}, {})
        assert len([t async for t in asaver.alist(None)]) == 1
        empty_id: Any = {"configurable": {"checkpoint_id": ""}}
        assert [t async for t in asaver.alist(None, before=empty_id)] == []
        assert [t async for t in asaver.alist(config("before-empty"), before=empty_id)] == []


def test_prune_keeps_the_chain_back_to_the_oldest_snapshot_of_several_delta_channels(
        saver: EventStoreSaver) -> None:
    def since(*channels: str) -> dict[str, Any]:
        return {"counters_since_delta_snapshot": {ch: [1, 1] for ch in channels}}

    root = put(saver, "deltas", None, {}, {}, {})
    c0 = put(saver, "deltas", root, {}, {}, {})  # both channels snapshot here
    c1 = put(saver, "deltas", c0, {}, {}, {}, since("b"))  # "a" snapshots here, "b" not
    c2 = put(saver, "deltas", c1, {}, {}, {}, since("a", "b"))
    c3 = put(saver, "deltas", c2, {}, {}, {}, since("a", "b"))
    saver.prune(["deltas"])
    assert [t.config for t in saver.list(config("deltas"))] == [c3, c2, c1, c0]


def test_prune_keeps_a_subgraph_namespace_whose_root_checkpoint_the_index_never_had(
        saver: EventStoreSaver) -> None:
    root1 = put(saver, "sub2", None, {"n": 1}, {"n": 1}, {"n": 1})
    put(saver, "sub2", root1, {"n": 2}, {"n": 2}, {"n": 2})
    unknown = {"parents": {"": "no-such-checkpoint"}}
    put(saver, "sub2", None, {"m": 1}, {"m": 1}, {"m": 1}, unknown, ns="child:task")
    # A namespace without ":" is not a subgraph call's, whatever its metadata says.
    gone_root = {"parents": {"": root1["configurable"]["checkpoint_id"]}}
    put(saver, "sub2", None, {"m": 1}, {"m": 1}, {"m": 1}, gone_root, ns="plain")
    saver.prune(["sub2"])
    left = {t.config["configurable"]["checkpoint_ns"]
            for t in saver.list({"configurable": {"thread_id": "sub2"}})}
    assert left == {"", "child:task", "plain"}


def test_copy_thread_records_nothing_for_an_empty_source_or_onto_itself(
        saver: EventStoreSaver, store: EventStore) -> None:
    put(saver, "self", None, {"a": 1}, {"a": 1}, {"a": 1})
    saver.copy_thread("self", "self")
    saver.copy_thread("nothing-here", "target")
    assert stream_types(store, "self") == [CheckpointSaved]
    assert store.stream_version(stream_id_of("target")) == 0


def test_thread_copied_records_the_source_version_it_copied(saver: EventStoreSaver,
                                                            store: EventStore) -> None:
    c1 = put(saver, "versioned", None, {"a": 1}, {"a": 1}, {"a": 1})
    saver.put_writes(c1, [("a", 2)], "task")
    saver.copy_thread("versioned", "copy-of-versioned")
    (event,) = store.read_stream(stream_id_of("copy-of-versioned"))
    assert event.data == ThreadCopied(source_thread_id="versioned", source_version=2)


def test_delete_thread_of_a_thread_with_only_pending_writes_records_it(
        saver: EventStoreSaver, store: EventStore) -> None:
    saver.put_writes(config("writes-only", "never-put"), [("a", 1)], "task")
    saver.delete_thread("writes-only")
    assert stream_types(store, "writes-only") == [WritesSaved, ThreadDeleted]
    assert _rows_of_thread(store, "writes-only")["writes"] == 0


def test_an_imported_subgraph_namespace_stores_only_the_channels_that_changed(
        saver: EventStoreSaver, store: EventStore) -> None:
    source = InMemorySaver()
    cfg = put(source, "imp-ns", None, {"big": "x" * 1000, "n": 0}, {"big": 1, "n": 1},
              {"big": 1, "n": 1}, ns="child:1")
    put(source, "imp-ns", cfg, {"big": "x" * 1000, "n": 1}, {"big": 1, "n": 2}, {"n": 2},
        ns="child:1")
    assert import_checkpoints(source, saver) == 2
    stored = [sorted(b.channel for b in e.data.blobs) for e in store.read_stream(
        stream_id_of("imp-ns")) if isinstance(e.data, CheckpointSaved)]
    assert stored == [["big", "n"], ["n"]]


@pytest.mark.asyncio
async def test_async_retention_of_nothing_records_nothing(url: str) -> None:
    async with await AsyncEventStore.open(url, migrate=True) as astore:
        asaver = AsyncEventStoreSaver(astore)
        cp = empty_checkpoint()
        stored = await asaver.aput(config("a-self"), cp, {"source": "loop", "step": 0}, {})
        await asaver.aput_writes(stored, [], "task")
        await asaver.acopy_thread("a-self", "a-self")
        await asaver.adelete_thread("a-nothing")
        await asaver.aprune(["a-nothing"], strategy="delete")
        assert await astore.stream_version(stream_id_of("a-self")) == 1
        assert await astore.stream_version(stream_id_of("a-nothing")) == 0


def test_put_refuses_a_parent_checkpoint_id_that_is_not_a_string(saver: EventStoreSaver,
                                                                  store: EventStore) -> None:

    before = store.last_position()
    with pytest.raises(InvalidArgument, match="checkpoint_id must be a string"):
        saver.put({"configurable": {"thread_id": "t", "checkpoint_id": 5}}, empty_checkpoint(),
                  {"source": "loop", "step": 0}, {})
    assert store.last_position() == before


def test_a_legacy_checkpoints_sends_take_the_highest_channel_version(
        saver: EventStoreSaver) -> None:
    """A checkpoint before LangGraph 0.3 (v < 4) with Send objects in pending_sends: the tasks
    channel gets the highest of its channel versions, as PostgresSaver gives it on load."""

    low = saver.get_next_version(None, None)
    high = saver.get_next_version(saver.get_next_version(low, None), None)
    cp = empty_checkpoint()
    cp["v"] = 1
    cp["channel_values"] = {"a": 1, "b": 2}
    cp["channel_versions"] = {"b": high, "a": low}
    cp["pending_sends"] = [Send("worker", {"x": 1})]  # type: ignore[typeddict-unknown-key]
    saver.put(config("t"), cp, {"source": "loop", "step": 1, "parents": {}},
              dict(cp["channel_versions"]))
    got = saver.get_tuple(config("t"))
    assert got is not None and got.checkpoint["channel_values"][TASKS] == [
        Send("worker", {"x": 1})]
    assert got.checkpoint["channel_versions"][TASKS] == high
