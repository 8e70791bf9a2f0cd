"""JSON that keeps Python types: datetimes, dates, times, UUIDs, decimals, sets, tuples, bytes,
and strings holding lone surrogates (which UTF-8, and so the store's JSON, cannot hold).

Flow state is arbitrary Python data; plain JSON would turn a ``set`` into a list and a
``datetime`` into a string.  Values JSON cannot hold are written as ``{"$type": name, "value":
…}``; a dict whose keys are not all strings, or that itself has a ``$type`` key, is written as
``{"$type": "dict", "value": [[key, value], …]}``, so decoding never misreads user data.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import uuid
import zoneinfo
from typing import Any

from eventstore.codec import MAX_NESTING
from eventstore.errors import EventDecodeError, InvalidArgument, InvalidEvent, error_text

__all__ = ["check_typed", "from_json", "to_json"]

_TAG = "$type"


def to_json(value: Any) -> Any:
    """A JSON-compatible form of ``value`` that :func:`from_json` turns back into it.

    Raises :class:`InvalidArgument` for a value of a type it cannot keep, and
    :class:`InvalidEvent` for one nested deeper than the store takes (or holding itself).
    """
    try:
        return _to_json(value, 0)
    except RecursionError as e:  # called with little stack left: the limit was not reached
        raise InvalidEvent("flow state is nested too deeply for the stack it is saved "
                           "from") from e


def _to_json(value: Any, depth: int) -> Any:
    kind = type(value)
    if value is None or kind is bool or kind is int:
        return value
    if kind is str:
        return value if _utf8(value) else _surrogates(value)
    # A subclass (numpy.float64, an IntEnum, a str enum) is stored as its plain value, as JSON
    # would hold it: the store's encoder refuses the subclass itself.
    # (The base type's own conversion: a subclass's override is not asked.)
    if kind is not float:
        if isinstance(value, int):
            return int.__int__(value)
        if isinstance(value, str):
            plain = str.__str__(value)
            return plain if _utf8(plain) else _surrogates(plain)
        if isinstance(value, float):
            value = float.__float__(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return {_TAG: "float", "value": repr(value)}
        return value
    if depth >= MAX_NESTING:
        raise InvalidEvent(f"flow state is nested deeper than {MAX_NESTING} levels (or holds "
                           "itself)")
    depth += 1
    if isinstance(value, dict):
        if all(isinstance(k, str) and _utf8(k) for k in value) and _TAG not in value:
            return {k: _to_json(v, depth) for k, v in value.items()}
        return {_TAG: "dict", "value": [[_to_json(k, depth), _to_json(v, depth)]
                                        for k, v in value.items()]}
    if isinstance(value, list):
        return [_to_json(v, depth) for v in value]
    if isinstance(value, tuple):
        return {_TAG: "tuple", "value": [_to_json(v, depth) for v in value]}
    if isinstance(value, (set, frozenset)):
        name = "set" if isinstance(value, set) else "frozenset"
        # Sorted so that equal sets store equal JSON (and idempotency fingerprints match).
        return {_TAG: name, "value": sorted((_to_json(v, depth) for v in value), key=repr)}
    if isinstance(value, dt.datetime):
        zone = value.tzinfo
        if isinstance(zone, zoneinfo.ZoneInfo) and zone.key:
            # The zone too, not only the offset: a time in a repeated hour (a DST change)
            # compares equal only to a time of the same zone.
            return {_TAG: "datetime", "value": value.isoformat(), "zone": zone.key}
        return {_TAG: "datetime", "value": value.isoformat()}
    if isinstance(value, dt.date):
        return {_TAG: "date", "value": value.isoformat()}
    if isinstance(value, dt.time):
        return {_TAG: "time", "value": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {_TAG: "timedelta", "value": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, uuid.UUID):
        return {_TAG: "uuid", "value": str(value)}
    if isinstance(value, decimal.Decimal):
        return {_TAG: "decimal", "value": str(value)}
    if isinstance(value, (bytes, bytearray)):
        return {_TAG: "bytes", "value": base64.b64encode(bytes(value)).decode()}
    dump = getattr(value, "model_dump", None)  # pydantic models (CrewAI flow state)
    if callable(dump):
        return _to_json(dump(), depth)
    raise InvalidArgument(f"cannot store a value of type {type(value).__name__} in flow state")


def _utf8(text: str) -> bool:
    """Whether UTF-8 holds ``text``: not if it has a lone surrogate (say, a file name that
    ``os.fsdecode`` read with ``surrogateescape``, or ``json.loads`` of a cut ``"\\ud83d"``)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _surrogates(text: str) -> dict[str, str]:
    # UTF-8 with the lone surrogates as three bytes each ("surrogatepass"), which only
    # decoding with the same handler reads back: in base64, as bytes are.
    encoded = base64.b64encode(text.encode("utf-8", "surrogatepass")).decode()
    return {_TAG: "str", "value": encoded}


def from_json(value: Any) -> Any:
    """Undo :func:`to_json`.

    Raises :class:`EventDecodeError` for a ``$type`` value :func:`to_json` would not have written
    (an unknown type, a missing or malformed value): say, an event appended as raw JSON.
    """
    try:
        return _from_json(value)
    except Exception as e:  # (what a malformed value raises is up to the type's constructor)
        raise EventDecodeError(f"a malformed typed value in flow state: {type(e).__name__}: "
                               f"{error_text(e)[:200]}") from None


def check_typed(value: Any, what: str) -> None:
    """``InvalidEvent`` unless :func:`from_json` reads ``value``: the flow events check what
    they hold when appended (``__check_appended__``), so one appended as raw JSON is refused,
    not stored."""
    try:
        _from_json(value)
    except Exception as e:
        raise InvalidEvent(f"{what} holds a malformed typed value: {type(e).__name__}: "
                           f"{error_text(e)[:200]}") from None


def _in_zone(when: dt.datetime, zone: str) -> dt.datetime:
    """``when`` (a wall time and its offset) as the time of ``zone`` it was saved as.

    The wall time in the zone, with the fold whose offset is the saved one: so a wall time the
    zone skips (02:30 on the night clocks go forward, which Python allows) comes back as
    itself, and one of a repeated hour with its fold.  Times of one zone compare by wall time,
    so the instant alone (``astimezone``: 03:30 for that skipped 02:30) would not be equal."""
    try:
        tz = zoneinfo.ZoneInfo(zone)
        for fold in (0, 1):
            local = when.replace(tzinfo=tz, fold=fold)
            if local.utcoffset() == when.utcoffset():
                return local
        # The zone's rules no longer give that offset at that wall time (the time zone
        # database changed since): the same instant in the zone.
        return when.astimezone(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OverflowError, OSError):
        # A zone this machine does not know, or a time at the edge of the datetime range
        # (datetime.max in a zone west of UTC): the same instant, at its offset.
        return when


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(_TAG)
    if kind is None:
        return {k: _from_json(v) for k, v in value.items()}
    raw = value["value"]
    if kind == "dict":
        return {_from_json(k): _from_json(v) for k, v in raw}
    if kind == "tuple":
        return tuple(_from_json(v) for v in raw)
    if kind == "set":
        return {_from_json(v) for v in raw}
    if kind == "frozenset":
        return frozenset(_from_json(v) for v in raw)
    if kind == "float":
        return float(raw)
    if kind == "datetime":
        when = dt.datetime.fromisoformat(raw)
        zone = value.get("zone")
        if isinstance(zone, str):
            return _in_zone(when, zone)
        return when
    if kind == "date":
        return dt.date.fromisoformat(raw)
    if kind == "time":
        return dt.time.fromisoformat(raw)
    if kind == "timedelta":
        return dt.timedelta(days=raw[0], seconds=raw[1], microseconds=raw[2])
    if kind == "uuid":
        return uuid.UUID(raw)
    if kind == "decimal":
        return decimal.Decimal(raw)
    if kind == "bytes":
        return base64.b64decode(raw)
    if kind == "str":
        return base64.b64decode(raw).decode("utf-8", "surrogatepass")
    raise InvalidArgument(f"unknown stored value type {kind!r}")

