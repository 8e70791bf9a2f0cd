"""The projection engine: inline, projector, failures, snapshots, rebuild and verify."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import time as _time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import errors as pg
from sqlalchemy import event, func, insert, select, text, update
from sqlalchemy import exc as sa_exc

import eventstore._core as core
import projections._engine as engine
import projections._engine as engine_module
from eventstore import Event, EventStore, InvalidArgument, RawEvent, RecordedEvent, upcaster
from eventstore._backend import begin_write, is_transient, translate
from eventstore._backend import begin_write as _begin_write
from eventstore._bound import BoundStore, transaction
from eventstore._schema import events, projection_rows, snapshots
from eventstore._schema import events as event_table
from eventstore._schema import projections as bookkeeping
from eventstore._schema import projections as engine_projections
from eventstore._schema import projections as projections_table
from eventstore._time import to_micros
from eventstore.errors import DatabaseError, EventDecodeError
from projections import (
    ConversationProjection,
    Conversations,
    ProjectionFailed,
    ProjectionStopped,
    Projector,
    RowIndex,
    _engine,
    current,
    fold_live,
    inline,
    rebuild,
    restart,
    status,
    verify,
)
from projections._engine import (
    _PAGE,
    _fast,
    _rebuild,
    lease_clock,
    load_row,
    query_rows,
    snapshot_now,
)
from projections._engine import ProjectionFailed as Failed
from projections.aio import AsyncConversations
from projections.errors import RebuildInProgress
from tests._between import AfterFirstStatement
from tests._events import CounterIncremented, NoteAdded
from tests._projections import SlicedTally, Tally, TallyProjection


def bump(store: EventStore, stream: str, n: int, by: int = 1, tenant: str = "default", *,
         per_append: int = 1) -> None:
    for first in range(0, n, per_append):
        store.append(f"counter-{stream}", [CounterIncremented(by=by, writer=stream)
                                           for _ in range(min(per_append, n - first))],
                     tenant_id=tenant)


def rows_of(store: EventStore, p: TallyProjection) -> dict[tuple[str, str], Tally]:
    return {(t, s): st for t, s, st, _v in query_rows(store, p, tenant_id=None)}


def test_inline_rows_are_current_right_after_append(store: EventStore) -> None:
    """An inline projection's row reflects an append as soon as append returns."""
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 3, by=2)
    row = load_row(store, p, "default", "counter-a")
    assert row is not None and row[0].total == 6 and row[1] == 3


def test_inline_projection_catches_up_on_history(store: EventStore) -> None:
    """An inline projection added to a store with history folds the history first."""
    bump(store, "a", 4)
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 1)
    row = load_row(store, p, "default", "counter-a")
    assert row is not None and row[0].count == 5


def test_inline_failure_rejects_the_append(store: EventStore) -> None:
    """A fold that raises inline makes the append fail, writing nothing."""
    inline(store, TallyProjection(poison=13))
    bump(store, "a", 1)
    with pytest.raises(ProjectionFailed) as info:
        store.append("counter-a", [CounterIncremented(by=13)])
    assert info.value.position == 2 and info.value.stream_id == "counter-a"
    assert store.stream_version("counter-a") == 1


def test_a_fold_raising_an_unprintable_error_fails_as_any_other(store: EventStore) -> None:
    """An exception whose ``__str__`` raises, out of a fold: ProjectionFailed inline (nothing
    written) and in a projector (the failure in status), as any other error; the store's
    message about it raised the ``__str__``'s own error instead, and the projector never
    recorded the failure (a tester's find)."""
    class UnprintableTally(TallyProjection):
        def evolve(self, state: Any, event: RecordedEvent) -> Any:
            if getattr(event.data, "by", None) == 13:
                raise _Unprintable
            return super().evolve(state, event)

    inline(store, UnprintableTally("tally_unprintable_inline"))
    bump(store, "a", 1)
    with pytest.raises(ProjectionFailed) as info:
        store.append("counter-a", [CounterIncremented(by=13)])
    assert "cannot be shown" in str(info.value) and store.stream_version("counter-a") == 1
    with EventStore.open(store.url) as other:
        other.append("counter-b", [CounterIncremented(by=13)])
        with pytest.raises(ProjectionFailed):
            Projector(other, [UnprintableTally("tally_unprintable")]).catch_up()
        (st,) = status(other, "tally_unprintable")
    assert (st.status, st.failed_position) == ("failed", 2)
    assert "_Unprintable, whose message cannot be shown" in (st.error or "")


def test_inline_catch_up_failing_on_another_writers_event_stops_the_projection(
        url: str) -> None:
    """An event appended by a process without the inline projection, that its fold refuses,
    stops the projection there in ``status`` (as a projector's would): the append that met it
    goes through, later ones get ProjectionStopped, and a restart with fixed code folds all.
    The other writer's events before that one are folded: it stops exactly there."""

    with EventStore.open(url) as runner, EventStore.open(url) as other:
        inline(runner, TallyProjection("tally_catch_up", poison=13))
        bump(runner, "a", 1)
        other.append("counter-d", [CounterIncremented(by=4)])  # position 2
        other.append("counter-b", [CounterIncremented(by=13)])  # position 3
        bump(runner, "a", 1)  # meets position 3 while catching up: goes through
        (st,) = status(runner, "tally_catch_up")
        assert (st.status, st.failed_position, st.position) == ("failed", 3, 2)
        assert st.error is not None and "counter-b" in st.error
        assert {k: t.count for k, t in rows_of(runner, TallyProjection("tally_catch_up"))
                .items()} == {("default", "counter-a"): 1, ("default", "counter-d"): 1}
        with pytest.raises(ProjectionStopped):
            bump(runner, "a", 1)
        assert runner.stream_version("counter-a") == 2
    with EventStore.open(url) as fixed:
        p = TallyProjection("tally_catch_up")
        inline(fixed, p)
        restart(fixed, "tally_catch_up")
        bump(fixed, "a", 1)
        assert {k: (t.count, t.total) for k, t in rows_of(fixed, p).items()} == {
            ("default", "counter-a"): (3, 3), ("default", "counter-b"): (1, 13),
            ("default", "counter-d"): (1, 4)}
        assert status(fixed, "tally_catch_up")[0].status == "running"


def test_inline_catch_up_stop_holds_when_one_transaction_appends_twice(url: str) -> None:
    """The catch-up that stops the projection records it in the append's transaction; a second
    append of the same transaction (a facade's command, a sweep) goes through the same way
    instead of refusing and rolling that record back with it."""

    with EventStore.open(url) as runner, EventStore.open(url) as other:
        inline(runner, TallyProjection("tally_twice", poison=13))
        bump(runner, "a", 1)
        other.append("counter-b", [CounterIncremented(by=13)])
        with transaction(runner, write=True) as conn:
            bound = BoundStore(runner, conn)
            bound.append("counter-a", [CounterIncremented(by=1)])
            bound.append("counter-c", [CounterIncremented(by=1)])
        (st,) = status(runner, "tally_twice")
        assert (st.status, st.failed_position) == ("failed", 2)
        assert runner.stream_version("counter-c") == 1
        with pytest.raises(ProjectionStopped), transaction(runner, write=True) as conn:
            BoundStore(runner, conn).append("counter-c", [CounterIncremented(by=1)])
        assert runner.stream_version("counter-c") == 1


def test_inline_catch_up_meeting_an_unreadable_event_stops_the_projection(url: str) -> None:
    """An event this code cannot read, appended without the projection, stops it as a fold
    that raises does (in status, naming the event), not every later append unseen."""

    with EventStore.open(url) as runner, EventStore.open(url) as other:
        inline(runner, TallyProjection("tally_unreadable"))
        bump(runner, "a", 1)
        other.append("counter-b", [CounterIncremented(by=1)])
        with begin_write(other.engine) as conn:  # as if written when `by` was a string
            conn.execute(update(event_table).where(event_table.c.position == 2).values(
                data=b'{"type":"test.CounterIncremented","by":"one"}'))
        bump(runner, "a", 1)
        (st,) = status(runner, "tally_unreadable")
        assert (st.status, st.failed_position) == ("failed", 2)
        assert "EventDecodeError" in (st.error or "") and "counter-b" in (st.error or "")
        with pytest.raises(ProjectionStopped):
            bump(runner, "a", 1)


def test_projector_applies_every_event_once_and_checkpoints(store: EventStore) -> None:
    """The projector folds all events; a second catch-up applies nothing more."""
    bump(store, "a", 5)
    bump(store, "b", 3, by=4)
    store.append("other-1", [CounterIncremented()])
    p = TallyProjection("tally_async")
    proj = Projector(store, [p], batch_size=3)
    assert proj.catch_up() == 8
    assert proj.catch_up() == 0
    rows = rows_of(store, p)
    assert rows[("default", "counter-a")].count == 5
    assert rows[("default", "counter-b")].total == 12
    (st,) = status(store, "tally_async")
    # (other-1 is not of its categories, which its row records: nothing left to apply)
    assert st.position == 8 and st.owner == proj.worker_id and st.lag == 0
    assert st.categories == ("counter",)


def test_second_projector_waits_for_the_lease(store: EventStore) -> None:
    """While one projector holds the lease, another applies nothing."""
    bump(store, "a", 2)
    p = TallyProjection("tally_async")
    first = Projector(store, [p], worker_id="w1", lease_seconds=30)
    second = Projector(store, [p], worker_id="w2", lease_seconds=30)
    assert first.run_once(p) == 2
    bump(store, "a", 1)
    assert second.run_once(p) == 0
    first.release()
    assert second.run_once(p) == 1
    assert rows_of(store, p)[("default", "counter-a")].count == 3


def test_expired_lease_is_taken_over(store: EventStore) -> None:
    """A projector whose lease ran out is replaced by another."""
    p = TallyProjection("tally_async")
    bump(store, "a", 1)
    Projector(store, [p], worker_id="dead", lease_seconds=0.05).run_once(p)
    bump(store, "a", 1)

    time.sleep(0.1)
    assert Projector(store, [p], worker_id="alive").run_once(p) == 1
    assert status(store, "tally_async")[0].owner == "alive"


def test_leases_run_on_real_time_not_on_a_store_clock(store: EventStore, url: str) -> None:
    """A lease is timed by the database server's clock (PostgreSQL) or the machine's (SQLite),
    never by a store's clock: a worker whose clock runs an hour ahead (another host's, or one
    set on its store) neither takes a live worker's lease nor keeps a dead one's an hour."""

    ahead = EventStore.open(url, clock=lambda: datetime.now(UTC) + timedelta(hours=1))
    try:
        p = TallyProjection("tally_async")
        bump(store, "a", 1)
        live = Projector(store, [p], worker_id="live", lease_seconds=30)
        assert live.run_once(p) == 1
        bump(store, "a", 1)
        assert Projector(ahead, [p], worker_id="ahead", lease_seconds=30).run_once(p) == 0
        assert status(store, "tally_async")[0].owner == "live"
        live.release()
        # The worker with the clock ahead takes it, then dies holding a short lease.
        assert Projector(ahead, [p], worker_id="dead", lease_seconds=0.2).run_once(p) == 1
        bump(store, "a", 1)
        time.sleep(0.3)
        assert Projector(store, [p], worker_id="alive", lease_seconds=30).run_once(p) == 1
        assert status(store, "tally_async")[0].owner == "alive"
        assert rows_of(store, p)[("default", "counter-a")].count == 3
    finally:
        ahead.close()


def test_a_lease_given_after_a_wait_for_the_row_runs_its_whole_time(store: EventStore) -> None:
    """A worker that waited for the projection's row (another transaction held it) is given a
    lease that starts when it is given, not when its wait began."""


    p = TallyProjection("tally_async")
    bump(store, "a", 1)
    worker = Projector(store, [p], worker_id="w", lease_seconds=3.0)
    holding = threading.Event()

    def hold() -> None:
        with begin_write(store.engine) as conn:  # (SQLite: the write lock; PostgreSQL: the row)
            conn.execute(select(bookkeeping).where(bookkeeping.c.name == p.name)
                         .with_for_update())
            holding.set()
            time.sleep(0.6)  # (a batch waits up to a second for the row)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        assert worker.run_once(p) == 1
        (st,) = status(store, p.name)
        assert st.owner == "w" and st.lease_until is not None
        assert st.lease_until - lease_clock(store) > timedelta(seconds=2.7)  # (not 2.4)
    finally:
        holder.join()


def test_failing_projection_stops_at_the_event(store: EventStore) -> None:
    """A fold error names position, type and stream, shows in status, and resumes on restart.
    The batch's events before it are applied: the projection stops exactly there."""
    bump(store, "a", 2)
    store.append("counter-b", [CounterIncremented(by=13)])
    bump(store, "a", 1)
    bad = TallyProjection("tally_async", poison=13)
    proj = Projector(store, [bad])
    with pytest.raises(ProjectionFailed) as info:
        proj.catch_up()
    err = info.value
    assert (err.position, err.type, err.stream_id) == (3, "test.CounterIncremented",
                                                        "counter-b")
    (st,) = status(store, "tally_async")
    assert st.status == "failed" and st.failed_position == 3 and "position 3" in (st.error or "")
    assert st.position == 2
    assert rows_of(store, bad)[("default", "counter-a")].count == 2
    assert ("default", "counter-b") not in rows_of(store, bad)
    assert proj.run_once(bad) == 0

    restart(store, "tally_async")
    fixed = TallyProjection("tally_async")
    assert Projector(store, [fixed]).catch_up() == 2
    assert rows_of(store, fixed)[("default", "counter-a")].count == 3
    assert verify(store, fixed) == []


def test_status_reads_one_moment_when_the_log_and_a_projector_move_meanwhile(url: str) -> None:
    """``status`` read the log's head, then the projections' rows, then what each is behind,
    each its own statement: on PostgreSQL a projector catching up in between showed a
    position past the head, and an append in between a projection further behind than it was
    at the head shown.  Every figure is now of one moment (before or after the change)."""
    def triple(st: Any) -> tuple[int, int, int | None]:
        return st.position, st.head, st.behind

    with EventStore.open(url, migrate=True) as store, EventStore.open(url) as other:
        tally = TallyProjection("tally_moment")
        projector = Projector(other, [tally])  # (one: it keeps the projection's lease)
        bump(store, "a", 2)
        projector.catch_up()
        changes = {
            "a projector catching up": lambda: (bump(other, "a", 1), projector.catch_up()),
            "an append": lambda: bump(other, "a", 1),
        }
        for what, change in changes.items():
            (before,) = status(store, "tally_moment")
            with AfterFirstStatement(store.engine, change) as between:
                (got,) = status(store, "tally_moment")
            (after,) = status(store, "tally_moment")
            assert between.ran
            assert triple(before) != triple(after)
            assert triple(got) in (triple(before), triple(after)), what


def test_a_failed_rebuild_shows_in_status_until_one_succeeds(store: EventStore) -> None:
    """A rebuild that fails on an event records the failure in ``status`` (the projection goes on
    answering from its rows); a rebuild that then succeeds clears it.  A failure a projector
    recorded is not overwritten by a rebuild that fails elsewhere."""
    bump(store, "a", 2)
    store.append("counter-b", [CounterIncremented(by=13)])
    with pytest.raises(ProjectionFailed):
        rebuild(store, TallyProjection("tally_rb", poison=13))
    (st,) = status(store, "tally_rb")
    assert st.error is not None and "counter-b" in st.error
    rebuild(store, TallyProjection("tally_rb"))
    (st,) = status(store, "tally_rb")
    assert (st.status, st.error, st.failed_position) == ("running", None, None)

    with pytest.raises(ProjectionFailed):
        Projector(store, [TallyProjection("tally_pf", poison=13)]).catch_up()
    (failed,) = status(store, "tally_pf")
    assert (failed.status, failed.failed_position) == ("failed", 3)
    with pytest.raises(ProjectionFailed):
        rebuild(store, TallyProjection("tally_pf", poison=1))  # fails at position 1
    (st,) = status(store, "tally_pf")
    assert (st.status, st.failed_position, st.error) == ("failed", 3, failed.error)


def test_catch_up_runs_the_other_projections_past_a_failing_one(store: EventStore) -> None:
    """One projection failing does not keep the others from catching up: the first failure is
    raised after all have run (catch_up_each returns them instead)."""
    bump(store, "a", 2)
    store.append("counter-b", [CounterIncremented(by=13)])
    first, second = TallyProjection("tally_bad", poison=13), TallyProjection("tally_good")
    proj = Projector(store, [first, second])
    with pytest.raises(ProjectionFailed) as info:
        proj.catch_up()
    assert info.value.projection == "tally_bad"
    assert status(store, "tally_good")[0].position == 3
    assert status(store, "tally_bad")[0].status == "failed"
    store.append("counter-b", [CounterIncremented(by=1)])
    applied, failures = proj.catch_up_each()
    assert applied == 1 and failures == []  # (a failed projection applies nothing)
    assert status(store, "tally_good")[0].position == 4


def test_catch_up_raises_a_transient_database_error_and_fails_no_projection(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock held too long or a lost connection during catch_up goes up to the caller (trying
    again may pass); it is not recorded as the projection's failure."""

    bump(store, "a", 2)
    p = TallyProjection("tally_transient")
    proj = Projector(store, [p])

    def locked(self: Projector, projection: Any) -> int:
        err = DatabaseError("database error: OperationalError: database is locked")
        err.transient = True
        raise err

    monkeypatch.setattr(Projector, "run_once", locked)
    for call in (proj.catch_up, proj.catch_up_each):
        with pytest.raises(DatabaseError, match="locked"):
            call()
    assert [st.status for st in status(store) if st.name == "tally_transient"] in (
        [], ["running"])
    monkeypatch.undo()
    assert proj.catch_up() == 2 and status(store, "tally_transient")[0].position == 2


def test_renamed_is_a_copy_kept_in_its_own_rows(store: EventStore) -> None:
    """renamed gives the same fold under another name; the original keeps its name, and the
    two have their own rows and positions."""
    first = TallyProjection("tally_first")
    second = first.renamed("tally_second")
    assert (first.name, second.name) == ("tally_first", "tally_second")
    bump(store, "a", 2)
    Projector(store, [first]).catch_up()
    bump(store, "a", 1)
    Projector(store, [second]).catch_up()
    assert [(st.name, st.position) for st in status(store)] == [
        ("tally_first", 2), ("tally_second", 3)]


def test_restart_drops_a_dead_workers_lease(store: EventStore) -> None:
    """A worker that died holding a long lease keeps the others out until it runs out;
    restart drops it, so the next worker takes the projection at once."""

    p = TallyProjection("tally_async")
    bump(store, "a", 1)
    assert Projector(store, [p], worker_id="dead", lease_seconds=3600).run_once(p) == 1
    bump(store, "a", 1)
    other = Projector(store, [p], worker_id="other")
    assert other.run_once(p) == 0  # leased to "dead" for an hour
    restart(store, "tally_async")
    (st,) = status(store, "tally_async")
    assert st.owner is None and st.lease_until is None and st.status == "running"
    assert other.run_once(p) == 1
    assert status(store, "tally_async")[0].owner == "other"


def test_an_event_the_code_cannot_read_stops_the_projector_there(store: EventStore) -> None:
    """An undecodable event (stored by code whose type had another shape) fails the projection
    at that event as a failing fold does: position, type and stream in the error and in
    status; a plain read names the event too."""

    bump(store, "a", 2)
    store.append("counter-b", [CounterIncremented(by=1)])
    bump(store, "a", 1)
    with begin_write(store.engine) as conn:  # as if written when `by` was a string
        conn.execute(update(event_table).where(event_table.c.position == 3).values(
            data=b'{"type":"test.CounterIncremented","by":"one"}'))
    with pytest.raises(EventDecodeError) as read:
        list(store.read_all())
    assert (read.value.position, read.value.type, read.value.stream_id,
            read.value.tenant_id) == (3, "test.CounterIncremented", "counter-b", "default")
    assert "position 3" in str(read.value)
    projection = TallyProjection("tally_decode")
    with pytest.raises(ProjectionFailed) as info:
        Projector(store, [projection]).catch_up()
    assert (info.value.position, info.value.type, info.value.stream_id) == (
        3, "test.CounterIncremented", "counter-b")
    assert isinstance(info.value.__cause__, EventDecodeError)
    (st,) = status(store, "tally_decode")
    assert st.status == "failed" and st.failed_position == 3 and st.position == 2
    assert rows_of(store, projection)[("default", "counter-a")].count == 2
    assert "EventDecodeError" in (st.error or "")


def test_an_event_of_a_newer_schema_stops_this_projector_but_not_the_projection(
        store: EventStore) -> None:
    """In a rolling deploy newer code appends schema 2 of a type this code knows as 1: this
    projector stops with the decode error, but the projection is not marked failed, so a
    projector on the newer code (which can read it) carries on."""

    bump(store, "a", 2)
    with begin_write(store.engine) as conn:  # as newer code (CounterIncremented v2) wrote it
        conn.execute(update(event_table).where(event_table.c.position == 2).values(
            schema_version=2, data=b'{"type":"test.CounterIncremented","by":2,"unit":"x"}'))
    projection = TallyProjection("tally_newer")
    with pytest.raises(EventDecodeError) as info:
        Projector(store, [projection]).catch_up()
    assert info.value.newer_schema and info.value.position == 2
    (st,) = status(store, "tally_newer")
    assert st.status == "running" and st.failed_position is None


def test_lag_counts_the_events_a_registered_projection_has_yet_to_apply(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caught-up projection has lag 0 even when the log goes on with other categories (its
    position is its last event's, the head the log's); events of its categories count."""

    monkeypatch.setitem(engine._registry, "tally_lag", lambda: TallyProjection("tally_lag"))
    conversations = Conversations(store)
    conversations.assign("c-1", {"n": 1})
    bump(store, "a", 2)
    store.append("note-1", [NoteAdded(text="other category")])
    Projector(store, [TallyProjection("tally_lag"), TallyProjection("tally_unregistered")]
              ).catch_up()
    lags = {st.name: st.lag for st in status(store)}
    assert lags["tally_lag"] == 0 and lags["conversations"] == 0
    assert lags["tally_unregistered"] == 0  # its row records its categories
    bump(store, "b", 3)
    store.append("note-2", [NoteAdded(text="other category")])
    conversations.assign("c-1", {"n": 2})
    lags = {st.name: st.lag for st in status(store)}
    assert lags["tally_lag"] == 3 and lags["conversations"] == 0
    assert lags["tally_unregistered"] == 3


def test_snapshots_are_taken_and_used(store: EventStore) -> None:
    """Live folds save a snapshot every N events and later start from it."""
    p = TallyProjection(snapshot_every=10)
    bump(store, "a", 25)
    state, version = fold_live(store, p, "counter-a", tenant_id="default")
    assert (state.count, version) == (25, 25)


    with store.engine.connect() as c:
        snaps = c.execute(select(snapshots.c.version)).scalars().all()
    assert snaps == [25]
    bump(store, "a", 2)
    assert fold_live(store, p, "counter-a", tenant_id="default")[0].count == 27
    assert fold_live(store, p, "counter-a", tenant_id="default", at_version=20)[0].count == 20


def test_inline_projections_save_a_snapshot_every_n_events_of_a_stream(url: str) -> None:
    """An inline projection's policy: the append that takes a stream past a multiple of
    snapshot_every saves the row's state as a snapshot, in the same transaction; time travel
    then starts from it, and gives what a fold from the start gives."""


    p = TallyProjection("tally_snap", snapshot_every=4)
    with EventStore.open(url) as store:
        inline(store, p)
        bump(store, "a", 6)  # versions 1..6: one at 4
        store.append("counter-a", [CounterIncremented(by=2, writer="a")] * 3)  # 7..9: at 9
        bump(store, "b", 3)  # none yet
        with store.engine.connect() as c:
            snaps = c.execute(select(snapshots.c.stream_id, snapshots.c.version,
                                     snapshots.c.position)
                              .where(snapshots.c.projection == "tally_snap")
                              .order_by(snapshots.c.version)).all()
        assert [(s, v) for s, v, _p in snaps] == [("counter-a", 4), ("counter-a", 9)]
        positions = {e.version: e.position for e in store.read_stream("counter-a")}
        assert [pos for _s, v, pos in snaps] == [positions[4], positions[9]]
        for at in (4, 5, 9):
            from_snapshot = fold_live(store, p, "counter-a", tenant_id="default", at_version=at)
            from_start = fold_live(store, p, "counter-a", tenant_id="default", at_version=at,
                                   use_snapshots=False)
            assert from_snapshot == from_start and from_snapshot[1] == at
        assert fold_live(store, p, "counter-a", tenant_id="default")[0].total == 12
    off = TallyProjection("tally_no_snap", snapshot_every=None)
    with EventStore.open(url) as store:
        inline(store, off)
        bump(store, "c", 5)
        with store.engine.connect() as c:
            assert c.execute(select(snapshots.c.version).where(
                snapshots.c.projection == "tally_no_snap")).all() == []


def test_snapshot_of_changed_code_is_ignored(store: EventStore) -> None:
    """A snapshot written by another projection version is not trusted."""
    p = TallyProjection(snapshot_every=5)
    bump(store, "a", 6)
    assert snapshot_now(store, p, "counter-a", tenant_id="default") == 6

    with begin_write(store.engine) as conn:  # corrupt the snapshot's state
        conn.execute(update(snapshots).values(state=b'{"count":999,"total":0,"writers":[],'
                                                    b'"last_version":6}'))
    assert fold_live(store, p, "counter-a", tenant_id="default")[0].count == 999

    class TallyV2(TallyProjection):
        version = 2

    assert fold_live(store, TallyV2(snapshot_every=5), "counter-a",
                     tenant_id="default")[0].count == 6


def test_rebuild_swaps_in_new_rows_while_old_ones_answer(store: EventStore) -> None:
    """Rebuild keeps queries on the old rows until the swap, and appends during it count."""
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 30)
    with begin_write(store.engine) as conn:  # damage the live rows
        conn.execute(update(projection_rows).values(
            state=b'{"count":-1,"total":0,"writers":[],"last_version":30}'))
    seen_during: list[int] = []

    def progress(done: int, total: int) -> None:
        row = load_row(store, p, "default", "counter-a")
        assert row is not None
        seen_during.append(row[0].count)
        if len(seen_during) == 1:
            bump(store, "a", 2)  # appends while the rebuild runs

    gen = rebuild(store, p, progress=progress)
    assert gen == 2
    assert seen_during and seen_during[0] == -1
    row = load_row(store, p, "default", "counter-a")
    assert row is not None and row[0].count == 32
    assert verify(store, p) == []


def test_rows_a_rebuild_swapped_out_go_even_if_it_stopped_before_deleting_them(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild interrupted between its swap and its delete of the old rows (Ctrl-C, a kill)
    leaves them behind: the next rebuild drops them with the generation it swaps out."""


    def generations() -> dict[int, int]:
        pr = projection_rows
        with begin_write(store.engine) as conn:
            return {g: n for g, n in conn.execute(
                select(pr.c.generation, func.count()).where(pr.c.projection == p.name)
                .group_by(pr.c.generation))}

    def interrupted(*_args: Any) -> None:
        raise KeyboardInterrupt

    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 3)
    bump(store, "b", 2)
    monkeypatch.setattr(_engine, "_drop_older_generations", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rebuild(store, p)
    monkeypatch.undo()
    assert generations() == {1: 2, 2: 2}  # swapped to 2; the rows of 1 stayed
    assert rebuild(store, p) == 3
    assert generations() == {3: 2}
    assert verify(store, p) == []


@pytest.mark.parametrize("layout", ["one-tenant", "a-tenant-each"])
def test_rebuild_looks_rows_up_by_their_whole_key_in_few_statements(
        store: EventStore, layout: str) -> None:
    """A page's rows are looked up by the primary key.  SQLite planned the former OR of
    (tenant, stream) pairs as a scan of all the generation's rows, per chunk, so rebuilding
    (or projecting) one-event streams took time growing with their number squared (40,500
    streams: 64 s); there each key is a statement of its own now (no round trip), planned as
    a search also once the tables are analyzed.  On PostgreSQL a chunk of 200 keys is a few
    statements whatever its tenants (a statement a tenant made one per stream where every
    stream has its own tenant: 20,000 streams, 71 s against 9 s)."""


    p = TallyProjection()
    inline(store, p)
    for i in range(300):
        tenant = "acme" if layout == "one-tenant" else f"tenant-{i}"
        store.append(f"counter-{i}", [CounterIncremented(by=i)], tenant_id=tenant)
    sqlite = store.backend == "sqlite"
    if sqlite:  # with statistics (a Bloom filter over the whole table came with them)
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    lookups: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().startswith(("SELECT", "WITH")) \
                and re.search(r"es_projection_rows\.stream_id (IN|=)", statement):
            lookups.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        rebuild(store, p)
        assert verify(store, p) == []
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    assert len(rows_of(store, p)) == 300
    if not sqlite:
        assert 2 <= len(lookups) <= 8, len(lookups)  # (rebuild and verify: pages of 300)
        return
    with store.engine.connect() as conn:
        get_row = _fast("get_row", conn)
        lookups.append((get_row.sql, get_row.args({
            "projection": "tally", "generation": 1, "tenant_id": "acme",
            "stream_id": "counter-1"})))
        for statement, params in lookups:
            plan = [row[-1] for row in conn.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {statement}", tuple(params))]
            assert any("es_projection_rows" in step and "stream_id=?" in step
                       for step in plan), (statement, plan)
            assert not any(step.startswith("SCAN") or "BLOOM" in step for step in plan), plan


def test_verify_reports_differences(store: EventStore) -> None:
    """verify rebuilds into scratch rows and lists the streams that differ."""
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 3)
    bump(store, "b", 2)
    assert verify(store, p) == []
    with begin_write(store.engine) as conn:
        conn.execute(update(projection_rows)
                     .where(projection_rows.c.stream_id == "counter-b")
                     .values(state=b'{"count":7}'))
    diffs = verify(store, p)
    assert [(d.stream_id, d.live.count, d.rebuilt.count) for d in diffs] == [("counter-b", 7, 2)]
    with store.engine.connect() as c:  # the scratch rows are gone

        gens = set(c.execute(select(projection_rows.c.generation)).scalars())
    assert gens == {1}


def test_an_inline_projection_folds_a_raw_event_of_a_known_type_as_typed(
        store: EventStore) -> None:
    """A raw append of a registered type is folded inline as the typed event every read gives
    (the fold got the RawEvent: a fold that tests for the type skipped it, one that reads its
    fields failed the append)."""
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 1)
    store.append("counter-a", [RawEvent(type="test.CounterIncremented",
                                        data={"by": 5, "writer": "raw"})])
    bump(store, "a", 1)
    row = load_row(store, p, "default", "counter-a")
    assert row is not None and (row[0].count, row[0].total) == (3, 7)
    assert verify(store, p) == []


def test_verify_reports_a_value_that_changed_type_but_compares_equal(
        store: EventStore) -> None:
    """A row whose value became ``true`` or ``1.0`` where the log gives ``1`` is a difference
    (Python's == took them for one another)."""

    conversations = Conversations(store)
    for cid in ("c0", "c1", "c2"):
        conversations.assign(cid, {"a": 1})
    assert verify(store, ConversationProjection()) == []
    with begin_write(store.engine) as conn:
        for cid, value in (("c1", "true"), ("c2", "1.0")):
            row = conn.execute(select(projection_rows.c.state).where(
                projection_rows.c.stream_id == f"conversation-{cid}")).scalar_one()
            conn.execute(update(projection_rows)
                         .where(projection_rows.c.stream_id == f"conversation-{cid}")
                         .values(state=bytes(row).replace(b'"a":1', f'"a":{value}'.encode())))
    diffs = verify(store, ConversationProjection())
    assert [d.stream_id for d in diffs] == ["conversation-c1", "conversation-c2"]


def test_a_row_an_operator_edited_by_sql_as_text_reads_verifies_and_folds(
        store: EventStore, backend: str, url: str) -> None:
    """A state written back by SQL (``replace()`` gives text on SQLite, which then sits as TEXT
    in the BLOB column) is read as the reads read it: verify reports it as a difference (it
    raised a bare TypeError) and an inline append folds onto it (it stopped the projection)."""


    conversations = Conversations(store)
    conversations.assign("c", {"a": 7})
    with begin_write(store.engine) as conn:
        values = {"old": '"a":7', "new": '"a":1'}
        if backend == "sqlite":
            conn.execute(text("UPDATE es_projection_rows SET state = replace(state, :old, :new)"),
                         values)
            assert conn.execute(text("SELECT typeof(state) FROM es_projection_rows")
                                ).scalar_one() == "text"
        else:
            conn.execute(text("UPDATE es_projection_rows SET state = convert_to(replace("
                              "convert_from(state, 'UTF8'), :old, :new), 'UTF8')"), values)
    (d,) = verify(store, ConversationProjection())
    assert d.stream_id == "conversation-c" and "UndecodableRow" not in repr(d.live)
    # (Another process: this one folds its next append onto the row as it wrote it.)
    with EventStore.open(url) as other:
        Conversations(other).assign("c", {"b": 2})
    state = conversations.get("c")
    assert state is not None and state.variables == {"a": 1, "b": 2}


def test_verify_reports_rows_whose_index_columns_or_version_differ(store: EventStore) -> None:
    """A row with the right state but a wrong index column (status, group_key, sort_key) or
    version is a difference too: queries by those columns would go wrong."""
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 3, by=20)
    with begin_write(store.engine) as conn:
        conn.execute(update(projection_rows).where(projection_rows.c.stream_id == "counter-a")
                     .values(status="small", version=7))
    (d,) = verify(store, p)
    assert d.stream_id == "counter-a" and d.live == d.rebuilt
    assert (d.columns, d.live_columns, d.rebuilt_columns) == (
        ("version", "status"), (7, "small"), (3, "big"))
    with begin_write(store.engine) as conn:
        conn.execute(update(projection_rows).where(projection_rows.c.stream_id == "counter-a")
                     .values(status="big", version=3, sort_key=-1))
    (d,) = verify(store, p)
    assert (d.columns, d.live_columns, d.rebuilt_columns) == (("sort_key",), (-1,), (60,))


def test_verify_drops_the_scratch_rows_of_a_verify_killed_long_ago(store: EventStore) -> None:
    """A verify killed mid-run (its cleanup never ran) leaves scratch rows; the next verify
    deletes them once they are a day old, and leaves a running verify's fresh ones."""

    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 2)
    now = to_micros(store.now())
    row = {"projection": p.name, "tenant_id": "default", "stream_id": "counter-a",
           "version": 1, "position": 1, "state": b'{"count":1}'}
    with begin_write(store.engine) as conn:
        conn.execute(insert(projection_rows), [
            {**row, "generation": -5, "updated_at": now - 25 * 3600 * 10**6},
            {**row, "generation": -6, "updated_at": now - 23 * 3600 * 10**6}])
    assert verify(store, p) == []
    with store.engine.connect() as c:
        gens = set(c.execute(select(projection_rows.c.generation)).scalars())
    assert gens == {1, -6}


def test_a_verify_on_a_store_clock_days_ahead_leaves_a_running_verifys_rows(
        store: EventStore, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scratch rows are stamped and aged on the machine's clock, not on a store's: a verify
    from a store whose clock is set days ahead leaves the rows of a verify running beside it
    (which, without them, reported every stream of its first pages missing)."""

    monkeypatch.setattr(_engine, "_PAGE", 2)  # verify's pages of 10 events
    p = TallyProjection()
    inline(store, p)
    for stream in "abcdef":
        bump(store, stream, 5)
    ahead = EventStore.open(url, clock=lambda: datetime.now(UTC) + timedelta(days=2))
    try:
        beside: list[Any] = []

        def progress(_done: int, _total: int) -> None:
            if not beside:  # after the first page of scratch rows
                beside.append(verify(ahead, p))

        assert verify(store, p, progress=progress) == []
        assert beside == [[]]
    finally:
        ahead.close()


def test_query_rows_by_index(store: EventStore) -> None:
    """Rows are queryable by their indexed status, ordered by sort key."""
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 1, by=20)
    bump(store, "b", 1, by=3)
    bump(store, "c", 1, by=11)
    bump(store, "d", 1, by=50, tenant="other")
    big = query_rows(store, p, tenant_id="default", status="big")
    assert [(s, st.total) for _t, s, st, _v in big] == [("counter-c", 11), ("counter-a", 20)]
    assert len(query_rows(store, p, tenant_id=None, status="big")) == 3
    before = query_rows(store, p, tenant_id="default", status="big", sort_before=20)
    assert [s for _t, s, _st, _v in before] == ["counter-c"]  # (strictly before: not a's 20)

    assert len(query_rows(store, p, tenant_id="default", status=(s for s in ["big"]))) == 2
    for bad in ({"limit": -1}, {"limit": "2"}, {"sort_before": 2**63}, {"status": ""},
                {"status": 5}):
        with pytest.raises(InvalidArgument):
            query_rows(store, p, tenant_id="default", **bad)  # type: ignore[arg-type]


def _states(store: EventStore, p: Any) -> dict[str, Any]:
    return {s: st for _t, s, st, _v in query_rows(store, p, tenant_id=None)}


class TallyV2(TallyProjection):
    """The same fold at a new code version, counting each event twice."""

    version = 2

    def evolve(self, state: Tally, event: Any) -> Tally:
        once = super().evolve(state, event)
        return Tally(count=once.count, total=state.total + 2 * (once.total - state.total),
                     writers=once.writers, last_version=once.last_version)


def test_new_fold_version_rebuilds_inline_rows_on_registration(url: str) -> None:
    """Registering v2 of an inline projection replays its rows with v2 before use."""
    with EventStore.open(url) as s1:
        inline(s1, TallyProjection())
        bump(s1, "a", 3, by=1)
    with EventStore.open(url) as s2:
        inline(s2, TallyV2())
        row = load_row(s2, TallyV2(), "default", "counter-a")
        assert row is not None and row[0].total == 6
        bump(s2, "a", 1, by=1)
        row = load_row(s2, TallyV2(), "default", "counter-a")
        assert row is not None and row[0].total == 8
        (st,) = status(s2, "tally")
        assert st.code_version == 2 and st.generation == 2


def test_old_fold_code_never_extends_newer_rows(url: str) -> None:
    """A process still running v1 leaves v2 rows alone; v2 readers see correct state."""
    with EventStore.open(url) as new, EventStore.open(url) as old:
        inline(new, TallyV2())
        inline(old, TallyProjection())  # stale code: no rebuild back to v1
        bump(new, "a", 1, by=1)
        bump(old, "a", 1, by=1)  # v1 handler sees v2 rows and skips them
        assert load_row(old, TallyProjection(), "default", "counter-a") is None

        assert current(new, TallyV2(), "counter-a", tenant_id="default")[0].total == 4
        bump(new, "a", 1, by=1)  # v2 handler catches up what v1 skipped
        row = load_row(new, TallyV2(), "default", "counter-a")
        assert row is not None and (row[0].total, row[1]) == (6, 3)


def test_start_up_rebuild_is_skipped_when_another_process_did_it_meanwhile(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes of a new release starting together each saw v1 rows; the first to get the
    projection's lock rebuilds them, the others find v2 rows under the lock and leave them
    (each rebuilt again: wasted replays).  An explicit rebuild still always rebuilds."""

    inline(store, TallyProjection())
    bump(store, "a", 2, by=1)
    assert status(store, TallyProjection.name)[0].generation == 1
    stale = status(store, TallyProjection.name)  # what each process read at start-up
    assert _rebuild(store, TallyV2(), progress=None, only_if_stale=True) == 2  # v1 rows: stale
    assert _rebuild(store, TallyV2(), progress=None, only_if_stale=True) == 2  # done meanwhile
    (st,) = status(store, TallyProjection.name)
    assert (st.generation, st.code_version) == (2, 2)
    # The start-up path itself, as a process that read the v1 status before the rebuild.

    monkeypatch.setattr(engine, "status", lambda *_a, **_k: stale)
    engine._rebuild_if_stale(store, TallyV2())
    monkeypatch.undo()
    assert status(store, TallyProjection.name)[0].generation == 2
    assert rebuild(store, TallyV2()) == 3


def test_projector_rebuilds_rows_of_another_fold_version(store: EventStore) -> None:
    """A projector running v2 over v1 rows replays them with v2."""
    bump(store, "a", 2, by=1)
    first = Projector(store, [TallyProjection("tally_async")])
    first.catch_up()
    first.release()
    v2 = TallyV2("tally_async")
    Projector(store, [v2], worker_id="w2").catch_up()
    assert rows_of(store, v2)[("default", "counter-a")].total == 4
    assert status(store, "tally_async")[0].code_version == 2


# -- live folds through evolve_slice --


def test_slice_fold_equals_the_record_fold_across_pages(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages of columns give what evolve gives record by record, time travel included."""

    monkeypatch.setattr(engine, "SLICE_PAGE", 4)  # many pages, one partly filled at the end
    for i in range(11):
        store.append("counter-a", [CounterIncremented(by=i, writer=f"w{i}")])
    sliced = SlicedTally(snapshot_every=None)
    plain = TallyProjection(snapshot_every=None)
    assert fold_live(store, sliced, "counter-a", tenant_id="default") == \
        fold_live(store, plain, "counter-a", tenant_id="default")
    assert sliced.slices == 3 and len(sliced.seen) == 11
    for v in (1, 4, 5, 7, 11):
        assert fold_live(store, sliced, "counter-a", tenant_id="default", at_version=v) == \
            fold_live(store, plain, "counter-a", tenant_id="default", at_version=v)
    events = list(store.read_stream("counter-a"))
    for ev in (events[0], events[4], events[9], events[-1]):
        assert fold_live(store, sliced, "counter-a", tenant_id="default",
                         at_time=ev.recorded_at) == \
            fold_live(store, plain, "counter-a", tenant_id="default", at_time=ev.recorded_at)
    before = events[0].recorded_at - timedelta(seconds=1)
    assert fold_live(store, sliced, "counter-a", tenant_id="default", at_time=before) == \
        (Tally(), 0)


def test_slice_fold_failure_names_the_event(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """When evolve_slice raises, the error names the event evolve fails on, not the slice."""

    monkeypatch.setattr(engine, "SLICE_PAGE", 100)
    bump(store, "a", 3)
    store.append("counter-a", [CounterIncremented(by=13)])
    bump(store, "a", 2)
    failing = store.read_stream("counter-a", from_version=4, to_version=4)
    (culprit,) = list(failing)
    with pytest.raises(ProjectionFailed) as info:
        fold_live(store, SlicedTally(poison=13, snapshot_every=None), "counter-a",
                  tenant_id="default")
    err = info.value
    assert (err.position, err.type, err.stream_id) == (culprit.position, culprit.type,
                                                        "counter-a")
    assert isinstance(err.__cause__, ValueError)


def test_slice_fold_saves_snapshots_at_the_right_position(store: EventStore) -> None:
    """A snapshot saved by a slice fold records the last event's version and position."""


    store.append("other-x", [NoteAdded(text="moves positions away from versions")] * 3)
    bump(store, "a", 12)
    p = SlicedTally(snapshot_every=10)
    assert fold_live(store, p, "counter-a", tenant_id="default")[1] == 12
    (last,) = store.read_stream("counter-a", backwards=True, limit=1)
    with store.engine.connect() as c:
        row = c.execute(select(snapshots.c.version, snapshots.c.position,
                               snapshots.c.recorded_at)).one()
    assert (row.version, row.position) == (12, last.position)
    assert row.recorded_at == to_micros(last.recorded_at)
    bump(store, "a", 1)
    p.slices = 0
    state, version = fold_live(store, p, "counter-a", tenant_id="default")
    assert (state.count, version, p.slices) == (13, 13, 1)  # from the snapshot + one event


def test_slice_fold_decodes_upcast_unknown_and_mixed_rows(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of several types, old schema versions and unknown types decode as records do."""

    class Counted(Event, tag="test.SliceCounted", schema_version=2):
        by: int
        note: str

    @upcaster("test.SliceCounted", from_version=1)
    def _v1(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "note": "upcast"}

    store.append("counter-m", [RawEvent(type="test.SliceCounted", data={"by": 4},
                                        schema_version=1),
                               Counted(by=5, note="new"),
                               RawEvent(type="test.NeverRegistered", data={"x": 1}),
                               CounterIncremented(by=2)])
    monkeypatch.setattr(engine, "SLICE_PAGE", 10)
    sliced = SlicedTally(snapshot_every=None)
    state, version = fold_live(store, sliced, "counter-m", tenant_id="default")
    assert (state.count, state.total, version) == (1, 2, 4)
    assert sliced.seen == ["Counted", "Counted", "RawEvent", "CounterIncremented"]
    records = [ev.data for ev in store.read_stream("counter-m")]
    assert records[0] == Counted(by=4, note="upcast")

    # one type throughout, at an older schema version: the per-type fast path must not apply
    store.append("counter-old", [RawEvent(type="test.SliceCounted", data={"by": i},
                                          schema_version=1) for i in range(3)])
    only_old = SlicedTally(snapshot_every=None)
    fold_live(store, only_old, "counter-old", tenant_id="default")
    assert only_old.seen == ["Counted"] * 3


@pytest.mark.parametrize("damage", ["data", "newer schema"])
def test_slice_fold_reports_undecodable_rows(store: EventStore, damage: str) -> None:
    """A stored row that no longer decodes (or one a newer release wrote at a newer schema
    version) raises the typed decode error naming the event, as a read does (the slice fold
    named none: position, type and stream were None)."""

    bump(store, "b", 1)
    bump(store, "a", 3)
    with begin_write(store.engine) as conn:
        change = ({"data": b'{"type":"test.CounterIncremented","by":"two"}'}
                  if damage == "data" else {"schema_version": 9})
        conn.execute(update(events).where(events.c.stream_id == "counter-a",
                                          events.c.version == 2).values(**change))
    for read in (lambda: fold_live(store, SlicedTally(snapshot_every=None), "counter-a",
                                   tenant_id="default"),
                 lambda: list(store.read_stream("counter-a"))):
        with pytest.raises(EventDecodeError) as info:
            read()
        err = info.value
        assert (err.position, err.type, err.stream_id, err.tenant_id) == (
            3, "test.CounterIncremented", "counter-a", "default")
        assert err.newer_schema == (damage == "newer schema")


def test_projector_slices_fail_at_the_first_failing_event_of_the_log(store: EventStore) -> None:
    """A page folded as per-stream slices still stops at the earliest failing position."""
    store.append("counter-a", [CounterIncremented(by=1)])
    store.append("counter-b", [CounterIncremented(by=13)])  # position 2: the first failure
    store.append("counter-a", [CounterIncremented(by=13)])  # position 3: a's slice fails here
    store.append("counter-a", [CounterIncremented(by=2)])
    with pytest.raises(ProjectionFailed) as info:
        Projector(store, [SlicedTally("tally_async", poison=13)]).catch_up()
    assert (info.value.position, info.value.stream_id) == (2, "counter-b")


def test_projector_and_rebuild_with_slices_equal_the_record_fold(store: EventStore) -> None:
    """Rows folded slice by slice (projector, rebuild) equal rows folded event by event."""
    for i in range(30):
        store.append(f"counter-{'abc'[i % 3]}", [CounterIncremented(by=i, writer=f"w{i}")] * 3)
    sliced = SlicedTally("tally_sliced", snapshot_every=None)
    plain = TallyProjection("tally_plain", snapshot_every=None)
    Projector(store, [sliced, plain]).catch_up()
    assert sliced.slices > 0
    assert rows_of(store, sliced) == rows_of(store, plain)
    assert len(rows_of(store, plain)) == 3
    rebuild(store, sliced)
    assert rows_of(store, sliced) == rows_of(store, plain)
    assert verify(store, sliced) == []


def test_stream_times_never_go_back_and_both_folds_agree_at_a_time(url: str) -> None:
    """A clock that steps back (or appenders racing between reading the clock and taking the
    lock) cannot make a stream's times go back; "as of time T" is a prefix of the stream and
    the slice and record folds give the same state at any T, even over rows stored out of
    order before that rule."""


    base = datetime(2024, 1, 1, tzinfo=UTC)
    times = iter([base + timedelta(seconds=s) for s in (3, 1, 2, 5)])
    store = EventStore.open(url, clock=lambda: next(times))
    try:
        for i in range(4):
            store.append("counter-t", [CounterIncremented(by=i)])
        stamps = [e.recorded_at for e in store.read_stream("counter-t")]
        assert stamps == [base + timedelta(seconds=s) for s in (3, 3, 3, 5)]
        sliced = SlicedTally(snapshot_every=None)
        plain = TallyProjection(snapshot_every=None)
        for s in (0, 2, 3, 4, 5, 6):
            at = base + timedelta(seconds=s)
            assert fold_live(store, sliced, "counter-t", tenant_id="default", at_time=at) == \
                fold_live(store, plain, "counter-t", tenant_id="default", at_time=at), s
        # rows written out of order (as older versions could): both stop at the first later one
        with begin_write(store.engine) as conn:
            conn.execute(update(events).where(events.c.version == 2).values(
                recorded_at=to_micros(base + timedelta(seconds=9))))
        at = base + timedelta(seconds=4)
        got = fold_live(store, sliced, "counter-t", tenant_id="default", at_time=at)
        assert got == fold_live(store, plain, "counter-t", tenant_id="default", at_time=at)
        assert got[1] == 1
    finally:
        store.close()


class _SliceBug(SlicedTally):
    """evolve_slice fails for one stream where evolve does not: the two disagree."""

    def evolve_slice(self, state: Tally, events: Any) -> Tally:
        if events.stream_id == "counter-b":
            raise RuntimeError("slice bug")
        return super().evolve_slice(state, events)


def test_projector_names_the_slice_that_failed_when_evolve_disagrees(store: EventStore) -> None:
    """When evolve_slice fails but evolve passes, the error names the failing stream's event."""
    store.append("counter-a", [CounterIncremented(by=1)] * 2)
    store.append("counter-b", [CounterIncremented(by=1)] * 2)
    with pytest.raises(ProjectionFailed) as info:
        Projector(store, [_SliceBug("tally_async")]).catch_up()
    assert (info.value.stream_id, info.value.position) == ("counter-b", 3)
    assert "slice bug" in str(info.value)


def test_a_fold_cut_short_leaves_prepared_statements_alone(url: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A live fold that stops inside its read-ahead (time travel cut in the second page) ends
    the pipeline as a reader that is done, not as a failure: psycopg's prepared statements are
    kept (the failure path drops them all, which costs round trips and re-preparing)."""


    forgets: list[Any] = []
    monkeypatch.setattr(core, "_forget_prepared", forgets.append)
    base = datetime(2024, 1, 1, tzinfo=UTC)
    clock = {"now": base}
    store = EventStore.open(url, migrate=True, clock=lambda: clock["now"])
    try:
        for i in range(12):
            clock["now"] = base + timedelta(seconds=i)
            store.append("counter-cut", [CounterIncremented(by=1) for _ in range(100)])
        p = SlicedTally(snapshot_every=None)
        for _ in range(3):
            state, version = fold_live(store, p, "counter-cut", tenant_id="default",
                                       at_time=base + timedelta(seconds=6, milliseconds=500),
                                       use_snapshots=False)
            assert (state.count, version) == (700, 700)
        assert forgets == []
    finally:
        store.close()


def test_a_second_rebuild_started_meanwhile_never_loses_the_live_rows(store: EventStore) -> None:
    """Two rebuilds of one projection resume the same generation. When one starts while the
    other is filling (here: from the first one's progress callback), whichever moves the
    generation first carries on, and the other stops with RebuildInProgress: the rows the
    winner swapped in stay (they used to be deleted as the loser's "old" generation)."""

    bump(store, "a", 5 * _PAGE + 7, per_append=100)
    bump(store, "b", 5 * _PAGE + 3, per_append=100)
    projection = TallyProjection("tally_twice")
    Projector(store, [projection]).catch_up()
    second: list[int] = []

    def start_another(done: int, total: int) -> None:
        if not second and done < total:
            second.append(rebuild(store, TallyProjection("tally_twice")))

    with pytest.raises(RebuildInProgress):
        rebuild(store, projection, progress=start_another)
    (st,) = status(store, "tally_twice")
    assert st.generation == second[0] and st.rebuild_generation is None
    rows = rows_of(store, projection)
    assert rows[("default", "counter-a")].count == 5 * _PAGE + 7
    assert rows[("default", "counter-b")].count == 5 * _PAGE + 3
    assert verify(store, projection) == []


def test_a_projector_leaves_a_rebuild_in_progress_elsewhere_alone(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A projector that finds rows of another fold version and starts to rebuild them, while
    another process already is, idles (run_once returns 0) instead of stopping with an error."""

    bump(store, "a", 3)
    projection = TallyProjection("tally_elsewhere")
    Projector(store, [projection]).catch_up()
    with begin_write(store.engine) as conn:  # rows of another version of the fold
        conn.execute(update(projections_table).where(
            projections_table.c.name == "tally_elsewhere").values(code_version=0))

    def busy(*_args: Any, **_kwargs: Any) -> int:
        raise RebuildInProgress("rebuilt by another process", reason="rebuilding")

    monkeypatch.setattr(engine_module, "rebuild", busy)
    assert Projector(store, [projection]).run_once(projection) == 0
    (st,) = status(store, "tally_elsewhere")
    assert st.status == "running"


def _wait_for(condition: Any, timeout: float = 10.0) -> None:

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_running_projector_resumes_a_projection_once_restarted(store: EventStore) -> None:
    """Projector.run leaves a failed projection alone while the others go on, and takes it up
    again once an operator restarts it (after the fix), without being restarted itself."""


    store.append("counter-a", [CounterIncremented(by=13)])
    bump(store, "a", 1)
    flaky = TallyProjection("tally_flaky", poison=13)
    healthy = TallyProjection("tally_healthy")
    projector = Projector(store, [flaky, healthy], poll_interval=0.02)
    stop = threading.Event()
    worker = threading.Thread(target=projector.run, args=(stop,))
    worker.start()
    try:
        _wait_for(lambda: status(store, "tally_flaky")[0].status == "failed")
        _wait_for(lambda: status(store, "tally_healthy")[0].position == 2)
        bump(store, "a", 1)  # the healthy one goes on
        _wait_for(lambda: status(store, "tally_healthy")[0].position == 3)
        assert status(store, "tally_flaky")[0].position == 0
        flaky.poison = None  # the fix
        restart(store, "tally_flaky")
        _wait_for(lambda: status(store, "tally_flaky")[0].position == 3)
        assert rows_of(store, flaky)[("default", "counter-a")].count == 3
    finally:
        stop.set()
        worker.join(10)
    assert not worker.is_alive()
    assert [st.owner for st in status(store) if st.name.startswith("tally_")] == [None, None]


def test_a_projector_outlives_database_errors_and_gives_up_its_leases_on_others(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database error (a lock held past the busy timeout, a dropped connection) is retried
    after a pause instead of ending Projector.run; an error it cannot retry ends it, leases
    given up on the way out so another worker takes over at once."""


    bump(store, "a", 2)
    p = TallyProjection("tally_retry")
    projector = Projector(store, [p], poll_interval=0.01)
    real = Projector.run_once
    calls = {"n": 0}

    def flaky_run_once(self: Projector, projection: Any) -> int:
        calls["n"] += 1
        if calls["n"] <= 2:
            locked = DatabaseError("database error: OperationalError: database is locked")
            locked.transient = True
            raise locked
        return real(self, projection)

    monkeypatch.setattr(Projector, "run_once", flaky_run_once)
    stop = threading.Event()
    worker = threading.Thread(target=projector.run, args=(stop,))
    worker.start()
    try:
        _wait_for(lambda: status(store, "tally_retry")[0].position == 2)
    finally:
        stop.set()
        worker.join(10)
    assert calls["n"] > 2 and status(store, "tally_retry")[0].owner is None

    def broken(self: Projector, projection: Any) -> int:
        real(self, projection)  # takes the lease
        raise RuntimeError("a bug")

    monkeypatch.setattr(Projector, "run_once", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        projector.run(threading.Event())
    assert status(store, "tally_retry")[0].owner is None

    def refused(self: Projector, projection: Any) -> int:  # e.g. a row the database refuses
        if projection.name == "tally_retry":
            raise DatabaseError("database error: value too long for type character varying(64)")
        return real(self, projection)

    monkeypatch.setattr(Projector, "run_once", refused)
    other = TallyProjection("tally_other")
    both = Projector(store, [p, other], poll_interval=0.01)
    stop = threading.Event()
    worker = threading.Thread(target=both.run, args=(stop,))
    worker.start()
    try:  # not retried forever: failed in status at its next event; the other goes on
        _wait_for(lambda: status(store, "tally_retry")[0].status == "failed")
        _wait_for(lambda: status(store, "tally_other")[0].position == 2)
    finally:
        stop.set()
        worker.join(10)
    (st,) = status(store, "tally_retry")
    assert st.failed_position == 3 and "value too long" in (st.error or "")

    # Stopped while the database is out of reach: the leases cannot be given up, and run()
    # still returns (they run out by themselves); an error that is not transient goes up.
    monkeypatch.setattr(Projector, "run_once", real)
    for transient in (True, False):
        def unreachable(self: Projector, *, transient: bool = transient) -> None:
            gone = DatabaseError("database error: OperationalError: connection refused")
            gone.transient = transient
            raise gone

        monkeypatch.setattr(Projector, "release", unreachable)
        stop = threading.Event()
        stop.set()
        if transient:
            projector.run(stop)
        else:
            with pytest.raises(DatabaseError):
                projector.run(stop)


def test_database_errors_say_whether_trying_again_may_help(store: EventStore,
                                                           tmp_path: Any) -> None:
    """DatabaseError.transient: true for a write lock held past the busy timeout (SQLite) or
    a lock not available (PostgreSQL), false for an error the same call would meet again."""


    with pytest.raises(DatabaseError) as refused, translate(), store.engine.connect() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert refused.value.transient is False
    if store.backend == "sqlite":

        path = tmp_path / "locked.db"
        other = EventStore.open(f"sqlite:///{path}?busy_timeout=20")
        holder = sqlite3.connect(str(path), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(DatabaseError) as locked:
                other.append("c-1", [NoteAdded(text="a")])
        finally:
            holder.rollback()
            holder.close()
            other.close()
    else:
        with store.engine.connect() as holder, store.engine.connect() as conn:
            holder.execute(text("SELECT * FROM es_projections FOR UPDATE"))
            conn.execute(text("SET lock_timeout = '20ms'"))
            with pytest.raises(DatabaseError) as locked, translate():
                conn.execute(text("LOCK TABLE es_projections IN EXCLUSIVE MODE"))
    assert locked.value.transient is True, locked.value


@pytest.mark.parametrize("kwargs", [
    {"lease_seconds": float("nan")}, {"lease_seconds": float("inf")}, {"lease_seconds": 0},
    {"lease_seconds": 1e300}, {"lease_seconds": "10"}, {"lease_seconds": 0.0009},
    {"poll_interval": -1},
    {"batch_size": 0}, {"batch_size": 2.5}, {"worker_id": "w" * 256}, {"worker_id": ""}])
def test_projector_arguments_are_checked(store: EventStore, kwargs: dict[str, Any]) -> None:
    """Lease, poll interval, batch size and worker id out of range are InvalidArgument (NaN
    and infinity passed `<= 0`, and a long worker id failed in PostgreSQL only)."""

    with pytest.raises(InvalidArgument):
        Projector(store, [TallyProjection("tally_args")], **kwargs)


def test_a_failed_rebuild_leaves_a_generation_another_rebuild_moved_on(
        store: EventStore) -> None:
    """Two processes rebuilding one projection: the one whose fold fails drops the partial
    generation only if that generation is still where its own last page left it; one the other
    process has moved on since (its rows, its position) is left alone."""


    bump(store, "a", 3)
    p = TallyProjection("tally_two_rebuilds")
    engine.ensure_registered(store, p)
    with _begin_write(store.engine) as conn:  # a rebuild of generation 2, at position 3
        conn.execute(update(engine.projections).where(engine.projections.c.name == p.name)
                     .values(rebuild_generation=2, rebuild_position=3,
                             rebuild_code_version=p.version))
    engine._fill(store, p, 2, 0, lambda: 3, None, track=False)
    failure = Failed(projection=p.name, position=2, type="t", stream_id="counter-a",
                     tenant_id="default", cause=ValueError("poison"))
    engine._record_rebuild_failure(store, p.name, 2, 1, p.version, failure)  # left at 1: stale
    engine._record_rebuild_failure(store, p.name, 2, 3, p.version + 1, failure)  # other fold

    def rows_of_generation_2() -> int:
        with store.engine.connect() as conn:
            return len(conn.execute(select(projection_rows.c.stream_id).where(
                projection_rows.c.projection == p.name,
                projection_rows.c.generation == 2)).all())

    (st,) = status(store, p.name)
    assert (st.rebuild_generation, st.rebuild_position, st.error) == (2, 3, None)
    assert rows_of_generation_2() == 1
    engine._record_rebuild_failure(store, p.name, 2, 3, p.version, failure)  # still its own
    (st,) = status(store, p.name)
    assert (st.rebuild_generation, st.failed_position) == (None, 2)
    assert "poison" in (st.error or "") and rows_of_generation_2() == 0


class _Unprintable(Exception):
    """An application's exception whose message cannot be made (its ``__str__`` raises)."""

    def __str__(self) -> str:
        raise ValueError("no message")


def _raise_unprintable(data: Any) -> Any:
    raise _Unprintable


@pytest.mark.parametrize("upcast", [lambda d: int("not a number"), lambda d: None,
                                    _raise_unprintable],
                         ids=["raises", "returns-none", "raises-unprintable"])
def test_an_upcaster_that_fails_names_the_event_and_stops_the_projector(
        store: EventStore, upcast: Any) -> None:
    """An upcaster that raises (any exception) or returns no dict is an EventDecodeError naming
    the event, on reads and in a projector, which records the failure in status; a rebuild
    stops there too and shows it."""


    tag = f"test.Upcounted.{uuid.uuid4().hex[:8]}"
    # Stored by the release before, when the type was at schema 1 (unknown here till now).
    store.append("counter-u", [CounterIncremented(by=1),
                               RawEvent(type=tag, data={"n": 1}, schema_version=1)])

    class Upcounted(Event, tag=tag, schema_version=2):
        by: int

    upcaster(tag, from_version=1)(upcast)
    with pytest.raises(EventDecodeError) as read:
        list(store.read_stream("counter-u"))
    assert (read.value.position, read.value.type, read.value.stream_id) == (
        2, tag, "counter-u")
    assert f"upcaster of {tag} from schema version 1" in str(read.value)
    projection = TallyProjection("tally_upcast")
    with pytest.raises(ProjectionFailed) as info:
        Projector(store, [projection]).catch_up()
    assert info.value.position == 2
    (st,) = status(store, "tally_upcast")
    assert (st.status, st.failed_position) == ("failed", 2)
    with pytest.raises(EventDecodeError):
        rebuild(store, TallyProjection("tally_upcast_rebuild"))
    (st,) = status(store, "tally_upcast_rebuild")
    assert (st.failed_position, st.rebuild_generation) == (2, None)


def test_older_code_leaves_rows_a_newer_fold_built(store: EventStore) -> None:
    """In a rolling deploy the old release's projector stands down (no lease taken, no
    rebuild) on rows a newer fold version built, and its inline() leaves them too, instead of
    the two releases rebuilding the rows back and forth; a fold version never goes back by
    itself (an old worker holding the lease gives it up): rolling back is a rebuild."""

    bump(store, "a", 3)

    class TallyV2(TallyProjection):
        version = 2

    new, old = TallyV2("tally_deploy"), TallyProjection("tally_deploy")
    Projector(store, [new], worker_id="new").catch_up()
    (st,) = status(store, "tally_deploy")
    assert (st.generation, st.code_version, st.position) == (1, 2, 3)
    worker = Projector(store, [old], worker_id="old")
    assert worker.run_once(old) == 0
    bump(store, "a", 1)
    assert worker.run_once(old) == 0
    (st,) = status(store, "tally_deploy")
    assert (st.generation, st.code_version, st.owner, st.position) == (1, 2, "new", 3)
    inline(store, old)  # the old release's facades register their inline projection
    (st,) = status(store, "tally_deploy")
    assert (st.generation, st.code_version) == (1, 2)
    newer = Projector(store, [new], worker_id="new")
    newer.catch_up()
    assert rows_of(store, new)[("default", "counter-a")].count == 4
    # The newer release gone (its lease given up, the rows behind the log): still left alone,
    # and an old worker that held the lease gives it up.
    newer.release()
    bump(store, "a", 1)
    held = Projector(store, [old], worker_id="old-holder")
    with begin_write(store.engine) as conn:
        conn.execute(update(engine_projections).where(engine_projections.c.name == old.name)
                     .values(owner="old-holder", lease_until=to_micros(store.now()) + 10**9))
    assert held.run_once(old) == 0
    (st,) = status(store, "tally_deploy")
    assert (st.generation, st.code_version, st.owner) == (1, 2, None)
    rebuild(store, old)  # rolling back is explicit
    assert worker.run_once(old) == 0  # caught up by the rebuild
    (st,) = status(store, "tally_deploy")
    assert (st.generation, st.code_version, st.position) == (2, 1, 5)
    assert rows_of(store, old)[("default", "counter-a")].count == 5


def test_new_release_projectors_take_over_from_old_ones_still_running(
        store: EventStore) -> None:
    """A rolling deploy that bumps the fold version, with projector workers only: the old
    release's workers renew their lease at every poll, yet a new release's worker takes it
    (rows older than its fold, holder older too), rebuilds, and the old ones stand down.
    Two workers of the new release never take the lease from each other."""
    bump(store, "a", 3)
    old, new = TallyProjection("tally_roll"), TallyV2("tally_roll")

    old_workers = [Projector(store, [old], worker_id=f"old-{i}") for i in range(2)]
    for w in old_workers[1:]:  # a worker of the release before migration 0006 ...
        def acquire_as_before(conn: Any, p: Any, row: Any, w: Projector = w) -> bool:
            now_us = to_micros(w.store.now())
            if (row.owner not in (None, w.worker_id)
                    and (row.lease_until or 0) > now_us):
                return False  # ... takes the lease without recording its fold version
            conn.execute(update(engine_projections).where(engine_projections.c.name == p.name)
                         .values(owner=w.worker_id, lease_until=now_us + w.lease_us))
            return True
        w._acquire = acquire_as_before  # type: ignore[method-assign]
    assert old_workers[0].catch_up() == 3
    with begin_write(store.engine) as conn:  # a newer worker's record, left behind when the
        conn.execute(update(engine_projections)  # lease passed to that older worker
                     .where(engine_projections.c.name == old.name)
                     .values(owner="old-1", owner_code="2:new-gone"))
    new_workers = [Projector(store, [new], worker_id=f"new-{i}") for i in range(2)]
    owners = []
    for _round in range(6):  # every worker polls in turn, old ones first
        bump(store, "a", 1)
        for w, p in [*((w, old) for w in old_workers[::-1]),
                     *((w, new) for w in new_workers)]:
            w.run_once(p)
        owners.append(status(store, "tally_roll")[0].owner)
    (st,) = status(store, "tally_roll")
    assert (st.code_version, st.position) == (2, 9)
    assert owners == ["new-0"] * 6  # taken once, and kept from new-1 as from the old ones
    assert rows_of(store, new)[("default", "counter-a")] == Tally(
        count=9, total=18, writers=["a", "a", "a"], last_version=9)
    for w in old_workers:  # the rows are now newer than their fold: they stand down
        assert w.run_once(old) == 0
    bump(store, "a", 1)
    assert new_workers[1].run_once(new) == 0  # new-0 holds the lease
    assert new_workers[0].run_once(new) == 1
    assert verify(store, new) == []


def test_a_worker_rebuilding_rows_for_its_version_keeps_the_lease_from_its_peers(
        store: EventStore) -> None:
    """While a new release's worker is part-way through replaying the old rows with its fold,
    another worker of that same release leaves its lease alone (it takes only a lease held by
    older code)."""
    bump(store, "a", 3)
    old, new = TallyProjection("tally_peer"), TallyV2("tally_peer")
    first = Projector(store, [old], worker_id="old-0")
    assert first.catch_up() == 3
    first.release()
    rebuilding = Projector(store, [new], worker_id="new-0", lease_seconds=60)
    rebuilding._stopping = lambda: True  # type: ignore[method-assign]  # (stops its replay)
    rebuilding.run_once(new)
    (st,) = status(store, "tally_peer")
    assert (st.owner, st.code_version) == ("new-0", 1) and st.rebuild_generation is not None
    peer = Projector(store, [new], worker_id="new-1", lease_seconds=60)
    assert peer.run_once(new) == 0
    assert status(store, "tally_peer")[0].owner == "new-0"


def test_an_interrupted_rebuild_resumes_only_with_the_same_fold(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild cut off after its first page resumes where it stopped when run again by the
    same fold version; another version (a release rolled out or back meanwhile) starts over,
    so no generation mixes rows of two folds."""

    class Doubled(TallyProjection):
        version = 2

        def evolve(self, state: Tally, event: Any) -> Tally:
            s = super().evolve(state, event)
            return Tally(count=s.count, total=s.total * 2 if s is not state else s.total,
                         writers=s.writers, last_version=s.last_version)

    monkeypatch.setattr(engine, "_PAGE", 2)  # pages of 10 events
    for i in range(30):
        store.append(f"counter-s{i % 3}", [CounterIncremented(by=1)])

    def interrupt_after_first_page(position: int, bound: int) -> None:
        raise KeyboardInterrupt  # the process is stopped mid-rebuild

    v1, v2 = TallyProjection("tally_mixed"), Doubled("tally_mixed")
    with pytest.raises(KeyboardInterrupt):
        rebuild(store, v2, progress=interrupt_after_first_page)
    (st,) = status(store, "tally_mixed")
    assert (st.rebuild_generation, st.rebuild_position) == (2, 10)
    seen: list[int] = []
    rebuild(store, v1, progress=lambda position, bound: seen.append(position))  # rolled back
    assert seen[0] == 10  # started over from 0 (resuming at 10, its first page would end at 20)
    assert verify(store, v1) == []
    assert rows_of(store, v1)[("default", "counter-s0")].total == 10
    # The same fold resumes its own interrupted rebuild.
    with pytest.raises(KeyboardInterrupt):
        rebuild(store, v1, progress=interrupt_after_first_page)
    resumed: list[int] = []
    rebuild(store, v1, progress=lambda position, bound: resumed.append(position))
    assert resumed[0] == 20  # went on from 10
    assert verify(store, v1) == []


def test_transient_errors_are_the_ones_a_retry_may_pass() -> None:
    """is_transient: lock waits (also through a statement timeout), lost or unreachable
    connections, serialization failures and shutdowns are; a full disk, a protocol violation,
    a refused value, a missing table and a caller's misuse are not."""



    transient = [pg.SerializationFailure(), pg.DeadlockDetected(), pg.LockNotAvailable(),
                 pg.AdminShutdown(), pg.TooManyConnections(), pg.ConnectionTimeout("x"),
                 pg.QueryCanceled(),  # statement_timeout: mostly a wait for a lock
                 psycopg.OperationalError("consuming input failed: server closed the "
                                          "connection unexpectedly"),
                 psycopg.OperationalError('failed to resolve host "db": [Errno -3] Temporary '
                                          'failure in name resolution'),
                 # (raised cleaning up a pipeline whose connection the server closed)
                 psycopg.DatabaseError("server closed the connection unexpectedly\n\tThis "
                                       "probably means the server terminated abnormally"),
                 psycopg.DatabaseError("the connection is lost")]
    permanent = [pg.DiskFull(), pg.ProtocolViolation(),
                 pg.StringDataRightTruncation(), pg.UndefinedTable(),
                 psycopg.OperationalError("number of parameters must be between 0 and 65535"),
                 psycopg.OperationalError('connection failed: FATAL:  database "x" does not '
                                          'exist'),
                 psycopg.DatabaseError("cannot adapt type 'object'"),
                 sqlite3.OperationalError("no such table: locked_orders")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)
    # The pool's own give-up on connections lost at checkout, not a closed Connection in use.

    assert is_transient(sa_exc.InvalidRequestError("This connection is closed"))
    assert not is_transient(sa_exc.ResourceClosedError("This Connection is closed"))


def test_appends_through_a_stopped_inline_projection_are_refused_until_restart(
        store: EventStore) -> None:
    """An inline projection a projector failed stops appends to its categories with the typed
    ProjectionStopped (its rows never run past the failed event) until it is restarted."""

    bump(store, "a", 1)
    store.append("counter-a", [CounterIncremented(by=13)])
    with pytest.raises(ProjectionFailed):
        Projector(store, [TallyProjection("tally_inline_stop", poison=13)]).catch_up()
    inline(store, TallyProjection("tally_inline_stop"))  # the fixed code, inline
    with pytest.raises(ProjectionStopped) as info:
        bump(store, "a", 1)
    assert info.value.projection == "tally_inline_stop" and "restart" in str(info.value)
    assert store.stream_version("counter-a") == 2
    store.append("other-1", [CounterIncremented()])  # other categories are not held up
    restart(store, "tally_inline_stop")
    bump(store, "a", 1)
    row = load_row(store, TallyProjection("tally_inline_stop"), "default", "counter-a")
    assert row is not None and row[0].count == 3


def test_a_worker_frozen_in_a_batch_is_taken_over_on_postgres(fresh_pg: str) -> None:
    """PostgreSQL: a worker that freezes in the middle of a batch (paused, its host gone quiet)
    holds the projection's row lock; the server ends its transaction after ``stall_seconds``
    idle, so another worker takes over (it waited for ever before), and every event is applied
    once.  (SQLite has no such limit: a frozen writer holds its database's write lock.)"""


    gate, inside = threading.Event(), threading.Event()

    class Frozen(TallyProjection):
        def evolve(self, state: Tally, event: Any) -> Tally:
            if event.version == 3 and not gate.is_set():
                inside.set()
                gate.wait(30)  # a frozen process: nothing reaches the server meanwhile
            return super().evolve(state, event)

    a_store = EventStore.open(fresh_pg, migrate=True)
    b_store = EventStore.open(fresh_pg)
    try:
        for _ in range(5):
            a_store.append("counter-1", [CounterIncremented(by=1)])
        a = Projector(a_store, [Frozen("tally_frozen")], worker_id="a", lease_seconds=0.2,
                      stall_seconds=1)
        b = Projector(b_store, [TallyProjection("tally_frozen")], worker_id="b",
                      lease_seconds=0.2)
        outcome: list[Any] = []

        def frozen_batch() -> None:
            try:
                outcome.append(a.run_once(a.projections[0]))
            except BaseException as e:  # handed to the test's thread
                outcome.append(e)

        t = threading.Thread(target=frozen_batch)
        t.start()
        assert inside.wait(10)
        started = time.monotonic()
        applied = 0
        while applied < 5 and time.monotonic() - started < 10:  # (as b's worker loop does)
            applied += b.catch_up()  # 0 until the server ends a's transaction
        assert applied == 5
        gate.set()
        t.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], DatabaseError), outcome
        assert outcome[0].transient  # its worker's loop would retry (and find nothing to do)
        assert load_row(b_store, TallyProjection("tally_frozen"), "default", "counter-1") == (
            Tally(count=5, total=5, writers=["", "", ""], last_version=5), 5)
        assert a.run_once(a.projections[0]) == 0
    finally:
        gate.set()
        a_store.close()
        b_store.close()


def test_a_stopping_projector_leaves_a_rebuild_off_after_a_page(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A projector told to stop (SIGTERM) while it rebuilds rows of an older fold version
    stops after the page under way instead of replaying the rest of the log first; the next
    worker resumes the rebuild where it left off."""


    bump(store, "a", 50)  # (a worker's rebuild pages are its batches: 10 events here)
    first = Projector(store, [TallyProjection("tally_async")])
    first.catch_up()
    first.release()
    stop = threading.Event()
    folded: list[int] = []

    class Bumped(TallyProjection):
        version = 2

        def evolve(self, state: Tally, event: Any) -> Tally:
            folded.append(event.position)
            if event.position == 15:
                stop.set()  # SIGTERM arrives in the middle of the second page
            return super().evolve(state, event)

    worker = Projector(store, [Bumped("tally_async")], lease_seconds=0.1, batch_size=10)
    worker.run(stop)
    (st,) = status(store, "tally_async")
    assert st.code_version == 1 and st.rebuild_generation is not None
    assert st.rebuild_position == 20 and folded == list(range(1, 21))
    folded.clear()
    worker.catch_up()  # (the same worker: the stop of its run is over)
    assert folded == list(range(21, 51))  # resumed, not started over
    (st,) = status(store, "tally_async")
    assert st.code_version == 2 and st.rebuild_generation is None and st.position == 50
    assert rows_of(store, Bumped("tally_async"))[("default", "counter-a")].count == 50


@pytest.mark.parametrize("index", [RowIndex(status="x" * 65), RowIndex(group_key="g" * 256),
                                   RowIndex(sort_key=2**63), RowIndex(status="a\x00b"),
                                   RowIndex(sort_key=True), "big"],
                         ids=["long-status", "long-group", "huge-sort-key", "nul", "bool",
                              "not-a-row-index"])
def test_an_index_the_row_columns_cannot_hold_fails_the_projection_at_its_event(
        store: EventStore, index: Any) -> None:
    """index() giving what the row's columns cannot hold is the projection's failure at the
    event that made the row, on both backends (SQLite took a long status that PostgreSQL
    refused, with a database error naming no projection): a projector stops there, an
    inline append of it is refused and writes nothing."""

    class Misindexed(TallyProjection):
        def index(self, state: Tally) -> Any:
            return index if state.count >= 2 else RowIndex(status="ok")

    with EventStore.open(store.url) as inline_store:
        inline(inline_store, Misindexed("tally_inline_index"))
        bump(inline_store, "a", 1)
        bump(inline_store, "b", 1)
        with pytest.raises(ProjectionFailed, match="index\\(\\) gave"):
            bump(inline_store, "a", 1)
        assert inline_store.stream_version("counter-a") == 1
    bump(store, "a", 2)  # a writer without the projection: the row goes bad at position 3
    with pytest.raises(ProjectionFailed) as info:
        Projector(store, [Misindexed("tally_async")]).catch_up()
    assert (info.value.position, info.value.stream_id) == (3, "counter-a")
    assert "index() gave" in str(info.value)
    (st,) = status(store, "tally_async")
    assert st.status == "failed" and st.failed_position == 3 and st.position == 2
    # Inline, meeting that event in the log (a catch-up): it stops there, as a fold that
    # raises on an event in the log does; the append that met it goes through.

    with EventStore.open(store.url) as inline_store:
        inline(inline_store, Misindexed("tally_inline_catch_up"))
        bump(inline_store, "c", 1)
        (st,) = status(store, "tally_inline_catch_up")
        assert st.status == "failed" and st.failed_position == 3  # (not 4, the row's last)
        assert st.position == 2  # the events before it are in the rows
        assert inline_store.stream_version("counter-c") == 1
        with pytest.raises(ProjectionStopped):
            bump(inline_store, "c", 1)


@pytest.mark.parametrize("streams", ["a", "ab"])
def test_a_batch_whose_fold_outlasts_stall_seconds_gets_through_in_smaller_batches(
        fresh_pg: str, streams: str) -> None:
    """PostgreSQL ends a batch idle for stall_seconds (a frozen worker, or a slow fold): the
    projector retries the projection with half as many events each time, so a healthy but
    slow fold still gets through instead of failing the same batch for ever.  Also when the
    batch's rows go out together (events of two streams), where psycopg reports a closed
    connection rather than the server's reason."""


    class Slow(TallyProjection):
        def evolve(self, state: Tally, event: Any) -> Tally:
            time.sleep(0.15)
            return super().evolve(state, event)

    with EventStore.open(fresh_pg, migrate=True) as store:
        for i in range(8):
            bump(store, streams[i % len(streams)], 1)
        p = Slow("tally_slow")
        projector = Projector(store, [p], batch_size=8, stall_seconds=0.5)
        with pytest.raises(DatabaseError, match="idle-in-transaction") as info:
            projector.run_once(p)  # 8 events of 0.15 s: idle past the limit
        assert info.value.transient and info.value.sqlstate == "25P03"
        assert projector._size(p) == 4
        assert projector.catch_up() == 8  # (catch_up retries smaller by itself)
        assert sum(r.count for r in rows_of(store, p).values()) == 8
        assert verify(store, p) == []
        kept = projector._size(p)
        bump(store, "a", 4)
        # The smaller size stays (growing back, the full batch would time out every other time).
        assert projector.catch_up() == 4 and projector._size(p) == kept


def test_stall_seconds_stay_within_what_postgres_takes(fresh_pg: str) -> None:
    """A lease of a million seconds gives a default stall PostgreSQL's timeout can hold (it
    failed every batch); a stall_seconds past it is refused when the projector is made."""

    with EventStore.open(fresh_pg, migrate=True) as store:
        bump(store, "a", 2)
        p = TallyProjection("tally_long_lease")
        assert Projector(store, [p], lease_seconds=1e6).catch_up() == 2
        with pytest.raises(InvalidArgument, match="stall_seconds must be at most"):
            Projector(store, [p], stall_seconds=1e7)


def test_a_stored_row_that_does_not_decode_fails_its_projection_at_the_next_event(
        store: EventStore) -> None:
    """A damaged live row (or one of another shape) cannot be folded onto: a projector fails
    the projection at the next event of that stream, in status, and the others go on (it
    ended the worker with a decode error before); inline, the append of such an event is
    refused and writes nothing."""

    bump(store, "a", 1)
    bump(store, "b", 1)
    damaged, other = TallyProjection("tally_damaged"), TallyProjection("tally_fine")
    projector = Projector(store, [damaged, other])
    assert projector.catch_up() == 4
    with begin_write(store.engine) as conn:
        conn.execute(update(projection_rows).where(
            projection_rows.c.projection == "tally_damaged",
            projection_rows.c.stream_id == "counter-a").values(state=b'{"count": "x"}'))
    bump(store, "a", 1)
    bump(store, "b", 1)
    applied, failures = projector.catch_up_each()
    assert applied == 2 and len(failures) == 1
    (failure,) = failures
    assert isinstance(failure, ProjectionFailed)
    assert (failure.projection, failure.position, failure.stream_id) == (
        "tally_damaged", 3, "counter-a")
    assert "does not decode" in str(failure)
    (st,) = status(store, "tally_damaged")
    assert st.status == "failed" and st.failed_position == 3
    assert status(store, "tally_fine")[0].position == 4
    with EventStore.open(store.url) as inline_store:
        inline(inline_store, TallyProjection("tally_fine"))
        with begin_write(store.engine) as conn:
            conn.execute(update(projection_rows).where(
                projection_rows.c.projection == "tally_fine",
                projection_rows.c.stream_id == "counter-b").values(state=b"garbage"))
        with pytest.raises(ProjectionFailed, match="does not decode"):
            bump(inline_store, "b", 1)
        assert inline_store.stream_version("counter-b") == 2


def test_a_workers_rebuild_goes_in_slices_beside_its_other_projections(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A projector rebuilding rows of an older fold version replays half a lease at a time
    and resumes on its next turn, so its other projections keep up meanwhile (they waited
    for the whole rebuild) and its lease is renewed each turn; catch_up runs it to the end."""


    bump(store, "a", 60)
    first = Projector(store, [TallyProjection("tally_async")])
    first.catch_up()
    first.release()

    class Bumped(TallyProjection):
        version = 2

        def evolve(self, state: Tally, event: Any) -> Tally:
            time.sleep(0.003)
            return super().evolve(state, event)

    slow, other = Bumped("tally_async"), TallyProjection("tally_other")
    worker = Projector(store, [slow, other], lease_seconds=0.1, batch_size=10)
    replayed = worker.run_once(slow)
    assert 0 < replayed < 60 and "tally_async" in worker._rebuilding
    (st,) = status(store, "tally_async")
    assert st.code_version == 1 and st.rebuild_position == replayed
    assert worker.run_once(other) == 10  # not kept waiting for the rebuild
    second = worker.run_once(slow)
    assert second > 0 and "tally_async" in worker._rebuilding
    rebuild(store, slow)  # an operator finishes it meanwhile
    assert worker.run_once(slow) == 0 and "tally_async" not in worker._rebuilding
    bump(store, "a", 1)
    assert worker.catch_up() == 52  # the rest for tally_other, and the new event for both
    (st,) = status(store, "tally_async")
    assert st.code_version == 2 and st.rebuild_generation is None and st.position == 61
    assert "tally_async" not in worker._rebuilding
    assert rows_of(store, slow)[("default", "counter-a")].count == 61


def test_a_stopping_worker_takes_no_more_projections(store: EventStore) -> None:
    """A stop that comes during one projection's batch ends the round there: the worker's
    next projection is not leased or run (it went through them all first)."""

    bump(store, "a", 3)
    stop = threading.Event()

    class Stopping(TallyProjection):
        def evolve(self, state: Tally, event: Any) -> Tally:
            stop.set()
            return super().evolve(state, event)

    Projector(store, [Stopping("tally_first"), TallyProjection("tally_second")]).run(stop)
    assert status(store, "tally_first")[0].position == 3
    assert [st.position for st in status(store, "tally_second")] in ([], [0])
    assert all(st.owner is None for st in status(store))


def _lock_projection_row(conn: Any, name: str) -> None:
    """Hold projection ``name``'s bookkeeping row in ``conn``'s transaction (as another worker's
    batch, a rebuild page or an operator's transaction does)."""

    conn.execute(text("SELECT 1 FROM es_projections WHERE name = :name FOR UPDATE"),
                 {"name": name})


def _caught_up(store: EventStore, name: str, **kwargs: Any) -> tuple[TallyProjection, Projector]:
    """A tally projection ``name`` and a projector that has caught it up on two new events."""
    bump(store, "a", 2)
    p = TallyProjection(name)
    projector = Projector(store, [p], **kwargs)
    assert projector.catch_up() == 2
    return p, projector


def test_a_row_another_worker_holds_is_left_for_now_on_postgres(fresh_pg: str) -> None:
    """PostgreSQL: a batch waits at most a second for the projection's row lock another
    transaction holds (a worker busy with it, or frozen in it), then leaves the projection
    for now instead of blocking the worker's other projections and its stop."""

    with EventStore.open(fresh_pg, migrate=True) as store:
        p, projector = _caught_up(store, "tally_held")
        bump(store, "a", 1)
        with begin_write(store.engine) as conn:
            _lock_projection_row(conn, "tally_held")
            started = time.monotonic()
            assert projector.run_once(p) == 0
            assert time.monotonic() - started < 5
        assert projector.run_once(p) == 1


def test_a_refused_row_index_names_the_first_event_in_the_log_that_made_one(
        store: EventStore) -> None:
    """Of several rows whose index goes bad in one batch, the failure names the first event in
    the log after which one could not be stored (not whichever row came first in a set)."""

    class Misindexed(TallyProjection):
        def index(self, state: Tally) -> RowIndex:
            return RowIndex(status="x" * 65 if state.count >= 2 else "ok")

    for stream in ("b", "a", "b", "a", "a", "c", "c"):
        bump(store, stream, 1)
    with pytest.raises(ProjectionFailed) as info:
        Projector(store, [Misindexed("tally_first_bad")]).catch_up()
    assert (info.value.position, info.value.stream_id) == (3, "counter-b")


def test_a_rebuild_page_folds_before_it_takes_the_projections_lock_on_postgres(
        fresh_pg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: a rebuild page folds its events before it locks the projection, so a fold
    slower than stall_seconds (the idle limit of a transaction holding the lock) still
    rebuilds, and meanwhile the others are not kept waiting for the lock."""


    monkeypatch.setattr(engine, "_PAGE", 2)  # pages of 10 events

    class Slow(TallyProjection):
        version = 2

        def evolve(self, state: Tally, event: Any) -> Tally:
            time.sleep(0.12)
            return super().evolve(state, event)

    with EventStore.open(fresh_pg, migrate=True) as store:
        bump(store, "a", 10)
        first = Projector(store, [TallyProjection("tally_slow_rebuild")])
        first.catch_up()
        first.release()
        slow = Slow("tally_slow_rebuild")
        worker = Projector(store, [slow], lease_seconds=20, stall_seconds=0.6)
        assert worker.catch_up() == 10  # a page of 1.2 s of folding, then a quick write
        (st,) = status(store, "tally_slow_rebuild")
        assert st.code_version == 2 and st.rebuild_generation is None


def test_catch_up_waits_for_a_row_another_transaction_holds_on_postgres(
        fresh_pg: str) -> None:
    """PostgreSQL: a batch leaves a row held past its lock wait for now, but catch_up (and
    `run --once`) tries again: it applies the whole log, not 0 events reported as done."""

    with EventStore.open(fresh_pg, migrate=True) as store:
        _p, projector = _caught_up(store, "tally_waited")
        bump(store, "a", 3)
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with begin_write(store.engine) as conn:
                _lock_projection_row(conn, "tally_waited")
                held.set()
                release.wait(2.5)

        t = threading.Thread(target=hold)
        t.start()
        assert held.wait(5)
        try:
            assert projector.catch_up() == 3
        finally:
            release.set()
            t.join()


def test_a_rebuild_that_lost_its_generation_does_not_fail_the_projection(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker resuming a rebuild another process has meanwhile started over (a newer fold
    version) folds a page onto rows that are not its own any more, and the fold may raise:
    that is the other rebuild's generation, not a failure of the projection, which keeps
    running on its live rows (it was marked failed)."""


    for stream in ("a", "b"):  # a's 6,000 events, then b's: rebuild pages are 5,000
        for _ in range(12):
            store.append(f"counter-{stream}", [CounterIncremented(by=1) for _ in range(500)])

    class Versioned(TallyProjection):
        def __init__(self, version: int) -> None:
            super().__init__("tally_lost")
            self.version = version

    first = Projector(store, [Versioned(1)])
    first.catch_up()
    first.release()
    worker = Projector(store, [Versioned(2)], lease_seconds=60, batch_size=5_000)
    real_fill = engine._fill

    class AfterTwoPages:  # the first slice leaves off after two pages (b's rows half made)
        looked = 0

        def is_set(self) -> bool:
            self.looked += 1
            return self.looked >= 2

    worker._stop = AfterTwoPages()  # type: ignore[assignment]
    assert worker.run_once(worker.projections[0]) == 10_000
    worker._stop = None
    assert "tally_lost" in worker._rebuilding

    def restarted_elsewhere(*args: Any, **kwargs: Any) -> int:
        if kwargs.get("track") and args[1].version == 2:
            monkeypatch.setattr(engine, "_fill", real_fill)
            # Version 3 starts the generation over: one page (a's rows only), then it stops;
            # the worker then folds b's events from 4,001 onto no row: a gap its fold refuses.
            with pytest.raises(engine._RebuildStopped):
                engine._rebuild(store, Versioned(3), progress=None, only_if_stale=False,
                                stopping=lambda: True)
        return real_fill(*args, **kwargs)

    monkeypatch.setattr(engine, "_fill", restarted_elsewhere)
    assert worker.run_once(worker.projections[0]) == 0  # (its rows are not its own now)
    (st,) = status(store, "tally_lost")
    assert st.status == "running" and st.error is None and st.code_version == 1


def test_catch_up_leaves_a_row_held_past_a_frozen_workers_limit(fresh_pg: str) -> None:
    """PostgreSQL: catch_up tries a row another transaction holds again, but not for ever:
    once a frozen worker's transaction would have been ended (stall_seconds and a margin) it
    leaves that projection and goes on with the others."""


    with EventStore.open(fresh_pg, migrate=True) as store:
        bump(store, "a", 2)
        held, other = TallyProjection("tally_held_long"), TallyProjection("tally_free")
        projector = Projector(store, [held, other], stall_seconds=1)
        release = threading.Event()
        ready = threading.Event()

        def hold() -> None:
            with begin_write(store.engine) as conn:
                _lock_projection_row(conn, "tally_held_long")
                ready.set()
                release.wait(30)

        Projector(store, [held]).catch_up()  # (the row exists)
        t = threading.Thread(target=hold)
        t.start()
        assert ready.wait(5)
        try:
            engine._BUSY_MARGIN_SECONDS, margin = 1.0, engine._BUSY_MARGIN_SECONDS
            started = time.monotonic()
            assert projector.catch_up() == 2  # tally_free's; tally_held_long left
            assert time.monotonic() - started < 10
            assert projector.held_elsewhere == {"tally_held_long"}
        finally:
            engine._BUSY_MARGIN_SECONDS = margin
            release.set()
            t.join()


def test_catch_up_counts_its_wait_for_a_held_row_from_when_it_finds_it_held(
        fresh_pg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: a catch-up that has run longer than the wait it allows for a held row
    still waits for a row first found held late in it (it gave up at once, events left)."""


    monkeypatch.setattr(engine, "_BUSY_MARGIN_SECONDS", 0.5)  # a wait of 1.5 s in all
    holding = threading.Event()

    def hold_for(seconds: float) -> None:
        with begin_write(store.engine) as conn:  # (waits for the batch under way to commit)
            _lock_projection_row(conn, "tally_late")
            holding.set()
            time.sleep(seconds)

    class Slow(TallyProjection):
        def evolve(self, state: Tally, event: Any) -> Tally:
            time.sleep(0.1)
            if event.position == 26 and not holding.is_set():  # after 2.5 s of catching up
                threading.Thread(target=hold_for, args=(1.2,), daemon=True).start()
            return super().evolve(state, event)

    with EventStore.open(fresh_pg, migrate=True) as store:
        bump(store, "a", 40)
        projector = Projector(store, [Slow("tally_late")], batch_size=5, stall_seconds=1)
        assert projector.catch_up() == 40
        assert holding.is_set() and status(store, "tally_late")[0].lag == 0


def test_projection_arguments_and_settings_are_checked_before_anything_is_written(
        store: EventStore) -> None:
    """Not a projection, one projection where a list is taken, no projections, and settings the
    engine cannot use (version, snapshot_every, categories) are InvalidArgument, and nothing
    is registered or written."""

    class BadVersion(TallyProjection):
        version = "2"  # type: ignore[assignment]

    class ZeroVersion(TallyProjection):
        version = 0

    class OneCategory(TallyProjection):
        categories = "counter"  # type: ignore[assignment]

    bump(store, "a", 1)
    calls: list[Any] = [
        lambda: fold_live(store, object(), "counter-a", tenant_id="default"),  # type: ignore
        lambda: rebuild(store, "tally"),  # type: ignore[arg-type]
        lambda: verify(store, 5),  # type: ignore[arg-type]
        lambda: inline(store, "tally"),  # type: ignore[arg-type]
        lambda: query_rows(store, None, tenant_id=None),  # type: ignore[arg-type]
        lambda: Projector(store, TallyProjection()),  # type: ignore[arg-type]
        lambda: Projector(store, []),
        lambda: Projector(store, [BadVersion("tally_v")]).catch_up(),
        lambda: inline(store, ZeroVersion("tally_zero")),
        lambda: rebuild(store, OneCategory("tally_cat")),
        lambda: fold_live(store, TallyProjection(snapshot_every=0), "counter-a",
                          tenant_id="default"),
        lambda: Conversations(store, snapshot_every=-1),
        lambda: Conversations(store, snapshot_every="x"),  # type: ignore[arg-type]
        lambda: Conversations(None),  # type: ignore[arg-type]
        lambda: AsyncConversations(None),  # type: ignore[arg-type]
        lambda: Conversations(store).history("c", name=5),  # type: ignore[arg-type]
    ]
    class NotCategories(TallyProjection):
        categories = 5  # type: ignore[assignment]

    calls.append(lambda: inline(store, NotCategories("tally_five")))
    for call in calls:
        with pytest.raises(InvalidArgument):
            call()
    assert {st.name for st in status(store)} <= {"conversations"}
    assert store.stats()["events"] == 1

    class EveryCategory(TallyProjection):
        categories = None  # type: ignore[assignment]  # (as () : every category)

    every = EveryCategory("tally_every")
    assert fold_live(store, every, "counter-a", tenant_id="default")[0].count == 1
    assert Projector(store, [every]).catch_up() == 1
    (st,) = status(store, "tally_every")
    assert st.categories == () and st.lag == 0


def test_a_rebuild_page_folds_under_the_projectors_stall_limit_not_the_sessions(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL ends a transaction idle past the session's limit (EVENTSTORE_PG_IDLE_TIMEOUT,
    1 s here); a rebuild page, whose fold leaves its transaction idle, runs under the
    projector's stall_seconds instead, as its batches do."""

    class Slow(TallyProjection):
        def evolve(self, state: Tally, event: Any) -> Tally:
            time.sleep(0.05)
            return super().evolve(state, event)

    class SlowV2(Slow):
        version = 2

    monkeypatch.setenv("EVENTSTORE_PG_IDLE_TIMEOUT", "1")
    with EventStore.open(url) as store:
        for i in range(30):
            bump(store, str(i % 3), 1)
        first = Projector(store, [Slow("tally_slow", snapshot_every=None)], stall_seconds=10,
                          batch_size=30, lease_seconds=30, worker_id="w")
        assert first.catch_up() == 30  # batches of 1.5 s of folding
        again = Projector(store, [SlowV2("tally_slow", snapshot_every=None)],
                          stall_seconds=10, batch_size=30, lease_seconds=30, worker_id="w")
        again.catch_up()  # the rows of version 1, rebuilt in pages of 30 events
        (st,) = status(store, "tally_slow")
        assert (st.code_version, st.position) == (2, 30)
        assert again._sizes.get("tally_slow", 30) == 30  # never halved for a stall

        class QuickV2(TallyProjection):
            version = 2

        assert verify(store, QuickV2("tally_slow")) == []  # (verify: the session's limit)


def test_a_rebuild_outside_a_projector_folds_under_the_sessions_idle_limit(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``rebuild`` (and the command line's) folds each page under the session's idle limit,
    EVENTSTORE_PG_IDLE_TIMEOUT (or the server's), not a limit of its own: a page folding
    longer than 1 s fails under 1 s and goes through under none (0)."""


    class Slow(TallyProjection):
        def evolve(self, state: Tally, event: Any) -> Tally:
            time.sleep(0.05)
            return super().evolve(state, event)

    with EventStore.open(url) as store:
        for i in range(30):
            bump(store, str(i % 3), 1)
    p = Slow("tally_rebuilt_slowly", snapshot_every=None)
    monkeypatch.setenv("EVENTSTORE_PG_IDLE_TIMEOUT", "1")
    with EventStore.open(url) as store:
        if store.engine.dialect.name == "postgresql":
            with pytest.raises(DatabaseError) as info:
                rebuild(store, p)  # one page: 1.5 s of folding
            assert info.value.transient
    monkeypatch.setenv("EVENTSTORE_PG_IDLE_TIMEOUT", "0")
    with EventStore.open(url) as store:
        rebuild(store, p)
        (st,) = status(store, "tally_rebuilt_slowly")
        assert st.position == 30 and st.rebuild_generation is None
        assert verify(store, p) == []



class _Faulty(TallyProjection):
    """Its own code (not evolve) raises: initial() for a stream whose id ends in "bad",
    index() or encode() once a row counts two events."""

    def __init__(self, name: str, fails_in: str) -> None:
        super().__init__(name)
        self.fails_in = fails_in

    def initial(self, tenant_id: str, stream_id: str) -> Tally:
        if self.fails_in == "initial" and stream_id.endswith("bad"):
            raise KeyError("no template for this stream")
        return Tally()

    def index(self, state: Tally) -> RowIndex:
        if self.fails_in == "index" and state.count >= 2:
            raise TypeError("a bug in index()")
        return super().index(state)

    def encode(self, state: Tally) -> bytes:
        if self.fails_in == "encode" and state.count >= 2:
            raise TypeError("a bug in encode()")
        return super().encode(state)


@pytest.mark.parametrize("fails_in", ["index", "encode", "initial"])
def test_a_projections_own_index_encode_or_initial_raising_fails_it_at_the_event(
        store: EventStore, fails_in: str) -> None:
    """index(), encode() or initial() raising is the projection's failure at the event after
    which its row could not be made, as a fold that raises: a projector stops it there (in
    status) and goes on with its other projections; a rebuild stops at it; inline, the append
    that makes such a row is refused with ProjectionFailed and writes nothing.  (Each let the
    bare exception out: the worker stopped with every projection where it was.)"""
    # Inline first, while the log holds nothing the projection fails on.
    with EventStore.open(store.url) as inline_store:
        inline(inline_store, _Faulty(f"faulty_{fails_in}_inline", fails_in))
        inline_store.append("counter-c", [CounterIncremented(by=1)])  # position 1
        stream = "counter-c" if fails_in != "initial" else "counter-cbad"
        with pytest.raises(ProjectionFailed) as inline_info:
            inline_store.append(stream, [CounterIncremented(by=1)])
        assert inline_info.value.stream_id == stream
        assert inline_store.stream_version(stream) == (1 if stream == "counter-c" else 0)
    bad = "counter-bad" if fails_in == "initial" else "counter-a"
    bump(store, "a", 1)  # position 2
    store.append(bad, [CounterIncremented(by=1)])  # position 3: the one that fails
    bump(store, "b", 1)  # position 4
    faulty = _Faulty(f"faulty_{fails_in}", fails_in)
    good = TallyProjection(f"good_{fails_in}")
    applied, errors = Projector(store, [faulty, good]).catch_up_each()
    assert [type(e) for e in errors] == [ProjectionFailed]
    failed = errors[0]
    assert isinstance(failed, ProjectionFailed)
    assert (failed.position, failed.stream_id) == (3, bad)
    assert f"a bug in {fails_in}()" in str(failed) or "no template" in str(failed)
    by_name = {s.name: s for s in status(store)}
    assert by_name[faulty.name].status == "failed"
    assert (by_name[faulty.name].failed_position, by_name[faulty.name].position) == (3, 2)
    assert (by_name[good.name].status, by_name[good.name].position) == ("running", 4)
    assert applied == 4 + 2  # the good projection's four, the faulty one's first two
    with pytest.raises(ProjectionFailed) as info:
        rebuild(store, _Faulty(f"faulty_{fails_in}_rebuilt", fails_in))
    assert info.value.position == 3


def test_on_demand_snapshots_are_used_by_live_folds(store: EventStore) -> None:
    """With ``snapshot_every = None`` (on demand only), a live fold starts from the snapshot
    snapshot_now saved (it folded the whole stream, the snapshot unread); a snapshot that does
    not decode is passed over, the fold reads the log."""

    p = TallyProjection("tally_on_demand", snapshot_every=None)
    bump(store, "a", 30)
    assert snapshot_now(store, p, "counter-a", tenant_id="default") == 30
    with begin_write(store.engine) as c:  # mark the stored state to see whether it is read
        c.execute(update(snapshots).values(state=p.encode(Tally(count=30, total=999,
                                                                 last_version=30))))
    state, version = fold_live(store, p, "counter-a", tenant_id="default")
    assert (state.total, version) == (999, 30)
    bump(store, "a", 1)
    assert fold_live(store, p, "counter-a", tenant_id="default")[0].total == 1000
    with begin_write(store.engine) as c:
        c.execute(update(snapshots).values(state=b'{"count": "not a number"}'))
    state, version = fold_live(store, p, "counter-a", tenant_id="default")
    assert (state.count, state.total, version) == (31, 31, 31)


def test_current_names_the_event_a_fold_fails_on(store: EventStore) -> None:
    """current() (row + the log's tail) raises ProjectionFailed naming the event, as
    fold_live does (it let the fold's own exception out)."""

    p = TallyProjection("tally_current", poison=13)
    bump(store, "a", 1)
    store.append("counter-a", [CounterIncremented(by=13)])
    for read in (fold_live, current):
        with pytest.raises(ProjectionFailed) as info:
            read(store, p, "counter-a", tenant_id="default")
        assert (info.value.position, info.value.stream_id) == (2, "counter-a")


@pytest.mark.parametrize("fails_in", ["encode", "initial"])
def test_failures_of_one_batch_are_named_in_log_order(store: EventStore, fails_in: str) -> None:
    """A row that cannot be stored and a fold that raises in one batch: the projector and a
    rebuild stop at whichever comes first in the log (the fold's failure won when it came
    later, as did initial() raising for a stream whose first event came after the fold's)."""

    class Faulty(_Faulty):
        def __init__(self, name: str) -> None:
            super().__init__(name, fails_in)
            self.poison = 13

    if fails_in == "encode":
        bump(store, "a", 2)  # position 2: counter-a's row cannot be encoded
        store.append("counter-b", [CounterIncremented(by=13)])  # position 3: evolve raises
        first = 2
    else:
        store.append("counter-a", [CounterIncremented(by=13)])  # position 1: evolve raises
        store.append("counter-bad", [CounterIncremented(by=1)])  # position 2: initial raises
        first = 1
    faulty = Faulty(f"faulty_order_{fails_in}")
    _applied, errors = Projector(store, [faulty]).catch_up_each()
    assert [getattr(e, "position", None) for e in errors] == [first]
    (st,) = status(store, faulty.name)
    assert (st.failed_position, st.position) == (first, first - 1)
    with pytest.raises(ProjectionFailed) as info:
        rebuild(store, Faulty(f"faulty_order_{fails_in}_rebuilt"))
    assert info.value.position == first
    if fails_in == "initial":  # the projection's own exception, not an internal wrapper
        assert isinstance(info.value.__cause__, ValueError)


def test_an_inline_catch_up_makes_each_row_once(url: str) -> None:
    """An inline append that first catches up streams other writers appended to encodes and
    indexes each row once (checking the rows before the append's own events encoded them
    twice), and a plain inline append its row once (PostgreSQL encoded it again to remember
    it)."""
    calls = {"index": 0, "encode": 0}

    class Counting(TallyProjection):
        def index(self, state: Tally) -> RowIndex:
            calls["index"] += 1
            return super().index(state)

        def encode(self, state: Tally) -> bytes:
            calls["encode"] += 1
            return super().encode(state)

    with EventStore.open(url) as plain, EventStore.open(url) as inline_store:
        inline(inline_store, Counting("tally_counting", snapshot_every=None))
        bump(inline_store, "x", 2)
        calls.update(index=0, encode=0)
        bump(inline_store, "x", 1)
        assert calls == {"index": 1, "encode": 1}
        for i in range(20):
            plain.append(f"counter-s{i}", [CounterIncremented(by=1)])
        calls.update(index=0, encode=0)
        bump(inline_store, "x", 1)
        # (PostgreSQL: plus the one-round-trip guess's fold of counter-x, which misses: the
        # log moved on.)
        made = 21 + (url.startswith("postgresql"))
        assert calls == {"index": made, "encode": made}


def test_a_snapshot_that_does_not_decode_is_replaced_by_the_next_current_read(
        store: EventStore) -> None:
    """A damaged snapshot is passed over, and the next current read stores a good one in its
    place (every read folded the whole stream and tried to save, in vain)."""

    p = TallyProjection("tally_damaged", snapshot_every=10)
    bump(store, "a", 20)
    assert fold_live(store, p, "counter-a", tenant_id="default")[1] == 20
    with begin_write(store.engine) as c:
        c.execute(update(snapshots).values(state=b'{"count": "not a number"}'))
    assert fold_live(store, p, "counter-a", tenant_id="default")[0].count == 20
    with store.engine.connect() as c:
        stored = c.execute(select(snapshots.c.version, snapshots.c.state)).all()
    assert [(v, p.decode(bytes(s)).count) for v, s in stored] == [(20, 20)]


def test_a_process_that_finds_another_rebuilding_waits_for_its_rows(url: str) -> None:
    """A new fold version made inline while another process rebuilds the rows for it (two
    workers of a new release starting together): the constructor returns once rows of its
    version are in, so its queries see every stream (the one that lost the race to the other
    returned at once and found no rows, not even its own appends, until the swap)."""


    class SlowTally(TallyProjection):
        version = 2

        def evolve(self, state: Tally, event: RecordedEvent) -> Tally:
            _time.sleep(0.0005)
            return super().evolve(state, event)

    with EventStore.open(url) as first:
        inline(first, TallyProjection("tally_wait", snapshot_every=None))
        for i in range(30):
            first.append(f"counter-s{i}", [CounterIncremented(by=1)] * 100)
    errors: list[BaseException] = []

    def rebuild_elsewhere() -> None:
        try:
            with EventStore.open(url) as other:
                rebuild(other, SlowTally("tally_wait", snapshot_every=None))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    elsewhere = threading.Thread(target=rebuild_elsewhere)
    elsewhere.start()
    with EventStore.open(url) as store:
        deadline = _time.monotonic() + 20
        while status(store, "tally_wait")[0].rebuild_generation is None:
            assert _time.monotonic() < deadline
            _time.sleep(0.005)
        p = SlowTally("tally_wait", snapshot_every=None)
        inline(store, p)  # finds the other's rebuild under way
        rows = query_rows(store, p, tenant_id=None)
        assert len(rows) == 30 and {st.count for _t, _s, st, _v in rows} == {100}
        assert status(store, "tally_wait")[0].code_version == 2
    elsewhere.join(30)
    # The constructor resumes a rebuild it finds (it cannot tell a live one from one whose
    # process died) and waits when the other moved it first; now and then it moves first, and
    # the operator's rebuild() is told the truth: another process carried it on.
    assert all(isinstance(e, RebuildInProgress) for e in errors), errors


def test_a_projector_whose_rebuild_fails_leaves_the_rows_to_the_release_that_keeps_them(
        url: str) -> None:
    """A new release's worker rebuilding the rows of an older fold version, whose new fold
    fails on an event: status shows the failure, and the projection stays running on the old
    rows, so the old release goes on appending (the worker marked it failed, which stopped
    every inline append of the category until an operator's restart).  The worker then stands
    aside instead of replaying the log to the same failure each turn; after a restart it tries
    again."""

    with EventStore.open(url) as old, EventStore.open(url) as new:
        inline(old, TallyProjection())
        bump(old, "a", 2)
        bump(old, "b", 1, by=7)  # position 3: the new fold's poison
        bump(old, "c", 1)
        worker = Projector(new, [TallyV2(poison=7)])
        with pytest.raises(ProjectionFailed) as failed:
            worker.catch_up()
        assert failed.value.position == 3
        (st,) = status(new, "tally")
        assert (st.status, st.code_version, st.failed_position) == ("running", 1, 3)
        assert st.error is not None and "rebuild" in st.error
        bump(old, "a", 1)  # the old release appends, its rows current
        row = load_row(old, TallyProjection(), "default", "counter-a")
        assert row is not None and row[0].count == 3
        assert worker.catch_up() == 0  # stands aside, the lease left free
        (st,) = status(new, "tally")
        assert st.owner is None and st.status == "running"
        restart(new, "tally")
        with pytest.raises(ProjectionFailed):
            worker.catch_up()
        (st,) = status(new, "tally")
        assert (st.status, st.code_version, st.failed_position) == ("running", 1, 3)


class EveryTally(TallyProjection):
    categories = ()


class GroupedTally(TallyProjection):
    def index(self, state: Tally) -> RowIndex:
        return RowIndex(status="big" if state.total >= 10 else "small",
                        group_key=state.writers[-1] if state.writers else None,
                        sort_key=state.total)


def test_status_lists_projections_by_name_with_the_head_and_the_events_up_to_it(
        store: EventStore) -> None:
    bump(store, "a", 2)
    Projector(store, [TallyProjection("tally_b"), TallyProjection("tally_a")]).catch_up()
    bump(store, "a", 1)  # the head: an event of their category
    sts = status(store)
    assert [(st.name, st.head, st.position, st.lag) for st in sts] == [
        ("tally_a", 3, 2, 1), ("tally_b", 3, 2, 1)]
    assert [st.name for st in status(store, "tally_b")] == ["tally_b"]


def test_lag_of_a_projection_of_every_category_counts_every_later_event(
        store: EventStore) -> None:
    bump(store, "a", 2)
    Projector(store, [EveryTally("tally_every")]).catch_up()
    store.append("note-1", [NoteAdded(text="another category")])
    bump(store, "b", 1)
    (st,) = status(store, "tally_every")
    assert (st.categories, st.position, st.head, st.lag) == ((), 2, 4, 2)


def test_restart_of_a_projection_the_store_does_not_know_is_refused(store: EventStore) -> None:
    with pytest.raises(InvalidArgument):
        restart(store, "never_registered")


def test_query_rows_by_group_and_statuses_with_versions_limit_and_ties_in_log_order(
        store: EventStore) -> None:
    p = GroupedTally()
    inline(store, p)
    store.append("counter-b", [CounterIncremented(by=5, writer="w1")])
    store.append("counter-a", [CounterIncremented(by=5, writer="w1")])
    store.append("counter-c", [CounterIncremented(by=4, writer="w2")] * 3)
    store.append("counter-d", [CounterIncremented(by=1, writer="w1")])
    w1 = query_rows(store, p, tenant_id="default", group_key="w1")
    assert [(s, v) for _t, s, _st, v in w1] == [("counter-d", 1), ("counter-b", 1),
                                                  ("counter-a", 1)]
    both = query_rows(store, p, tenant_id="default", status=["small", "big"])
    assert [(s, v) for _t, s, _st, v in both] == [("counter-d", 1), ("counter-b", 1),
                                                    ("counter-a", 1), ("counter-c", 3)]
    assert [s for _t, s, _st, _v in query_rows(store, p, tenant_id="default", status="small",
                                                limit=2)] == ["counter-d", "counter-b"]
    assert query_rows(store, p, tenant_id="default", limit=0) == []
    for bad in ("", "g" * 256, 5):
        with pytest.raises(InvalidArgument):
            query_rows(store, p, tenant_id="default", group_key=bad)  # type: ignore[arg-type]


def test_query_rows_reads_on_the_callers_connection(store: EventStore) -> None:
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 1)
    with begin_write(store.engine) as conn:
        conn.execute(update(projection_rows).values(status="held"))
        held = query_rows(store, p, tenant_id=None, status="held", conn=conn)
        assert [s for _t, s, _st, _v in held] == ["counter-a"]


def test_an_index_at_the_limits_of_the_row_columns_is_stored(store: EventStore) -> None:
    extremes = RowIndex(status="s" * 64, group_key="g" * 255, sort_key=-2**63)

    class AtTheLimits(TallyProjection):
        def index(self, state: Tally) -> RowIndex:
            return extremes

    p = AtTheLimits("tally_limits")
    inline(store, p)
    bump(store, "a", 1)
    rows = query_rows(store, p, tenant_id="default", status="s" * 64, group_key="g" * 255,
                      sort_before=-2**63 + 1)
    assert [s for _t, s, _st, _v in rows] == ["counter-a"]


def test_load_row_reads_the_row_of_the_tenant_asked_for(store: EventStore) -> None:
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 1, by=2, tenant="t1")
    bump(store, "a", 2, by=3, tenant="t2")
    one, two = load_row(store, p, "t1", "counter-a"), load_row(store, p, "t2", "counter-a")
    assert one is not None and (one[0].total, one[1]) == (2, 1)
    assert two is not None and (two[0].total, two[1]) == (6, 2)
    assert load_row(store, p, "t3", "counter-a") is None


def test_current_tops_the_row_up_from_the_log_and_gives_the_version_it_reached(
        store: EventStore) -> None:
    p = TallyProjection()
    bump(store, "a", 2)
    Projector(store, [p]).catch_up()
    bump(store, "a", 1, by=5)
    state, version = current(store, p, "counter-a", tenant_id="default")
    assert (state.count, state.total, version) == (3, 7, 3)


def _snapshot_versions(store: EventStore) -> list[int]:

    with store.engine.connect() as c:
        return list(c.execute(select(snapshots.c.version).order_by(snapshots.c.version))
                    .scalars())


def test_live_folds_snapshot_once_every_events_are_folded_and_never_when_time_travelling(
        store: EventStore) -> None:
    p = TallyProjection(snapshot_every=5)
    bump(store, "a", 5)
    assert fold_live(store, p, "counter-a", tenant_id="default", use_snapshots=False)[1] == 5
    later = datetime(2999, 1, 1, tzinfo=UTC)
    assert fold_live(store, p, "counter-a", tenant_id="default", at_time=later)[1] == 5
    assert fold_live(store, p, "counter-a", tenant_id="default", at_version=5)[1] == 5
    assert _snapshot_versions(store) == []
    assert fold_live(store, p, "counter-a", tenant_id="default")[1] == 5
    assert _snapshot_versions(store) == [5]
    bump(store, "a", 4)
    assert fold_live(store, p, "counter-a", tenant_id="default")[1] == 9
    assert _snapshot_versions(store) == [5]
    bump(store, "a", 1)
    assert fold_live(store, p, "counter-a", tenant_id="default")[1] == 10
    assert _snapshot_versions(store) == [5, 10]


def test_a_live_fold_without_snapshots_folds_the_whole_stream(store: EventStore) -> None:

    p = TallyProjection(snapshot_every=None)
    assert snapshot_now(store, p, "counter-a", tenant_id="default") == 0
    bump(store, "a", 3)
    assert snapshot_now(store, p, "counter-a", tenant_id="default") == 3
    with begin_write(store.engine) as conn:
        conn.execute(update(snapshots).values(
            state=b'{"count":999,"total":0,"writers":[],"last_version":3}'))
    assert fold_live(store, p, "counter-a", tenant_id="default")[0].count == 999
    assert fold_live(store, p, "counter-a", tenant_id="default",
                     use_snapshots=False)[0].count == 3


def test_time_travel_starts_from_no_snapshot_taken_after_its_time(url: str) -> None:
    base = datetime(2024, 1, 1, tzinfo=UTC)
    times = iter([base + timedelta(minutes=m) for m in range(3)])
    with EventStore.open(url, clock=lambda: next(times, base + timedelta(hours=1))) as store:
        p = TallyProjection(snapshot_every=None)
        bump(store, "a", 3)
        assert snapshot_now(store, p, "counter-a", tenant_id="default") == 3
        state, version = fold_live(store, p, "counter-a", tenant_id="default", at_time=base)
        assert (state.count, version) == (1, 1)
        assert fold_live(store, p, "counter-a", tenant_id="default", at_version=0) == (Tally(), 0)


def test_a_snapshot_of_new_fold_code_drops_the_stream_snapshots_of_older_code(
        store: EventStore) -> None:

    class TallyV2(TallyProjection):
        version = 2

    bump(store, "a", 3)
    bump(store, "b", 3)
    snapshot_now(store, TallyProjection(), "counter-a", tenant_id="default")
    snapshot_now(store, TallyProjection(), "counter-b", tenant_id="default")
    snapshot_now(store, TallyV2(), "counter-a", tenant_id="default")
    with store.engine.connect() as c:
        kept = c.execute(select(snapshots.c.stream_id, snapshots.c.code_version)
                         .order_by(snapshots.c.stream_id)).all()
    assert [tuple(r) for r in kept] == [("counter-a", 2), ("counter-b", 1)]


def test_catch_up_raises_the_failure_of_the_first_failing_projection(store: EventStore) -> None:
    bump(store, "a", 1, by=7)
    bump(store, "a", 1, by=13)
    projector = Projector(store, [TallyProjection("tally_x", poison=13),
                                  TallyProjection("tally_y", poison=7)])
    with pytest.raises(ProjectionFailed) as info:
        projector.catch_up()
    assert (info.value.projection, info.value.position) == ("tally_x", 2)


def test_a_worker_leaves_the_lease_of_an_older_worker_once_the_rows_are_its_version(
        store: EventStore) -> None:
    bump(store, "a", 2)
    old = Projector(store, [TallyProjection()], worker_id="old", lease_seconds=600)
    old.catch_up()
    rebuild(store, TallyV2())
    bump(store, "a", 1)
    new = Projector(store, [TallyV2()], worker_id="new", lease_seconds=600)
    assert new.run_once(new.projections[0]) == 0
    (st,) = status(store, "tally")
    assert (st.owner, st.code_version, st.position) == ("old", 2, 2)


def test_release_gives_up_only_this_workers_leases(store: EventStore) -> None:
    bump(store, "a", 1)
    holder = Projector(store, [TallyProjection()], worker_id="holder", lease_seconds=600)
    holder.catch_up()
    other = Projector(store, [TallyProjection(), TallyProjection("tally_other")],
                      worker_id="other", lease_seconds=600)
    other.catch_up()
    other.release()
    assert {st.name: st.owner for st in status(store)} == {"tally": "holder",
                                                           "tally_other": None}
    Projector(store, [TallyProjection("tally_other")], worker_id="holder",
              lease_seconds=600).catch_up()
    holder.release()
    assert {st.name: st.owner for st in status(store)} == {"tally": None,
                                                           "tally_other": "holder"}


def test_a_projector_refuses_two_projections_of_one_name(store: EventStore) -> None:
    with pytest.raises(InvalidArgument):
        Projector(store, [TallyProjection("tally_twice"), TallyProjection("tally_twice")])
    assert status(store, "tally_twice") == []


def test_stall_seconds_default_to_three_leases_and_at_least_a_minute(store: EventStore) -> None:
    assert Projector(store, [TallyProjection()], lease_seconds=30).stall_ms == 90_000
    assert Projector(store, [TallyProjection()], lease_seconds=10).stall_ms == 60_000


def test_rebuild_reports_its_progress_and_returns_the_generation_it_swapped_in(
        store: EventStore) -> None:
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 3)
    store.append("note-1", [NoteAdded(text="another category")])
    seen: list[tuple[int, int]] = []
    assert rebuild(store, p, progress=lambda at, bound: seen.append((at, bound))) == 2
    assert seen == [(3, 4), (3, 3)]
    (st,) = status(store, "tally")
    assert (st.generation, st.position, st.rebuild_generation, st.rebuild_position) == (
        2, 3, None, None)


def test_a_projection_whose_categories_change_records_them(store: EventStore) -> None:
    class TallyAndNotes(TallyProjection):
        categories = ("counter", "note")

    Projector(store, [TallyProjection()])
    Projector(store, [TallyAndNotes()])
    (st,) = status(store, "tally")
    assert st.categories == ("counter", "note")


def test_verify_of_a_projector_behind_the_log_compares_only_what_it_applied(
        store: EventStore) -> None:
    """verify folds the log up to the projection's checkpoint, not to the log's head: events a
    projector has yet to apply are no difference."""
    p = TallyProjection("tally_async")
    bump(store, "a", 3)
    Projector(store, [p]).catch_up()
    bump(store, "a", 2)
    bump(store, "b", 1)
    assert verify(store, p) == []
    (st,) = status(store, "tally_async")
    assert st.position == 3 and st.lag == 3


def test_a_rebuild_swapped_in_during_a_verify_leaves_the_verifys_rows_alone(
        store: EventStore) -> None:
    """A rebuild's swap deletes the rows of the generations before the new one, never the
    scratch rows of a verify running meanwhile (which would then report every row missing)."""
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 3)
    bump(store, "b", 2)
    swapped: list[int] = []

    def rebuild_once(_at: int, _bound: int) -> None:
        if not swapped:
            swapped.append(rebuild(store, p))

    assert verify(store, p, progress=rebuild_once) == []
    assert swapped == [2]
    assert {k: v.count for k, v in rows_of(store, p).items()} == {
        ("default", "counter-a"): 3, ("default", "counter-b"): 2}


def test_a_projector_batch_finds_the_rows_of_every_tenant_it_touches(store: EventStore) -> None:
    """A batch looks up the rows of its streams by tenant and stream: a tenant with several
    streams in the batch, and tenants with one each, all continue from their stored rows."""
    p = TallyProjection("tally_async")
    proj = Projector(store, [p])
    keys = [("acme", "a1"), ("acme", "a2"), ("solo", "s"), ("other", "o"), ("acme", "a3")]
    for round_ in (1, 2):
        for tenant, stream in keys:
            bump(store, stream, 1, by=round_, tenant=tenant)
        assert proj.catch_up() == len(keys)
    assert {k: (v.count, v.total, v.last_version) for k, v in rows_of(store, p).items()} == {
        (tenant, f"counter-{stream}"): (2, 3, 2) for tenant, stream in keys}


def test_an_inline_projection_catches_up_on_more_history_than_a_page(store: EventStore) -> None:
    """The catch-up of history appended without the projection goes on past a full page."""
    n = _PAGE + 5
    bump(store, "a", n, per_append=500)
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 1)
    row = load_row(store, p, "default", "counter-a")
    assert row is not None and row[0].count == n + 1 and row[1] == n + 1
    (st,) = status(store, "tally")
    assert st.position == n + 1 and st.lag == 0


def test_catch_up_each_counts_the_events_applied_before_a_failure(store: EventStore) -> None:
    """A batch that fails still applies its events before the failing one: catch_up_each
    counts them in its total, beside the failure."""
    bump(store, "a", 3)
    store.append("counter-b", [CounterIncremented(by=13)])
    bump(store, "a", 2)
    p = TallyProjection("tally_async", poison=13)
    total, failures = Projector(store, [p], batch_size=10).catch_up_each()
    assert [(type(f), getattr(f, "position", None)) for f in failures] == [(ProjectionFailed, 4)]
    assert total == 3
    (st,) = status(store, "tally_async")
    assert (st.status, st.position) == ("failed", 3)


def test_a_stale_rebuild_leaves_rows_newer_code_rebuilt_before_it_took_the_lock(
        store: EventStore) -> None:
    """A process of the old release that found rows of another version stale, but whose
    rebuild takes the projection's lock only after a newer release rebuilt them, leaves them:
    rebuilding them back to its version would start the two releases taking turns."""
    inline(store, TallyProjection())
    bump(store, "a", 2)
    assert rebuild(store, TallyV2()) == 2
    assert _rebuild(store, TallyProjection(), progress=None, only_if_stale=True) == 2
    (st,) = status(store, TallyProjection.name)
    assert (st.generation, st.code_version, st.rebuild_generation) == (2, 2, None)
    row = load_row(store, TallyV2(), "default", "counter-a")
    assert row is not None and row[1] == 2


def test_rows_of_one_stream_name_in_two_tenants_stay_apart(store: EventStore) -> None:
    """Inline and by a projector, a stream's row is looked up by tenant and stream: a stream
    of the same name in another tenant neither lends its row nor takes it."""
    kept_inline = TallyProjection()
    inline(store, kept_inline)
    by_batches = TallyProjection("tally_async")
    proj = Projector(store, [by_batches])
    for tenant, n, by in (("x", 2, 1), ("y", 1, 5), ("x", 1, 1)):
        bump(store, "a", n, by=by, tenant=tenant)
        assert proj.catch_up() == n
    expected = {("x", "counter-a"): (3, 3, 3), ("y", "counter-a"): (1, 5, 1)}
    for p in (kept_inline, by_batches):
        assert {k: (v.count, v.total, v.last_version)
                for k, v in rows_of(store, p).items()} == expected


def test_a_rebuild_that_lost_its_generation_writes_no_more_rows(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once another rebuild has resumed and swapped in the generation a rebuild was filling,
    the first one stops before its next page writes anything: the live rows never go back to
    the state of its page, and the bookkeeping shows no rebuild under way."""
    monkeypatch.setattr(engine_module, "_PAGE", 2)  # a rebuild's pages of 10 events
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 25, per_append=5)
    seen: list[int] = []

    def another_rebuild_takes_over(done: int, total: int) -> None:
        if not seen:
            assert done < total
            assert rebuild(store, TallyProjection()) == 2
        seen.append(rows_of(store, p)[("default", "counter-a")].count)

    with pytest.raises(RebuildInProgress):
        rebuild(store, p, progress=another_rebuild_takes_over)
    assert seen == [25]
    (st,) = status(store, "tally")
    assert (st.generation, st.position, st.rebuild_generation, st.rebuild_position) == (
        2, 25, None, None)
    assert verify(store, p) == []


def test_an_inline_append_of_several_events_moves_the_checkpoint_past_the_last(
        store: EventStore) -> None:
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 3, per_append=3)
    bump(store, "b", 2, per_append=2)
    (st,) = status(store, "tally")
    assert (st.position, st.lag) == (5, 0)
    assert {k: v.count for k, v in rows_of(store, p).items()} == {
        ("default", "counter-a"): 3, ("default", "counter-b"): 2}


def test_a_rebuild_with_a_fixed_fold_runs_a_failed_projection_again(store: EventStore) -> None:
    """A rebuild's swap clears a failure a projector recorded, as a restart does: the
    projection runs again from the rebuilt rows."""
    bump(store, "a", 2)
    store.append("counter-a", [CounterIncremented(by=13)])
    proj = Projector(store, [TallyProjection("tally_async", poison=13)])
    with pytest.raises(ProjectionFailed):
        proj.catch_up()
    assert status(store, "tally_async")[0].status == "failed"
    fixed = TallyProjection("tally_async")
    rebuild(store, fixed)
    (st,) = status(store, "tally_async")
    assert (st.status, st.error, st.failed_position, st.position) == ("running", None, None, 3)
    proj.release()
    bump(store, "a", 1)
    assert Projector(store, [fixed]).catch_up() == 1
    assert rows_of(store, fixed)[("default", "counter-a")].count == 4


def test_a_rebuild_failing_after_some_pages_shows_it_and_drops_its_rows(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild that committed pages before the failing event still owns its generation:
    the failure shows in status and its partial rows go, so the next rebuild starts over."""
    monkeypatch.setattr(engine_module, "_PAGE", 2)  # a rebuild's pages of 10 events
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 12)
    store.append("counter-b", [CounterIncremented(by=13)])
    with pytest.raises(ProjectionFailed):
        rebuild(store, TallyProjection(poison=13))
    (st,) = status(store, "tally")
    assert (st.status, st.generation, st.failed_position) == ("running", 1, 13)
    assert st.rebuild_generation is None and "rebuild of generation 2" in (st.error or "")
    with store.engine.connect() as conn:
        gens = set(conn.execute(select(projection_rows.c.generation)).scalars())
    assert gens == {1}
    assert rebuild(store, p) == 2
    assert status(store, "tally")[0].error is None


def test_events_appended_as_a_rebuild_finishes_its_pages_are_in_its_rows(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """An append landing after a rebuild's last page and before its swap is folded by the
    swap itself (under the projection's lock): the new rows and checkpoint include it."""
    p = TallyProjection()
    inline(store, p)
    bump(store, "a", 3)
    ends: list[int] = []
    log_end = store.last_position

    def log_end_then_an_append() -> int:
        end = log_end()
        ends.append(end)
        if len(ends) == 2:  # the fill found its last page done: append before the swap
            bump(store, "a", 1)
        return end

    monkeypatch.setattr(store, "last_position", log_end_then_an_append)
    assert rebuild(store, p) == 2
    monkeypatch.undo()
    assert ends == [3, 3]
    (st,) = status(store, "tally")
    assert (st.generation, st.position, st.lag) == (2, 4, 0)
    assert rows_of(store, p)[("default", "counter-a")].count == 4
