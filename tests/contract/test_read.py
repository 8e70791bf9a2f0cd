"""Reading: stream ranges, the global log, unknown types, upcasting, paging."""

from __future__ import annotations

import threading
from typing import Annotated, Any

import msgspec
import pytest
from sqlalchemy import update

import eventstore._core as core_module
from eventstore import (
    Event,
    EventDecodeError,
    EventStore,
    InvalidEvent,
    RawEvent,
    event_type,
    upcaster,
)
from eventstore._backend import begin_write
from eventstore._schema import events as events_table
from eventstore.events import _registry, _upcasters, registered_types
from tests._events import Anything, CounterIncremented, NoteAdded


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages of 3 rows, so paging boundaries are crossed with few events."""
    monkeypatch.setattr(core_module, "PAGE", 3)


def versions(events: Any) -> list[int]:
    return [e.version for e in events]


def test_read_stream_ranges(store: EventStore, small_pages: None) -> None:
    """from_version and to_version are inclusive; limit caps the count."""
    store.append("c-1", [NoteAdded(text=str(i)) for i in range(10)])
    assert versions(store.read_stream("c-1")) == list(range(1, 11))
    assert versions(store.read_stream("c-1", from_version=4)) == list(range(4, 11))
    assert versions(store.read_stream("c-1", from_version=4, to_version=8)) == [4, 5, 6, 7, 8]
    assert versions(store.read_stream("c-1", from_version=2, limit=4)) == [2, 3, 4, 5]
    assert versions(store.read_stream("c-1", limit=0)) == []
    assert versions(store.read_stream("c-1", from_version=11)) == []


def test_read_stream_backwards(store: EventStore, small_pages: None) -> None:
    """backwards=True starts at to_version (or the end) and goes down."""
    store.append("c-1", [NoteAdded(text=str(i)) for i in range(10)])
    assert versions(store.read_stream("c-1", backwards=True)) == list(range(10, 0, -1))
    assert versions(store.read_stream("c-1", backwards=True, limit=1)) == [10]
    assert versions(store.read_stream("c-1", backwards=True, to_version=7, from_version=3)) == [
        7, 6, 5, 4, 3]


def test_from_version_zero_reads_the_whole_stream(store: EventStore) -> None:
    store.append("c-1", [NoteAdded(text=str(i)) for i in range(3)])
    assert versions(store.read_stream("c-1", from_version=0)) == [1, 2, 3]


def test_read_stream_of_unknown_stream_is_empty(store: EventStore) -> None:
    """An absent stream reads as empty, not an error."""
    assert list(store.read_stream("nothing-1")) == []


def test_recorded_event_fields(store: EventStore) -> None:
    """A recorded event carries every documented field."""
    store.append("conversation-7", [NoteAdded(text="hi")], tenant_id="acme",
                 metadata={"correlation_id": "c1"})
    (ev,) = store.read_stream("conversation-7", tenant_id="acme")
    assert ev.position == 1 and ev.version == 1
    assert ev.stream_id == "conversation-7" and ev.tenant_id == "acme"
    assert ev.type == "test.NoteAdded" and ev.schema_version == 1
    assert ev.data == NoteAdded(text="hi")
    assert ev.metadata == {"correlation_id": "c1"}
    assert ev.recorded_at.tzinfo is not None
    assert ev.event_id.version == 4
    assert ev.category == "conversation"


def test_read_all_in_position_order_with_filters(store: EventStore, small_pages: None) -> None:
    """read_all returns every stream in position order; filters keep categories and types."""
    store.append("conversation-1", [NoteAdded(text="a")])
    store.append("job-1", [CounterIncremented()])
    store.append("conversation-2", [CounterIncremented(), NoteAdded(text="b")])
    store.append("flow-1", [NoteAdded(text="c")])
    store.append("jobs-1", [NoteAdded(text="d")])
    allev = list(store.read_all())
    assert [e.position for e in allev] == [1, 2, 3, 4, 5, 6]
    assert [e.position for e in store.read_all(from_position=4)] == [4, 5, 6]
    assert [e.position for e in store.read_all(from_position=2, limit=2)] == [2, 3]
    assert [e.stream_id for e in store.read_all(categories=["job"])] == ["job-1"]
    assert [e.position for e in store.read_all(categories=["conversation", "flow"])] == [
        1, 3, 4, 5]
    assert [e.position for e in store.read_all(types=["test.CounterIncremented"])] == [2, 3]
    assert [e.position for e in store.read_all(categories=["conversation"],
                                               types=["test.NoteAdded"])] == [1, 4]


def test_category_filter_is_not_a_pattern(store: EventStore) -> None:
    """A category with % or _ matches only itself."""
    store.append("a_b-1", [NoteAdded(text="x")])
    store.append("axb-1", [NoteAdded(text="y")])
    store.append("a%-1", [NoteAdded(text="z")])
    assert [e.stream_id for e in store.read_all(categories=["a_b"])] == ["a_b-1"]
    assert [e.stream_id for e in store.read_all(categories=["a%"])] == ["a%-1"]


def test_a_category_is_the_stream_id_up_to_its_first_dash(store: EventStore) -> None:
    store.append("order-1-line-2", [NoteAdded(text="x")])
    store.append("order-2", [NoteAdded(text="y")])
    assert [e.stream_id for e in store.read_all(categories=["order"])] == [
        "order-1-line-2", "order-2"]
    assert list(store.read_all(categories=["order-1-line"])) == []


def test_a_record_s_category_is_its_stream_id_up_to_its_first_dash(store: EventStore) -> None:
    store.append("order-1-line-2", [NoteAdded(text="x")])
    store.append("nodash", [NoteAdded(text="y")])
    assert [e.category for e in store.read_all()] == ["order", "nodash"]


def test_a_single_name_filters_as_a_list_of_one(store: EventStore) -> None:
    store.append("job-1", [CounterIncremented()])
    store.append("j-1", [NoteAdded(text="x")])
    assert [e.stream_id for e in store.read_all(categories="job")] == ["job-1"]
    assert [e.stream_id for e in store.read_all(types="test.NoteAdded")] == ["j-1"]


def test_unknown_type_reads_as_raw_event(store: EventStore) -> None:
    """An event type the reader does not know comes back as a RawEvent, not an error."""
    store.append("c-1", [RawEvent(type="Mystery", data={"x": 1, "y": ["a"]})])
    (ev,) = store.read_stream("c-1")
    assert isinstance(ev.data, RawEvent)
    assert ev.type == "Mystery" and ev.data.data == {"x": 1, "y": ["a"]}


def test_raw_event_of_a_known_type_reads_typed(store: EventStore) -> None:
    """A raw append of a registered type reads back as the typed struct."""
    store.append("c-1", [RawEvent(type="test.NoteAdded", data={"text": "hi"})])
    (ev,) = store.read_stream("c-1")
    assert ev.data == NoteAdded(text="hi")


class IntKeyed(Event, tag="test.IntKeyed"):
    by_id: dict[int, str]


def test_raw_event_of_a_known_type_may_have_the_keys_its_type_has(store: EventStore) -> None:
    """Int keys in a raw event of a type whose field has int keys read back as given (the
    type decodes them), as they do in the typed event."""
    store.append("c-1", [RawEvent(type="test.IntKeyed", data={"by_id": {1: "a", 2: "b"}})])
    store.append("c-1", [IntKeyed(by_id={3: "c"})])
    assert [e.data for e in store.read_stream("c-1")] == [IntKeyed(by_id={1: "a", 2: "b"}),
                                                          IntKeyed(by_id={3: "c"})]


def test_old_schema_version_is_upcast_on_read(store: EventStore) -> None:
    """Events stored at schema 1 are upgraded by registered upcasters when read."""
    store.append("c-1", [RawEvent(type="test.Renamed", data={"name": "Ada"},
                                  schema_version=1)])
    store.append("c-1", [RawEvent(type="test.Renamed", data={"full_name": "Bo", "n": 3},
                                  schema_version=2)])

    class Renamed(Event, tag="test.Renamed", schema_version=3):
        full_name: str
        n: int

    @upcaster("test.Renamed", from_version=1)
    def _v1(data: dict[str, Any]) -> dict[str, Any]:
        return {"full_name": data["name"]}

    @upcaster("test.Renamed", from_version=2)
    def _v2(data: dict[str, Any]) -> dict[str, Any]:
        return {"n": 0, **data}

    try:
        got = [e.data for e in store.read_stream("c-1")]
        assert got == [Renamed(full_name="Ada", n=0), Renamed(full_name="Bo", n=3)]
        store.append("c-1", [Renamed(full_name="Cy", n=1)])
        assert list(store.read_stream("c-1"))[-1].schema_version == 3
    finally:
        _registry.pop("test.Renamed", None)


class Envelope(msgspec.Struct):
    """A msgspec.Raw nested in another type (module level: annotations resolve here)."""

    kind: str
    inner: msgspec.Raw


def test_an_upcast_event_reads_as_the_json_decoder_reads_it(store: EventStore) -> None:
    """Upcast data is read as an event of the current schema is: int keys from JSON strings,
    ``msgspec.Raw`` fields (msgspec.convert refused both, so old events stopped every read)."""
    store.append("g-1", [RawEvent(type="test.Scores", data={
        "by_level": {"1": 10, "2": 20}, "note": "hi", "body": {"x": 1}}, schema_version=1)])
    store.append("g-2", [RawEvent(type="test.Wrapped", data={
        "note": "w", "envelopes": [{"kind": "k", "inner": [2]}]}, schema_version=1)])
    store.append("g-3", [RawEvent(type="test.Described", data={"body": {"a": 1}},
                                  schema_version=1)])

    class Scores(Event, tag="test.Scores", schema_version=2):
        by_level: dict[int, int]
        comment: str
        body: msgspec.Raw

    class Wrapped(Event, tag="test.Wrapped", schema_version=2):
        comment: str
        envelopes: list[Envelope]  # Raw only inside another type

    class Described(Event, tag="test.Described", schema_version=2):
        body: Annotated[msgspec.Raw, msgspec.Meta(description="Raw behind Annotated")]

    @upcaster("test.Described", from_version=1)
    def _d1(data: dict[str, Any]) -> dict[str, Any]:
        return data

    @upcaster("test.Wrapped", from_version=1)
    def _w1(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "comment": data.pop("note")}

    @upcaster("test.Scores", from_version=1)
    def _v1(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "comment": data.pop("note")}

    try:
        (ev,) = store.read_stream("g-1")
        assert isinstance(ev.data, Scores)
        assert (ev.data.by_level, ev.data.comment) == ({1: 10, 2: 20}, "hi")
        assert bytes(ev.data.body) == b'{"x":1}'
        (wrapped,) = store.read_stream("g-2")
        assert isinstance(wrapped.data, Wrapped) and wrapped.data.comment == "w"
        assert [(e.kind, bytes(e.inner)) for e in wrapped.data.envelopes] == [("k", b"[2]")]
        (described,) = store.read_stream("g-3")
        assert isinstance(described.data, Described)
        assert bytes(described.data.body) == b'{"a":1}'
    finally:
        for tag in ("test.Scores", "test.Wrapped", "test.Described"):
            _registry.pop(tag, None)


def test_upcast_data_fills_int_keys_and_raw_fields_in_unions_and_tuples(store: EventStore
                                                                         ) -> None:
    """Upcast data read as the current schema is: int keys of a type with no
    ``msgspec.Raw`` (from their JSON strings), a Raw in an optional struct or in a tuple; a
    stream of old rows that also fit the new type is still upcast."""
    store.append("u-1", [RawEvent(type="test.Levels", data={"by_level": {"1": 10}},
                                  schema_version=1)])
    store.append("u-2", [RawEvent(type="test.MaybeBody", data={
        "body": {"kind": "k", "inner": {"x": 1}}}, schema_version=1)])
    store.append("u-3", [RawEvent(type="test.Paired", data={"pair": [1, [2]]},
                                  schema_version=1)])

    class Levels(Event, tag="test.Levels", schema_version=2):
        by_level: dict[int, int]

    class MaybeBody(Event, tag="test.MaybeBody", schema_version=2):
        body: Envelope | None

    class Paired(Event, tag="test.Paired", schema_version=2):
        pair: tuple[int, msgspec.Raw]

    @upcaster("test.Levels", from_version=1)
    def _levels(data: dict[str, Any]) -> dict[str, Any]:
        return {"by_level": {k: v + 1 for k, v in data["by_level"].items()}}

    for tag in ("test.MaybeBody", "test.Paired"):
        upcaster(tag, from_version=1)(lambda data: data)
    try:
        assert [e.data for e in store.read_stream("u-1")] == [Levels(by_level={1: 11})]
        (ev,) = store.read_stream("u-2")
        assert isinstance(ev.data, MaybeBody) and ev.data.body is not None
        assert (ev.data.body.kind, bytes(ev.data.body.inner)) == ("k", b'{"x":1}')
        (paired,) = store.read_stream("u-3")
        assert isinstance(paired.data, Paired)
        assert (paired.data.pair[0], bytes(paired.data.pair[1])) == (1, b"[2]")
    finally:
        for tag in ("test.Levels", "test.MaybeBody", "test.Paired"):
            _registry.pop(tag, None)
            _upcasters.pop((tag, 1), None)


def test_a_read_of_rows_of_one_type_names_the_one_that_does_not_decode(store: EventStore
                                                                        ) -> None:
    store.append("s-1", [RawEvent(type="test.Sided", data={"sides": 3}),
                         RawEvent(type="test.Sided", data={"sides": "many"})])

    class Sided(Event, tag="test.Sided"):
        sides: int

    try:
        for events in (store.read_stream("s-1"), store.read_all()):
            with pytest.raises(EventDecodeError) as info:
                list(events)
            assert (info.value.position, info.value.type) == (2, "test.Sided")
    finally:
        _registry.pop("test.Sided", None)


def test_data_nested_too_deeply_to_decode_is_the_typed_error(store: EventStore, url: str
                                                              ) -> None:
    """Data deeper than the stack takes (an older release's, or changed in the database)
    raises EventDecodeError naming the event, not RecursionError."""
    store.append("d-1", [Anything(value=1)])
    deep = b'{"type":"test.Anything","value":' + b"[" * 5000 + b"]" * 5000 + b"}"
    with EventStore.open(url) as other, begin_write(other.engine) as conn:
        conn.execute(update(events_table).where(events_table.c.position == 1).values(data=deep))
    for events in (store.read_stream("d-1"), store.read_all()):
        with pytest.raises(EventDecodeError) as info:
            list(events)
        assert (info.value.position, info.value.type) == (1, "test.Anything")


def test_events_appended_without_metadata_read_back_an_empty_dict(store: EventStore) -> None:
    seen: list[Any] = []
    store.add_inline_handler(lambda conn, recorded: seen.extend(r.metadata for r in recorded))
    store.append("m-1", [NoteAdded(text="a")])
    store.append("m-1", [NoteAdded(text="b")], metadata={})
    assert [e.metadata for e in store.read_stream("m-1")] == [{}, {}] == seen


@pytest.mark.parametrize("with_raw", [False, True])
def test_an_upcaster_s_values_are_converted_as_before(store: EventStore, with_raw: bool
                                                      ) -> None:
    """An upcaster may return a Decimal or NaN for a float field (msgspec.convert's rules,
    which reading through JSON would have broken), also in a type with a ``msgspec.Raw``
    field the upcast data leaves out."""
    import decimal
    import math

    for price in ("1.50", ""):
        store.append("p-1", [RawEvent(type="test.Priced", data={"price": price},
                                      schema_version=1)])

    if with_raw:
        class Priced(Event, tag="test.Priced", schema_version=2):
            price: float | None
            body: msgspec.Raw = msgspec.Raw(b"{}")
    else:
        class Priced(Event, tag="test.Priced", schema_version=2):  # type: ignore[no-redef]
            price: float | None

    @upcaster("test.Priced", from_version=1)
    def _v1(data: dict[str, Any]) -> dict[str, Any]:
        return {"price": decimal.Decimal(data["price"]) if data["price"] else math.nan}

    try:
        first, second = (e.data for e in store.read_stream("p-1"))
        assert isinstance(first, Priced) and first.price == 1.5
        assert isinstance(second, Priced) and second.price is not None
        assert math.isnan(second.price)
    finally:
        _registry.pop("test.Priced", None)


def test_upcast_data_that_json_cannot_hold_fails_the_read_not_the_value(store: EventStore
                                                                         ) -> None:
    """When a ``msgspec.Raw`` field is given as a value, the upcast data goes through JSON:
    a Decimal still fills a float field, and a NaN, which JSON would turn into None, makes
    the read fail with EventDecodeError instead."""
    import decimal
    import math

    for price in ("2.25", ""):
        store.append("q-1", [RawEvent(type="test.Quoted", data={"price": price, "body": [1]},
                                      schema_version=1)])

    class Quoted(Event, tag="test.Quoted", schema_version=2):
        price: float | None
        body: msgspec.Raw

    @upcaster("test.Quoted", from_version=1)
    def _v1(data: dict[str, Any]) -> dict[str, Any]:
        return {**data,
                "price": decimal.Decimal(data["price"]) if data["price"] else math.nan}

    try:
        (first,) = store.read_stream("q-1", to_version=1)
        assert isinstance(first.data, Quoted) and first.data.price == 2.25
        assert bytes(first.data.body) == b"[1]"
        with pytest.raises(EventDecodeError, match="NaN"):
            list(store.read_stream("q-1", from_version=2))
    finally:
        _registry.pop("test.Quoted", None)


@pytest.mark.parametrize("bad", ["data", "metadata"])
@pytest.mark.parametrize("page", [3, 500])
def test_a_read_gives_the_events_before_one_that_does_not_decode(
        store: EventStore, url: str, monkeypatch: pytest.MonkeyPatch, page: int, bad: str
) -> None:
    """Reads (stream, log, subscription) give every event before the first that does not
    decode, then raise EventDecodeError naming it; the events after it are not skipped.
    ``metadata``: the event's metadata no longer decodes (changed in the database; it was a
    bare msgspec error, or RecursionError for deep metadata an older release let in)."""
    monkeypatch.setattr(core_module, "PAGE", page)  # (subscriptions' pages too)
    store.append("c-1", [NoteAdded(text=str(i)) for i in range(4)])
    if bad == "data":
        store.append("c-1", [RawEvent(type="test.Shape", data={"sides": "many"})])
    else:
        store.append("c-1", [RawEvent(type="test.Shape", data={"sides": 3})],
                     metadata={"by": "x"})
        with EventStore.open(url) as other, begin_write(other.engine) as conn:
            conn.execute(update(events_table).where(events_table.c.position == 5)
                         .values(metadata=b'["not", "a", "mapping"]'))
    store.append("c-1", [NoteAdded(text="after")])

    class Shape(Event, tag="test.Shape"):
        sides: int

    def until_error(events: Any) -> tuple[list[int], Any]:
        seen = []
        with pytest.raises(EventDecodeError) as info:
            for ev in events:
                seen.append(ev.position)
        return seen, info.value

    try:
        for events in (store.read_stream("c-1"), store.read_all(),
                       store.read_all(from_position=3), store.subscribe(from_position=2)):
            seen, err = until_error(events)
            assert seen and seen == list(range(seen[0], 5))
            assert (err.position, err.type, err.stream_id) == (5, "test.Shape", "c-1")
        # The read that starts at the event raises at once; the one after it reads on.
        assert until_error(store.read_all(from_position=5))[0] == []
        assert [e.data for e in store.read_all(from_position=6)] == [NoteAdded(text="after")]
        assert [e.version for e in store.read_stream("c-1", backwards=True, to_version=6,
                                                     from_version=6)] == [6]
        # Backwards, the bad event comes after the newer one.
        seen, err = until_error(store.read_stream("c-1", backwards=True))
        assert seen == [6] and err.position == 5
    finally:
        _registry.pop("test.Shape", None)


def test_an_event_stored_at_a_version_no_upcaster_leaves_fails_the_read(
        store: EventStore) -> None:
    store.append("c-1", [RawEvent(type="test.NoUpcaster", data={"a": 1})])

    class NoUpcaster(Event, tag="test.NoUpcaster", schema_version=2):
        a: int

    try:
        with pytest.raises(EventDecodeError, match="no upcaster"):
            list(store.read_stream("c-1"))
    finally:
        _registry.pop("test.NoUpcaster", None)


def test_adding_a_field_with_a_default_keeps_old_events_readable(store: EventStore) -> None:
    """An event written before a field was added reads with the field's default."""
    store.append("c-1", [RawEvent(type="test.Grown", data={"a": 1})])

    class Grown(Event, tag="test.Grown"):
        a: int
        b: str = "default"

    try:
        (ev,) = store.read_stream("c-1")
        assert ev.data == Grown(a=1, b="default")
    finally:
        _registry.pop("test.Grown", None)


def test_event_type_without_tag_is_rejected() -> None:
    """Defining an event type without an explicit tag is a TypeError."""
    with pytest.raises(TypeError, match="stable tag"):
        class NoTag(Event):
            x: int


@pytest.mark.parametrize("tag", ["", 7, "t" * 256, "nul\x00tag", "lone \ud800 surrogate"])
def test_an_event_tag_must_be_non_empty_text_of_at_most_255_characters(tag: Any) -> None:
    with pytest.raises(TypeError, match="an event tag must"):
        class BadTag(Event, tag=tag):
            x: int
    assert tag not in registered_types()


def test_an_event_tag_of_255_characters_is_registered_under_it() -> None:
    tag = "t" * 255

    class LongTag(Event, tag=tag):
        x: int

    try:
        assert LongTag.event_tag() == tag and event_type(tag) is LongTag
    finally:
        _registry.pop(tag, None)


def test_an_event_type_cannot_choose_its_own_tag_field() -> None:
    try:
        with pytest.raises(TypeError, match="share the tag field"):
            class OwnTagField(Event, tag="test.OwnTagField", tag_field="kind"):
                x: int
        assert event_type("test.OwnTagField") is None
    finally:
        _registry.pop("test.OwnTagField", None)


@pytest.mark.parametrize("version", [0, -1, True, 2**31, "2", 2.0])
def test_a_schema_version_must_be_an_int_from_1_to_2_31_minus_1(version: Any) -> None:
    try:
        with pytest.raises(TypeError, match="schema_version must be an int"):
            class BadVersion(Event, tag="test.BadVersion", schema_version=version):
                x: int
        assert event_type("test.BadVersion") is None
    finally:
        _registry.pop("test.BadVersion", None)


def test_the_last_schema_version_is_taken(store: EventStore) -> None:
    class Newest(Event, tag="test.Newest", schema_version=2**31 - 1):
        x: int

    try:
        store.append("c-1", [Newest(x=1)])
        (ev,) = store.read_stream("c-1")
        assert ev.schema_version == 2**31 - 1 and ev.data == Newest(x=1)
    finally:
        _registry.pop("test.Newest", None)


def test_a_tagged_subclass_of_a_versioned_type_is_at_schema_version_1(
        store: EventStore) -> None:
    class Versioned(Event, tag="test.Versioned", schema_version=2):
        text: str

    class Derived(Versioned, tag="test.Derived"):
        extra: int = 0

    try:
        store.append("c-1", [Derived(text="x")])
        (ev,) = store.read_stream("c-1")
        assert ev.type == "test.Derived" and ev.schema_version == 1
        assert ev.data == Derived(text="x")
    finally:
        _registry.pop("test.Versioned", None)
        _registry.pop("test.Derived", None)


@pytest.mark.parametrize(("tag", "from_version"), [
    ("", 1), (None, 1), ("test.Up", 0), ("test.Up", True), ("test.Up", 2**31 - 1),
    ("test.Up", "1")])
def test_upcaster_arguments_are_checked(tag: Any, from_version: Any) -> None:
    with pytest.raises(TypeError):
        upcaster(tag, from_version=from_version)
    assert (tag, from_version) not in _upcasters


def test_upcaster_returns_the_function_it_registers() -> None:
    def up(data: dict[str, Any]) -> dict[str, Any]:
        return data

    try:
        assert upcaster("test.Up", from_version=2**31 - 2)(up) is up
    finally:
        _upcasters.pop(("test.Up", 2**31 - 2), None)


def test_event_tag_is_the_tag_given_not_the_class_name() -> None:
    class ClassNameIsNotTag(Event, tag="test.TagNotName"):
        x: int

    try:
        assert ClassNameIsNotTag.event_tag() == "test.TagNotName"
    finally:
        _registry.pop("test.TagNotName", None)


def test_registered_types_is_a_copy_of_the_registry() -> None:
    types = registered_types()
    assert types["test.NoteAdded"] is NoteAdded and event_type("test.NoteAdded") is NoteAdded
    assert event_type("test.NeverDefined") is None
    del types["test.NoteAdded"]
    assert registered_types()["test.NoteAdded"] is NoteAdded


def test_events_and_raw_events_are_frozen_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        NoteAdded("positional")  # type: ignore[misc]
    with pytest.raises(TypeError):
        RawEvent("test.NoteAdded", {"text": "a"})  # type: ignore[misc]
    with pytest.raises(AttributeError):
        NoteAdded(text="a").text = "b"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        RawEvent(type="t", data={}).type = "u"  # type: ignore[misc]
    assert RawEvent(type="t", data={}).schema_version == 1


def test_records_and_append_results_are_frozen(store: EventStore) -> None:
    result = store.append("c-1", [NoteAdded(text="a")])
    assert result.duplicate is False
    with pytest.raises(AttributeError):
        result.stream_version = 5  # type: ignore[misc]
    (ev,) = store.read_stream("c-1")
    with pytest.raises(AttributeError):
        ev.version = 5  # type: ignore[misc]


def test_redefining_a_tag_warns_and_reads_decode_into_the_last_class(
        store: EventStore) -> None:
    from structlog.testing import capture_logs

    class First(Event, tag="test.Redefined"):
        a: int

    try:
        store.append("c-1", [First(a=1)])
        assert [e.data for e in store.read_stream("c-1")] == [First(a=1)]
        with capture_logs() as logs:
            class Second(Event, tag="test.Redefined"):
                a: int
                b: str = "new"
        (entry,) = [e for e in logs if e["event"] == "event_type_replaced"]
        assert entry["log_level"] == "warning" and entry["tag"] == "test.Redefined"
        assert entry["previous"].endswith("First") and entry["current"].endswith("Second")
        assert event_type("test.Redefined") is Second
        assert [e.data for e in store.read_stream("c-1")] == [Second(a=1)]
    finally:
        _registry.pop("test.Redefined", None)


def test_recorded_times_far_from_1970_read_back_to_the_microsecond(url: str) -> None:
    """An injected clock in year 2300 or 9999 (or year 1): recorded_at reads back exactly (a
    float of seconds lost microseconds there, so time travel missed events)."""
    import datetime as dt

    for when in (dt.datetime(2300, 5, 6, 7, 8, 9, 123457, tzinfo=dt.UTC),
                 dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
                 dt.datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=dt.UTC)):
        with EventStore.open(url, clock=lambda when=when: when) as store:
            store.append(f"far-{when.year}", [NoteAdded(text="x")])
            (ev,) = store.read_stream(f"far-{when.year}")
            assert ev.recorded_at == when


def test_more_filter_names_than_a_query_can_take_are_refused(store: EventStore) -> None:
    """PostgreSQL takes 65,535 parameters per statement: a read filtering on more names than
    the store's limit is InvalidArgument on both backends (PostgreSQL's was a DatabaseError);
    repeated names count once."""
    from eventstore import InvalidArgument
    from eventstore._core import MAX_NAMES

    store.append("c-1", [NoteAdded(text="x")])
    many = [f"cat{i}" for i in range(MAX_NAMES + 1)]
    with pytest.raises(InvalidArgument, match="at most"):
        list(store.read_all(categories=many))
    with pytest.raises(InvalidArgument, match="at most"):
        list(store.read_all(types=many))
    assert len(list(store.read_all(categories=["c"] * (MAX_NAMES + 5)))) == 1
    exactly = [*many[:MAX_NAMES - 1], "c"]  # the limit itself is allowed
    assert len(list(store.read_all(categories=exactly))) == 1


def test_pages_of_large_events_are_short(store: EventStore, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """A read asks for about PAGE_BYTES of events at a time: its first page is sized by the
    event size limit, the next ones by the events it read (2,000 events of 0.5 MB each
    took GBs of memory to read just the first one)."""
    inner = getattr(store, "inner", store)  # (the async store behind the contract's shim)
    big = "x" * 60_000
    for _ in range(10):
        store.append("big-1", [NoteAdded(text=big)] * 20)
    store.append("small-1", [NoteAdded(text="s")] * 200)
    pages = _page_sizes(store, monkeypatch)
    assert len(list(store.read_stream("big-1"))) == 200
    first = core_module.FIRST_PAGE_BYTES // inner._options.max_event_bytes  # 128 at 1 MiB
    per_page = core_module.PAGE_BYTES // 60_030  # about 140 events of 60 kB
    assert pages[0] == first and abs(pages[1] - per_page) <= 1, pages
    pages.clear()
    assert len(list(store.read_all(from_position=201))) == 200
    assert pages == [first, core_module.PAGE]  # small events: then full pages
    pages.clear()
    stop = threading.Event()
    for ev in store.subscribe(stop=stop):  # (the catch-up of a subscription too)
        if ev.position == 200:
            stop.set()
    assert pages[0] == first and abs(pages[1] - per_page) <= 1, pages


def test_pages_count_the_metadata_too(store: EventStore, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    """Pages are sized by the stored bytes of data and metadata: events of tiny data and large
    metadata were read 2,000 a page after the first (229 MB for 572 events of 400 kB of
    metadata, where the same bytes as data gave pages of 8 MB)."""
    for _ in range(10):
        store.append("meta-1", [NoteAdded(text="s")] * 20, metadata={"trace": "y" * 60_000})
    pages = _page_sizes(store, monkeypatch)
    assert len(list(store.read_stream("meta-1"))) == 200
    per_page = core_module.PAGE_BYTES // 60_000  # about 140 events of 60 kB
    assert len(pages) >= 2 and pages[1] <= per_page, pages


def _page_sizes(store: EventStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of events each page of the store's reads asks for, from now on."""
    pages: list[int] = []
    inner = getattr(store, "inner", store)  # (the async store behind the contract's shim)
    real = inner._fetch_on

    def spy(conn: Any, query: Any, params: dict[str, Any], **kwargs: Any) -> Any:
        pages.append(params["page"])
        return real(conn, query, params, **kwargs)

    monkeypatch.setattr(inner, "_fetch_on", spy)
    return pages


class _AbstractBase(Event):
    __abstract_event__ = True
    x: int = 0


class _Leaf(_AbstractBase, tag="test.Leaf"):
    y: int = 0


def test_abstract_event_types_have_no_tag_and_are_not_stored(store: EventStore) -> None:
    """Event and an __abstract_event__ base have no tag (msgspec would have tagged them with
    their class names, and such events were stored and read back as raw events under a Python
    name): event_tag() raises TypeError, and an append of one raises InvalidEvent and writes
    nothing.  A tagged subclass of the base is stored with the base's fields."""
    for cls in (Event, _AbstractBase):
        with pytest.raises(TypeError, match="not a concrete event type"):
            cls.event_tag()
    for event in (_AbstractBase(x=1), Event()):
        with pytest.raises(InvalidEvent, match="has no tag"):
            store.append("s-1", [NoteAdded(text="first"), event])
    assert list(store.read_all()) == []
    store.append("s-1", [_Leaf(x=1, y=2)])
    (read,) = store.read_stream("s-1")
    assert (read.type, read.data) == ("test.Leaf", _Leaf(x=1, y=2))
    assert _Leaf.event_tag() == "test.Leaf"
