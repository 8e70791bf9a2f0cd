"""Idempotency keys: durable, per tenant, race-safe, and strict about reuse."""

from __future__ import annotations

import threading

import msgspec
import pytest

from eventstore import Event, EventStore, IdempotencyKeyReused, RawEvent, WrongExpectedVersion
from tests._events import NoteAdded


def test_duplicate_returns_first_result_and_writes_nothing(store: EventStore) -> None:
    """A repeated key returns the first append's positions with duplicate=True."""
    store.append("other-1", [NoteAdded(text="before")])
    first = store.append("conversation-42", [NoteAdded(text="hi"), NoteAdded(text="yo")],
                         expected_version=0, idempotency_key="req-9f1", tenant_id="acme")
    again = store.append("conversation-42", [NoteAdded(text="hi"), NoteAdded(text="yo")],
                         expected_version=0, idempotency_key="req-9f1", tenant_id="acme")
    assert again.duplicate and not first.duplicate
    assert (again.first_position, again.last_position, again.stream_version) == (
        first.first_position, first.last_position, first.stream_version) == (2, 3, 2)
    assert store.stream_version("conversation-42", tenant_id="acme") == 2
    assert len(list(store.read_all())) == 3


def test_duplicate_survives_reopening(url: str) -> None:
    """Keys are durable: a new store object still recognises them."""
    with EventStore.open(url) as s:
        first = s.append("c-1", [NoteAdded(text="a")], idempotency_key="k")
    with EventStore.open(url) as s:
        again = s.append("c-1", [NoteAdded(text="a")], idempotency_key="k")
        assert again.duplicate and again.first_position == first.first_position
        assert s.stream_version("c-1") == 1


def test_key_reused_for_another_stream_raises(store: EventStore) -> None:
    """The same key on another stream is IdempotencyKeyReused, and nothing is written."""
    store.append("c-1", [NoteAdded(text="a")], idempotency_key="k")
    with pytest.raises(IdempotencyKeyReused) as info:
        store.append("c-2", [NoteAdded(text="a")], idempotency_key="k")
    assert info.value.first_stream_id == "c-1" and info.value.key == "k"
    assert store.stream_version("c-2") == 0


def test_key_reused_for_other_events_raises(store: EventStore) -> None:
    """The same key with different event data is IdempotencyKeyReused."""
    store.append("c-1", [NoteAdded(text="a")], idempotency_key="k")
    with pytest.raises(IdempotencyKeyReused):
        store.append("c-1", [NoteAdded(text="b")], idempotency_key="k")
    with pytest.raises(IdempotencyKeyReused):
        store.append("c-1", [NoteAdded(text="a"), NoteAdded(text="a")], idempotency_key="k")
    assert store.stream_version("c-1") == 1


def test_key_reused_for_the_same_data_of_another_type_raises(store: EventStore) -> None:

    store.append("c-1", [RawEvent(type="x.One", data={"type": "t"})], idempotency_key="k")
    with pytest.raises(IdempotencyKeyReused):
        store.append("c-1", [RawEvent(type="x.Two", data={"type": "t"})], idempotency_key="k")


def test_the_same_events_in_another_form_are_a_duplicate(store: EventStore) -> None:
    """A retry that sends a typed event as a RawEvent of its type, or a raw event's keys in
    another order, sends the same events: a duplicate.  Other data, types or schema versions
    stay IdempotencyKeyReused."""

    first = store.append("c-1", [NoteAdded(text="a")], idempotency_key="k1")
    again = store.append("c-1", [RawEvent(type="test.NoteAdded", data={"text": "a"})],
                         idempotency_key="k1")
    assert again.duplicate and again.first_position == first.first_position
    raw = store.append("c-2", [RawEvent(type="x.Unknown", data={"a": 1, "b": {"c": 2, "d": 3}})],
                       idempotency_key="k2")
    reordered = store.append("c-2", [RawEvent(type="x.Unknown",
                                              data={"b": {"d": 3, "c": 2}, "a": 1})],
                             idempotency_key="k2")
    assert reordered.duplicate and reordered.first_position == raw.first_position
    # Data beyond the type's fields is stored (and read by code without the type): it counts.
    with pytest.raises(IdempotencyKeyReused):
        store.append("c-1", [RawEvent(type="test.NoteAdded", data={"text": "a", "extra": 1})],
                     idempotency_key="k1")
    for other in ([RawEvent(type="x.Unknown", data={"a": 1, "b": {"c": 2, "d": 4}})],
                  [RawEvent(type="x.Other", data={"a": 1, "b": {"c": 2, "d": 3}})],
                  [RawEvent(type="x.Unknown", data={"a": 1, "b": {"c": 2, "d": 3}},
                            schema_version=2)]):
        with pytest.raises(IdempotencyKeyReused):
            store.append("c-2", other, idempotency_key="k2")
    assert store.stats()["events"] == 2


class Scored(Event, tag="test.Scored"):
    score: float
    note: str = ""


class Carrying(Event, tag="test.Carrying"):
    payload: msgspec.Raw


def test_a_retry_counts_by_the_json_stored(store: EventStore, url: str) -> None:
    """Events count as the JSON they are stored as, keys in any order (inside a msgspec.Raw
    too), whether or not the process knows the type; what is stored differently counts as
    other events: another value, an int for a float, a field beyond the type's, a field an
    upcaster would overwrite."""

    first = store.append("s-1", [Scored(score=2.0)], idempotency_key="k")
    for retry in ([Scored(score=2.0, note="")],
                  [RawEvent(type="test.Scored", data={"note": "", "score": 2.0})]):
        again = store.append("s-1", retry, idempotency_key="k")
        assert again.duplicate and again.first_position == first.first_position
    for other in ([Scored(score=2.5)], [Scored(score=2)], [Scored(score=2.0, note="x")],
                  [RawEvent(type="test.Scored", data={"score": 2.0, "note": "", "more": 1})]):
        with pytest.raises(IdempotencyKeyReused):
            store.append("s-1", other, idempotency_key="k")
    # A msgspec.Raw field: its JSON's keys in any order; no TypeError on the way.
    raw = store.append("r-1", [RawEvent(type="test.Carrying", data={"payload": {"a": 1, "b": 2},
                                                                     "x": 1})],
                       idempotency_key="r")
    again = store.append("r-1", [RawEvent(type="test.Carrying",
                                          data={"x": 1, "payload": {"b": 2, "a": 1}})],
                         idempotency_key="r")
    assert again.duplicate and again.first_position == raw.first_position
    # Numbers as written: past a float's precision, or spelled with another zero, they differ.
    store.append("n-1", [Carrying(payload=msgspec.Raw(b'{"amount":1000000000000000.01}'))],
                 idempotency_key="n")
    for other_number in (b'{"amount":1000000000000000.02}', b'{"amount":1000000000000000.010}'):
        with pytest.raises(IdempotencyKeyReused):
            store.append("n-1", [Carrying(payload=msgspec.Raw(other_number))],
                         idempotency_key="n")
    # Stored at an older schema version: compared as stored, not as upcast.
    store.append("u-1", [RawEvent(type="test.Old", data={"text": "hi", "author": "alice"},
                                  schema_version=1)], idempotency_key="u")
    with pytest.raises(IdempotencyKeyReused):
        store.append("u-1", [RawEvent(type="test.Old", data={"text": "hi", "author": "bob"},
                                      schema_version=1)], idempotency_key="u")
    assert store.stats()["events"] == 4


def test_a_retry_from_code_without_the_class_is_a_duplicate(url: str) -> None:
    """A process that does not know the type appends a raw event; one that does retries the
    same request (or the reverse): the same stored JSON, a duplicate."""
    import subprocess
    import sys
    import textwrap


    script = textwrap.dedent(f"""
        from eventstore import EventStore, RawEvent
        with EventStore.open({url!r}) as s:
            r = s.append("x-1", [RawEvent(type="test.Scored", data={{"score": 2.5}})],
                         idempotency_key="x")
            print(r.duplicate)
    """)
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True)
    assert first.stdout.strip() == "False"
    with EventStore.open(url) as s:  # this process knows test.Scored
        again = s.append("x-1", [RawEvent(type="test.Scored", data={"score": 2.5})],
                         idempotency_key="x")
        assert again.duplicate
        s.append("y-1", [RawEvent(type="test.Scored", data={"score": 1.5})],
                 idempotency_key="y")
    second = subprocess.run([sys.executable, "-c", script.replace('"x-1"', '"y-1"').replace(
        "2.5", "1.5").replace('idempotency_key="x"', 'idempotency_key="y"')],
        capture_output=True, text=True, check=True)
    assert second.stdout.strip() == "True"


def test_a_key_recorded_by_earlier_code_still_finds_its_retry(store: EventStore, url: str
                                                              ) -> None:
    """Keys recorded with the fingerprint of earlier code (the stored bytes) are compared by
    it too, so a retry across an upgrade is a duplicate."""
    from sqlalchemy import update

    from eventstore._backend import begin_write
    from eventstore._core import _stored_bytes_fingerprint
    from eventstore._schema import idempotency
    from eventstore.codec import encode_event

    first = store.append("c-1", [NoteAdded(text="a")], idempotency_key="k")
    with EventStore.open(url) as sync, begin_write(sync.engine) as conn:
        conn.execute(update(idempotency).values(fingerprint=_stored_bytes_fingerprint(
            "c-1", [encode_event(NoteAdded(text="a"))])))
    again = store.append("c-1", [NoteAdded(text="a")], idempotency_key="k")
    assert again.duplicate and again.first_position == first.first_position
    with pytest.raises(IdempotencyKeyReused):
        store.append("c-1", [NoteAdded(text="b")], idempotency_key="k")


def test_keys_are_scoped_per_tenant(store: EventStore) -> None:
    """Two tenants may use the same key independently."""
    a = store.append("c-1", [NoteAdded(text="a")], idempotency_key="k", tenant_id="t1")
    b = store.append("c-1", [NoteAdded(text="a")], idempotency_key="k", tenant_id="t2")
    assert not a.duplicate and not b.duplicate
    assert b.first_position == a.first_position + 1


def test_duplicate_wins_over_version_conflict(store: EventStore) -> None:
    """A retried append whose first try succeeded is a duplicate, not a version conflict."""
    store.append("c-1", [NoteAdded(text="a")], expected_version=0, idempotency_key="k")
    store.append("c-1", [NoteAdded(text="b")])
    again = store.append("c-1", [NoteAdded(text="a")], expected_version=0, idempotency_key="k")
    assert again.duplicate and again.stream_version == 1
    with pytest.raises(WrongExpectedVersion):
        store.append("c-1", [NoteAdded(text="a")], expected_version=0, idempotency_key="k2")


def test_racing_appends_with_one_key_write_once(store: EventStore) -> None:
    """Eight threads append with one key: one write, seven duplicates with the same result."""
    barrier = threading.Barrier(8)
    results = []
    lock = threading.Lock()

    def writer() -> None:
        barrier.wait()
        r = store.append("c-race", [NoteAdded(text="once")], idempotency_key="same")
        with lock:
            results.append(r)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.duplicate for r in results) == [False] + [True] * 7
    assert len({(r.first_position, r.last_position) for r in results}) == 1
    assert store.stream_version("c-race") == 1
