"""Async twins of the facades, for engines written with asyncio.

Each method runs the sync facade's own logic (the same decide-and-append command layer and
projection code) in one transaction of an :class:`eventstore.aio.AsyncEventStore`, through
``AsyncConnection.run_sync``: no thread pool, no blocking of the event loop, and no second copy
of the rules.  Commands run in a write transaction, queries in a read transaction.

::

    store = await AsyncEventStore.open(url)
    conversations = AsyncConversations(store)
    version = await conversations.assign("c-42", {"count": 1}, tenant_id="acme")
    state = await conversations.get("c-42", tenant_id="acme")
"""

from __future__ import annotations

import asyncio
import copy
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from sqlalchemy import Connection

from eventstore import EventStore
from eventstore._bound import BoundStore
from eventstore.aio import AsyncEventStore

from ._command import Clock, sweep_time
from ._stores import built_for_twin, check_async_store
from .continuations import (
    DEFAULT_CLAIM_TIMEOUT,
    DEFAULT_TTL,
    SWEEP_KINDS,
    Continuation,
    Continuations,
    SweepResult,
)
from .conversation import Conversations, ConversationState, VariableChange
from .events import ToolCallsPaused
from .flows import Flows, FlowSave, PendingFeedback
from .jobs import (
    DEFAULT_LEASE,
    DEFAULT_MAX_ATTEMPTS,
    SWEPT_STATUSES,
    TERMINAL_EVENTS,
    Job,
    JobEvent,
    Jobs,
    Swept,
    check_events_args,
)
from .sessions import AgentSessions, SessionEntry, SessionKey, SessionSnapshot, SessionState

__all__ = ["AsyncAgentSessions", "AsyncContinuations", "AsyncConversations", "AsyncFlows",
           "AsyncJobs", "run_read"]

F = TypeVar("F")
T = TypeVar("T")
P = ParamSpec("P")


async def run_read(store: AsyncEventStore, fn: Callable[Concatenate[EventStore, P], T],
                   *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(bound, *args, **kwargs)``: a sync read of ``projections`` (``query_rows``,
    ``current``, ``fold_live``, ``load_row``, ``status``) for an :class:`AsyncEventStore`,
    ``bound`` standing for the store inside one read transaction of it (run as the store's
    ``run_read`` runs a function: off the event loop on SQLite).

    ``await run_read(store, query_rows, OrderTotals(), tenant_id="acme", status="open")``.
    Operators' tools that write or replay the log (``rebuild``, ``verify``, ``snapshot_now``)
    take an :class:`~eventstore.EventStore` of the same URL.
    """
    check_async_store(store, "run_read", "call the function with the EventStore itself")
    return await store.run_read(lambda conn: fn(
        BoundStore(store, conn, read_only=True), *args, **kwargs))  # type: ignore[arg-type]


class _Twin(Generic[F]):
    """Runs methods of a sync facade inside transactions of an async store."""

    def __init__(self, store: AsyncEventStore, build: Callable[[], F]) -> None:
        check_async_store(store, type(self).__name__,
                          f"projections.{type(self).__name__.removeprefix('Async')}")
        store._check_open()  # (StoreClosed, as the sync facades' constructors raise)
        self.store = store
        known = set(map(id, getattr(store, "_preparations", ())))
        self._facade = built_for_twin(build)
        # What building it asked the store to prepare (a rebuild of stale inline rows).
        self._preparations = [p for p in getattr(store, "_preparations", ())
                              if id(p) not in known]

    async def _run(self, method: str, *args: Any, write: bool, **kwargs: Any) -> Any:
        return await self._call(lambda facade: getattr(facade, method)(*args, **kwargs),
                                write=write)

    async def _call(self, fn: Callable[[F], T], *, write: bool) -> T:
        """Run ``fn(facade)`` with the facade bound to one transaction of the async store.

        A rebuild of its rows that failed for good (see ``AsyncEventStore.prepare_before_use``)
        is raised by each call, as the sync facade's constructor raises it."""
        for prep in self._preparations:
            if not prep.done:
                await self.store._prepared()
            if prep.failed is not None:
                raise prep.failed
        stores: list[BoundStore] = []

        def call(conn: Connection, nowait: bool = False) -> T:
            stores.clear()  # (a run that was rolled back to run again logs nothing)
            bound = copy.copy(self._facade)
            stores.append(BoundStore(self.store, conn, nowait=nowait,
                                     read_only=not write))
            bound.store = stores[-1]  # type: ignore[attr-defined]
            return fn(bound)

        # A command run again from its start, after waiting outside the append lock for a
        # projector that holds its projection (see eventstore._core.RetryAppend).
        result = await (self.store._run_again_when_busy(call) if write
                        else self.store.run_sync(call, write=False))
        for store in stores:  # committed: log the appends, as the stores log theirs
            store.log_appended()
        return result


class AsyncConversations(_Twin[Conversations]):
    """:class:`projections.Conversations` for asyncio."""

    stream_id = staticmethod(Conversations.stream_id)

    def __init__(self, store: AsyncEventStore, *, snapshot_every: int | None = 100) -> None:
        super().__init__(store, lambda: Conversations(
            store, snapshot_every=snapshot_every))  # type: ignore[arg-type]

    async def assign(self, conversation_id: str, variables: Mapping[str, Any], *,
                     tenant_id: str = "default", expected_version: int | None = None,
                     workflow_run_id: str | None = None, node_id: str | None = None,
                     value_types: Mapping[str, str] | None = None,
                     idempotency_key: str | None = None,
                     metadata: dict[str, Any] | None = None) -> int:
        """See :meth:`Conversations.assign`."""
        result: int = await self._run(
            "assign", conversation_id, variables, write=True, tenant_id=tenant_id,
            expected_version=expected_version, workflow_run_id=workflow_run_id, node_id=node_id,
            value_types=value_types, idempotency_key=idempotency_key, metadata=metadata)
        return result

    async def reset(self, conversation_id: str, defaults: Mapping[str, Any], *,
                    tenant_id: str = "default", expected_version: int | None = None,
                    workflow_run_id: str | None = None, node_id: str | None = None,
                    idempotency_key: str | None = None) -> int:
        """See :meth:`Conversations.reset`."""
        result: int = await self._run(
            "reset", conversation_id, defaults, write=True, tenant_id=tenant_id,
            expected_version=expected_version, workflow_run_id=workflow_run_id, node_id=node_id,
            idempotency_key=idempotency_key)
        return result

    async def delete(self, conversation_id: str, names: Iterable[str], *,
                     tenant_id: str = "default", expected_version: int | None = None,
                     workflow_run_id: str | None = None, node_id: str | None = None,
                     idempotency_key: str | None = None) -> int:
        """See :meth:`Conversations.delete`."""
        # A str is one name, as for the sync facade (a list of it would be its characters).
        listed = names if isinstance(names, str) or not isinstance(names, Iterable) else list(
            names)  # (not iterable: the sync facade refuses it)
        result: int = await self._run(
            "delete", conversation_id, listed, write=True, tenant_id=tenant_id,
            expected_version=expected_version, workflow_run_id=workflow_run_id, node_id=node_id,
            idempotency_key=idempotency_key)
        return result

    async def get(self, conversation_id: str, *, tenant_id: str = "default",
                  at_version: int | None = None,
                  at_time: datetime | None = None) -> ConversationState:
        """See :meth:`Conversations.get` (time travel reads without saving snapshots)."""
        result: ConversationState = await self._run(
            "get", conversation_id, write=False, tenant_id=tenant_id, at_version=at_version,
            at_time=at_time)
        return result

    async def snapshot(self, conversation_id: str, *, tenant_id: str = "default") -> int:
        """See :meth:`Conversations.snapshot`."""
        result: int = await self._run("snapshot", conversation_id, write=True,
                                      tenant_id=tenant_id)
        return result

    async def history(self, conversation_id: str, *, tenant_id: str = "default",
                      name: str | None = None) -> list[VariableChange]:
        """See :meth:`Conversations.history`."""
        result: list[VariableChange] = await self._run("history", conversation_id, write=False,
                                                       tenant_id=tenant_id, name=name)
        return result


class AsyncContinuations(_Twin[Continuations]):
    """:class:`projections.Continuations` for asyncio."""

    stream_id = staticmethod(Continuations.stream_id)

    def __init__(self, store: AsyncEventStore, *, ttl: timedelta = DEFAULT_TTL,
                 claim_timeout: timedelta = DEFAULT_CLAIM_TIMEOUT,
                 clock: Clock | None = None) -> None:
        super().__init__(store, lambda: Continuations(
            store, ttl=ttl, claim_timeout=claim_timeout, clock=clock))  # type: ignore[arg-type]

    async def pause(self, conversation_id: str, user_id: str, *, messages: Sequence[Any],
                    pending_tool_calls: Sequence[Any], tools: Sequence[Any],
                    tool_schemas: Sequence[Any], agent_config: dict[str, Any],
                    client_tools: Sequence[Any] | None = None, tenant_id: str = "default",
                    ttl: timedelta | None = None) -> ToolCallsPaused:
        """See :meth:`Continuations.pause`."""
        result: ToolCallsPaused = await self._run(
            "pause", conversation_id, user_id, write=True, messages=messages,
            pending_tool_calls=pending_tool_calls, tools=tools, tool_schemas=tool_schemas,
            agent_config=agent_config, client_tools=client_tools, tenant_id=tenant_id, ttl=ttl)
        return result

    async def get(self, conversation_id: str, user_id: str, *,
                  tenant_id: str = "default") -> Continuation | None:
        """See :meth:`Continuations.get`."""
        result: Continuation | None = await self._run("get", conversation_id, user_id,
                                                      write=False, tenant_id=tenant_id)
        return result

    async def claim(self, conversation_id: str, user_id: str, *,
                    tenant_id: str = "default") -> Continuation:
        """See :meth:`Continuations.claim`."""
        result: Continuation = await self._run("claim", conversation_id, user_id, write=True,
                                               tenant_id=tenant_id)
        return result

    async def complete(self, conversation_id: str, user_id: str, *,
                       tool_results: Sequence[Any], claim_id: str | None = None,
                       tenant_id: str = "default") -> Continuation:
        """See :meth:`Continuations.complete`."""
        result: Continuation = await self._run(
            "complete", conversation_id, user_id, write=True, tool_results=tool_results,
            claim_id=claim_id, tenant_id=tenant_id)
        return result

    async def release(self, conversation_id: str, user_id: str, *, error: str | None = None,
                      claim_id: str | None = None, tenant_id: str = "default") -> Continuation:
        """See :meth:`Continuations.release`."""
        result: Continuation = await self._run("release", conversation_id, user_id, write=True,
                                               error=error, claim_id=claim_id,
                                               tenant_id=tenant_id)
        return result

    async def pending_for_user(self, user_id: str, *,
                               tenant_id: str = "default") -> list[Continuation]:
        """See :meth:`Continuations.pending_for_user`."""
        result: list[Continuation] = await self._run("pending_for_user", user_id, write=False,
                                                     tenant_id=tenant_id)
        return result

    async def sweep(self, now: datetime | None = None, *,
                    tenant_id: str | None = None) -> SweepResult:
        """See :meth:`Continuations.sweep`: each change in a transaction of its own, as there
        (one transaction for all would hold PostgreSQL's append lock until the last)."""
        at = sweep_time(now, tenant_id, self._facade.now)
        done: dict[str, list[tuple[str, str, str]]] = {kind: [] for kind in SWEEP_KINDS}
        for kind in SWEEP_KINDS:
            candidates = await self._call(
                functools.partial(Continuations._sweep_candidates, kind=kind, at=at,
                                  tenant_id=tenant_id), write=False)
            for tenant, stream, who in candidates:
                if await self._call(functools.partial(
                        Continuations._sweep_one, stream=stream, tenant_id=tenant, at=at,
                        kind=kind), write=True):
                    done[kind].append(who)
        return SweepResult(reverted=done["claim"], expired=done["expiry"])


class AsyncAgentSessions(_Twin[AgentSessions]):
    """:class:`projections.AgentSessions` for asyncio."""

    def __init__(self, store: AsyncEventStore, *, clock: Clock | None = None) -> None:
        super().__init__(store, lambda: AgentSessions(store, clock=clock))  # type: ignore[arg-type]

    async def save(self, key: SessionKey, *, snapshot: Any, layer_specs: Any,
                   pending_form_id: str | None = None,
                   pending_tool_call_id: str | None = None) -> SessionSnapshot:
        """See :meth:`AgentSessions.save`."""
        result: SessionSnapshot = await self._run(
            "save", key, write=True, snapshot=snapshot, layer_specs=layer_specs,
            pending_form_id=pending_form_id, pending_tool_call_id=pending_tool_call_id)
        return result

    async def active(self, key: SessionKey) -> SessionSnapshot | None:
        """See :meth:`AgentSessions.active`."""
        result: SessionSnapshot | None = await self._run("active", key, write=False)
        return result

    async def state(self, key: SessionKey) -> SessionState:
        """See :meth:`AgentSessions.state`."""
        result: SessionState = await self._run("state", key, write=False)
        return result

    async def active_in_run(self, tenant_id: str, workflow_run_id: str) -> list[SessionKey]:
        """See :meth:`AgentSessions.active_in_run`."""
        result: list[SessionKey] = await self._run("active_in_run", tenant_id, workflow_run_id,
                                                   write=False)
        return result

    async def history(self, key: SessionKey) -> list[SessionEntry]:
        """See :meth:`AgentSessions.history`."""
        result: list[SessionEntry] = await self._run("history", key, write=False)
        return result

    async def retire(self, key: SessionKey, *, reason: str) -> bool:
        """See :meth:`AgentSessions.retire`."""
        result: bool = await self._run("retire", key, write=True, reason=reason)
        return result

    async def finish_run(self, tenant_id: str, workflow_run_id: str,
                         status: str) -> list[SessionKey]:
        """See :meth:`AgentSessions.finish_run`."""
        result: list[SessionKey] = await self._run("finish_run", tenant_id, workflow_run_id,
                                                   status, write=True)
        return result


class AsyncFlows(_Twin[Flows]):
    """:class:`projections.Flows` for asyncio."""

    stream_id = staticmethod(Flows.stream_id)

    def __init__(self, store: AsyncEventStore, *, clock: Clock | None = None) -> None:
        super().__init__(store, lambda: Flows(store, clock=clock))  # type: ignore[arg-type]

    async def save(self, flow_id: str, method_name: str, state: Any, *,
                   tenant_id: str = "default") -> int:
        """See :meth:`Flows.save`."""
        result: int = await self._run("save", flow_id, method_name, state, write=True,
                                      tenant_id=tenant_id)
        return result

    async def load(self, flow_id: str, *, tenant_id: str = "default") -> Any | None:
        """See :meth:`Flows.load`."""
        return await self._run("load", flow_id, write=False, tenant_id=tenant_id)

    async def history(self, flow_id: str, *, tenant_id: str = "default") -> list[FlowSave]:
        """See :meth:`Flows.history`."""
        result: list[FlowSave] = await self._run("history", flow_id, write=False,
                                                 tenant_id=tenant_id)
        return result

    async def request_feedback(self, flow_id: str, context: Any, state: Any, *,
                               tenant_id: str = "default") -> int:
        """See :meth:`Flows.request_feedback`."""
        result: int = await self._run("request_feedback", flow_id, context, state, write=True,
                                      tenant_id=tenant_id)
        return result

    async def pending_feedback(self, flow_id: str, *,
                               tenant_id: str = "default") -> PendingFeedback | None:
        """See :meth:`Flows.pending_feedback`."""
        result: PendingFeedback | None = await self._run("pending_feedback", flow_id,
                                                         write=False, tenant_id=tenant_id)
        return result

    async def resolve_feedback(self, flow_id: str, feedback: Any, *,
                               tenant_id: str = "default") -> PendingFeedback:
        """See :meth:`Flows.resolve_feedback`."""
        result: PendingFeedback = await self._run("resolve_feedback", flow_id, feedback,
                                                  write=True, tenant_id=tenant_id)
        return result


class AsyncJobs(_Twin[Jobs]):
    """:class:`projections.Jobs` for asyncio; ``events(follow=True)`` waits with asyncio."""

    stream_id = staticmethod(Jobs.stream_id)

    def __init__(self, store: AsyncEventStore, *, lease: timedelta = DEFAULT_LEASE,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, clock: Clock | None = None) -> None:
        super().__init__(store, lambda: Jobs(
            store, lease=lease, max_attempts=max_attempts, clock=clock))  # type: ignore[arg-type]

    async def _job(self, method: str, *args: Any, **kwargs: Any) -> Job:
        result: Job = await self._run(method, *args, write=True, **kwargs)
        return result

    async def submit(self, workflow_id: str, inputs: Any, *, user_id: str,
                     dedupe_key: str | None = None, tenant_id: str = "default") -> Job:
        """See :meth:`Jobs.submit`."""
        return await self._job("submit", workflow_id, inputs, user_id=user_id,
                               dedupe_key=dedupe_key, tenant_id=tenant_id)

    async def claim(self, worker_id: str, *, tenant_id: str = "default") -> Job | None:
        """See :meth:`Jobs.claim`."""
        result: Job | None = await self._run("claim", worker_id, write=True,
                                             tenant_id=tenant_id)
        return result

    async def heartbeat(self, job_id: str, worker_id: str, *, tenant_id: str = "default",
                        attempt: int | None = None) -> Job:
        """See :meth:`Jobs.heartbeat`."""
        return await self._job("heartbeat", job_id, worker_id, tenant_id=tenant_id,
                               attempt=attempt)

    async def record(self, job_id: str, worker_id: str, milestone: Any, *,
                     tenant_id: str = "default", attempt: int | None = None) -> Job:
        """See :meth:`Jobs.record`."""
        return await self._job("record", job_id, worker_id, milestone, tenant_id=tenant_id,
                               attempt=attempt)

    async def complete(self, job_id: str, worker_id: str, result: Any = None, *,
                       tenant_id: str = "default", attempt: int | None = None) -> Job:
        """See :meth:`Jobs.complete`."""
        return await self._job("complete", job_id, worker_id, result, tenant_id=tenant_id,
                               attempt=attempt)

    async def fail(self, job_id: str, worker_id: str, error: str, *,
                   tenant_id: str = "default", attempt: int | None = None) -> Job:
        """See :meth:`Jobs.fail`."""
        return await self._job("fail", job_id, worker_id, error, tenant_id=tenant_id,
                               attempt=attempt)

    async def suspend(self, job_id: str, worker_id: str, *, request_id: str, prompt: Any,
                      deadline: datetime | None = None, tenant_id: str = "default",
                      attempt: int | None = None) -> Job:
        """See :meth:`Jobs.suspend`."""
        return await self._job("suspend", job_id, worker_id, request_id=request_id,
                               prompt=prompt, deadline=deadline, tenant_id=tenant_id,
                               attempt=attempt)

    async def resume(self, job_id: str, *, request_id: str, input: Any,
                     tenant_id: str = "default") -> Job:
        """See :meth:`Jobs.resume`."""
        return await self._job("resume", job_id, request_id=request_id, input=input,
                               tenant_id=tenant_id)

    async def cancel(self, job_id: str, reason: str | None = None, *,
                     tenant_id: str = "default", force: bool = False) -> Job:
        """See :meth:`Jobs.cancel`."""
        job, missed = await self._call(
            lambda jobs: jobs._cancel(job_id, reason, tenant_id, force), write=True)
        if missed is not None:  # raised once the deadline's failure is committed
            raise missed
        return job

    async def sweep(self, now: datetime | None = None, *,
                    tenant_id: str | None = None) -> list[Swept]:
        """See :meth:`Jobs.sweep`: each job in a transaction of its own, as there (one
        transaction for all would hold PostgreSQL's append lock until the last)."""
        when = sweep_time(now, tenant_id, self._facade._now)
        out: list[Swept] = []
        for status in SWEPT_STATUSES:
            seen: set[tuple[str, str]] = set()
            while fresh := await self._call(functools.partial(
                    Jobs._sweep_candidates, status=status, when=when, tenant_id=tenant_id,
                    seen=seen), write=False):
                for key in fresh:
                    seen.add(key)
                    swept = await self._call(functools.partial(
                        Jobs._sweep_one, tenant_id=key[0], stream=key[1], when=when),
                        write=True)
                    if swept is not None:
                        out.append(swept)
        return out

    async def get(self, job_id: str, *, tenant_id: str = "default") -> Job:
        """See :meth:`Jobs.get`."""
        result: Job = await self._run("get", job_id, write=False, tenant_id=tenant_id)
        return result

    async def list(self, status: str | Iterable[str] | None = None, *,
                   tenant_id: str = "default", limit: int | None = None) -> list[Job]:
        """See :meth:`Jobs.list`."""
        result: list[Job] = await self._run("list", status, write=False, tenant_id=tenant_id,
                                            limit=limit)
        return result

    async def events(self, job_id: str, *, after: int = 0, follow: bool = False,
                     tenant_id: str = "default", timeout: float | None = None,
                     poll_interval: float = 0.05) -> AsyncIterator[JobEvent]:
        """See :meth:`Jobs.events`: each poll is one read transaction, the wait an asyncio sleep.

        With ``follow`` it ends after the terminal event, at once when re-attached after it.
        The arguments are checked when iteration starts (an async generator's first step).
        """
        check_events_args(job_id, tenant_id, after, follow, timeout, poll_interval)
        ends = time.monotonic() + timeout if timeout is not None else None
        seq = after
        while True:
            def poll(jobs: Jobs, since: int = seq) -> tuple[list[JobEvent], bool]:
                got = list(jobs.events(job_id, after=since, tenant_id=tenant_id))
                # Ended only if the terminal event is at or before ``since``: one committed
                # after the read above is read by the next poll (the job's ``finished``, read
                # in a later snapshot, ended a follow before its last events).
                ended = not got and jobs._ended_before(jobs.stream_id(job_id), tenant_id, since)
                return got, ended

            batch, ended = await self._call(poll, write=False)
            for ev in batch:
                yield ev
                seq = ev.seq
                if follow and ev.type in TERMINAL_EVENTS:
                    return
            if not follow or ended:
                return
            left = None if ends is None else ends - time.monotonic()
            if left is not None and left <= 0:
                return
            await asyncio.sleep(poll_interval if left is None else min(poll_interval, left))
