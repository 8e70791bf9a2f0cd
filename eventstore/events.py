"""Event types, their registry by stable tag, upcasters, and the records the store returns.

An event type is a frozen, keyword-only :class:`msgspec.Struct` that subclasses :class:`Event`
with an explicit ``tag``::

    class NoteAdded(Event, tag="NoteAdded"):
        text: str

Defining the class registers it; the tag is what is stored, so renaming the class never changes
stored data.  A type whose fields change incompatibly bumps ``schema_version`` and registers an
upcaster that turns the stored dict of the old version into the dict of the next one::

    class NoteAdded(Event, tag="NoteAdded", schema_version=2):
        text: str
        author: str

    @upcaster("NoteAdded", from_version=1)
    def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "author": "unknown"}

Schema evolution rules (msgspec's): a new field gets a default; a field never changes type.
Following them needs no upcaster at all.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, ClassVar, dataclass_transform
from uuid import UUID

import msgspec

from ._time import from_micros
from .errors import error_text
from .logs import get_logger

__all__ = [
    "ANY",
    "STREAM_EXISTS",
    "AppendResult",
    "Event",
    "ExpectedState",
    "RawEvent",
    "RecordedEvent",
    "StreamSlice",
    "event_type",
    "registered_types",
    "upcaster",
]

_log = get_logger("eventstore.events")

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_registry: dict[str, type[Event]] = {}
_upcasters: dict[tuple[str, int], Upcaster] = {}
_registry_lock = threading.Lock()

# Schema versions are stored as 32-bit integers (PostgreSQL's integer).
MAX_SCHEMA_VERSION = 2**31 - 1


@dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(msgspec.field,))
class _EventMeta(msgspec.StructMeta):
    """Registers each tagged subclass of :class:`Event` under its tag.

    A metaclass (rather than ``__init_subclass__``) because msgspec applies the ``tag`` option only
    after ``__init_subclass__`` has run, and because only here can we see whether the tag was given
    explicitly: the default tag is the class name, which would tie stored data to a Python name.
    """

    def __new__(
        mcls,
        name: str,
        bases: tuple[type, ...],
        namespace: dict[str, Any],
        *,
        schema_version: int | None = None,
        **kwargs: Any,
    ) -> Any:
        is_base = not any(isinstance(b, _EventMeta) for b in bases)
        tag = kwargs.get("tag")
        if not is_base:
            # msgspec applies kw_only per class; every event type is keyword-only (so a field
            # without a default may follow one with a default, and call sites stay explicit).
            kwargs.setdefault("kw_only", True)
            if "tag_field" in kwargs:
                raise TypeError(f"{name}: event types share the tag field 'type'")
            if tag is not None and (not isinstance(tag, str) or not tag):
                raise TypeError(f"{name}: an event tag must be a non-empty string, got {tag!r}")
            if tag is not None and (len(tag) > 255 or "\x00" in tag
                                    or not tag.encode("utf-8", "surrogatepass").decode(
                                        "utf-8", "ignore") == tag):
                raise TypeError(f"{name}: an event tag must be at most 255 characters of "
                                f"Unicode text without NUL, got {tag[:60]!r}")
            if tag is None and not namespace.get("__abstract_event__", False):
                raise TypeError(
                    f"{name}: give the event a stable tag, e.g. class {name}(Event, "
                    f'tag="{name}"), or set __abstract_event__ = True for a base class'
                )
        if schema_version is not None and (
            not isinstance(schema_version, int) or isinstance(schema_version, bool)
            or not 1 <= schema_version <= MAX_SCHEMA_VERSION
        ):
            raise TypeError(f"{name}: schema_version must be an int from 1 to "
                            f"{MAX_SCHEMA_VERSION}")
        if tag is None:
            # With a tag field, msgspec would tag the class with its name: an abstract type
            # (and Event itself) has no tag, so that it can be neither stored nor read as one.
            kwargs["tag"] = False
        cls: Any = super().__new__(mcls, name, bases, namespace, **kwargs)
        if schema_version is not None:
            cls.__event_schema_version__ = schema_version
        elif tag is not None:
            cls.__event_schema_version__ = 1
        if not is_base and tag is not None:
            with _registry_lock:
                previous = _registry.get(tag)
                if previous is not None and previous is not cls:
                    _log.warning(
                        "event_type_replaced", tag=tag,
                        previous=f"{previous.__module__}.{previous.__qualname__}",
                        current=f"{cls.__module__}.{cls.__qualname__}",
                    )
                _registry[tag] = cls
                _decoders.pop(tag, None)
        return cls


# (Also on the class: type checkers take msgspec's own transform of Struct over a metaclass's,
# and would let events be built positionally and changed.)
@dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(msgspec.field,))
class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False,
            metaclass=_EventMeta):
    """Base class of every event type; subclass it with ``tag="PastTenseFact"``.

    Events are not tracked by the garbage collector (``gc=False``, inherited by every event
    type): a replay decodes thousands, and tracking each one made collections run over and over
    during the fold.  Decoded events cannot be part of a reference cycle; do not build one
    through an event's mutable field (``event.items.append(event)``), as it would never be
    collected (such an event could not be encoded either).
    """

    __abstract_event__: ClassVar[bool] = True
    __event_schema_version__: ClassVar[int] = 1
    # Appends decode each event back into its type to refuse data that would not read back
    # (see ``codec.encode_event``); only types built by library code from checked values
    # turn this off.
    __check_on_append__: ClassVar[bool] = True

    @classmethod
    def event_tag(cls) -> str:
        """The stable name this type is stored under."""
        tag = cls.__struct_config__.tag
        if not isinstance(tag, str):
            raise TypeError(f"{cls.__qualname__} is not a concrete event type")
        return tag


class RawEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event as type name and JSON-compatible data.

    Reads return this for a type the reading code does not know (instead of failing); appends
    accept it for events whose Python type is not at hand (the command line, tooling).
    """

    type: str
    data: dict[str, Any]
    schema_version: int = 1


class ExpectedState(enum.Enum):
    """Expected-version checks that are not a number."""

    ANY = "any"
    STREAM_EXISTS = "stream_exists"


ANY = ExpectedState.ANY
"""Append whatever the stream's version is."""
STREAM_EXISTS = ExpectedState.STREAM_EXISTS
"""Append only to a stream that holds at least one event."""


class RecordedEvent(msgspec.Struct, frozen=True, gc=False):
    """One committed event as read back from the store.

    ``gc=False``: a page of records holds thousands of them, and tracking each one made the
    garbage collector run hundreds of times per 100k events read.  A record cannot be part of a
    reference cycle (its fields are decoded JSON, an event struct and scalars), which is what
    msgspec requires for the option.  It is an in-memory record, never stored.
    """

    position: int
    stream_id: str
    version: int
    tenant_id: str
    event_id: UUID
    type: str
    schema_version: int
    data: Event | RawEvent
    metadata: dict[str, Any]
    recorded_at: datetime

    @property
    def category(self) -> str:
        """The part of the stream id before the first ``-``."""
        return self.stream_id.split("-", 1)[0]


class StreamSlice:
    """Consecutive events of one stream, column by column, for folds that need no records.

    ``data[i]`` is the decoded event (as in :attr:`RecordedEvent.data`) of version
    ``versions[i]``, of type ``types[i]``, committed at ``recorded_at_us[i]`` (microseconds since
    the epoch; :meth:`recorded_at` gives the datetime).  What a slice leaves out (log positions,
    event ids, metadata) is what makes it cheaper to read than records:
    :meth:`projections.Projection.evolve_slice` folds these.
    """

    __slots__ = ("data", "recorded_at_us", "stream_id", "tenant_id", "types", "versions")

    def __init__(self, tenant_id: str, stream_id: str, versions: Sequence[int],
                 types: Sequence[str], data: Sequence[Event | RawEvent],
                 recorded_at_us: Sequence[int]) -> None:
        self.tenant_id = tenant_id
        self.stream_id = stream_id
        self.versions = versions
        self.types = types
        self.data = data
        self.recorded_at_us = recorded_at_us

    def __len__(self) -> int:
        return len(self.versions)

    def recorded_at(self, i: int) -> datetime:
        """When the ``i``-th event of the slice was committed (UTC)."""
        return from_micros(self.recorded_at_us[i])

    def __repr__(self) -> str:
        span = f"{self.versions[0]}..{self.versions[-1]}" if self.versions else "empty"
        return f"StreamSlice({self.tenant_id!r}, {self.stream_id!r}, versions {span})"


class AppendResult(msgspec.Struct, frozen=True):
    """What an append wrote (or, with ``duplicate=True``, what the first append wrote)."""

    first_position: int
    last_position: int
    stream_version: int
    duplicate: bool = False


def event_type(tag: str) -> type[Event] | None:
    """The registered event class for ``tag``, or ``None``."""
    return _registry.get(tag)


def registered_types() -> dict[str, type[Event]]:
    """A copy of the registry: tag -> event class."""
    with _registry_lock:
        return dict(_registry)


def upcaster(tag: str, *, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register a function that upgrades ``tag``'s stored data from ``from_version`` to the next."""
    if not isinstance(tag, str) or not tag:
        raise TypeError("upcaster tag must be a non-empty string")
    if (not isinstance(from_version, int) or isinstance(from_version, bool)
            or not 1 <= from_version < MAX_SCHEMA_VERSION):
        raise TypeError(f"from_version must be an int from 1 to {MAX_SCHEMA_VERSION - 1}")

    def register(fn: Upcaster) -> Upcaster:
        with _registry_lock:
            _upcasters[(tag, from_version)] = fn
        return fn

    return register


# Decoders are built once per type and cached; the registry drops a type's entry when the type is
# redefined.
_decoders: dict[str, msgspec.json.Decoder[Any]] = {}


def _decoder_for(tag: str, cls: type[Event]) -> msgspec.json.Decoder[Any]:
    dec = _decoders.get(tag)
    if dec is None:
        dec = _decoders[tag] = msgspec.json.Decoder(cls)
    return dec


def _upcast(tag: str, data: dict[str, Any], from_version: int, to_version: int) -> dict[str, Any]:
    for v in range(from_version, to_version):
        fn = _upcasters.get((tag, v))
        if fn is None:
            raise LookupError(f"no upcaster registered for {tag} from schema version {v}")
        try:
            data = fn(data)
        except Exception as e:  # the upcaster's own failure: the read names the event
            raise UpcastError(f"the upcaster of {tag} from schema version {v} raised "
                              f"{type(e).__name__}: {error_text(e)}") from e
        if not isinstance(data, dict):
            raise UpcastError(f"the upcaster of {tag} from schema version {v} returned "
                              f"{type(data).__name__}, not a dict")
    return data


class UpcastError(LookupError):
    """An upcaster raised or returned something else than a dict (``decode_event`` turns it
    into an :class:`EventDecodeError` that names the event)."""
