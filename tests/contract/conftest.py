"""The contract tests run on both backends and through both stores (sync and asyncio)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from eventstore import EventStore
from tests._async_shim import BlockingAsyncStore


@pytest.fixture(params=["sync", "async"])
def store(url: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "sync":
        s: Any = EventStore.open(url, migrate=True)
    else:
        s = BlockingAsyncStore(url, migrate=True)
    try:
        yield s
    finally:
        s.close()
