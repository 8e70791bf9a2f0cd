"""LangGraph features beyond the basic graph tests, on real compiled graphs (deterministic
nodes, no model calls): each scenario runs on our saver and on LangGraph's own ``SqliteSaver``
(``AsyncSqliteSaver`` for the asyncio ones), and the outcomes must be equal.

Covered: subgraphs (an interrupt inside, ``get_state(subgraphs=True)``, the subgraph
namespace's history and a past checkpoint of it, ``update_state`` into it, time travel to
where it was interrupted, a subgraph with ``checkpointer=True`` keeping its state across
runs, two levels of nesting with ``Command.PARENT``, two subgraphs interrupting in parallel,
``Send`` to a subgraph), the three durability modes, a ``Send`` map-reduce whose failed branch
alone runs again, ``RetryPolicy``, ``update_state(as_node=...)``, ``Command(goto, update)``,
``stream`` with several modes and ``subgraphs=True``, static breakpoints, the functional API
(``@entrypoint``/``@task``: done tasks are not run again on resume, ``previous``), messages,
``DeltaChannel`` (rebuilt from ancestors' writes, forked), two savers on one database driving
one thread by turns.

Checkpoint, task and interrupt ids and timestamps differ from saver to saver: outcomes are
compared with each id replaced by its order of first appearance (so the shape of parent links,
task and interrupt ids is compared, not their values).

History comparisons of graphs with a join (a ``NamedBarrierValue`` channel) run with
``durability="sync"``: with the default ``"async"`` LangGraph hands the saver a checkpoint
whose barrier set the next step goes on filling, so what is saved depends on how fast the
saver is (it differs between runs on ``SqliteSaver`` too).
"""

from __future__ import annotations

import asyncio
import dataclasses
import operator
import re
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

import pytest
from langchain_core.messages import AIMessage, HumanMessage, RemoveMessage, ToolMessage
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.func import entrypoint, task
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.types import Command, RetryPolicy, Send, interrupt

from eventstore import EventStore
from projections.langgraph_saver import EventStoreSaver
from tests import _langgraph_scripts as scripts
from tests._langgraph_scripts import cfg, result

Saver = BaseCheckpointSaver[Any]

# -- comparing outcomes ---------------------------------------------------------------------------

_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
                 r"|\b[0-9a-f]{32}\b")
_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00")


def canonical(obj: Any) -> Any:
    """``obj`` as plain data, each checkpoint/task/interrupt id replaced by ``<n>`` in order of
    first appearance, timestamps by ``<ts>``; LangGraph's internal ``__pregel_*`` config keys
    left out (``SqliteSaver`` hands back the config it was given, with them)."""
    ids: dict[str, str] = {}

    def text(s: str) -> str:
        s = _ID.sub(lambda m: ids.setdefault(m.group(0), f"<{len(ids)}>"), s)
        return _TS.sub("<ts>", s)

    def walk(o: Any) -> Any:
        if isinstance(o, str):
            return text(o)
        if isinstance(o, bool | int | float) or o is None:
            return o
        if isinstance(o, dict):
            return {walk(k): walk(v) for k, v in o.items()
                    if not (isinstance(k, str) and k.startswith("__pregel_"))}
        if hasattr(o, "_asdict"):  # StateSnapshot, PregelTask
            return {"_t": type(o).__name__, **{k: walk(v) for k, v in o._asdict().items()}}
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return {"_t": type(o).__name__,
                    **{f.name: walk(getattr(o, f.name)) for f in dataclasses.fields(o)}}
        if isinstance(o, list | tuple):
            return [walk(x) for x in o]
        if isinstance(o, set | frozenset):
            return sorted(walk(x) for x in o)
        if hasattr(o, "__dict__"):
            return {"_t": type(o).__name__, **{k: walk(v) for k, v in vars(o).items()}}
        return text(repr(o))

    return walk(obj)


def steps(history: list[Any]) -> list[tuple[Any, str, list[str]]]:
    return [(s.metadata["step"], s.metadata["source"], list(s.next)) for s in history]


# -- graphs ---------------------------------------------------------------------------------------


class S(TypedDict, total=False):
    value: int
    log: Annotated[list[str], operator.add]
    answer: str


class Log(TypedDict, total=False):
    log: Annotated[list[str], operator.add]


def sub_builder() -> StateGraph[Any]:
    """s_prep -> s_ask (interrupts) -> s_done."""
    def s_prep(st: S) -> S:
        return {"value": st.get("value", 0) + 1, "log": ["s_prep"]}

    def s_ask(st: S) -> S:
        a = interrupt({"q": "sub?", "value": st["value"]})
        return {"answer": str(a), "log": [f"s_ask:{a}"]}

    def s_done(st: S) -> S:
        return {"value": st["value"] * 2, "log": ["s_done"]}

    g = StateGraph(S)
    g.add_node("s_prep", s_prep)
    g.add_node("s_ask", s_ask)
    g.add_node("s_done", s_done)
    g.add_edge(START, "s_prep")
    g.add_edge("s_prep", "s_ask")
    g.add_edge("s_ask", "s_done")
    g.add_edge("s_done", END)
    return g


def parent_graph(saver: Saver) -> Any:
    """p_start -> child (the compiled subgraph above, as a node) -> p_end."""
    g = StateGraph(S)
    g.add_node("p_start", lambda st: {"log": ["p_start"]})
    g.add_node("child", sub_builder().compile())
    g.add_node("p_end", lambda st: {"value": st["value"] + 100, "log": ["p_end"]})
    g.add_edge(START, "p_start")
    g.add_edge("p_start", "child")
    g.add_edge("child", "p_end")
    g.add_edge("p_end", END)
    return g.compile(checkpointer=saver)


def log_sub() -> Any:
    """A subgraph on ``log`` alone (so that several run in one step): l_pre -> l_ask."""
    def l_ask(st: Log) -> Log:
        a = interrupt({"q": "which?", "seen": len(st.get("log", []))})
        return {"log": [f"l_ask:{a}"]}

    g = StateGraph(Log)
    g.add_node("l_pre", lambda st: {"log": ["l_pre"]})
    g.add_node("l_ask", l_ask)
    g.add_edge(START, "l_pre")
    g.add_edge("l_pre", "l_ask")
    g.add_edge("l_ask", END)
    return g.compile()


def ns_config(thread_id: str, snapshot: Any) -> Any:
    return {"configurable": {"thread_id": thread_id,
                             "checkpoint_ns": snapshot.config["configurable"]["checkpoint_ns"]}}


# -- scenarios (each returns its outcome) ---------------------------------------------------------


def subgraph_interrupt(saver: Saver) -> dict[str, Any]:
    """An interrupt inside a subgraph: parent and subgraph state, histories, resume."""
    g = parent_graph(saver)
    c = cfg("sub")
    out: dict[str, Any] = {"first": g.invoke({"value": 1, "log": []}, c)}
    state = g.get_state(c)
    out["state"] = state
    out["state_subgraphs"] = deep = g.get_state(c, subgraphs=True)
    sub_c = state.tasks[0].state  # without subgraphs=True: the subgraph's config
    out["sub_state"] = g.get_state(sub_c)
    out["parent_history"] = list(g.get_state_history(c))
    out["sub_history"] = sub_history = list(g.get_state_history(sub_c))
    out["sub_at_first"] = g.get_state(sub_history[-1].config)  # a past subgraph checkpoint
    out["sub_at_latest"] = g.get_state(deep.tasks[0].state.config)
    out["final"] = g.invoke(Command(resume="yes"), c)
    out["parent_history_after"] = list(g.get_state_history(c))
    out["sub_history_after"] = list(g.get_state_history(sub_c))
    out["listed"] = len(list(saver.list(c)))  # every namespace of the thread
    out["after"] = g.get_state(c, subgraphs=True)
    return out


def subgraph_stream(saver: Saver) -> dict[str, Any]:
    """stream(stream_mode=[updates, values], subgraphs=True) through an interrupt."""
    g = parent_graph(saver)
    c = cfg("stream")
    modes: Any = ["updates", "values"]
    return {"start": list(g.stream({"value": 1, "log": []}, c, stream_mode=modes,
                                   subgraphs=True)),
            "resume": list(g.stream(Command(resume="ok"), c, stream_mode=modes,
                                    subgraphs=True))}


def subgraph_update_and_travel(saver: Saver) -> dict[str, Any]:
    """update_state into the interrupted subgraph; then back to where it was interrupted."""
    g = parent_graph(saver)
    c = cfg("subupd")
    g.invoke({"value": 1, "log": []}, c)
    sub_c = ns_config("subupd", g.get_state(c, subgraphs=True).tasks[0].state)
    out: dict[str, Any] = {"updated": g.update_state(sub_c, {"value": 50, "log": ["edited"]})}
    out["state"] = g.get_state(c, subgraphs=True)
    out["final"] = g.invoke(Command(resume="after-edit"), c)
    out["sub_history"] = sub_history = list(g.get_state_history(sub_c))
    out["filtered"] = list(g.get_state_history(sub_c, filter={"source": "update"}))
    out["before"] = list(g.get_state_history(sub_c, before=sub_history[1].config, limit=2))
    at_child = next(s for s in g.get_state_history(c) if s.next == ("child",))
    out["at_child"] = g.get_state(at_child.config, subgraphs=True)
    out["fork"] = g.invoke(Command(resume="second"), at_child.config)
    out["replay"] = g.invoke(None, at_child.config)
    out["history"] = list(g.get_state_history(c))
    out["latest"] = g.get_state(c, subgraphs=True)
    return out


def persistent_subgraph(saver: Saver) -> dict[str, Any]:
    """Subgraphs compiled with checkpointer=True keep their state from run to run."""
    counter = StateGraph(S)
    counter.add_node("count", lambda st: {"value": st.get("value", 0) + 1,
                                          "log": [f"c{st.get('value', 0)}"]})
    counter.add_edge(START, "count")
    counter.add_edge("count", END)
    inner = counter.compile(checkpointer=True)

    def call(st: S) -> S:  # a subgraph invoked from inside a node
        r = inner.invoke({"log": ["in"]})
        return {"log": [f"sub={r['value']}:{','.join(r['log'])}"]}

    g = StateGraph(S)
    g.add_node("call", call)
    g.add_edge(START, "call")
    g.add_edge("call", END)
    calling = g.compile(checkpointer=saver)
    c = cfg("persist-call")
    out: dict[str, Any] = {"runs": [calling.invoke({"log": [f"run{i}"]}, c) for i in range(3)]}
    out["state"] = calling.get_state(c, subgraphs=True)
    out["inner"] = [(t.metadata, t.checkpoint["channel_values"]) for t in saver.list(
        {"configurable": {"thread_id": "persist-call", "checkpoint_ns": "call"}})]

    g = StateGraph(S)  # ... and as a node, interrupting
    g.add_node("child", sub_builder().compile(checkpointer=True))
    g.add_edge(START, "child")
    g.add_edge("child", END)
    node = g.compile(checkpointer=saver)
    c = cfg("persist-node")
    out["r1"] = node.invoke({"value": 1, "log": []}, c)
    out["s1"] = node.get_state(c, subgraphs=True)
    out["r2"] = node.invoke(Command(resume="A"), c)
    out["r3"] = node.invoke({"value": 5, "log": ["again"]}, c)
    out["s3"] = node.get_state(c, subgraphs=True)
    out["r4"] = node.invoke(Command(resume="B"), c)
    out["history"] = list(node.get_state_history(c))
    out["child_history"] = list(node.get_state_history(
        {"configurable": {"thread_id": "persist-node", "checkpoint_ns": "child"}}))
    return out


def nested_parent_command(saver: Saver) -> dict[str, Any]:
    """An interrupt two subgraphs deep; after it, Command(graph=PARENT) jumps in the parent."""
    def gc_ask(st: S) -> S:
        return {"log": [f"gc:{interrupt({'level': 'grandchild', 'v': st.get('value')})}"]}

    grand = StateGraph(S)
    grand.add_node("gc_ask", gc_ask)
    grand.add_edge(START, "gc_ask")
    grand.add_edge("gc_ask", END)

    def c_jump(st: S) -> Command[Any]:
        return Command(graph=Command.PARENT, goto="p_alt", update={"log": ["jump"]})

    child = StateGraph(S)
    child.add_node("c_pre", lambda st: {"log": ["c_pre"], "value": 3})
    child.add_node("grand", grand.compile())
    child.add_node("c_jump", c_jump)
    child.add_edge(START, "c_pre")
    child.add_edge("c_pre", "grand")
    child.add_edge("grand", "c_jump")
    top = StateGraph(S)
    top.add_node("child", child.compile())
    top.add_node("p_alt", lambda st: {"log": ["p_alt"]})
    top.add_edge(START, "child")
    top.add_edge("p_alt", END)
    g = top.compile(checkpointer=saver)
    c = cfg("nest")
    modes: Any = ["updates", "values"]
    out: dict[str, Any] = {
        "first": list(g.stream({"log": []}, c, stream_mode=modes, subgraphs=True))}
    out["state"] = state = g.get_state(c, subgraphs=True)
    child_state = state.tasks[0].state
    grand_state = child_state.tasks[0].state
    out["grand_state"] = g.get_state(grand_state.config)
    out["child_history"] = list(g.get_state_history(ns_config("nest", child_state)))
    out["grand_history"] = list(g.get_state_history(ns_config("nest", grand_state)))
    out["resume"] = list(g.stream(Command(resume="deep"), c, stream_mode=modes, subgraphs=True))
    out["final"] = g.get_state(c, subgraphs=True)
    out["history"] = list(g.get_state_history(c))
    out["depths"] = sorted(Counter(t.config["configurable"]["checkpoint_ns"].count("|")
                                   for t in saver.list(c)).items())
    return out


def parallel_subgraphs(saver: Saver) -> dict[str, Any]:
    """Two subgraphs interrupting in one step, resumed one by id, then the other; and Send
    to a subgraph (two calls of it, each interrupting)."""
    g = StateGraph(Log)
    g.add_node("c1", log_sub())
    g.add_node("c2", log_sub())
    g.add_node("join", lambda st: {"log": ["join"]})
    g.add_edge(START, "c1")
    g.add_edge(START, "c2")
    g.add_edge(["c1", "c2"], "join")
    g.add_edge("join", END)
    graph = g.compile(checkpointer=saver)
    c = cfg("par")
    # (invoke's output lists the interrupts in the order the branches reached them, which
    # varies: kept without their ids, sorted)
    out: dict[str, Any] = {"first": result(graph.invoke({"log": []}, c, durability="sync"))}
    out["state"] = state = graph.get_state(c, subgraphs=True)
    c1 = next(t for t in state.tasks if t.name == "c1").interrupts[0].id
    out["partial"] = result(graph.invoke(Command(resume={c1: "only"}), c, durability="sync"))
    out["mid"] = graph.get_state(c, subgraphs=True)
    rest = {i.id: "rest" for i in graph.get_state(c).interrupts}
    out["final"] = graph.invoke(Command(resume=rest), c, durability="sync")
    out["history"] = list(graph.get_state_history(c))

    g = StateGraph(Log)
    g.add_node("fan", lambda st: {"log": ["fan"]})
    g.add_node("child", log_sub())
    g.add_edge(START, "fan")
    g.add_conditional_edges("fan", lambda st: [Send("child", {"log": [f"v{v}"] * v})
                                               for v in (1, 2)], ["child"])
    g.add_edge("child", END)
    sent = g.compile(checkpointer=saver)
    c = cfg("sent")
    out["sent_first"] = result(sent.invoke({"log": []}, c, durability="sync"))
    out["sent_state"] = state = sent.get_state(c, subgraphs=True)
    out["sent_final"] = sent.invoke(
        Command(resume={i.id: f"v{i.value['seen']}" for i in state.interrupts}), c,
        durability="sync")
    out["sent_history"] = list(sent.get_state_history(c))
    return out


def durability_modes(saver: Saver) -> dict[str, Any]:
    """invoke(durability=sync|async|exit) up to an interrupt, then resume in the same mode."""
    out: dict[str, Any] = {}
    for mode in ("sync", "async", "exit"):
        g = scripts.approval_graph(saver)
        c = cfg(f"durability-{mode}")
        out[f"{mode}_first"] = g.invoke({"value": 3}, c, durability=mode)
        out[f"{mode}_state"] = g.get_state(c)
        out[f"{mode}_final"] = g.invoke(Command(resume="ok"), c, durability=mode)
        out[f"{mode}_history"] = list(g.get_state_history(c))
    return out


class MapState(TypedDict, total=False):
    value: int
    log: Annotated[list[str], operator.add]
    items: list[int]
    results: Annotated[list[int], operator.add]


def map_reduce_graph(saver: Saver, work: Callable[[dict[str, int]], Any]) -> Any:
    g = StateGraph(MapState)
    g.add_node("plan", lambda st: {"log": ["plan"]})
    g.add_node("work", work)
    g.add_node("reduce", lambda st: {"value": sum(st["results"]), "log": ["reduce"]})
    g.add_edge(START, "plan")
    g.add_conditional_edges("plan", lambda st: [Send("work", {"k": k}) for k in st["items"]],
                            ["work"])
    g.add_edge("work", "reduce")
    g.add_edge("reduce", END)
    return g.compile(checkpointer=saver)


def map_reduce_failure(saver: Saver) -> dict[str, Any]:
    """One of four Send branches fails the first time: the others' writes are kept as
    pending writes, and invoke(None) runs the failed one alone.  (One branch at a time, the
    failing one last: with branches at once, whether a branch still running when another
    fails gets to finish depends on timing.)"""
    calls: Counter[int] = Counter()

    def work(arg: dict[str, int]) -> MapState:
        calls[arg["k"]] += 1
        if arg["k"] == 2 and calls[2] == 1:
            raise RuntimeError("boom 2")
        return {"results": [arg["k"] ** 2]}

    g = map_reduce_graph(saver, work)
    c: Any = {**cfg("fan"), "max_concurrency": 1}
    out: dict[str, Any] = {}
    with pytest.raises(RuntimeError, match="boom 2"):
        g.invoke({"items": [0, 1, 3, 2], "results": []}, c)
    out["state"] = g.get_state(c)
    saved = saver.get_tuple(c)
    assert saved is not None
    out["pending"] = sorted((ch, repr(v)) for _t, ch, v in saved.pending_writes or ())
    out["calls_after_failure"] = dict(sorted(calls.items()))
    out["final"] = g.invoke(None, c)
    out["calls"] = dict(sorted(calls.items()))
    out["history"] = list(g.get_state_history(c))
    return out


def retry_policy(saver: Saver) -> dict[str, Any]:
    """A node with a RetryPolicy that succeeds at its third attempt, and one that never does."""
    calls: Counter[str] = Counter()

    def flaky(st: S) -> S:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ValueError("transient")
        return {"value": 7, "log": ["flaky"]}

    def always(st: S) -> S:
        calls["always"] += 1
        raise ValueError("nope")

    out: dict[str, Any] = {}
    for name, fn, attempts in (("flaky", flaky, 3), ("always", always, 2)):
        g = StateGraph(S)
        g.add_node("first", lambda st: {"log": ["first"]})
        g.add_node(name, fn, retry_policy=RetryPolicy(max_attempts=attempts,
                                                      initial_interval=0.001, jitter=False))
        g.add_edge(START, "first")
        g.add_edge("first", name)
        g.add_edge(name, END)
        graph = g.compile(checkpointer=saver)
        c = cfg(f"retry-{name}")
        try:
            out[f"{name}_result"] = graph.invoke({"log": []}, c)
        except ValueError as e:
            out[f"{name}_result"] = f"raised {e}"
        out[f"{name}_state"] = graph.get_state(c)
        out[f"{name}_history"] = list(graph.get_state_history(c))
    out["calls"] = dict(calls)
    return out


def as_node_and_goto(saver: Saver) -> dict[str, Any]:
    """update_state(as_node=...) past an interrupt and after a finished run; nodes returning
    Command(goto, update); stream with updates/values/checkpoints/tasks/debug modes."""
    g = scripts.approval_graph(saver)
    c = cfg("as-node")
    out: dict[str, Any] = {"first": g.invoke({"value": 2}, c)}
    out["updated"] = g.update_state(c, {"answer": "manual", "log": ["manual"]}, as_node="ask")
    out["after_update"] = g.get_state(c)
    out["final"] = g.invoke(None, c)
    out["history"] = list(g.get_state_history(c))
    lin = scripts.linear_graph(saver)
    c = cfg("as-node-linear")
    lin.invoke({"value": 0, "log": []}, c)
    lin.update_state(c, {"value": 5, "log": ["x"]}, as_node="a")
    out["linear_state"] = lin.get_state(c)
    out["linear_final"] = lin.invoke(None, c)
    out["linear_history"] = list(lin.get_state_history(c))

    def router(st: S) -> Command[Literal["left", "right"]]:
        return Command(goto="right" if st["value"] > 5 else "left",
                       update={"log": ["router"], "value": st["value"] + 1})

    def right(st: S) -> Command[Literal["ask"]]:
        return Command(goto="ask", update={"log": ["right"]})

    def ask(st: S) -> Command[Any]:
        a = interrupt("go?")
        return Command(goto=END, update={"answer": a, "log": [f"ask:{a}"]})

    b = StateGraph(S)
    b.add_node("router", router)
    b.add_node("left", lambda st: {"log": ["left"]})
    b.add_node("right", right)
    b.add_node("ask", ask)
    b.add_edge(START, "router")
    b.add_edge("left", END)
    graph = b.compile(checkpointer=saver)
    modes: Any = ["updates", "values", "checkpoints", "tasks"]
    out["left"] = list(graph.stream({"value": 1}, cfg("goto-left"), stream_mode=modes))
    c = cfg("goto-right")
    out["right"] = list(graph.stream({"value": 9}, c, stream_mode=modes))
    out["right_state"] = graph.get_state(c)
    out["resumed"] = list(graph.stream(Command(resume="y", update={"log": ["resume-update"]}),
                                       c, stream_mode=["updates", "values", "debug"]))
    out["right_history"] = list(graph.get_state_history(c))
    return out


def breakpoints(saver: Saver) -> dict[str, Any]:
    """interrupt_before / interrupt_after, an update_state at the breakpoint, and a subgraph
    compiled with interrupt_before."""
    b = StateGraph(scripts.State)
    for name, add in (("a", 1), ("b", 10), ("c", 100)):
        b.add_node(name, (lambda n, a: lambda st: {"value": st.get("value", 0) + a,
                                                   "log": [n]})(name, add))
    b.add_edge(START, "a")
    b.add_edge("a", "b")
    b.add_edge("b", "c")
    b.add_edge("c", END)
    g = b.compile(checkpointer=saver, interrupt_before=["b"], interrupt_after=["c"])
    c = cfg("breakpoints")
    out: dict[str, Any] = {"r1": g.invoke({"value": 0, "log": []}, c), "s1": g.get_state(c)}
    g.update_state(c, {"value": 500})
    out["r2"] = g.invoke(None, c)
    out["s2"] = g.get_state(c)
    out["r3"] = g.invoke(None, c)
    out["history"] = list(g.get_state_history(c))
    p = StateGraph(S)
    p.add_node("child", sub_builder().compile(interrupt_before=["s_done"]))
    p.add_edge(START, "child")
    p.add_edge("child", END)
    pg = p.compile(checkpointer=saver)
    c = cfg("breakpoints-sub")
    out["p1"] = pg.invoke({"value": 1, "log": []}, c)
    out["p2"] = pg.invoke(Command(resume="x"), c)
    out["ps2"] = pg.get_state(c, subgraphs=True)
    out["p3"] = pg.invoke(None, c)
    out["p_history"] = list(pg.get_state_history(c))
    return out


def functional_api(saver: Saver) -> dict[str, Any]:
    """@entrypoint with @task calls and an interrupt: on resume the done tasks' results come
    from the saved writes (not run again); entrypoint.final with previous."""
    calls: Counter[int] = Counter()

    @task
    def times_ten(x: int) -> int:
        calls[x] += 1
        return x * 10

    @entrypoint(checkpointer=saver)
    def workflow(inp: dict[str, list[int]]) -> dict[str, Any]:
        values = [f.result() for f in [times_ten(i) for i in inp["xs"]]]
        answer = interrupt({"values": values})
        return {"values": values, "answer": answer, "more": times_ten(99).result()}

    c = cfg("func")
    out: dict[str, Any] = {"first": workflow.invoke({"xs": [1, 2, 3]}, c)}
    out["state"] = workflow.get_state(c)
    out["calls_first"] = dict(sorted(calls.items()))
    out["final"] = workflow.invoke(Command(resume="fine"), c)
    out["calls"] = dict(sorted(calls.items()))
    out["history"] = list(workflow.get_state_history(c))

    @entrypoint(checkpointer=saver)
    def running_total(n: int, *, previous: int | None = None) -> entrypoint.final[int, int]:
        total = (previous or 0) + n
        return entrypoint.final(value=total, save=total * 2)

    out["previous"] = [running_total.invoke(i, cfg("func-previous")) for i in (1, 2, 3)]
    return out


def messages(saver: Saver) -> dict[str, Any]:
    """MessagesState: AI tool calls, a tool message, a human review interrupt, RemoveMessage."""
    def agent(st: MessagesState) -> dict[str, Any]:
        n = len(st["messages"])
        if n == 1:
            return {"messages": [AIMessage(content="", id="ai1", tool_calls=[
                {"name": "lookup", "args": {"q": "x"}, "id": "call1"}])]}
        return {"messages": [AIMessage(content=f"done after {n}", id=f"ai{n}")]}

    def review(st: MessagesState) -> dict[str, Any]:
        ok = interrupt({"last": st["messages"][-1].content})
        return {"messages": [HumanMessage(content=f"review:{ok}", id="h2"),
                             RemoveMessage(id="tm1")]}

    g = StateGraph(MessagesState)
    g.add_node("agent", agent)
    g.add_node("tools", lambda st: {"messages": [ToolMessage(content="42", tool_call_id="call1",
                                                             id="tm1")]})
    g.add_node("review", review)
    g.add_edge(START, "agent")
    g.add_conditional_edges(
        "agent", lambda st: "tools" if st["messages"][-1].tool_calls else "review",
        ["tools", "review"])
    g.add_edge("tools", "agent")
    g.add_edge("review", END)
    graph = g.compile(checkpointer=saver)
    c = cfg("messages")
    out: dict[str, Any] = {"r1": graph.invoke({"messages": [HumanMessage(content="hi", id="h1")]},
                                              c)}
    out["r2"] = graph.invoke(Command(resume="ok"), c)
    out["history"] = list(graph.get_state_history(c))
    out["types"] = [type(m).__name__ for m in graph.get_state(c).values["messages"]]
    return out


def _concat(current: list[str], batches: list[list[str]]) -> list[str]:
    out = list(current)
    for b in batches:
        out.extend(b)
    return out


class DeltaState(TypedDict, total=False):
    n: int
    items: Annotated[list[str], DeltaChannel(_concat, snapshot_frequency=3)]
    log: Annotated[list[str], operator.add]


def delta_graph(saver: Saver) -> Any:
    """head -> x, y, z in parallel -> gate (interrupts at n == 4) -> head ..., 7 rounds, all
    appending to a DeltaChannel (stored as writes, a snapshot every third update)."""
    def head(st: DeltaState) -> DeltaState:
        return {"n": st.get("n", 0) + 1, "items": [f"h{st.get('n', 0)}"]}

    def branch(name: str) -> Callable[[DeltaState], DeltaState]:
        return lambda st: {"items": [f"{name}{st['n']}"]}

    def gate(st: DeltaState) -> DeltaState:
        if st["n"] == 4:
            a = interrupt({"n": st["n"], "len": len(st["items"])})
            return {"items": [f"ans:{a}"], "log": [f"gate:{a}"]}
        return {"log": ["gate"]}

    g = StateGraph(DeltaState)
    g.add_node("head", head)
    for name in ("x", "y", "z"):
        g.add_node(name, branch(name))
        g.add_edge("head", name)
    g.add_node("gate", gate)
    g.add_edge(["x", "y", "z"], "gate")
    g.add_edge(START, "head")
    g.add_conditional_edges("gate", lambda st: "head" if st["n"] < 7 else END, ["head", END])
    return g.compile(checkpointer=saver)


def delta_channel(saver: Saver) -> dict[str, Any]:
    """A DeltaChannel's value in every checkpoint of the history (rebuilt from the ancestors'
    writes in LangGraph's order), with durability sync and exit, and after a fork."""
    out: dict[str, Any] = {}
    for mode in ("sync", "exit"):
        g = delta_graph(saver)
        c = cfg(f"delta-{mode}")
        out[f"{mode}_first"] = g.invoke({"n": 0, "items": ["seed"]}, c, durability=mode)
        out[f"{mode}_state"] = g.get_state(c)
        out[f"{mode}_final"] = g.invoke(Command(resume="ok"), c, durability=mode)
        out[f"{mode}_history"] = list(g.get_state_history(c))
    mid = next(s for s in out["sync_history"]
               if s.values.get("n") == 2 and s.next == ("x", "y", "z"))
    g = delta_graph(saver)
    c = cfg("delta-sync")
    fork = g.update_state(mid.config, {"items": ["EDIT"]}, as_node="head")
    out["fork_state"] = g.get_state(fork)
    out["forked"] = g.invoke(None, fork, durability="sync")
    out["fork_resumed"] = g.invoke(Command(resume="again"), c, durability="sync")
    out["after_fork"] = list(g.get_state_history(c))
    out["mid_again"] = g.get_state(mid.config)
    return out


SCENARIOS: dict[str, Callable[[Saver], dict[str, Any]]] = {
    f.__name__: f for f in (
        subgraph_interrupt, subgraph_stream, subgraph_update_and_travel, persistent_subgraph,
        nested_parent_command, parallel_subgraphs, durability_modes, map_reduce_failure,
        retry_policy, as_node_and_goto, breakpoints, functional_api, messages, delta_channel)}

_reference: dict[str, Any] = {}


def reference(name: str) -> Any:
    """The scenario's outcome on SqliteSaver (once per test session)."""
    if name not in _reference:
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            _reference[name] = canonical(SCENARIOS[name](SqliteSaver(conn)))
        finally:
            conn.close()
    return _reference[name]


# -- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_matches_sqlite_saver(url: str, name: str) -> None:
    with EventStore.open(url, migrate=True) as store:
        ours = canonical(SCENARIOS[name](EventStoreSaver(store)))
    assert ours == reference(name)


def test_outcomes_checked_in_their_own_right(url: str) -> None:
    """What the comparisons rest on, asserted on our saver (so that a change in LangGraph
    that makes both savers go wrong the same way does not go unnoticed)."""
    with EventStore.open(url, migrate=True) as store:
        saver = EventStoreSaver(store)
        sub = subgraph_interrupt(saver)
        fan = map_reduce_failure(saver)
        func = functional_api(saver)
        persist = persistent_subgraph(saver)
        delta = delta_channel(saver)
        durable = durability_modes(saver)
    assert sub["state_subgraphs"].tasks[0].state.values == {"value": 2,
                                                            "log": ["p_start", "s_prep"]}
    assert sub["state"].tasks[0].state["configurable"]["checkpoint_ns"].startswith("child:")
    assert steps(sub["sub_history"]) == [(1, "loop", ["s_ask"]), (0, "loop", ["s_prep"]),
                                         (-1, "input", ["__start__"])]
    assert sub["final"] == {"value": 104, "answer": "yes", "log": [
        "p_start", "p_start", "s_prep", "s_ask:yes", "s_done", "p_end"]}
    # The failed branch alone ran again; the others' results came from the pending writes.
    assert fan["calls_after_failure"] == {0: 1, 1: 1, 2: 1, 3: 1}
    assert fan["calls"] == {0: 1, 1: 1, 2: 2, 3: 1}
    assert fan["final"]["results"] == [0, 1, 9, 4] and fan["final"]["value"] == 14
    assert func["calls_first"] == {1: 1, 2: 1, 3: 1}
    assert func["calls"] == {1: 1, 2: 1, 3: 1, 99: 1}
    assert func["previous"] == [1, 4, 11]
    assert [r["log"][-1] for r in persist["runs"]] == [
        "sub=1:in,c0", "sub=2:in,c0,in,c1", "sub=3:in,c0,in,c1,in,c2"]
    assert persist["r4"]["value"] == 12
    want = ["seed", "h0"] + [f"{p}{n}" for n in range(1, 8) for p in ("x", "y", "z", "h")]
    want.insert(want.index("h4"), "ans:ok")
    assert delta["sync_final"]["items"] == delta["exit_final"]["items"] == want[:-1]
    assert [len(durable[f"{m}_history"]) for m in ("sync", "async", "exit")] == [5, 5, 2]


def test_two_savers_on_one_database_take_turns_on_a_thread(url: str, tmp_path: Path) -> None:
    """Two workers (two stores on one database) drive one thread with a subgraph by turns:
    each sees what the other saved (state, subgraph namespace, history, deletion), as two
    SqliteSaver connections to one file do."""
    def run(one: Saver, two: Saver) -> dict[str, Any]:
        a, b = parent_graph(one), parent_graph(two)
        c = cfg("turns")
        out: dict[str, Any] = {"a": a.invoke({"value": 1, "log": []}, c)}
        out["b_state"] = b.get_state(c, subgraphs=True)
        out["b"] = b.invoke(Command(resume="from-b"), c)
        out["a_state"] = a.get_state(c, subgraphs=True)
        out["a_again"] = a.invoke({"value": 7, "log": ["again"]}, c)
        out["b_state2"] = state = b.get_state(c, subgraphs=True)
        out["b_history"] = list(b.get_state_history(c))
        out["a_history"] = list(a.get_state_history(c))
        sub_c = ns_config("turns", state.tasks[0].state)
        out["a_sub"] = a.get_state(sub_c)
        out["b2"] = b.invoke(Command(resume="from-b-2"), c)
        out["a_sub2"] = a.get_state(sub_c)
        out["a_final"] = a.get_state(c)
        two.delete_thread("turns")
        out["a_deleted"] = a.get_state(c)
        out["a_sub_deleted"] = a.get_state(sub_c)
        return out

    path = tmp_path / "ref.sqlite"
    first = sqlite3.connect(path, check_same_thread=False)
    second = sqlite3.connect(path, check_same_thread=False)
    try:
        theirs = canonical(run(SqliteSaver(first), SqliteSaver(second)))
    finally:
        first.close()
        second.close()
    with EventStore.open(url, migrate=True) as one, EventStore.open(url) as two:
        ours = canonical(run(EventStoreSaver(one), EventStoreSaver(two)))
    assert ours == theirs
    assert ours["a_state"]["values"]["answer"] == "from-b"
    assert ours["a_deleted"]["values"] == {} and ours["a_sub_deleted"]["values"] == {}


# -- asyncio --------------------------------------------------------------------------------------


async def asubgraphs(saver: Saver) -> dict[str, Any]:
    """subgraph_interrupt and persistent_subgraph through the asyncio API."""
    g = parent_graph(saver)
    c = cfg("async-sub")
    out: dict[str, Any] = {"first": await g.ainvoke({"value": 1, "log": []}, c)}
    out["state"] = state = await g.aget_state(c, subgraphs=True)
    sub_c = ns_config("async-sub", state.tasks[0].state)
    out["sub_history"] = history = [s async for s in g.aget_state_history(sub_c)]
    out["sub_at_first"] = await g.aget_state(history[-1].config)
    out["stream"] = [x async for x in g.astream(Command(resume="y"), c,
                                                stream_mode=["updates", "values"],
                                                subgraphs=True)]
    out["history"] = [s async for s in g.aget_state_history(c)]
    out["sub_history_after"] = [s async for s in g.aget_state_history(sub_c)]
    b = StateGraph(S)
    b.add_node("child", sub_builder().compile(checkpointer=True))
    b.add_edge(START, "child")
    b.add_edge("child", END)
    p = b.compile(checkpointer=saver)
    c = cfg("async-persist")
    out["p1"] = await p.ainvoke({"value": 1, "log": []}, c)
    out["p2"] = await p.ainvoke(Command(resume="A"), c)
    out["p3"] = await p.ainvoke({"value": 5, "log": ["again"]}, c)
    out["p3_state"] = await p.aget_state(c, subgraphs=True)
    out["p4"] = await p.ainvoke(Command(resume="B"), c, durability="exit")
    out["p_history"] = [s async for s in p.aget_state_history(c)]
    out["p_child_history"] = [s async for s in p.aget_state_history(
        {"configurable": {"thread_id": "async-persist", "checkpoint_ns": "child"}})]
    return out


async def amap_reduce(saver: Saver) -> dict[str, Any]:
    """map_reduce_failure through ainvoke, with async branches; then eight Send calls of an
    interrupting subgraph at once (their checkpoints all go to the one thread), resumed by id."""
    calls: Counter[int] = Counter()

    async def work(arg: dict[str, int]) -> MapState:
        calls[arg["k"]] += 1
        if arg["k"] == 1 and calls[1] == 1:
            raise RuntimeError("boom")
        return {"results": [arg["k"] + 100]}

    g = map_reduce_graph(saver, work)
    c: Any = {**cfg("async-fan"), "max_concurrency": 1}
    out: dict[str, Any] = {}
    with pytest.raises(RuntimeError, match="boom"):
        await g.ainvoke({"items": [0, 2, 1], "results": []}, c)
    out["state"] = await g.aget_state(c)
    out["calls_after_failure"] = dict(sorted(calls.items()))
    out["final"] = await g.ainvoke(None, c)
    out["calls"] = dict(sorted(calls.items()))
    out["history"] = [s async for s in g.aget_state_history(c)]

    async def l_pre(st: Log) -> Log:
        await asyncio.sleep(0)
        return {"log": [f"pre{len(st['log'])}"]}

    def l_ask(st: Log) -> Log:
        return {"log": [f"ask:{interrupt({'seen': len(st['log'])})}"]}

    sb = StateGraph(Log)
    sb.add_node("l_pre", l_pre)
    sb.add_node("l_ask", l_ask)
    sb.add_edge(START, "l_pre")
    sb.add_edge("l_pre", "l_ask")
    sb.add_edge("l_ask", END)
    pb = StateGraph(Log)
    pb.add_node("fan", lambda st: {"log": ["fan"]})
    pb.add_node("child", sb.compile())
    pb.add_edge(START, "fan")
    pb.add_conditional_edges("fan", lambda st: [Send("child", {"log": ["x"] * k})
                                                for k in range(8)], ["child"])
    pb.add_edge("child", END)
    many = pb.compile(checkpointer=saver)
    c = cfg("async-many")
    first = await many.ainvoke({"log": []}, c, durability="sync")
    # (the order in which concurrent branches reach their interrupt varies from run to run)
    out["many_asked"] = sorted(i.value["seen"] for i in first["__interrupt__"])
    state = await many.aget_state(c, subgraphs=True)
    out["many_final"] = await many.ainvoke(
        Command(resume={i.id: f"r{i.value['seen']}" for i in state.interrupts}), c,
        durability="sync")
    out["many_history"] = [(s.values, s.next, s.metadata["step"])
                           async for s in many.aget_state_history(c)]
    out["many_checkpoints"] = len([t async for t in saver.alist(c)])
    return out


ASYNC_SCENARIOS = {f.__name__: f for f in (asubgraphs, amap_reduce)}
_async_reference: dict[str, Any] = {}


@pytest.mark.asyncio
@pytest.mark.parametrize("name", list(ASYNC_SCENARIOS))
async def test_async_scenario_matches_async_sqlite_saver(url: str, name: str) -> None:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    if name not in _async_reference:
        async with AsyncSqliteSaver.from_conn_string(":memory:") as theirs:
            _async_reference[name] = canonical(await ASYNC_SCENARIOS[name](theirs))
    async with scripts.open_async_saver(url) as saver:
        ours = canonical(await ASYNC_SCENARIOS[name](saver))
    assert ours == _async_reference[name]
    if name == "amap_reduce":
        assert ours["calls"] == {0: 1, 1: 2, 2: 1}
        assert ours["final"]["results"] == [100, 102, 101]
        assert ours["many_asked"] == list(range(1, 9))
