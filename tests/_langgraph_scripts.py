"""Real compiled LangGraph graphs (deterministic nodes, no model calls) and the scenarios the
graph tests run on them, against our savers and against LangGraph's own ``SqliteSaver``.

Also a command line, so that a scenario can stop in one process and go on in another::

    python -m tests._langgraph_scripts ours|sqlite <url> <thread prefix> start|resume

prints the outcome of that phase as one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import operator
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, TypedDict

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, StateSnapshot, interrupt

from eventstore import EventStore
from projections.langgraph_saver import AsyncEventStoreSaver, EventStoreSaver


class State(TypedDict, total=False):
    value: int
    log: Annotated[list[str], operator.add]
    answer: str


# -- graphs ---------------------------------------------------------------------------------------


def approval_graph(saver: BaseCheckpointSaver[Any]) -> CompiledStateGraph[Any, Any, Any, Any]:
    """prepare -> ask (interrupts for an answer) -> finish."""

    def prepare(state: State) -> State:
        return {"value": state.get("value", 0) + 1, "log": ["prepare"]}

    def ask(state: State) -> State:
        answer = interrupt({"question": "approve?", "value": state["value"]})
        return {"answer": str(answer), "log": [f"ask:{answer}"]}

    def finish(state: State) -> State:
        return {"value": state["value"] * 10, "log": [f"finish:{state['answer']}"]}

    g = StateGraph(State)
    g.add_node("prepare", prepare)
    g.add_node("ask", ask)
    g.add_node("finish", finish)
    g.add_edge(START, "prepare")
    g.add_edge("prepare", "ask")
    g.add_edge("ask", "finish")
    g.add_edge("finish", END)
    return g.compile(checkpointer=saver)


def parallel_graph(saver: BaseCheckpointSaver[Any]) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Two branches that each interrupt, then a join."""

    def branch(name: str) -> Any:
        def node(state: State) -> State:
            answer = interrupt({"who": name})
            return {"log": [f"{name}:{answer}"]}
        return node

    def join(state: State) -> State:
        return {"value": len(state["log"]), "log": ["join"]}

    g = StateGraph(State)
    g.add_node("a", branch("a"))
    g.add_node("b", branch("b"))
    g.add_node("join", join)
    g.add_edge(START, "a")
    g.add_edge(START, "b")
    g.add_edge(["a", "b"], "join")
    g.add_edge("join", END)
    return g.compile(checkpointer=saver)


def linear_graph(saver: BaseCheckpointSaver[Any]) -> CompiledStateGraph[Any, Any, Any, Any]:
    """a -> b -> c, each adding to the value and the log."""

    def step(name: str, add: int) -> Any:
        def node(state: State) -> State:
            return {"value": state.get("value", 0) + add, "log": [name]}
        return node

    g = StateGraph(State)
    for name, add in (("a", 1), ("b", 10), ("c", 100)):
        g.add_node(name, step(name, add))
    g.add_edge(START, "a")
    g.add_edge("a", "b")
    g.add_edge("b", "c")
    g.add_edge("c", END)
    return g.compile(checkpointer=saver)


# -- savers ---------------------------------------------------------------------------------------


class Big(TypedDict, total=False):
    doc: str
    notes: Annotated[list[str], operator.add]


def big_graph(saver: BaseCheckpointSaver[Any]) -> CompiledStateGraph[Any, Any, Any, Any]:
    """One node that writes a 6 kB document and a 6 kB note in one step."""
    def grow(state: Big) -> Big:
        return {"doc": "D" * 6000, "notes": ["n" * 6000]}

    g = StateGraph(Big)
    g.add_node("grow", grow)
    g.add_edge(START, "grow")
    g.add_edge("grow", END)
    return g.compile(checkpointer=saver)


@contextlib.contextmanager
def open_saver(kind: str, url: str) -> Iterator[BaseCheckpointSaver[Any]]:
    """``ours``: EventStoreSaver on the store at ``url``; ``sqlite``: SqliteSaver on the file."""
    if kind == "ours":
        with EventStore.open(url, migrate=True) as store:
            yield EventStoreSaver(store)
    elif kind == "sqlite":
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), check_same_thread=False)
        try:
            yield SqliteSaver(conn)
        finally:
            conn.close()
    else:
        raise ValueError(kind)


@contextlib.asynccontextmanager
async def open_async_saver(url: str) -> AsyncIterator[AsyncEventStoreSaver]:
    from eventstore.aio import AsyncEventStore

    store = await AsyncEventStore.open(url, migrate=True)
    try:
        yield AsyncEventStoreSaver(store)
    finally:
        await store.close()


def cfg(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id}}


# -- outcomes, without ids and timestamps (they differ from run to run) -----------------------


def interrupts(items: Any) -> list[Any]:
    return sorted((i.value for i in items), key=json.dumps)


def snapshot(s: StateSnapshot) -> dict[str, Any]:
    return {
        "values": s.values, "next": list(s.next),
        "step": s.metadata.get("step") if s.metadata else None,
        "source": s.metadata.get("source") if s.metadata else None,
        "interrupts": interrupts(s.interrupts),
        "has_parent": s.parent_config is not None,
        "tasks": sorted(t.name for t in s.tasks),
    }


def result(out: dict[str, Any]) -> dict[str, Any]:
    values = {k: v for k, v in out.items() if k != "__interrupt__"}
    return {"values": values, "interrupts": interrupts(out.get("__interrupt__", ()))}


# -- scenarios ------------------------------------------------------------------------------------


def start(saver: BaseCheckpointSaver[Any], prefix: str) -> dict[str, Any]:
    """Run both interrupting graphs up to their interrupts."""
    one = approval_graph(saver).invoke({"value": 4}, cfg(prefix + "-approval"))
    two = parallel_graph(saver).invoke({"log": []}, cfg(prefix + "-parallel"))
    return {"approval": result(one), "parallel": result(two)}


def resume(saver: BaseCheckpointSaver[Any], prefix: str) -> dict[str, Any]:
    """Resume both: the single interrupt with a value, the parallel ones each by its id."""
    approval = approval_graph(saver)
    pending = approval.get_state(cfg(prefix + "-approval"))
    one = approval.invoke(Command(resume="yes"), cfg(prefix + "-approval"))
    parallel = parallel_graph(saver)
    waiting = parallel.get_state(cfg(prefix + "-parallel"))
    by_id = {i.id: f"ok-{i.value['who']}" for i in waiting.interrupts}
    two = parallel.invoke(Command(resume=by_id), cfg(prefix + "-parallel"))
    history = [snapshot(s) for s in approval.get_state_history(cfg(prefix + "-approval"))]
    return {"pending": snapshot(pending), "approval": result(one),
            "waiting": snapshot(waiting), "ids": len(by_id), "parallel": result(two),
            "history": history}


def time_travel(saver: BaseCheckpointSaver[Any], thread_id: str) -> dict[str, Any]:
    """History, a replay from an earlier checkpoint, and a fork through update_state."""
    graph = linear_graph(saver)
    config = cfg(thread_id)
    first = graph.invoke({"value": 0, "log": []}, config)
    history = list(graph.get_state_history(config))
    before_b = next(s for s in history if s.next == ("b",))
    replayed = graph.invoke(None, before_b.config)
    after_replay = [snapshot(s) for s in graph.get_state_history(config)]
    forked_config = graph.update_state(before_b.config, {"value": 1000, "log": ["edit"]})
    fork_state = graph.get_state(forked_config)
    forked = graph.invoke(None, forked_config)
    final = list(graph.get_state_history(config))
    return {
        "first": first, "history": [snapshot(s) for s in history],
        "replayed": replayed, "after_replay": after_replay,
        "fork_state": snapshot(fork_state), "forked": forked,
        "fork_parent_is_before_b": (fork_state.parent_config or {}).get("configurable", {})
        .get("checkpoint_id") == before_b.config["configurable"]["checkpoint_id"],
        "final": [snapshot(s) for s in final],
        "latest": snapshot(graph.get_state(config)),
    }


async def atime_travel(saver: BaseCheckpointSaver[Any], thread_id: str) -> dict[str, Any]:
    """:func:`time_travel` through the graph's asyncio API."""
    graph = linear_graph(saver)
    config = cfg(thread_id)
    first = await graph.ainvoke({"value": 0, "log": []}, config)
    history = [s async for s in graph.aget_state_history(config)]
    before_b = next(s for s in history if s.next == ("b",))
    replayed = await graph.ainvoke(None, before_b.config)
    after_replay = [snapshot(s) async for s in graph.aget_state_history(config)]
    forked_config = await graph.aupdate_state(before_b.config, {"value": 1000, "log": ["edit"]})
    fork_state = await graph.aget_state(forked_config)
    forked = await graph.ainvoke(None, forked_config)
    final = [s async for s in graph.aget_state_history(config)]
    return {
        "first": first, "history": [snapshot(s) for s in history],
        "replayed": replayed, "after_replay": after_replay,
        "fork_state": snapshot(fork_state), "forked": forked,
        "fork_parent_is_before_b": (fork_state.parent_config or {}).get("configurable", {})
        .get("checkpoint_id") == before_b.config["configurable"]["checkpoint_id"],
        "final": [snapshot(s) for s in final],
        "latest": snapshot(await graph.aget_state(config)),
    }


def main(argv: list[str]) -> int:
    kind, url, prefix, phase = argv
    with open_saver(kind, url) as saver:
        out = start(saver, prefix) if phase == "start" else resume(saver, prefix)
    print(json.dumps(out, default=repr))
    return 0



if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
