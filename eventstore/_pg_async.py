"""psycopg's async connection, seen by the store's sync code as a sync one (PostgreSQL only).

``AsyncEventStore`` runs the sync store's transaction code on SQLAlchemy's greenlet bridge.
There, SQLAlchemy's adapted cursor awaits each statement and fetches its rows at once, so every
statement is a round trip of its own, and the sync store's pipelines (several statements, one
round trip; see ``_core.StoreCore._append_locked``) cannot form.  Inside the bridge a coroutine
can be awaited from sync code (``await_only``), so this module wraps the driver's
``psycopg.AsyncConnection`` in the few sync methods the store uses on a psycopg connection
(``pipeline``, ``cursor``, ``execute``, ``rollback``, ``close``, and the state it reads), and
the same code pipelines on both stores.

Only usable inside ``AsyncConnection.run_sync`` (``await_only`` needs the bridge's greenlet),
which is where the store's transaction code runs.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

from sqlalchemy.util.concurrency import await_only

_facades: weakref.WeakKeyDictionary[Any, SyncOverAsync] = weakref.WeakKeyDictionary()


def facade_of(aconn: Any) -> SyncOverAsync:
    """The one facade of a ``psycopg.AsyncConnection`` (one object per connection: the store
    recognises the connection it learned facts on by identity, see ``_core._Tail``)."""
    facade = _facades.get(aconn)
    if facade is None:
        facade = _facades[aconn] = SyncOverAsync(aconn)
    return facade


def is_async_psycopg(dbapi: Any) -> bool:
    """Whether ``dbapi`` is SQLAlchemy's adapter over ``psycopg.AsyncConnection``."""
    return type(dbapi).__name__ == "AsyncAdapt_psycopg_connection"


class SyncOverAsync:
    """The sync psycopg connection methods the store uses, over an async connection.

    It holds its connection weakly: the cache of facades is keyed weakly by the connection, and
    a strong reference back would keep every connection the pool ever opened alive.
    """

    __slots__ = ("__weakref__", "_ref")

    def __init__(self, aconn: Any) -> None:
        self._ref = weakref.ref(aconn)

    @property
    def _a(self) -> Any:
        aconn = self._ref()
        if aconn is None:  # only reachable through a stale reference to the facade
            raise RuntimeError("the psycopg connection behind this facade is gone")
        return aconn

    @property
    def autocommit(self) -> bool:
        return bool(self._a.autocommit)

    @property
    def pgconn(self) -> Any:
        return self._a.pgconn

    @property
    def closed(self) -> bool:
        return bool(self._a.closed)

    @property
    def broken(self) -> bool:
        return bool(self._a.broken)

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[Any]:
        manager = self._a.pipeline()
        pipeline = await_only(manager.__aenter__())
        try:
            yield pipeline
        except BaseException as e:
            if not await_only(manager.__aexit__(type(e), e, e.__traceback__)):
                raise
        else:
            await_only(manager.__aexit__(None, None, None))

    def cursor(self) -> SyncCursor:
        return SyncCursor(self._a.cursor())

    def execute(self, query: str, params: Any = None, *, prepare: bool | None = None
                ) -> SyncCursor:
        return SyncCursor(await_only(self._a.execute(query, params, prepare=prepare)))

    def rollback(self) -> None:
        await_only(self._a.rollback())

    def commit(self) -> None:
        await_only(self._a.commit())

    def close(self) -> None:
        await_only(self._a.close())


class SyncCursor:
    """A ``psycopg.AsyncCursor`` with sync methods (see :class:`SyncOverAsync`)."""

    __slots__ = ("_c",)

    def __init__(self, acur: Any) -> None:
        self._c = acur

    @property
    def description(self) -> Any:
        return self._c.description

    @property
    def rowcount(self) -> int:
        return int(self._c.rowcount)

    def execute(self, query: str, params: Any = None, **kwargs: Any) -> SyncCursor:
        await_only(self._c.execute(query, params, **kwargs))
        return self

    def executemany(self, query: str, params_seq: Any) -> None:
        await_only(self._c.executemany(query, params_seq))

    def fetchone(self) -> Any:
        return await_only(self._c.fetchone())

    def fetchall(self) -> list[Any]:
        return list(await_only(self._c.fetchall()))

    def fetchmany(self, size: int = 0) -> list[Any]:
        return list(await_only(self._c.fetchmany(size)))

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())

    def close(self) -> None:
        await_only(self._c.close())
