"""Real compiled LangGraph graphs on our savers, compared with the same scripts on SqliteSaver."""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.checkpoint.serde.types import INTERRUPT, RESUME

from eventstore import EventStore
from projections.langgraph_saver import WritesSaved, stream_id_of
from tests import _langgraph_scripts as scripts

ROOT = Path(__file__).resolve().parent.parent


def run_phase(kind: str, url: str, prefix: str, phase: str) -> dict[str, Any]:
    """One phase of the interrupt scenario in a process of its own, which then exits."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests._langgraph_scripts", kind, url, prefix, phase],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The scenarios' outcomes on LangGraph's own SqliteSaver."""
    path = tmp_path_factory.mktemp("reference")
    with scripts.open_saver("sqlite", f"sqlite:///{path / 'interrupts.db'}") as saver:
        started = scripts.start(saver, "ref")
    with scripts.open_saver("sqlite", f"sqlite:///{path / 'interrupts.db'}") as saver:
        resumed = scripts.resume(saver, "ref")
    with scripts.open_saver("sqlite", f"sqlite:///{path / 'travel.db'}") as saver:
        travel = scripts.time_travel(saver, "travel")
    # Through JSON, as the other processes report theirs.
    return {"start": json.loads(json.dumps(started)), "resume": json.loads(json.dumps(resumed)),
            "travel": travel}


def test_interrupt_survives_the_process_and_resumes_by_id(url: str,
                                                          reference: dict[str, Any]) -> None:
    """Interrupt, exit, resume in a new process (one interrupt, then two parallel ones by id)."""
    started = run_phase("ours", url, "p", "start")
    assert started == reference["start"]
    assert started["parallel"]["interrupts"] == [{"who": "a"}, {"who": "b"}]
    resumed = run_phase("ours", url, "p", "resume")
    assert resumed == reference["resume"]
    assert resumed["ids"] == 2
    assert resumed["approval"]["values"]["log"] == ["prepare", "ask:yes", "finish:yes"]
    assert resumed["parallel"]["values"]["log"] == ["a:ok-a", "b:ok-b", "join"]
    with EventStore.open(url) as store:
        channels = [w.channel for e in store.read_stream(stream_id_of("p-approval"))
                    if isinstance(e.data, WritesSaved) for w in e.data.writes]
    assert INTERRUPT in channels and RESUME in channels


def test_history_replay_and_fork_match_sqlite_saver(url: str, reference: dict[str, Any]) -> None:
    """get_state_history, replay from a past checkpoint and an update_state fork as SqliteSaver."""
    with scripts.open_saver("ours", url) as saver:
        ours = scripts.time_travel(saver, "travel")
    assert ours == reference["travel"]
    assert ours["fork_parent_is_before_b"]
    assert ours["forked"]["log"] == ["a", "edit", "b", "c"]


@pytest.mark.asyncio
async def test_async_graph_time_travel_matches_sqlite_saver(url: str,
                                                            reference: dict[str, Any]) -> None:
    """The same history, replay and fork through ainvoke on AsyncEventStoreSaver."""
    async with scripts.open_async_saver(url) as saver:
        ours = await scripts.atime_travel(saver, "travel-async")
    assert ours == reference["travel"]


def test_threads_import_from_sqlite_saver_and_resume(url: str) -> None:
    """A thread interrupted on SqliteSaver is imported, with equal history, and resumes here."""
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.types import Command

    from projections.langgraph_saver import EventStoreSaver, import_checkpoints

    source = SqliteSaver(sqlite3.connect(":memory:", check_same_thread=False))
    config = {"configurable": {"thread_id": "imported-1"}}
    scripts.approval_graph(source).invoke({"value": 1}, config)  # stops at the interrupt
    with EventStore.open(url) as store:
        target = EventStoreSaver(store)
        copied = import_checkpoints(source, target)
        assert copied == len(list(source.list(config))) > 0
        theirs = [(s.values, s.next) for s in
                  scripts.approval_graph(source).get_state_history(config)]
        ours_graph = scripts.approval_graph(target)
        ours = [(s.values, s.next) for s in ours_graph.get_state_history(config)]
        assert ours == theirs
        assert ours_graph.get_state(config).tasks[0].interrupts[0].value == {
            "question": "approve?", "value": 2}
        result = ours_graph.invoke(Command(resume="yes"), config)
        assert result["value"] == 20 and result["log"][-1] == "finish:yes"


class _DoneState(TypedDict):
    done: Annotated[list[str], operator.add]


def test_a_legacy_checkpoint_with_pending_sends_is_saved_imported_and_run(url: str) -> None:
    """A checkpoint of LangGraph before 0.3 (v < 4) with Send objects in its pending_sends key
    (put by an old release, or imported from SqliteSaver) is stored with the sends in the tasks
    channel, as LangGraph loads it: the graph runs them, as on SqliteSaver.  It was refused
    (InvalidEvent: Send is not JSON), and the import left such a thread out."""
    import sqlite3

    from langgraph.checkpoint.base import empty_checkpoint
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.constants import TASKS
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import Send

    from projections.langgraph_saver import EventStoreSaver, import_checkpoints

    def worker(arg: dict[str, str]) -> dict[str, list[str]]:
        return {"done": [arg["x"]]}

    builder = StateGraph(_DoneState)
    builder.add_node("worker", worker)
    builder.add_edge(START, "worker")
    builder.add_edge("worker", END)
    sends = [Send("worker", {"x": "s1"}), Send("worker", {"x": "s2"})]

    def put_legacy(saver: Any, thread_id: str) -> None:
        cp = empty_checkpoint()
        cp["v"] = 1
        cp["channel_values"] = {"done": ["a"]}
        cp["channel_versions"] = {"done": saver.get_next_version(None, None)}
        cp["pending_sends"] = list(sends)  # type: ignore[typeddict-unknown-key]
        saver.put({"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}, cp,
                  {"source": "loop", "step": 1, "parents": {}}, dict(cp["channel_versions"]))

    source = SqliteSaver(sqlite3.connect(":memory:", check_same_thread=False))
    put_legacy(source, "imported")
    with EventStore.open(url) as store:
        target = EventStoreSaver(store)
        put_legacy(target, "put")
        assert import_checkpoints(source, target) == 1
        for thread_id in ("put", "imported"):
            config = {"configurable": {"thread_id": thread_id}}
            saved = target.get_tuple(config)
            assert saved is not None and "pending_sends" not in saved.checkpoint
            assert saved.checkpoint["channel_values"][TASKS] == sends
            assert builder.compile(checkpointer=target).invoke(None, config) == {
                "done": ["a", "s1", "s2"]}
    config = {"configurable": {"thread_id": "imported"}}
    assert builder.compile(checkpointer=source).invoke(None, config) == {
        "done": ["a", "s1", "s2"]}


class _SentState(TypedDict, total=False):
    log: Annotated[list[str], operator.add]
    k: int


def test_imported_pending_writes_keep_the_sources_order(url: str) -> None:
    """Six Send branches leave a checkpoint with six tasks' pending writes; after the import
    they come back in the order the source gives them (LangGraph's order, which a channel
    folding writes in that order depends on), not in the order of the tasks' random ids."""
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import START, StateGraph
    from langgraph.types import Send, interrupt

    from projections.langgraph_saver import EventStoreSaver, import_checkpoints

    def build(saver: Any) -> Any:
        g = StateGraph(_SentState)
        g.add_node("start", lambda s: {"log": ["start"]})
        g.add_node("p", lambda s: {"log": [f"p{s['k']}"]})
        g.add_node("ask", lambda s: {"log": [interrupt("?")]})
        g.add_edge(START, "start")
        g.add_conditional_edges("start", lambda s: [Send("p", {"k": k}) for k in range(6)],
                                ["p"])
        g.add_edge("p", "ask")
        return g.compile(checkpointer=saver)

    source = SqliteSaver(sqlite3.connect(":memory:", check_same_thread=False))
    with EventStore.open(url) as store:
        target = EventStoreSaver(store)
        for n in range(3):  # (an order right by chance is unlikely three times over)
            config = {"configurable": {"thread_id": f"sent-{n}"}}
            build(source).invoke({"log": ["in"]}, config)
            import_checkpoints(source, target, thread_ids=[f"sent-{n}"])
            theirs = list(source.list(config))
            ours = list(target.list(config))
            assert [t.pending_writes for t in ours] == [t.pending_writes for t in theirs]
            assert any(len(t.pending_writes or ()) == 12 for t in ours)  # 6 tasks, 2 each
            assert build(target).get_state(config).values == build(source).get_state(
                config).values


def test_import_goes_thread_by_thread_atomically_and_can_run_again(url: str) -> None:
    """Each thread is one atomic append into a thread the target does not have: running the
    import again (after an interruption, say) copies only the threads not there yet."""
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver

    from projections.langgraph_saver import EventStoreSaver, import_checkpoints, stream_id_of

    source = SqliteSaver(sqlite3.connect(":memory:", check_same_thread=False))
    for name in ("t-a", "t-b"):
        scripts.approval_graph(source).invoke({"value": 1}, {"configurable": {"thread_id": name}})
    per_thread = len(list(source.list({"configurable": {"thread_id": "t-a"}})))
    with EventStore.open(url) as store:
        target = EventStoreSaver(store)
        assert import_checkpoints(source, target, thread_ids=["t-a"]) == per_thread
        versions = store.stream_version(stream_id_of("t-a"))
        assert import_checkpoints(source, target) == per_thread  # only t-b is new
        assert import_checkpoints(source, target) == 0
        assert store.stream_version(stream_id_of("t-a")) == versions
        for name in ("t-a", "t-b"):
            config = {"configurable": {"thread_id": name}}
            assert [t.config for t in target.list(config)] == [
                t.config for t in source.list(config)]


def test_import_goes_on_past_a_thread_it_cannot_take_and_names_it(url: str) -> None:
    """A thread the saver refuses (an id over 246 characters) is left out whole: the threads
    before and after it are imported, then ThreadsNotImported names it and why; run again, it
    imports nothing more and names it again (it stopped at that thread every time)."""
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver

    from projections.langgraph_saver import (
        EventStoreSaver,
        ThreadsNotImported,
        import_checkpoints,
        stream_id_of,
    )

    source = SqliteSaver(sqlite3.connect(":memory:", check_same_thread=False))
    long_id = "L" * 300
    for name in ("a-short", long_id, "z-short"):
        scripts.approval_graph(source).invoke({"value": 1}, {"configurable": {"thread_id": name}})
    per_thread = len(list(source.list({"configurable": {"thread_id": "a-short"}})))
    with EventStore.open(url) as store:
        target = EventStoreSaver(store)
        for copied in (2 * per_thread, 0):
            with pytest.raises(ThreadsNotImported) as got:
                import_checkpoints(source, target)
            assert got.value.copied == copied and list(got.value.failed) == [long_id]
            assert "300 characters" in got.value.failed[long_id]
            assert all(store.stream_version(stream_id_of(t)) > 0 for t in ("a-short", "z-short"))
        assert sorted(e.stream_id for e in store.read_all()) == sorted(
            [stream_id_of("a-short")] * store.stream_version(stream_id_of("a-short"))
            + [stream_id_of("z-short")] * store.stream_version(stream_id_of("z-short")))


def test_import_splits_values_over_the_targets_event_size_limit(url: str) -> None:
    """A checkpoint whose values exceed the target store's event size limit goes over in
    several events of the thread's one append, as put() would store it."""
    from langgraph.checkpoint.memory import InMemorySaver

    from projections.langgraph_saver import EventStoreSaver, import_checkpoints

    source = InMemorySaver()
    config: Any = {"configurable": {"thread_id": "big"}}
    scripts.big_graph(source).invoke({"doc": "x", "notes": []}, config)
    with EventStore.open(url, max_event_bytes=10_000) as store:  # one value fits, not both
        target = EventStoreSaver(store)
        assert import_checkpoints(source, target) == len(list(source.list(config)))
        got = target.get_tuple(config)
        assert got is not None
        assert got.checkpoint["channel_values"]["doc"] == "D" * 6000
        assert got.checkpoint["channel_values"]["notes"] == ["n" * 6000]
        types = [e.type for e in store.read_stream(stream_id_of("big"))]
        assert "lg.ChannelValuesSaved" in types and types.count("lg.WritesSaved") >= 2


_ORDERS_APP = '''
import dataclasses, json, sqlite3, sys
from typing import Any, TypedDict
from langgraph.graph import START, StateGraph
from langgraph.types import Command, interrupt

@dataclasses.dataclass
class Order:
    id: int
    total: float

class S(TypedDict, total=False):
    order: Any
    answer: Any

def graph(saver):
    g = StateGraph(S)
    g.add_node("place", lambda s: {"order": Order(7, 9.5)})
    g.add_node("ask", lambda s: {"answer": interrupt(Order(8, 1.0))})
    g.add_edge(START, "place")
    g.add_edge("place", "ask")
    return g.compile(checkpointer=saver)

config = {"configurable": {"thread_id": "orders"}}
if sys.argv[1] == "start":
    from langgraph.checkpoint.sqlite import SqliteSaver
    graph(SqliteSaver(sqlite3.connect(sys.argv[2], check_same_thread=False))).invoke({}, config)
else:
    from eventstore import EventStore
    from projections.langgraph_saver import EventStoreSaver
    with EventStore.open(sys.argv[2]) as store:
        g = graph(EventStoreSaver(store))
        state = g.get_state(config)
        asked = state.tasks[0].interrupts[0].value
        out = g.invoke(Command(resume=Order(9, 2.0)), config)
        kinds = {"asked": asked, "order": state.values["order"], "answer": out["answer"]}
        print(json.dumps({**{k: type(v).__name__ for k, v in kinds.items()},
                          "total": out["order"].total}))
'''


def test_import_copies_values_of_classes_the_importing_process_cannot_build(
        url: str, tmp_path: Path) -> None:
    """An application's own classes in the state and in an interrupt go over as their
    serialized bytes: imported by a process that cannot import them (a one-off migration
    script), they come back as those classes where the application runs (they used to come
    back as plain dicts, for good)."""
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver

    from projections.langgraph_saver import EventStoreSaver, import_checkpoints

    app = tmp_path / "orders_app.py"
    app.write_text(_ORDERS_APP)
    old = tmp_path / "old.sqlite"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, "-c", "import orders_app", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("start", str(old))
    assert "orders_app" not in sys.modules
    source = SqliteSaver(sqlite3.connect(str(old), check_same_thread=False))
    with EventStore.open(url) as store:
        copied = import_checkpoints(source, EventStoreSaver(store))
    assert copied == len(list(source.list({"configurable": {"thread_id": "orders"}}))) > 0
    outcome = json.loads(run("resume", url).strip().splitlines()[-1])
    assert outcome == {"asked": "Order", "order": "Order", "answer": "Order", "total": 9.5}


def test_import_refuses_an_async_saver_and_names_the_async_import(url: str) -> None:
    """import_checkpoints into an AsyncEventStoreSaver raised nothing and wrote nothing (its
    appends were coroutines never awaited): now a typed refusal naming aimport_checkpoints."""
    import asyncio

    from langgraph.checkpoint.memory import InMemorySaver

    from eventstore.aio import AsyncEventStore
    from eventstore.errors import InvalidArgument
    from projections.langgraph_saver import (
        AsyncEventStoreSaver,
        EventStoreSaver,
        aimport_checkpoints,
        import_checkpoints,
    )

    source = InMemorySaver()
    scripts.approval_graph(source).invoke({"value": 1}, {"configurable": {"thread_id": "a"}})

    async def attempt() -> None:
        async with await AsyncEventStore.open(url) as store:
            target = AsyncEventStoreSaver(store)
            with pytest.raises(InvalidArgument, match="aimport_checkpoints"):
                import_checkpoints(source, target)  # type: ignore[arg-type]
            with EventStore.open(url) as sync_store, pytest.raises(
                    InvalidArgument, match="import_checkpoints"):
                await aimport_checkpoints(source, EventStoreSaver(sync_store))  # type: ignore[arg-type]
            assert await store.last_position() == 0

    asyncio.run(attempt())


@pytest.mark.asyncio
async def test_async_import_from_async_sqlite_saver_resumes_on_the_async_saver(
        url: str, tmp_path: Path) -> None:
    """aimport_checkpoints reads an AsyncSqliteSaver through its async methods into an
    AsyncEventStoreSaver; the interrupted thread resumes there, with the source's history;
    run again, it copies nothing."""
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    from langgraph.types import Command

    from eventstore.aio import AsyncEventStore
    from projections.langgraph_saver import AsyncEventStoreSaver, aimport_checkpoints

    config: Any = {"configurable": {"thread_id": "async-imported"}}
    async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "old.sqlite")) as source:
        await scripts.approval_graph(source).ainvoke({"value": 1}, config)
        theirs = [(s.values, s.next) async for s in
                  scripts.approval_graph(source).aget_state_history(config)]
        async with await AsyncEventStore.open(url) as store:
            target = AsyncEventStoreSaver(store)
            assert await aimport_checkpoints(source, target) == len(theirs) > 0
            assert await aimport_checkpoints(source, target) == 0
            graph = scripts.approval_graph(target)
            ours = [(s.values, s.next) async for s in graph.aget_state_history(config)]
            assert ours == theirs
            done = await graph.ainvoke(Command(resume="yes"), config)
            assert done["value"] == 20 and done["log"][-1] == "finish:yes"


def test_import_builds_objects_outside_the_channel_values(url: str) -> None:
    """Values go over as bytes, but what the log keeps as JSON is built first and stored as
    put() stores it: a checkpoint's keys beyond LangGraph's own, and metadata that a source
    loads through its serializer (InMemorySaver: a date and a set there made the import
    refuse the thread, naming an internal class)."""
    import datetime

    from langgraph.checkpoint.base import empty_checkpoint
    from langgraph.checkpoint.memory import InMemorySaver

    from projections.langgraph_saver import EventStoreSaver, import_checkpoints

    source = InMemorySaver()
    checkpoint: Any = empty_checkpoint()
    checkpoint["channel_values"] = {"when": datetime.datetime(2025, 1, 2, 3, 4)}
    checkpoint["channel_versions"] = {"when": "1"}
    checkpoint["x_extra"] = {"day": datetime.date(2025, 1, 2)}
    metadata: Any = {"source": "input", "step": -1, "day": datetime.date(2025, 1, 2),
                     "tags": {"a"}}
    source.put({"configurable": {"thread_id": "t", "checkpoint_ns": ""}}, checkpoint,
               metadata, {"when": "1"})
    with EventStore.open(url) as store:
        target = EventStoreSaver(store)
        assert import_checkpoints(source, target) == 1
        got = target.get_tuple({"configurable": {"thread_id": "t"}})
        target.put({"configurable": {"thread_id": "u", "checkpoint_ns": ""}}, checkpoint,
                   metadata, {"when": "1"})
        put = target.get_tuple({"configurable": {"thread_id": "u"}})
    assert got is not None and put is not None
    assert got.checkpoint["channel_values"] == {"when": datetime.datetime(2025, 1, 2, 3, 4)}
    assert got.checkpoint["x_extra"] == put.checkpoint["x_extra"]  # type: ignore[typeddict-item]
    assert got.metadata == put.metadata and got.metadata["tags"] == ["a"]  # type: ignore[typeddict-item]


def test_import_with_a_serializer_subclass_loads_and_serializes_again(url: str) -> None:
    """Bytes are copied only between plain JsonPlusSerializers: a subclass may encode its
    "msgpack" values otherwise (here: compressed), and a target saver with one must read
    the import back (a datetime in the value: an object, which the byte copy would keep)."""
    import datetime
    import zlib

    from langgraph.checkpoint.base import empty_checkpoint
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    from projections.langgraph_saver import EventStoreSaver, import_checkpoints

    class Zipped(JsonPlusSerializer):
        def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
            t, b = super().dumps_typed(obj)
            return (t, zlib.compress(b)) if t == "msgpack" else (t, b)

        def loads_typed(self, data: tuple[str, bytes]) -> Any:
            t, b = data
            return super().loads_typed((t, zlib.decompress(b)) if t == "msgpack" else data)

    value = {"n": [1, 2], "at": datetime.datetime(2025, 1, 2, 3, 4)}
    source = InMemorySaver()
    checkpoint: Any = empty_checkpoint()
    checkpoint["channel_values"] = {"v": value}
    checkpoint["channel_versions"] = {"v": "1"}
    source.put({"configurable": {"thread_id": "t", "checkpoint_ns": ""}}, checkpoint,
               {"source": "input", "step": -1}, {"v": "1"})
    with EventStore.open(url) as store:
        target = EventStoreSaver(store, serde=Zipped())
        assert import_checkpoints(source, target) == 1
        got = target.get_tuple({"configurable": {"thread_id": "t"}})
    assert got is not None and got.checkpoint["channel_values"] == {"v": value}
