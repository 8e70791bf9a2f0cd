"""The store facade: append, read_stream, read_all, stream_version, subscribe."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import URL

from . import _migrate
from ._backend import (
    Writer,
    begin_read,
    begin_write,
    create_store_engine,
    explained_open_error,
    is_sqlite,
    resolve_url,
    retire,
    shown_url,
    when_alone,
)
from ._core import (
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_TENANT,
    BeforeCommit,
    ExpectedVersion,
    InlineHandler,
    Options,
    Pager,
    PartialPage,
    StoreCore,
    auto_migrate,
    category_of,
    check_pool_size,
)
from ._sql import Compiled
from .errors import DatabaseError, InvalidArgument
from .events import ANY, AppendResult, Event, RawEvent, RecordedEvent
from .logs import get_logger

_log = get_logger("eventstore")

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "DEFAULT_TENANT", "EventStore", "InlineHandler",
           "category_of"]


class EventStore(StoreCore):
    """An append-only event log on SQLite or PostgreSQL.

    Open one with :meth:`open`; it is safe to share between threads.  Every method that takes a
    stream also takes ``tenant_id`` (default ``"default"``) and only ever sees that tenant's data.
    """

    _engine: Engine

    def __init__(
        self,
        engine: Engine,
        url: URL,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        clock: Callable[[], datetime] | None = None,
        poll_interval: float = 0.2,
    ) -> None:
        super().__init__(Options.resolve(max_event_bytes=max_event_bytes,
                                         poll_interval=poll_interval, clock=clock))
        self._engine = engine
        self._url = url
        self._writer = Writer(engine)
        # Dropped without close(): the connections go when the collector frees the store.  A
        # store sits in a reference cycle as soon as a facade's inline handler refers back to
        # it, and the kept write connection's own clean-up handed it back to the pool, which
        # then lived on for one more full collection, sessions and files open.
        self._dropped = weakref.finalize(self, _let_go, self._writer, engine)
        self._dropped.atexit = False  # (at exit the process's end closes them)

    # -- opening and closing ----------------------------------------------------------------------

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
        options = Options.resolve(max_event_bytes=max_event_bytes, poll_interval=poll_interval,
                                  clock=clock)
        migrating = auto_migrate(migrate, is_sqlite(resolved))
        if not migrating:
            _migrate.check_file(resolved)
        engine = create_store_engine(resolved, pool_size=check_pool_size(pool_size))
        try:
            if migrating:
                _migrate.migrate(engine)
            else:
                _migrate.check(engine, resolved)
        except DatabaseError as e:
            engine.dispose()
            explained = explained_open_error(resolved, e)
            if explained is e:
                raise
            raise explained from e
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, resolved, max_event_bytes=options.max_event_bytes, clock=clock,
                   poll_interval=options.poll_interval)

    def close(self) -> None:
        """Release every connection; later calls raise :class:`StoreClosed`."""
        if not self._closed:
            self._closed = True
            self._dropped.detach()
            retire(self._engine)
            # (An in-memory database: once no transaction uses its one connection.)
            when_alone(self._engine, self._release)

    def _release(self) -> None:
        self._writer.close()
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

    # -- appending --------------------------------------------------------------------------------

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
        before_commit: BeforeCommit | None = None,
    ) -> AppendResult:
        """:meth:`append`, calling ``before_commit(conn, recorded)`` in the append's transaction.

        For command layers that must write their own rows atomically with the events.
        """
        plan = self._plan_append(stream_id, events, expected_version, idempotency_key,
                                 tenant_id, metadata)
        result = self._append_own(self._writer.begin, plan, before_commit,
                                  lambda: begin_write(self._engine))
        self._log_appended(plan, result)
        return result

    # -- reading ----------------------------------------------------------------------------------

    def stream_version(self, stream_id: str, *, tenant_id: str = DEFAULT_TENANT) -> int:
        """The number of events in the stream; 0 when it does not exist."""
        self._check_open()
        with begin_read(self._engine) as conn:
            return self._stream_version_on(conn, stream_id, tenant_id)

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
        going down to ``from_version``.  Arguments are checked when called, not when iterated;
        each page is read in its own short transaction.
        """
        return self._paged(self._stream_pager(self._engine.dialect, stream_id, tenant_id,
                                              from_version, to_version, backwards, limit))

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
        return self._paged(self._all_pager(self._engine.dialect, from_position, limit,
                                           categories, types, tenant_id))

    def _paged(self, pager: Pager) -> Iterator[RecordedEvent]:
        while (params := pager.next_params()) is not None:
            batch = self._fetch(pager.query, params)
            yield from batch
            if not pager.advance(batch, params["page"]):
                return

    def _fetch(self, query: Compiled, params: dict[str, Any]) -> list[RecordedEvent]:
        self._check_open()
        with begin_read(self._engine) as conn:
            return self._fetch_on(conn, query, params, partial=True)

    def last_position(self) -> int:
        """The highest committed position (0 for an empty store)."""
        self._check_open()
        with begin_read(self._engine) as conn:
            return self._last_position_on(conn)

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
        A transient database error (:attr:`DatabaseError.transient`: a lost connection, a
        server restarting) is logged and the read retried after a pause growing to 5 s; any
        other is raised.
        """
        pager = self._all_pager(self._engine.dialect, from_position, None, categories, types,
                                tenant_id)
        if stop is not None and not isinstance(stop, threading.Event):
            raise InvalidArgument("stop must be a threading.Event")
        return self._follow(pager, stop or threading.Event())

    def _follow(self, pager: Pager, stop: threading.Event) -> Iterator[RecordedEvent]:
        pause = 0.0
        while not stop.is_set():
            params = {**pager.params, "lo": pager.lo, "page": pager.size}
            try:
                batch = self._fetch(pager.query, params)
            except DatabaseError as e:
                pause = self._retry_pause(e, pager, pause)
                stop.wait(pause)
                continue
            pause = 0.0
            for ev in batch:
                yield ev
                if stop.is_set():
                    return
            if batch:
                pager.lo = batch[-1].position + 1
            pager.resize(batch)
            if len(batch) < params["page"] and not isinstance(batch, PartialPage):
                stop.wait(self._options.poll_interval)

    def stats(self, *, tenant_id: str | None = None) -> dict[str, int]:
        """Counts of events, streams and tenants, and the last position."""
        self._check_open()
        with begin_read(self._engine) as conn:
            return self._stats_on(conn, tenant_id)

    def __repr__(self) -> str:
        return f"EventStore({shown_url(self._url)!r})"


def _let_go(writer: Writer, engine: Engine) -> None:
    """Close a store the collector freed unclosed (nothing can be using it any more)."""
    try:
        retire(engine)
        writer.close()
        engine.dispose()
    except Exception as e:  # (in the collector: nobody to raise to)
        _log.warning("store_release_failed", error=f"{type(e).__name__}: {e}")
