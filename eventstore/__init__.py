"""eventstore: an event-sourced state store for AI-agent and workflow engines."""

from .errors import (
    EventStoreError,
    EventTooLarge,
    IdempotencyKeyReused,
    InvalidArgument,
    InvalidEvent,
    InvalidStreamId,
    SchemaVersionMismatch,
    WrongExpectedVersion,
)
from .events import (
    ANY,
    STREAM_EXISTS,
    AppendResult,
    Event,
    RawEvent,
    RecordedEvent,
    event_type,
    upcaster,
)
from .store import EventStore

__all__ = [
    "ANY",
    "STREAM_EXISTS",
    "AppendResult",
    "Event",
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
    "WrongExpectedVersion",
    "event_type",
    "upcaster",
]
