"""The store facade: append, read_stream, read_all, stream_version, subscribe."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.engine import URL

from . import _migrate
from ._backend import (
    begin_read,
    begin_write,
    create_store_engine,
    is_sqlite,
    lock_appends,
    resolve_url,
)
from ._schema import MAX_ID_LENGTH, events, streams
from ._sql import Compiled, as_uuid, read_query, statement, uuid_param
from ._time import from_micros, to_micros
from .codec import decode_event, decode_metadata, encode_event, encode_metadata
from .errors import (
    IdempotencyKeyReused,
    InvalidArgument,
    InvalidEvent,
    InvalidStreamId,
    StoreClosed,
    WrongExpectedVersion,
)
from .events import ANY, STREAM_EXISTS, AppendResult, Event, ExpectedState, RawEvent, RecordedEvent

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "EventStore", "InlineHandler"]

_log = structlog.get_logger("eventstore")

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
DEFAULT_TENANT = "default"
_PAGE = 2000
_NO_END = 2**62

ExpectedVersion = int | ExpectedState | None


class InlineHandler(Protocol):
    """Called inside an append's transaction with the events it is about to commit.

    Raising aborts the append: the events and every row the handler wrote roll back together.
    """

    def __call__(self, conn: Connection, recorded: Sequence[RecordedEvent]) -> None: ...


def _check_id(value: object, what: str, error: type[InvalidArgument]) -> str:
    if not isinstance(value, str):
        raise error(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise error(f"{what} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise error(f"{what} is {len(value)} characters long, the limit is {MAX_ID_LENGTH}")
    if "\x00" in value:
        raise error(f"{what} must not contain NUL characters")
    return value


def _check_int(value: object, what: str, *, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{what} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise InvalidArgument(f"{what} must be >= {minimum}, got {value}")
    return value


def _check_limit(limit: object) -> int | None:
    return None if limit is None else _check_int(limit, "limit", minimum=0)


def _check_names(values: object, what: str) -> tuple[str, ...] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = (values,)
    if not isinstance(values, Iterable):
        raise InvalidArgument(f"{what} must be a list of strings")
    out = tuple(values)
    for v in out:
        if not isinstance(v, str) or not v:
            raise InvalidArgument(f"{what} must be non-empty strings, got {v!r}")
    return out


def category_of(stream_id: str) -> str:
    """The category of a stream id: the part before the first ``-`` (the whole id without one)."""
    return stream_id.split("-", 1)[0]


class EventStore:
    """An append-only event log on SQLite or PostgreSQL.

    Open one with :meth:`open`; it is safe to share between threads.  Every method that takes a
    stream also takes ``tenant_id`` (default ``"default"``) and only ever sees that tenant's data.
    """

    def __init__(
        self,
        engine: Engine,
        url: URL,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        clock: Callable[[], datetime] | None = None,
        poll_interval: float = 0.2,
    ) -> None:
        self._engine = engine
        self._url = url
        self._max_event_bytes = max_event_bytes
        self._clock = clock
        self._poll_interval = poll_interval
        self._closed = False
        self._inline: list[InlineHandler] = []
        self._is_sqlite = is_sqlite(url)
        self._log = _log.bind(backend=engine.dialect.name)

    # -- opening and closing -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        url: str | URL | None = None,
        *,
        max_event_bytes: int | None = None,
        migrate: bool | None = None,
        clock: Callable[[], datetime] | None = None,
        poll_interval: float | None = None,
        pool_size: int | None = None,
    ) -> EventStore:
        """Open a store.

        ``url`` defaults to ``EVENTSTORE_URL``, else ``sqlite:///./eventstore.db``.  SQLite URLs
        take ``?synchronous=NORMAL`` (default ``FULL``: durable across power loss) and
        ``?busy_timeout=<ms>``.  ``migrate`` defaults to ``EVENTSTORE_AUTO_MIGRATE``, else to true
        on SQLite and false on PostgreSQL, where ``eventstore migrate --url …`` is an operator's
        step.  ``max_event_bytes`` (default ``EVENTSTORE_MAX_EVENT_BYTES``, else 1 MiB) bounds one
        encoded event.  ``clock`` returns the UTC time stamped on appended events.
        """
        resolved = resolve_url(url)
        limit = max_event_bytes
        if limit is None:
            env = os.environ.get("EVENTSTORE_MAX_EVENT_BYTES")
            limit = int(env) if env else DEFAULT_MAX_EVENT_BYTES
        _check_int(limit, "max_event_bytes", minimum=1)
        if migrate is None:
            env = os.environ.get("EVENTSTORE_AUTO_MIGRATE")
            migrate = env.lower() in ("1", "true", "yes") if env else is_sqlite(resolved)
        if poll_interval is None:
            poll_interval = float(os.environ.get("EVENTSTORE_POLL_INTERVAL", "0.2"))
        if not 0 < poll_interval <= 0.5:
            raise InvalidArgument("poll_interval must be in (0, 0.5] seconds")
        engine = create_store_engine(resolved, pool_size=pool_size)
        try:
            if migrate:
                _migrate.migrate(engine)
            else:
                _migrate.check(engine, resolved)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, resolved, max_event_bytes=limit, clock=clock,
                   poll_interval=poll_interval)

    def close(self) -> None:
        """Release every connection; later calls raise :class:`StoreClosed`."""
        if not self._closed:
            self._closed = True
            self._engine.dispose()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for projections that keep tables beside the log)."""
        self._check_open()
        return self._engine

    @property
    def url(self) -> URL:
        return self._url

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._engine.dialect.name

    def now(self) -> datetime:
        """The store's clock (UTC)."""
        return self._clock() if self._clock is not None else datetime.now(UTC)

    def add_inline_handler(self, handler: InlineHandler) -> None:
        """Run ``handler`` inside every append's transaction (read-your-writes projections)."""
        if handler not in self._inline:
            self._inline.append(handler)

    def remove_inline_handler(self, handler: InlineHandler) -> None:
        if handler in self._inline:
            self._inline.remove(handler)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the event store is closed")

    # -- appending -----------------------------------------------------------------------

    def append(
        self,
        stream_id: str,
        events: Sequence[Event | RawEvent],
        *,
        expected_version: ExpectedVersion = ANY,
        idempotency_key: str | None = None,
        tenant_id: str = DEFAULT_TENANT,
        metadata: dict[str, Any] | None = None,
    ) -> AppendResult:
        """Append ``events`` to a stream as one atomic batch.

        ``expected_version``: an int (the stream must hold exactly that many events; 0 = must not
        exist), :data:`STREAM_EXISTS`, or :data:`ANY` / ``None`` (no check).  An
        ``idempotency_key`` already used by this tenant returns the first append's result with
        ``duplicate=True`` and writes nothing; reused for another stream or other events it raises
        :class:`IdempotencyKeyReused`.
        """
        return self.append_with(stream_id, events, expected_version=expected_version,
                                idempotency_key=idempotency_key, tenant_id=tenant_id,
                                metadata=metadata)

    def append_with(
        self,
        stream_id: str,
        events: Sequence[Event | RawEvent],
        *,
        expected_version: ExpectedVersion = ANY,
        idempotency_key: str | None = None,
        tenant_id: str = DEFAULT_TENANT,
        metadata: dict[str, Any] | None = None,
        before_commit: Callable[[Connection, Sequence[RecordedEvent]], None] | None = None,
    ) -> AppendResult:
        """:meth:`append`, calling ``before_commit`` in the append's transaction.

        For command layers that must write their own rows atomically with the events.
        """
        self._check_open()
        _check_id(stream_id, "stream id", InvalidStreamId)
        _check_id(tenant_id, "tenant id", InvalidArgument)
        if idempotency_key is not None:
            _check_id(idempotency_key, "idempotency key", InvalidArgument)
        if expected_version is None:
            expected_version = ANY
        elif not isinstance(expected_version, ExpectedState):
            _check_int(expected_version, "expected_version", minimum=0)
        if isinstance(events, (Event, RawEvent)):
            events = [events]
        if not isinstance(events, Sequence) or isinstance(events, (str, bytes)):
            raise InvalidEvent("events must be a list of Event instances")
        if not events:
            raise InvalidEvent(f"empty batch for stream {stream_id}: append needs an event")
        meta_raw = encode_metadata(metadata)
        encoded = [encode_event(ev) for ev in events]
        limit = self._max_event_bytes
        for tag, _sv, raw in encoded:
            if len(raw) > limit:
                raise _too_large(tag, len(raw), limit)
        if meta_raw is not None and len(meta_raw) > limit:
            raise _too_large("metadata", len(meta_raw), limit)
        fingerprint = _fingerprint(stream_id, encoded) if idempotency_key is not None else b""
        now = self.now()
        with begin_write(self._engine) as conn:
            result = self._append_locked(
                conn, stream_id, tenant_id, events, encoded, meta_raw, metadata,
                expected_version, idempotency_key, fingerprint, now, before_commit,
            )
        return result

    def _append_locked(
        self,
        conn: Connection,
        stream_id: str,
        tenant_id: str,
        originals: Sequence[Event | RawEvent],
        encoded: list[tuple[str, int, bytes]],
        meta_raw: bytes | None,
        metadata: dict[str, Any] | None,
        expected: int | ExpectedState,
        key: str | None,
        fingerprint: bytes,
        now: datetime,
        before_commit: Callable[[Connection, Sequence[RecordedEvent]], None] | None,
    ) -> AppendResult:
        dialect = conn.dialect
        lock_appends(conn)
        ids = {"tenant_id": tenant_id, "stream_id": stream_id}
        # Idempotency first: a retried request must get its first answer back, not a version
        # conflict caused by its own earlier success.
        if key is not None:
            cur = statement("find_key", dialect).run(conn, {"tenant_id": tenant_id, "key": key})
            row = cur.fetchone()
            cur.close()
            if row is not None:
                first_stream, first_print, first_pos, last_pos, version = row
                if first_stream != stream_id or bytes(first_print) != fingerprint:
                    raise IdempotencyKeyReused(key=key, tenant_id=tenant_id, stream_id=stream_id,
                                               first_stream_id=first_stream)
                return AppendResult(first_pos, last_pos, version, True)
        cur = statement("probe", dialect).run(conn, ids)
        probed = cur.fetchone()
        cur.close()
        current: int = probed[0] or 0
        last_position: int = probed[1] or 0
        if expected is ANY:
            pass
        elif expected is STREAM_EXISTS:
            if current == 0:
                raise WrongExpectedVersion(stream_id=stream_id, tenant_id=tenant_id,
                                           expected=STREAM_EXISTS, actual=0)
        elif expected != current:
            raise WrongExpectedVersion(stream_id=stream_id, tenant_id=tenant_id,
                                       expected=expected, actual=current)
        stamp = to_micros(now)
        category = category_of(stream_id)
        rows = []
        recorded = []
        meta_value = metadata if metadata else {}
        dialect_name = dialect.name
        for i, (tag, schema_version, raw) in enumerate(encoded, start=1):
            event_id = uuid.uuid4()
            rows.append({
                "position": last_position + i, "tenant_id": tenant_id, "stream_id": stream_id,
                "category": category, "version": current + i,
                "event_id": uuid_param(event_id, dialect_name), "type": tag,
                "schema_version": schema_version, "data": raw, "metadata": meta_raw,
                "recorded_at": stamp,
            })
            recorded.append(RecordedEvent(
                last_position + i, stream_id, current + i, tenant_id, event_id, tag,
                schema_version, originals[i - 1], meta_value, now,
            ))
        insert = statement("insert_events", dialect)
        if len(rows) == 1:
            insert.run(conn, rows[0]).close()
        else:
            insert.run_many(conn, rows)
        new_version = current + len(rows)
        if current == 0:
            statement("insert_stream", dialect).run(conn, {
                **ids, "version": new_version, "created_at": stamp, "updated_at": stamp,
            }).close()
        else:
            statement("update_stream", dialect).run(conn, {
                **ids, "new_version": new_version, "updated_at": stamp,
            }).close()
        result = AppendResult(last_position + 1, last_position + len(rows), new_version, False)
        if key is not None:
            statement("insert_key", dialect).run(conn, {
                "tenant_id": tenant_id, "key": key, "stream_id": stream_id,
                "fingerprint": fingerprint, "first_position": result.first_position,
                "last_position": result.last_position, "stream_version": new_version,
                "recorded_at": stamp,
            }).close()
        for handler in self._inline:
            handler(conn, recorded)
        if before_commit is not None:
            before_commit(conn, recorded)
        return result

    # -- reading -------------------------------------------------------------------------

    def stream_version(self, stream_id: str, *, tenant_id: str = DEFAULT_TENANT) -> int:
        """The number of events in the stream; 0 when it does not exist."""
        self._check_open()
        _check_id(stream_id, "stream id", InvalidStreamId)
        _check_id(tenant_id, "tenant id", InvalidArgument)
        with begin_read(self._engine) as conn:
            v = conn.execute(
                select(streams.c.version)
                .where(streams.c.tenant_id == tenant_id, streams.c.stream_id == stream_id)
            ).scalar()
        return int(v or 0)

    def read_stream(
        self,
        stream_id: str,
        *,
        tenant_id: str = DEFAULT_TENANT,
        from_version: int = 1,
        to_version: int | None = None,
        backwards: bool = False,
        limit: int | None = None,
    ) -> Iterator[RecordedEvent]:
        """The stream's events with ``from_version <= version <= to_version``, in version order.

        With ``backwards=True`` the newest come first, starting at ``to_version`` (or the end) and
        going down to ``from_version``.  Arguments are checked when called, not when iterated.
        """
        self._check_open()
        _check_id(stream_id, "stream id", InvalidStreamId)
        _check_id(tenant_id, "tenant id", InvalidArgument)
        _check_int(from_version, "from_version", minimum=0)
        if to_version is not None:
            _check_int(to_version, "to_version", minimum=0)
        if not isinstance(backwards, bool):
            raise InvalidArgument("backwards must be a bool")
        lim = _check_limit(limit)
        if backwards and to_version is None:
            to_version = _NO_END  # backwards paging moves the upper bound down page by page
        query = read_query(self._engine.dialect, by_stream=True, backwards=backwards,
                           upper=to_version is not None, tenant=True, n_categories=0, n_types=0)
        params: dict[str, Any] = {"tenant_id": tenant_id, "stream_id": stream_id}
        return self._paged(query, params, "version", from_version, to_version, backwards, lim)

    def _paged(self, query: Compiled, params: dict[str, Any], key: str, lo: int,
               hi: int | None, backwards: bool, limit: int | None) -> Iterator[RecordedEvent]:
        """Read page after page, each in its own short transaction, until the range is done."""
        remaining = limit
        while remaining is None or remaining > 0:
            page = _PAGE if remaining is None else min(_PAGE, remaining)
            batch = self._fetch(query, {**params, "lo": lo, "hi": hi, "page": page})
            yield from batch
            if len(batch) < page:
                return
            if remaining is not None:
                remaining -= len(batch)
            last = getattr(batch[-1], key)
            if backwards:
                hi = last - 1
            else:
                lo = last + 1

    def read_all(
        self,
        *,
        from_position: int = 0,
        limit: int | None = None,
        categories: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        tenant_id: str | None = None,
    ) -> Iterator[RecordedEvent]:
        """Events of every stream in global position order, from ``from_position`` (inclusive).

        ``categories`` keeps streams named ``<category>-…``; ``types`` keeps those event types;
        ``tenant_id`` keeps one tenant's events (``None``: every tenant, for operators and
        projectors that serve all tenants).
        """
        self._check_open()
        lim = _check_limit(limit)
        query, params = self._all_query(from_position, categories, types, tenant_id)
        return self._paged(query, params, "position", from_position, None, False, lim)

    def _all_query(self, from_position: object, categories: object, types: object,
                   tenant_id: object) -> tuple[Compiled, dict[str, Any]]:
        _check_int(from_position, "from_position", minimum=0)
        cats = _check_names(categories, "categories") or ()
        kinds = _check_names(types, "types") or ()
        params: dict[str, Any] = {}
        if tenant_id is not None:
            params["tenant_id"] = _check_id(tenant_id, "tenant id", InvalidArgument)
        for i, c in enumerate(cats):
            params[f"cat{i}"] = c
        for i, t in enumerate(kinds):
            params[f"type{i}"] = t
        query = read_query(self._engine.dialect, by_stream=False, backwards=False, upper=False,
                           tenant=tenant_id is not None, n_categories=len(cats),
                           n_types=len(kinds))
        return query, params

    def _fetch(self, query: Compiled, params: dict[str, Any]) -> list[RecordedEvent]:
        self._check_open()
        with begin_read(self._engine) as conn:
            return self._fetch_on(conn, query, params)

    def read_page(
        self,
        conn: Connection,
        *,
        from_position: int,
        limit: int,
        categories: Iterable[str] | None = None,
        tenant_id: str | None = None,
        stream_id: str | None = None,
        to_version: int | None = None,
    ) -> list[RecordedEvent]:
        """One page of events read on ``conn``, inside the caller's transaction.

        For projectors, which must read events and write their rows and checkpoint in one
        transaction.  With ``stream_id`` (and ``tenant_id``) it reads that stream by version from
        ``from_position`` taken as a version; otherwise the log by position.
        """
        if stream_id is not None:
            query = read_query(conn.dialect, by_stream=True, backwards=False,
                               upper=to_version is not None, tenant=True, n_categories=0,
                               n_types=0)
            params: dict[str, Any] = {"tenant_id": tenant_id or DEFAULT_TENANT,
                                      "stream_id": stream_id, "hi": to_version}
        else:
            query, params = self._all_query(from_position, categories, None, tenant_id)
        return self._fetch_on(conn, query, {**params, "lo": from_position, "page": limit})

    def _fetch_on(self, conn: Connection, query: Compiled, params: dict[str, Any]
                  ) -> list[RecordedEvent]:
        cur = query.run(conn, params)
        rows = cur.fetchall()
        cur.close()
        return [
            RecordedEvent(
                pos, stream_id, version, tenant, as_uuid(event_id), tag, sv,
                decode_event(tag, sv, data), decode_metadata(meta),
                from_micros(at),
            )
            for (pos, tenant, stream_id, _cat, version, event_id, tag, sv, data, meta, at)
            in rows
        ]

    def last_position(self) -> int:
        """The highest committed position (0 for an empty store)."""
        self._check_open()
        with begin_read(self._engine) as conn:
            return int(conn.execute(select(func.max(events.c.position))).scalar() or 0)

    def subscribe(
        self,
        *,
        from_position: int = 0,
        categories: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        tenant_id: str | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[RecordedEvent]:
        """Every event from ``from_position`` on, waiting for new ones until ``stop`` is set.

        Catches up from the log, then polls for new events (every ``poll_interval`` seconds, at
        most 0.5 s), so a set ``stop`` ends the iteration within that time.  Events come exactly
        once and in position order: positions are assigned in commit order (see
        ``_backend.lock_appends``), so no event can appear later below a position already seen.
        """
        self._check_open()
        query, params = self._all_query(from_position, categories, types, tenant_id)
        if stop is not None and not isinstance(stop, threading.Event):
            raise InvalidArgument("stop must be a threading.Event")
        return self._follow(query, params, from_position, stop or threading.Event())

    def _follow(self, query: Compiled, params: dict[str, Any], start: int,
                stop: threading.Event) -> Iterator[RecordedEvent]:
        while not stop.is_set():
            batch = self._fetch(query, {**params, "lo": start, "page": _PAGE})
            for ev in batch:
                yield ev
                if stop.is_set():
                    return
            if batch:
                start = batch[-1].position + 1
            if len(batch) < _PAGE:
                stop.wait(self._poll_interval)

    def stats(self, *, tenant_id: str | None = None) -> dict[str, int]:
        """Counts of events, streams and tenants, and the last position."""
        self._check_open()
        ev_q = select(func.count(), func.max(events.c.position))
        st_q = select(func.count(), func.count(streams.c.tenant_id.distinct()))
        if tenant_id is not None:
            _check_id(tenant_id, "tenant id", InvalidArgument)
            ev_q = ev_q.where(events.c.tenant_id == tenant_id)
            st_q = st_q.where(streams.c.tenant_id == tenant_id)
        with begin_read(self._engine) as conn:
            count, last = conn.execute(ev_q.select_from(events)).one()
            n_streams, n_tenants = conn.execute(st_q.select_from(streams)).one()
        return {"events": int(count), "streams": int(n_streams), "tenants": int(n_tenants),
                "last_position": int(last or 0)}

    def __repr__(self) -> str:
        return f"EventStore({self._url.render_as_string(hide_password=True)!r})"


def _too_large(what: str, size: int, limit: int) -> InvalidEvent:
    from .errors import EventTooLarge

    return EventTooLarge(f"{what} is {size} bytes encoded, over the limit of {limit} bytes",
                         size=size, limit=limit)


def _fingerprint(stream_id: str, encoded: list[tuple[str, int, bytes]]) -> bytes:
    h = hashlib.sha256(stream_id.encode())
    for tag, sv, raw in encoded:
        h.update(b"\x00%s\x00%d\x00%d\x00" % (tag.encode(), sv, len(raw)))
        h.update(raw)
    return h.digest()

