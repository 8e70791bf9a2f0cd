"""A blocking face over AsyncEventStore, so the contract tests run against the async store.

Every call runs on one event loop in a background thread; threads that call concurrently become
concurrent tasks on that loop, which is how an asyncio application drives the store.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from eventstore.aio import AsyncEventStore

T = TypeVar("T")


class BlockingAsyncStore:
    """The EventStore API, implemented by an AsyncEventStore on a private event loop."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.inner: AsyncEventStore = self._run(AsyncEventStore.open(url, **kwargs))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, agen: AsyncIterator[Any]) -> Iterator[Any]:
        # In step with the consumer, an item per next(): what the async iterator does between
        # two items (a stop set while one was handled) shows as it would to an async caller.
        try:
            while True:
                try:
                    item = self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield item
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                self._run(aclose())

    def append(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.inner.append(*args, **kwargs))

    def add_inline_handler(self, handler: Any) -> None:
        self.inner.add_inline_handler(handler)

    def remove_inline_handler(self, handler: Any) -> None:
        self.inner.remove_inline_handler(handler)

    def append_with(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.inner.append_with(*args, **kwargs))

    def stream_version(self, *args: Any, **kwargs: Any) -> int:
        return self._run(self.inner.stream_version(*args, **kwargs))

    def last_position(self) -> int:
        return self._run(self.inner.last_position())

    def stats(self, **kwargs: Any) -> dict[str, int]:
        return self._run(self.inner.stats(**kwargs))

    def read_stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        return self._iterate(self.inner.read_stream(*args, **kwargs))  # checks arguments now

    def read_all(self, **kwargs: Any) -> Iterator[Any]:
        return self._iterate(self.inner.read_all(**kwargs))

    def subscribe(self, **kwargs: Any) -> Iterator[Any]:
        return self._iterate(self.inner.subscribe(**kwargs))

    @property
    def url(self) -> Any:
        return self.inner.url

    def close(self) -> None:
        self._run(self.inner.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
