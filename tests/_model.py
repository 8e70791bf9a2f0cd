"""What the model tests share: the refusal a model predicts, what the README's limits let
through, and values compared with their exact types."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from datetime import datetime, time
from decimal import Decimal
from typing import Any


def is_text(value: Any) -> bool:
    """A string JSON can hold (no lone surrogate)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_id(value: Any, limit: int = 255) -> bool:
    """An id: non-empty text of at most ``limit`` characters, with no NUL."""
    return is_text(value) and 0 < len(value) <= limit and "\x00" not in value


class Refused(Exception):
    """What a model expects a refused call to raise: the error type and, where the error has
    one, its ``reason``."""

    def __init__(self, kind: type[Exception], reason: str | None = None) -> None:
        super().__init__(kind.__name__, reason)
        self.kind = kind
        self.reason = reason



def canon(value: Any, more: Callable[[Any], Any] | None = None) -> Any:
    """A value compared with its exact types (NaN equal to NaN, a decimal by its digits, a
    time by its zone and offset as well as its instant).  ``more``: the canonical form of a
    type of the caller's own (None for any other value), applied at every level."""
    kind = type(value).__name__
    if isinstance(value, float):
        return (kind, "nan" if math.isnan(value) else repr(value))
    if isinstance(value, Decimal):
        return (kind, str(value))
    if isinstance(value, (datetime, time)):
        # The offset in the ISO form tells a fold that matters (a repeated hour) from one that
        # does not (Python finds the two equal).
        zone = value.tzinfo
        return (kind, value.isoformat(), type(zone).__name__, str(zone))
    if isinstance(value, (list, tuple)):
        return (kind, [canon(v, more) for v in value])
    if isinstance(value, (set, frozenset)):
        return (kind, sorted(repr(canon(v, more)) for v in value))
    if isinstance(value, dict):
        return (kind, sorted((repr(canon(k, more)), canon(v, more)) for k, v in value.items()))
    special = None if more is None else more(value)
    return (kind, value) if special is None else special


# Values of the types the facades store as a plain value (a float, str or int subclass), or
# cannot keep (an enum of neither str nor int).


class Score(float):
    """A float subclass, as numpy.float64 is."""


class Label(enum.StrEnum):
    SPAM = "spam"


class Level(enum.IntEnum):
    HIGH = 3


class Color(enum.Enum):
    """An enum of neither str nor int: type-keeping JSON has no plain value to keep."""

    RED = 1
