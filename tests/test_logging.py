"""Logging: structlog events with bound context; the library configures and prints nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import structlog
from structlog.testing import capture_logs

from eventstore import EventStore, WrongExpectedVersion
from tests._events import NoteAdded


def test_append_logs_tenant_stream_and_position(store: EventStore) -> None:
    """A committed append logs events_appended with tenant, stream, position and count."""
    with capture_logs() as logs:
        store.append("conversation-1", [NoteAdded(text="a"), NoteAdded(text="b")],
                     tenant_id="acme")
    (entry,) = [e for e in logs if e["event"] == "events_appended"]
    assert entry["tenant"] == "acme" and entry["stream"] == "conversation-1"
    assert entry["position"] == 2 and entry["count"] == 2 and entry["log_level"] == "debug"


def test_conflict_is_logged_and_raised(store: EventStore) -> None:
    """A version conflict is logged with expected and actual, and still raised."""
    store.append("c-1", [NoteAdded(text="a")])
    with capture_logs() as logs, pytest.raises(WrongExpectedVersion):
        store.append("c-1", [NoteAdded(text="b")], expected_version=0)
    (entry,) = [e for e in logs if e["event"] == "append_conflict"]
    assert (entry["stream"], entry["expected"], entry["actual"]) == ("c-1", 0, 1)


def test_bound_context_reaches_log_lines(store: EventStore) -> None:
    """Context bound by the caller with contextvars is merged into the store's log lines."""
    cap = structlog.testing.LogCapture()
    old = structlog.get_config()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, cap])
    try:
        with structlog.contextvars.bound_contextvars(request_id="req-7"):
            store.append("c-1", [NoteAdded(text="a")])
    finally:
        structlog.configure(**old)
    (entry,) = [e for e in cap.entries if e["event"] == "events_appended"]
    assert entry["request_id"] == "req-7" and entry["stream"] == "c-1"


def test_importing_the_library_configures_no_logging() -> None:
    """Importing eventstore and projections leaves structlog unconfigured."""
    code = ("import structlog, eventstore, eventstore.aio, projections, projections.aio;"
            "print(structlog.is_configured())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_library_writes_nothing_to_stdout_when_logging_is_configured(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """With the application's logging routed elsewhere, store calls print nothing."""
    cap = structlog.testing.LogCapture()
    old = structlog.get_config()
    structlog.configure(processors=[cap])
    try:
        capsys.readouterr()
        with EventStore.open(url) as s:
            s.append("c-1", [NoteAdded(text="a")])
            list(s.read_stream("c-1"))
            s.stats()
    finally:
        structlog.configure(**old)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


@pytest.mark.asyncio
async def test_async_facades_log_their_appends_once_committed(url: str) -> None:
    """The async facades' appends (run inside the async store's transactions) log
    events_appended with tenant, stream and position, as the sync facades' do."""
    from eventstore.aio import AsyncEventStore
    from projections.aio import AsyncConversations, AsyncJobs

    store = await AsyncEventStore.open(url)
    try:
        with capture_logs() as logs:
            await AsyncConversations(store).assign("c-1", {"n": 1}, tenant_id="acme")
            job = await AsyncJobs(store).submit("wf", {"x": 1}, user_id="u", tenant_id="acme")
        entries = [(e["tenant"], e["stream"], e["position"]) for e in logs
                   if e["event"] == "events_appended"]
        assert entries == [("acme", "conversation-c-1", 1), ("acme", f"job-{job.job_id}", 2)]
    finally:
        await store.close()
