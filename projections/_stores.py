"""Which kind of store a facade takes: the sync facades an :class:`~eventstore.EventStore`, their
asyncio twins (and the async LangGraph saver) an :class:`~eventstore.aio.AsyncEventStore`.

Given the other kind, a facade would fail on first use with an error about coroutines (or
block an event loop); it refuses the store when it is built instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator
from typing import TypeVar

from eventstore.errors import InvalidArgument

T = TypeVar("T")

# Set while an asyncio twin builds the sync facade it runs inside the async store's transactions.
_in_twin: contextvars.ContextVar[bool] = contextvars.ContextVar("_in_twin", default=False)


def _is_async(store: object) -> bool:
    return inspect.iscoroutinefunction(getattr(store, "append", None))


def _check_store(store: object, facade: str, kind: str) -> None:
    if not callable(getattr(store, "append", None)):
        raise InvalidArgument(f"{facade} takes an {kind}, got {type(store).__name__}")


def check_sync_store(store: object, facade: str, twin: str) -> None:
    """Refuse an async store for the sync facade ``facade`` (``twin``: what to use instead)."""
    _check_store(store, facade, "EventStore")
    if _is_async(store) and not _in_twin.get():
        raise InvalidArgument(f"{facade} takes an EventStore, not {type(store).__name__} "
                              f"(for an AsyncEventStore: {twin})")


def check_async_store(store: object, facade: str, twin: str) -> None:
    """Refuse a sync store for the asyncio facade ``facade`` (``twin``: what to use instead)."""
    _check_store(store, facade, "AsyncEventStore")
    if not _is_async(store):
        raise InvalidArgument(f"{facade} takes an AsyncEventStore, not "
                              f"{type(store).__name__} (for an EventStore: {twin})")


def built_for_twin(build: Callable[[], T]) -> T:
    """``build()`` a sync facade on an async store, for the twin that runs it."""
    with _twin_building():
        return build()


@contextlib.contextmanager
def _twin_building() -> Iterator[None]:
    token = _in_twin.set(True)
    try:
        yield
    finally:
        _in_twin.reset(token)
