"""The error tree of the store.

Every error the store raises on purpose is an :class:`EventStoreError`.  Driver errors are
translated into this tree in one place (:func:`eventstore._backend.translate`), with the driver's
exception kept as ``__cause__``.  Errors for bad input also derive from :class:`ValueError` and
:class:`TypeError`, so code that guards with the builtin classes keeps working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (for annotations only: this module imports nothing at run time)
    from .events import ExpectedState


class EventStoreError(Exception):
    """Base class of every error raised by the store."""


class InvalidArgument(EventStoreError, ValueError, TypeError):
    """An argument has the wrong type or value; nothing was written."""


class InvalidStreamId(InvalidArgument):
    """A stream id is empty, too long, or not a string."""


class InvalidEvent(InvalidArgument):
    """An event cannot be stored: not an event, not encodable, or an empty batch."""


class EventTooLarge(InvalidEvent):
    """An encoded event is larger than the store's size limit."""

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class WrongExpectedVersion(EventStoreError):
    """The stream's version is not the one the append expected; nothing was written."""

    def __init__(self, *, stream_id: str, tenant_id: str, expected: int | ExpectedState,
                 actual: int) -> None:
        super().__init__(
            f"expected version {_describe(expected)} for stream {stream_id} "
            f"(tenant {tenant_id}), stream is at {actual}"
        )
        self.stream_id = stream_id
        self.tenant_id = tenant_id
        self.expected = expected
        self.actual = actual


class IdempotencyKeyReused(EventStoreError):
    """An idempotency key was used before for another stream or for other events."""

    def __init__(self, *, key: str, tenant_id: str, stream_id: str, first_stream_id: str) -> None:
        where = (
            f"stream {first_stream_id}"
            if first_stream_id != stream_id
            else f"other events on stream {stream_id}"
        )
        super().__init__(
            f"idempotency key {key!r} (tenant {tenant_id}) was already used for {where}"
        )
        self.key = key
        self.tenant_id = tenant_id
        self.stream_id = stream_id
        self.first_stream_id = first_stream_id


class SchemaVersionMismatch(EventStoreError):
    """The database schema is older or newer than this code; the message names the fix."""


class EventDecodeError(EventStoreError):
    """A stored event could not be decoded into its registered type.

    Raised by a read of the log, it names the event: ``position``, ``type``, ``stream_id`` and
    ``tenant_id`` (``None`` where the decode had no row to name).
    """

    position: int | None = None
    type: str | None = None
    stream_id: str | None = None
    tenant_id: str | None = None
    # The event's schema version is newer than this code's: newer code reads it (a rolling
    # deploy), so it is this process that is out of date, not the event that is bad.
    newer_schema: bool = False

    @classmethod
    def at(cls, cause: EventDecodeError, *, position: int, type: str, stream_id: str,
           tenant_id: str) -> EventDecodeError:
        err = cls(f"event at position {position} (type {type}, stream {stream_id}, tenant "
                  f"{tenant_id}): {cause}")
        err.position, err.type, err.stream_id, err.tenant_id = (position, type, stream_id,
                                                                tenant_id)
        err.newer_schema = cause.newer_schema
        return err


class StoreClosed(EventStoreError):
    """The store was closed and cannot be used any more."""


class DatabaseError(EventStoreError):
    """The database failed in a way the store does not model; the driver error is the cause.

    ``transient`` is true when the same call may well succeed if tried again: the write lock
    held past the busy timeout, a lost or refused connection, a serialization failure or a
    deadlock, a server shutting down.  ``sqlstate``: PostgreSQL's code for the error, when it
    gave one.
    """

    transient: bool = False
    sqlstate: str | None = None


def error_text(e: BaseException) -> str:
    """``str(e)``, or a stand-in when the exception cannot be shown (its ``__str__`` raises):
    the store's messages about an application's exception must not fail on it."""
    try:
        return str(e)
    except Exception:
        return f"<{type(e).__name__}, whose message cannot be shown>"


def _describe(expected: object) -> str:
    name = getattr(expected, "name", None)
    return str(name) if isinstance(name, str) else str(expected)
