"""UTC times as integer microseconds since the Unix epoch (how the store keeps them)."""

from __future__ import annotations

from datetime import UTC, datetime

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


def from_micros(us: int) -> datetime:
    """The UTC datetime of microseconds since the epoch."""
    return datetime.fromtimestamp(us / 1_000_000, UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)
