"""The ``eventstore`` command line: migrate a database, append, read, tail and count events.

Every subcommand takes ``--url URL`` (default: ``$EVENTSTORE_URL``, else
``sqlite:///./eventstore.db``), ``--json`` and ``-v``; the options may come before or after the
subcommand name.  ``--tenant`` (default ``default``) applies to ``append``, ``read`` and ``tail``;
``stats`` counts every tenant unless given ``--tenant``.

Output: human-readable tables by default.  With ``--json``, commands that print events (``read``,
``tail``) print JSON lines, one object per event; the others (``migrate``, ``append``, ``stats``)
print one JSON object.  Logs and errors go to stderr; an error is one line
``eventstore: error: <message>`` (with ``--log-format json``, a JSON object like the logs').

Exit codes (stable, for scripts):

* 0 -- success.
* 1 -- unexpected or database error.
* 2 -- usage or bad input: bad arguments, invalid JSON, an invalid event or argument.
* 3 -- conflict: wrong expected version, or an idempotency key reused for other events.
* 4 -- schema mismatch: the database is not migrated (run ``eventstore migrate``) or is newer
  than this code.
* 130 -- interrupted (Ctrl-C) outside ``tail``; ``tail`` stops cleanly with 0 on SIGINT/SIGTERM.

More subcommands can be added without editing this module: append a callable
``(subparsers) -> None`` to :data:`EXTRA_COMMANDS` (see :func:`add_command`) from a module listed
in :data:`PLUGIN_MODULES`, which :func:`build_parser` imports when it is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import shlex
import shutil
import signal
import sqlite3
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

import msgspec
import structlog

from . import _migrate
from ._backend import (
    DEFAULT_URL,
    _sqlite_settings,
    missing_sqlite_file,
    resolve_url,
    shown_url,
    sqlite_file,
)
from ._core import Options, check_id, encode_within
from ._schema import VERSION_TABLE
from .codec import MAX_NESTING
from .errors import (
    EventStoreError,
    IdempotencyKeyReused,
    InvalidArgument,
    InvalidStreamId,
    SchemaVersionMismatch,
    WrongExpectedVersion,
    error_text,
)
from .events import ANY, STREAM_EXISTS, AppendResult, Event, ExpectedState, RawEvent, RecordedEvent
from .store import EventStore

if TYPE_CHECKING:
    from typing import TypeAlias

    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = [
    "EXIT_CONFLICT",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_SCHEMA",
    "EXIT_USAGE",
    "EXTRA_COMMANDS",
    "PLUGIN_MODULES",
    "CliError",
    "add_command",
    "build_parser",
    "event_to_json",
    "exit_code_for",
    "main",
    "open_store",
    "print_json",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3
EXIT_SCHEMA = 4
EXIT_INTERRUPTED = 130

EXTRA_COMMANDS: list[Callable[[Subparsers], None]] = []
"""Callables that add subcommands to the parser; :func:`build_parser` calls each in order."""

PLUGIN_MODULES: tuple[str, ...] = ("projections.cli",)
"""Modules imported by :func:`build_parser` (when installed) so they can fill EXTRA_COMMANDS."""

EPILOG = """\
exit codes:
  0  success
  1  unexpected or database error
  2  usage or bad input (bad arguments, invalid JSON, invalid event or argument)
  3  conflict (wrong expected version, idempotency key reused for other events)
  4  schema mismatch (database not migrated: run `eventstore migrate`; or newer than this code)

--json prints JSON lines: one object per event (read, tail), per projection (projections
status), per stream that differs (projections verify: none when the rows agree); one object
for the other commands.
--url defaults to $EVENTSTORE_URL, else sqlite:///./eventstore.db.
"""


LOG_FORMATS = ("console", "json")


class CliError(Exception):
    """A failure the CLI reports as one line on stderr and exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as ``eventstore: error: …`` (exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        if _json_logs:  # (what the command line asks for, seen before parsing it)
            report(f"{message} (usage: {' '.join(self.format_usage().split()[1:])})")
            raise SystemExit(EXIT_USAGE)
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"eventstore: error: {message}\n")


# -- parser ---------------------------------------------------------------------------------------


def _common_options(*, top: bool) -> argparse.ArgumentParser:
    # Defaults are SUPPRESSed so that an option given before the subcommand is not overwritten by
    # the subcommand's default; main() fills in the real defaults afterwards.
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--url", default=argparse.SUPPRESS,
                   help=f"database URL (default: $EVENTSTORE_URL, else {DEFAULT_URL})")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine output: JSON lines for events, else one JSON object")
    g.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="log more to stderr (-v info, -vv debug; default: warnings)")
    g.add_argument("--log-format", choices=LOG_FORMATS, default=argparse.SUPPRESS,
                   help="logs on stderr as text lines or JSON objects (default: "
                        "$EVENTSTORE_LOG_FORMAT, else console)")
    if top:
        g.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("eventstore")
    except Exception:  # not installed as a distribution
        return "unknown"


def _tenant_option(p: argparse.ArgumentParser, *, default: str | None = "default",
                   help: str = "tenant id (default: %(default)s)") -> None:
    p.add_argument("--tenant", default=default, metavar="TENANT", help=help)


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _expected_version(text: str) -> int | ExpectedState:
    word = text.strip().lower()
    if word == "any":
        return ANY
    if word in ("exists", "stream_exists", "stream-exists"):
        return STREAM_EXISTS
    try:
        value = int(word)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a version number, 'any' or 'exists', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected version must be >= 0, got {value}")
    return value


_COMMON = _common_options(top=False)


def add_command(subparsers: Subparsers, name: str, *, help: str, description: str | None = None,
                func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """Add a subcommand with the common options (``--url``, ``--json``, ``-v``) and the epilog.

    For :data:`EXTRA_COMMANDS` callables too: ``func(args) -> exit code`` runs the command.
    """
    p: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help, description=description or help, parents=[_COMMON], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


def build_parser() -> tuple[argparse.ArgumentParser, Subparsers]:
    """The argument parser with every built-in subcommand and those of :data:`EXTRA_COMMANDS`."""
    parser = _Parser(
        prog="eventstore",
        description="Operate an eventstore database: migrate, append, read, tail, stats.",
        epilog=EPILOG, parents=[_common_options(top=True)],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = cast("Subparsers", parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True))

    add_command(subparsers, "migrate", func=cmd_migrate,
                help="apply the schema migrations and print the schema revision")

    p = add_command(
        subparsers, "append", func=cmd_append,
        help="append events to a stream in one atomic batch",
        description=(
            "Append events to STREAM in one atomic batch.  Input (a file or stdin) is JSON: one\n"
            "object, a list of objects, or JSON lines, each\n"
            '  {"type": "SomeType", "data": {...}, "schema_version": 1}\n'
            "(schema_version is optional, default 1).  The flat form\n"
            '  {"type": "SomeType", "field": "value", ...}\n'
            "is accepted too: every key but type and schema_version is a field."
        ),
    )
    p.add_argument("stream", metavar="STREAM", help="stream id")
    p.add_argument("--file", "-f", metavar="F", help="read events from F (default or '-': stdin)")
    p.add_argument("--expected-version", type=_expected_version, default=ANY,
                   metavar="N|any|exists",
                   help="N: the stream must hold exactly N events (0: must not exist); "
                        "exists: at least one; any (default): no check")
    p.add_argument("--idempotency-key", metavar="K",
                   help="a retried append with the same key and events writes nothing again")
    p.add_argument("--metadata", metavar="JSON",
                   help="a JSON object stored with every event of the batch")
    _tenant_option(p)
    module_option(p, "its event types: input of those types must fit them")

    p = add_command(subparsers, "read", func=cmd_read, help="print the events of a stream")
    p.add_argument("stream", metavar="STREAM", help="stream id")
    p.add_argument("--from-version", type=_non_negative, default=1, metavar="N",
                   help="first version (inclusive, default: %(default)s)")
    p.add_argument("--to-version", type=_non_negative, metavar="N",
                   help="last version (inclusive, default: the end)")
    p.add_argument("--backwards", action="store_true", help="newest first")
    p.add_argument("--limit", type=_non_negative, metavar="N", help="print at most N events")
    _tenant_option(p)
    module_option(p, "its event types: events of those types read as the code reads them")

    p = add_command(subparsers, "tail", func=cmd_tail,
                    help="follow new events until interrupted (of the default tenant; "
                         "--tenant or --all-tenants for others)")
    p.add_argument("--from-position", type=_non_negative, metavar="N",
                   help="first global position (inclusive; default: only events appended from now)")
    p.add_argument("--category", action="extend", nargs="+", metavar="C",
                   help="only streams named C-… (repeatable)")
    p.add_argument("--type", action="extend", nargs="+", metavar="T", dest="types",
                   help="only events of type T (repeatable)")
    p.add_argument("--limit", type=_non_negative, metavar="N", help="exit after N events")
    tenants = p.add_mutually_exclusive_group()
    tenants.add_argument("--tenant", default="default", metavar="TENANT",
                         help="tenant id (default: %(default)s)")
    tenants.add_argument("--all-tenants", action="store_true", help="events of every tenant")
    module_option(p, "its event types: events of those types read as the code reads them")

    p = add_command(subparsers, "stats", func=cmd_stats,
                    help="count events, streams and tenants; print the last position")
    _tenant_option(p, default=None, help="count only this tenant (default: every tenant)")

    for module in PLUGIN_MODULES:
        _import_plugin(module)
    for extend in EXTRA_COMMANDS:
        extend(subparsers)
    return parser, subparsers


def module_option(p: argparse.ArgumentParser, what: str) -> None:
    """``--module MOD`` (repeatable): the application module to import first (see
    :func:`import_modules`), for ``what`` it registers."""
    p.add_argument("--module", action="append", metavar="MOD",
                   help=f"import MOD first ({what})")


def import_modules(args: argparse.Namespace) -> None:
    """Import each ``--module`` (it registers event types, projections); one that is not
    there is a usage error, one that fails while importing is the module's own error."""
    for module in getattr(args, "module", None) or ():
        if module.startswith("."):
            raise CliError(f"--module {module}: give an absolute module name", EXIT_USAGE)
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise  # the module is there, and imports something that is not
            raise CliError(f"--module {module}: no module named {e.name!r} (is it on "
                           f"PYTHONPATH?)", EXIT_USAGE) from None


def _import_plugin(module: str) -> None:
    package = module.partition(".")[0]
    if importlib.util.find_spec(package) is None:
        return
    if module != package and importlib.util.find_spec(module) is None:
        return
    importlib.import_module(module)


# -- helpers for commands -------------------------------------------------------------------------


def open_store(args: argparse.Namespace, *, existing: bool = False,
               only_ours: bool = False) -> EventStore:
    """Open the store of ``args.url`` (migrating SQLite as :meth:`EventStore.open` does).

    ``existing``: a command that only reads refuses a SQLite file that is not there, rather
    than create an empty database at a mistyped path and report it empty.  It, and one that
    follows the log (``only_ours``), refuse a SQLite file without the store's tables rather
    than add them to another application's database.
    """
    if existing or only_ours:
        resolved = resolve_url(args.url)
        path = sqlite_file(resolved)
        if path is not None:
            if missing_sqlite_file(resolved) is not None:  # (an orphaned -wal: DatabaseError)
                if not existing:
                    return EventStore.open(args.url)
                raise CliError(f"no SQLite database at {path} (append or migrate creates one)")
            held = _holds_eventstore(str(path))
            if held is None:
                # A new, empty file: perhaps one another process is migrating this moment (it
                # creates the file, then looks at it, then takes the write lock and adds the
                # tables in one transaction).  Waited for, a while.
                held = _tables_of_a_migration(str(path), _sqlite_settings(resolved)[2])
                if held is None and not existing:
                    return EventStore.open(args.url)  # (as for a missing file: migrated)
            if not held:
                # Not migrated, as far as the store can tell (exit 4, as on PostgreSQL).
                shown = shlex.quote(str(resolved))
                raise CliError(f"{path} is not an eventstore database (it has no eventstore "
                               f"schema): run `eventstore migrate --url {shown}` if it should "
                               f"be one", EXIT_SCHEMA)
    return EventStore.open(args.url)


def _holds_eventstore(path: str) -> bool | None:
    """Whether the SQLite file at ``path`` has the store's tables; ``None`` when it is empty
    (no tables, and no application id or user version another application would have set).
    Read only: a command that only reads must not add them to another application's file."""
    try:
        conn = sqlite3.connect(f"{_file_uri(path)}?mode=ro", uri=True)
        try:
            names = {name for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            marked = any(conn.execute(f"PRAGMA {p}").fetchone()[0]
                         for p in ("application_id", "user_version"))
        finally:
            conn.close()
    except sqlite3.Error:
        return True  # (not readable as SQLite here: the store's open says why)
    if VERSION_TABLE in names:
        return True
    return False if names or marked else None


# How long a command waits for tables in an empty SQLite file (another process's first open
# migrating it), beyond the waits for its write lock.
_EMPTY_FILE_GRACE = 2.0


def _tables_of_a_migration(path: str, busy_ms: int) -> bool | None:
    """:func:`_holds_eventstore` once a migration of the empty file under way is done: waits
    for the write lock (the migration's transaction) and looks again, for up to
    ``_EMPTY_FILE_GRACE`` seconds (the migrator may not have taken the lock yet)."""
    deadline = time.monotonic() + min(_EMPTY_FILE_GRACE, busy_ms / 1000)
    while True:
        _wait_for_writer(path, busy_ms)
        held = _holds_eventstore(path)
        if held is not None or time.monotonic() >= deadline:
            return held
        time.sleep(0.05)


def _wait_for_writer(path: str, busy_ms: int) -> None:
    """Wait (up to ``busy_ms``) until no connection holds the SQLite file's write lock; takes
    the lock and lets it go, writing nothing."""
    try:
        conn = sqlite3.connect(f"{_file_uri(path)}?mode=rw", uri=True, timeout=busy_ms / 1000,
                               isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        finally:
            conn.close()
    except sqlite3.Error:
        pass  # (read only here, or still locked: look as it is; the store's open says more)


def _file_uri(path: str) -> str:
    return f"file:{urllib.parse.quote(Path(path).absolute().as_posix())}"


def print_json(value: Any, out: TextIO | None = None) -> None:
    """Print one compact JSON line (msgspec types, datetimes and UUIDs allowed)."""
    stream = out if out is not None else sys.stdout
    stream.write(msgspec.json.encode(value).decode() + "\n")
    stream.flush()


def event_data(data: Event | RawEvent) -> dict[str, Any]:
    """An event's data as a JSON object: a typed event's as this code reads it (upcast to its
    current schema) with its tag (``"type"``), the shape it is stored in; a raw event's (a
    type this process does not know) as stored."""
    if isinstance(data, RawEvent):
        return data.data
    built: dict[str, Any] = msgspec.to_builtins(data)
    return built


def _shown_data(ev: RecordedEvent) -> dict[str, Any]:
    """The data column of the table: without a ``"type"`` that repeats the TYPE column."""
    data = event_data(ev.data)
    if data.get("type") == ev.type:
        data = {k: v for k, v in data.items() if k != "type"}
    return data


def event_to_json(ev: RecordedEvent) -> dict[str, Any]:
    """Every field of a recorded event, JSON-ready (the ``--json`` line of read and tail)."""
    return {
        "position": ev.position,
        "stream_id": ev.stream_id,
        "version": ev.version,
        "tenant_id": ev.tenant_id,
        "event_id": str(ev.event_id),
        "type": ev.type,
        # The schema of the data shown: a typed event's is upcast to its class's.
        "schema_version": (type(ev.data).__event_schema_version__
                           if isinstance(ev.data, Event) else ev.schema_version),
        "data": event_data(ev.data),
        "metadata": ev.metadata,
        "recorded_at": _iso(ev),
    }


# C0 and C1 control characters and DEL: shown escaped in text output, so that stored ids
# cannot break a table's rows or send escape sequences to the operator's terminal.
_CONTROL = {c: ascii(chr(c))[1:-1] for c in (*range(0x20), *range(0x7f, 0xa0))}


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``), for a line on a terminal."""
    return text.translate(_CONTROL)


def _iso(ev: RecordedEvent) -> str:
    return ev.recorded_at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class _EventTable:
    """Prints events as aligned rows whose data column is cut to the terminal's width."""

    def __init__(self, *, stream: bool, tenant: bool, out: TextIO) -> None:
        self._out = out
        cols: list[tuple[str, int, Callable[[RecordedEvent], str], bool]] = [
            ("POSITION", 8, lambda e: str(e.position), True),
        ]
        if tenant:
            cols.append(("TENANT", 10, lambda e: printable(e.tenant_id), False))
        if stream:
            cols.append(("STREAM", 16, lambda e: printable(e.stream_id), False))
        cols += [
            ("VERSION", 7, lambda e: str(e.version), True),
            ("TYPE", 20, lambda e: printable(e.type), False),
            ("RECORDED_AT", 24, lambda e: _iso(e)[:23] + "Z", False),
        ]
        self._cols = cols
        fixed = sum(w + 2 for _, w, _, _ in cols)
        self._data_width = max(20, shutil.get_terminal_size((120, 24)).columns - fixed)
        self.rows = 0

    def header(self) -> None:
        cells = [name.rjust(w) if right else name.ljust(w) for name, w, _, right in self._cols]
        self._write("  ".join([*cells, "DATA"]))

    def row(self, ev: RecordedEvent) -> None:
        cells = [get(ev).rjust(w) if right else get(ev).ljust(w)
                 for _, w, get, right in self._cols]
        data = msgspec.json.encode(_shown_data(ev)).decode()
        if len(data) > self._data_width:
            data = data[: self._data_width - 1] + "…"
        self._write("  ".join([*cells, data]))
        self.rows += 1

    def _write(self, line: str) -> None:
        self._out.write(line.rstrip() + "\n")
        self._out.flush()


def _read_input(path: str | None) -> str:
    if path is None or path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise CliError(f"{path} is not UTF-8 text: {e}") from e


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:  # (events are refused past MAX_NESTING levels anyway)
        raise ValueError(f"nested too deeply (at most {MAX_NESTING} levels)") from None


def parse_events(text: str) -> list[RawEvent]:
    """Events from JSON input: one object, a list of objects, or JSON lines."""
    if not text.strip():
        raise CliError("no events in the input: give a JSON object, a list or JSON lines")
    try:
        doc = _loads(text)
    except ValueError as doc_error:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if len(lines) < 2 or not _parses(lines[0][1]):
            raise CliError(f"invalid JSON input: {doc_error}") from None
        items = []
        for n, line in lines:
            try:
                items.append(_loads(line))
            except ValueError as e:
                raise CliError(f"invalid JSON on input line {n}: {e}") from None
    else:
        items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise CliError("no events in the input (an empty list)")
    return [_raw_event(item, i) for i, item in enumerate(items, 1)]


def _parses(line: str) -> bool:
    try:
        _loads(line)
    except ValueError:
        return False
    return True


_EVENT_KEYS = frozenset({"type", "data", "schema_version"})


def _raw_event(item: object, n: int) -> RawEvent:
    """One input object: ``{"type": T, "data": {...}}`` or flat ``{"type": T, field: v}``."""
    where = f"event {n}"
    if not isinstance(item, dict):
        raise CliError(f"{where}: expected an object like "
                       f'{{"type": "SomeType", "data": {{...}}}}, got {type(item).__name__}')
    kind = item.get("type")
    if not isinstance(kind, str) or not kind:
        raise CliError(f"{where}: 'type' must be a non-empty string")
    if "data" in item:
        unknown = sorted(set(item) - _EVENT_KEYS)
        if unknown:
            raise CliError(f"{where}: unknown keys {', '.join(unknown)} next to 'data' "
                           "(allowed: type, data, schema_version)")
        data = item["data"]
    else:  # the flat form: every other key is a field of the event
        data = {k: v for k, v in item.items() if k not in _EVENT_KEYS}
    if not isinstance(data, dict):
        raise CliError(f"{where} ({kind}): 'data' must be a JSON object")
    version = item.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CliError(f"{where} ({kind}): 'schema_version' must be an integer >= 1")
    return RawEvent(type=kind, data=data, schema_version=version)


def _parse_metadata(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = _loads(text)
    except ValueError as e:
        raise CliError(f"--metadata is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CliError("--metadata must be a JSON object")
    return value


class StopRequested(Exception):
    """SIGINT or SIGTERM came before the work that ``stop`` ends had started."""


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, started: threading.Event | None = None
                     ) -> Iterator[None]:
    """Set ``stop`` on SIGINT/SIGTERM for the duration (main thread only; else no handlers);
    until ``started`` is set, also raise :class:`StopRequested` (a blocking connect, say, is
    left at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if started is not None and not started.is_set():
            raise StopRequested

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- commands -------------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    url = resolve_url(args.url)
    revision = _migrate.migrate_url(url)
    shown = shown_url(url)
    if args.json:
        print_json({"url": shown, "revision": revision})
    else:
        print(f"{shown}: schema at revision {revision}")
    return EXIT_OK


def cmd_append(args: argparse.Namespace) -> int:
    import_modules(args)  # first: a raw event of a type it registers is checked against it
    events = parse_events(_read_input(args.file))
    metadata = _parse_metadata(args.metadata)
    # What the store would refuse, refused before it opens (and creates a SQLite file).
    check_id(args.stream, "stream id", InvalidStreamId)
    check_id(args.tenant, "tenant id", InvalidArgument)
    if args.idempotency_key is not None:
        check_id(args.idempotency_key, "idempotency key", InvalidArgument)
    encode_within(events, metadata, Options.resolve(max_event_bytes=None, poll_interval=None,
                                                    clock=None).max_event_bytes)
    expected = args.expected_version
    wants_a_stream = expected is STREAM_EXISTS or (isinstance(expected, int) and expected > 0)
    if wants_a_stream and missing_sqlite_file(resolve_url(args.url)) is not None:
        # No database, so no stream: refused as the store would, without creating a file.
        raise WrongExpectedVersion(stream_id=args.stream, tenant_id=args.tenant,
                                   expected=expected, actual=0)
    with open_store(args) as store:
        result = store.append(args.stream, events, expected_version=args.expected_version,
                              idempotency_key=args.idempotency_key, tenant_id=args.tenant,
                              metadata=metadata)
    _print_append(args, result, len(events))
    return EXIT_OK


def _print_append(args: argparse.Namespace, result: AppendResult, count: int) -> None:
    if args.json:
        print_json({"stream_id": args.stream, "tenant_id": args.tenant,
                    **msgspec.to_builtins(result)})
        return
    first, last = result.first_position, result.last_position
    positions = f"position {first}" if first == last else f"positions {first}-{last}"
    if result.duplicate:
        print(f"duplicate of an earlier append with this idempotency key, nothing written: "
              f"{printable(args.stream)} {positions}, stream version {result.stream_version}")
    else:
        n = last - first + 1
        print(f"appended {n} event{'s' if n != 1 else ''} to {printable(args.stream)}: "
              f"{positions}, stream version {result.stream_version}")


def cmd_read(args: argparse.Namespace) -> int:
    import_modules(args)
    with open_store(args, existing=True) as store:
        events = store.read_stream(args.stream, tenant_id=args.tenant,
                                   from_version=args.from_version, to_version=args.to_version,
                                   backwards=args.backwards, limit=args.limit)
        if args.json:
            for ev in events:
                print_json(event_to_json(ev))
            return EXIT_OK
        table = _EventTable(stream=False, tenant=False, out=sys.stdout)
        table.header()
        for ev in events:
            table.row(ev)
        if table.rows == 0:
            print("(no events)")
    return EXIT_OK


def cmd_tail(args: argparse.Namespace) -> int:
    import_modules(args)
    stop = threading.Event()
    tenant = None if args.all_tenants else args.tenant
    with open_store(args, existing=True) as store, _stop_on_signals(stop):
        start = args.from_position
        if start is None:
            start = store.last_position() + 1
        if args.limit == 0:
            return EXIT_OK
        events = store.subscribe(from_position=start, categories=args.category,
                                 types=args.types, tenant_id=tenant, stop=stop)
        table = None
        if not args.json:
            table = _EventTable(stream=True, tenant=args.all_tenants, out=sys.stdout)
            table.header()
        for seen, ev in enumerate(events, 1):
            if table is None:
                print_json(event_to_json(ev))
            else:
                table.row(ev)
            if args.limit is not None and seen >= args.limit:
                stop.set()
                break
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    with open_store(args, existing=True) as store:
        stats = store.stats(tenant_id=args.tenant)
    if args.json:
        print_json(stats)
    else:
        width = max(len(k) for k in stats)
        for key, value in stats.items():
            print(f"{key.ljust(width)}  {value}")
    return EXIT_OK


# -- main -----------------------------------------------------------------------------------------


def exit_code_for(error: BaseException) -> int:
    """The documented exit code for an error a command raised."""
    if isinstance(error, CliError):
        return error.code
    if isinstance(error, InvalidArgument):
        return EXIT_USAGE
    if isinstance(error, WrongExpectedVersion | IdempotencyKeyReused):
        return EXIT_CONFLICT
    if isinstance(error, SchemaVersionMismatch):
        return EXIT_SCHEMA
    return EXIT_ERROR


_json_logs = False  # --log-format json: report() writes JSON objects too (set by main)


def report(message: str, kind: str = "error", *, detail: str | None = None) -> None:
    """A line for the operator on stderr (``kind``: error, note): ``eventstore: error: ...``,
    or with ``--log-format json`` a JSON object like the logs' (every stderr line parses)."""
    one_line = printable(" ".join(message.split())) or "unknown error"
    if _json_logs:
        entry = {"event": f"cli_{kind}", "level": "error" if kind == "error" else "info",
                 "message": one_line,
                 "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
        if detail is not None:
            entry["traceback"] = detail
        sys.stderr.write(json.dumps(entry) + "\n")
    else:
        if detail is not None:
            sys.stderr.write(detail)
        sys.stderr.write(f"eventstore: {kind}: {one_line}\n")
    sys.stderr.flush()


def _log_format_asked(argv: Sequence[str]) -> str | None:
    """The log format the words of a command line ask for (the last ``--log-format``, else
    ``EVENTSTORE_LOG_FORMAT``), before they are parsed; None when unclear."""
    asked = None
    for i, word in enumerate(argv):
        if word == "--":
            break
        option, eq, value = word.partition("=")
        if len(option) < len("--lo") or not "--log-format".startswith(option):
            continue  # (argparse takes any unambiguous start of the option's name)
        if eq:
            asked = value
        elif i + 1 < len(argv):
            asked = argv[i + 1]
    if asked is None:
        asked = os.environ.get("EVENTSTORE_LOG_FORMAT", "").strip().lower() or None
    return asked if asked in LOG_FORMATS else None


def _log_format(given: str | None) -> str:
    """``--log-format``, else ``EVENTSTORE_LOG_FORMAT``, else console."""
    if given is not None:
        return given
    env = os.environ.get("EVENTSTORE_LOG_FORMAT", "").strip().lower()
    if not env:
        return "console"
    if env not in LOG_FORMATS:
        raise CliError(f"EVENTSTORE_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, "
                       f"not {env!r}", EXIT_USAGE)
    return env


@contextlib.contextmanager
def _logging(verbosity: int, log_format: str = "console") -> Iterator[None]:
    """structlog to stderr at WARNING (-v INFO, -vv DEBUG) while the CLI runs, as text lines or
    JSON objects (a log collector's shape), then restored."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    saved = structlog.get_config()
    was_configured = structlog.is_configured()
    render: Any = (structlog.processors.JSONRenderer() if log_format == "json"
                   else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # The drivers' own log lines (psycopg's, SQLAlchemy's warnings) in the same shape, or a
    # JSON stream would hold plain text lines.
    forward = _ToStructlog()
    root = logging.getLogger()
    root_level = root.level
    root.setLevel(level)
    root.addHandler(forward)
    try:
        yield
    finally:
        root.removeHandler(forward)
        root.setLevel(root_level)
        if was_configured:
            structlog.configure(**saved)
        else:
            # configure() would mark structlog configured with its defaults, which print to
            # stdout: the library's loggers would then speak in the caller's process.
            structlog.reset_defaults()


class _ToStructlog(logging.Handler):
    """Hands standard-library log records to structlog (the CLI's configuration renders them),
    a traceback as the record's ``exception``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # structlog knows the standard levels only: a custom one counts as the one below.
            level = max((n for n in _STANDARD_LEVELS if n <= record.levelno),
                        default=logging.DEBUG)
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                fields["exception"] = "".join(traceback.format_exception(*record.exc_info))
            structlog.get_logger().log(level, record.getMessage(), **fields)
        except Exception:
            self.handleError(record)


_STANDARD_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                    logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser, _ = build_parser()
    global _json_logs
    # Usage errors come before the parsed --log-format: they follow what the words say.
    _json_logs = _log_format_asked(sys.argv[1:] if argv is None else argv) == "json"
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    # Fill in defaults of the common options (SUPPRESSed in the parser, see _common_options).
    if getattr(args, "url", None) is None:
        args.url = None  # resolve_url: $EVENTSTORE_URL (its errors name it), else DEFAULT_URL
    args.json = bool(getattr(args, "json", False))
    args.verbose = int(getattr(args, "verbose", 0) or 0)
    _json_logs = False  # (of this call: main may run more than once in a process)
    try:
        log_format = _log_format(getattr(args, "log_format", None))
    except CliError as e:
        report(str(e))
        return e.code
    _json_logs = log_format == "json"
    func: Callable[[argparse.Namespace], int] = args.func
    with _logging(args.verbose, log_format):
        try:
            return func(args)
        except (CliError, EventStoreError) as e:
            report(str(e))
            return exit_code_for(e)
        except KeyboardInterrupt:
            report("interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (e.g. `eventstore read s | head`): stop quietly.
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            return EXIT_OK
        except Exception as e:  # the last resort: one line, not a traceback
            report(f"unexpected {type(e).__name__}: {error_text(e)}"
                   + ("" if args.verbose else " (run with -v for the traceback)"),
                   detail=traceback.format_exc() if args.verbose else None)
            return EXIT_ERROR


if __name__ == "__main__":
    # Run the imported module's main: plugins register their commands on `eventstore.cli`, which
    # is another module object than this `__main__`.
    from eventstore.cli import main as _main

    raise SystemExit(_main())
