"""The LangGraph savers against a model: random sequences of saver calls, every read compared.

Hypothesis drives each of our savers (``EventStoreSaver``, and ``AsyncEventStoreSaver`` through
its sync methods from another thread) and a reference side by side through puts (forks from
any earlier checkpoint, channels changed, deleted or left alone), pending writes (regular and
LangGraph's special channels, repeated), and the retention calls (``delete_thread``,
``copy_thread``, ``delete_for_runs``, ``prune`` with both strategies), over two threads and a
root and a subgraph namespace.  After every call, each thread's latest checkpoint in each
namespace, every checkpoint ever put (by id) and the listings (by namespace, by thread, across
threads, with ``before``, ``limit`` and metadata filters) must equal the reference's.

The reference is LangGraph's own ``InMemorySaver`` for puts, writes and reads.  It has no
``copy_thread``, ``delete_for_runs`` or ``prune``; ``Reference`` adds them over its storage as the
README's "Retention is recorded" paragraph states them (``copy_thread`` merges the source's
checkpoints, with their writes, into the target, a checkpoint both have getting both threads'
``put_writes`` calls in the order they were made; a checkpoint whose parent went is left without
one; ``keep_latest`` keeps each namespace's latest checkpoint and drops a subgraph namespace
whose root checkpoint went; channel values no kept checkpoint refers to go).
Pending writes are kept as LangGraph's SQL savers keep them (see ``Reference.put_writes``).
A listing over a thread's namespaces is compared newest first by checkpoint id, as LangGraph's
SQL savers order it (``InMemorySaver`` goes namespace by namespace); one across threads as a
set (a copied thread shares its checkpoint ids with its source).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import WRITES_IDX_MAP, CheckpointTuple
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.memory import InMemorySaver

from eventstore import EventStore
from projections.langgraph_saver import AsyncEventStoreSaver, EventStoreSaver
from tests._async_shim import BlockingAsyncStore
from tests._examples import examples

THREADS = ["t0", "thread-ü"]
NAMESPACES = ["", "sub:task-1"]
CHANNELS = ["messages", "count", "doc"]
RUNS = ["run-1", "run-2", "run-3"]
SOURCES = ["input", "loop", "update", "fork"]
WRITE_CHANNELS = [*CHANNELS, "__error__", "__interrupt__", "__resume__", "__scheduled__"]
TASK_IDS = ["task-a", "task-b"]
TASK_PATHS = ["", "~__pregel_pull, node", "~__pregel_push, 0"]

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=6)
    | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                  max_size=2),
    max_leaves=5,
)
DELETED = object()  # a channel whose value a step removed (new version, no value)


class Reference(InMemorySaver):
    """InMemorySaver plus the retention calls, as the README states them for our saver, and
    with pending writes stored as LangGraph's SQL savers store them."""

    def __init__(self) -> None:
        super().__init__()
        # Every put_writes call, by the checkpoint it wrote to: call number -> (task id, task
        # path, writes, whether the batch replaces); ``self.writes`` is their fold.
        self.batches: dict[tuple[str, str, str], dict[int, Any]] = {}
        self.calls = 0

    def put_writes(self, config: RunnableConfig, writes: Any, task_id: str,
                   task_path: str = "") -> None:
        """A batch of special channels only replaces what a task wrote there before; any other
        batch keeps what is stored, key by key (``SqliteSaver``'s ``INSERT OR REPLACE`` /
        ``INSERT OR IGNORE``; ``InMemorySaver`` replaces special channels in any batch)."""
        c = config["configurable"]
        key = (c["thread_id"], c.get("checkpoint_ns", ""), c["checkpoint_id"])
        self.calls += 1
        replace = all(channel in WRITES_IDX_MAP for channel, _ in writes)
        self.batches.setdefault(key, {})[self.calls] = (task_id, task_path, list(writes), replace)
        self._fold(key)

    def _fold(self, key: tuple[str, str, str]) -> None:
        """A checkpoint's writes: its batches applied in the order they were put."""
        stored: dict[tuple[str, int], Any] = {}
        for _call, (task_id, task_path, writes, replace) in sorted(self.batches[key].items()):
            for idx, (channel, value) in enumerate(writes):
                at = (task_id, WRITES_IDX_MAP.get(channel, idx))
                if replace or at not in stored:
                    stored[at] = (task_id, channel, self.serde.dumps_typed(value), task_path)
        self.writes[key] = stored

    def _drop_writes(self, key: tuple[str, str, str]) -> None:
        self.writes.pop(key, None)
        self.batches.pop(key, None)

    def delete_thread(self, thread_id: str) -> None:
        super().delete_thread(thread_id)
        for key in [k for k in self.batches if k[0] == thread_id]:
            del self.batches[key]

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """The source's checkpoints join the target's; where both have a checkpoint, its
        writes are both threads' batches, applied in the order they were put."""
        source, target = source_thread_id, target_thread_id
        if source == target or not any(self.storage.get(source, {}).values()):
            return
        for ns, saved in list(self.storage[source].items()):
            for cid, entry in saved.items():
                self.storage[target][ns].setdefault(cid, entry)
        for (thread, ns, cid), batches in list(self.batches.items()):
            if thread == source and cid in self.storage[source].get(ns, {}):
                self.batches.setdefault((target, ns, cid), {}).update(batches)
                self._fold((target, ns, cid))
        for (thread, ns, channel, version), blob in list(self.blobs.items()):
            if thread == source:
                self.blobs.setdefault((target, ns, channel, version), blob)

    def delete_for_runs(self, run_ids: Any) -> None:
        runs = set(run_ids)
        for thread, by_ns in list(self.storage.items()):
            doomed = [(ns, cid) for ns, saved in by_ns.items() for cid, entry in saved.items()
                      if self.serde.loads_typed(entry[1]).get("run_id") in runs]
            for ns, cid in doomed:
                del by_ns[ns][cid]
                self._drop_writes((thread, ns, cid))
            if doomed:
                self._orphan(thread)

    def prune(self, thread_ids: Any, *, strategy: str = "keep_latest") -> None:
        for thread in thread_ids:
            if strategy == "delete":
                self.delete_thread(thread)
                continue
            by_ns = self.storage.get(thread, {})
            heads = {ns: max(saved) for ns, saved in by_ns.items() if saved}
            had = set(heads)  # the namespaces with checkpoints
            kept = {ns: {head} for ns, head in heads.items()}
            for ns, head in heads.items():
                if ":" not in ns:
                    continue
                parents = self.serde.loads_typed(by_ns[ns][head][1]).get("parents") or {}
                root = parents.get("")
                if root in by_ns.get("", {}) and root not in kept.get("", ()):
                    del kept[ns]
            if all(len(saved) == len(kept.get(ns, ())) for ns, saved in by_ns.items()):
                continue
            for ns, saved in by_ns.items():
                for cid in [c for c in saved if c not in kept.get(ns, ())]:
                    del saved[cid]
                    self._drop_writes((thread, ns, cid))
            # A namespace that keeps no checkpoint loses its writes; writes put on a checkpoint
            # the thread does not have (yet) stay, elsewhere.
            for key in [k for k in self.writes
                        if k[0] == thread and k[1] in had and k[1] not in kept]:
                self._drop_writes(key)
            self._orphan(thread)
            referenced = {
                (ns, version)
                for ns, saved in by_ns.items() for entry in saved.values()
                for version in self.serde.loads_typed(entry[0])["channel_versions"].values()}
            for key in [k for k in self.blobs if k[0] == thread and (k[1], k[3]) not in referenced]:
                del self.blobs[key]

    def _orphan(self, thread: str) -> None:
        """Checkpoints of ``thread`` whose parent is gone are left without one."""
        for saved in self.storage[thread].values():
            for cid, (cp, md, parent) in list(saved.items()):
                if parent is not None and parent not in saved:
                    saved[cid] = (cp, md, None)


def config(thread: str, ns: str | None = "", cid: str | None = None) -> RunnableConfig:
    conf: dict[str, Any] = {"thread_id": thread}
    if ns is not None:
        conf["checkpoint_ns"] = ns
    if cid is not None:
        conf["checkpoint_id"] = cid
    return {"configurable": conf}


def plain(t: CheckpointTuple | None) -> Any:
    """A tuple as comparable data: configs reduced to thread, namespace and checkpoint id."""
    if t is None:
        return None

    def conf(c: RunnableConfig | None) -> Any:
        if c is None:
            return None
        k = c["configurable"]
        return (k["thread_id"], k.get("checkpoint_ns", ""), k["checkpoint_id"])

    return (conf(t.config), dict(t.checkpoint), t.metadata, conf(t.parent_config),
            list(t.pending_writes or []))


def newest_first(tuples: list[CheckpointTuple]) -> list[Any]:
    return sorted((plain(t) for t in tuples), key=lambda p: (p[0][2], p[0][0], p[0][1]),
                  reverse=True)


# -- operations: each a tuple whose first item names the call ------------------------------------

PUT = st.tuples(
    st.just("put"), st.sampled_from(THREADS), st.sampled_from(NAMESPACES),
    # the parent: none, the latest, any earlier checkpoint, or one a retention call took
    st.one_of(st.none(), st.just("latest"), st.integers(0, 50),
              st.tuples(st.just("removed"), st.integers(0, 50))),
    st.dictionaries(st.sampled_from(CHANNELS), VALUES | st.just(DELETED), max_size=3),
    st.fixed_dictionaries({"source": st.sampled_from(SOURCES), "step": st.integers(-1, 5)},
                          optional={"run_id": st.sampled_from(RUNS)}),
    st.integers(0, 50),  # which root checkpoint a subgraph checkpoint names as its parent
    st.booleans(),  # a caller's configurable key, which lands in the metadata
)
WRITES = st.tuples(
    st.just("put_writes"), st.integers(0, 100),
    st.lists(st.tuples(st.sampled_from(WRITE_CHANNELS), VALUES), min_size=1, max_size=3),
    st.sampled_from(TASK_IDS), st.sampled_from(TASK_PATHS))
RETENTION = st.one_of(
    st.tuples(st.just("delete_thread"), st.sampled_from(THREADS)),
    st.tuples(st.just("copy_thread"), st.sampled_from(THREADS), st.sampled_from(THREADS)),
    st.tuples(st.just("delete_for_runs"),
              st.lists(st.sampled_from(RUNS), min_size=1, max_size=2)),
    st.tuples(st.just("prune"),
              st.lists(st.sampled_from(THREADS), min_size=1, max_size=2, unique=True),
              st.sampled_from(["keep_latest", "keep_latest", "delete"])))
FILTERS = st.one_of(
    st.none(), st.fixed_dictionaries({"source": st.sampled_from(SOURCES)}),
    st.fixed_dictionaries({"step": st.integers(-1, 5)}),
    st.fixed_dictionaries({"run_id": st.sampled_from(RUNS)}),
    st.fixed_dictionaries({"source": st.sampled_from(SOURCES), "step": st.integers(-1, 5)}))
LIST = st.tuples(
    st.just("list"), st.sampled_from([None, *THREADS]), st.sampled_from([None, *NAMESPACES]),
    st.one_of(st.none(), st.integers(0, 100)), st.one_of(st.none(), st.integers(0, 4)), FILTERS)
OPERATIONS = st.lists(st.one_of(PUT, PUT, PUT, WRITES, RETENTION, RETENTION, LIST), min_size=12,
                      max_size=40)


class Run:
    """One example: our saver, on a tenant of its own, beside a fresh reference."""

    def __init__(self, ours: EventStoreSaver | AsyncEventStoreSaver) -> None:
        self.ours = ours
        self.ref = Reference()
        # Every checkpoint put, in order: id -> (thread, ns, values, versions), to fork from.
        self.put_ids: list[str] = []
        self.saved: dict[str, tuple[str, str, dict[str, Any], dict[str, str]]] = {}
        self.counter = 0

    def both(self, method: str, *args: Any, **kwargs: Any) -> Any:
        got = getattr(self.ours, method)(*args, **kwargs)
        want = getattr(self.ref, method)(*args, **kwargs)
        return got, want

    def apply(self, op: tuple[Any, ...]) -> None:
        name, *args = op
        if name == "put":
            self.put(*args)
        elif name == "put_writes":
            pick, writes, task_id, task_path = args
            if self.put_ids:
                cid = self.put_ids[pick % len(self.put_ids)]
                thread, ns = self.saved[cid][:2]
                self.both("put_writes", config(thread, ns, cid), writes, task_id, task_path)
        elif name == "prune":
            self.both("prune", args[0], strategy=args[1])
        elif name == "list":
            self.list_with_options(*args)
        else:
            self.both(name, *args)

    def same_thread(self, thread: str, ns: str) -> list[str]:
        return [c for c in self.put_ids if self.saved[c][:2] == (thread, ns)]

    def put(self, thread: str, ns: str, parent: Any, changes: dict[str, Any],
            metadata: dict[str, Any], root: int, extra: bool) -> None:
        parent_id: str | None = None
        if parent == "latest":
            latest = self.ref.get_tuple(config(thread, ns))
            parent_id = latest.checkpoint["id"] if latest else None
        elif isinstance(parent, int):
            same = self.same_thread(thread, ns)
            parent_id = same[parent % len(same)] if same else None
        elif parent is not None:
            gone = [c for c in self.same_thread(thread, ns)
                    if c not in self.ref.storage.get(thread, {}).get(ns, {})]
            parent_id = gone[parent[1] % len(gone)] if gone else None
        values: dict[str, Any] = {}
        versions: dict[str, str] = {}
        if parent_id is not None:
            values, versions = dict(self.saved[parent_id][2]), dict(self.saved[parent_id][3])
        new_versions = {}
        for channel, value in changes.items():
            self.counter += 1
            versions[channel] = new_versions[channel] = f"{self.counter:032}.{self.counter % 7}"
            if value is DELETED:
                values.pop(channel, None)
            else:
                values[channel] = value
        self.counter += 1
        cid = str(uuid6(clock_seq=self.counter))
        checkpoint: Any = {
            "v": 4, "id": cid, "ts": "2026-12-02T10:00:00+00:00",
            "channel_values": dict(values), "channel_versions": dict(versions),
            "versions_seen": {"node": dict(new_versions)}, "pending_sends": [],
            "updated_channels": sorted(new_versions) or None}
        roots = self.same_thread(thread, "")
        metadata = {**metadata, "parents": {"": roots[root % len(roots)]} if ns and roots else {}}
        conf = config(thread, ns, parent_id)
        if extra:
            conf["configurable"]["user_id"] = "u-1"
        got, want = self.both("put", conf, checkpoint, metadata, new_versions)
        assert plain_config(got) == plain_config(want)
        self.put_ids.append(cid)
        self.saved[cid] = (thread, ns, values, versions)

    def list_with_options(self, thread: str | None, ns: str | None, before: int | None,
                          limit: int | None, flt: dict[str, Any] | None) -> None:
        if thread is None:  # across threads: the same set (order among copies is not fixed)
            got = sorted(plain(t) for t in self.ours.list(None, filter=flt))
            assert got == sorted(plain(t) for t in self.ref.list(None, filter=flt))
            return
        before_conf = None
        if before is not None and self.put_ids:
            before_conf = config(thread, ns, self.put_ids[before % len(self.put_ids)])
        got = [plain(t) for t in self.ours.list(config(thread, ns), filter=flt,
                                                before=before_conf, limit=limit)]
        want = newest_first(list(self.ref.list(config(thread, ns), filter=flt,
                                               before=before_conf)))
        assert got == (want if limit is None else want[:limit])

    def check_reads(self, after: tuple[Any, ...]) -> None:
        for thread in THREADS:
            for ns in NAMESPACES:
                where = f"after {after[0]}: latest of {thread!r} {ns!r}"
                assert plain(self.ours.get_tuple(config(thread, ns))) == \
                    plain(self.ref.get_tuple(config(thread, ns))), where
                assert [plain(t) for t in self.ours.list(config(thread, ns))] == \
                    [plain(t) for t in self.ref.list(config(thread, ns))], f"list, {where}"
            assert [plain(t) for t in self.ours.list(config(thread, None))] == \
                newest_first(list(self.ref.list(config(thread, None)))), f"list {thread}"
            for cid in self.put_ids:
                ns = self.saved[cid][1]
                assert plain(self.ours.get_tuple(config(thread, ns, cid))) == \
                    plain(self.ref.get_tuple(config(thread, ns, cid))), \
                    f"after {after[0]}: {thread!r} {cid}"


def plain_config(c: RunnableConfig) -> Any:
    k = c["configurable"]
    return (k["thread_id"], k["checkpoint_ns"], k["checkpoint_id"])


@pytest.fixture(params=["sync", "async"])
def saver_for(request: pytest.FixtureRequest, url: str) -> Iterator[Callable[[str], Any]]:
    """Makes a saver of the kind under test for a tenant: ``EventStoreSaver``, or
    ``AsyncEventStoreSaver`` on a loop of its own in another thread (its sync methods then run
    the async ones there, as for ``graph.invoke`` from a worker thread)."""
    if request.param == "sync":
        store = EventStore.open(url, migrate=True)
        try:
            yield lambda tenant: EventStoreSaver(store, tenant_id=tenant)
        finally:
            store.close()
        return

    async def make(tenant: str) -> AsyncEventStoreSaver:
        return AsyncEventStoreSaver(on_loop.inner, tenant_id=tenant)

    on_loop = BlockingAsyncStore(url, migrate=True)
    try:
        yield lambda tenant: on_loop._run(make(tenant))
    finally:
        on_loop.close()


@settings(max_examples=examples(20), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(operations=OPERATIONS)
# A checkpoint copied twice, its task's error rewritten in the source between the copies: the
# target's writes are both copies' batches in the order they were put (found in CI).
@example(operations=[
    ("put", "thread-ü", "", None, {}, {"source": "input", "step": 0}, 0, False),
    ("put_writes", 0, [("messages", None), ("__error__", None)], "task-b", ""),
    ("copy_thread", "thread-ü", "t0"),
    ("put_writes", 0, [("__error__", None)], "task-b", "~__pregel_pull, node"),
    ("copy_thread", "thread-ü", "t0"),
    ("put", "t0", "", None, {}, {"source": "input", "step": 0}, 0, False),
]).via("discovered failure")
def test_saver_reads_match_the_reference_after_any_sequence_of_calls(
        saver_for: Callable[[str], Any], operations: list[tuple[Any, ...]]) -> None:
    """Every read of our savers equals the reference's after random puts, writes and retention
    calls (both savers, both backends)."""
    run = Run(saver_for(f"t-{uuid.uuid4().hex}"))
    for op in operations:
        run.apply(op)
        run.check_reads(op)
