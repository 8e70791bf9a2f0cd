"""eventstore: an event-sourced state store for AI-agent and workflow engines."""

from typing import TYPE_CHECKING

from .errors import (
    DatabaseError,
    EventDecodeError,
    EventStoreError,
    EventTooLarge,
    IdempotencyKeyReused,
    InvalidArgument,
    InvalidEvent,
    InvalidStreamId,
    SchemaVersionMismatch,
    StoreClosed,
    WrongExpectedVersion,
)
from .events import (
    ANY,
    STREAM_EXISTS,
    AppendResult,
    Event,
    RawEvent,
    RecordedEvent,
    StreamSlice,
    event_type,
    upcaster,
)
from .store import EventStore

if TYPE_CHECKING:
    from .aio import AsyncEventStore


def __getattr__(name: str) -> object:
    # AsyncEventStore is imported on first use: it needs SQLAlchemy's asyncio extension
    # (greenlet), which sync-only installations do not have.
    if name == "AsyncEventStore":
        from .aio import AsyncEventStore

        return AsyncEventStore
    raise AttributeError(f"module 'eventstore' has no attribute {name!r}")

__all__ = [
    "ANY",
    "STREAM_EXISTS",
    "AppendResult",
    "AsyncEventStore",
    "DatabaseError",
    "Event",
    "EventDecodeError",
    "EventStore",
    "EventStoreError",
    "EventTooLarge",
    "IdempotencyKeyReused",
    "InvalidArgument",
    "InvalidEvent",
    "InvalidStreamId",
    "RawEvent",
    "RecordedEvent",
    "SchemaVersionMismatch",
    "StoreClosed",
    "StreamSlice",
    "WrongExpectedVersion",
    "event_type",
    "upcaster",
]
