"""A store bound to one open transaction, and the helper that picks a transaction for a store.

Code written against the sync API (the projection engine, the facades' command layer) runs
unchanged inside ``AsyncEventStore.run_sync``: it is handed a :class:`BoundStore`, whose reads and
appends all use the transaction's connection, and :func:`transaction` then reuses that
connection instead of opening a new one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine

from ._backend import begin_read, begin_write
from ._core import (
    DEFAULT_TENANT,
    AppendPlan,
    BeforeCommit,
    ExpectedVersion,
    InlineHandler,
    Pager,
    StoreCore,
)
from .errors import InvalidArgument
from .events import ANY, AppendResult, Event, RawEvent, RecordedEvent

__all__ = ["BoundStore", "transaction"]


class BoundStore:
    """The sync store API on one connection that is already in a transaction (a write one,
    unless ``read_only``)."""

    def __init__(self, core: StoreCore, conn: Connection, *, nowait: bool = False,
                 read_only: bool = False) -> None:
        """``nowait``: the transaction can be run again from its start, so an inline handler
        raises ``RetryAppend`` instead of waiting for a busy lock (see ``_core.RetryAppend``).
        ``read_only``: a read transaction, where optional writes (a live fold's snapshot) are
        left out on SQLite (its read transaction cannot write once another has committed)."""
        self.core = core
        self.conn = conn
        self.nowait = nowait
        self.read_only = read_only
        # Appends made here, logged by log_appended once the transaction has committed.
        self.appended: list[tuple[AppendPlan, AppendResult]] = []

    def log_appended(self) -> None:
        """Log the appends made on this connection (``events_appended``, as the stores log
        theirs): call it after the transaction committed."""
        for plan, result in self.appended:
            StoreCore._log_appended(plan, result)
        self.appended.clear()

    def now(self) -> datetime:
        return self.core.now()

    @property
    def inline_handlers(self) -> tuple[InlineHandler, ...]:
        return self.core.inline_handlers

    def add_inline_handler(self, handler: InlineHandler) -> None:
        self.core.add_inline_handler(handler)

    @property
    def backend(self) -> str:
        return self.conn.dialect.name

    def append(self, stream_id: str, events: Sequence[Event | RawEvent], *,
               expected_version: ExpectedVersion = ANY, idempotency_key: str | None = None,
               tenant_id: str = DEFAULT_TENANT,
               metadata: dict[str, Any] | None = None) -> AppendResult:
        return self.append_with(stream_id, events, expected_version=expected_version,
                                idempotency_key=idempotency_key, tenant_id=tenant_id,
                                metadata=metadata)

    def append_with(self, stream_id: str, events: Sequence[Event | RawEvent], *,
                    expected_version: ExpectedVersion = ANY, idempotency_key: str | None = None,
                    tenant_id: str = DEFAULT_TENANT, metadata: dict[str, Any] | None = None,
                    before_commit: BeforeCommit | None = None) -> AppendResult:
        plan = self.core._plan_append(stream_id, events, expected_version, idempotency_key,
                                      tenant_id, metadata)
        result = self.core._append_locked(self.conn, plan, before_commit, nowait=self.nowait)
        self.appended.append((plan, result))
        return result

    def stream_version(self, stream_id: str, *, tenant_id: str = DEFAULT_TENANT) -> int:
        return self.core._stream_version_on(self.conn, stream_id, tenant_id)

    def last_position(self) -> int:
        return self.core._last_position_on(self.conn)

    def stats(self, *, tenant_id: str | None = None) -> dict[str, int]:
        return self.core._stats_on(self.conn, tenant_id)

    def read_stream(self, stream_id: str, *, tenant_id: str = DEFAULT_TENANT,
                    from_version: int = 1, to_version: int | None = None,
                    backwards: bool = False, limit: int | None = None
                    ) -> Iterator[RecordedEvent]:
        return self._paged(self.core._stream_pager(self.conn.dialect, stream_id, tenant_id,
                                                   from_version, to_version, backwards, limit))

    def read_all(self, *, from_position: int = 0, limit: int | None = None,
                 categories: Iterable[str] | None = None, types: Iterable[str] | None = None,
                 tenant_id: str | None = None) -> Iterator[RecordedEvent]:
        return self._paged(self.core._all_pager(self.conn.dialect, from_position, limit,
                                                categories, types, tenant_id))

    def read_page(self, conn: Connection, **kwargs: Any) -> list[RecordedEvent]:
        return self.core.read_page(conn, **kwargs)

    def _paged(self, pager: Pager) -> Iterator[RecordedEvent]:
        while (params := pager.next_params()) is not None:
            batch = self.core._fetch_on(self.conn, pager.query, params, partial=True)
            yield from batch
            if not pager.advance(batch, params["page"]):
                return


def transaction(store: Any, *, write: bool) -> contextlib.AbstractContextManager[Connection]:
    """A transaction for ``store``: its own when it is a :class:`BoundStore`, else a new one."""
    if isinstance(store, BoundStore):
        return contextlib.nullcontext(store.conn)
    engine = getattr(store, "engine", None)
    if not isinstance(engine, Engine):  # (an AsyncEventStore's is an AsyncEngine)
        raise InvalidArgument(
            f"this function takes an EventStore, not {type(store).__name__}; with an "
            "AsyncEventStore, run a read through `await projections.aio.run_read(store, fn, "
            "*args)`, or open an EventStore of the same URL")
    return begin_write(engine) if write else begin_read(engine)
