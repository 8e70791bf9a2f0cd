"""Bad input gets a typed error and writes nothing; hostile strings are data, never SQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import attrs
import msgspec
import pytest

from eventstore import (
    Event,
    EventStore,
    EventStoreError,
    InvalidArgument,
    InvalidEvent,
    InvalidStreamId,
    RawEvent,
    upcaster,
)
from eventstore.events import _upcasters
from tests._events import Anything, CounterIncremented, NoteAdded

HOSTILE = [
    "conversation-'; DROP TABLE es_events; --",
    'conversation-"quoted" \\ back\\slash',
    "conversation-żółw-🐢-中文-\u202e",
    "conversation-%_*?[]{}$1 :name ?",
    "x" * 255,
]


class _Point(msgspec.Struct):
    x: float


class _Mapped(msgspec.Struct):
    m: dict[str, int]


@dataclasses.dataclass
class _Reading:
    value: float


@attrs.define
class _AttrsReading:
    value: float


@pytest.mark.parametrize(
    ("stream_id", "error"),
    [("", InvalidStreamId), ("x" * 256, InvalidStreamId), (None, InvalidStreamId),
     (42, InvalidStreamId), (b"bytes", InvalidStreamId), ("nul\x00byte", InvalidStreamId)],
)
def test_bad_stream_id_is_rejected(store: EventStore, stream_id: Any,
                                   error: type[Exception]) -> None:
    """Empty, over-long and non-string stream ids raise InvalidStreamId."""
    with pytest.raises(error):
        store.append(stream_id, [NoteAdded(text="a")])
    with pytest.raises(error):
        list(store.read_stream(stream_id))
    assert list(store.read_all()) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"expected_version": -1},
        {"expected_version": "3"},
        {"expected_version": 1.5},
        {"expected_version": True},
        {"tenant_id": ""},
        {"tenant_id": 7},
        {"idempotency_key": ""},
        {"idempotency_key": 5},
        {"metadata": ["not", "a", "dict"]},
        {"metadata": {1: "non-string key"}},
        {"metadata": {"trace": {"spans": [{7: "nested non-string key"}]}}},
        {"metadata": {"pairs": ({7: "in a tuple"},)}},
        {"metadata": {"big": 10**5000}},  # past the digits Python writes as text
        {"metadata": {"o": object()}},
    ],
)
def test_bad_append_arguments_are_rejected(store: EventStore, kwargs: dict[str, Any]) -> None:
    """Negative or mistyped arguments raise InvalidArgument and write nothing."""
    with pytest.raises(InvalidArgument):
        store.append("c-1", [NoteAdded(text="a")], **kwargs)
    assert store.stream_version("c-1") == 0


@pytest.mark.parametrize(
    "events",
    [[], None, "text", NoteAdded(text="a list of one"), RawEvent(type="X", data={}),
     [{"type": "NoteAdded"}], [NoteAdded(text="ok"), object()],
     [Anything(value=object())], [Anything(value={1, 2, object()})],
     [RawEvent(type="", data={})], [RawEvent(type="X", data={"d": dt.timedelta})],
     # schema versions: not a bool, and within the stored column's 32 bits
     [RawEvent(type="X", data={}, schema_version=True)],
     [RawEvent(type="X", data={}, schema_version=0)],
     [RawEvent(type="X", data={}, schema_version=2**31)],
     [RawEvent(type="X", data={}, schema_version=2**70)],
     [RawEvent(type="X", data={}, schema_version=1.0)],  # type: ignore[arg-type]
     [RawEvent(type="X", data={1: "one"})],  # JSON keys are text: 1 would read back "1"
     [RawEvent(type="X", data={"a": [{"b": {2: "two"}}]})],  # at any depth
     [RawEvent(type="X", data={"a": ({2: "two"},)})],  # in tuples too
     [RawEvent(type="X", data={"a": [({2: "two"},)]})],
     [RawEvent(type="X", data=_Point(x=1.0))],  # type: ignore[arg-type]  # not a dict
     [Anything(value=10**5000)], [RawEvent(type="X", data={"a": 10**5000})]],
)
def test_bad_events_are_rejected(store: EventStore, events: Any) -> None:
    """An empty batch, a non-event or an unencodable payload raises InvalidEvent."""
    with pytest.raises(InvalidEvent):
        store.append("c-1", events)
    assert store.stream_version("c-1") == 0
    assert list(store.read_all()) == []


class Measured(Event, tag="test.Measured"):
    value: float


@pytest.mark.parametrize(
    "event",
    [NoteAdded(text=5),  # type: ignore[arg-type]  # msgspec does not check types when built
     CounterIncremented(by="two"),  # type: ignore[arg-type]
     Measured(value=float("nan")),  # JSON keeps NaN as null, which is no float
     Measured(value=float("inf")),
     RawEvent(type="test.NoteAdded", data={"text": 5}),
     RawEvent(type="test.NoteAdded", data={}),
     RawEvent(type="test.Unknown", data={"json": msgspec.Raw(b"NaN")}),
     RawEvent(type="test.NoteAdded", data={"x": msgspec.Raw(b"{bad")}, schema_version=99),
     RawEvent(type="test.NoteAdded", data={"text": "fits v1"}, schema_version=2)],
    ids=["wrong-field-type", "wrong-int", "nan", "inf", "raw-wrong-type", "raw-missing-field",
         "raw-invalid-json", "raw-newer-schema-invalid-json", "raw-newer-schema"])
def test_an_event_that_would_not_read_back_as_its_type_is_rejected(store: EventStore,
                                                                    event: Any) -> None:
    """Data that does not fit its own registered type raises InvalidEvent and writes nothing:
    stored, it would fail every later read of the log, every subscriber and projector."""
    store.append("c-0", [NoteAdded(text="before")])
    with pytest.raises(InvalidEvent, match=r"does not match its type|is not valid JSON"):
        store.append("c-1", [NoteAdded(text="fine"), event])
    assert store.stream_version("c-1") == 0
    assert [e.stream_id for e in store.read_all()] == ["c-0"]
    # A raw event of a known type whose data fits it is fine (and reads back typed).
    store.append("c-1", [RawEvent(type="test.NoteAdded", data={"text": "raw"})])
    assert [e.data for e in store.read_stream("c-1")] == [NoteAdded(text="raw")]


def test_an_event_of_a_class_that_lost_its_tag_must_read_back_as_the_new_class(
        store: EventStore) -> None:
    """Two event classes with one tag: reads decode it into the class registered last, so an
    event of the earlier class is refused unless it reads back as that one (it was stored and
    then failed every read of the log after it)."""
    from eventstore.events import _registry

    class BillingNote(Event, tag="test.SharedTag"):
        amount: int

    class ChatNote(Event, tag="test.SharedTag"):
        text: str
        amount: int = 0

    try:
        with pytest.raises(InvalidEvent, match=r"does not read back as .*ChatNote"):
            store.append("c-1", [BillingNote(amount=5)])
        assert store.stream_version("c-1") == 0
        store.append("c-1", [ChatNote(text="hi")])

        class ChatNoteAgain(Event, tag="test.SharedTag"):  # (a re-run notebook cell)
            text: str
            amount: int = 0

        store.append("c-1", [ChatNote(text="old class, same shape", amount=2)])
        assert [e.data for e in store.read_stream("c-1")] == [
            ChatNoteAgain(text="hi"), ChatNoteAgain(text="old class, same shape", amount=2)]

        # Rows are stored at the old class's schema version: read back as that version is.
        class Memo(Event, tag="test.SharedVersions", schema_version=3):
            text: str

        class MemoV1(Event, tag="test.SharedVersions", schema_version=1):
            body: str

        class MemoV2(Event, tag="test.SharedVersions", schema_version=2):
            text: str

        @upcaster("test.SharedVersions", from_version=1)
        def _v1(data: dict[str, Any]) -> dict[str, Any]:
            return {"text": data["body"]}

        with pytest.raises(InvalidEvent, match="newer than this code"):
            store.append("c-2", [Memo(text="from newer code")])  # (every read would fail)
        store.append("c-2", [MemoV1(body="upcast")])  # (checked as v1 data: refused)
        assert [e.data for e in store.read_stream("c-2")] == [MemoV2(text="upcast")]
    finally:
        _registry.pop("test.SharedTag", None)
        _registry.pop("test.SharedVersions", None)
        _upcasters.pop(("test.SharedVersions", 1), None)


def test_inline_handlers_get_the_events_as_reads_give_them(store: EventStore) -> None:
    """An inline handler is handed each event as every reader decodes it: a float field given
    an int holds a float (a fold of the object passed in drifted from a rebuild)."""
    seen: list[Any] = []
    store.add_inline_handler(lambda conn, recorded: seen.extend(r.data for r in recorded))
    given = Measured(value=1)  # type: ignore[arg-type]
    store.append("m-1", [given, RawEvent(type="test.Measured", data={"value": 2})])
    assert [(type(d).__name__, d.value, type(d.value)) for d in seen] == [
        ("Measured", 1.0, float), ("Measured", 2.0, float)]
    assert [e.data for e in store.read_stream("m-1")] == seen


def test_inline_handlers_get_the_metadata_as_reads_give_it(store: EventStore) -> None:
    seen: list[Any] = []
    store.add_inline_handler(lambda conn, recorded: seen.extend(r.metadata for r in recorded))
    store.append("m-1", [NoteAdded(text="x")], metadata={"span": (1, 2)})
    assert seen == [{"span": [1, 2]}]
    assert [e.metadata for e in store.read_stream("m-1")] == seen


def test_inline_handlers_get_raw_events_as_reads_give_them(store: EventStore) -> None:
    seen: list[Any] = []
    store.add_inline_handler(lambda conn, recorded: seen.extend(r.data for r in recorded))
    store.append("r-1", [RawEvent(type="test.Unknown", data={"span": (1, 2)})])
    assert seen == [RawEvent(type="test.Unknown", data={"span": [1, 2]})]
    assert [e.data for e in store.read_stream("r-1")] == seen


class Checked(Event, tag="test.Checked"):
    n: int

    def __check_appended__(self) -> None:
        if self.n < 0:
            raise ValueError("n must not be negative")


def test_an_event_its_type_s_own_check_refuses_is_not_stored(store: EventStore) -> None:
    """``__check_appended__`` runs on typed and raw events alike; what it raises is an
    InvalidEvent (its own InvalidEvent as it is), and nothing is written."""
    for event in (Checked(n=-1), RawEvent(type="test.Checked", data={"n": -1})):
        with pytest.raises(InvalidEvent, match="refused by its type's check: n must not"):
            store.append("c-1", [Checked(n=1), event])
    assert store.stream_version("c-1") == 0
    store.append("c-1", [Checked(n=0), RawEvent(type="test.Checked", data={"n": 2})])
    assert [e.data for e in store.read_stream("c-1")] == [Checked(n=0), Checked(n=2)]


class AtVersion2(Event, tag="test.AtVersion2", schema_version=2):
    text: str


def test_a_raw_event_at_its_type_s_current_schema_version_reads_back_typed(store: EventStore
                                                                          ) -> None:
    store.append("v-1", [RawEvent(type="test.AtVersion2", data={"text": "t"},
                                  schema_version=2)])
    (ev,) = store.read_stream("v-1")
    assert (ev.schema_version, ev.data) == (2, AtVersion2(text="t"))


def test_the_largest_schema_version_and_longest_type_name_are_stored(store: EventStore
                                                                     ) -> None:
    longest = "T" * 255
    store.append("c-1", [RawEvent(type=longest, data={"n": 1}, schema_version=2**31 - 1)])
    (ev,) = store.read_stream("c-1")
    assert (ev.type, ev.schema_version) == (longest, 2**31 - 1)
    assert ev.data == RawEvent(type=longest, data={"n": 1}, schema_version=2**31 - 1)


class NamesByNumber(Event, tag="test.NamesByNumber"):
    names: dict[int, str] = msgspec.field(default_factory=dict)


@dataclasses.dataclass
class _Box:
    content: Any


@attrs.define
class _AttrsBox:
    content: Any


@pytest.mark.parametrize(
    ("event", "where"),
    [(Anything(value={1: "a", "1": "b"}), "['value']"),
     (Anything(value={"a": [{"b": ({2: "x", "2": "y"},)}]}), "['value']['a'][0]['b'][0]"),
     (Anything(value=_Mapped(m={3: 0, "3": 1})), "['value']['m']"),
     (Anything(value=_Box(content={4: 0, "4": 1})), "['value']['content']"),
     (Anything(value=[_AttrsBox(content={5: 0, "5": 1})]), "['value'][0]['content']"),
     (NamesByNumber(names={1: "a", "1": "b"}), "['names']"),
     (RawEvent(type="test.Anything", data={"value": {6: "a", "6": "b"}}), "['value']"),
     (RawEvent(type="test.NamesByNumber", data={"names": {7: "a", "7": "b"}}), "['names']")],
    ids=["any-field", "nested", "struct", "dataclass", "attrs", "int-keyed-field",
         "raw-known-type", "raw-int-keyed"])
def test_two_keys_json_writes_as_one_are_refused(store: EventStore, event: Any,
                                                 where: str) -> None:
    """JSON keys are text: {1: "a", "1": "b"} would read back as {"1": "b"}, a value lost
    without a word.  Such an event (typed, or raw of a known type) raises InvalidEvent naming
    the keys and where, and writes nothing."""
    with pytest.raises(InvalidEvent, match="are one key in JSON") as refused:
        store.append("c-1", [NoteAdded(text="first"), event])
    assert f"at {where}" in str(refused.value)
    assert store.stream_version("c-1") == 0


def test_keys_json_gives_back_or_turns_to_text_without_loss_are_stored(store: EventStore
                                                                      ) -> None:
    """A lone int key in a field typed Any reads back as its text (msgspec's JSON); one in a
    dict[int, ...] field reads back as the int."""
    store.append("c-1", [Anything(value={1: "a", "b": {2: [3]}}), NamesByNumber(names={1: "a"}),
                         RawEvent(type="test.NamesByNumber", data={"names": {2: "b"}})])
    assert [e.data for e in store.read_stream("c-1")] == [
        Anything(value={"1": "a", "b": {"2": [3]}}), NamesByNumber(names={1: "a"}),
        NamesByNumber(names={2: "b"})]


class MaybeMeasured(Event, tag="test.MaybeMeasured"):
    value: float | None = None


@pytest.mark.parametrize(
    ("event", "metadata"),
    [(Anything(value={"scores": [1.0, float("nan")]}), None),
     (MaybeMeasured(value=float("inf")), None),  # None is a float | None: reads back "fine"
     (RawEvent(type="test.Unknown", data={"x": {"y": float("-inf")}}), None),
     (NoteAdded(text="ok"), {"temperature": float("nan")}),
     (Anything(value={"point": (1.0, float("nan"))}), None),  # tuples stay tuples in the walk
     (NoteAdded(text="ok"), {"range": (0.0, float("inf"))}),
     (Anything(value=[2**70, float("nan")]), None),  # past msgpack's ints: looked at in Python
     (RawEvent(type="test.Unknown", data={"json": msgspec.Raw(b"[1]"), "x": float("inf")}),
      None),  # to_builtins refuses msgspec.Raw
     # beside a msgspec.Raw, in each kind of value the walk opens
     *[(RawEvent(type="test.Unknown", data={"json": msgspec.Raw(b"[1]"), "v": value}), None)
       for value in ({float("nan")}, frozenset([float("inf")]), _Point(x=float("nan")),
                     _Reading(value=float("-inf")), _AttrsReading(value=float("nan")))]],
    ids=["any-field", "optional-float", "raw-unknown-type", "metadata", "tuple", "metadata-tuple",
         "huge-int", "beside-msgspec-raw", "raw-set", "raw-frozenset", "raw-struct",
         "raw-dataclass", "raw-attrs"])
def test_nan_and_infinity_are_refused_not_stored_as_null(store: EventStore, event: Any,
                                                         metadata: Any) -> None:
    """JSON has no NaN or infinity (msgspec writes null): an event or metadata holding one
    raises InvalidEvent, naming where, and writes nothing, instead of reading back as None."""
    with pytest.raises(InvalidEvent, match="NaN or infinite"):
        store.append("c-1", [NoteAdded(text="first"), event], metadata=metadata)
    assert store.stream_version("c-1") == 0
    # null itself is data like any other, as are bytes that look like a NaN in msgpack.
    store.append("c-1", [Anything(value={"x": None, "y": 1.5}), MaybeMeasured(),
                         RawEvent(type="test.Unknown", data={"n": None, "b": "\x7f"})],
                 metadata={"a": None})
    assert [e.data for e in store.read_stream("c-1")] == [
        Anything(value={"x": None, "y": 1.5}), MaybeMeasured(value=None),
        RawEvent(type="test.Unknown", data={"n": None, "b": "\x7f"})]


@pytest.mark.parametrize(
    ("events", "metadata"),
    [([NoteAdded(text="caf\udce9")], None),
     ([Anything(value={"k\ud800": 1})], None),
     ([RawEvent(type="test.Unknown", data={"v": ["\udfff"]})], None),
     ([NoteAdded(text="ok")], {"file": "caf\udce9"})],
    ids=["field", "key", "raw", "metadata"])
def test_a_lone_surrogate_in_a_payload_is_refused_and_writes_nothing(
        store: EventStore, events: list[Any], metadata: Any) -> None:
    """UTF-8 (and so the stored JSON) cannot hold a lone surrogate: an event or metadata with
    one in a string raises InvalidEvent (README, "Nothing swallowed") and writes nothing, the
    other events of the append included."""
    with pytest.raises(InvalidEvent, match="surrogate"):
        store.append("c-1", [NoteAdded(text="first"), *events], metadata=metadata)
    assert store.stream_version("c-1") == 0 and list(store.read_all()) == []


@pytest.mark.parametrize(
    "call",
    [lambda s: s.append("c-\ud800", [NoteAdded(text="a")]),
     lambda s: s.append("c-1", [NoteAdded(text="a")], tenant_id="t\udfff"),
     lambda s: s.append("c-1", [NoteAdded(text="a")], idempotency_key="k\ud800"),
     lambda s: s.append("c-1", [RawEvent(type="T\ud800", data={})]),
     lambda s: s.append("c-1", [RawEvent(type="T" * 256, data={})]),
     lambda s: s.append("c-1", [RawEvent(type="T\x00", data={})]),
     lambda s: list(s.read_stream("c-\ud800")),
     lambda s: list(s.read_all(types=["T\ud800"])),
     lambda s: list(s.read_all(types=[])),
     lambda s: list(s.read_all(categories=[]))],
    ids=["stream-surrogate", "tenant-surrogate", "key-surrogate", "type-surrogate",
         "type-too-long", "type-nul", "read-surrogate", "filter-surrogate", "no-types",
         "no-categories"])
def test_ids_and_names_the_database_cannot_hold_are_rejected(store: EventStore,
                                                              call: Any) -> None:
    """Ids, type names and filters that are no valid text, too long for their column, or an
    empty filter list (which would silently mean "everything") raise InvalidArgument, the same
    on both backends, and write nothing."""
    with pytest.raises(InvalidArgument):
        call(store)
    assert list(store.read_all()) == []


def test_errors_share_one_base_class() -> None:
    """Every input error is an EventStoreError and a ValueError."""
    for cls in (InvalidArgument, InvalidEvent, InvalidStreamId):
        assert issubclass(cls, EventStoreError) and issubclass(cls, ValueError)


def test_bad_read_arguments_are_rejected(store: EventStore) -> None:
    """Read arguments are checked when called, before iteration."""
    with pytest.raises(InvalidArgument):
        store.read_stream("c-1", from_version=-1)
    with pytest.raises(InvalidArgument):
        store.read_stream("c-1", limit=-5)
    with pytest.raises(InvalidArgument):
        store.read_all(from_position="0")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        store.read_all(categories=[""])
    with pytest.raises(InvalidArgument):
        store.subscribe(stop="not an event")  # type: ignore[arg-type]
    # Integers past what the databases hold (SQLite raised OverflowError, PostgreSQL a
    # DatabaseError): InvalidArgument on both.
    for call in (lambda: store.read_stream("c-1", from_version=2**63),
                 lambda: store.read_stream("c-1", to_version=2**64),
                 lambda: store.read_all(from_position=2**63),
                 lambda: store.read_all(limit=10**30),
                 lambda: store.append("c-1", [NoteAdded(text="a")], expected_version=2**63)):
        with pytest.raises(InvalidArgument, match="2\\*\\*63"):
            call()
    assert list(store.read_stream("c-1", from_version=2**63 - 1)) == []
    assert list(store.read_all(from_position=2**63 - 1, limit=2**63 - 1)) == []


def test_backwards_must_be_a_bool(store: EventStore) -> None:
    with pytest.raises(InvalidArgument, match="backwards"):
        store.read_stream("c-1", backwards="yes")  # type: ignore[arg-type]


def test_filters_that_are_not_lists_of_names_are_rejected(store: EventStore) -> None:
    for filters in ({"categories": 5}, {"types": 1.5}):
        with pytest.raises(InvalidArgument):
            store.read_all(**filters)


@pytest.mark.parametrize("stream_id", HOSTILE)
def test_hostile_stream_ids_round_trip_verbatim(store: EventStore, stream_id: str) -> None:
    """Quotes, SQL and unicode in stream ids and payloads are stored and read back verbatim."""
    payload = stream_id + " ' \" ; -- \\x00 \u0000 %s {} 😀"
    store.append(stream_id, [NoteAdded(text=payload)], tenant_id=stream_id[:200],
                 idempotency_key=stream_id[:200], metadata={stream_id[:50]: payload})
    (ev,) = store.read_stream(stream_id, tenant_id=stream_id[:200])
    assert ev.stream_id == stream_id and ev.tenant_id == stream_id[:200]
    assert ev.data == NoteAdded(text=payload)
    assert ev.metadata == {stream_id[:50]: payload}
    assert store.stream_version(stream_id, tenant_id=stream_id[:200]) == 1
    assert store.stats()["events"] == 1


def test_raw_payloads_read_back_verbatim_type_key_included(store: EventStore) -> None:
    """A raw payload's own "type" key survives, also when it equals the event type (a webhook
    stored as ``RawEvent(type=payload["type"], data=payload)``): it was dropped on read."""
    hook = {"type": "invoice.paid", "id": "evt_1", "amount": 5}
    store.append("hooks-1", [RawEvent(type="invoice.paid", data=hook),
                             RawEvent(type="invoice.sent", data={"type": "x", "n": 1}),
                             RawEvent(type="invoice.void", data={})])
    assert [e.data for e in store.read_stream("hooks-1")] == [
        RawEvent(type="invoice.paid", data=hook),
        RawEvent(type="invoice.sent", data={"type": "x", "n": 1}),
        RawEvent(type="invoice.void", data={})]
    assert [e.data.data for e in store.read_all()] == [hook, {"type": "x", "n": 1}, {}]


def _nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = {"a": value} if i % 2 else [value, "]}"]  # brackets in strings do not count
    return value


@pytest.mark.parametrize("where", ["typed", "raw", "metadata"])
def test_data_nested_deeper_than_the_limit_is_refused(store: EventStore, where: str) -> None:
    """Data nested past MAX_NESTING levels is InvalidEvent with nothing written (it was a bare
    RecursionError past about 1,000, and below that could be stored yet fail every read made
    from deeper in a caller's stack); at the limit it is stored and reads back."""
    from eventstore.codec import MAX_NESTING

    def append(depth: int) -> Any:
        # depth - 1 levels under the event's own object, beside shallow brackets (30 more
        # than the levels: a count of brackets alone cannot tell the depth)
        value = [_nested(depth - 2), [[] for _ in range(30)]]
        if where == "typed":
            return store.append("deep-1", [Anything(value=value)])
        if where == "raw":
            return store.append("deep-1", [RawEvent(type="test.Deep", data={"v": value})])
        return store.append("deep-1", [NoteAdded(text="x")], metadata={"m": value})

    for depth in (MAX_NESTING + 1, 5000):
        with pytest.raises(InvalidEvent, match="nested"):
            append(depth)
    assert store.stream_version("deep-1") == 0
    append(MAX_NESTING)
    assert len(list(store.read_stream("deep-1"))) == 1


@pytest.mark.parametrize("where", ["typed", "raw", "metadata"])
def test_escapes_in_strings_do_not_change_the_depth_counted(store: EventStore, where: str
                                                            ) -> None:
    """Strings with escapes (a newline, a quote, a backslash, a \\uXXXX) before deep data:
    still refused; before strings full of brackets: still stored, verbatim.  (The depth check
    once dropped an escape's letter and paired its backslash with the closing quote: 600
    levels went in after a "\\n", and a shallow event with "[[[...]]]" in a string was
    refused.)"""
    escapes = {"n": "\n", "q": 'say "hi"', "b": "C:\\dir\\", "u": "\x01\u2028"}

    def append(stream: str, value: Any) -> Any:
        payload = {**escapes, "v": value, "z": "\t"}
        if where == "typed":
            return store.append(stream, [Anything(value=payload)])
        if where == "raw":
            return store.append(stream, [RawEvent(type="test.Deep", data=payload)])
        return store.append(stream, [NoteAdded(text="x")], metadata=payload)

    with pytest.raises(InvalidEvent, match="nested deeper"):
        append("deep-1", _nested(600))
    assert store.stream_version("deep-1") == 0
    brackets = "[" * 300 + "{" * 300 + "]" * 300
    append("deep-2", [brackets, '\\"[[[', "\\"])
    (rec,) = store.read_stream("deep-2")
    stored = (rec.metadata if where == "metadata" else
              rec.data.value if where == "typed" else rec.data.data)  # type: ignore[union-attr]
    assert stored == {**escapes, "v": [brackets, '\\"[[[', "\\"], "z": "\t"}
    # One escaped quote (an odd count) before balanced brackets in a string: still shallow.
    lone = ['a "quote', "[" * 300 + "]" * 300]
    append("deep-3", lone)
    (rec,) = store.read_stream("deep-3")
    stored = (rec.metadata if where == "metadata" else
              rec.data.value if where == "typed" else rec.data.data)  # type: ignore[union-attr]
    assert stored["v"] == lone
