"""Arguments the facades and the store take are checked up front, with typed errors, and the
times they record are UTC whatever the clock's zone."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from eventstore import EventStore, EventTooLarge, InvalidArgument, InvalidEvent, StoreClosed
from projections import AgentSessions, Continuations, Conversations, Flows, Jobs, SessionKey
from tests._events import Blob
from tests.conftest import pg_url

PLUS2 = dt.timezone(dt.timedelta(hours=2))
PAUSE: dict[str, Any] = {"messages": [], "pending_tool_calls": [{"id": "t"}], "tools": [],
                         "tool_schemas": [], "agent_config": {}}


def _at(tz: dt.tzinfo | None) -> dt.datetime:
    return dt.datetime(2026, 1, 1, 12, 0, tzinfo=tz)


def test_facade_times_are_utc_whatever_the_clocks_zone(store: EventStore) -> None:
    """A clock in +02:00 gives the same instants, returned (and stored) in UTC."""
    def clock() -> dt.datetime:
        return _at(PLUS2)

    noon_utc = dt.datetime(2026, 1, 1, 10, 0, tzinfo=dt.UTC)
    paused = Continuations(store, clock=clock).pause("c-1", "u", **PAUSE)
    assert paused.expires_at == noon_utc + dt.timedelta(minutes=30)
    assert paused.expires_at is not None and paused.expires_at.tzinfo == dt.UTC
    saved = AgentSessions(store, clock=clock).save(SessionKey("t", "r", "n", "b", "a"),
                                                   snapshot={}, layer_specs=[])
    assert saved.saved_at == noon_utc and saved.saved_at.tzinfo == dt.UTC
    flows = Flows(store, clock=clock)
    flows.request_feedback("f-1", {"q": 1}, {})
    pending = flows.pending_feedback("f-1")
    assert pending is not None and pending.requested_at.tzinfo == dt.UTC
    job = Jobs(store, clock=clock).submit("wf", {}, user_id="u")
    assert job.submitted_at == noon_utc


def test_a_clock_giving_naive_times_is_refused_and_writes_nothing(store: EventStore) -> None:
    def naive() -> dt.datetime:
        return _at(None)

    with pytest.raises(InvalidArgument, match="timezone-aware"):
        Continuations(store, clock=naive).pause("c-1", "u", **PAUSE)
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        AgentSessions(store, clock=naive).save(SessionKey("t", "r", "n", "b", "a"),
                                               snapshot={}, layer_specs=[])
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        Flows(store, clock=naive).request_feedback("f-1", {}, {})
    with pytest.raises(InvalidArgument):
        Continuations(store, clock=5)  # type: ignore[arg-type]
    assert list(store.read_all()) == []


class _NoOffset(dt.tzinfo):
    """A zone that does not know its offset: its times are naive as far as Python goes."""

    def utcoffset(self, when: dt.datetime | None) -> None:
        return None

    def dst(self, when: dt.datetime | None) -> None:
        return None


@pytest.mark.parametrize("bad", [dt.datetime(2026, 1, 1, 12, tzinfo=_NoOffset()),
                                 dt.date(2026, 1, 1), "2026-01-01T12:00:00+00:00"])
def test_a_clock_giving_no_aware_datetime_is_refused_and_writes_nothing(
        store: EventStore, bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        Flows(store, clock=lambda: bad).request_feedback("f-1", {}, {})
    assert list(store.read_all()) == []


def test_the_stores_clock_is_checked_and_kept_in_utc(url: str) -> None:
    with pytest.raises(InvalidArgument, match="clock"):
        EventStore.open(url, migrate=True, clock=5)  # type: ignore[arg-type]
    with EventStore.open(url, migrate=True, clock=lambda: _at(PLUS2)) as s:
        s.append("n-1", [_note()])
        (ev,) = list(s.read_stream("n-1"))
        assert ev.recorded_at == dt.datetime(2026, 1, 1, 10, 0, tzinfo=dt.UTC)
    with EventStore.open(url, migrate=True, clock=lambda: _at(None)) as s:
        with pytest.raises(InvalidArgument, match="timezone-aware"):
            s.append("n-2", [_note()])
        assert s.stream_version("n-2") == 0


def test_the_stores_now_is_in_utc_whatever_the_clocks_zone(url: str) -> None:
    with EventStore.open(url, migrate=True, clock=lambda: _at(PLUS2)) as s:
        now = s.now()
        assert now == _at(PLUS2) and now.tzinfo == dt.UTC


def test_a_clock_stepping_back_never_moves_a_streams_time_back(url: str) -> None:
    now = [_at(dt.UTC)]
    handed: list[dt.datetime] = []
    with EventStore.open(url, migrate=True, clock=lambda: now[0]) as s:
        s.add_inline_handler(lambda conn, recorded: handed.extend(
            e.recorded_at for e in recorded))
        s.append("n-1", [_note()])
        now[0] -= dt.timedelta(hours=1)
        s.append("n-1", [_note()])
        s.append("n-1", [_note()])
        assert [e.recorded_at for e in s.read_stream("n-1")] == [_at(dt.UTC)] * 3
        assert handed == [_at(dt.UTC)] * 3


def test_reads_of_a_closed_store_raise_when_called(store: EventStore) -> None:
    store.close()
    with pytest.raises(StoreClosed):
        store.read_stream("n-1")
    with pytest.raises(StoreClosed):
        store.read_all()


def test_every_call_of_a_closed_store_raises_store_closed(url: str) -> None:
    with EventStore.open(url, migrate=True) as store:
        store.append("n-1", [_note()])
        unread = store.read_stream("n-1")
        assert store.stream_version("n-1") == 1
    with pytest.raises(StoreClosed):  # a read made before the close, iterated after it
        list(unread)
    calls: list[Callable[[], object]] = [
        lambda: store.engine, lambda: store.append("n-1", [_note()]),
        lambda: store.stream_version("n-1"), store.last_position, store.stats,
        lambda: next(store.subscribe())]
    for close_again in (False, True):
        if close_again:
            store.close()  # a no-op
        for call in calls:
            with pytest.raises(StoreClosed):
                call()


class _WaitRecorder(threading.Event):
    """A stop event that records how long subscribe waits for new events, then stops it."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        self.set()
        return True


def test_subscribe_polls_every_poll_interval_from_the_argument_else_the_variable(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTSTORE_POLL_INTERVAL", "0.3")
    for poll_interval, waited in [(0.05, 0.05), (None, 0.3)]:
        with EventStore.open(url, migrate=True, poll_interval=poll_interval) as store:
            stop = _WaitRecorder()
            assert list(store.subscribe(stop=stop)) == []
            assert stop.waits == [waited]


def test_max_event_bytes_from_the_argument_else_the_variable(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTSTORE_MAX_EVENT_BYTES", "5000")
    big = [Blob(payload="x" * 200)]
    with EventStore.open(url, migrate=True, max_event_bytes=100) as store:
        with pytest.raises(EventTooLarge):
            store.append("b-1", big)
        assert store.stream_version("b-1") == 0
    monkeypatch.setenv("EVENTSTORE_MAX_EVENT_BYTES", "100")
    with EventStore.open(url, migrate=True) as store, pytest.raises(EventTooLarge):
        store.append("b-1", big)
    with EventStore.open(url, migrate=True, max_event_bytes=5000) as store:
        assert store.append("b-1", big).stream_version == 1


def test_pool_size_sizes_the_postgresql_pool() -> None:
    with EventStore.open(pg_url(), migrate=True, pool_size=2) as store:
        assert store.engine.pool.size() == 2  # type: ignore[attr-defined]
    with EventStore.open(pg_url(), migrate=True) as store:
        assert store.engine.pool.size() == 5  # type: ignore[attr-defined]


def test_the_stores_repr_hides_the_password() -> None:
    with EventStore.open(make_url(pg_url()).set(password="s3cret"), migrate=True) as store:
        assert "s3cret" not in repr(store) and "***" in repr(store)


def _note() -> Any:
    from tests._events import NoteAdded
    return NoteAdded(text="x")


@pytest.mark.parametrize("kwargs", [{"pool_size": 0}, {"pool_size": "5"}, {"migrate": "no"},
                                    {"max_event_bytes": 0}, {"poll_interval": 2},
                                    {"poll_interval": 0}])
def test_bad_open_arguments_are_refused(url: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        EventStore.open(url, **kwargs)


def test_a_poll_interval_of_exactly_half_a_second_is_accepted(url: str) -> None:
    with EventStore.open(url, poll_interval=0.5) as store:
        assert list(store.read_all()) == []


def test_empty_setting_variables_mean_the_defaults(url: str, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    monkeypatch.setenv("EVENTSTORE_MAX_EVENT_BYTES", "")
    monkeypatch.setenv("EVENTSTORE_POLL_INTERVAL", "")
    with EventStore.open(url, migrate=True) as store:
        assert store.append("n-1", [_note()]).stream_version == 1


@pytest.mark.parametrize("at_version", [-1, "1", 1.5, True])
def test_time_travel_by_version_checks_the_version(store: EventStore, at_version: Any) -> None:
    """The same InvalidArgument on both backends (it used to be a DatabaseError on PostgreSQL,
    and a silently rounded or ignored version on SQLite)."""
    conversations = Conversations(store)
    conversations.assign("c-1", {"n": 1})
    conversations.assign("c-1", {"n": 2})
    with pytest.raises(InvalidArgument, match="at_version"):
        conversations.get("c-1", at_version=at_version)
    assert conversations.get("c-1", at_version=0).variables == {}
    assert conversations.get("c-1", at_version=1).variables == {"n": 1}


def test_facade_values_that_do_not_fit_their_event_are_refused(store: EventStore) -> None:
    """A mistyped facade argument raises InvalidEvent before anything is written (it was
    written, and then broke every read of the log)."""
    with pytest.raises(InvalidEvent):
        Conversations(store).assign("c-1", {"a": 1}, value_types={"a": 5})  # type: ignore[dict-item]
    with pytest.raises(InvalidEvent):
        Conversations(store).assign("c-1", {"a": 1}, workflow_run_id=7)  # type: ignore[arg-type]
    for not_a_mapping in (5, "a", ("a", "b")):  # (used to be an AttributeError)
        with pytest.raises(InvalidArgument, match="value_types must be a mapping"):
            Conversations(store).assign("c-1", {"a": 1},
                                        value_types=not_a_mapping)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"does not assign: \['b'\]"):  # (was ignored)
        Conversations(store).assign("c-1", {"a": 1}, value_types={"a": "integer", "b": "x"})
    with pytest.raises(InvalidEvent):
        AgentSessions(store).save(SessionKey("t", "r", "n", "b", "a"), snapshot={},
                                  layer_specs=[], pending_form_id=7)  # type: ignore[arg-type]
    continuations = Continuations(store)
    continuations.pause("c-1", "u", **PAUSE)
    continuations.claim("c-1", "u")
    with pytest.raises(InvalidEvent):
        continuations.release("c-1", "u", error=500)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="client_tools"):
        continuations.pause("c-2", "u", **PAUSE, client_tools="abc")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="timedelta"):
        Continuations(store, ttl=60)  # type: ignore[arg-type]
    assert [e.type for e in store.read_all()] == ["ToolCallsPaused", "ResumeStarted"]


def test_an_event_of_a_class_redefined_since_still_reads_as_the_registered_one(
        store: EventStore) -> None:
    """Appending an instance of an event class that was redefined under the same tag (a
    notebook cell run again) checks it against its own class without touching the decoder
    that reads use: every read gives the registered (newest) class."""
    from eventstore import Event

    class Note(Event, tag="test.Redefined"):
        text: str

    made_before = Note(text="made before the cell ran again")

    class Note(Event, tag="test.Redefined"):  # type: ignore[no-redef]
        text: str
        author: str = "nobody"

    store.append("n-1", [made_before])
    store.append("n-1", [Note(text="new", author="me")])
    read = [e.data for e in store.read_stream("n-1")]
    assert all(type(d) is Note for d in read)
    assert read == [Note(text="made before the cell ran again"), Note(text="new", author="me")]


def test_queries_that_take_a_tenant_refuse_none(store: EventStore) -> None:
    """tenant_id=None read every tenant's rows: refused like every other query's."""
    with pytest.raises(InvalidArgument):
        Continuations(store).pending_for_user("alice", tenant_id=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        AgentSessions(store).active_in_run(None, "run-1")  # type: ignore[arg-type]


NUL = "a\x00b"


@pytest.mark.parametrize("call", [
    lambda s: Continuations(s).get(NUL, "u"),
    lambda s: Continuations(s).pending_for_user(NUL),
    lambda s: Continuations(s).get("c", "u", tenant_id=NUL),
    lambda s: Jobs(s).get(NUL),
    lambda s: Jobs(s).list(tenant_id=NUL),
    lambda s: Jobs(s).submit("wf", {}, user_id="u", dedupe_key=NUL),
    lambda s: Jobs(s).claim(NUL),
    lambda s: Flows(s).load(NUL),
    lambda s: Flows(s).pending_feedback(NUL),
    lambda s: Flows(s).save("f", NUL, {}),
    lambda s: Conversations(s).get(NUL),
    lambda s: AgentSessions(s).save(SessionKey("t", NUL, "n", "b", "a"), snapshot={},
                                    layer_specs=[]),
    lambda s: AgentSessions(s).active_in_run("t", NUL),
    lambda s: AgentSessions(s).finish_run("t", NUL, "done"),
], ids=["cont-get", "cont-pending", "cont-tenant", "jobs-get", "jobs-list", "jobs-dedupe",
        "jobs-claim", "flows-load", "flows-pending", "flows-method", "conv-get", "sess-save",
        "sess-run", "sess-finish"])
def test_ids_with_nul_are_refused_on_both_backends(store: EventStore, call: Any) -> None:
    """PostgreSQL's text cannot hold NUL: such ids are bad input on either backend (they were a
    DatabaseError on PostgreSQL, and stored or matched nothing on SQLite)."""
    with pytest.raises(InvalidArgument, match="NUL"):
        call(store)
    assert list(store.read_all()) == []


@pytest.mark.asyncio
async def test_async_job_events_check_timeout_and_poll_interval(url: str) -> None:
    """As the sync facade's: poll_interval=0 would poll the database without pause."""
    from eventstore.aio import AsyncEventStore
    from projections.aio import AsyncJobs

    async with await AsyncEventStore.open(url, migrate=True) as astore:
        jobs = AsyncJobs(astore)
        job = await jobs.submit("wf", {}, user_id="u")
        for kwargs in ({"poll_interval": 0}, {"timeout": -1}, {"after": -1}):
            with pytest.raises(InvalidArgument):
                async for _ev in jobs.events(job.job_id, follow=True, **kwargs):
                    pass


def test_the_nan_search_has_no_false_positives_from_bytes() -> None:
    """Binary data whose msgpack bytes look like a NaN float, next to a null, is accepted: the
    search in msgpack only picks where to look; the values themselves decide."""
    import msgspec

    from eventstore import Event
    from eventstore.codec import encode_event

    class Blobbed(Event, tag="test.Blobbed"):
        blob: bytes
        note: str | None = None

    nan_like = b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00"
    _tag, _v, data = encode_event(Blobbed(blob=nan_like))
    assert msgspec.json.decode(data, type=Blobbed) == Blobbed(blob=nan_like)
    with pytest.raises(InvalidEvent, match=r"\['note'\]"):
        encode_event(Blobbed(blob=nan_like, note=float("nan")))  # type: ignore[arg-type]


def test_projection_names_with_nul_are_refused(store: EventStore) -> None:
    """A projection name is a key column: NUL is InvalidArgument for inline, status and
    restart on both backends (PostgreSQL gave a DatabaseError)."""
    from projections import inline, restart, status
    from tests._projections import TallyProjection

    with pytest.raises(InvalidArgument, match="NUL"):
        inline(store, TallyProjection(NUL))
    with pytest.raises(InvalidArgument, match="NUL"):
        status(store, NUL)
    with pytest.raises(InvalidArgument, match="NUL"):
        restart(store, NUL)
    assert status(store) == []


def test_a_missing_driver_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL URL without psycopg installed is InvalidArgument naming the 'postgres'
    extra (the CLI exits 2 with it), not a bare ModuleNotFoundError."""
    import builtins

    real_import = builtins.__import__

    def without_psycopg(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "psycopg" or name.startswith("psycopg."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_psycopg)
    with pytest.raises(InvalidArgument, match="'postgres' extra"):
        EventStore.open("postgresql+psycopg://app@127.0.0.1:1/app")
