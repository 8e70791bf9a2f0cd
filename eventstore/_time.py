"""UTC times as integer microseconds since the Unix epoch (how the store keeps them)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from .errors import InvalidArgument

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(when: datetime) -> int:
    """Microseconds since the epoch of a timezone-aware datetime."""
    if not isinstance(when, datetime):
        raise InvalidArgument(f"expected a datetime, got {type(when).__name__}")
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidArgument("times must be timezone-aware (UTC)")
    delta = when - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


# Within this many microseconds of 1970 (about 142 years) a float of seconds is exact to the
# microsecond, and fromtimestamp twice as fast as the integer sum used beyond (it lost up to
# 15 us by year 9999).
_FLOAT_EXACT_US = 2**52


def from_micros(us: int) -> datetime:
    """The UTC datetime of microseconds since the epoch."""
    if -_FLOAT_EXACT_US < us < _FLOAT_EXACT_US:
        return datetime.fromtimestamp(us / 1_000_000, UTC)
    return EPOCH + timedelta(microseconds=us)


def utcnow() -> datetime:
    return datetime.now(UTC)
