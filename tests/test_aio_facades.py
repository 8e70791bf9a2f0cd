"""The async facade twins: same rules, run on an AsyncEventStore."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import create_engine, text

import projections
import projections.aio
from eventstore import EventStore, InvalidArgument, WrongExpectedVersion
from eventstore._bound import BoundStore
from eventstore.aio import AsyncEventStore
from eventstore.errors import DatabaseError, StoreClosed
from projections import (
    Continuations,
    ConversationProjection,
    Conversations,
    Jobs,
    ProjectionFailed,
    ProjectionStopped,
    inline,
    status,
)
from projections import _engine as engine_module
from projections._engine import load_row
from projections.aio import (
    AsyncAgentSessions,
    AsyncContinuations,
    AsyncConversations,
    AsyncFlows,
    AsyncJobs,
)
from projections.continuations import SweepResult
from projections.errors import (
    Conflict,
    LeaseLost,
    NoPendingFeedback,
    NotFound,
    ResumeInProgress,
)
from projections.flows import PendingFeedback
from projections.langgraph_saver import AsyncEventStoreSaver, EventStoreSaver
from projections.sessions import SessionKey
from tests._clock import Clock
from tests._events import CounterIncremented, NoteAdded
from tests._projections import TallyProjection


@pytest.mark.asyncio
async def test_conversations_assign_get_and_conflict(url: str) -> None:
    """assign/get/history work, and a stale expected version raises."""
    async with await AsyncEventStore.open(url) as store:
        conv = AsyncConversations(store)
        v = await conv.assign("c-1", {"count": 1, "topic": "x"}, tenant_id="acme")
        await conv.assign("c-1", {"count": 2}, tenant_id="acme", expected_version=v)
        state = await conv.get("c-1", tenant_id="acme")
        assert state.variables == {"count": 2, "topic": "x"} and state.version == 2
        assert (await conv.get("c-1", tenant_id="acme", at_version=1)).variables["count"] == 1
        assert len(await conv.history("c-1", tenant_id="acme")) == 3
        with pytest.raises(WrongExpectedVersion):
            await conv.assign("c-1", {"count": 3}, tenant_id="acme", expected_version=1)


@pytest.mark.asyncio
async def test_concurrent_claims_one_task_wins(url: str) -> None:
    """Of six tasks claiming one continuation, exactly one wins."""
    async with await AsyncEventStore.open(url) as store:
        conts = AsyncContinuations(store, clock=Clock())
        await conts.pause("c-1", "u1", messages=[], pending_tool_calls=[{"id": "t"}],
                          tools=[], tool_schemas=[], agent_config={})

        async def claim() -> str:
            try:
                await conts.claim("c-1", "u1")
                return "won"
            except ResumeInProgress:
                return "busy"

        outcomes = await asyncio.gather(*(claim() for _ in range(6)))
        assert sorted(outcomes) == ["busy"] * 5 + ["won"]
        done = await conts.complete("c-1", "u1", tool_results=[{"ok": True}])
        assert done.status == "consumed" and await conts.get("c-1", "u1") is None


@pytest.mark.asyncio
async def test_sessions_finish_run_concurrently_retires_once(url: str) -> None:
    """Concurrent finish_run tasks retire each session exactly once between them."""
    async with await AsyncEventStore.open(url) as store:
        sessions = AsyncAgentSessions(store)
        for agent in "abc":
            await sessions.save(SessionKey("t", "run-1", "n", "b", agent), snapshot={},
                                layer_specs=[])
        results = await asyncio.gather(*(sessions.finish_run("t", "run-1", "done")
                                         for _ in range(3)))
        assert sorted(k.agent_id for r in results for k in r) == ["a", "b", "c"]
        assert await sessions.active(SessionKey("t", "run-1", "n", "b", "a")) is None


@pytest.mark.asyncio
async def test_sessions_active_in_run_and_state(url: str) -> None:
    """active_in_run lists the run's active sessions; state shows a retired one too."""
    async with await AsyncEventStore.open(url) as store:
        sessions = AsyncAgentSessions(store)
        keys = [SessionKey("t", "run-2", "n", "b", agent) for agent in "xyz"]
        for key in keys:
            await sessions.save(key, snapshot={"turn": key.agent_id}, layer_specs=[])
        await sessions.save(SessionKey("t", "run-3", "n", "b", "x"), snapshot={},
                            layer_specs=[])
        assert await sessions.retire(keys[1], reason="done")
        active = await sessions.active_in_run("t", "run-2")
        assert sorted(k.agent_id for k in active) == ["x", "z"]
        state = await sessions.state(keys[1])
        assert not state.active and state.latest is not None
        assert state.latest.snapshot == {"turn": "y"}


@pytest.mark.asyncio
async def test_conversations_delete_takes_one_name_as_the_sync_facade_does(url: str) -> None:
    """delete("topic") removes the variable "topic" on both facades (the async twin used to
    split the string into the names t, o, p, i, c)."""
    async with await AsyncEventStore.open(url) as store:
        conv = AsyncConversations(store)
        await conv.assign("c-d", {"topic": "billing", "t": 1, "count": 3})
        await conv.delete("c-d", "topic")
        assert (await conv.get("c-d")).variables == {"t": 1, "count": 3}
        await conv.delete("c-d", (n for n in ["t"]))
        assert (await conv.get("c-d")).variables == {"count": 3}


@pytest.mark.asyncio
async def test_conversations_snapshot(url: str) -> None:
    """An on-demand snapshot is saved at the current version and reads still agree."""
    async with await AsyncEventStore.open(url) as store:
        conv = AsyncConversations(store)
        for i in range(3):
            await conv.assign("c-9", {"n": i})
        assert await conv.snapshot("c-9") == 3
        await conv.assign("c-9", {"m": 1})
        assert (await conv.get("c-9")).variables == {"n": 2, "m": 1}
        assert AsyncConversations.stream_id("c-9") == projections.Conversations.stream_id("c-9")


@pytest.mark.parametrize("name", ["Conversations", "Continuations", "AgentSessions", "Flows",
                                  "Jobs"])
def test_every_facade_method_has_an_async_twin(name: str) -> None:
    """Each public method of a sync facade exists on its async twin (as a coroutine function,
    or a static helper that touches no store)."""
    sync, twin = getattr(projections, name), getattr(projections.aio, f"Async{name}")
    for method in (m for m in dir(sync) if not m.startswith("_")):
        attr = getattr(sync, method)
        if not callable(attr):
            continue
        assert hasattr(twin, method), f"Async{name}.{method} is missing"
        if isinstance(sync.__dict__.get(method), staticmethod):
            assert getattr(twin, method) is attr
        else:
            assert inspect.iscoroutinefunction(getattr(twin, method)) or (
                inspect.isasyncgenfunction(getattr(twin, method))), method


def _parameters(fn: object) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["Conversations", "Continuations", "AgentSessions", "Flows",
                                  "Jobs"])
def test_async_twins_take_the_same_parameters(name: str) -> None:
    """Each twin method (and constructor) has the sync one's parameters: names, kinds and
    defaults, so a type checker and a misspelt keyword are caught alike on both."""
    sync, twin = getattr(projections, name), getattr(projections.aio, f"Async{name}")
    for method in ["__init__", *(m for m in dir(sync) if not m.startswith("_"))]:
        attr = getattr(sync, method)
        if not callable(attr) or isinstance(sync.__dict__.get(method), staticmethod):
            continue
        assert _parameters(getattr(twin, method)) == _parameters(attr), f"Async{name}.{method}"


@pytest.mark.asyncio
async def test_flows_feedback_race_one_wins(url: str) -> None:
    """Of four tasks resolving one feedback request, exactly one wins."""
    async with await AsyncEventStore.open(url) as store:
        flows = AsyncFlows(store)
        await flows.save("f1", "start", {"tags": {"a"}})
        assert await flows.load("f1") == {"tags": {"a"}}
        await flows.request_feedback("f1", "ok?", {"draft": 1})

        async def resolve() -> bool:
            try:
                await flows.resolve_feedback("f1", "yes")
                return True
            except NoPendingFeedback:
                return False

        assert sorted(await asyncio.gather(*(resolve() for _ in range(4)))) == [
            False, False, False, True]
        assert await flows.pending_feedback("f1") is None


@pytest.mark.asyncio
async def test_jobs_lifecycle_and_follow(url: str) -> None:
    """Submit, claim, milestone and complete; events(follow=True) ends after the terminal one."""

    async with await AsyncEventStore.open(url) as store:
        jobs = AsyncJobs(store)
        job = await jobs.submit("wf-1", {"x": 1}, user_id="u1", dedupe_key="k1")
        assert (await jobs.submit("wf-1", {"x": 1}, user_id="u1", dedupe_key="k1")).job_id == (
            job.job_id)
        claimed = await jobs.claim("w1")
        assert claimed is not None and claimed.job_id == job.job_id
        seen: list[str] = []

        async def follow() -> None:
            async for ev in jobs.events(job.job_id, follow=True, timeout=10):
                seen.append(ev.type)

        task = asyncio.create_task(follow())
        await jobs.record(job.job_id, "w1", {"step": 1})
        await jobs.complete(job.job_id, "w1", {"ok": True})
        await asyncio.wait_for(task, 10)
        assert seen == ["JobSubmitted", "JobClaimed", "MilestoneRecorded", "JobCompleted"]
        assert (await jobs.get(job.job_id)).status == "completed"
        again = [ev.seq async for ev in jobs.events(job.job_id, after=4, follow=True)]
        assert again == []


@pytest.mark.asyncio
async def test_twins_refuse_a_closed_store_as_the_sync_facades_do(url: str) -> None:
    """Making a twin on a closed AsyncEventStore raises StoreClosed, as making a sync facade
    on a closed EventStore does (the twins were made, and failed at their first call)."""

    store = await AsyncEventStore.open(url)
    await store.close()
    for twin in (AsyncConversations, AsyncFlows, AsyncJobs, AsyncContinuations,
                 AsyncAgentSessions):
        with pytest.raises(StoreClosed):
            twin(store)


def test_a_sync_facade_on_a_closed_store_raises_also_when_made_before(url: str) -> None:
    """Making a sync facade on a closed EventStore raises StoreClosed, also when a facade of
    the same kind was made on it before (its projection was inline already, and the second
    was made without a word, failing at its first call)."""

    store = EventStore.open(url, migrate=True)
    kinds = (projections.Conversations, projections.Flows, projections.Jobs,
             projections.Continuations, projections.AgentSessions)
    for kind in kinds:
        kind(store)
    store.close()
    for kind in kinds:
        with pytest.raises(StoreClosed):
            kind(store)


@pytest.mark.asyncio
async def test_an_async_follow_from_past_the_end_ends_when_the_job_finishes(url: str) -> None:
    """As the sync follow: ``after`` ahead of the stream, the job finishing during the follow
    ends it."""
    async with await AsyncEventStore.open(url) as store:
        jobs = AsyncJobs(store)
        job = await jobs.submit("wf-1", {}, user_id="u1")

        async def finish() -> None:
            await asyncio.sleep(0.1)
            assert await jobs.claim("w1") is not None
            await jobs.complete(job.job_id, "w1")

        started = time.monotonic()
        finisher = asyncio.create_task(finish())
        seen = [ev async for ev in jobs.events(job.job_id, after=5, follow=True, timeout=30,
                                               poll_interval=0.01)]
        await finisher
        assert seen == []
        assert time.monotonic() - started < 10


@pytest.mark.asyncio
async def test_a_follow_gets_the_events_that_finish_the_job_during_its_poll(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's last events committed between a poll's read of its events and its check for
    the end: the follow still yields them, the terminal one last (on PostgreSQL the check read
    the finished job in a later snapshot and ended the follow without them)."""

    async with await AsyncEventStore.open(url) as store:
        jobs = AsyncJobs(store)
        job = await jobs.submit("wf-1", {}, user_id="u1")
        real_events = Jobs.events
        finished = False

        def events_then_finish(self: Jobs, *args: object, **kwargs: object) -> object:
            nonlocal finished
            got = list(real_events(self, *args, **kwargs))  # type: ignore[arg-type]
            if not got and not finished:  # a poll that found nothing new: now another
                # process claims and completes the job, before the poll checks for the end
                finished = True
                with EventStore.open(url) as other:
                    other_jobs = Jobs(other)
                    assert other_jobs.claim("w1") is not None
                    other_jobs.complete(job.job_id, "w1", {"ok": True})
            return iter(got)

        monkeypatch.setattr(Jobs, "events", events_then_finish)
        seen = [ev.type async for ev in jobs.events(job.job_id, follow=True, timeout=10,
                                                    poll_interval=0.01)]
        assert finished
        assert seen == ["JobSubmitted", "JobClaimed", "JobCompleted"]


@pytest.mark.asyncio
async def test_an_async_cancel_past_the_deadline_records_the_failure(url: str) -> None:
    """As the sync cancel: the failure is committed before Conflict(deadline_passed) is raised
    (raised inside the twin's transaction, it rolled the failure back)."""


    clock = Clock()
    async with await AsyncEventStore.open(url) as store:
        jobs = AsyncJobs(store, clock=clock)
        job = await jobs.submit("wf", {}, user_id="u")
        await jobs.claim("w1")
        await jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?",
                           deadline=clock.now + timedelta(minutes=1))
        clock.advance(minutes=2)
        with pytest.raises(Conflict, match="it failed, not cancelled") as e:
            await jobs.cancel(job.job_id)
        assert e.value.reason == "deadline_passed"
        got = await jobs.get(job.job_id)
        assert (got.status, got.error) == ("failed", "deadline passed")
        assert await jobs.sweep() == []


@pytest.mark.asyncio
async def test_tenant_ids_take_the_stores_limit_in_every_facade(url: str) -> None:
    """A tenant id is the store's (at most 255 characters), not a facade id: every facade
    takes one of 230 (two refused it, two wrote it) and refuses one of 256."""

    async with await AsyncEventStore.open(url) as store:
        key = "t" * 230
        sessions = SessionKey(tenant_id=key, workflow_run_id="r", node_id="n", binding_id="b",
                              agent_id="a")
        calls = [
            lambda t: AsyncJobs(store).submit("wf", {}, user_id="u", tenant_id=t),
            lambda t: AsyncContinuations(store).pause(
                "c", "u", messages=[], pending_tool_calls=[], tools=[], tool_schemas=[],
                agent_config={}, tenant_id=t),
            lambda t: AsyncConversations(store).assign("c", {"a": 1}, tenant_id=t),
            lambda t: AsyncFlows(store).save("f", "m", {}, tenant_id=t),
        ]
        for call in calls:
            await call(key)
            with pytest.raises(InvalidArgument, match="255"):
                await call("t" * 256)
        await AsyncAgentSessions(store).save(sessions, snapshot={}, layer_specs=[])
        assert (await store.stats())["events"] == 5


@pytest.mark.asyncio
async def test_async_facades_rebuild_rows_of_another_fold_version(url: str) -> None:
    """As the sync facades do at construction: rows built by another version of the fold are
    rebuilt before use (an async-only deployment used to see an empty queue)."""


    with EventStore.open(url, migrate=True) as store:
        Jobs(store).submit("wf", {}, user_id="u", tenant_id="acme")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:  # as if an older version of the fold built the rows
            conn.execute(text("UPDATE es_projections SET code_version = 0 WHERE name = 'jobs'"))
    finally:
        engine.dispose()
    async with await AsyncEventStore.open(url) as astore:
        jobs = AsyncJobs(astore)
        claimed = await jobs.claim("w1", tenant_id="acme")
        assert claimed is not None and claimed.workflow_id == "wf"


def _stale_conversation_rows(url: str) -> None:
    """A conversation, its rows as if an older version of the fold built them."""


    with EventStore.open(url, migrate=True) as store:
        Conversations(store).assign("c-1", {"n": 1})
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE es_projections SET code_version = 0 "
                              "WHERE name = 'conversations'"))
    finally:
        engine.dispose()


@pytest.mark.asyncio
async def test_the_rebuild_of_stale_rows_runs_off_the_event_loop_before_first_use(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building an async facade does no I/O on the event loop: the check of its rows' fold
    version, and their rebuild, run on a worker thread before the store's next call, which
    waits for it.  A rebuild that fails raises in the call that waited; the next call tries
    again."""



    _stale_conversation_rows(url)
    loop_thread = threading.get_ident()
    opened_on: list[int] = []
    gone = DatabaseError("the server went away")
    gone.transient = True
    failures = [gone]
    real_open = EventStore.open

    def watched_open(*args: Any, **kwargs: Any) -> EventStore:
        opened_on.append(threading.get_ident())
        if failures:
            raise failures.pop()
        return real_open(*args, **kwargs)

    monkeypatch.setattr(engine_module.EventStore, "open", watched_open)
    async with await AsyncEventStore.open(url) as astore:
        conversations = AsyncConversations(astore)
        assert opened_on == []  # nothing at construction
        with pytest.raises(DatabaseError, match="went away"):
            await conversations.get("c-1")
        state = await conversations.get("c-1")  # tried again, rebuilt
        assert (state.variables, state.version) == ({"n": 1}, 1)
        assert len(opened_on) == 2 and loop_thread not in opened_on
        await conversations.assign("c-1", {"n": 2})  # prepared once: no third open
        assert len(opened_on) == 2
        assert (await conversations.get("c-1")).variables == {"n": 2}
    with EventStore.open(url) as store:
        rows = store.engine.connect()
        try:
            version = rows.execute(text("SELECT code_version FROM es_projections "
                                        "WHERE name = 'conversations'")).scalar()
        finally:
            rows.close()
    assert version == ConversationProjection.version  # rebuilt by this fold


@pytest.mark.asyncio
async def test_a_rebuild_that_fails_for_good_fails_its_facade_not_the_store(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on the sync store, where the facade's constructor raises and nothing else is
    affected: a rebuild of stale rows whose fold raises is raised by each call of that async
    facade, while the store's other appends and reads go on (each used to replay the log again
    and fail)."""

    _stale_conversation_rows(url)
    replays = []

    def refusing(self: Any, state: Any, event: Any) -> Any:
        replays.append(event.position)
        raise ValueError("this fold refuses an old event")

    monkeypatch.setattr(ConversationProjection, "evolve", refusing)
    async with await AsyncEventStore.open(url) as astore:
        conversations = AsyncConversations(astore)
        assert (await astore.append("other-1", [NoteAdded(text="a")])).stream_version == 1
        tried = len(replays)  # the rebuild ran before that append, and failed
        assert tried > 0 and set(replays) == {1}
        for _ in range(2):
            with pytest.raises(ProjectionFailed, match="refuses an old event"):
                await conversations.get("c-1")
        assert (await astore.append("other-1", [NoteAdded(text="b")])).stream_version == 2
        assert [e.version async for e in astore.read_stream("other-1")] == [1, 2]
        assert await astore.last_position() == 3
        assert len(replays) == tried  # not again


@pytest.mark.asyncio
async def test_inline_of_a_fold_that_cannot_rebuild_refuses_its_events_on_an_async_store(
        url: str) -> None:
    """The sync store's inline() raises when a new fold version cannot rebuild the rows (its
    fold raises on an event in the log).  The async store's inline() cannot wait for the
    rebuild, and used to drop the projection silently: its events were appended with no rows
    kept, and nothing told the caller.  Now each append of its events raises
    ProjectionStopped, caused by the rebuild's failure, and writes nothing; other streams go
    on; inline() with a fold that rebuilds takes it up again."""

    class V2(TallyProjection):
        version = 2

    with EventStore.open(url, migrate=True) as store:
        inline(store, TallyProjection())
        store.append("counter-1", [CounterIncremented(by=3, writer="w"),
                                   CounterIncremented(by=13, writer="w")])
    with EventStore.open(url) as store, pytest.raises(ProjectionFailed):
        inline(store, V2(poison=13))  # the sync store's answer
    async with await AsyncEventStore.open(url) as astore:
        inline(astore, V2(poison=13))  # type: ignore[arg-type]
        for _ in range(2):
            with pytest.raises(ProjectionStopped, match="poison value 13") as refused:
                await astore.append("counter-2", [CounterIncremented(by=1, writer="w")])
            assert isinstance(refused.value.__cause__, ProjectionFailed)
        assert await astore.stream_version("counter-2") == 0  # nothing written
        assert (await astore.append("other-1", [NoteAdded(text="a")])).stream_version == 1
        with pytest.raises(ProjectionStopped):  # inline() where no rebuild can run from
            await astore.run_sync(lambda conn: inline(BoundStore(astore, conn), V2()))
        inline(astore, V2())  # type: ignore[arg-type]  # a fold that rebuilds
        await astore.append("counter-2", [CounterIncremented(by=1, writer="w")])
    with EventStore.open(url) as store:
        assert status(store, "tally")[0].code_version == 2
        row = load_row(store, V2(), "default", "counter-2")
        assert row is not None and (row[0].total, row[1]) == (1, 1)


@pytest.mark.asyncio
async def test_a_facade_refuses_the_other_kind_of_store_and_names_its_twin(url: str) -> None:
    """A sync facade given an AsyncEventStore, or an async one given an EventStore, raises
    InvalidArgument naming the class to use instead (it would fail later, on first use)."""

    pairs = [(getattr(projections, n), getattr(projections.aio, f"Async{n}"))
             for n in ("Conversations", "Continuations", "AgentSessions", "Flows", "Jobs")]
    pairs.append((EventStoreSaver, AsyncEventStoreSaver))
    astore = await AsyncEventStore.open(url, migrate=True)
    store = EventStore.open(url)
    try:
        for sync, twin in pairs:
            with pytest.raises(InvalidArgument, match=twin.__name__):
                sync(astore)
            with pytest.raises(InvalidArgument, match=sync.__name__):
                twin(store)
            # The right kind still works, the twin included (it runs the sync facade).
            sync(store), twin(astore)
        conv = AsyncConversations(astore)
        await conv.assign("c-1", {"a": 1})
        assert (await conv.get("c-1")).variables == {"a": 1}
    finally:
        store.close()
        await astore.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("facade", ["jobs", "continuations"])
async def test_async_sweeps_change_each_item_in_its_own_transaction(
        url: str, facade: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the sync sweeps: each requeue or expiry commits in a write transaction of its own,
    so other writers get in between (one transaction for the whole sweep held PostgreSQL's
    append lock, and SQLite's write lock, until its last change: an outage's hundreds of
    expired leases stalled every append of the database)."""

    clock = Clock()
    async with await AsyncEventStore.open(url, migrate=True) as store:
        if facade == "jobs":
            jobs = AsyncJobs(store, clock=clock)
            for i in range(3):
                await jobs.submit("wf", {"i": i}, user_id="u")
                await jobs.claim("w1")
            sweeper: Any = jobs
            owner: Any = Jobs
        else:
            conts = AsyncContinuations(store, clock=clock)
            for i in range(3):
                await conts.pause(f"c-{i}", "u1", messages=[], pending_tool_calls=[],
                                  tools=[], tool_schemas=[], agent_config={})
            sweeper, owner = conts, Continuations
        clock.advance(days=2)  # every lease and pause is past its time
        transactions: list[list[str]] = []  # write transactions, and the changes in each
        real_run_sync, real_sweep_one = store.run_sync, owner._sweep_one

        async def counted_run_sync(fn: Any, *args: Any, write: bool = False) -> Any:
            if write:
                transactions.append([])
            return await real_run_sync(fn, *args, write=write)

        def counted_sweep_one(*args: Any, **kwargs: Any) -> Any:
            transactions[-1].append("change")
            return real_sweep_one(*args, **kwargs)

        monkeypatch.setattr(store, "run_sync", counted_run_sync)
        monkeypatch.setattr(owner, "_sweep_one", counted_sweep_one)
        result = await sweeper.sweep()
        changed = len(result) if facade == "jobs" else len(result.expired)
        assert changed == 3
        assert transactions == [["change"]] * 3


@pytest.mark.asyncio
async def test_async_sweeps_check_the_time_given_and_record_it_in_utc(url: str) -> None:

    clock = Clock()
    async with await AsyncEventStore.open(url) as store:
        jobs, conts = AsyncJobs(store, clock=clock), AsyncContinuations(store, clock=clock)
        job = await jobs.submit("wf", {}, user_id="u")
        await jobs.claim("w1")
        for sweeper in (jobs, conts):
            with pytest.raises(InvalidArgument, match="timezone-aware"):
                await sweeper.sweep(datetime(2026, 1, 2))
        later = (clock.now + timedelta(days=1)).astimezone(timezone(timedelta(hours=-5)))
        swept = await jobs.sweep(later)
        assert [(s.job_id, s.action) for s in swept] == [(job.job_id, "requeued")]
        requeued = [e async for e in jobs.events(job.job_id)][-1]
        assert requeued.type == "JobRequeued" and requeued.data.at == later  # type: ignore[union-attr]
        assert requeued.data.at.utcoffset() == timedelta(0)  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_conversation_twin_passes_each_option_to_the_facade(url: str) -> None:
    """Tenant, expected version, run and node ids, value types, idempotency keys, metadata,
    at_version, at_time and name reach the sync facade from every conversation method."""
    async with await AsyncEventStore.open(url) as store:
        conv = AsyncConversations(store)
        run = {"tenant_id": "acme", "workflow_run_id": "run-1", "node_id": "n-1"}
        for _ in range(2):  # the second time a retry, by its idempotency key: the same version
            assert await conv.assign("c-1", {"a": 1, "b": "x"}, value_types={"a": "count"},
                                     idempotency_key="k-1", metadata={"by": "ann"},
                                     **run) == 1
            assert await conv.reset("c-1", {"a": 0}, idempotency_key="k-2", **run) == 2
            assert await conv.delete("c-1", ["b"], idempotency_key="k-3", **run) == 3
        for stale in (conv.assign("c-1", {"a": 5}, tenant_id="acme", expected_version=2),
                      conv.reset("c-1", {"a": 5}, tenant_id="acme", expected_version=2),
                      conv.delete("c-1", ["a"], tenant_id="acme", expected_version=2)):
            with pytest.raises(WrongExpectedVersion):
                await stale
        with pytest.raises(InvalidArgument, match="names"):
            await conv.delete("c-1", 5, tenant_id="acme")  # type: ignore[arg-type]
        assert await conv.snapshot("c-1", tenant_id="acme") == 3
        assert (await conv.get("c-1", tenant_id="acme")).variables == {"a": 0}
        assert (await conv.get("c-1")).version == 0  # the default tenant has none
        changes = await conv.history("c-1", tenant_id="acme")
        assert [(c.kind, c.name, c.value_type, c.workflow_run_id, c.node_id, c.version)
                for c in changes] == [
            ("assigned", "a", "count", "run-1", "n-1", 1),
            ("assigned", "b", changes[1].value_type, "run-1", "n-1", 1),
            ("reset", "a", changes[2].value_type, "run-1", "n-1", 2),
            ("deleted", "b", None, "run-1", "n-1", 3)]
        assert [c.version for c in await conv.history("c-1", tenant_id="acme", name="b")] == [
            1, 3]
        first = {"a": 1, "b": "x"}
        assert (await conv.get("c-1", tenant_id="acme", at_version=1)).variables == first
        assert (await conv.get("c-1", tenant_id="acme", at_time=changes[0].at)).variables == (
            first)
        assert [e.metadata.get("by") async for e in store.read_stream(
            conv.stream_id("c-1"), tenant_id="acme")] == ["ann", None, None]


@pytest.mark.asyncio
async def test_continuation_twin_passes_each_option_to_the_facade(url: str) -> None:
    """The constructor's ttl and clock, and pause's payload, ttl and tenant, reach the sync
    facade; get, claim, release (error, claim id), complete (results, claim id) and
    pending_for_user act on the tenant given."""
    clock = Clock()
    async with await AsyncEventStore.open(url) as store:
        conts = AsyncContinuations(store, ttl=timedelta(minutes=5), clock=clock)
        payload: dict[str, Any] = {
            "messages": [{"role": "user"}], "pending_tool_calls": [{"id": "t"}],
            "tools": ["search"], "tool_schemas": [{"name": "search"}],
            "agent_config": {"model": "m"}, "client_tools": [{"name": "ui"}]}
        paused = await conts.pause("c-1", "u1", tenant_id="acme", ttl=timedelta(minutes=1),
                                   **payload)
        await conts.pause("c-2", "u1", tenant_id="acme", **{**payload, "client_tools": None})
        assert await conts.get("c-1", "u1") is None  # the default tenant has none
        got = await conts.get("c-1", "u1", tenant_id="acme")
        assert got is not None and got.pause_id == paused.pause_id
        assert {k: getattr(got, k) for k in payload} == payload
        assert got.expires_at == clock.now + timedelta(minutes=1)
        pending = await conts.pending_for_user("u1", tenant_id="acme")
        assert [(c.conversation_id, c.expires_at) for c in pending] == [
            ("c-1", clock.now + timedelta(minutes=1)), ("c-2", clock.now + timedelta(minutes=5))]
        assert await conts.pending_for_user("u1") == []
        first = await conts.claim("c-1", "u1", tenant_id="acme")
        with pytest.raises(ResumeInProgress):
            await conts.release("c-1", "u1", claim_id="another", tenant_id="acme")
        released = await conts.release("c-1", "u1", error="tool timed out",
                                       claim_id=first.claim_id, tenant_id="acme")
        assert (released.status, released.last_error) == ("pending", "tool timed out")
        second = await conts.claim("c-1", "u1", tenant_id="acme")
        with pytest.raises(ResumeInProgress):
            await conts.complete("c-1", "u1", tool_results=[], claim_id=first.claim_id,
                                 tenant_id="acme")
        done = await conts.complete("c-1", "u1", tool_results=[{"ok": True}],
                                    claim_id=second.claim_id, tenant_id="acme")
        assert (done.status, done.tool_results) == ("consumed", [{"ok": True}])


_PAUSE: dict[str, Any] = {"messages": [], "pending_tool_calls": [], "tools": [],
                          "tool_schemas": [], "agent_config": {}}


@pytest.mark.asyncio
async def test_continuation_twin_sweeps_at_the_time_and_in_the_tenant_given(url: str) -> None:
    """sweep(now, tenant_id=...) reverts stale claims and expires pauses as of ``now`` (the
    facade's clock without it), in that tenant only or in every one, by the facade's claim
    timeout."""
    clock = Clock()
    async with await AsyncEventStore.open(url) as store:
        conts = AsyncContinuations(store, ttl=timedelta(minutes=10),
                                   claim_timeout=timedelta(minutes=1), clock=clock)
        for tenant, cid in [("acme", "c-1"), ("acme", "c-2"), ("globex", "c-3")]:
            await conts.pause(cid, "u1", tenant_id=tenant, **_PAUSE)
        await conts.claim("c-1", "u1", tenant_id="acme")
        with pytest.raises(InvalidArgument):
            await conts.sweep(datetime(2026, 1, 1, 12, 30))  # naive
        assert await conts.sweep() == SweepResult(reverted=[], expired=[])
        stale = await conts.sweep(clock.now + timedelta(minutes=2), tenant_id="acme")
        assert stale == SweepResult(reverted=[("acme", "c-1", "u1")], expired=[])
        late = await conts.sweep(clock.now + timedelta(minutes=11), tenant_id="acme")
        assert late == SweepResult(reverted=[], expired=[("acme", "c-2", "u1")])
        assert await conts.get("c-3", "u1", tenant_id="globex") is not None
        everyone = await conts.sweep(clock.now + timedelta(minutes=13))
        assert sorted(everyone.expired) == [("acme", "c-1", "u1"), ("globex", "c-3", "u1")]


@pytest.mark.asyncio
async def test_session_twin_passes_each_option_to_the_facade(url: str) -> None:
    """save's layer specs and pending ids, the clock, retire's reason and finish_run's status
    reach the sync facade, and each answer comes back as it gave it."""
    clock = Clock()
    async with await AsyncEventStore.open(url) as store:
        sessions = AsyncAgentSessions(store, clock=clock)
        key = SessionKey("acme", "run-1", "n", "b", "a")
        saved = await sessions.save(key, snapshot={"turn": 1}, layer_specs=[{"layer": "base"}],
                                    pending_form_id="form-1", pending_tool_call_id="call-1")
        assert (saved.snapshot, saved.layer_specs, saved.pending_form_id,
                saved.pending_tool_call_id, saved.saved_at, saved.version) == (
            {"turn": 1}, [{"layer": "base"}], "form-1", "call-1", clock.now, 1)
        assert await sessions.active(key) == saved
        assert await sessions.retire(key, reason="user cancelled")
        assert not await sessions.retire(key, reason="again")
        state = await sessions.state(key)
        assert (state.active, state.retired_reason, state.latest) == (
            False, "user cancelled", saved)
        assert [(e.kind, e.version, e.reason) for e in await sessions.history(key)] == [
            ("saved", 1, None), ("retired", 2, "user cancelled")]
        other = SessionKey("acme", "run-2", "n", "b", "a")
        await sessions.save(other, snapshot={}, layer_specs=[])
        assert await sessions.finish_run("acme", "run-2", "failed") == [other]
        assert (await sessions.state(other)).retired_reason == "run failed"


@pytest.mark.asyncio
async def test_flow_twin_passes_each_option_to_the_facade(url: str) -> None:
    """Every flow method acts on the tenant given, with the facade's clock, and answers what
    the sync facade answers."""
    clock = Clock()
    async with await AsyncEventStore.open(url) as store:
        flows = AsyncFlows(store, clock=clock)
        assert await flows.save("f-1", "plan", {"step": 1}, tenant_id="acme") == 1
        assert await flows.save("f-1", "act", {"step": 2}, tenant_id="acme") == 2
        assert await flows.load("f-1") is None and await flows.history("f-1") == []
        assert await flows.load("f-1", tenant_id="acme") == {"step": 2}
        assert [(s.method_name, s.state, s.at, s.version)
                for s in await flows.history("f-1", tenant_id="acme")] == [
            ("plan", {"step": 1}, clock.now, 1), ("act", {"step": 2}, clock.now, 2)]
        assert await flows.request_feedback("f-1", {"q": "ok?"}, {"draft": 1},
                                            tenant_id="acme") == 3
        assert await flows.pending_feedback("f-1") is None
        pending = await flows.pending_feedback("f-1", tenant_id="acme")
        assert pending == PendingFeedback(flow_id="f-1", context={"q": "ok?"},
                                          state={"draft": 1}, requested_at=clock.now)
        with pytest.raises(NoPendingFeedback):
            await flows.resolve_feedback("f-1", "yes")
        assert await flows.resolve_feedback("f-1", "yes", tenant_id="acme") == pending
        assert await flows.pending_feedback("f-1", tenant_id="acme") is None


@pytest.mark.asyncio
async def test_job_twin_passes_tenant_attempt_and_payloads_to_the_facade(url: str) -> None:
    """Each job command acts on the tenant given, refuses an attempt the job has left, and
    records what it is given (dedupe key, deadline, resume input, result, error)."""
    clock = Clock()
    async with await AsyncEventStore.open(url) as store:
        jobs = AsyncJobs(store, clock=clock)
        job = await jobs.submit("wf", {"x": 1}, user_id="u1", dedupe_key="d-1", tenant_id="acme")
        assert (job.tenant_id, job.dedupe_key, job.submitted_at) == ("acme", "d-1", clock.now)
        assert (await jobs.submit("wf", {"x": 1}, user_id="u1", dedupe_key="d-1",
                                  tenant_id="acme")).job_id == job.job_id
        with pytest.raises(NotFound):
            await jobs.get(job.job_id)
        assert await jobs.claim("w1") is None
        claimed = await jobs.claim("w1", tenant_id="acme")
        assert claimed is not None and claimed.job_id == job.job_id
        deadline = clock.now + timedelta(hours=1)
        steps = [
            lambda a: jobs.heartbeat(job.job_id, "w1", tenant_id="acme", attempt=a),
            lambda a: jobs.record(job.job_id, "w1", {"step": 1}, tenant_id="acme", attempt=a),
            lambda a: jobs.suspend(job.job_id, "w1", request_id="r-1", prompt="?",
                                   deadline=deadline, tenant_id="acme", attempt=a)]
        for step in steps:
            with pytest.raises(LeaseLost):
                await step(claimed.attempt + 1)
            await step(claimed.attempt)
        suspended = await jobs.get(job.job_id, tenant_id="acme")
        assert suspended.pending is not None and suspended.pending.deadline == deadline
        resumed = await jobs.resume(job.job_id, request_id="r-1", input={"answer": 42},
                                    tenant_id="acme")
        assert (resumed.status, resumed.resume_input) == ("queued", {"answer": 42})
        again = await jobs.claim("w1", tenant_id="acme")
        assert again is not None
        with pytest.raises(LeaseLost):
            await jobs.complete(job.job_id, "w1", {"ok": 1}, tenant_id="acme",
                                attempt=claimed.attempt)
        done = await jobs.complete(job.job_id, "w1", {"ok": 1}, tenant_id="acme",
                                   attempt=again.attempt)
        assert (done.status, done.result) == ("completed", {"ok": 1})
        other = await jobs.submit("wf", {}, user_id="u1", tenant_id="acme")
        first = await jobs.claim("w1", tenant_id="acme")
        assert first is not None and first.job_id == other.job_id
        with pytest.raises(LeaseLost):
            await jobs.fail(other.job_id, "w1", "boom", tenant_id="acme",
                            attempt=first.attempt + 1)
        failed = await jobs.fail(other.job_id, "w1", "boom", tenant_id="acme",
                                 attempt=first.attempt)
        assert (failed.status, failed.error) == ("failed", "boom")
        assert [e.seq async for e in jobs.events(job.job_id, tenant_id="acme", after=5)] == [
            6, 7, 8]


@pytest.mark.asyncio
async def test_job_twin_lists_by_status_tenant_and_limit(url: str) -> None:
    """list(status, tenant_id=..., limit=...) filters and bounds as the sync facade does."""
    async with await AsyncEventStore.open(url) as store:
        jobs = AsyncJobs(store)
        ids = [(await jobs.submit("wf", {"i": i}, user_id="u", tenant_id="acme")).job_id
               for i in range(3)]
        await jobs.submit("wf", {}, user_id="u")
        await jobs.claim("w1", tenant_id="acme")
        assert [j.job_id for j in await jobs.list(tenant_id="acme")] == ids
        assert [j.job_id for j in await jobs.list("queued", tenant_id="acme")] == ids[1:]
        assert [j.job_id for j in await jobs.list("queued", tenant_id="acme", limit=1)] == [
            ids[1]]
        assert [j.job_id for j in await jobs.list(tenant_id="acme", limit=2)] == ids[:2]


@pytest.mark.asyncio
async def test_job_twin_cancel_passes_reason_tenant_and_force(url: str) -> None:
    """A resumed, queued job is the resume's: cancel refuses it unless ``force``; the reason
    is recorded, in the tenant given."""
    async with await AsyncEventStore.open(url) as store:
        jobs = AsyncJobs(store)
        job = await jobs.submit("wf", {}, user_id="u", tenant_id="acme")
        await jobs.claim("w1", tenant_id="acme")
        await jobs.suspend(job.job_id, "w1", request_id="r-1", prompt="?", tenant_id="acme")
        await jobs.resume(job.job_id, request_id="r-1", input="yes", tenant_id="acme")
        with pytest.raises(Conflict) as refused:
            await jobs.cancel(job.job_id, "not needed", tenant_id="acme")
        assert refused.value.reason == "already_resumed"
        cancelled = await jobs.cancel(job.job_id, "not needed", tenant_id="acme", force=True)
        assert (cancelled.status, cancelled.cancel_reason) == ("cancelled", "not needed")


@pytest.mark.asyncio
async def test_job_twin_sweeps_at_the_time_and_in_the_tenant_given(url: str) -> None:
    """sweep(now, tenant_id=...) requeues or fails expired leases, by the facade's lease,
    attempts and clock, and fails suspended jobs past their deadline, in that tenant only or
    in every one."""
    clock = Clock()
    async with await AsyncEventStore.open(url) as store:
        jobs = AsyncJobs(store, lease=timedelta(minutes=1), max_attempts=2, clock=clock)
        a = await jobs.submit("wf", {}, user_id="u", tenant_id="acme")
        b = await jobs.submit("wf", {}, user_id="u", tenant_id="globex")
        await jobs.claim("w1", tenant_id="acme")
        await jobs.claim("w1", tenant_id="globex")
        with pytest.raises(InvalidArgument):
            await jobs.sweep(datetime(2026, 1, 1, 12, 30))  # naive
        assert await jobs.sweep() == []
        assert await jobs.sweep(clock.now + timedelta(seconds=45)) == []
        swept = await jobs.sweep(clock.now + timedelta(minutes=2), tenant_id="acme")
        assert [(s.job_id, s.tenant_id, s.action) for s in swept] == [
            (a.job_id, "acme", "requeued")]
        assert (await jobs.get(b.job_id, tenant_id="globex")).status == "running"
        clock.advance(minutes=2)
        await jobs.claim("w1", tenant_id="acme")
        c = await jobs.submit("wf", {}, user_id="u")
        await jobs.claim("w2")
        await jobs.suspend(c.job_id, "w2", request_id="r-1", prompt="?",
                           deadline=clock.now + timedelta(minutes=1))
        swept = await jobs.sweep(clock.now + timedelta(minutes=2))
        assert sorted((s.job_id, s.tenant_id, s.action) for s in swept) == sorted([
            (a.job_id, "acme", "failed"), (b.job_id, "globex", "requeued"),
            (c.job_id, "default", "failed")])
        assert {s.reason for s in swept if s.job_id != b.job_id} == {
            "worker lost", "deadline passed"}


@pytest.mark.parametrize(("twin", "option", "value"), [
    (AsyncConversations, "snapshot_every", 0),
    (AsyncContinuations, "ttl", timedelta(0)),
    (AsyncContinuations, "claim_timeout", timedelta(0)),
    (AsyncContinuations, "clock", "noon"),
    (AsyncAgentSessions, "clock", "noon"),
    (AsyncFlows, "clock", "noon"),
    (AsyncJobs, "lease", timedelta(0)),
    (AsyncJobs, "max_attempts", 0),
    (AsyncJobs, "clock", "noon"),
])
@pytest.mark.asyncio
async def test_twin_constructors_pass_their_options_to_the_facade(
        url: str, twin: Any, option: str, value: Any) -> None:
    """An option the sync facade refuses is refused by its twin's constructor too."""
    async with await AsyncEventStore.open(url) as store:
        with pytest.raises(InvalidArgument, match=option):
            twin(store, **{option: value})


@pytest.mark.asyncio
async def test_a_rebuild_that_fails_for_good_fails_the_first_call_and_only_its_facade(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call of a twin whose stale rows cannot be rebuilt (nothing ran on the store
    before it) waits for the rebuild and raises its failure, also for a conversation the fold
    has no quarrel with; a twin of another kind, made while that rebuild was pending, works."""

    _stale_conversation_rows(url)
    real_evolve = ConversationProjection.evolve

    def refusing(self: Any, state: Any, event: Any) -> Any:
        if event.stream_id == "conversation-c-1":
            raise ValueError("this fold refuses an old event")
        return real_evolve(self, state, event)

    monkeypatch.setattr(ConversationProjection, "evolve", refusing)
    async with await AsyncEventStore.open(url) as astore:
        conversations = AsyncConversations(astore)
        jobs = AsyncJobs(astore)
        with pytest.raises(ProjectionFailed, match="refuses an old event"):
            await conversations.get("c-2")
        job = await jobs.submit("wf", {}, user_id="u")
        assert [j.job_id for j in await jobs.list()] == [job.job_id]

@pytest.mark.asyncio
async def test_job_twin_reads_of_an_unfinished_job_end_without_waiting_a_poll(
        url: str) -> None:
    """A follow whose timeout comes before its next poll ends at the timeout, not after the
    poll interval; a read without follow ends once it has the events there are."""
    async with await AsyncEventStore.open(url) as store:
        jobs = AsyncJobs(store)
        job = await jobs.submit("wf", {}, user_id="u", tenant_id="acme")

        async def read(**follow: Any) -> list[str]:
            return [ev.type async for ev in jobs.events(job.job_id, tenant_id="acme",
                                                        poll_interval=60, **follow)]

        assert await asyncio.wait_for(read(follow=True, timeout=0.2), 20) == ["JobSubmitted"]
        assert await asyncio.wait_for(read(), 20) == ["JobSubmitted"]  # no follow: at once
