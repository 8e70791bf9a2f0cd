"""Inline projections on the one-round-trip append (PostgreSQL): the handler folds onto the row
it committed last and guards the projection's checkpoint instead of reading.

Every test runs on both backends (SQLite never guesses, so there it checks the plain path gives
the same answers); on PostgreSQL most also check that the guessed path was really taken.
``verify`` (a rebuild from the log into scratch rows, compared with the live rows) is the
oracle: whatever path an append took, the rows must be what replaying the log gives.
"""

from __future__ import annotations

import msgspec
import pytest
from sqlalchemy import text

from eventstore import EventStore, RecordedEvent
from eventstore.errors import DatabaseError
from projections import Projection, inline, rebuild, verify
from projections._engine import load_row
from tests._events import CounterIncremented
from tests._projections import Tally, TallyProjection
from tests.test_append_path import _count_guesses, _FailingWriter


def _bump(store: EventStore, stream: str, by: int = 1, writer: str = "w") -> None:
    store.append(stream, [CounterIncremented(by=by, writer=writer)])


def test_inline_rows_stay_right_over_guessed_appends(store: EventStore) -> None:
    """Many appends to a few streams: after the first append to each stream, PostgreSQL folds
    in one round trip; the rows are always what a replay gives, and queries see them at once."""
    p = TallyProjection(snapshot_every=None)
    inline(store, p)
    seen = _count_guesses(store)
    for i in range(30):
        _bump(store, f"counter-{i % 3}", by=i)
        got = load_row(store, p, "default", f"counter-{i % 3}")
        assert got is not None and got[1] == i // 3 + 1
    assert load_row(store, p, "default", "counter-1") == (
        Tally(count=10, total=sum(range(1, 30, 3)), writers=["w", "w", "w"], last_version=10), 10)
    assert verify(store, p) == []
    if store.backend == "postgresql":
        assert seen.count(True) >= 25 and "raised" not in seen


def test_other_stores_and_rebuilds_between_guessed_appends(url: str) -> None:
    """Another store (another process) with the projection inline, another without it (its
    events are caught up later), and a rebuild (a new generation) all move the projection
    under what a store remembers: its guard must notice each time, and the rows stay right."""
    a = EventStore.open(url, migrate=True)
    b = EventStore.open(url)
    c = EventStore.open(url)
    p = TallyProjection(snapshot_every=None)
    try:
        inline(a, p)
        inline(b, TallyProjection(snapshot_every=None))
        seen = _count_guesses(a)
        for _ in range(3):
            _bump(a, "counter-x", writer="a")
            _bump(a, "counter-z", writer="a")
        _bump(b, "counter-z", writer="b")          # b changes a row a remembers, then a
        _bump(a, "counter-x", writer="a")          # appends elsewhere (reads the checkpoint)
        _bump(a, "counter-z", writer="a")          # and must not fold onto what it remembered
        assert load_row(a, p, "default", "counter-z") == (
            Tally(count=5, total=5, writers=["a", "b", "a"], last_version=5), 5)
        _bump(b, "counter-x", writer="b")          # b moves the row and the checkpoint
        _bump(a, "counter-x", writer="a")
        _bump(a, "counter-x", writer="a")
        _bump(c, "counter-x", by=5, writer="c")   # c has no inline handler: a catches up
        _bump(a, "counter-y", writer="a")
        _bump(a, "counter-x", writer="a")
        _bump(a, "counter-x", writer="a")
        rebuild(a, p)                              # a new generation
        _bump(a, "counter-x", writer="a")
        _bump(a, "counter-x", writer="a")
        state, version = load_row(a, p, "default", "counter-x") or (None, 0)
        assert version == 12
        assert state == Tally(count=12, total=16, writers=["a", "a", "a"], last_version=12)
        assert verify(a, p) == []
        if a.backend == "postgresql":
            assert True in seen and False in seen and "raised" not in seen
    finally:
        for s in (a, b, c):
            s.close()


class _Bag(msgspec.Struct):
    items: list[int] = msgspec.field(default_factory=list)


class _MutatingBag(Projection[_Bag]):
    """A fold that changes its state in place (allowed: it returns it too)."""

    name = "bag"
    categories = ("bag",)
    state_type = _Bag

    def initial(self, tenant_id: str, stream_id: str) -> _Bag:
        return _Bag()

    def evolve(self, state: _Bag, event: RecordedEvent) -> _Bag:
        assert isinstance(event.data, CounterIncremented)
        state.items.append(event.data.by)
        return state


def test_a_failed_append_leaves_no_trace_in_what_the_handler_remembers(
        store: EventStore) -> None:
    """An append whose transaction fails after the projection folded it (in place) leaves the
    projection's memory as before: the next append folds onto the committed row."""
    p = _MutatingBag()
    inline(store, p)
    store.append("bag-1", [CounterIncremented(by=1, writer="w")])
    store.append("bag-1", [CounterIncremented(by=2, writer="w")])
    seen = _count_guesses(store)
    failing = _FailingWriter()
    store.add_inline_handler(failing)
    with pytest.raises(DatabaseError, match="no_such_table"):
        store.append("bag-1", [CounterIncremented(by=99, writer="w")])
    store.remove_inline_handler(failing)
    store.append("bag-1", [CounterIncremented(by=3, writer="w")])  # probes again
    store.append("bag-1", [CounterIncremented(by=4, writer="w")])
    assert load_row(store, p, "default", "bag-1") == (_Bag(items=[1, 2, 3, 4]), 4)
    assert verify(store, p) == []
    if store.backend == "postgresql":
        assert seen == ["raised", True]


def test_appends_the_projection_ignores_take_the_one_round_trip_path(store: EventStore) -> None:
    """With an inline projection registered, appends to streams it does not fold write nothing
    of it, so on PostgreSQL they go in one round trip too; its own appends still fold."""
    p = TallyProjection(snapshot_every=None)
    inline(store, p)
    seen = _count_guesses(store)
    for i in range(4):
        store.append("other-1", [CounterIncremented(by=i, writer="w")])
        _bump(store, "counter-1")
    assert load_row(store, p, "default", "counter-1") is not None
    assert load_row(store, p, "default", "other-1") is None
    assert verify(store, p) == []
    if store.backend == "postgresql":
        assert seen.count(True) >= 6


def test_a_writer_without_the_projection_is_caught_up_not_skipped(url: str) -> None:
    """Another writer appends an event the projection folds, without running the projection;
    this process then appends events the projection ignores (and so learns the log's end),
    then one it folds: the projection must catch up the other writer's event, not skip it."""
    a = EventStore.open(url, migrate=True)
    c = EventStore.open(url)
    p = TallyProjection(snapshot_every=None)
    try:
        inline(a, p)
        _bump(a, "counter-x", writer="a")
        _bump(a, "counter-x", writer="a")
        _bump(c, "counter-y", by=7, writer="c")  # the projection's, not folded yet
        a.append("other-1", [CounterIncremented(by=0, writer="a")])
        a.append("other-1", [CounterIncremented(by=0, writer="a")])
        _bump(a, "counter-x", writer="a")
        assert load_row(a, p, "default", "counter-y") == (
            Tally(count=1, total=7, writers=["c"], last_version=1), 1)
        assert verify(a, p) == []
    finally:
        a.close()
        c.close()


class _Balance(TallyProjection):
    """A fold with a rule: the total may not go negative."""

    def evolve(self, state: Tally, event: RecordedEvent) -> Tally:
        new = super().evolve(state, event)
        if new.total < 0:
            raise ValueError(f"balance would go negative: {new.total}")
        return new


def test_a_fold_failing_on_stale_memory_falls_back_to_the_rows(url: str) -> None:
    """What the handler remembers may be stale; a fold that fails on it must not fail the
    append: the probing path folds onto the rows as they are (and raises only if the failure
    is real)."""
    a = EventStore.open(url, migrate=True)
    b = EventStore.open(url)
    p = _Balance(snapshot_every=None)
    try:
        inline(a, p)
        _bump(a, "counter-x", by=1, writer="a")
        _bump(a, "counter-x", by=1, writer="a")
        _bump(b, "counter-x", by=10, writer="b")  # not folded by a's memory
        _bump(a, "counter-x", by=-5, writer="a")  # -3 on the memory, 7 on the rows
        assert load_row(a, p, "default", "counter-x") == (
            Tally(count=4, total=7, writers=["a", "b", "a"], last_version=4), 4)
        from projections import ProjectionFailed
        with pytest.raises(ProjectionFailed):
            _bump(a, "counter-x", by=-50, writer="a")  # a real failure still fails
        assert verify(a, p) == []
    finally:
        a.close()
        b.close()


def _lose_commits(store: EventStore, *, after_position: int) -> None:
    """What a failover to a standby lacking the last commits does: the events past
    ``after_position`` are gone, every stream is at version 2, and no connection goes on."""
    with store.engine.begin() as conn:
        conn.execute(text(f"DELETE FROM es_events WHERE position > {after_position}"))
        conn.execute(text("UPDATE es_streams SET version = 2"))
        if store.backend == "postgresql":
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND datname = current_database()"))


def test_after_the_database_lost_commits_appends_leave_no_gaps(url: str) -> None:
    """A failover to a standby that lacks the last commits (simulated: they are deleted and
    every connection is cut) must not leave appends guessed from what this process committed
    before: positions and versions go on from what the database holds."""
    a = EventStore.open(url, migrate=True)
    try:
        for _ in range(4):
            _bump(a, "counter-x")
        _lose_commits(a, after_position=2)
        try:  # the probing path (an idempotency key) meets the cut connection first
            a.append("counter-x", [CounterIncremented(by=1, writer="w")], idempotency_key="k")
        except DatabaseError:
            assert a.backend == "postgresql"
        for _ in range(3):
            _bump(a, "counter-x")
        got = [(e.position, e.version) for e in a.read_stream("counter-x")]
        assert got == [(i, i) for i in range(1, len(got) + 1)]
        assert a.stream_version("counter-x") == len(got) >= 4
    finally:
        a.close()


def test_a_fold_in_a_transaction_that_rolls_back_is_never_remembered(store: EventStore) -> None:
    """An append inside a transaction of the caller's (a BoundStore: what the async facades
    run) folds while the store's own append to another stream is guessing; that transaction
    then rolls back.  The store's append commits, and what it remembers must be its own fold,
    not the rolled-back one: later appends to the first stream stay what a replay gives."""
    import threading

    from eventstore._backend import begin_write
    from eventstore._bound import BoundStore

    gate, inside = threading.Event(), threading.Event()

    class Gated(TallyProjection):
        def evolve(self, state: Tally, event: RecordedEvent) -> Tally:
            if getattr(event.data, "by", 0) == 100 and not gate.is_set():
                inside.set()  # the other transaction is folding its append: hold it here
                gate.wait(10)
            return super().evolve(state, event)

    p = Gated(snapshot_every=None)
    inline(store, p)
    for stream in ("counter-a", "counter-b", "counter-a", "counter-b"):
        _bump(store, stream)
    failures: list[BaseException] = []

    def rolled_back() -> None:
        try:
            with begin_write(store.engine) as conn:
                BoundStore(store, conn).append("counter-a", [CounterIncremented(by=100)])
                raise LookupError("the caller's transaction fails after its append")
        except LookupError:
            pass
        except BaseException as e:  # handed to the test's thread
            failures.append(e)

    def own_append() -> None:
        try:
            _bump(store, "counter-b")
        except BaseException as e:
            failures.append(e)

    other = threading.Thread(target=rolled_back)
    other.start()
    assert inside.wait(10)
    mine = threading.Thread(target=own_append)
    mine.start()
    mine.join(0.3)  # guessing (PostgreSQL), then waiting for the append lock the other holds
    gate.set()
    other.join()
    mine.join()
    assert failures == []
    _bump(store, "counter-a")
    _bump(store, "counter-a")
    assert load_row(store, p, "default", "counter-a") == (
        Tally(count=4, total=4, writers=["w", "w", "w"], last_version=4), 4)
    assert load_row(store, p, "default", "counter-b") == (
        Tally(count=3, total=3, writers=["w", "w", "w"], last_version=3), 3)
    assert verify(store, p) == []


def test_stale_guesses_with_a_snapshot_due_fall_back_to_the_probing_path(url: str) -> None:
    """Two stores running one inline projection with a snapshot every 2 events append to one
    stream in turn: each store's guess goes stale, also in appends that save a snapshot (whose
    insert, in the pipeline, may be where the driver reports the stale guess's key violation).
    Every append succeeds, and every snapshot is the state a fold from the start gives."""
    from sqlalchemy import select

    from eventstore._schema import snapshots
    from projections import fold_live

    with EventStore.open(url) as a, EventStore.open(url) as b:
        inline(a, TallyProjection("tally_snap_guess", snapshot_every=2))
        inline(b, TallyProjection("tally_snap_guess", snapshot_every=2))
        for _ in range(15):
            _bump(a, "counter-s", writer="a")
            _bump(a, "counter-s", writer="a")
            _bump(b, "counter-s", writer="b")
        assert a.stream_version("counter-s") == 45
        p = TallyProjection("tally_snap_guess")
        with a.engine.connect() as c:
            snaps = c.execute(select(snapshots.c.version, snapshots.c.state).where(
                snapshots.c.projection == "tally_snap_guess")).all()
        assert sorted(v for v, _s in snaps) == list(range(2, 45, 2))
        for version, state in snaps:
            assert p.decode(bytes(state)) == fold_live(
                a, p, "counter-s", tenant_id="default", at_version=version,
                use_snapshots=False)[0]
        assert verify(a, p) == []


def test_a_stale_guess_is_recognised_through_sqlalchemy_s_wrapping() -> None:
    """A handler statement run through SQLAlchemy reports the driver's key violation wrapped
    (``IntegrityError``, the driver's error as ``orig``): still a stale guess."""
    from types import SimpleNamespace

    from sqlalchemy.exc import IntegrityError

    from eventstore._core import _GUESS_KEYS, _stale_guess

    driver = SimpleNamespace(diag=SimpleNamespace(constraint_name=next(iter(_GUESS_KEYS))),
                             sqlstate="23505")
    wrapped = IntegrityError("INSERT ...", {}, driver)  # type: ignore[arg-type]
    assert _stale_guess(driver) and _stale_guess(wrapped)  # type: ignore[arg-type]
    other = SimpleNamespace(diag=SimpleNamespace(constraint_name="some_other_key"),
                            sqlstate="23505")
    assert not _stale_guess(IntegrityError("INSERT ...", {}, other))  # type: ignore[arg-type]


def test_after_the_database_lost_commits_appends_to_each_stream_go_on_from_what_it_holds(
        url: str) -> None:
    a = EventStore.open(url, migrate=True)
    try:
        for stream in ("counter-x", "counter-x", "counter-y", "counter-y", "counter-y"):
            _bump(a, stream)
        _lose_commits(a, after_position=4)  # counter-y loses its last event
        for stream in ("counter-x", "counter-x", "counter-y", "counter-x", "counter-y"):
            try:
                _bump(a, stream)
            except DatabaseError as e:
                assert e.transient and a.backend == "postgresql"
        assert [e.position for e in a.read_all()] == list(range(1, a.last_position() + 1))
        for stream in ("counter-x", "counter-y"):
            versions = [e.version for e in a.read_stream(stream)]
            assert versions == list(range(1, a.stream_version(stream) + 1))
    finally:
        a.close()
