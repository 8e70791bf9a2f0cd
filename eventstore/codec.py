"""Encoding events and metadata to bytes, and decoding them back to typed values.

One encoder and one JSON decoder per event type, built once.  Stored data is msgspec's JSON of the
event struct (the tag included, so a row is self-describing).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import decimal
import enum
import functools
import math
import re
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
import msgspec.inspect

from ._schema import MAX_ID_LENGTH
from .errors import EventDecodeError, InvalidEvent, error_text
from .events import MAX_SCHEMA_VERSION, Event, RawEvent, _decoder_for, _registry, _upcast

_encoder = msgspec.json.Encoder()
_any_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder()
_dict_decoder = msgspec.json.Decoder(dict[str, Any])


# Stored JSON nests at most this deep: decoding recurses once per level, within Python's
# recursion limit (1,000 by default) less the reader's own stack, so deeper data accepted from a
# shallow caller could fail every read made from deeper in a program (a web framework's).
MAX_NESTING = 256
_STRING = re.compile(rb'"[^"]*"')  # a string once its escapes are out
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_INNERMOST = re.compile(rb"\[\]|\{\}")  # one scan: pairs it empties are the next pass's


def _check_depth(data: bytes, what: str) -> None:
    """Refuse JSON nested deeper than :data:`MAX_NESTING`.  A count of brackets first (the rest
    runs only when there are that many); then, all in C: escaped backslashes and quotes out,
    brackets and quotes only, strings out, and each pass takes the innermost pairs away, so
    the passes are the depth."""
    if data.count(b"[") + data.count(b"{") <= MAX_NESTING:
        return
    # Escaped backslashes first, then escaped quotes: what is left of a string is then quotes
    # at its ends only.  (Valid JSON has backslashes only in strings, each opening an escape,
    # so pairs found from the left are its escapes.  Dropping an escape's letter instead left
    # its backslash to pair with the string's closing quote: strings and structure out of step.)
    rest = data.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in data else data
    rest = rest.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in rest:
        rest = _STRING.sub(b"", rest)
    for _ in range(MAX_NESTING):
        inner = _INNERMOST.sub(b"", rest)
        if not inner or len(inner) == len(rest):
            return
        rest = inner
    raise InvalidEvent(f"{what} is nested deeper than {MAX_NESTING} levels")


def _why(e: BaseException) -> str:
    return "nested too deeply to encode" if isinstance(e, RecursionError) else str(e)


def encode_event(event: object) -> tuple[str, int, bytes]:
    """Return ``(type, schema_version, data)`` for an event, or raise :class:`InvalidEvent`."""
    tag, sv, data, _read = encode_checked(event)
    return tag, sv, data


def _check_appended(read: object, tag: str) -> None:
    """A type's own check of what is appended (``__check_appended__``, which raises for an
    event its readers could not use): run on the event as reads will give it, at append only,
    so one stored before the check was added still reads back."""
    check = getattr(type(read), "__check_appended__", None)
    if check is None:
        return
    try:
        check(read)
    except InvalidEvent:
        raise
    except Exception as e:
        raise InvalidEvent(f"{tag} event refused by its type's check: {error_text(e)}") from e


def encode_checked(event: object) -> tuple[str, int, bytes, Event | RawEvent]:
    """:func:`encode_event`, and the event as reads of the log will give it (decoded from
    ``data`` by the check, so inline projections fold what every reader folds: the registered
    class, values as stored)."""
    if isinstance(event, Event):
        cls = type(event)
        tag = cls.__struct_config__.tag
        if not isinstance(tag, str):
            raise InvalidEvent(f"{cls.__qualname__} has no tag and cannot be stored")
        try:
            data = _encoder.encode(event)
        except (msgspec.EncodeError, TypeError, OverflowError, ValueError, RecursionError) as e:
            raise InvalidEvent(f"cannot encode {tag} event: {_why(e)}") from e
        _check_depth(data, f"{tag} event")
        sv = cls.__event_schema_version__
        # msgspec does not check a struct's field types when it is built: an event whose data
        # does not fit its own type (``NoteAdded(text=5)``, NaN in a float field, which JSON
        # stores as null) would be stored and then fail every read of the log after it.  A type
        # whose instances only library code builds, from values it checked, may opt out
        # (``__check_on_append__ = False``: the LangGraph saver's checkpoints and writes, where
        # decoding a large value again would cost as much as encoding it).
        if not cls.__check_on_append__:
            return tag, sv, data, event
        registered = _registry.get(tag, cls)
        try:
            # Another class under the same tag (one redefined since, as a re-run notebook cell
            # does) gets a decoder of its own: the cached one decodes into the registered class.
            read: Event | RawEvent = (_decoder_for(tag, cls) if registered is cls
                                      else msgspec.json.Decoder(cls)).decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise InvalidEvent(f"{tag} event does not match its type: {e}") from e
        except TypeError as e:  # a field type msgspec cannot decode into
            raise InvalidEvent(f"{tag} events cannot be read back: {e}") from e
        if registered is not cls:
            # Reads decode the tag into the class registered for it now (another class took
            # the tag since this one was defined), at this class's schema version: upcast
            # when older, refused when newer.  The data must read back that way too.
            try:
                read = decode_event(tag, sv, data)
            except Exception as e:  # EventDecodeError, or an upcaster's own error
                raise InvalidEvent(
                    f"a {cls.__qualname__} event does not read back as "
                    f"{registered.__module__}.{registered.__qualname__}, the class registered "
                    f"for tag {tag!r} now (two event classes share the tag?): "
                    f"{e.__cause__ or e}") from e
        if registered is cls and _may_hold_mappings(cls) and _encoder.encode(read) != data:
            # (Read back, written again, the same JSON: no key was lost.  Else, a look.)
            _check_no_keys_merged(event, read, f"{tag} event")
        _check_finite(event, data, f"{tag} event")
        _check_appended(read, tag)
        return tag, sv, data, read
    if isinstance(event, RawEvent):
        if not isinstance(event.type, str) or not event.type:
            raise InvalidEvent("a raw event needs a non-empty string type")
        _check_type_name(event.type)
        if not isinstance(event.data, dict):
            raise InvalidEvent(f"raw event {event.type} data must be a JSON object")
        sv = event.schema_version
        if not isinstance(sv, int) or isinstance(sv, bool) or not 1 <= sv <= MAX_SCHEMA_VERSION:
            raise InvalidEvent(f"raw event {event.type} schema_version must be an int from 1 "
                               f"to {MAX_SCHEMA_VERSION}, not {sv!r}")
        try:
            data = _encoder.encode(event.data)
        except (msgspec.EncodeError, TypeError, OverflowError, ValueError, RecursionError) as e:
            raise InvalidEvent(f"cannot encode {event.type} event data: {_why(e)}") from e
        known = _registry.get(event.type)
        if known is not None and event.schema_version > known.__event_schema_version__:
            # Nothing here can check it, and every reader of this code would fail on it: the
            # code that knows that schema appends it (as a typed event).
            raise InvalidEvent(
                f"raw {event.type} event does not match its type: this code knows it up to "
                f"schema version {known.__event_schema_version__}, not "
                f"{event.schema_version}")
        read = event
        if known is not None:
            # Data of a type this code knows must read back as that type (upcast when older),
            # which is what inline projections are then handed.
            try:
                read = decode_event(event.type, event.schema_version, data)
            except Exception as e:  # EventDecodeError, or an upcaster's own error
                raise InvalidEvent(f"raw {event.type} event does not match its type: "
                                   f"{e.__cause__ or e}") from e
            _check_appended(read, event.type)
        else:
            # Readers decode it as a JSON object (code that knows the type too): a msgspec.Raw
            # inside is written as it is, so one holding no valid JSON would fail every later
            # read of the log.
            try:
                stored = _dict_decoder.decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
                raise InvalidEvent(f"raw {event.type} event data is not valid JSON: {e}") from e
            # What readers get: the data as stored (a datetime in it as its ISO string, a tuple
            # as a list), also for inline projections.
            read = RawEvent(type=event.type, data=stored, schema_version=sv)
        _check_depth(data, f"{event.type} event")  # (valid JSON by now)
        if known is None:  # (a known type's own field types say what its keys are)
            _check_keys(event.data, f"raw event {event.type} data")
        else:  # (but two keys written as one JSON key lose a value before any type reads it)
            stored = _dict_decoder.decode(data)
            if _encoder.encode(stored) != data:
                _check_no_keys_merged(event.data, stored, f"raw event {event.type} data")
        _check_finite(event.data, data, f"{event.type} event")
        return event.type, event.schema_version, data, read
    raise InvalidEvent(
        f"expected an Event or RawEvent instance, got {type(event).__name__}: {event!r:.80}"
    )


# Kept as they are by msgspec.to_builtins: none of them holds a float.
_LEAVES = (bytes, bytearray, memoryview, _dt.datetime, _dt.date, _dt.time, _dt.timedelta,
           uuid.UUID, decimal.Decimal)
_msgpack = msgspec.msgpack.Encoder()
# A float64 in msgpack whose exponent bits are all ones: NaN or an infinity.  Other bytes can
# match too (binary data, lengths, a finite float's mantissa): a match only says where to look.
_NON_FINITE_FLOAT = re.compile(rb"\xcb[\x7f\xff][\xf0-\xff]")


def _check_keys(value: object, what: str) -> None:
    """Refuse a mapping key that is not a string, at any depth of plain data (a raw event's,
    metadata): JSON writes it as text, so ``{1: "x"}`` would read back as ``{"1": "x"}``.
    (Typed events are checked by reading them back as their type.)"""
    stack: list[tuple[object, tuple[object, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    where = "".join(f"[{k!r}]" for k in path)
                    raise InvalidEvent(f"{what}: keys must be strings, got {key!r}"
                                       + (f" at {where}" if where else ""))
                if isinstance(child, (dict, list, tuple)):
                    stack.append((child, (*path, key)))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, (*path, i)) for i, child in enumerate(item)
                         if isinstance(child, (dict, list, tuple)))


def _check_no_keys_merged(given: object, read: object, what: str) -> None:
    """Refuse an event (typed, or raw of a known type) with a mapping two of whose keys JSON
    writes as one: keys are text there, so ``{1: "a", "1": "b"}`` would read back as
    ``{"1": "b"}``, a value lost without a word.  (A lone int key in a field typed ``Any``
    reads back as its string, as msgspec converts; a ``dict[int, ...]`` field gives it back as
    an int.)  Walks the event as given beside the event as read back: a mapping that read back
    smaller lost a key."""
    stack: list[tuple[object, object, tuple[object, ...]]] = [(given, read, ())]
    while stack:
        g, r, path = stack.pop()
        if isinstance(g, dict):
            if not isinstance(r, dict):
                continue
            if len(r) != len(g):
                raise InvalidEvent(f"{what}: {_merged_keys(g)}"
                                   + (f" at {_where(path)}" if path else "")
                                   + " are one key in JSON (keys are written as text): one "
                                   "of their values would be lost")
            # (JSON keeps the order of a mapping's keys: the pairs line up.)
            stack.extend((child, other, (*path, key)) for (key, child), other
                         in zip(g.items(), r.values(), strict=True)
                         if _walked(child))
        elif isinstance(g, (list, tuple)):
            if isinstance(r, (list, tuple)) and len(r) == len(g):
                stack.extend((child, r[i], (*path, i)) for i, child in enumerate(g)
                             if _walked(child))
        else:  # a struct, dataclass or attrs instance: read back as such, or as a dict
            for name, encoded in _field_names(type(g)):
                child = getattr(g, name, None)
                if _walked(child):
                    other = (r.get(encoded) if isinstance(r, dict)
                             else getattr(r, name, None))
                    stack.append((child, other, (*path, encoded)))


def _where(path: tuple[object, ...]) -> str:
    return "".join(f"[{k!r}]" for k in path)


def _merged_keys(mapping: dict[Any, Any]) -> str:
    """The first keys of ``mapping`` that JSON writes as one (for the error message)."""
    seen: dict[str, Any] = {}
    for key in mapping:
        try:
            (text,) = _any_decoder.decode(_encoder.encode({key: None}))
        except Exception:  # pragma: no cover - it was encoded once already
            continue
        if text in seen:
            return f"the keys {seen[text]!r} and {key!r}"
        seen[text] = key
    return "two keys"  # pragma: no cover - a mapping read back smaller has two such keys


# What _check_no_keys_merged walks into (a set's elements are hashable: no mapping in them),
# besides dataclasses and attrs classes; and what it never does.
_KEYED = (dict, list, tuple, msgspec.Struct)
_LEAF = (str, int, float, bytes, type(None))


def _walked(value: object) -> bool:
    if isinstance(value, _KEYED):
        return True
    return not isinstance(value, _LEAF) and bool(_field_names(type(value)))


_fields_cache: dict[type, tuple[tuple[str, str], ...]] = {}


def _field_names(cls: type) -> tuple[tuple[str, str], ...]:
    """A struct's, dataclass's or attrs class's fields: (attribute, name in JSON); none for
    other types."""
    names = _fields_cache.get(cls)
    if names is None:
        if issubclass(cls, msgspec.Struct):
            names = tuple((f.name, f.encode_name) for f in msgspec.structs.fields(cls))
        elif dataclasses.is_dataclass(cls):
            names = tuple((f.name, f.name) for f in dataclasses.fields(cls))
        else:
            attributes = getattr(cls, "__attrs_attrs__", None)
            names = (tuple((a.name, a.name) for a in attributes)
                     if isinstance(attributes, tuple) else ())
        _fields_cache[cls] = names
    return names


_MAPPING_KINDS = (msgspec.inspect.DictType, msgspec.inspect.AnyType, msgspec.inspect.CustomType)


@functools.cache
def _may_hold_mappings(cls: type[Event]) -> bool:
    """Whether a mapping can be anywhere in the type's values (a dict or Any field, nested
    structs, dataclasses and containers included): if not, no key needs checking."""
    try:
        return _reaches(msgspec.inspect.type_info(cls), _MAPPING_KINDS, set())
    except Exception:  # a type msgspec cannot describe: check its values
        return True


def _check_finite(value: object, encoded: bytes, what: str) -> None:
    """Refuse NaN and infinities, which msgspec's JSON writes as ``null``: stored, they would
    read back as ``None``, a value lost without a word.

    Only JSON holding a ``null`` can have one; then the value's msgpack (which keeps floats as
    they are) is searched for one, in C, and only a hit is looked for in Python, for its path.
    """
    if b"null" in encoded:
        check_finite(value, what)


def check_finite(value: object, what: str) -> None:
    """Raise :class:`InvalidEvent` when ``value`` holds a NaN or an infinity (for data that
    does not go through :func:`encode_event`'s check)."""
    try:
        if not _NON_FINITE_FLOAT.search(_msgpack.encode(value)):
            return
    except (TypeError, ValueError, OverflowError):  # an int past 64 bits: look in Python
        pass
    try:
        plain = msgspec.to_builtins(value, builtin_types=_LEAVES)
    except (TypeError, ValueError, OverflowError):  # a msgspec.Raw somewhere (JSON already)
        plain = _plain(value)
    path = _non_finite_path(plain)
    if path is not None:
        where = "".join(f"[{key!r}]" for key in path)
        raise InvalidEvent(f"{what}: the number at {where or 'the top'} is NaN or infinite, "
                           f"which JSON cannot hold (it would read back as None)")


_CONTAINERS = (float, dict, list, tuple)


def _plain(value: Any) -> Any:
    """``to_builtins`` for a value it refuses (one holding a ``msgspec.Raw``, which holds JSON
    and so no NaN): containers, structs, dataclasses and enums opened, ``Raw`` left out."""
    if isinstance(value, float | str | int | bytes | None):
        return value
    if isinstance(value, msgspec.Raw):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, msgspec.Struct):
        return {f: _plain(getattr(value, f)) for f in value.__struct_fields__}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    fields = getattr(type(value), "__attrs_attrs__", None)  # attrs classes
    if fields is not None:
        return {a.name: _plain(getattr(value, a.name)) for a in fields}
    return None


def _non_finite_path(value: Any) -> list[Any] | None:
    """Keys leading to the first NaN or infinity in plain data (``[]``: the value itself)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else []
    items: Any
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):  # to_builtins keeps tuples (and NamedTuples)
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(item, _CONTAINERS):
            found = _non_finite_path(item)
            if found is not None:
                return [key, *found]
    return None


def _check_type_name(name: str) -> None:
    """A type name is stored in a column of ``MAX_ID_LENGTH`` characters, as UTF-8 text."""
    if len(name) > MAX_ID_LENGTH:
        raise InvalidEvent(f"event type {name[:40]!r}... is {len(name)} characters long, the "
                           f"limit is {MAX_ID_LENGTH}")
    if "\x00" in name:
        raise InvalidEvent("an event type must not contain NUL characters")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidEvent("an event type must be valid Unicode text") from e


def encode_metadata(metadata: object) -> bytes | None:
    """Encode a metadata mapping (``None`` or empty stores nothing)."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidEvent(f"metadata must be a dict, got {type(metadata).__name__}")
    if not metadata:
        return None
    try:
        data = _encoder.encode(metadata)
    except (msgspec.EncodeError, TypeError, OverflowError, ValueError, RecursionError) as e:
        raise InvalidEvent(f"cannot encode metadata: {_why(e)}") from e
    _check_depth(data, "metadata")
    _check_keys(metadata, "metadata")
    _check_finite(metadata, data, "metadata")
    return data


def decode_metadata(raw: bytes | None) -> dict[str, Any]:
    # A fresh {} per event (an empty dict is not tracked by the garbage collector, and callers
    # may encode or change it like any dict).
    if raw is None:
        return {}
    try:
        return _dict_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
        # (Written by this code it decodes: metadata stored by an older release deeper than
        # the depth limit, read from deep in a program's stack, or changed in the database.)
        raise EventDecodeError(f"its metadata does not decode: {_why(e)}") from e


def decode_event(tag: str, schema_version: int, raw: bytes) -> Event | RawEvent:
    """Decode stored data: the registered type (upcast when older), else a :class:`RawEvent`."""
    cls = _registry.get(tag)
    try:
        if cls is None:
            # The data as stored, verbatim: that of a typed event includes its tag ("type"),
            # and a raw event's payload may hold a "type" of its own, which must not be lost.
            return RawEvent(type=tag, data=_dict_decoder.decode(raw),
                            schema_version=schema_version)
        current = cls.__event_schema_version__
        if schema_version == current:
            event: Event = _decoder_for(tag, cls).decode(raw)
            return event
        if schema_version > current:
            newer = EventDecodeError(
                f"{tag} event has schema version {schema_version}, newer than this code's "
                f"{current}: upgrade the code that reads it"
            )
            newer.newer_schema = True
            raise newer
        data = _upcast(tag, _dict_decoder.decode(raw), schema_version, current)
        data.pop("type", None)
        try:
            # str_keys: the keys of the stored JSON are strings, also those of an int-keyed
            # dict, which the JSON decoder would take for a current-schema event.
            upcasted: Event = msgspec.convert(data, cls, str_keys=True)
            return upcasted
        except msgspec.ValidationError:
            if not _has_raw_field(cls):
                raise
        # A msgspec.Raw field given as a value (say, the stored JSON the upcaster left as it
        # was): it is that value's JSON text, which only the JSON decoder gives.
        return _upcast_through_json(tag, schema_version, cls, data)
    except (msgspec.DecodeError, msgspec.ValidationError, LookupError, RecursionError) as e:
        raise EventDecodeError(f"cannot decode {tag} event (schema {schema_version}): "
                               f"{_why(e)}") from e


# Decimals as JSON numbers, so that they still fill float fields (and decimal ones) when read.
_upcast_encoder = msgspec.json.Encoder(decimal_format="number")


def _upcast_through_json(tag: str, schema_version: int, cls: type[Event],
                         data: dict[str, Any]) -> Event:
    what = f"{tag} event (schema {schema_version})"
    data["type"] = tag
    try:
        again = _upcast_encoder.encode(data)
        _check_finite(data, again, f"the upcast data of the {what}")
    except (TypeError, ValueError, OverflowError, InvalidEvent) as e:
        raise EventDecodeError(f"cannot decode {what}: the upcast data does not encode as "
                               f"JSON: {_why(e)}") from e
    upcasted: Event = _decoder_for(tag, cls).decode(again)
    return upcasted


@functools.cache
def _has_raw_field(cls: type[Event]) -> bool:
    """Whether a ``msgspec.Raw`` is anywhere in the type (nested structs, dataclasses and
    containers included)."""
    try:
        return _reaches(msgspec.inspect.type_info(cls), (msgspec.inspect.RawType,), set())
    except Exception:  # a type msgspec cannot describe: the JSON path, which takes anything
        return True


def _reaches(info: Any, kinds: tuple[type, ...], seen: set[int]) -> bool:
    """Whether a type msgspec describes as ``info`` is, or holds anywhere, one of ``kinds``."""
    if isinstance(info, kinds):
        return True
    if id(info) in seen:  # (a recursive type)
        return False
    seen.add(id(info))
    fields = getattr(info, "fields", None)
    if fields is not None:
        return any(_reaches(f.type, kinds, seen) for f in fields)
    # ("type": what an Annotated[..., msgspec.Meta(...)] wraps.)
    inner = [getattr(info, a, None) for a in ("item_type", "key_type", "value_type", "type")]
    inner += [*(getattr(info, "item_types", None) or ()), *(getattr(info, "types", None) or ())]
    return any(_reaches(t, kinds, seen) for t in inner if t is not None)


def decode_events(tags: Sequence[str], schema_versions: Sequence[int], raws: Sequence[bytes]
                  ) -> list[Event | RawEvent]:
    """:func:`decode_event` of many rows.

    Rows of one registered type at its current schema version (a stream's usual content) go
    through that type's decoder in one ``map``, without a registry lookup per row.
    """
    kinds = set(zip(tags, schema_versions, strict=True))
    if len(kinds) == 1:
        ((tag, sv),) = kinds
        cls = _registry.get(tag)
        if cls is not None and cls.__event_schema_version__ == sv:
            try:
                return list(map(_decoder_for(tag, cls).decode, raws))
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                pass  # the row-by-row decode below raises the typed EventDecodeError
    return [decode_event(tag, sv, raw)
            for tag, sv, raw in zip(tags, schema_versions, raws, strict=True)]


def dumps(value: Any) -> bytes:
    """JSON-encode a value with the shared encoder."""
    return _encoder.encode(value)


def loads(raw: bytes | str) -> Any:
    """JSON-decode with the shared decoder."""
    return _any_decoder.decode(raw)
