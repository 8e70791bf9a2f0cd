"""Logging: structlog events with bound context; the library configures and prints nothing."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from eventstore import EventStore, WrongExpectedVersion
from eventstore.aio import AsyncEventStore
from eventstore.logs import get_logger
from projections.aio import AsyncConversations, AsyncJobs
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


def test_the_cli_run_in_process_leaves_logging_as_it_found_it(tmp_path: Path) -> None:
    """``eventstore.cli.main`` configures structlog while it runs; in an application that had
    not configured it, it is left unconfigured after (succeeding or failing), so the library
    stays silent: restoring structlog's defaults with configure() marked it configured, and
    every later append printed a line to stdout."""
    code = (
        "import structlog\n"
        "from eventstore import EventStore, RawEvent\n"
        "from eventstore.cli import main\n"
        "import sys\n"
        "url = sys.argv[1]\n"
        "assert main(['migrate', '--url', url]) == 0\n"
        "assert main(['stats', '--url', 'mysql://nowhere/x']) == 2\n"
        "print('configured', structlog.is_configured(), file=sys.stderr)\n"
        "with EventStore.open(url) as s:\n"
        "    s.append('c-1', [RawEvent(type='Noted', data={})])\n"
    )
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    out = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "configured False" in out.stderr
    # migrate prints its own report; nothing after it comes from the library's loggers.
    assert "events_appended" not in out.stdout and "events_appended" not in out.stderr
    # Configured by the application before: its configuration is back after main().
    code = (
        "import structlog, sys\n"
        "from eventstore.cli import main\n"
        "marker = lambda logger, name, event: {**event, 'marker': 1}\n"
        "structlog.configure(processors=[marker, structlog.processors.JSONRenderer()])\n"
        "assert main(['stats', '--url', 'mysql://nowhere/x']) == 2\n"
        "print(structlog.is_configured(), structlog.get_config()['processors'][0] is marker)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["True", "True"], out


def test_a_bound_logger_adds_its_context_and_leaves_its_parent_alone() -> None:
    """``bind`` returns a logger whose lines carry the parent's context plus the new keys (a
    key bound again takes the new value); the parent's lines stay as they were."""
    base = get_logger("eventstore.test")
    worker = base.bind(worker="w-1")
    task = worker.bind(task="t-9")
    moved = task.bind(worker="w-2")
    with capture_logs() as logs:
        base.info("plain", n=1)
        worker.info("bound", n=2)
        task.info("bound_twice", n=3)
        moved.info("rebound", n=4)
    assert [(e["event"], e.get("worker"), e.get("task"), e["n"]) for e in logs] == [
        ("plain", None, None, 1), ("bound", "w-1", None, 2), ("bound_twice", "w-1", "t-9", 3),
        ("rebound", "w-2", "t-9", 4)]


def test_a_key_given_on_the_line_replaces_the_one_bound() -> None:
    """A line that repeats a key bound on its logger logs the line's value (as structlog's own
    bound loggers do) instead of failing with a repeated keyword argument."""
    log = get_logger("eventstore.test").bind(worker="w-1", tenant="acme")
    with capture_logs() as logs:
        log.info("moved", worker="w-2")
    assert [(e["event"], e["worker"], e["tenant"]) for e in logs] == [("moved", "w-2", "acme")]


def test_each_method_logs_at_its_own_level() -> None:
    log = get_logger("eventstore.test")
    with capture_logs() as logs:
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("d", "debug"), ("i", "info"), ("w", "warning"), ("e", "error")]


class _Sink:
    """A structlog logger that keeps what it is given."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def _keep(self, message: str) -> None:
        self.lines.append(message)

    debug = info = warning = error = _keep


def test_the_logger_is_built_once_per_configuration_under_its_name() -> None:
    """The structlog logger is made by the application's factory under the library's name,
    once for many lines, and once more after structlog is configured again."""
    made: list[tuple[Any, ...]] = []
    lines: list[str] = []

    def factory(*args: Any) -> _Sink:
        made.append(args)
        return _Sink(lines)

    log = get_logger("eventstore.test")
    old = structlog.get_config()
    try:
        structlog.configure(processors=[_render], logger_factory=factory)
        log.info("one")
        log.info("two")
        log.bind(k=1).info("three")
        assert made == [("eventstore.test",), ("eventstore.test",)]  # the bound one is new
        structlog.configure(processors=[_render], logger_factory=factory)
        log.info("four")
    finally:
        structlog.configure(**old)
    assert lines == ["one", "two", "three k=1", "four"]
    assert made == [("eventstore.test",)] * 3


def _render(logger: Any, method: str, event_dict: dict[str, Any]) -> str:
    return " ".join([event_dict.pop("event"), *(f"{k}={v}" for k, v in event_dict.items())])


def test_a_logger_follows_each_setting_configured_after_its_first_line() -> None:
    """A logger that has logged picks up a later configure() that changes only the level
    filter, only the logger factory, or only the context class."""
    first: list[str] = []
    second: list[str] = []
    seen: list[type] = []

    def render(logger: Any, method: str, event_dict: dict[str, Any]) -> str:
        seen.append(type(event_dict))
        return _render(logger, method, event_dict)

    log = get_logger("eventstore.test")
    old = structlog.get_config()
    try:
        structlog.configure(processors=[render], logger_factory=lambda *a: _Sink(first),
                            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
                            context_class=dict)
        log.debug("debug_before")
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
        log.debug("debug_after")
        log.info("info_after")
        structlog.configure(logger_factory=lambda *a: _Sink(second))
        log.info("to_the_new_factory")
        structlog.configure(context_class=_OrderedContext)
        log.info("in_the_new_context_class")
    finally:
        structlog.configure(**old)
    assert first == ["debug_before", "info_after"]
    assert second == ["to_the_new_factory", "in_the_new_context_class"]
    assert seen[-1] is _OrderedContext and _OrderedContext not in seen[:-1]


class _OrderedContext(OrderedDict):  # type: ignore[type-arg]
    """A context class other than dict (its copies keep the class)."""
