"""The command layer the facades share: read the state, decide, append with expected version.

A decision is a pure function of the current state; on a version conflict the state is read
again and the decision made again, so concurrent commands serialize on the stream's version (the
store's optimistic concurrency) instead of on locks.  A command that lost a few times decides
under the store's append lock (see :func:`_decide_locked`), so that it cannot lose for ever.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from eventstore import AppendResult, Event, EventStore, WrongExpectedVersion
from eventstore._backend import begin_write, lock_appends
from eventstore._bound import BoundStore, transaction
from eventstore._core import (
    RetryAppend,
    check_id,
    check_storable,
    deciding_again,
    wait_until_free,
)
from eventstore.errors import InvalidArgument

from ._engine import Projection, current

S = TypeVar("S")

Clock = Callable[[], datetime]

MAX_ATTEMPTS = 50


def decide(
    store: EventStore,
    projection: Projection[S],
    stream_id: str,
    *,
    tenant_id: str,
    decision: Callable[[S, int], Sequence[Event]],
    metadata: dict[str, Any] | None = None,
) -> tuple[S, int, AppendResult | None]:
    """Run ``decision(state, version)`` and append its events at that version, retrying.

    Returns the state and version the decision saw and the append's result (``None`` when the
    decision produced no events).  Errors the decision raises (domain refusals) pass through.
    """
    last: WrongExpectedVersion | None = None
    attempt = 0
    while attempt < MAX_ATTEMPTS:
        if attempt == OPTIMISTIC_ATTEMPTS and not isinstance(store, BoundStore):
            return _decide_locked(store, projection, stream_id, tenant_id=tenant_id,
                                  decision=decision, metadata=metadata)
        state, version = current(store, projection, stream_id, tenant_id=tenant_id)
        events = decision(state, version)
        if not events:
            return state, version, None
        try:
            with deciding_again():
                result = store.append(stream_id, list(events), expected_version=version,
                                      tenant_id=tenant_id, metadata=metadata)
        except WrongExpectedVersion as e:
            last = e
            attempt += 1
            continue
        except RetryAppend as busy:
            if isinstance(store, BoundStore):
                raise  # (an async twin's transaction: it runs the whole command again)
            # A projector holds the projection: the append rolled back; once it is free, the
            # command decides again, on the state and at the time it finds then (under the
            # append lock, queued for the projection, when it kept changing hands).
            if wait_until_free(busy, lambda: begin_write(store.engine), tenant=tenant_id,
                               stream=stream_id):
                return _decide_locked(store, projection, stream_id, tenant_id=tenant_id,
                                      decision=decision, metadata=metadata, queue=True)
            continue
        return state, version, result
    assert last is not None
    raise last


# Conflicts a command takes before it decides under the append lock.
OPTIMISTIC_ATTEMPTS = 3


def _decide_locked(store: EventStore, projection: Projection[S], stream_id: str, *,
                   tenant_id: str, decision: Callable[[S, int], Sequence[Event]],
                   metadata: dict[str, Any] | None, queue: bool = False
                   ) -> tuple[S, int, AppendResult | None]:
    """:func:`decide` in one write transaction that takes the store's append lock first, so
    nothing can be appended between the read and the append: it cannot conflict.

    Why: under contention on one stream, a command that kept losing could lose every time.
    An async twin retries inside its transaction, which keeps the append lock its first
    attempt took, so it always won the next round, and a sync command gave up after 50
    conflicts (``WrongExpectedVersion`` from a facade command).  Holding the lock from the
    read costs the other appenders that read and the decision, only for a command that already
    lost a few times.
    """
    writer = getattr(store, "_writer", None)
    while True:
        holding = writer.holding_appends() if writer is not None else contextlib.nullcontext()
        try:
            with holding, transaction(store, write=True) as conn:
                lock_appends(conn)
                bound = BoundStore(store, conn, nowait=not queue)
                state, version = current(bound, projection, stream_id,  # type: ignore[arg-type]
                                         tenant_id=tenant_id)
                events = decision(state, version)
                result = None
                if events:
                    result = bound.append(stream_id, list(events), expected_version=version,
                                          tenant_id=tenant_id, metadata=metadata)
        except RetryAppend as busy:
            # A projector holds the projection: wait for it without the append lock, and
            # decide again (see eventstore._core.RetryAppend).
            queue = wait_until_free(busy, lambda: begin_write(store.engine), tenant=tenant_id,
                                    stream=stream_id)
            continue
        bound.log_appended()
        return state, version, result


def fold_appended(store: EventStore, projection: Projection[S], stream_id: str, *,
                  tenant_id: str, state: S, version: int, result: AppendResult | None) -> S:
    """The state right after an append of ours: ``state`` (at ``version``) with the events
    that append wrote, read back by their versions.  Not the stream as it is by now: another
    writer's events after ours would make a command answer with their state."""
    if result is None:
        return state
    for ev in store.read_stream(stream_id, tenant_id=tenant_id, from_version=version + 1,
                                to_version=result.stream_version):
        state = projection.evolve(state, ev)
    return state


def decide_folded(store: EventStore, projection: Projection[S], stream_id: str, *,
                  tenant_id: str, decision: Callable[[S, int], Sequence[Event]]) -> S:
    """:func:`decide`, returning the state right after its own append (:func:`fold_appended`)."""
    state, version, result = decide(store, projection, stream_id, tenant_id=tenant_id,
                                    decision=decision)
    return fold_appended(store, projection, stream_id, tenant_id=tenant_id, state=state,
                         version=version, result=result)


def utc_clock(clock: Clock | None) -> Clock:
    """The facade's clock: the one given (tests inject one), else the real UTC time.

    A given clock's times come back in UTC, as every time the facades record and return; a
    clock that gives a naive time makes the command that asked raise :class:`InvalidArgument`.
    """
    if clock is None:
        return lambda: datetime.now(UTC)
    if not callable(clock):
        raise InvalidArgument(f"clock must be a callable returning a datetime, got {clock!r}")
    given = clock

    def now() -> datetime:
        return check_time(given(), "the clock's time")
    return now


# The longest lease, TTL or timeout taken: a century, so that now + it stays a datetime (and
# its microseconds an int64 sort key).
MAX_DURATION = timedelta(days=36_525)


def check_duration(value: object, what: str) -> timedelta:
    """A positive ``timedelta`` of at most :data:`MAX_DURATION`."""
    if not isinstance(value, timedelta):
        raise InvalidArgument(f"{what} must be a timedelta, got {value!r:.80}")
    if not timedelta(0) < value <= MAX_DURATION:
        raise InvalidArgument(f"{what} must be positive and at most {MAX_DURATION.days:,} days, "
                              f"got {value}")
    return value


def time_after(when: datetime, span: timedelta, what: str) -> datetime:
    """``when + span`` (a lease's or a time to live's end), or :class:`InvalidArgument` when
    that is past the last ``datetime`` (a clock near year 9999): refused before anything is
    written, not a bare ``OverflowError``."""
    try:
        return when + span
    except OverflowError:
        raise InvalidArgument(f"{what}: {when.isoformat()} plus {span} is past the last "
                              "datetime") from None


def check_time(when: datetime, what: str) -> datetime:
    if not isinstance(when, datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise InvalidArgument(f"{what} must be a timezone-aware datetime")
    try:
        return when.astimezone(UTC)
    except OverflowError:  # datetime.max at -05:00, datetime.min at +05:00
        raise InvalidArgument(f"{what} ({when.isoformat()}) is outside the datetimes of UTC"
                              ) from None


def check_text(value: object, what: str) -> str:
    """A facade's id: a non-empty string of at most 200 characters that both databases store
    (no NUL, which PostgreSQL's text refuses, and no lone surrogate)."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > 200:
        raise InvalidArgument(f"{what} is longer than 200 characters")
    return check_id(value, what, InvalidArgument)


def sweep_time(now: datetime | None, tenant_id: str | None, clock: Clock) -> datetime:
    """A sweep's arguments checked (``tenant_id`` None: every tenant): the time it sweeps at,
    ``now`` if given, else the facade's clock."""
    if tenant_id is not None:
        check_tenant(tenant_id)
    return check_time(now, "now") if now is not None else clock()


def check_message(value: object, what: str) -> str:
    """Free text (a reason, an error message): a non-empty string of any length both databases
    store (the event's size limit bounds it)."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty string, got {value!r:.80}")
    return check_storable(value, what, InvalidArgument)


def check_tenant(value: object) -> str:
    """A tenant id: the store's own limit (255 characters), since it is not part of a facade's
    stream id as the facades' own ids are."""
    return check_id(value, "tenant_id", InvalidArgument)


def composite_id(*parts: str) -> str:
    """An unambiguous stream id suffix from several ids (each length-prefixed)."""
    return ".".join(f"{len(p)}:{p}" for p in parts)
