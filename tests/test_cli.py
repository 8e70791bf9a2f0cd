"""The ``eventstore`` command line, in-process through ``main()`` and as a real process."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from eventstore import EventStore, RawEvent
from eventstore._migrate import known_revisions
from eventstore.cli import EXTRA_COMMANDS, add_command, main

EVENTS: list[dict[str, Any]] = [
    {"type": "NoteAdded", "data": {"text": "héllo", "tags": ["a", "b"]}},
    {"type": "NoteEdited", "data": {"text": "world", "n": 2}, "schema_version": 2},
]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what set-up printed (unconfigured structlog logs to stdout)
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def stored(url: str, stream: str, tenant: str = "default") -> list[tuple[str, int, object]]:
    with EventStore.open(url) as store:
        return [(e.type, e.schema_version, e.data)
                for e in store.read_stream(stream, tenant_id=tenant)]


def seed(url: str, stream: str, n: int, tenant: str = "default") -> None:
    with EventStore.open(url) as store:
        store.append(stream, [RawEvent(type="Seeded", data={"i": i}) for i in range(n)],
                     tenant_id=tenant)


@pytest.fixture(autouse=True)
def _no_auto_migrate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVENTSTORE_AUTO_MIGRATE", raising=False)
    monkeypatch.delenv("EVENTSTORE_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "120")


def test_append_from_file(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """append --file writes a JSON list as one batch and prints the AppendResult as JSON."""
    path = tmp_path / "events.json"
    path.write_text(json.dumps(EVENTS), encoding="utf-8")
    code, out, err = run(capsys, "append", "note-1", "--file", str(path), "--url", url, "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"stream_id": "note-1", "tenant_id": "default",
                               "first_position": 1, "last_position": 2, "stream_version": 2,
                               "duplicate": False}
    assert stored(url, "note-1") == [
        ("NoteAdded", 1, RawEvent(type="NoteAdded", data=EVENTS[0]["data"])),
        ("NoteEdited", 2, RawEvent(type="NoteEdited", data=EVENTS[1]["data"], schema_version=2)),
    ]


def test_append_from_stdin_json_lines(url: str, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """append reads JSON lines from stdin, with tenant, metadata and expected version."""
    lines = "\n".join(json.dumps(e) for e in EVENTS) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code, out, _ = run(capsys, "--url", url, "append", "note-1", "--tenant", "acme",
                       "--expected-version", "0", "--metadata", '{"by": "cli"}')
    assert code == 0
    assert out == "appended 2 events to note-1: positions 1-2, stream version 2\n"
    assert [t for t, _, _ in stored(url, "note-1", tenant="acme")] == ["NoteAdded", "NoteEdited"]
    assert stored(url, "note-1") == []
    with EventStore.open(url) as store:
        assert next(store.read_stream("note-1", tenant_id="acme")).metadata == {"by": "cli"}


def test_read_table(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """read prints a header and one row per event, data as compact JSON cut to the width."""
    with EventStore.open(url) as store:
        store.append("note-1", [RawEvent(type="NoteAdded", data={"text": "hi"}),
                                RawEvent(type="Big", data={"text": "x" * 500})])
    code, out, _ = run(capsys, "read", "note-1", "--url", url)
    assert code == 0
    header, first, second = out.splitlines()
    assert header.split() == ["POSITION", "VERSION", "TYPE", "RECORDED_AT", "DATA"]
    assert first.split()[:3] == ["1", "1", "NoteAdded"]
    assert first.endswith('{"text":"hi"}')
    assert second.split()[:3] == ["2", "2", "Big"]
    assert second.endswith("…")
    assert len(second) <= 120


def test_read_json_round_trip(url: str, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """read --json gives every field, and its output appends back to identical events."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(EVENTS)))
    assert main(["append", "note-1", "--url", url]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "read", "note-1", "--url", url, "--json")
    assert code == 0
    records = json_lines(out)
    assert set(records[0]) == {"position", "stream_id", "version", "tenant_id", "event_id",
                               "type", "schema_version", "data", "metadata", "recorded_at"}
    assert [(r["position"], r["version"], r["stream_id"]) for r in records] == [
        (1, 1, "note-1"), (2, 2, "note-1")]
    assert [{"type": r["type"], "data": r["data"], "schema_version": r["schema_version"]}
            for r in records] == [{**e, "schema_version": e.get("schema_version", 1)}
                                  for e in EVENTS]

    again = [{k: r[k] for k in ("type", "data", "schema_version")} for r in records]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(map(json.dumps, again))))
    assert main(["append", "note-2", "--url", url]) == 0
    assert stored(url, "note-2") == stored(url, "note-1")


def test_read_backwards_with_limit(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """read --backwards --limit N gives the newest N events, newest first."""
    seed(url, "s-1", 5)
    code, out, _ = run(capsys, "read", "s-1", "--backwards", "--limit", "2", "--url", url,
                       "--json")
    assert code == 0
    assert [r["version"] for r in json_lines(out)] == [5, 4]


def test_wrong_expected_version_exits_3(url: str, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong --expected-version exits 3 with one error line and writes nothing."""
    seed(url, "s-1", 2)
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(EVENTS[0])))
    code, out, err = run(capsys, "append", "s-1", "--expected-version", "1", "--url", url)
    assert code == 3
    assert out == ""
    assert err == ("eventstore: error: expected version 1 for stream s-1 (tenant default), "
                   "stream is at 2\n")
    assert len(stored(url, "s-1")) == 2


def test_reused_idempotency_key_exits_3(url: str, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An idempotency key reused for other events exits 3; a true retry is a duplicate, 0."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(EVENTS[0])))
    assert main(["append", "s-1", "--idempotency-key", "k1", "--url", url]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(EVENTS[0])))
    code, out, _ = run(capsys, "append", "s-1", "--idempotency-key", "k1", "--url", url,
                       "--json")
    assert code == 0 and json.loads(out)["duplicate"] is True
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(EVENTS[1])))
    code, _, err = run(capsys, "append", "s-1", "--idempotency-key", "k1", "--url", url)
    assert code == 3 and "idempotency key 'k1'" in err
    assert len(stored(url, "s-1")) == 1


@pytest.mark.parametrize("payload", [
    '{"type": "A", "data": {"x": 1}',  # truncated document
    '{"type": "A", "data": {}}\n{"type": oops}\n',  # a bad JSON line
    '{"type": "A", "data": [1]}',  # data not an object
    '{"data": {}}',  # no type
    "",  # nothing at all
    '{"type": "A", "data": {"x": ' + "[" * 5000 + "]" * 5000 + "}}",  # past the parser's depth
])
def test_bad_input_exits_2(url: str, payload: str, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Invalid JSON or event shapes exit 2 with one error line and write nothing."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(payload))
    code, out, err = run(capsys, "append", "s-1", "--url", url)
    assert code == 2
    assert out == ""
    assert err.startswith("eventstore: error: ") and err.count("\n") == 1
    assert stored(url, "s-1") == []


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Argparse errors (here a bad --expected-version) exit 2 with the eventstore prefix."""
    code, _, err = run(capsys, "append", "s-1", "--expected-version", "soon")
    assert code == 2
    assert "eventstore: error: argument --expected-version" in err


def test_unmigrated_postgres_exits_4(fresh_pg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A PostgreSQL database without the schema exits 4, naming `eventstore migrate`."""
    code, out, err = run(capsys, "stats", "--url", fresh_pg)
    assert code == 4
    assert out == ""
    assert err.startswith("eventstore: error: ") and err.count("\n") == 1
    assert "has no eventstore schema" in err and "`eventstore migrate --url" in err


def test_migrate_makes_database_usable(fresh_pg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """migrate prints the head revision; afterwards the store opens (and migrate is a no-op)."""
    head, _ = known_revisions()
    code, out, _ = run(capsys, "migrate", "--url", fresh_pg, "--json")
    assert code == 0
    assert json.loads(out)["revision"] == head
    code, out, _ = run(capsys, "migrate", "--url", fresh_pg)
    assert code == 0 and out.strip().endswith(f"schema at revision {head}")
    code, out, _ = run(capsys, "stats", "--url", fresh_pg, "--json")
    assert code == 0
    assert json.loads(out) == {"events": 0, "streams": 0, "tenants": 0, "last_position": 0}


def test_stats(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """stats counts events, streams and tenants (all, or one with --tenant)."""
    seed(url, "a-1", 3)
    seed(url, "a-2", 1)
    seed(url, "a-1", 2, tenant="acme")
    code, out, _ = run(capsys, "stats", "--url", url, "--json")
    assert code == 0
    assert json.loads(out) == {"events": 6, "streams": 3, "tenants": 2, "last_position": 6}
    code, out, _ = run(capsys, "stats", "--url", url, "--tenant", "acme")
    assert code == 0
    assert [line.split() for line in out.splitlines()] == [
        ["events", "2"], ["streams", "1"], ["tenants", "1"], ["last_position", "6"]]


def test_tail_from_position_with_limit(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """tail --from-position N --limit K prints K events from N on, filtered, then exits 0."""
    seed(url, "a-1", 2)
    seed(url, "b-1", 1)
    seed(url, "a-2", 2)
    seed(url, "a-3", 1, tenant="acme")
    code, out, _ = run(capsys, "tail", "--from-position", "2", "--category", "a",
                       "--limit", "3", "--url", url, "--json")
    assert code == 0
    assert [(r["position"], r["stream_id"]) for r in json_lines(out)] == [
        (2, "a-1"), (4, "a-2"), (5, "a-2")]
    code, out, _ = run(capsys, "tail", "--from-position", "1", "--all-tenants", "--limit", "6",
                       "--url", url, "--json")
    assert code == 0
    assert json_lines(out)[-1]["tenant_id"] == "acme"


def test_tail_defaults_to_new_events(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --from-position tail skips existing events and prints those appended later."""
    seed(url, "s-1", 3)
    stop = threading.Event()

    def keep_appending() -> None:
        with EventStore.open(url) as store:
            while not stop.wait(0.05):
                store.append("s-2", [RawEvent(type="Late", data={})])

    writer = threading.Thread(target=keep_appending)
    writer.start()
    try:
        code, out, _ = run(capsys, "tail", "--limit", "1", "--url", url)
    finally:
        stop.set()
        writer.join(timeout=5)
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:3] == ["POSITION", "STREAM", "VERSION"]
    position, stream, _version, kind = row.split()[:4]
    assert int(position) > 3 and (stream, kind) == ("s-2", "Late")


def test_extra_commands_are_registered(capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A callable in EXTRA_COMMANDS adds a subcommand that main dispatches to."""

    def hello(args: argparse.Namespace) -> int:
        print(f"hello {args.name} json={args.json}")
        return 7

    def register(subparsers: Any) -> None:
        add_command(subparsers, "hello", help="say hello", func=hello).add_argument("name")

    monkeypatch.setattr("eventstore.cli.EXTRA_COMMANDS", [*EXTRA_COMMANDS, register])
    assert run(capsys, "--json", "hello", "you")[:2] == (7, "hello you json=True\n")


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """--help exits 0 and its epilog lists the exit codes."""
    code, out, _ = run(capsys, "read", "--help")
    assert code == 0
    assert "3  conflict" in out and "4  schema mismatch" in out


def _cli(*argv: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("EVENTSTORE_URL", None)
    return subprocess.Popen([sys.executable, "-m", "eventstore.cli", *argv], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **kwargs)


def test_console_script_append_and_conflict(url: str) -> None:
    """`python -m eventstore.cli` appends from stdin (exit 0), then a conflict exits 3."""
    proc = _cli("append", "s-1", "--url", url, "--json")
    out, err = proc.communicate(json.dumps(EVENTS), timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out)["last_position"] == 2
    proc = _cli("append", "s-1", "--url", url, "--expected-version", "0")
    out, err = proc.communicate(json.dumps(EVENTS), timeout=30)
    assert (proc.returncode, out) == (3, "")
    assert err.startswith("eventstore: error: expected version 0") and "Traceback" not in err
    assert [data for _, _, data in stored(url, "s-1")] == [
        RawEvent(type=e["type"], data=e["data"], schema_version=e.get("schema_version", 1))
        for e in EVENTS]


def test_console_script_tail_stops_on_sigterm(tmp_path: Path) -> None:
    """A real `tail` process prints events as they come and exits 0 on SIGTERM."""
    url = f"sqlite:///{tmp_path / 'tail.db'}"
    seed(url, "s-1", 1)
    proc = _cli("tail", "--url", url, "--json")
    assert proc.stdout is not None
    try:
        _check_tail_process(proc, url)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _check_tail_process(proc: subprocess.Popen[str], url: str) -> None:
    assert proc.stdout is not None
    stop = threading.Event()

    def keep_appending() -> None:
        with EventStore.open(url) as store:
            while not stop.wait(0.05):
                store.append("s-2", [RawEvent(type="Late", data={})])

    writer = threading.Thread(target=keep_appending)
    writer.start()
    try:
        first = json.loads(proc.stdout.readline())
    finally:
        stop.set()
        writer.join(timeout=5)
    assert first["stream_id"] == "s-2" and first["position"] > 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


def test_append_accepts_flat_events(url: str, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An event given flat ({"type": T, "field": v}) is stored with those fields as its data."""
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"type": "Flat", "text": "hi", "n": 2}'))
    assert main(["append", "flat-1", "--url", url]) == 0
    with EventStore.open(url) as store:
        (ev,) = store.read_stream("flat-1")
    assert ev.type == "Flat" and ev.data == RawEvent(type="Flat", data={"text": "hi", "n": 2})


def test_read_shows_the_stored_data_the_same_known_or_not(url: str,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """read --json gives each event's data as stored: a typed event's with its "type" tag,
    whether the reading process knows the class (here NoteAdded) or not (an engine's type),
    and a raw payload's own "type" key kept; the table leaves out a "type" equal to the TYPE
    column, and nothing else."""
    from tests._events import NoteAdded

    with EventStore.open(url) as store:
        store.append("mix-1", [NoteAdded(text="known"),
                               RawEvent(type="engine.Note", data={"type": "engine.Note",
                                                                  "text": "unknown"}),
                               RawEvent(type="hook", data={"type": "other", "id": 1})])
    code, out, _ = run(capsys, "read", "mix-1", "--url", url, "--json")
    assert code == 0
    assert [r["data"] for r in json_lines(out)] == [
        {"type": "test.NoteAdded", "text": "known"}, {"type": "engine.Note", "text": "unknown"},
        {"type": "other", "id": 1}]
    code, out, _ = run(capsys, "read", "mix-1", "--url", url)
    rows = out.splitlines()[1:]
    assert [r.split("  ")[-1].strip() for r in rows] == [
        '{"text":"known"}', '{"text":"unknown"}', '{"type":"other","id":1}']


@pytest.mark.parametrize("url", [
    "sqlite:///dir/a%00b.db", "sqlite:///\x00x.db",
    "postgresql+psycopg://app@127.0.0.1:1/db%00name",
    "postgresql+psycopg://app:pa%00ss@127.0.0.1:1/db",
    "postgresql+psycopg://app@127.0.0.1:1/db?application_name=a%00b",
], ids=["sqlite-escaped", "sqlite-raw", "pg-database", "pg-password", "pg-option"])
def test_a_url_holding_a_nul_is_refused(capsys: pytest.CaptureFixture[str], url: str) -> None:
    """A NUL in a URL (percent-encoded or not) is InvalidArgument before anything connects:
    SQLite raised a bare ValueError, and libpq cut its connection string at the NUL, so the
    port and options after it were dropped (it tried the default port)."""
    from eventstore import EventStore, InvalidArgument

    with pytest.raises(InvalidArgument, match="holds a NUL character"):
        EventStore.open(url)
    code, _, err = run(capsys, "stats", "--url", url)
    assert code == 2 and "holds a NUL character" in err, err


@pytest.mark.parametrize("url", ["sqlite:///{tmp}/what?/x.db", "sqlite:///{tmp}/y.db?busy_timeout",
                                 "sqlite:///{tmp}/y.db?synchronous=NORMAL&busy_timeout",
                                 "postgresql+psycopg://app@127.0.0.1:1/db?sslmode",
                                 "postgresql+psycopg://app:se?cret@127.0.0.1:1/db?sslmode",
                                 "sqlite:///{tmp}/what?/a@b.db",
                                 "postgresql+psycopg://h/db?sslmode&application_name=me@x"])
def test_a_url_option_without_a_value_is_refused(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path, url: str) -> None:
    """A query part without "=" was dropped as the URL was parsed: an option meant to change a
    default ran with the default, and a "?" in a path opened a database at the part before
    it.  Now InvalidArgument, and no file is made."""
    from eventstore import EventStore, InvalidArgument

    url = url.format(tmp=tmp_path)
    with pytest.raises(InvalidArgument, match="has no value"):
        EventStore.open(url)
    code, _, err = run(capsys, "stats", "--url", url)
    assert code == 2 and "has no value" in err and "cret" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_password_holding_a_question_mark_is_no_query() -> None:
    """The check for options without a value looks after the credentials: a "?" in a
    password is the password's."""
    from eventstore._backend import resolve_url

    url = resolve_url("postgresql+psycopg://app:pa?ss@127.0.0.1:1/db?sslmode=disable")
    assert url.password == "pa?ss" and dict(url.query) == {"sslmode": "disable"}


def test_a_url_that_does_not_parse_is_shown_without_its_password(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed URL is a usage error whose message hides the password."""
    code, _, err = run(capsys, "stats", "--url", "postgresql+psycopg://app:s3cr3t@db:port/app")
    assert code == 2 and "s3cr3t" not in err
    assert "not a database URL: 'postgresql+psycopg://app:***@db:port/app'" in err
    for password in ("s3/cr3t", "s3@cr3t"):  # unescaped / and @ in a password
        code, _, err = run(capsys, "stats", "--url", f"postgresql://app:{password}@db:port/app")
        assert code == 2 and "cr3t" not in err and "'postgresql://app:***@db:port/app'" in err
    # A URL that parses, its password cut at an unescaped "@": the rest is not the host (the
    # driver's error named it, and so showed the end of the password).
    for url in ("postgresql+psycopg://app:pa@ss-hunter2@127.0.0.1:1/app",
                "postgresql+psycopg://app:pa@ss/hunter2@127.0.0.1:1/app",  # then a "/"
                "postgresql+psycopg://app:pa@ss?hunter2@127.0.0.1:1/app"):  # or a "?"
        code, _, err = run(capsys, "stats", "--url", url)
        assert code == 2 and "hunter2" not in err and "%40" in err, err
    # A password given as an option, in a URL that does not parse (or whose "@" after the
    # credentials is refused): hidden in the store's error and in the CLI's line.
    from eventstore import EventStore, InvalidArgument
    for url in ("postgresql+psycopg://app@db:5432x/app?password=hunter2&sslmode=x",
                "postgresql+psycopg://app@db/app?password=hunter2@x"):
        with pytest.raises(InvalidArgument) as refused:
            EventStore.open(url)
        assert "hunter2" not in str(refused.value) and "password=***" in str(refused.value)
        code, _, err = run(capsys, "stats", "--url", url)
        assert code == 2 and "hunter2" not in err and "password=***" in err, err
    # ... and in a URL object the store refuses.
    from sqlalchemy.engine import URL
    for given in (URL.create("postgresql+psycopg", username="app", host="db",
                             database="app\x00x", query={"password": "hunter2"}),
                  URL.create("postgresql+psycopg", username="app", host="x@db",
                             database="app", query={"password": "hunter2"})):
        with pytest.raises(InvalidArgument) as refused:
            EventStore.open(given)
        assert "hunter2" not in str(refused.value) and "password=***" in str(refused.value)
    # A password given as an option is hidden too, where the store shows its URL (repr,
    # messages).
    from sqlalchemy.engine import make_url

    from eventstore._backend import shown_url
    shown = shown_url(make_url("postgresql+psycopg://app@db/app?password=hunter2&sslmode=x"))
    assert shown == "postgresql+psycopg://app@db/app?password=***&sslmode=x"


def test_a_bad_eventstore_url_variable_is_named(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A URL from EVENTSTORE_URL that is refused names the variable (what to change), as the
    other EVENTSTORE_* settings' errors do; one given as an argument does not."""
    from eventstore import EventStore, InvalidArgument

    for bad, message in (("postgres://app@db:5432x/app", "not a database URL"),
                         ("mysql://app@db/app", "unsupported database 'mysql'")):
        monkeypatch.setenv("EVENTSTORE_URL", bad)
        with pytest.raises(InvalidArgument, match=f"^EVENTSTORE_URL: {message}"):
            EventStore.open()
        code, _, err = run(capsys, "stats")
        assert code == 2 and f"EVENTSTORE_URL: {message}" in err, err
        with pytest.raises(InvalidArgument, match=f"^{message}"):
            EventStore.open(bad)


@pytest.mark.parametrize(("query", "message"), [
    ("synchronus=NORMAL", r"unknown sqlite URL option\(s\) synchronus"),
    ("busy_timeout=-1", r"busy_timeout must be 0 to 2\*\*31 - 1 milliseconds"),
    ("uri=maybe", r"sqlite uri must be true or false, not 'maybe'"),
])
def test_sqlite_url_options_that_would_be_ignored_are_refused(
        tmp_path: Path, query: str, message: str) -> None:
    """A misspelt SQLite option (dropped by the driver with a warning, the store running on
    the default it meant to change) or a negative busy timeout is InvalidArgument; the
    driver's own options and SQLite URI parameters (uri=true) still pass."""
    from eventstore import InvalidArgument

    with pytest.raises(InvalidArgument, match=message):
        EventStore.open(f"sqlite:///{tmp_path / 'x.db'}?{query}")
    with EventStore.open(f"sqlite:///{tmp_path / 'y.db'}?synchronous=NORMAL&timeout=5") as s:
        s.append("c-1", [RawEvent(type="T", data={})])
    for uri in ("true", "yes", "on"):  # as SQLAlchemy reads it
        with EventStore.open(f"sqlite:///file:{tmp_path / 'z.db'}?mode=rwc&uri={uri}") as s:
            s.append("c-1", [RawEvent(type="T", data={})])


@pytest.mark.parametrize("command", [["read", "c-1"], ["stats"], ["tail"],
                                     ["projections", "status"],
                                     ["projections", "verify", "conversations"],
                                     ["projections", "rebuild", "conversations"],
                                     ["projections", "restart", "conversations"]])
def test_reading_commands_do_not_create_a_sqlite_database(
        tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """read, stats, tail, projections status and verify of a SQLite path that is not there
    exit 2 and create nothing (they made an empty database there and reported no events, or
    waited on it for ever); of a SQLite file without the store's schema, 4 (not migrated),
    naming the command to run."""
    path = tmp_path / "typo.db"
    code, out, err = run(capsys, *command, "--url", f"sqlite:///{path}")
    assert (code, out) == (2, "")
    assert f"no SQLite database at {path}" in err
    assert not path.exists()
    # Its write-ahead log left behind (the database moved away while in use): not "append
    # or migrate creates one", which would reset that log.
    wal = tmp_path / "typo.db-wal"
    wal.write_bytes(b"\0" * 4096)
    code, out, err = run(capsys, *command, "--url", f"sqlite:///{path}")
    assert (code, out) == (1, "") and "missing but its write-ahead log" in err, err
    assert not path.exists() and wal.stat().st_size == 4096
    wal.unlink()
    # Another application's database (or an empty file): refused, its tables left alone.
    import sqlite3

    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER)")
    conn.close()
    code, out, err = run(capsys, *command, "--url", f"sqlite:///{foreign}")
    assert (code, out) == (4, "") and "is not an eventstore database" in err
    assert f"run `eventstore migrate --url sqlite:///{foreign}`" in err
    # The same files named as SQLite URIs: refused alike (they were migrated, or created).
    code, out, err = run(capsys, *command, "--url", f"sqlite:///file:{path}?uri=true")
    assert (code, out) == (2, "") and not path.exists(), err
    code, out, err = run(capsys, *command, "--url", f"sqlite:///file:{foreign}?uri=true")
    assert (code, out) == (4, "") and "is not an eventstore database" in err
    with sqlite3.connect(foreign) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
    conn.close()
    assert tables == ["orders"]


@pytest.mark.parametrize("command", [["projections", "run", "--once"], ["read", "c-1"],
                                     ["stats"], ["projections", "status"]])
def test_a_command_started_while_a_new_sqlite_file_is_migrated_takes_its_turn(
        tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A command started beside the first process of a new SQLite file (which creates the file,
    then its tables in one transaction) waits for that migration to commit and goes on; it
    exited 4, "not an eventstore database", when it looked in between."""
    from eventstore._backend import begin_write, create_store_engine, resolve_url
    from eventstore._migrate import migrate_on

    url = f"sqlite:///{tmp_path / 'new.db'}"
    migrating, done = threading.Event(), threading.Event()
    engine = create_store_engine(resolve_url(url))

    def first_process() -> None:
        try:
            with begin_write(engine) as conn:
                migrate_on(conn)
                migrating.set()
                done.wait(0.5)  # (the command looks meanwhile, and waits for the commit)
        finally:
            migrating.set()

    holder = threading.Thread(target=first_process)
    holder.start()
    try:
        assert migrating.wait(30)
        code, _out, err = run(capsys, *command, "--url", url)
    finally:
        done.set()
        holder.join(30)
        engine.dispose()
    assert code == 0, err
    with EventStore.open(url) as store:
        assert store.last_position() == 0


@pytest.mark.parametrize("command", [["projections", "run", "--once"], ["stats"]])
def test_a_command_waits_for_a_migration_that_has_not_taken_its_lock_yet(
        tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The first process of a new SQLite file creates it, then looks at it, and only then
    takes the write lock to add the tables: a command that finds the file empty and unlocked
    in between waits a while for the tables (it exited 4).  An empty file another
    application marked as its own (an application id) is still not the store's."""
    import sqlite3
    import time

    path = tmp_path / "new.db"
    sqlite3.connect(path).execute("PRAGMA journal_mode = WAL").close()  # (as opened)
    url = f"sqlite:///{path}"

    def migrate_soon() -> None:
        time.sleep(0.4)
        EventStore.open(url).close()

    first = threading.Thread(target=migrate_soon)
    first.start()
    try:
        code, _out, err = run(capsys, *command, "--url", url)
    finally:
        first.join(30)
    assert code == 0, err

    marked = tmp_path / "theirs.db"
    with sqlite3.connect(marked) as conn:
        conn.execute("PRAGMA application_id = 1234")
    conn.close()
    code, _out, err = run(capsys, *command, "--url", f"sqlite:///{marked}")
    assert code == 4 and "is not an eventstore database" in err
    with sqlite3.connect(marked) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    conn.close()


@pytest.mark.parametrize("argv", [["append", ""], ["append", "s-1", "--tenant", "t" * 300],
                                  ["append", "s-1", "--idempotency-key", "a\x00b"],
                                  ["append", "s-1", "--metadata", '{"a": {"b": "' + "x" * 200
                                   + '"}}'],
                                  ["append", "big-1"]])
def test_an_append_refused_for_its_arguments_creates_no_database(
        tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the store would refuse is refused before it opens: no SQLite file is left (also
    an event or metadata over EVENTSTORE_MAX_EVENT_BYTES)."""
    monkeypatch.setenv("EVENTSTORE_MAX_EVENT_BYTES", "150")
    event = ({"type": "Big", "data": {"text": "x" * 200}} if argv[1] == "big-1"
             else EVENTS[0])
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(event)))
    path = tmp_path / "new.db"
    code, _, err = run(capsys, *argv, "--url", f"sqlite:///{path}")
    assert code == 2 and err.startswith("eventstore: error: "), err
    assert not path.exists()


@pytest.mark.parametrize("expected", ["1", "exists"])
def test_an_append_expecting_a_stream_of_a_missing_database_creates_none(
        tmp_path: Path, expected: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A database that is not there holds no stream: an append expecting one is a conflict
    (exit 3, as the store says it), and leaves no new file behind."""
    path = tmp_path / "new.db"
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(EVENTS[0])))
    code, out, err = run(capsys, "append", "s-1", "--expected-version", expected,
                         "--url", f"sqlite:///{path}")
    assert (code, out) == (3, "") and "stream is at 0" in err, err
    assert not path.exists()
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(EVENTS[0])))
    code, _, _ = run(capsys, "append", "s-1", "--expected-version", "0",
                     "--url", f"sqlite:///{path}")
    assert code == 0 and path.exists()


def test_read_json_of_an_upcast_event_appends_back(url: str,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A typed event stored at an older schema version comes out upcast, with the schema
    version of what is shown, so the line appends back as an equal event."""
    from eventstore import Event, upcaster

    class Renamed(Event, tag="test.cli.Renamed", schema_version=2):
        body: str

    @upcaster("test.cli.Renamed", from_version=1)
    def _v1(data: dict[str, Any]) -> dict[str, Any]:
        return {"body": data.pop("text")}

    with EventStore.open(url) as store:
        store.append("up-1", [RawEvent(type="test.cli.Renamed", data={"text": "hi"},
                                       schema_version=1)])
    code, out, _ = run(capsys, "read", "up-1", "--url", url, "--json")
    assert code == 0
    (line,) = json_lines(out)
    assert (line["schema_version"], line["data"]) == (2, {"type": "test.cli.Renamed",
                                                          "body": "hi"})
    again = {k: line[k] for k in ("type", "data", "schema_version")}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(again)))
    assert main(["append", "up-2", "--url", url]) == 0
    assert [e for _t, _v, e in stored(url, "up-2")] == [e for _t, _v, e in stored(url, "up-1")]


def test_logs_go_to_stderr_as_json_objects_when_asked(
        url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--log-format json (or EVENTSTORE_LOG_FORMAT=json) gives one JSON object per log line,
    with the bound context (a collector's shape); a bad variable value exits 2, named."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(EVENTS[0]) + "\n"))
    code, _, err = run(capsys, "append", "note-1", "--url", url, "-vv", "--log-format", "json")
    assert code == 0, err
    logs = [json.loads(line) for line in err.splitlines()]
    (appended,) = [entry for entry in logs if entry["event"] == "events_appended"]
    assert (appended["stream"], appended["tenant"], appended["position"]) == (
        "note-1", "default", 1)
    monkeypatch.setenv("EVENTSTORE_LOG_FORMAT", "json")
    code, _, err = run(capsys, "-vv", "stats", "--url", url)
    assert code == 0 and all(json.loads(line) for line in err.splitlines())
    code, _, err = run(capsys, "stats", "--url", "sqlite:////nonexistent/dir/es.db")
    (line,) = err.splitlines()  # the error line is a JSON object too
    assert code == 2 and json.loads(line)["event"] == "cli_error"
    monkeypatch.setenv("EVENTSTORE_LOG_FORMAT", "xml")
    code, _, err = run(capsys, "stats", "--url", url)
    assert code == 2 and "EVENTSTORE_LOG_FORMAT" in err


@pytest.mark.parametrize("argv", [["--log-format", "json", "read"], ["--log-format=json", "bogus"],
                                  ["read", "--log-format", "json", "--limit", "x", "s-1"],
                                  ["--log-f", "json", "read"], ["--log=json", "read"]])
def test_usage_errors_are_json_objects_too_when_json_logs_are_asked(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        argv: list[str]) -> None:
    """A usage error (a missing or unknown argument, caught before the options are parsed)
    follows --log-format json or EVENTSTORE_LOG_FORMAT=json: one JSON object, exit 2."""
    monkeypatch.delenv("EVENTSTORE_LOG_FORMAT", raising=False)
    plain = [w for w in argv if not w.startswith("--log") and w != "json"]
    for words, env in ((argv, None), (plain, "json")):
        if env is not None:
            monkeypatch.setenv("EVENTSTORE_LOG_FORMAT", env)
        code, _, err = run(capsys, *words)
        (line,) = err.splitlines()
        entry = json.loads(line)
        assert code == 2 and entry["event"] == "cli_error" and "usage: eventstore" in entry[
            "message"], err
    monkeypatch.delenv("EVENTSTORE_LOG_FORMAT")
    code, _, err = run(capsys, *plain)
    assert code == 2 and err.startswith("usage: eventstore")  # text by default


def test_append_module_checks_input_against_the_applications_event_types(
        url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """append --module imports the application's event types: input of one of them that does
    not fit it is refused (exit 2, nothing written), as the application's own append would;
    without --module the command line cannot know the type and stores it as given."""
    from eventstore.events import _registry

    (tmp_path / "order_events.py").write_text(
        "from eventstore import Event\n\n"
        "class OrderPlacedCli(Event, tag='OrderPlacedCli'):\n"
        "    amount: int\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "order_events", raising=False)
    try:
        bad = json.dumps({"type": "OrderPlacedCli", "data": {"amount": "x"}})
        monkeypatch.setattr(sys, "stdin", io.StringIO(bad))
        code, _, err = run(capsys, "append", "order-1", "--url", url, "--module", "order_events")
        assert code == 2 and "does not match its type" in err, err
        assert stored(url, "order-1") == []
        good = json.dumps({"type": "OrderPlacedCli", "data": {"amount": 3}})
        monkeypatch.setattr(sys, "stdin", io.StringIO(good))
        code, _, err = run(capsys, "append", "order-1", "--url", url, "--module", "order_events")
        assert code == 0, err
        code, out, _ = run(capsys, "read", "order-1", "--url", url, "--json",
                           "--module", "order_events")
        assert json.loads(out)["data"] == {"type": "OrderPlacedCli", "amount": 3}
        code, _, err = run(capsys, "append", "order-1", "--url", url, "--module", "no_such_mod")
        assert code == 2 and "no module named 'no_such_mod'" in err
    finally:
        _registry.pop("OrderPlacedCli", None)


def test_driver_log_lines_come_as_json_objects_with_json_logs(
        url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With --log-format json, what a library logs through the standard logging module (as
    psycopg does when a connection is lost) is a JSON object on stderr too, not a text line."""
    (tmp_path / "noisy_mod.py").write_text(
        "import logging\n"
        "log = logging.getLogger('a_driver')\n"
        "log.warning('error ignored terminating')\n"
        "log.info('an info line')\n"
        "log.log(35, 'a level of its own')\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    log.exception('reset failed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for verbose, expected in ((), ["warning", "warning", "error"]), (("-v",), [
            "warning", "info", "warning", "error"]):
        monkeypatch.delitem(sys.modules, "noisy_mod", raising=False)
        monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(EVENTS[0])))
        code, _, err = run(capsys, "append", "s-1", "--url", url, "--module", "noisy_mod",
                           "--log-format", "json", *verbose)
        assert code == 0, err
        lines = [json.loads(line) for line in err.splitlines()
                 if json.loads(line).get("logger") == "a_driver"]
        assert [line["level"] for line in lines] == expected, err
        assert lines[0]["event"] == "error ignored terminating"
        assert "ZeroDivisionError" in lines[-1]["exception"]


def test_text_output_escapes_control_characters_in_ids(url: str, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """Stream, tenant and type ids holding a newline or an escape sequence are shown escaped
    in tables and messages: one line per row, nothing sent to the terminal's controls; --json
    keeps them as they are."""
    stream, tenant, kind = "evil\x1b[31m-1\nFAKE", "t\x1b[0m", "X\x1b[2J"
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"type": kind, "data": {}})))
    code, out, _ = run(capsys, "append", stream, "--tenant", tenant, "--url", url)
    assert code == 0 and "\x1b" not in out and out.count("\n") == 1
    assert "evil\\x1b[31m-1\\nFAKE" in out
    code, out, _ = run(capsys, "read", stream, "--tenant", tenant, "--url", url)
    assert code == 0 and "\x1b" not in out
    _header, row = out.splitlines()
    assert "X\\x1b[2J" in row
    code, out, _ = run(capsys, "read", stream, "--tenant", tenant, "--url", url, "--json")
    (line,) = [json.loads(x) for x in out.splitlines()]
    assert (line["stream_id"], line["tenant_id"], line["type"]) == (stream, tenant, kind)
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"type": kind, "data": {}})))
    code, _, err = run(capsys, "append", stream, "--tenant", tenant, "--expected-version", "0",
                       "--url", url)  # a conflict, whose message names the stream
    assert code == 3 and "\x1b" not in err and err.count("\n") == 1


@pytest.mark.parametrize("spelling", ["exists", "stream_exists", "stream-exists", " EXISTS "])
def test_expected_version_exists_spellings(url: str, spelling: str,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every documented spelling of --expected-version exists means "the stream must exist":
    a conflict (3) on an empty stream, an append once it has events."""
    seed(url, "other-1", 1)  # (the database exists: the store itself decides)
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(EVENTS[0])))
    code, out, err = run(capsys, "append", "s-1", "--expected-version", spelling, "--url", url)
    assert (code, out) == (3, ""), err
    seed(url, "s-1", 1)
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(EVENTS[0])))
    code, out, err = run(capsys, "append", "s-1", "--expected-version", spelling, "--url", url)
    assert code == 0, err
    assert len(stored(url, "s-1")) == 2


@pytest.mark.parametrize("words", [["stats", "--log-format"], ["stats", "--url", "x", "--log"]])
def test_log_format_without_its_value_is_a_usage_error(words: list[str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``--log-format`` as the last word (no value) is argparse's usage error (exit 2), not a
    crash of the look-ahead that reads the log format before parsing."""
    code, out, err = run(capsys, *words)
    assert (code, out) == (2, "")
    assert "eventstore: error: argument --log-format: expected one argument" in err


def test_an_empty_write_ahead_log_of_a_missing_database_is_no_orphan(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a -wal that holds something is what is left of a database moved away: an empty
    one next to a missing file (nothing to lose) does not stop an append creating it."""
    path = tmp_path / "new.db"
    (tmp_path / "new.db-wal").write_bytes(b"")
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(EVENTS[0])))
    code, out, err = run(capsys, "append", "s-1", "--url", f"sqlite:///{path}")
    assert code == 0, err
    assert out.startswith("appended 1 event to s-1")
    assert len(stored(f"sqlite:///{path}", "s-1")) == 1


def test_a_cut_data_column_fills_the_terminal_width_exactly(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A data column too wide is cut so that the row is exactly the terminal's width
    (COLUMNS=120 from the autouse fixture), its last character an ellipsis."""
    with EventStore.open(url) as store:
        store.append("s-1", [RawEvent(type="Big", data={"text": "x" * 500})])
    code, out, _ = run(capsys, "read", "s-1", "--url", url)
    assert code == 0
    _header, row = out.splitlines()
    assert len(row) == 120 and row.endswith('{"text":"' + "x" * 43 + "…")


def test_tail_table_columns(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """tail's table: POSITION, [TENANT,] STREAM, VERSION, TYPE, RECORDED_AT and DATA, at fixed
    widths (8, 10, 16, 7, 20, 24), two spaces apart."""
    seed(url, "s-1", 1)
    code, out, _ = run(capsys, "tail", "--from-position", "1", "--limit", "1", "--url", url)
    assert code == 0
    header, row = out.splitlines()
    assert header == ("POSITION  " + "STREAM".ljust(16) + "  VERSION  " + "TYPE".ljust(20)
                      + "  " + "RECORDED_AT".ljust(24) + "  DATA")
    assert row.startswith("       1  " + "s-1".ljust(16) + "        1  " + "Seeded".ljust(20))
    code, out, _ = run(capsys, "tail", "--from-position", "1", "--limit", "1", "--all-tenants",
                       "--url", url)
    assert code == 0
    assert out.splitlines()[0].startswith("POSITION  " + "TENANT".ljust(10) + "  STREAM  ")


def test_busy_timeout_takes_the_whole_range_sqlite_takes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """?busy_timeout= is accepted up to 2**31 - 1 milliseconds (SQLite's int), refused above."""
    path = tmp_path / "es.db"
    EventStore.open(f"sqlite:///{path}").close()
    code, _, err = run(capsys, "stats", "--url", f"sqlite:///{path}?busy_timeout=2147483647")
    assert code == 0, err
    code, _, err = run(capsys, "stats", "--url", f"sqlite:///{path}?busy_timeout=1073741824")
    assert code == 0, err
    code, _, err = run(capsys, "stats", "--url", f"sqlite:///{path}?busy_timeout=2147483648")
    assert code == 2 and "busy_timeout must be 0 to 2**31 - 1" in err


def test_projections_run_once_leaves_another_applications_sqlite_file_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``projections run --once``, like ``run``, refuses a SQLite file without the store's
    tables (exit 4) rather than add them to another application's database."""
    import sqlite3

    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER)")
    conn.close()
    code, out, err = run(capsys, "projections", "run", "--once", "--url", f"sqlite:///{foreign}")
    assert (code, out) == (4, "") and "is not an eventstore database" in err, err
    with sqlite3.connect(foreign) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
    conn.close()
    assert tables == ["orders"]


def test_read_of_an_empty_stream_says_so(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """read of a stream without events prints the header and "(no events)" (exit 0)."""
    seed(url, "other-1", 1)
    code, out, _ = run(capsys, "read", "s-1", "--url", url)
    assert code == 0
    assert out.splitlines()[1:] == ["(no events)"]


def test_a_password_option_is_masked_exactly(capsys: pytest.CaptureFixture[str]) -> None:
    """The password of a ``password=`` option in a URL that does not parse is replaced by
    ``***`` and nothing else (the options after it kept)."""
    code, _, err = run(capsys, "stats", "--url",
                       "postgresql+psycopg://app@db:5432x/app?password=hunter2&sslmode=x")
    assert code == 2
    assert "'postgresql+psycopg://app@db:5432x/app?password=***&sslmode=x'" in err, err


def test_projections_run_leaves_another_applications_sqlite_file_alone(tmp_path: Path) -> None:
    """``projections run`` (the long-running worker) refuses a SQLite file without the
    store's tables at once (exit 4) rather than migrate it and run on it."""
    import sqlite3

    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER)")
    conn.close()
    proc = _cli("projections", "run", "--url", f"sqlite:///{foreign}")
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("projections run ran on another application's database")
    assert (proc.returncode, out) == (4, ""), err
    assert "is not an eventstore database" in err
    with sqlite3.connect(foreign) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
    conn.close()
    assert tables == ["orders"]
