"""What differs between SQLite and PostgreSQL: engine set-up, the append lock, error translation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import sqlite3
import sys
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Transaction, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy import util as sa_util
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

from ._pg_async import facade_of, is_async_psycopg
from .errors import DatabaseError, EventStoreError, InvalidArgument, StoreClosed

DEFAULT_URL = "sqlite:///./eventstore.db"

# One 64-bit key for the transaction-level advisory lock that serializes appends on PostgreSQL.
APPEND_LOCK_KEY = 0x6576_656E_7473_7431  # "eventst1"
MIGRATE_LOCK_KEY = 0x6576_656E_7473_6D31  # "eventsm1"

_SQLITE_OPTIONS = ("synchronous", "busy_timeout")
# What SQLAlchemy's pysqlite and aiosqlite dialects take from a URL's query.
_PYSQLITE_OPTIONS = ("timeout", "isolation_level", "detect_types", "check_same_thread",
                     "cached_statements", "uri")
_SQLITE_OPTIONS_ALL = frozenset(_SQLITE_OPTIONS + _PYSQLITE_OPTIONS)


def resolve_url(url: str | URL | None) -> URL:
    """The URL from the argument, else ``EVENTSTORE_URL``, else the embedded SQLite default."""
    if url is not None:
        return _parse_url(url)
    raw = os.environ.get("EVENTSTORE_URL")
    if not raw:
        return _parse_url(DEFAULT_URL)
    try:
        return _parse_url(raw)
    except InvalidArgument as e:  # the error names what to change
        raise InvalidArgument(f"EVENTSTORE_URL: {e}") from e


def _parse_url(raw: str | URL) -> URL:
    try:
        parsed = make_url(raw)
    except (sa_exc.ArgumentError, ValueError, TypeError) as e:
        raise InvalidArgument(f"not a database URL: {_masked(raw)!r}") from e
    if (parsed.host is not None and "@" in parsed.host) or (
            isinstance(raw, str) and not is_sqlite(parsed) and _at_after_credentials(raw)):
        # The password held an "@" that was not percent-encoded: what follows it would be
        # taken as the host, the database or an option (and shown in the driver's errors).
        raise InvalidArgument(
            f"not a database URL: {_masked(raw)!r} has an '@' after the one before the host; "
            "write an '@' in the user name or password as %40")
    values = [v for vs in parsed.query.values() for v in ((vs,) if isinstance(vs, str) else vs)]
    if any("\x00" in part for part in (
            parsed.username, parsed.password, parsed.host, parsed.database, *parsed.query, *values)
           if isinstance(part, str)):
        # libpq would cut its connection string there (dropping the port and options after
        # it); a file name cannot hold one.
        raise InvalidArgument(f"not a database URL: {_masked(raw)!r} holds a NUL character")
    # SQLAlchemy drops a query part without "=" (and so would this store's check of the
    # options): an option written without its value, or a "?" meant as part of a path.  Looked
    # for after the credentials, as SQLAlchemy finds them (a password may hold a "?").
    query = ""
    if isinstance(raw, str):
        credentials = _CREDENTIALS.match(raw)
        query = raw[credentials.end() if credentials else 0:].partition("?")[2]
    bare = [part for part in query.split("&") if part and "=" not in part]
    if bare:
        raise InvalidArgument(
            f"not a database URL: {_masked(raw)!r}: option {bare[0]!r} has no value (a '?' "
            "in a file's path is written %3F, in a file: URI %253F)")
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
        raise InvalidArgument(
            f"unsupported database {parsed.drivername!r}: use sqlite:///path or "
            "postgresql+psycopg://user@host/db"
        )
    return parsed


# A URL's scheme and, if it has them, its user and password up to the "@" before the host.
_CREDENTIALS = re.compile(r"[\w+]+://(?:[^:/]*(?::[^@]*)?@)?")


def _at_after_credentials(raw: str) -> bool:
    """Whether a URL with credentials has another "@" after them, in its database or query
    (a password's unescaped "@" followed by "/" or "?")."""
    rest = raw.partition("://")[2]
    ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
    cut = min(ends) if ends else len(rest)
    return "@" in rest[:cut] and "@" in rest[cut:]


def shown_url(url: URL) -> str:
    """The URL to show (repr, messages): its password hidden, also one given as an option."""
    if "password" not in url.query:
        return url.render_as_string(hide_password=True)
    hidden = url.update_query_dict({"password": "HIDDEN"}).render_as_string(hide_password=True)
    return hidden.replace("password=HIDDEN", "password=***")


def _masked(raw: object) -> object:
    """A URL that did not parse, its password hidden: ``//user:password@`` (up to the last
    ``@``: a password may hold ``/`` or ``@``) and a ``password=`` option (up to the next ``&``)."""
    if isinstance(raw, URL):
        return shown_url(raw)
    if not isinstance(raw, str):
        return raw
    raw = re.sub(r"(//[^/@:]*:).*@", r"\1***@", raw)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", raw)


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def create_store_engine(url: URL, *, pool_size: int | None = None) -> Engine:
    """An engine set up for the store on either backend."""
    if is_sqlite(url):
        engine = _sqlite_engine(url)
    else:
        kwargs: dict[str, Any] = {"pool_size": pool_size or 5, "max_overflow": 10,
                                  "connect_args": pg_connect_args(url),
                                  "isolation_level": PG_ISOLATION}
        with missing_extra("postgres"):
            engine = create_engine(url, **kwargs)
        pg_listeners(engine)
    close_when_retired(engine)
    return engine


@contextlib.contextmanager
def missing_extra(extra: str) -> Iterator[None]:
    """A driver the URL needs that is not installed: ``InvalidArgument`` naming the package's
    extra that brings it, instead of a bare ``ModuleNotFoundError``."""
    try:
        yield
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise InvalidArgument(f"this database URL needs {missing!r}, which is not installed: "
                              f"install eventstore with its {extra!r} extra "
                              f"(pip install '.[{extra}]' in a checkout)") from e


# Seconds a PostgreSQL session may sit idle inside a transaction before the server ends it
# (see pg_listeners); EVENTSTORE_PG_IDLE_TIMEOUT changes it, 0 leaves the server's setting.
DEFAULT_PG_IDLE_TIMEOUT = 60.0


def pg_idle_timeout_ms() -> int:
    """``EVENTSTORE_PG_IDLE_TIMEOUT`` (seconds) in milliseconds, else the default's."""
    raw = os.environ.get("EVENTSTORE_PG_IDLE_TIMEOUT")
    if not raw:
        return int(DEFAULT_PG_IDLE_TIMEOUT * 1000)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 86_400:  # (NaN fails this too)
        raise InvalidArgument(f"EVENTSTORE_PG_IDLE_TIMEOUT must be seconds from 0 (the "
                              f"server's setting) to 86400, got {raw!r}")
    # A positive value under a millisecond is one: 0 would mean no limit at all.
    return max(int(seconds * 1000), 1) if seconds > 0 else 0


# The store's transactions run at READ COMMITTED, whatever the server, role or database make the
# default: an append's probe must see what committed while it waited for the append lock, which
# a REPEATABLE READ or SERIALIZABLE snapshot (taken when the lock's statement starts) does not.
# SQLAlchemy's level (else it puts back the default it found at first connect), the append's own
# BEGIN, and, with the session's idle limit (not behind a transaction pooler, see the README),
# the session's default, which the implicit transaction of a one-trip append takes.
PG_ISOLATION = "READ COMMITTED"
# The idle limit is set only where nothing set it (the server, the role, the database or the
# URL's `options`).
_IDLE_DEFAULT_SQL = ("SELECT set_config('default_transaction_isolation', 'read committed', "
                     "false), CASE WHEN current_setting('idle_in_transaction_session_timeout') "
                     "= '0' THEN set_config('idle_in_transaction_session_timeout', %s, false) "
                     "END")


# libpq's TCP settings unless the URL gives its own: a server that stops answering (a network
# partition, a host gone) is given up on after about a minute, whether the client is waiting for
# an answer (keepalives) or for the server to take what it sent (tcp_user_timeout), instead of
# the operating system's two hours and more.  The call then fails with a transient error (a
# subscription retries, and checks its stop event).
_PG_TCP = {"keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
           "keepalives_count": "3", "tcp_user_timeout": "60000"}


def pg_connect_args(url: URL) -> dict[str, Any]:
    """The connection arguments the store adds to a PostgreSQL URL (see ``_PG_TCP``), and
    UTF-8 as the client encoding whatever the URL, ``PGCLIENTENCODING``, the role or the
    database say: ids and payloads are any Unicode (another encoding failed them with a bare
    UnicodeEncodeError, or the server refused a projector's batch).

    ``?prepare_threshold=`` (psycopg's: executions before a statement is prepared on the
    server; ``none``: never) as the number psycopg takes (from the URL it was a string, and
    failed the first statement with a bare TypeError).  ``none`` behind a pooler that hands
    server sessions to other clients between transactions (PgBouncer's transaction pooling
    before 1.21), where the next transaction's session lacks the statements this one prepared."""
    args: dict[str, Any] = {**{k: v for k, v in _PG_TCP.items() if k not in url.query},
                            "client_encoding": "utf8"}
    if "prepare_threshold" in url.query:
        raw = str(url.query["prepare_threshold"]).strip().lower()
        if raw == "none":
            args["prepare_threshold"] = None
        elif raw.isascii() and raw.isdigit():
            args["prepare_threshold"] = int(raw)
        else:
            raise InvalidArgument(f"prepare_threshold must be a whole number or none, not "
                                  f"{url.query['prepare_threshold']!r}")
    return args


def pg_listeners(engine: Engine) -> None:
    """A pooled PostgreSQL connection the server hung up on while it sat in the pool is
    replaced when checked out, instead of failing the caller's next statement.

    Each new connection's session ends a transaction left idle for ``EVENTSTORE_PG_IDLE_TIMEOUT``
    (60 s) unless its idle limit is set already: an appender that freezes holding the append
    lock (a stopped process, a host gone quiet) would otherwise stop every append of the
    database until TCP gives up on it.  Projectors set their own limit per batch.  With it,
    the session's transactions default to READ COMMITTED (see ``PG_ISOLATION``)."""
    idle_ms = pg_idle_timeout_ms()

    if idle_ms:  # (0: no session setting at all, for poolers that share server sessions)
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            try:
                cur.execute(_IDLE_DEFAULT_SQL, (str(idle_ms),))
            finally:
                cur.close()
            dbapi_conn.commit()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        if closed_while_idle(getattr(dbapi_conn, "driver_connection", dbapi_conn)):
            raise sa_exc.DisconnectionError("the server closed the connection while it was idle")

    _refuse_commit_of_failed(engine.dialect)


def _refuse_commit_of_failed(dialect: Any) -> None:
    """A commit of a PostgreSQL transaction in which a statement failed raises, instead of
    rolling back in silence.

    Why: after a failed statement PostgreSQL aborts the transaction, and its COMMIT then rolls
    back without an error.  Code of the caller's inside the store's transaction (an inline
    handler, a ``before_commit`` hook, a ``run_sync`` function) that catches such an error
    (``except IntegrityError: pass``) made an append report positions it never wrote, which
    the next append was given again (a tester's find).  SQLite does not abort a transaction on
    a failed statement.
    """
    commit = dialect.do_commit

    def do_commit(dbapi_connection: Any) -> None:
        driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        info = getattr(driver, "info", None)
        if info is not None and info.transaction_status == _INERROR:
            raise DatabaseError(
                "a statement of this transaction failed (its error was caught inside the "
                "transaction: an inline handler, a before_commit hook, a run_sync function), "
                "so PostgreSQL rolled it back: nothing was written")
        commit(dbapi_connection)

    dialect.do_commit = do_commit


_INERROR = 3  # psycopg.pq.TransactionStatus.INERROR (libpq's PQTRANS_INERROR)


def hung_up(conn: Connection) -> bool:
    """Whether the server hung up on a kept, still open PostgreSQL connection while it was idle
    (:func:`closed_while_idle`): the kept write connections, sync and async, check before use."""
    return not conn.invalidated and not conn.closed \
        and closed_while_idle(conn.connection.driver_connection)


def closed_while_idle(driver: Any) -> bool:
    """Whether an idle psycopg connection (sync or async) is closed or about to fail.

    With nothing in flight the server sends nothing, so a readable socket means it hung up (a
    terminated backend, a restart, ``idle_session_timeout``) or, rarely, sent an unasked
    notice; either way the connection is not used for a new transaction.  One ``poll`` of the
    socket, about a microsecond.
    """
    if getattr(driver, "closed", False) or getattr(driver, "broken", False):
        return True
    pgconn = getattr(driver, "pgconn", None)
    if pgconn is None:
        return False
    try:
        fd = pgconn.socket
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    except Exception:  # no socket any more
        return True


def _sqlite_settings(url: URL) -> tuple[URL, str, int, bool]:
    synchronous = str(url.query.get("synchronous", "FULL")).upper()
    if synchronous not in ("FULL", "NORMAL", "EXTRA"):
        raise InvalidArgument(
            f"sqlite synchronous must be FULL, NORMAL or EXTRA, not {synchronous}")
    try:
        if "busy_timeout" not in url.query and "timeout" in url.query:
            # The driver's own option (seconds): the store's busy_timeout, set after it at each
            # connect, would otherwise replace it with the default.
            busy_ms = round(float(str(url.query["timeout"])) * 1000)
        else:
            busy_ms = int(str(url.query.get("busy_timeout", "30000")))
    except (ValueError, OverflowError) as e:
        raise InvalidArgument("sqlite busy_timeout must be milliseconds (timeout: seconds)"
                              ) from e
    if not 0 <= busy_ms < 2**31:
        raise InvalidArgument(f"sqlite busy_timeout must be 0 to 2**31 - 1 milliseconds, "
                              f"not {busy_ms}")
    # A misspelt option would be dropped with only a warning (the store running with the
    # default it was meant to change).  SQLite URI parameters pass with ``uri=true``.
    uri = sqlite_uri(url)  # (checked whatever else the URL holds)
    unknown = sorted(set(url.query) - _SQLITE_OPTIONS_ALL)
    if unknown and not uri:
        raise InvalidArgument(
            f"unknown sqlite URL option(s) {', '.join(unknown)}: the store takes "
            f"{', '.join(_SQLITE_OPTIONS)}, the driver {', '.join(_PYSQLITE_OPTIONS)}")
    clean = url.difference_update_query(_SQLITE_OPTIONS)
    memory = is_memory(url)
    if uri and str(url.query.get("cache", "")).lower() == "shared":
        raise InvalidArgument(
            "sqlite cache=shared is not supported: the store's connections need locks of "
            "their own (a shared cache's table locks fail at once, without waiting for "
            "busy_timeout); an in-memory database is already one connection per store, and "
            "two stores cannot share one")
    if uri and unknown and not (clean.database or "").startswith("file:"):
        # SQLite reads options only from a file: URI: they would become part of the name.
        raise InvalidArgument(
            f"sqlite option(s) {', '.join(unknown)} with uri=true need a file: URI "
            "(sqlite:///file:path?uri=true&...)")
    return clean, synchronous, busy_ms, memory


def sqlite_file(url: URL) -> Path | None:
    """The file a SQLite URL names, by its path or as a ``file:`` URI (``?uri=true``);
    ``None`` for memory or another database."""
    if not is_sqlite(url) or is_memory(url):
        return None
    path = url.database or ""
    if sqlite_uri(url) and path.startswith("file:"):
        return _uri_file(url)
    return Path(path)


def missing_sqlite_file(url: URL) -> Path | None:
    """The file a SQLite URL names when it is not there (else ``None``); raises the
    DatabaseError of :func:`refuse_orphaned_wal` when its write-ahead log is."""
    path = sqlite_file(url)
    if path is None or path.exists():
        return None
    _refuse_if_orphaned_wal(path)
    return path


def _uri_file(url: URL) -> Path | None:
    """The file a SQLite URI URL (``file:…?uri=true``) names, if it names one."""
    database = url.database or ""
    if not database.startswith("file:") or url.query.get("mode") == "memory":
        return None
    # SQLite's path ends at "?" or "#" (SQLAlchemy has already decoded a %3F), then it
    # decodes the path's own %XX.
    rest = urllib.parse.unquote(re.split(r"[?#]", database[len("file:"):], maxsplit=1)[0])
    if rest.startswith("//"):  # file://host/path (only localhost, or no host, is local)
        rest = "/" + rest[2:].partition("/")[2]
    return Path(rest) if rest and rest != ":memory:" else None


def _refuse_if_orphaned_wal(path: Path) -> None:
    # SQLite names the log after the file a symlink points to.
    real = Path(os.path.realpath(path))
    wal = real.with_name(real.name + "-wal")
    with contextlib.suppress(OSError):
        if not path.exists() and wal.stat().st_size > 0:
            raise DatabaseError(
                f"the database file {path} is missing but its write-ahead log {wal} is "
                "there: what is left of a database moved or deleted while in use, which "
                "may hold its last commits. Not opened, so that SQLite does not reset that "
                "log: put the database file back, or move the -wal and -shm files away to "
                "start afresh")


def refuse_orphaned_wal(engine: Engine, url: URL) -> None:
    """Refuse to connect to a SQLite file that is missing while its write-ahead log is there.

    Why: that log is what is left of a database moved or deleted while in use, and may hold
    its last commits; SQLite would create an empty database at the path and reset the log,
    losing them.  Checked before each new connection (also a running store's pool opening
    one after the file was moved away), for a path or a ``file:`` URI.
    """
    path = sqlite_file(url)
    if path is None:
        return

    @event.listens_for(engine, "do_connect")
    def _before_connect(*_args: Any) -> None:
        _refuse_if_orphaned_wal(path)


def explained_open_error(url: URL, error: DatabaseError) -> DatabaseError:
    """The error of a SQLite store that could not open its file, saying which file and the
    likely reason (SQLite says only "unable to open database file" or "attempt to write a
    readonly database"); any other error as it is."""
    path = sqlite_file(url)
    text = str(error)
    if path is None or not any(sign in text for sign in _CANNOT_OPEN):
        return error
    folder = path.parent if str(path.parent) else Path(".")
    if str(path).startswith("~"):
        why = "'~' is not expanded in a URL: write the full path"
    elif not folder.is_dir():
        why = f"its folder {folder} does not exist"
    elif not os.access(folder, os.W_OK | os.X_OK):
        why = (f"this process may not write in its folder {folder} (SQLite makes its -wal and "
               "-shm files there, for readers too)")
    elif path.exists() and not os.access(path, os.R_OK | os.W_OK):
        why = "this process may not read and write the file"
    else:
        why = "see the cause"
    explained = DatabaseError(f"cannot open the SQLite database {path}: {why} ({text})")
    explained.transient, explained.sqlstate = error.transient, error.sqlstate
    return explained


_CANNOT_OPEN = ("unable to open database file", "attempt to write a readonly database")


def sqlite_uri(url: URL) -> bool:
    """Whether a SQLite URL names its database as a SQLite URI (``?uri=true``), read as
    SQLAlchemy's dialect reads it."""
    try:
        return bool(sa_util.asbool(url.query.get("uri", False)))
    except ValueError as e:
        raise InvalidArgument(f"sqlite uri must be true or false, not {url.query['uri']!r}") from e


def _sqlite_engine(url: URL) -> Engine:
    clean, synchronous, busy_ms, memory = _sqlite_settings(url)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if memory:
        kwargs["poolclass"] = StaticPool
    engine = create_engine(clean, **kwargs)
    refuse_orphaned_wal(engine, url)
    _sqlite_listeners(engine, synchronous, busy_ms, memory, sqlite_file(url))
    if memory:
        _one_connection[engine] = _Turns()
    return engine


class _Turns:
    """The transactions on an in-memory SQLite database take turns.

    Why: the database is one connection (``StaticPool``), which every thread's transactions
    would share: a read beginning during an append fails its BEGIN, and the clean-up of that
    failure rolls back the append under way, whose later statements then commit one by one.
    A transaction begun on a thread that is already in one cannot share the connection either:
    it is refused (:class:`InvalidArgument`) instead of waiting for itself.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._after: list[Callable[[], None]] = []  # to run when the turn under way ends

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:
            raise InvalidArgument(
                "an in-memory SQLite store runs one transaction at a time, and this thread is "
                "in one already (an append or read from inside an append or a read): use a "
                "database file for that")
        with self._lock:
            try:
                self._owner = me  # (inside: an interrupt right after it still resets it)
                yield
            finally:
                self._owner = None
                after, self._after = self._after, []
                for run in after:
                    run()

    def alone(self, run: Callable[[], None]) -> None:
        """Run ``run`` (a close of the store: its connection is the database) while no
        transaction is under way; called from inside one on this thread (a signal handler, a
        hook), when that one ends.  Closing the connection under a statement another thread
        runs on it crashed the process."""
        if self._owner == threading.get_ident():
            self._after.append(run)
            return
        with self._lock:
            run()


_one_connection: weakref.WeakKeyDictionary[Engine, _Turns] = weakref.WeakKeyDictionary()


def _turn(engine: Engine) -> contextlib.AbstractContextManager[None]:
    """A turn on ``engine``'s one connection when it is an in-memory SQLite database."""
    turns = _one_connection.get(engine)
    return contextlib.nullcontext() if turns is None else turns.turn()


def when_alone(engine: Engine, run: Callable[[], None]) -> None:
    """Run ``run`` now, or, for an in-memory SQLite database, between transactions (see
    :meth:`_Turns.alone`)."""
    turns = _one_connection.get(engine)
    if turns is None:
        run()
    else:
        turns.alone(run)


def _sqlite_listeners(engine: Engine, synchronous: str, busy_ms: int, memory: bool,
                      path: Path | None = None) -> None:
    """``path``: the file the URL names (:func:`sqlite_file`), whose identity each write
    checks; else the file SQLite says it opened."""
    named = None if path is None else os.path.abspath(path)  # (symlinks kept: repointed is new)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Turn off the sqlite3 module's own implicit transactions: the store begins them itself
        # (see _on_begin), so that writers can take the write lock up front.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
        if not memory:
            _wal_mode(cur, busy_ms)
        cur.execute(f"PRAGMA synchronous = {synchronous}")
        if not memory:
            cur.execute("PRAGMA database_list")
            file = next((row[2] for row in cur.fetchall() if row[1] == "main"), "")
            if file:
                # The path the URL names (so that a symlink repointed is a new file), while
                # it leads to the file SQLite opened; else that file's own.
                watched = (named if named is not None
                           and os.path.realpath(named) == os.path.realpath(file) else file)
                with contextlib.suppress(OSError):
                    _record.info[_FILE_KEY] = (watched, _identity(os.stat(file)))
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers say BEGIN IMMEDIATE: they take SQLite's single write lock before they read the
        # stream version, so the check and the insert cannot interleave with another writer and no
        # deferred transaction fails late with SQLITE_BUSY on its first write.
        # Straight on the DBAPI cursor: exec_driver_sql's bookkeeping costs more than BEGIN.
        write = conn.get_execution_options().get("sqlite_write")
        dbapi = conn.connection.dbapi_connection
        opened = conn.info.get(_FILE_KEY) if write else None
        if write:
            _check_same_file(opened)
            if opened is not None:
                _refuse_if_forked_mid_write(opened, busy_ms / 1000)
        # Noted before BEGIN IMMEDIATE: SQLite takes the lock inside it, and the thread may
        # wait for the GIL before it returns (a child forked while it waits for the lock is
        # noted too: its probe finds the lock free, see _refuse_if_forked_mid_write).
        if opened is not None:
            _writing[id(dbapi)] = (opened, dbapi)
        else:
            _writing.pop(id(dbapi), None)
        cur = dbapi_cursor(conn)
        try:
            cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except BaseException:
            _writing.pop(id(dbapi), None)
            raise
        finally:
            cur.close()

    # The write lock is let go inside the driver's COMMIT or ROLLBACK: noted as soon as that
    # returns (a child forked after it can write; SQLAlchemy's events come before the call).
    dialect: Any = engine.dialect
    for name in ("do_commit", "do_rollback"):
        setattr(dialect, name, _then_not_writing(getattr(dialect, name)))

    @event.listens_for(engine, "checkin")
    @event.listens_for(engine, "close")
    def _not_writing(dbapi_conn: Any, _record: Any) -> None:
        _writing.pop(id(dbapi_conn), None)


_FILE_KEY = "eventstore_sqlite_file"

# SQLite connections of this process in a write transaction, by id (the file they opened,
# and the connection): from just before their BEGIN IMMEDIATE until the dialect's COMMIT or
# ROLLBACK has returned (or end_transaction's own rollback; also their next transaction,
# checkin or close); and the files a forked child must not write to (see
# _refuse_if_forked_mid_write).  Until the commit has returned, not the driver's
# ``in_transaction``: SQLite leaves that before it writes the commit out, while it still holds
# the write lock (with synchronous=FULL, the longest part of an append).
_writing: dict[int, tuple[tuple[str, tuple[int, int]], Any]] = {}
_forked_mid_write: dict[tuple[int, int], str] = {}
_forked_stuck: set[tuple[int, int]] = set()  # noted files whose probe failed


def _then_not_writing(end: Callable[[Any], None]) -> Callable[[Any], None]:
    def ended(pooled: Any) -> None:
        try:
            end(pooled)
        finally:  # (SQLAlchemy hands the pool's wrapper of the DBAPI connection)
            _writing.pop(id(getattr(pooled, "dbapi_connection", pooled)), None)
    return ended


def _note_forked_mid_write() -> None:
    """In a forked child: the files a parent thread was writing to at the fork."""
    for (path, identity), _dbapi in list(_writing.values()):
        _forked_mid_write[identity] = path
        _forked_stuck.discard(identity)
    _writing.clear()


def _refuse_if_forked_mid_write(opened: tuple[str, tuple[int, int]], wait: float) -> None:
    """Refuse to write where this process was forked while its parent wrote.  Why: SQLite
    keeps its locks' state in the process, and the child inherits the record that one of its
    connections holds the database's write lock, which no connection of the child can ever
    release: each of its writes waited out the busy timeout and failed as transient, for good
    (also on a store opened after the fork).

    A file noted at the fork is probed first (the parent may have let the lock go as the fork
    came, or not yet have had it): if a new connection of this process takes the write lock
    within ``wait`` (the busy timeout), the child's state is sound and the note goes.  If not,
    the refusal stands for the rest of the process, and later writes are refused at once.
    """
    identity = opened[1]
    path = _forked_mid_write.get(identity)
    if path is None:
        return
    if identity not in _forked_stuck:
        if _write_lock_free_here(path, wait):
            del _forked_mid_write[identity]
            return
        _forked_stuck.add(identity)
    raise DatabaseError(
        f"this process was forked while its parent was writing to {path}: SQLite's lock "
        "state came over as it was then, and no connection of this process can write to "
        "that database; start worker processes with the 'spawn' or 'forkserver' method, "
        "or fork while no thread is inside SQLite")


def _write_lock_free_here(path: str, wait: float) -> bool:
    """Whether a new connection of this process takes SQLite's write lock on ``path`` within
    ``wait`` seconds (then lets it go).  In a child forked while its parent held it, it never
    does.  Opened read-write, never created (the file may have gone since it was checked)."""
    try:
        probe = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=rw", uri=True,
                                timeout=wait, isolation_level=None)
    except sqlite3.Error:
        return False
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return True
    except sqlite3.Error:
        return False
    finally:
        probe.close()


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _check_same_file(opened: tuple[str, tuple[int, int]] | None) -> None:
    """Refuse a write when the database file was removed or replaced since the connection
    opened it.  Why: SQLite goes on writing to the file it holds open (in WAL mode it does not
    notice), so each append would be acknowledged and then gone with the process."""
    if opened is None:
        return
    path, identity = opened
    try:
        now = _identity(os.stat(path))
    except OSError:
        now = None
    if now != identity:
        raise DatabaseError(
            f"the database file {path} was {'removed' if now is None else 'replaced'} while "
            "the store had it open: nothing written (close the store and open it again)")


def _wal_mode(cur: Any, busy_ms: int) -> None:
    """``PRAGMA journal_mode = WAL``, retried while another connection holds the lock it needs.

    Why: the first connections to a new database file race to switch it to WAL, and SQLite
    answers "database is locked" there without waiting in the busy handler (seen with four
    processes opening one fresh file at once).  Retried for up to the busy timeout.
    """
    deadline = time.monotonic() + busy_ms / 1000
    pause = 0.001
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except Exception as e:
            text = str(e).lower()
            if ("locked" not in text and "busy" not in text) or time.monotonic() >= deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def begin_write(engine: Engine) -> contextlib.AbstractContextManager[Connection]:
    """A write transaction: on SQLite it holds the write lock from its first statement."""
    return _begin(engine, write=True)


def begin_read(engine: Engine) -> contextlib.AbstractContextManager[Connection]:
    return _begin(engine, write=False)


def begin_snapshot(engine: Engine) -> contextlib.AbstractContextManager[Connection]:
    """A read whose statements all see one snapshot of the database: on PostgreSQL a
    REPEATABLE READ transaction (``begin_read`` runs each statement there in autocommit, on a
    snapshot of its own); on SQLite ``begin_read``'s transaction already is one.  For reads
    of several statements that must agree while other transactions delete rows."""
    return _begin(engine, write=False, snapshot=True)


@contextlib.contextmanager
def _begin(engine: Engine, *, write: bool, snapshot: bool = False) -> Iterator[Connection]:
    with _turn(engine), translate():
        if is_retired(engine):  # (closed since the caller checked: no new connection)
            raise StoreClosed("the event store is closed")
        # (Handed back to the pool of a store closed meanwhile, the connection is closed
        # there: see close_when_retired.)
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                if write:
                    conn = conn.execution_options(sqlite_write=True)
            elif snapshot:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            elif not write:
                # PostgreSQL reads run in autocommit: under READ COMMITTED every statement
                # takes its own snapshot, in a transaction or not, so BEGIN and COMMIT would
                # only add two round trips.  (SQLite keeps its read transaction: one snapshot
                # there.)
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            with own_transaction(conn):  # (a rollback that fails too keeps the first error)
                yield conn


_retired: weakref.WeakSet[Engine] = weakref.WeakSet()


def retire(engine: Engine) -> None:
    """Mark the engine of a store being closed (before its pool is disposed).

    Why: disposing of the pool closes the connections in it, not those out in calls still
    under way; those would go back to the discarded pool and stay open until the garbage
    collector found them.  Handed back to the pool of a retired engine, a connection is
    closed instead (:func:`close_when_retired`).
    """
    _retired.add(engine)


def is_retired(engine: Engine) -> bool:
    return engine in _retired


def close_when_retired(engine: Engine) -> None:
    """A connection handed back to the pool of a retired engine is closed there.

    Why: a connection out in a call while the store closes goes back to the pool after the
    pool was disposed of (also one whose call began before the close, handed back across
    awaits on aiosqlite and psycopg's async driver): it went into the discarded pool, open,
    for good with aiosqlite (whose thread holds it).  Only in
    the process that opened the connection: a forked child letting go of an inherited store
    must not close its parent's session (psycopg would say goodbye to the server on the
    socket they share).  An in-memory SQLite database's one connection is the database: the
    store's close closes it.
    """
    if is_memory(engine.url):
        return

    @event.listens_for(engine, "connect")
    def _opened_by(_dbapi_conn: Any, record: Any) -> None:
        record.info[_PID_KEY] = os.getpid()

    @event.listens_for(engine, "checkin")
    def _close_if_retired(dbapi_conn: Any, record: Any) -> None:
        if dbapi_conn is not None and engine in _retired \
                and record.info.get(_PID_KEY) == os.getpid():
            record.invalidate()


_PID_KEY = "eventstore_pid"


def is_memory(url: URL) -> bool:
    """An in-memory SQLite database: no file name, ``:memory:``, or a ``file:`` URI of one
    (``?mode=memory``, ``file::memory:``).  The store keeps one connection to it (each
    connection to such a database, unless shared, is a database of its own)."""
    if not is_sqlite(url):
        return False
    database = url.database or ""
    if database in ("", ":memory:"):
        return True
    return sqlite_uri(url) and database.startswith("file:") and _uri_file(url) is None


class Writer:
    """One connection kept for a store's own append transactions.

    Why: checking a connection out of the pool and back in, and building the ``Connection``
    around it, cost about as much CPU as the SQL of a one-event append.  Appends take turns on
    this connection (a lock in this process); that costs no concurrency, since appends already
    run one at a time (SQLite's write lock, the advisory lock on PostgreSQL, see
    :func:`lock_appends`).  An append started from inside an append on the same thread (from a
    ``before_commit`` hook or an inline handler) is refused: it would wait for the append lock
    its own caller holds (for ever on PostgreSQL).  After an error the transaction
    is rolled back and the connection kept, unless the connection itself broke; then it is
    closed and replaced.  A forked child starts with a fresh lock and opens its own connections
    (the engine's pool too, see _after_fork); on SQLite it cannot write to a database a parent
    thread was writing to at the fork (see :func:`_refuse_if_forked_mid_write`).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._pid = os.getpid()
        self._owner: int | None = None
        self._holding: set[int] = set()  # threads in holding_appends
        self._closed = False
        self._close_at_end = False  # closed from inside an append on its own thread
        self._entering: set[int] = set()  # threads taking the lock for begin()
        # A parent's connection seen in a forked child: never used, closed or let go (letting
        # it go would check the parent's DBAPI connection into the child's copy of the pool).
        self._inherited: list[Connection] = []
        _writers.add(self)

    def _after_fork(self) -> None:
        # The pool's connections are the parent's sockets: the child opens its own, and
        # leaves the parent's alone (close=False: closing would end the parent's sessions).
        self._engine.dispose(close=False)
        # A parent thread may have held the lock at the fork: the child's copy stays locked.
        self._lock = threading.Lock()
        self._owner = None
        self._holding = set()
        if self._conn is not None:
            self._inherited.append(self._conn)
            self._conn = None
        self._pid = os.getpid()

    def _refuse_nested(self) -> None:
        if self._owner == threading.get_ident() or threading.get_ident() in self._holding:
            raise InvalidArgument(
                "an append cannot start inside another append on the same thread (from a "
                "before_commit hook or an inline handler): it would wait for the append lock "
                "that append holds; write in the hook's transaction, or append after it")

    @contextlib.contextmanager
    def holding_appends(self) -> Iterator[None]:
        """Mark this thread, for the block, as in a transaction of its own that holds the
        append lock (a facade command deciding under it): an append started from inside it
        is refused, as from inside an append (see :meth:`begin`)."""
        self._refuse_nested()
        me = threading.get_ident()
        try:
            self._holding.add(me)  # (inside: an interrupt right after it still undoes it)
            yield
        finally:
            self._holding.discard(me)
            self._close_if_due()

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """A write transaction on the kept connection (see :func:`begin_write`)."""
        self._refuse_nested()
        me = threading.get_ident()
        with _turn(self._engine):
            try:
                self._entering.add(me)  # (a close() on this thread from here waits for nothing)
                with self._lock:
                    try:
                        # Set inside the try: a KeyboardInterrupt (a signal handler's
                        # exception) right after it left this thread's appends refused for
                        # good, as if nested in an append.
                        self._owner = me
                        self._entering.discard(me)
                        if self._closed:
                            raise StoreClosed("the event store is closed")
                        with translate():
                            conn = self._connection()
                            try:
                                with own_transaction(conn):
                                    yield conn
                            except BaseException:
                                if _broken(conn):
                                    self._discard()
                                raise
                    finally:
                        self._owner = None
                        if self._close_at_end:
                            self._close_at_end = False
                            self._discard()  # (its pool may be disposed of: closed, not kept)
            finally:
                self._entering.discard(me)

    def _close_if_due(self) -> None:
        """The close() deferred by a thread that held appends: done now unless an append is
        under way (whose end does it)."""
        if self._close_at_end and self._lock.acquire(blocking=False):
            try:
                if self._close_at_end:
                    self._close_at_end = False
                    self._discard()
            finally:
                self._lock.release()

    def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and self._engine.dialect.name == "postgresql" and hung_up(conn):
            self._discard()  # the server hung up since the last append: a new connection
            conn = None
        if conn is None or conn.invalidated or conn.closed:
            conn = self._engine.connect()
            if self._engine.dialect.name == "sqlite":
                conn.execution_options(sqlite_write=True)
            else:
                # The append sends its own BEGIN with its first statements (see
                # StoreCore._append_locked); commit and rollback still reach the server, as
                # psycopg's commit() and rollback() act on the server's transaction state.
                conn.execution_options(isolation_level="AUTOCOMMIT")
            self._conn = conn
        return conn

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()

    def close(self) -> None:
        """Release the kept connection (waits for an append in progress); later appends
        raise :class:`StoreClosed`.  Called from inside an append on the same thread (a
        signal handler, a ``before_commit`` hook), it cannot wait for that append: the append
        goes on, and the connection is closed when it ends."""
        me = threading.get_ident()
        if self._owner == me or me in self._entering or me in self._holding:
            # (This thread holds, or is taking, the lock, or the append lock itself.)
            self._closed = True
            self._close_at_end = True
            return
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()


@contextlib.contextmanager
def own_transaction(conn: Connection) -> Iterator[None]:
    """``conn.begin()``, except that after an error the connection is left outside any
    transaction, whatever failed: the body, the COMMIT, or the BEGIN itself.

    Why: a COMMIT that fails leaves SQLAlchemy's transaction attached to the connection (every
    later ``begin()`` on it is refused), and on SQLite it may leave the database's transaction
    open (a full disk), with the write lock.  A ``KeyboardInterrupt`` delivered just after
    ``BEGIN IMMEDIATE`` (see ``_on_begin``) escapes ``begin()`` with the driver inside a
    transaction SQLAlchemy does not know of.  A kept connection (``Writer``) in either state
    would fail every later append, and hold SQLite's write lock for every other writer.  A
    rollback that fails too (the connection closed under the transaction: a failed pipeline's
    clean-up, a cancelled query) does not replace the first error; the connection is
    invalidated instead.
    """
    try:
        trans = conn.begin()
    except BaseException:
        # (Interrupted after SQLAlchemy attached its transaction: that one, or none.)
        end_transaction(conn, conn.get_transaction())
        raise
    try:
        yield
        if trans.is_active:
            trans.commit()
    except BaseException:
        end_transaction(conn, trans)
        raise


def end_transaction(conn: Connection, trans: Transaction | None) -> None:
    """Roll back after an error: SQLAlchemy's transaction (also one a failed COMMIT left
    inactive but attached) and the driver's, which knows whether it is in one; if that fails,
    invalidate the connection (the caller raises the first error)."""
    try:
        if trans is not None:
            trans.rollback()
        if not conn.invalidated and not conn.closed:
            dbapi = conn.connection.dbapi_connection
            dbapi.rollback()  # type: ignore[union-attr]
            _writing.pop(id(dbapi), None)  # (past the dialect's do_rollback: see _writing)
    except Exception:
        conn.invalidate()


def _broken(conn: Connection) -> bool:
    """Whether an append's connection can no longer be used (else it is kept after an error:
    for an in-memory SQLite database, the connection is the database)."""
    if conn.invalidated or conn.closed:
        return True
    # The driver's own connection (psycopg's, sync or async; sqlite3's): it says if it broke.
    driver: Any = conn.connection.driver_connection
    return bool(getattr(driver, "closed", False) or getattr(driver, "broken", False))


_writers: weakref.WeakSet[Writer] = weakref.WeakSet()


def _reset_writers_after_fork() -> None:
    _note_forked_mid_write()
    for writer in list(_writers):
        writer._after_fork()
    for turns in list(_one_connection.values()):
        # A parent thread may have held the turn at the fork: the child's copy stays locked.
        turns._lock = threading.Lock()
        turns._owner = None


os.register_at_fork(after_in_child=_reset_writers_after_fork)


def dbapi_cursor(conn: Connection) -> Any:
    """A cursor of the connection's DBAPI connection, for the statements the store runs on it
    directly (see :mod:`eventstore._sql`).

    On psycopg's async driver (inside ``AsyncConnection.run_sync``), a cursor of the driver's
    own connection rather than SQLAlchemy's adapter, which fetches every result at once and
    so breaks psycopg's pipelines (see :mod:`eventstore._pg_async`).
    """
    pooled = conn.connection
    dbapi: Any = pooled.dbapi_connection
    if is_async_psycopg(dbapi):
        return facade_of(pooled.driver_connection).cursor()
    return dbapi.cursor()


def one_trip_possible(aio: Any) -> bool:
    """Whether a function can be run on this aiosqlite connection's thread (its ``_execute``,
    stable since aiosqlite 0.17 though not documented; see ``aio._SQLiteThreadTransactions``)."""
    return callable(getattr(aio, "_execute", None)) and hasattr(aio, "_conn")


def lock_appends(conn: Connection) -> None:
    """Serialize appenders on PostgreSQL for the rest of the transaction.

    Why: positions must be visible in the order they were assigned, or a reader that resumes from
    the last position it saw would skip an event that commits later with a lower position.  With
    this transaction-scoped advisory lock, an appender reads the last position and inserts after it
    only once the previous appender has committed (PostgreSQL releases the lock after the commit is
    visible), so position order is commit order.  SQLite needs nothing: BEGIN IMMEDIATE already
    admits one writer at a time.
    """
    if conn.dialect.name == "postgresql":
        cur = dbapi_cursor(conn)
        cur.execute(_APPEND_LOCK_SQL)
        cur.close()


def lock_migrations(conn: Connection) -> None:
    """Take the migration lock for the rest of the transaction (see lock_appends for SQLite)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _signed(MIGRATE_LOCK_KEY)})


def _signed(key: int) -> int:
    return key - (1 << 64) if key >= 1 << 63 else key


# A constant (no parameters), run on the DBAPI cursor like the other hot-path statements.
APPEND_LOCK_ID = _signed(APPEND_LOCK_KEY)  # as pg_advisory_xact_lock takes it
_APPEND_LOCK_SQL = f"SELECT pg_advisory_xact_lock({APPEND_LOCK_ID})"


def _driver_errors() -> tuple[type[Exception], ...]:
    errors: list[type[Exception]] = [sqlite3.Error]
    try:  # psycopg is optional (the "postgres" extra)
        import psycopg
    except ImportError:
        pass
    else:
        errors.append(psycopg.Error)
    return tuple(errors)


_DRIVER_ERRORS = _driver_errors()
_TRANSLATED: tuple[type[Exception], ...] = (sa_exc.SQLAlchemyError, *_DRIVER_ERRORS)


@contextlib.contextmanager
def translate() -> Iterator[None]:
    """Translate driver errors into the store's error tree, in one place.

    A driver error that replaced an interrupt raised inside the block (Ctrl-C, or an exception
    a signal handler raised, while psycopg ended a pipeline: "cannot exit pipeline mode while
    busy") gives the interrupt back: translated, it read as a transient database error, for
    an append that may have committed, and the caller's Ctrl-C was lost.
    """
    handling = sys.exception()  # (an exception the caller is handling is not ours)
    try:
        yield
    except EventStoreError:
        raise
    except AssertionError as e:  # SQLAlchemy's, in a finally an interrupt went through
        interrupt = _interrupt_under(e, handling) if _raised_in_sqlalchemy(e) else None
        if interrupt is not None:
            raise interrupt from None
        raise
    except _TRANSLATED as e:
        interrupt = _interrupt_under(e, handling)
        if interrupt is not None:
            raise interrupt from None
        if isinstance(e, sa_exc.DBAPIError):
            raise _database_error(f"database error: {e.orig or e}", e) from e
        if isinstance(e, sa_exc.SQLAlchemyError):
            raise _database_error(f"database error: {e}", e) from e
        # (statements the store runs on the DBAPI cursor itself)
        raise _database_error(f"database error: {type(e).__name__}: {e}", e) from e


def _raised_in_sqlalchemy(error: BaseException) -> bool:
    """Whether ``error`` was raised by SQLAlchemy's own code (not by a hook's or a handler's,
    whose assertion is the caller's to see, whatever it was handling)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.sep}sqlalchemy{os.sep}" in tb.tb_frame.f_code.co_filename


def _interrupt_under(error: BaseException, handling: BaseException | None
                     ) -> BaseException | None:
    """An exception that is not an ``Exception`` (``KeyboardInterrupt``, ``SystemExit``, a
    signal handler's) that ``error`` was raised in the handling of, above ``handling``."""
    todo: list[BaseException | None] = [error]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is None or e is handling or id(e) in seen:
            continue
        seen.add(id(e))
        if not isinstance(e, (Exception, GeneratorExit, asyncio.CancelledError)):
            return e  # (a generator closed, a task cancelled: the ordinary flow, not ours)
        todo.extend((e.__cause__, e.__context__, getattr(e, "orig", None)))
    return None


def _database_error(message: str, cause: BaseException) -> DatabaseError:
    driver = _driver_error(cause)
    state = getattr(driver, "sqlstate", None)
    if isinstance(driver, sqlite3.Error) and "database is locked" in message:
        message += (" (another connection held SQLite's write lock longer than busy_timeout: "
                    "?busy_timeout=<ms> in the URL waits longer)")
    elif state in _PREPARED_LOST and "_pg3_" in message:
        message += (" (psycopg's prepared statements do not survive a pooler that hands server "
                    "sessions to other clients between transactions: add "
                    "?prepare_threshold=none to the URL)")
    error = DatabaseError(message)
    error.transient = is_transient(cause)
    error.sqlstate = state if isinstance(state, str) else None
    return error


# A prepared statement that already exists, or does not: on a session not the one that made it.
_PREPARED_LOST = frozenset({"42P05", "26000"})


def _driver_error(error: BaseException) -> BaseException:
    """The driver's own error under a SQLAlchemy one."""
    if isinstance(error, sa_exc.DBAPIError) and error.orig is not None:
        return error.orig
    return error


# SQLSTATEs worth another try (on a new connection if need be): connection exceptions but a
# protocol violation, transaction rollbacks (serialization failure, deadlock), too many
# connections or out of memory, lock not available, a statement cancelled (statement_timeout:
# mostly a wait for a lock), the server shutting down or ending an idle session or
# transaction.  Not a full disk, which stays full.
_TRANSIENT_CLASSES = ("08", "40")
_TRANSIENT_STATES = frozenset({"53200", "53300", "55P03", "57014", "57P01", "57P02", "57P03",
                               "57P05", "25P03", "25P04"})
_NOT_TRANSIENT = frozenset({"08P01"})
_SQLITE_BUSY = 5  # SQLITE_BUSY and its extended codes: another connection holds a lock
# What psycopg's errors without a SQLSTATE say when the connection itself was lost.
_LOST = ("server closed the connection", "connection is lost", "consuming input failed",
         "invalid socket", "connection to server was lost", "ssl syscall error",
         "eof detected")
# psycopg's own errors without a server state are the connection's (lost, refused, not
# resolved, timed out), but for these, which are the caller's: misuse, or a configuration
# (database, role, password) the server refuses at connect.
_CALLERS = ("number of parameters", "query parameter", "cannot adapt", "does not exist",
            "password authentication failed", "no password supplied",
            "no pg_hba.conf entry")


# What SQLAlchemy's pool raises when a connection lost at checkout (see pg_listeners) is replaced
# and the new one is lost too (it tries twice): a lost connection like any other.
_CHECKOUT_GAVE_UP = "This connection is closed"


def is_transient(error: BaseException) -> bool:
    """Whether a driver or SQLAlchemy error may pass if the call is tried again."""
    if isinstance(error, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        return True  # a connection lost, or none free in the pool in time
    if type(error) is sa_exc.InvalidRequestError and str(error) == _CHECKOUT_GAVE_UP:
        return True  # the pool's reconnects at checkout were each lost too
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    error = _driver_error(error)
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        if isinstance(code, int):
            return code & 0xFF == _SQLITE_BUSY
        return "database is locked" in str(error)
    state = getattr(error, "sqlstate", None)
    if isinstance(state, str):
        return state not in _NOT_TRANSIENT and (
            state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES)
    names = {c.__name__ for c in type(error).__mro__ if c.__module__.startswith("psycopg")}
    text = str(error).lower()
    if names and any(sign in text for sign in _LOST):
        # A lost connection, whatever class psycopg gave it: cleaning up a failed pipeline it
        # raises a plain DatabaseError (no SQLSTATE) for the socket the server closed.
        return True
    if "OperationalError" not in names:
        return False
    return not any(sign in text for sign in _CALLERS)
