"""Real CrewAI flows for the persistence tests, and the guard that keeps them offline.

The flows are deterministic: no agent, no LLM, no tool.  Their classes are built by functions
that take the persistence (the store's, or CrewAI's own SQLite one to migrate from), because
``@persist(...)`` binds a backend when the class is defined, and each test (and each worker
process) has its own store.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from crewai.flow import (
    Flow,
    HumanFeedbackPending,
    HumanFeedbackResult,
    PendingFeedbackContext,
    human_feedback,
    listen,
    persist,
    start,
)
from crewai.flow.flow import FlowState
from crewai.flow.persistence import FlowPersistence
from pydantic import Field

# CrewAI's opt-outs: no telemetry, no trace upload, no PyPI version check.  CrewAI reads them when
# it would call out, not at import, so setting them before a flow runs is enough.
OFFLINE_ENV = {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_DISABLE_TRACKING": "true",
    "OTEL_SDK_DISABLED": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "CREWAI_DISABLE_VERSION_CHECK": "true",
    "CREWAI_STORAGE_DIR": "eventstore-crewai-tests",
}

STARTED_AT = datetime(2026, 5, 1, 9, 30, tzinfo=UTC)


# -- offline guard ----------------------------------------------------------------------------


def _loopback(host: object) -> bool:
    if host is None or host in ("localhost", b"localhost", ""):
        return True
    try:
        text = host.decode() if isinstance(host, bytes) else str(host)
        return ipaddress.ip_address(text.split("%")[0]).is_loopback
    except ValueError:
        return False


class NetworkGuard:
    """Refuses (and records) every connection and name lookup that leaves the machine.

    Loopback (the PostgreSQL test server) and Unix sockets pass.  CrewAI swallows most network
    errors, so tests assert that :attr:`attempts` stayed empty rather than rely on a failure.
    """

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def _refuse(self, what: str) -> OSError:
        self.attempts.append(what)
        return OSError(f"network access in a test: {what}")

    def install(self) -> None:
        guard = self
        connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
        getaddrinfo = socket.getaddrinfo

        def checked(address: Any) -> None:
            if isinstance(address, tuple) and not _loopback(address[0]):
                raise guard._refuse(f"connect {address!r}")

        def guarded_connect(sock: socket.socket, address: Any) -> None:
            checked(address)
            connect(sock, address)

        def guarded_connect_ex(sock: socket.socket, address: Any) -> int:
            checked(address)
            return connect_ex(sock, address)

        def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            if not _loopback(host):
                raise guard._refuse(f"resolve {host!r}")
            return getaddrinfo(host, *args, **kwargs)

        self._saved = [(socket.socket, "connect", connect),
                       (socket.socket, "connect_ex", connect_ex),
                       (socket, "getaddrinfo", getaddrinfo)]
        socket.socket.connect = guarded_connect  # type: ignore[method-assign, assignment]
        socket.socket.connect_ex = guarded_connect_ex  # type: ignore[method-assign, assignment]
        socket.getaddrinfo = guarded_getaddrinfo

    def uninstall(self) -> None:
        for owner, name, original in self._saved:
            setattr(owner, name, original)
        self._saved = []


@contextmanager
def offline() -> Iterator[NetworkGuard]:
    """CrewAI's opt-outs in the environment and a :class:`NetworkGuard` installed."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    guard = NetworkGuard()
    guard.install()
    try:
        yield guard
    finally:
        guard.uninstall()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- flows ------------------------------------------------------------------------------------

# The flows use no agent memory: CrewAI's own internal flows skip creating it by this flag
# (a Flow otherwise builds one on init, which imports a vector database: some 6 s a process).
# Not a persistence matter; a CrewAI without the flag just ignores it.
NO_MEMORY = True


class CounterState(FlowState):
    """Typed fields (a datetime, a set, a decimal) to show they survive the store."""

    topic: str = ""
    count: int = 0
    steps: list[str] = Field(default_factory=list)
    tags: set[str] = Field(default_factory=set)
    started_at: datetime | None = None
    budget: Decimal = Decimal("0")


def counter_flow(persistence: FlowPersistence) -> type[Flow[CounterState]]:
    """``begin`` then ``finish``; the state is saved after each."""

    @persist(persistence)
    class CounterFlow(Flow[CounterState]):
        _skip_auto_memory = NO_MEMORY

        @start()
        def begin(self) -> None:
            self.state.count += 1
            self.state.steps.append("begin")
            self.state.tags.add(self.state.topic)
            if self.state.started_at is None:
                self.state.started_at = STARTED_AT
            self.state.budget += Decimal("0.10")

        @listen(begin)
        def finish(self) -> str:
            self.state.steps.append("finish")
            return f"{self.state.topic}:{self.state.count}"

    return CounterFlow


class ReviewState(FlowState):
    topic: str = ""
    draft: str = ""
    published: str = ""
    published_by: int = 0


class AsyncReviewProvider:
    """A ``HumanFeedbackProvider`` that never blocks: it pauses the flow for a later answer."""

    def request_feedback(self, context: PendingFeedbackContext, flow: Flow[Any]) -> str:
        raise HumanFeedbackPending(context=context,
                                   callback_info={"ticket": f"review-{context.flow_id}"})


def review_flow(persistence: FlowPersistence) -> type[Flow[ReviewState]]:
    """``draft``, then ``review`` pauses for human feedback, then ``publish`` (no ``emit``, so
    no LLM classifies the answer)."""

    @persist(persistence)
    class ReviewFlow(Flow[ReviewState]):
        _skip_auto_memory = NO_MEMORY

        @start()
        def draft(self) -> None:
            self.state.draft = f"Draft about {self.state.topic}"

        @listen(draft)
        @human_feedback(message="Publish this draft?", provider=AsyncReviewProvider(),
                        metadata={"channel": "#reviews"})
        def review(self) -> str:
            return str(self.state.draft)

        @listen(review)
        def publish(self, result: HumanFeedbackResult) -> str:
            self.state.published = f"{result.output} [{result.feedback}]"
            self.state.published_by = os.getpid()
            return str(self.state.published)

    return ReviewFlow


# Autouse fixtures of the CrewAI test modules (imported there by name).


@pytest.fixture(autouse=True)
def no_network() -> Iterator[None]:
    """CrewAI's opt-outs set, and no connection or lookup beyond loopback during the test."""
    with offline() as guard:
        yield
    assert guard.attempts == [], f"network access: {guard.attempts}"


@pytest.fixture(autouse=True)
def crewai_lock_files_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CrewAI's SQLiteFlowPersistence locks through a file it leaves in the temp directory:
    have those land in the test's own directory, not in the machine's /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
