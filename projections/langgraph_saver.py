"""LangGraph checkpoint savers on the event store: ``EventStoreSaver`` and ``AsyncEventStoreSaver``.

Every checkpoint, every pending write (interrupts and resume values included) and every retention
operation is an event on the thread's stream ``lgthread-<thread id>`` (tenant: the saver's
``tenant_id``).  The saver's reads are projections of those events: three index tables
(migration 0003), filled by an inline handler in the append's transaction, say which event holds
which checkpoint, channel value and pending write.  Checkpoints, values and writes themselves live
only in the log; :func:`rebuild_index` replays the log into the index.

Storage is linear in the thread's length: a ``CheckpointSaved`` event carries only the values of
the channels whose version changed (``new_versions``).  A checkpoint's value of a channel is the
value the first event of the thread namespace stored for that ``(channel, version)`` (LangGraph
gives a value one version, and :meth:`get_next_version` makes versions unique across forks);
``es_lg_blobs`` finds that event, one row per version.  ``get_tuple`` is two statements whatever
the length of the thread: the checkpoint with its event, then its versions' and its pending
writes' rows with their events.

Retention (``delete_thread``, ``prune``, ``delete_for_runs``) is recorded as an event
(``ThreadDeleted``, ``CheckpointsPruned``, ``RunsDeleted``) and removes index rows only: the
events stay in the log, as every event does.  Physically trimming or crypto-shredding the log is
out of scope.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import concurrent.futures
import contextlib
import copy
import itertools
import math
import secrets
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import msgspec
import ormsgpack
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PendingWrite,
    get_checkpoint_id,
    get_serializable_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.constants import TASKS
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    LargeBinary,
    MetaData,
    Select,
    String,
    Table,
    Text,
    and_,
    bindparam,
    delete,
    exists,
    literal,
    null,
    select,
    true,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import ClauseElement

from eventstore import Event, EventStore, RecordedEvent
from eventstore._backend import (
    begin_read,
    begin_snapshot,
    begin_write,
    dbapi_cursor,
    lock_appends,
)
from eventstore._bound import BoundStore, transaction
from eventstore._core import _pipeline, _psycopg, check_storable, no_stop_iteration
from eventstore._schema import events as es_events
from eventstore._schema import streams as es_streams
from eventstore._sql import Compiled
from eventstore.codec import check_finite, decode_event, decode_events, encode_event
from eventstore.errors import EventTooLarge, InvalidArgument, WrongExpectedVersion
from eventstore.logs import get_logger
from projections._command import check_tenant
from projections._stores import check_async_store, check_sync_store

if TYPE_CHECKING:
    from eventstore.aio import AsyncEventStore

__all__ = [
    "CATEGORY",
    "aimport_checkpoints",
    "import_checkpoints",
    "AsyncEventStoreSaver",
    "ChannelValuesSaved",
    "CheckpointSaved",
    "CheckpointsPruned",
    "EventStoreSaver",
    "RunsDeleted",
    "ThreadCopied",
    "ThreadDeleted",
    "ThreadsNotImported",
    "WritesSaved",
    "index_events",
    "rebuild_index",
    "stream_id_of",
]

CATEGORY = "lgthread"
_PREFIX = CATEGORY + "-"
DEFAULT_TENANT = "default"
PRUNE_STRATEGIES = ("keep_latest", "delete")
_CHUNK = 256  # values per IN list: event positions, versions, checkpoint ids
_LIST_PAGE = 128  # checkpoints whose values a list() loads per transaction
# Across threads, each page sorts the index rows after the last one: pages double up to this.
_LIST_PAGE_MAX = 1024
# keep_latest plans read without the append lock before the plan and its event go into one
# transaction holding it (a busy thread can move on between an unlocked plan and its append).
_OPTIMISTIC_PRUNES = 3

Version = str | int | float
_T = TypeVar("_T")
_E = TypeVar("_E", bound=Event)
_log = get_logger("eventstore.langgraph")


MAX_THREAD_ID_LENGTH = 255 - len(_PREFIX)  # a stream id is at most 255 characters


def _checkpoint_id(value: object) -> str:
    """A checkpoint id from a config: a string both databases store."""
    if not isinstance(value, str):
        raise InvalidArgument(f"checkpoint_id must be a string, got {type(value).__name__}")
    return check_storable(value, "checkpoint_id", InvalidArgument)


def _optional_checkpoint_id(config: RunnableConfig) -> str | None:
    """The config's checkpoint id, or None; an empty one is none, as LangGraph's savers take
    it (the latest checkpoint, every checkpoint of a list)."""
    value = get_checkpoint_id(config)
    return None if value is None or value == "" else _checkpoint_id(value)


def _text(value: object, what: str) -> str:
    """An id from LangGraph's config as text both databases store (``InvalidArgument`` for a NUL
    character, which PostgreSQL's text refuses, or a lone surrogate)."""
    return check_storable(str(value), what, InvalidArgument)


# PostgreSQL's b-tree refuses an index row over 2,704 bytes: the index tables' keys (tenant id,
# thread id, checkpoint_ns, and a checkpoint id or a channel with its version) are kept under this,
# on both databases, so the same ids get the same answer on both.
MAX_KEY_BYTES = 2400


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def check_key_size(tenant_id: str, thread_id: str, ns: str, checkpoint_id: str | None,
                   *channels: Mapping[str, Version]) -> None:
    """``InvalidArgument`` when a key of the index tables would be over ``MAX_KEY_BYTES`` (UTF-8):
    the tenant id, thread id and checkpoint_ns with the checkpoint id, or with a channel name and
    its version."""
    longest = [len(checkpoint_id or "")]
    for versions in channels:
        if versions:  # (a number's key is "i:" or "f:" and its text)
            longest.append(max(map(len, versions)) + 2 + max(map(len, map(str, versions.values()))))
    if (len(tenant_id) + len(thread_id) + len(ns) + max(longest)) * 4 <= MAX_KEY_BYTES:
        return  # the usual case: no character takes more than 4 bytes
    fixed = _utf8_len(tenant_id) + _utf8_len(thread_id) + _utf8_len(ns)
    parts = [("the checkpoint id", len(checkpoint_key(checkpoint_id)))] if checkpoint_id else []
    parts += [(f"channel {ch[:40]!r} with its version",
               _utf8_len(ch) + _utf8_len(version_key(v)))
              for versions in channels for ch, v in versions.items()]
    for what, size in parts or [("", 0)]:
        if fixed + size > MAX_KEY_BYTES:
            raise InvalidArgument(
                f"the tenant id, thread id, checkpoint_ns{' and ' + what if what else ''} take "
                f"{fixed + size:,} bytes (UTF-8); this saver's index keys hold at most "
                f"{MAX_KEY_BYTES:,} (PostgreSQL's b-tree limit)")


def stream_id_of(thread_id: str) -> str:
    """The stream of a LangGraph thread (``InvalidArgument`` for a thread id over
    ``MAX_THREAD_ID_LENGTH`` characters, 246)."""
    if len(thread_id) > MAX_THREAD_ID_LENGTH:
        raise InvalidArgument(f"thread_id is {len(thread_id)} characters long; this saver keeps "
                              f"threads of up to {MAX_THREAD_ID_LENGTH} (its stream "
                              f"{_PREFIX}<thread_id> is at most 255)")
    return _PREFIX + thread_id


# -- events ---------------------------------------------------------------------------------------


class Blob(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """One channel value: ``serde.dumps_typed`` output (``type`` "empty": the channel has none).

    ``version`` None: the version the checkpoint of the event gives the channel.
    """

    channel: str
    data: bytes
    type: str = "msgpack"
    version: Version | None = None


class Write(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """One pending write; ``idx`` follows ``WRITES_IDX_MAP`` (negative for special channels)."""

    idx: int
    channel: str
    data: bytes
    type: str = "msgpack"


# Short JSON names: these events are most of what a thread stores.
class CheckpointSaved(Event, tag="lg.CheckpointSaved", omit_defaults=True, gc=False):
    """A checkpoint, with the values of the channels whose version changed (``new_versions``)."""

    __check_on_append__ = False  # built from values _check_checkpoint/_check_writes checked

    id: str
    v: int
    ts: str
    ns: str = ""
    parent: str | None = None
    versions: dict[str, Version] = msgspec.field(default_factory=dict, name="cv")
    seen: dict[str, dict[str, Version]] = msgspec.field(default_factory=dict, name="vs")
    # True: the channels of ``blobs``, sorted (what LangGraph's updated_channels usually is).
    updated: builtins.list[str] | bool | None = msgspec.field(default=None, name="uc")
    extra: dict[str, Any] = msgspec.field(default_factory=dict, name="x")
    metadata: dict[str, Any] = msgspec.field(default_factory=dict, name="md")
    blobs: builtins.list[Blob] = msgspec.field(default_factory=builtins.list, name="b")

    def version_of(self, blob: Blob) -> Version | None:
        return blob.version if blob.version is not None else self.versions.get(blob.channel)

    def updated_channels(self) -> builtins.list[str] | None:
        if self.updated is True:
            return sorted(b.channel for b in self.blobs)
        return self.updated if isinstance(self.updated, builtins.list) else None


class ChannelValuesSaved(Event, tag="lg.ChannelValuesSaved", omit_defaults=True,
                         gc=False):
    """Channel values of a checkpoint too large to travel in its ``CheckpointSaved`` event
    (each blob with its version)."""

    __check_on_append__ = False  # built from values _check_checkpoint/_check_writes checked

    checkpoint_id: str = msgspec.field(name="cp")
    blobs: builtins.list[Blob] = msgspec.field(name="b")
    ns: str = ""

    def version_of(self, blob: Blob) -> Version | None:
        return blob.version


class WritesSaved(Event, tag="lg.WritesSaved", omit_defaults=True, gc=False):
    """A task's pending writes for a checkpoint (``upsert``: special channels only, which replace
    earlier writes at their index; other writes never replace one)."""

    __check_on_append__ = False  # built from values _check_checkpoint/_check_writes checked

    checkpoint_id: str = msgspec.field(name="cp")
    task_id: str = msgspec.field(name="task")
    writes: builtins.list[Write] = msgspec.field(name="w")
    ns: str = ""
    task_path: str = msgspec.field(default="", name="path")
    upsert: bool = False


class ThreadDeleted(Event, tag="lg.ThreadDeleted", omit_defaults=True):
    """``delete_thread``: the thread's checkpoints and writes leave the index (not the log)."""


class CheckpointsPruned(Event, tag="lg.CheckpointsPruned", omit_defaults=True):
    """``prune``: every checkpoint but ``kept`` (namespace -> ids) leaves the index, with its
    writes; channel values no kept checkpoint uses leave it too."""

    strategy: str
    kept: dict[str, builtins.list[str]] = msgspec.field(default_factory=dict)


class RunsDeleted(Event, tag="lg.RunsDeleted", omit_defaults=True):
    """``delete_for_runs``: the thread's checkpoints of these runs leave the index."""

    run_ids: builtins.list[str]


class ThreadCopied(Event, tag="lg.ThreadCopied", omit_defaults=True):
    """``copy_thread``: the source thread's index rows, as of this event, were copied here.

    What was copied is the source as its events up to this event's position left it.
    ``source_version`` is the source stream's version when ``copy_thread`` looked, before it
    appended: a lower bound (the source may have moved on before this event committed, and
    the copy then holds those checkpoints too)."""

    source_thread_id: str
    source_version: int = 0


# -- index tables (created by migrations/versions/0003_langgraph.py) ------------------------------

metadata = MetaData()

checkpoints = Table(
    "es_lg_checkpoints",
    metadata,
    Column("tenant_id", String(255), primary_key=True),
    Column("thread_id", String(255), primary_key=True),
    Column("checkpoint_ns", Text, primary_key=True),
    Column("checkpoint_id", LargeBinary, primary_key=True),  # checkpoint_key()
    Column("parent_id", LargeBinary, nullable=True),
    Column("position", BigInteger, nullable=False),
    Column("run_id", Text, nullable=True),
    sqlite_with_rowid=False,
)

# channel "": the first event that stored any channel at this version (see the migration).
blobs = Table(
    "es_lg_blobs",
    metadata,
    Column("tenant_id", String(255), primary_key=True),
    Column("thread_id", String(255), primary_key=True),
    Column("checkpoint_ns", Text, primary_key=True),
    Column("version", Text, primary_key=True),
    Column("channel", Text, primary_key=True),
    Column("position", BigInteger, nullable=False),
    sqlite_with_rowid=False,
)

writes = Table(
    "es_lg_writes",
    metadata,
    Column("tenant_id", String(255), primary_key=True),
    Column("thread_id", String(255), primary_key=True),
    Column("checkpoint_ns", Text, primary_key=True),
    Column("checkpoint_id", LargeBinary, primary_key=True),
    Column("position", BigInteger, primary_key=True),
    sqlite_with_rowid=False,
)

_TABLES = (checkpoints, blobs, writes)


def version_key(version: Version) -> str:
    """A channel version as the index stores it (strings as they are; numbers tagged)."""
    if isinstance(version, str):
        return version
    if isinstance(version, bool) or not isinstance(version, (int, float)):
        raise TypeError(f"channel versions are str, int or float, got {version!r}")
    return f"i:{version}" if isinstance(version, int) else f"f:{version!r}"


def checkpoint_key(checkpoint_id: str) -> bytes:
    """A checkpoint id as the index stores it: 17 bytes for a UUID (LangGraph's ids), else the
    text.  Keys sort as the ids do (UUIDs among themselves, other ids among themselves)."""
    if (len(checkpoint_id) == 36 and checkpoint_id[8] == checkpoint_id[13] == checkpoint_id[18]
            == checkpoint_id[23] == "-" and checkpoint_id == checkpoint_id.lower()):
        # The canonical text of a UUID (what checkpoint_id_of gives back), without the cost of
        # uuid.UUID(): four dashes where str(UUID) puts them, 32 lowercase hex digits.
        try:
            raw = bytes.fromhex(checkpoint_id.replace("-", ""))
        except ValueError:
            raw = b""
        if len(raw) == 16:  # (fromhex also skips spaces)
            return b"\x00" + raw
    return b"\x01" + checkpoint_id.encode()


def checkpoint_id_of(key: bytes) -> str:
    raw = bytes(key)
    if raw[:1] == b"\x00":
        return str(uuid.UUID(bytes=raw[1:]))
    return raw[1:].decode()


def _key_or_none(checkpoint_id: str | None) -> bytes | None:
    return None if checkpoint_id is None else checkpoint_key(checkpoint_id)


# -- statements: SQLAlchemy Core, compiled once per dialect and shape ----------------------------

_compiled: dict[tuple[Any, ...], Compiled] = {}


def _stmt(conn: Connection, key: tuple[Any, ...], build: Callable[[str], ClauseElement]
          ) -> Compiled:
    name = conn.dialect.name
    c = _compiled.get((name, *key))
    if c is None:
        if len(_compiled) > 1024:
            _compiled.clear()
        c = _compiled[(name, *key)] = Compiled(build(name), conn.dialect)
    return c


def _args(c: Compiled, values: Mapping[str, Any]) -> Any:
    """Parameters in the compiled statement's style; names it does not use are left out."""
    d = c.defaults
    if c.names is None:
        return {**d, **values}
    return tuple(values[n] if n in values else d[n] for n in c.names)


def _run(conn: Connection, c: Compiled, params: Mapping[str, Any]) -> builtins.list[Any]:
    """Execute on the connection's DBAPI cursor (sync or SQLAlchemy's async adapter)."""
    cur = _send(conn, c, params)
    try:
        return builtins.list(cur.fetchall()) if cur.description is not None else []
    finally:
        cur.close()


def _binary(conn: Connection) -> bool:
    """Whether the connection's cursors take psycopg's ``binary`` option (the sync driver)."""
    dialect = conn.dialect
    return dialect.name == "postgresql" and not dialect.is_async


def _send(conn: Connection, c: Compiled, params: Mapping[str, Any]) -> Any:
    """Execute; the caller fetches from (and closes) the cursor, e.g. after a pipeline."""
    cur = dbapi_cursor(conn)
    if _binary(conn):
        # PostgreSQL's binary results: bytea arrives as is, not as hex text to decode.
        cur.execute(c.sql, _args(c, params), binary=True)  # type: ignore[call-arg]
    else:
        cur.execute(c.sql, _args(c, params))
    return cur


def _run_many(conn: Connection, c: Compiled, rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        return
    cur = dbapi_cursor(conn)
    try:
        if len(rows) == 1:
            cur.execute(c.sql, _args(c, rows[0]))
        else:
            cur.executemany(c.sql, [_args(c, r) for r in rows])
    finally:
        cur.close()


def _bucket(n: int) -> int:
    """IN lists come in power-of-two lengths (padded with NULLs, which match nothing): few
    statement shapes."""
    return 1 << max(0, (n - 1).bit_length())


def _chunks(items: Sequence[_T], size: int = _CHUNK) -> Iterator[Sequence[_T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _padded(prefix: str, values: Sequence[Any]) -> dict[str, Any]:
    if not values:
        return {}
    names = [f"{prefix}{i}" for i in range(_bucket(len(values)))]
    return dict(itertools.zip_longest(names, values))


def _one_of(query: Select[Any], column: Any, prefix: str, n: int, dialect_name: str
            ) -> Select[Any]:
    """``query``'s rows whose ``column`` equals one of the ``n`` bound values ``{prefix}0``,
    ``{prefix}1``, ...

    An IN list, except on PostgreSQL, where it is the query run once per value (a lateral
    subquery behind an ``OFFSET 0`` fence, so the planner cannot merge it into a join of its
    choosing): the IN list or a join to the list of values lets the planner, while it has no
    statistics (a new table, before autovacuum's first pass), believe a thread holds one row,
    read all of its index rows and filter them, which made ``get_tuple`` on a 10,000-checkpoint
    thread 20-60x slower.  Run per value, each is an index lookup whatever the statistics.
    """
    params = [bindparam(f"{prefix}{i}", type_=column.type) for i in range(n)]
    if dialect_name != "postgresql":
        return query.where(column.in_(params))
    rows = [select(p.label("k")) for p in params]
    listed = (rows[0] if n == 1 else union_all(*rows)).subquery(f"{prefix}_list")
    each = query.where(column == listed.c.k).offset(0).lateral(f"{prefix}_each")
    return select(*each.c).select_from(listed).join(each, true())


def _insert_fn(dialect_name: str) -> Any:
    return postgresql.insert if dialect_name == "postgresql" else sqlite.insert


def _upsert_checkpoint(dialect_name: str) -> ClauseElement:
    ins = _insert_fn(dialect_name)(checkpoints)
    return cast(ClauseElement, ins.on_conflict_do_update(
        index_elements=[c.name for c in checkpoints.primary_key],
        set_={"parent_id": ins.excluded.parent_id, "position": ins.excluded.position,
              "run_id": ins.excluded.run_id},
    ))


def _insert_ignore(table: Table) -> Callable[[str], ClauseElement]:
    def build(dialect_name: str) -> ClauseElement:
        return cast(ClauseElement, _insert_fn(dialect_name)(table).on_conflict_do_nothing())
    return build


def _thread_where(table: Table, ids: Mapping[str, str]) -> Any:
    return and_(table.c.tenant_id == ids["tenant_id"], table.c.thread_id == ids["thread_id"])


# -- the inline handler: events -> index rows ------------------------------------------------------


class _IndexEvents:
    """Project ``lg.*`` events into the index tables, in the append's transaction.

    Registered on the store by every saver; also what :func:`rebuild_index` replays.
    """

    def __call__(self, conn: Connection, recorded: Sequence[RecordedEvent]) -> None:
        for rec in recorded:
            if not rec.stream_id.startswith(_PREFIX):
                continue
            data = rec.data
            thread_id = rec.stream_id[len(_PREFIX):]
            ids = {"tenant_id": rec.tenant_id, "thread_id": thread_id}
            if isinstance(data, CheckpointSaved):
                _index_checkpoint(conn, ids, rec.position, data)
            elif isinstance(data, WritesSaved):
                _index_writes(conn, ids, rec.position, data)
            elif isinstance(data, ChannelValuesSaved):
                _index_blobs(conn, ids, data.ns, rec.position, data)
            elif isinstance(data, (ThreadDeleted, CheckpointsPruned, RunsDeleted, ThreadCopied)):
                _index_retention(conn, ids, data)

    @staticmethod
    def writes_only(conn: Connection, recorded: Sequence[RecordedEvent]) -> bool:
        """Whether indexing these events reads no result (see ``eventstore.InlineHandler``):
        on PostgreSQL, checkpoints (of up to 32 versions) and pending writes."""
        if conn.dialect.name != "postgresql":
            return False
        for rec in recorded:
            if not rec.stream_id.startswith(_PREFIX):
                continue
            data = rec.data
            if isinstance(data, CheckpointSaved):
                if not _one_statement(data):
                    return False
            elif not isinstance(data, WritesSaved):
                return False
        return True


index_events = _IndexEvents()


def _one_statement(ev: CheckpointSaved) -> bool:
    """Whether the PostgreSQL index rows of ``ev`` fit the one-statement shapes."""
    return 0 < len(ev.blobs) <= _MAX_PAIRS


_MAX_PAIRS = 32  # (version, channel) pairs of a checkpoint indexed in one statement
_V_NAMES = [f"v{i}" for i in range(_MAX_PAIRS)]
_PV_NAMES = [f"p{j}_v" for j in range(_MAX_PAIRS)]
_PC_NAMES = [f"p{j}_c" for j in range(_MAX_PAIRS)]


def _index_checkpoint(conn: Connection, ids: dict[str, str], position: int,
                      ev: CheckpointSaved) -> None:
    run_id = ev.metadata.get("run_id")
    row = {**ids, "checkpoint_ns": ev.ns, "checkpoint_id": checkpoint_key(ev.id),
           "parent_id": _key_or_none(ev.parent),
           "position": position, "run_id": None if run_id is None else str(run_id)}
    by_version = _versions_stored(ev)
    if conn.dialect.name == "postgresql" and by_version and _one_statement(ev):
        # One statement whose result nobody reads (so it can go out in the append's pipeline):
        # the checkpoint row, each version's first row, and the versions' per-channel rows for
        # the versions an earlier event already stored (what _index_versions does in steps).
        pairs = [(vkey, ch) for vkey, channels in by_version.items() for ch in channels]
        c = _stmt(conn, ("cp_blobs", len(by_version), len(pairs)),
                  _checkpoint_and_versions(len(by_version), len(pairs)))
        params = {f"c_{k}": v for k, v in row.items()}
        params.update(zip(_V_NAMES, by_version, strict=False))
        for j, (vkey, ch) in enumerate(pairs):
            params[_PV_NAMES[j]] = vkey
            params[_PC_NAMES[j]] = ch
        cur = dbapi_cursor(conn)
        cur.execute(c.sql, c.args(params))
        cur.close()
        return
    _run(conn, _stmt(conn, ("upsert_cp",), _upsert_checkpoint), row)
    _index_versions(conn, ids, ev.ns, position, by_version)


def _checkpoint_and_versions(n: int, m: int) -> Callable[[str], ClauseElement]:
    """PostgreSQL: upsert the checkpoint row, insert the first row of each of ``n`` versions
    (channel ""), and of the ``m`` (version, channel) pairs those of the versions that were
    there already (the "" insert returned nothing for them)."""
    def build(dialect_name: str) -> ClauseElement:
        ins = postgresql.insert(checkpoints).values(
            {c.name: bindparam(f"c_{c.name}") for c in checkpoints.c})
        ins = ins.on_conflict_do_update(
            index_elements=[c.name for c in checkpoints.primary_key],
            set_={"parent_id": ins.excluded.parent_id, "position": ins.excluded.position,
                  "run_id": ins.excluded.run_id})
        shared: dict[str, Any] = {
            "tenant_id": bindparam("c_tenant_id"), "thread_id": bindparam("c_thread_id"),
            "checkpoint_ns": bindparam("c_checkpoint_ns"), "position": bindparam("c_position")}
        firsts = (postgresql.insert(blobs)
                  .values([{**shared, "version": bindparam(f"v{i}"), "channel": ""}
                           for i in range(n)])
                  .on_conflict_do_nothing().returning(blobs.c.version).cte("firsts"))
        pair_rows = [select(bindparam(f"p{j}_v", type_=Text).label("version"),
                            bindparam(f"p{j}_c", type_=Text).label("channel"))
                     for j in range(m)]
        pairs = (pair_rows[0] if m == 1 else union_all(*pair_rows)).subquery("pairs")
        rest = select(shared["tenant_id"], shared["thread_id"], shared["checkpoint_ns"],
                      pairs.c.version, pairs.c.channel, shared["position"]).where(
            pairs.c.version.not_in(select(firsts.c.version)))
        cols = ["tenant_id", "thread_id", "checkpoint_ns", "version", "channel", "position"]
        stmt = (postgresql.insert(blobs).from_select(cols, rest).on_conflict_do_nothing()
                .add_cte(ins.cte("cp")).add_cte(firsts))
        return cast(ClauseElement, stmt)
    return build


def _versions_stored(ev: CheckpointSaved | ChannelValuesSaved) -> dict[str, builtins.list[str]]:
    """Version (as the index keys it) -> the channels the event stored at that version."""
    by_version: dict[str, builtins.list[str]] = defaultdict(builtins.list)
    for b in ev.blobs:
        version = ev.version_of(b)
        if version is not None:
            by_version[version_key(version)].append(b.channel)
    return by_version


def _index_blobs(conn: Connection, ids: dict[str, str], ns: str, position: int,
                 ev: CheckpointSaved | ChannelValuesSaved) -> None:
    _index_versions(conn, ids, ns, position, _versions_stored(ev))


def _index_versions(conn: Connection, ids: dict[str, str], ns: str, position: int,
                    by_version: Mapping[str, Sequence[str]]) -> None:
    for vkey, channels in by_version.items():
        row = {**ids, "checkpoint_ns": ns, "version": vkey, "position": position}
        if _insert_count(conn, _stmt(conn, ("ins_blob",), _insert_ignore(blobs)),
                         {**row, "channel": ""}) == 0:
            _index_channels(conn, ids, ns, position, vkey, channels)


def _index_channels(conn: Connection, ids: dict[str, str], ns: str, position: int, vkey: str,
                    channels: Sequence[str]) -> None:
    """An earlier event stored this version (of other channels, or a re-put): rows of its own
    for each channel (the earlier event's row keeps answering for the channels it holds)."""
    _run_many(conn, _stmt(conn, ("ins_blob",), _insert_ignore(blobs)), [
        {**ids, "checkpoint_ns": ns, "version": vkey, "channel": ch, "position": position}
        for ch in channels])


def _insert_count(conn: Connection, c: Compiled, params: Mapping[str, Any]) -> int:
    cur = dbapi_cursor(conn)
    try:
        cur.execute(c.sql, _args(c, params))
        return int(cur.rowcount)
    finally:
        cur.close()


def _index_writes(conn: Connection, ids: dict[str, str], position: int, ev: WritesSaved
                  ) -> None:
    # Results unread: this write may go out in the append's pipeline (writes_only).
    _send(conn, _stmt(conn, ("ins_write",), _insert_ignore(writes)), {
        **ids, "checkpoint_ns": ev.ns, "checkpoint_id": checkpoint_key(ev.checkpoint_id),
        "position": position}).close()


def _index_retention(conn: Connection, ids: dict[str, str], ev: Event) -> None:
    if isinstance(ev, ThreadDeleted) or (
            isinstance(ev, CheckpointsPruned) and ev.strategy == "delete"):
        for table in _TABLES:
            conn.execute(delete(table).where(_thread_where(table, ids)))
    elif isinstance(ev, CheckpointsPruned):
        _prune_rows(conn, ids, ev.kept)
    elif isinstance(ev, RunsDeleted):
        _delete_runs_rows(conn, ids, ev.run_ids)
    elif isinstance(ev, ThreadCopied):
        _copy_rows(conn, ids, ev.source_thread_id)


def _prune_rows(conn: Connection, ids: dict[str, str], kept: Mapping[str, Sequence[str]]
                ) -> None:
    cp = checkpoints
    rows = conn.execute(select(cp.c.checkpoint_ns, cp.c.checkpoint_id, cp.c.position)
                        .where(_thread_where(cp, ids))).all()
    gone: dict[str, builtins.list[bytes]] = defaultdict(builtins.list)
    kept_positions: dict[str, builtins.list[int]] = defaultdict(builtins.list)
    kept_keys = {ns: {checkpoint_key(cid) for cid in ids_} for ns, ids_ in kept.items()}
    for ns, cid, position in rows:
        if cid in kept_keys.get(ns, ()):
            kept_positions[ns].append(position)
        else:
            gone[ns].append(cid)
    for ns, cids in gone.items():
        for part in _chunks(cids, 500):
            for table in (writes, checkpoints):
                conn.execute(delete(table).where(
                    _thread_where(table, ids), table.c.checkpoint_ns == ns,
                    table.c.checkpoint_id.in_(part)))
    namespaces = {ns for ns, _cid, _p in rows}
    # Writes of namespaces that keep no checkpoint at all go with them.
    for ns in namespaces - set(kept_positions):
        conn.execute(delete(writes).where(_thread_where(writes, ids),
                                          writes.c.checkpoint_ns == ns))
    _null_dangling_parents(conn, ids)
    # Channel values no kept checkpoint refers to leave the index.
    referenced: set[tuple[str, str]] = set()
    for ns, positions in kept_positions.items():
        for ev in _events_at(conn, positions).values():
            if isinstance(ev, CheckpointSaved):
                referenced.update((ns, version_key(v)) for v in ev.versions.values())
    stored = conn.execute(select(blobs.c.checkpoint_ns, blobs.c.version).distinct()
                          .where(_thread_where(blobs, ids))).all()
    garbage = [(ns, ver) for ns, ver in stored if (ns, ver) not in referenced]
    if garbage:
        conn.execute(delete(blobs).where(
            _thread_where(blobs, ids), blobs.c.checkpoint_ns == bindparam("g_ns"),
            blobs.c.version == bindparam("g_ver")),
            [{"g_ns": ns, "g_ver": ver} for ns, ver in garbage])


def _delete_runs_rows(conn: Connection, ids: dict[str, str], run_ids: Sequence[str]) -> None:
    cp = checkpoints
    for part in _chunks(builtins.list(run_ids), 500):
        doomed = conn.execute(select(cp.c.checkpoint_ns, cp.c.checkpoint_id).where(
            _thread_where(cp, ids), cp.c.run_id.in_(part))).all()
        for ns, cid in doomed:
            for table in (writes, checkpoints):
                conn.execute(delete(table).where(
                    _thread_where(table, ids), table.c.checkpoint_ns == ns,
                    table.c.checkpoint_id == cid))
    _null_dangling_parents(conn, ids)


def _null_dangling_parents(conn: Connection, ids: dict[str, str]) -> None:
    """A checkpoint whose parent left the index is left with no parent (as PostgresSaver does)."""
    cp = checkpoints
    parent = checkpoints.alias("parent")
    conn.execute(update(cp).where(
        _thread_where(cp, ids), cp.c.parent_id.is_not(None),
        ~exists().where(parent.c.tenant_id == cp.c.tenant_id,
                        parent.c.thread_id == cp.c.thread_id,
                        parent.c.checkpoint_ns == cp.c.checkpoint_ns,
                        parent.c.checkpoint_id == cp.c.parent_id),
    ).values(parent_id=None))


def _copy_rows(conn: Connection, ids: dict[str, str], source: str) -> None:
    insert = _insert_fn(conn.dialect.name)
    for table in _TABLES:
        cols = [c for c in table.c if c.name != "thread_id"]
        where = [table.c.tenant_id == ids["tenant_id"], table.c.thread_id == source]
        if table is writes:
            # Only the writes of checkpoints the source has: writes a late task put on a
            # checkpoint already deleted there stay behind (the target may hold a checkpoint
            # of that id, copied before, which never had them).
            cp = checkpoints.c
            where.append(exists().where(
                cp.tenant_id == table.c.tenant_id, cp.thread_id == source,
                cp.checkpoint_ns == table.c.checkpoint_ns,
                cp.checkpoint_id == table.c.checkpoint_id))
        sel = select(*cols, literal(ids["thread_id"], String).label("thread_id")).where(*where)
        stmt = insert(table).from_select([c.name for c in cols] + ["thread_id"], sel)
        conn.execute(stmt.on_conflict_do_nothing())


def _events_at(conn: Connection, positions: Iterable[int]) -> dict[int, Event]:
    """The events at these positions, decoded (``lg.*`` events are always known types)."""
    wanted = sorted(set(positions))
    out: dict[int, Event] = {}
    for part in _chunks(wanted):
        c = _stmt(conn, ("events_at", _bucket(len(part))), _events_at_query(_bucket(len(part))))
        for position, tag, schema_version, data in _run(conn, c, _padded("p", part)):
            ev = decode_event(tag, schema_version, bytes(data))
            if isinstance(ev, Event):
                out[position] = ev
    return out


def _events_at_query(n: int) -> Callable[[str], ClauseElement]:
    def build(_dialect: str) -> ClauseElement:
        e = es_events
        return select(e.c.position, e.c.type, e.c.schema_version, e.c.data).where(
            e.c.position.in_([bindparam(f"p{i}") for i in range(n)]))
    return build


def rebuild_index(store: EventStore) -> int:
    """Empty the index tables and replay every ``lgthread`` event into them, in one transaction.

    Returns the number of events replayed.  Appends wait while it runs (it holds the write lock).
    """
    from eventstore._backend import lock_appends

    replayed = 0
    with begin_write(store.engine) as conn:
        lock_appends(conn)
        for table in _TABLES:
            conn.execute(delete(table))
        position = 0
        while True:
            page = store.read_page(conn, from_position=position + 1, limit=2000,
                                   categories=[CATEGORY])
            if not page:
                break
            index_events(conn, page)
            replayed += len(page)
            position = page[-1].position
    return replayed


# -- reads: raw rows and events on a connection (shared by the sync and the async saver) ---------


class Loaded(msgspec.Struct, gc=False):
    """A checkpoint as the index and the log hold it, before the serde turns bytes into values.

    ``found`` (shared by a batch of one thread namespace) maps each ``(channel, version)`` to
    the blob the index points at: the first value any event of the namespace stored for it.
    ``writes``: ``(task_id, channel, type, data)`` in ``writes_sort_key`` order.
    """

    thread_id: str
    ns: str
    checkpoint_id: str
    parent_id: str | None
    event: CheckpointSaved
    found: dict[tuple[str, Version], Blob]
    writes: builtins.list[tuple[str, str, str, bytes]]
    # Immutable decoded values by (channel, version), filled by the saver (shared like found).
    decoded: dict[tuple[str, Version], Any] = msgspec.field(default_factory=dict)

    def blobs(self) -> Iterator[tuple[str, Blob | None]]:
        """Each channel of the checkpoint and the blob holding its value (None: not found)."""
        found = self.found
        for pair in self.event.versions.items():
            yield pair[0], found.get(pair)


# thread, ns, checkpoint key, parent key (None: no parent, or it left the index), position
_CpRow = tuple[str, str, bytes, bytes | None, int]


def _latest_query(with_id: bool) -> Callable[[str], ClauseElement]:
    def build(_dialect: str) -> ClauseElement:
        cp, e = checkpoints, es_events
        q = select(cp.c.checkpoint_id, cp.c.parent_id, cp.c.position, e.c.type,
                   e.c.schema_version, e.c.data, _thread_version()
                   ).join(e, e.c.position == cp.c.position).where(
            cp.c.tenant_id == bindparam("tenant_id"), cp.c.thread_id == bindparam("thread_id"),
            cp.c.checkpoint_ns == bindparam("ns"))
        if with_id:
            return q.where(cp.c.checkpoint_id == bindparam("cid"))
        return q.order_by(cp.c.checkpoint_id.desc()).limit(1)
    return build


def _thread_version() -> Any:
    """The version of the thread's stream, as a scalar subquery (parameters ``tenant_id`` and
    ``stream``): what ``read_tuple`` compares between its statements."""
    s = es_streams
    return select(s.c.version).where(
        s.c.tenant_id == bindparam("tenant_id"),
        s.c.stream_id == bindparam("stream")).scalar_subquery()


class _Torn(Exception):
    """``read_tuple``'s statements read different states of the thread (PostgreSQL outside a
    transaction: one snapshot per statement, and the thread changed between them)."""


# What a saver last put in a thread namespace: checkpoint key, sorted version keys, position.
Hint = tuple[bytes, tuple[str, ...], int]
_MAX_HINTS = 4096


def _version_keys(ev: CheckpointSaved) -> tuple[str, ...]:
    return tuple(sorted({ver if ver.__class__ is str else version_key(ver)
                         for ver in ev.versions.values()}))


def read_tuple(conn: Connection, tenant_id: str, thread_id: str, ns: str,
               checkpoint_id: str | None, hint: Hint | None = None) -> Loaded | None:
    """One checkpoint (the latest of the namespace without an id), with values and writes.

    Two statements: the checkpoint's row with its event, then the index rows of its channel
    versions and its pending writes, each with the event it points at (a third reads the
    events of single-channel rows, the further parts of a split step, once each: see
    ``_refs_query``).  With a ``hint`` (the
    checkpoint this process put last there) on psycopg, the second statement is sent with the
    first for the hinted checkpoint, and used if the first finds that very checkpoint: one round
    trip; otherwise it is sent again for the checkpoint found.

    Each statement also reads the version of the thread's stream.  Outside a transaction on
    PostgreSQL each statement reads a snapshot of its own, and a checkpoint, a retention
    operation or a copy committed between them (all appends to the thread's stream, whose
    version they raise in the transaction that writes its index rows) would give a checkpoint
    torn between two states: its values without its pending writes, or a value missing.  Then
    :class:`_Torn` is raised, and the caller reads again on one snapshot (``begin_snapshot``).
    """
    c = _stmt(conn, ("latest", checkpoint_id is not None), _latest_query(checkpoint_id is not None))
    ids = {"tenant_id": tenant_id, "thread_id": thread_id, "ns": ns,
           "stream": _PREFIX + thread_id}
    first = {**ids, "cid": _key_or_none(checkpoint_id)}
    guessed: builtins.list[Any] | None = None
    if hint is not None and (checkpoint_id is None or first["cid"] == hint[0]) \
            and len(hint[1]) <= _CHUNK and _psycopg(conn) is not None:
        with _pipeline(conn):
            cur = _send(conn, c, first)
            refs = _send(*_refs_args(conn, ids, hint[0], hint[2], hint[1]))
        rows = builtins.list(cur.fetchall())
        guessed = builtins.list(refs.fetchall())
        cur.close()
        refs.close()
    else:
        rows = _run(conn, c, first)
    if not rows:
        return None
    cid, parent_key, position, tag, schema_version, data, thread_version = rows[0]
    ev = decode_event(tag, schema_version, bytes(data))
    if not isinstance(ev, CheckpointSaved):
        raise TypeError(f"event at {position} is {tag}, not a checkpoint")
    loaded: dict[int, Event] = {position: ev}
    vkeys = _version_keys(ev)
    versions_at: dict[str, dict[str, int]] = defaultdict(dict)
    write_positions: builtins.list[int] = []
    if guessed is not None and hint is not None and (cid, position) == (hint[0], hint[2]) \
            and vkeys == hint[1]:
        results: Iterable[builtins.list[Any]] = [guessed]
    else:
        results = (_run(*_refs_args(conn, ids, cid, position, part))
                   for part in (_chunks(vkeys) if vkeys else [()]))
    for result_rows in results:
        same_thread = False
        for kind, key, channel, at, etag, esv, edata in result_rows:
            if kind == "v":
                same_thread = at == thread_version
                continue
            if edata is not None and at not in loaded:
                held = decode_event(etag, esv, bytes(edata))
                if isinstance(held, Event):
                    loaded[at] = held
            if kind == "b":
                versions_at[key][channel] = at
            elif at not in write_positions:
                write_positions.append(at)
        if not same_thread:
            raise _Torn
    need = {at for chans in versions_at.values() for at in chans.values() if at not in loaded}
    if need:  # the events of single-channel rows (see _refs_query)
        loaded.update(_events_at(conn, need))
    found = _found(ev.versions.items(), versions_at, loaded)
    pending = _fold_writes(loaded, write_positions) if write_positions else []
    return Loaded(thread_id, ns, ev.id, ev.parent if parent_key is not None else None, ev,
                  found, pending)


def _refs_args(conn: Connection, ids: Mapping[str, str], cid: bytes, position: int,
               vkeys: Sequence[str]) -> tuple[Connection, Compiled, dict[str, Any]]:
    """The refs statement for a checkpoint and (a chunk of) its version keys, with arguments."""
    n = _bucket(len(vkeys)) if vkeys else 0
    return (conn, _stmt(conn, ("refs", n), _refs_query(n)),
            {**ids, "cid": cid, "own": position, **_padded("v", vkeys)})


def _refs_query(n_versions: int) -> Callable[[str], ClauseElement]:
    """The rows of ``n_versions`` channel versions (kind "b") and of a checkpoint's writes
    ("w"), each with its event's data: none for the checkpoint's own event, nor for a row of
    one channel (``read_tuple`` reads those events after, once each).

    Why: a version's first event holds most of its channels, and its row (channel "") brings
    it.  Rows of single channels point at the further parts of a state split over events (or
    at a re-put): many rows an event, each of which brought the whole event (300 channels of
    50 kB in 15 parts: 280 rows of about 1 MB).
    """
    def build(dialect_name: str) -> ClauseElement:
        b, w, e = blobs, writes, es_events
        writes_part = select(literal("w").label("kind"), literal("").label("key"),
                             literal("").label("channel"), w.c.position, e.c.type,
                             e.c.schema_version, e.c.data).join(
            e, e.c.position == w.c.position).where(
            w.c.tenant_id == bindparam("tenant_id"), w.c.thread_id == bindparam("thread_id"),
            w.c.checkpoint_ns == bindparam("ns"), w.c.checkpoint_id == bindparam("cid"))
        # The thread's version, as this statement's snapshot saw it (see read_tuple).
        version_part = select(literal("v"), literal(""), literal(""), _thread_version(),
                              null(), null(), null())
        if not n_versions:
            return union_all(writes_part, version_part)
        blobs_part = select(literal("b").label("kind"), b.c.version.label("key"), b.c.channel,
                            b.c.position, e.c.type, e.c.schema_version, e.c.data).outerjoin(
            e, and_(e.c.position == b.c.position, b.c.position != bindparam("own"),
                    b.c.channel == "")).where(
            b.c.tenant_id == bindparam("tenant_id"), b.c.thread_id == bindparam("thread_id"),
            b.c.checkpoint_ns == bindparam("ns"))
        return union_all(_one_of(blobs_part, b.c.version, "v", n_versions, dialect_name),
                         writes_part, version_part)
    return build


def list_page(conn: Connection, tenant_id: str, thread_id: str | None, ns: str | None,
              checkpoint_id: str | None, before: str | None,
              after: tuple[bytes, str, str] | None, size: int,
              filter: Mapping[str, Any] | None = None
              ) -> tuple[builtins.list[Loaded], tuple[bytes, str, str] | None]:
    """One page of a ``list``, newest first, loaded; and the key to the next page (or None).

    Its statements must read one snapshot (``begin_snapshot``): on PostgreSQL in autocommit a
    retention operation committing between them left listed checkpoints without their values
    or writes.  The checkpoints' events come with their index rows (one query); ``after`` is
    the last (checkpoint id, thread id, namespace) of the previous page.  Checkpoints whose metadata
    does not match ``filter`` are dropped before their values and writes are looked up (the
    page may then hold none, with more to come).
    """
    fixed = thread_id is not None and ns is not None
    key = ("page", thread_id is not None, ns is not None, checkpoint_id is not None,
           before is not None, after is not None)

    def build(_dialect: str) -> ClauseElement:
        cp, e = checkpoints, es_events
        q = select(cp.c.thread_id, cp.c.checkpoint_ns, cp.c.checkpoint_id, cp.c.parent_id,
                   cp.c.position).where(cp.c.tenant_id == bindparam("tenant_id"))
        if thread_id is not None:
            q = q.where(cp.c.thread_id == bindparam("thread_id"))
        if ns is not None:
            q = q.where(cp.c.checkpoint_ns == bindparam("ns"))
        if checkpoint_id is not None:
            q = q.where(cp.c.checkpoint_id == bindparam("cid"))
        if before is not None:
            q = q.where(cp.c.checkpoint_id < bindparam("before"))
        if after is not None:
            if fixed:  # ids are unique within a thread's namespace
                q = q.where(cp.c.checkpoint_id < bindparam("after_id"))
            else:
                q = q.where(tuple_(cp.c.checkpoint_id, cp.c.thread_id, cp.c.checkpoint_ns)
                            < tuple_(bindparam("after_id"), bindparam("after_thread"),
                                     bindparam("after_ns")))
        q = q.order_by(cp.c.checkpoint_id.desc(), cp.c.thread_id.desc(),
                       cp.c.checkpoint_ns.desc()).limit(bindparam("size"))
        if fixed:
            # The primary key gives one namespace's checkpoints in order: join as they come.
            return q.add_columns(e.c.type, e.c.schema_version, e.c.data).join(
                e, e.c.position == cp.c.position)
        # Across threads no index gives this order: the page's keys are picked (and sorted)
        # from the index rows alone, and only that page's events are read.
        page = q.subquery("page")
        return select(*page.c, e.c.type, e.c.schema_version, e.c.data).join(
            e, e.c.position == page.c.position).order_by(
            page.c.checkpoint_id.desc(), page.c.thread_id.desc(), page.c.checkpoint_ns.desc())

    params = {"tenant_id": tenant_id, "thread_id": thread_id, "ns": ns,
              "cid": _key_or_none(checkpoint_id), "before": _key_or_none(before), "size": size}
    if after is not None:
        params.update(after_id=after[0], after_thread=after[1], after_ns=after[2])
    rows = _run(conn, _stmt(conn, key, build), params)
    items = []
    if rows:
        cols = builtins.list(zip(*rows, strict=True))
        decoded = decode_events(cols[5], cols[6], builtins.list(map(bytes, cols[7])))
        for t, n, cid, parent, position, ev in zip(*cols[:5], decoded, strict=True):
            if ev.__class__ is CheckpointSaved and (not filter or _matches(ev.metadata, filter)):
                items.append(((t, n, cid, parent, position), ev))
    following = None
    if len(rows) == size:
        following = (rows[-1][2], rows[-1][0], rows[-1][1])
    # Every checkpoint between the page's first and last: their writes are one range read.
    span = (rows[-1][2], rows[0][2]) if fixed and rows and len(items) == len(rows) else None
    return _resolve(conn, tenant_id, items, span), following


def _resolve(conn: Connection, tenant_id: str,
             items: Sequence[tuple[_CpRow, CheckpointSaved]],
             span: tuple[str, str] | None = None) -> builtins.list[Loaded]:
    """Find every checkpoint's channel values and pending writes (few queries per batch).

    ``span``: the items are every checkpoint of one thread namespace between these two ids,
    so their writes are one range read.
    """
    loaded: dict[int, Event] = {r[4]: ev for r, ev in items}
    # Every (channel, version) the batch's checkpoints use, per thread namespace.
    groups: dict[tuple[str, str], set[tuple[str, Version]]] = {}
    for (thread_id, ns, _cid, _parent, _pos), ev in items:
        wanted = groups.get((thread_id, ns))
        if wanted is None:
            wanted = groups[(thread_id, ns)] = set()
        wanted.update(ev.versions.items())
    # Where each version's values are: the first event storing the version (channel ""), and
    # events storing a channel that first one did not hold.
    where: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
    for (thread_id, ns), wanted in groups.items():
        located = where[(thread_id, ns)] = defaultdict(dict)
        base: dict[str, Any] = {"tenant_id": tenant_id, "thread_id": thread_id, "ns": ns}
        rest = sorted({ver if ver.__class__ is str else version_key(ver) for _ch, ver in wanted})
        if len(rest) > 16:
            # Most of a batch's versions lie between the lowest and the highest version its
            # own events stored: one range read of the index finds them all.
            own_keys = sorted(version_key(v) for (r, ev) in items
                              if r[0] == thread_id and r[1] == ns for b in ev.blobs
                              if (v := ev.version_of(b)) is not None)
            if own_keys:
                lo, hi = own_keys[0], own_keys[-1]
                rest = [v for v in rest if not lo <= v <= hi]
                c = _stmt(conn, ("blob_range",), _blob_range_query)
                for vkey, ch, position in _run(conn, c, {**base, "lo": lo, "hi": hi}):
                    located[vkey][ch] = position
        for part in _chunks(rest):
            n = _bucket(len(part))
            c = _stmt(conn, ("blob_versions", n), _blob_versions_query(n))
            for vkey, ch, position in _run(conn, c, {**base, **_padded("v", part)}):
                located[vkey][ch] = position
    # Pending writes: the WritesSaved events of each checkpoint.
    write_events: dict[tuple[str, str, bytes], builtins.list[int]] = defaultdict(builtins.list)
    if span is not None and items:
        thread_id, ns = items[0][0][0], items[0][0][1]
        c = _stmt(conn, ("writes_span",), _writes_span_query)
        params = {"tenant_id": tenant_id, "thread_id": thread_id, "ns": ns, "lo": span[0],
                  "hi": span[1]}
        _take_writes(_run(conn, c, params), thread_id, ns, write_events, loaded)
    else:
        by_group: dict[tuple[str, str], set[bytes]] = defaultdict(set)
        for (thread_id, ns, cid, _parent, _pos), _ev in items:
            by_group[(thread_id, ns)].add(cid)
        for (thread_id, ns), cids in by_group.items():
            for ids_part in _chunks(sorted(cids)):
                n = _bucket(len(ids_part))
                c = _stmt(conn, ("writes_of", n), _writes_query(n))
                params = {"tenant_id": tenant_id, "thread_id": thread_id, "ns": ns,
                          **_padded("k", ids_part)}
                _take_writes(_run(conn, c, params), thread_id, ns, write_events, loaded)
    need = {p for located in where.values() for chans in located.values()
            for p in chans.values() if p not in loaded}
    if need:
        loaded.update(_events_at(conn, need))
    # The blob each (channel, version) resolves to, per thread namespace.
    found = {group: _found(wanted, where.get(group, {}), loaded)
             for group, wanted in groups.items()}
    decoded: dict[tuple[str, str], dict[tuple[str, Version], Any]] = {g: {} for g in groups}
    seen_positions: set[int] = set()
    out = []
    empty: dict[tuple[str, Version], Blob] = {}
    for (thread_id, ns, cid, parent, position), ev in items:
        if position in seen_positions:  # one event, two rows (a copied thread): own objects
            ev = msgspec.json.decode(msgspec.json.encode(ev), type=CheckpointSaved)
        seen_positions.add(position)
        positions = write_events.get((thread_id, ns, cid))
        pending = _fold_writes(loaded, positions) if positions else []
        out.append(Loaded(thread_id, ns, ev.id, ev.parent if parent is not None else None, ev,
                          found.get((thread_id, ns), empty), pending,
                          decoded.get((thread_id, ns), {})))
    return out


def _found(wanted: Iterable[tuple[str, Version]], versions_at: Mapping[str, Mapping[str, int]],
           loaded: Mapping[int, Event]) -> dict[tuple[str, Version], Blob]:
    """(channel, version) -> its blob: in the first event that stored the version if that one
    holds the channel, else in the first event that stored that channel at that version."""
    table: dict[tuple[str, Version], Blob] = {}
    held: dict[int, dict[tuple[str, Version], Blob]] = {}  # position -> that event's blobs

    def blobs_at(position: int) -> dict[tuple[str, Version], Blob]:
        by_pair = held.get(position)
        if by_pair is None:
            holder = loaded.get(position)
            by_pair = held[position] = {}
            if isinstance(holder, (CheckpointSaved, ChannelValuesSaved)):
                for b in reversed(holder.blobs):  # the first of duplicates wins, as before
                    version = holder.version_of(b)
                    if version is not None:
                        by_pair[(b.channel, version)] = b
        return by_pair

    for pair in wanted:
        ver = pair[1]
        chans = versions_at.get(ver if ver.__class__ is str else version_key(ver))
        if not chans:
            continue
        first = chans.get("")
        b = blobs_at(first).get(pair) if first is not None else None
        if b is None:
            other = chans.get(pair[0])
            if other is not None:
                b = blobs_at(other).get(pair)
        if b is not None:
            table[pair] = b
    return table


def _fold_writes(loaded: Mapping[int, Event], positions: Sequence[int]
                 ) -> builtins.list[tuple[str, str, str, bytes]]:
    """A checkpoint's pending writes from its WritesSaved events, in the order they were
    recorded: a (task, idx) is written once, except by special-channel writes, which replace.
    Returned in ``writes_sort_key`` order."""
    if len(positions) == 1:
        # The usual case: one task's writes, in one event, at increasing indexes.
        only = loaded.get(positions[0])
        if isinstance(only, WritesSaved):
            idxs = [w.idx for w in only.writes]
            if all(a < b for a, b in itertools.pairwise(idxs)):
                task = only.task_id
                return [(task, w.channel, w.type, w.data) for w in only.writes]
    live: dict[tuple[str, int], tuple[tuple[str, str, int], tuple[str, str, str, bytes]]] = {}
    for position in sorted(positions):
        ev = loaded.get(position)
        if not isinstance(ev, WritesSaved):
            continue
        task_id, path = ev.task_id, ev.task_path
        for w in ev.writes:
            key = (task_id, w.idx)
            if ev.upsert or key not in live:
                live[key] = ((path, task_id, w.idx), (task_id, w.channel, w.type, w.data))
    ordered = builtins.list(live.values())
    if len(ordered) > 1:
        ordered.sort(key=_first)
    return [item[1] for item in ordered]


def _first(item: tuple[Any, Any]) -> Any:
    return item[0]


def _blob_versions_query(n: int) -> Callable[[str], ClauseElement]:
    def build(dialect_name: str) -> ClauseElement:
        b = blobs
        return _one_of(select(b.c.version, b.c.channel, b.c.position).where(
            b.c.tenant_id == bindparam("tenant_id"), b.c.thread_id == bindparam("thread_id"),
            b.c.checkpoint_ns == bindparam("ns")), b.c.version, "v", n, dialect_name)
    return build


def _blob_range_query(_dialect: str) -> ClauseElement:
    b = blobs
    return select(b.c.version, b.c.channel, b.c.position).where(
        b.c.tenant_id == bindparam("tenant_id"), b.c.thread_id == bindparam("thread_id"),
        b.c.checkpoint_ns == bindparam("ns"), b.c.version >= bindparam("lo"),
        b.c.version <= bindparam("hi"))


def _take_writes(rows: Sequence[Any], thread_id: str, ns: str,
                 into: dict[tuple[str, str, bytes], builtins.list[int]],
                 loaded: dict[int, Event]) -> None:
    """Write rows, each with its event's data."""
    fresh = [row for row in rows if row[1] not in loaded]
    if fresh:
        cols = builtins.list(zip(*fresh, strict=True))
        for position, ev in zip(cols[1], decode_events(cols[2], cols[3],
                                                       builtins.list(map(bytes, cols[4]))),
                                strict=True):
            if isinstance(ev, Event):
                loaded[position] = ev
    for row in rows:
        into[(thread_id, ns, row[0])].append(row[1])


def _writes_select() -> Any:
    w, e = writes, es_events
    return select(w.c.checkpoint_id, w.c.position, e.c.type, e.c.schema_version,
                  e.c.data).join(e, e.c.position == w.c.position).where(
        w.c.tenant_id == bindparam("tenant_id"), w.c.thread_id == bindparam("thread_id"),
        w.c.checkpoint_ns == bindparam("ns"))


def _writes_span_query(_dialect: str) -> ClauseElement:
    w = writes
    return cast(ClauseElement, _writes_select().where(
        w.c.checkpoint_id >= bindparam("lo"), w.c.checkpoint_id <= bindparam("hi")))


def _writes_query(n: int) -> Callable[[str], ClauseElement]:
    def build(dialect_name: str) -> ClauseElement:
        return _one_of(_writes_select(), writes.c.checkpoint_id, "k", n, dialect_name)
    return build


# -- retention decisions (what to record), on a connection ----------------------------------------


def thread_state(conn: Connection, tenant_id: str, thread_id: str) -> tuple[int, bool]:
    """The thread stream's version, and whether the index holds any row of the thread."""
    version = conn.execute(select(es_streams.c.version).where(
        es_streams.c.tenant_id == tenant_id,
        es_streams.c.stream_id == stream_id_of(thread_id))).scalar()
    has_rows = any(
        conn.execute(select(t.c.thread_id).where(
            t.c.tenant_id == tenant_id, t.c.thread_id == thread_id).limit(1)).first() is not None
        for t in _TABLES)
    return int(version or 0), has_rows


def namespaces_of(conn: Connection, tenant_id: str, thread_id: str) -> builtins.list[str]:
    """The checkpoint namespaces a thread has checkpoints in."""
    cp = checkpoints.c
    return builtins.list(conn.execute(
        select(cp.checkpoint_ns).where(cp.tenant_id == tenant_id, cp.thread_id == thread_id)
        .distinct()).scalars())


def _fill_merge(conn: Connection, tenant_id: str, thread_id: str, merge: _ListMerge | None,
                cid: str | None, before_id: str | None, size: int,
                filter: Mapping[str, Any] | None) -> _ListMerge:
    """A thread-wide list's next round, on one snapshot: its namespaces (first round), then the
    next page of every namespace whose buffer ran out."""
    if merge is None:
        merge = _ListMerge(namespaces_of(conn, tenant_id, thread_id))
    for source in merge.wanting():
        merge.feed(source, *list_page(conn, tenant_id, thread_id, source, cid, before_id,
                                      merge.after[source], size, filter))
    return merge


class _ListMerge:
    """The pages of a ``list()``, merged newest first.

    A thread listed without a namespace is read one namespace at a time (each page then walks
    the index in order; ordering a whole thread by checkpoint id across namespaces made every
    page sort the thread), and the namespaces' pages are merged here: by checkpoint id, then
    namespace, both descending, as one query would order them.  Other lists are one source.
    """

    def __init__(self, sources: Iterable[str | None]) -> None:
        self.buffers: dict[str | None, collections.deque[Loaded]] = {
            ns: collections.deque() for ns in sources}
        self.after: dict[str | None, tuple[bytes, str, str] | None] = dict.fromkeys(
            self.buffers)
        self.done: set[str | None] = set()

    def wanting(self) -> builtins.list[str | None]:
        """Sources whose next page must be read before the next item is known."""
        return [ns for ns, buf in self.buffers.items() if not buf and ns not in self.done]

    def feed(self, ns: str | None, loaded: Sequence[Loaded],
             after: tuple[bytes, str, str] | None) -> None:
        self.buffers[ns].extend(loaded)
        self.after[ns] = after
        if after is None:
            self.done.add(ns)

    def pop(self) -> Loaded | None:
        heads = [(ns, buf[0]) for ns, buf in self.buffers.items() if buf]
        if not heads:
            return None
        if len(heads) == 1:
            return self.buffers[heads[0][0]].popleft()
        ns, _ = max(heads, key=lambda h: (checkpoint_key(h[1].checkpoint_id), h[1].ns))
        return self.buffers[ns].popleft()


def prune_locked(conn: Connection, store: Any, tenant_id: str, thread_id: str,
                 strategy: str) -> BoundStore:
    """``keep_latest``'s plan and its ``CheckpointsPruned`` in one write transaction that holds
    the append lock from the start, so the thread cannot move between the two (what a saver
    falls back to when a busy thread kept moving under its unlocked plans).  Appends elsewhere
    wait for it: it reads the thread's checkpoint rows.  Returns the store it appended through,
    whose ``log_appended`` the caller calls once the transaction committed."""
    lock_appends(conn)
    version, kept = plan_keep_latest(conn, tenant_id, thread_id)
    bound = BoundStore(store, conn)
    if kept is not None:
        bound.append(stream_id_of(thread_id), [CheckpointsPruned(strategy=strategy, kept=kept)],
                     tenant_id=tenant_id, expected_version=version)
    return bound


def plan_keep_latest(conn: Connection, tenant_id: str, thread_id: str
                     ) -> tuple[int, dict[str, builtins.list[str]] | None]:
    """The stream version and, per namespace, the checkpoints ``keep_latest`` keeps.

    ``None`` when there is nothing to prune.  Kept: each namespace's latest checkpoint; for a
    thread using ``DeltaChannel``, also its ancestors back to the last snapshot of every delta
    channel (so the kept checkpoint's delta channels still rebuild); a subgraph call's namespace
    (``node:task``) goes entirely once the root checkpoint it started from is pruned.
    """
    version, _rows = thread_state(conn, tenant_id, thread_id)
    cp = checkpoints
    rows = conn.execute(select(cp.c.checkpoint_ns, cp.c.checkpoint_id, cp.c.parent_id,
                               cp.c.position).where(
        cp.c.tenant_id == tenant_id, cp.c.thread_id == thread_id)).all()
    if not rows:
        return version, None
    by_ns: dict[str, dict[bytes, tuple[bytes | None, int]]] = defaultdict(dict)
    for ns, key, parent, position in rows:
        by_ns[ns][bytes(key)] = (None if parent is None else bytes(parent), position)
    heads = {ns: max(keys) for ns, keys in by_ns.items()}
    head_events = _events_at(conn, [by_ns[ns][key][1] for ns, key in heads.items()])
    kept: dict[str, builtins.list[bytes]] = {}
    for ns, head in heads.items():
        keep = [head]
        ev = head_events.get(by_ns[ns][head][1])
        meta = ev.metadata if isinstance(ev, CheckpointSaved) else {}
        counters = meta.get("counters_since_delta_snapshot") or {}
        if counters:
            keep = _delta_chain(conn, by_ns[ns], head, set(counters))
        kept[ns] = keep
    root_kept = set(kept.get("", ()))
    for ns, head in heads.items():
        if ns == "" or ":" not in ns:
            continue
        ev = head_events.get(by_ns[ns][head][1])
        parents = ev.metadata.get("parents") if isinstance(ev, CheckpointSaved) else None
        root = parents.get("") if isinstance(parents, dict) else None
        if isinstance(root, str):
            root_key = checkpoint_key(root)
            if root_key in by_ns.get("", {}) and root_key not in root_kept:
                del kept[ns]
    if all(len(by_ns[ns]) == len(kept.get(ns, ())) for ns in by_ns):
        return version, None
    return version, {ns: [checkpoint_id_of(k) for k in keys] for ns, keys in kept.items()}


def _delta_chain(conn: Connection, ns_rows: Mapping[bytes, tuple[bytes | None, int]],
                 head: bytes, channels: set[str]) -> builtins.list[bytes]:
    """``head`` and its ancestors back to where every delta channel last snapshotted."""
    chain = [head]
    needed = set(channels)
    key = ns_rows[head][0]
    while key is not None and key in ns_rows and needed:
        chain.append(key)
        ev = _events_at(conn, [ns_rows[key][1]]).get(ns_rows[key][1])
        counters = (ev.metadata.get("counters_since_delta_snapshot") or {}
                    if isinstance(ev, CheckpointSaved) else {})
        needed = {ch for ch in needed if ch in counters}
        key = ns_rows[key][0]
    return chain


def threads_of_runs(conn: Connection, tenant_id: str, run_ids: Sequence[str]
                    ) -> dict[str, builtins.list[str]]:
    """Thread id -> the given run ids it has checkpoints of."""
    out: dict[str, set[str]] = defaultdict(set)
    cp = checkpoints
    for part in _chunks(builtins.list(run_ids), 500):
        for thread_id, run_id in conn.execute(select(cp.c.thread_id, cp.c.run_id).distinct()
                                              .where(cp.c.tenant_id == tenant_id,
                                                     cp.c.run_id.in_(part))):
            out[thread_id].add(run_id)
    return {t: sorted(r) for t, r in out.items()}


# -- the savers ------------------------------------------------------------------------------------

class _Base(BaseCheckpointSaver[str]):
    """Encoding and decoding shared by both savers (no I/O here)."""

    tenant_id: str
    # (thread, namespace) -> the checkpoint this saver put there last (see read_tuple).
    _hints: dict[tuple[str, str], Hint]

    def get_next_version(self, current: str | None, channel: None) -> str:
        """``<counter>.<random>``, 15 characters: a 6-digit base-62 counter (so versions sort
        as they increase) and 47 random bits (so two forks from one checkpoint never share a
        version, which ``es_lg_blobs`` relies on)."""
        if current is None:
            n = 0
        elif isinstance(current, (int, float)):
            n = int(current)
        else:
            head = str(current).split(".", 1)[0]
            n = _from_b62(head) if len(head) == 6 else int(head)
        return f"{_to_b62(n + 1, 6)}.{_to_b62(secrets.randbelow(_B62_MAX8), 8)}"

    # -- writing --

    def _checkpoint_events(self, config: RunnableConfig, checkpoint: Checkpoint,
                           metadata: CheckpointMetadata, new_versions: ChannelVersions
                           ) -> tuple[str, CheckpointSaved, RunnableConfig]:
        conf = config["configurable"]
        thread_id = _text(conf["thread_id"], "thread_id")
        ns = _text(conf.get("checkpoint_ns") or "", "checkpoint_ns")
        _check_checkpoint(checkpoint, conf.get("checkpoint_id"), new_versions)
        checkpoint, new_versions = self._sends_as_tasks(checkpoint, new_versions)
        check_key_size(self.tenant_id, thread_id, ns, checkpoint["id"],
                       checkpoint["channel_versions"], new_versions)
        values = checkpoint["channel_values"]
        items = []
        current = checkpoint["channel_versions"]
        for ch, ver in new_versions.items():
            t, data = self.serde.dumps_typed(values[ch]) if ch in values else ("empty", b"")
            # The version is the checkpoint's own for the channel (not repeated), as LangGraph
            # always passes it; kept explicitly for a new_versions entry that differs.
            items.append(Blob(ch, data, t, None if current.get(ch) == ver else ver))
        extra = {k: v for k, v in checkpoint.items() if k not in _CHECKPOINT_KEYS}
        stored_metadata = cast(dict[str, Any],
                               get_serializable_checkpoint_metadata(config, metadata))
        # JSON would keep a NaN or an infinity as null (the rest of the check: _check_checkpoint).
        check_finite((stored_metadata, extra), "checkpoint metadata")
        ev = CheckpointSaved(
            ns=ns, id=checkpoint["id"], parent=conf.get("checkpoint_id"), v=checkpoint["v"],
            ts=checkpoint["ts"], versions=dict(checkpoint["channel_versions"]),
            seen={k: dict(v) for k, v in checkpoint["versions_seen"].items()},
            updated=_compact_updated(checkpoint.get("updated_channels"), items), extra=extra,
            metadata=stored_metadata, blobs=items)
        next_config: RunnableConfig = {"configurable": {
            "thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": checkpoint["id"]}}
        return thread_id, ev, next_config

    def _sends_as_tasks(self, checkpoint: Checkpoint, new_versions: ChannelVersions
                        ) -> tuple[Checkpoint, ChannelVersions]:
        """A checkpoint of LangGraph before 0.3 (``v`` < 4) whose ``pending_sends`` key still
        holds ``Send`` objects: they move into the ``__pregel_tasks`` channel, at the highest
        channel version, as LangGraph moves them when it loads such a checkpoint (and
        ``PostgresSaver`` when it reads one), so they are stored as a channel value is (the
        checkpoint's other keys are kept as JSON, which has no ``Send``).  Else as it is."""
        sends = checkpoint.get("pending_sends")
        if checkpoint["v"] >= 4 or not sends or not isinstance(sends, builtins.list):
            return checkpoint, new_versions
        versions = dict(checkpoint["channel_versions"])
        try:
            version = max(versions.values()) if versions else self.get_next_version(None, None)
        except TypeError:  # (versions of mixed kinds: no highest)
            return checkpoint, new_versions
        moved = cast(Checkpoint, {k: v for k, v in checkpoint.items() if k != "pending_sends"})
        moved["channel_values"] = {**checkpoint["channel_values"], TASKS: builtins.list(sends)}
        moved["channel_versions"] = {**versions, TASKS: version}
        return moved, {**new_versions, TASKS: version}

    def _writes_event(self, config: RunnableConfig, items: Sequence[tuple[str, Any]],
                      task_id: str, task_path: str) -> tuple[str, WritesSaved]:
        conf = config["configurable"]
        if not isinstance(task_id, str) or not isinstance(task_path, str):
            raise InvalidArgument("task_id and task_path must be strings")
        out = []
        for i, (ch, value) in enumerate(items):
            if not isinstance(ch, str):
                raise InvalidArgument(f"a write's channel must be a string, got {ch!r}")
            t, data = self.serde.dumps_typed(value)
            out.append(Write(WRITES_IDX_MAP.get(ch, i), ch, data, t))
        if conf.get("checkpoint_id") is None:
            raise InvalidArgument("put_writes needs the config of a checkpoint (with its "
                                  "checkpoint_id, as put returns it)")
        ns = _text(conf.get("checkpoint_ns") or "", "checkpoint_ns")
        thread_id = _text(conf["thread_id"], "thread_id")
        checkpoint_id = _checkpoint_id(conf["checkpoint_id"])
        check_key_size(self.tenant_id, thread_id, ns, checkpoint_id)
        ev = WritesSaved(ns=ns, checkpoint_id=checkpoint_id, task_id=task_id,
                         task_path=task_path, writes=out,
                         upsert=all(ch in WRITES_IDX_MAP for ch, _v in items))
        return thread_id, ev

    def _remember(self, thread_id: str, ev: CheckpointSaved, position: int) -> None:
        """Note the checkpoint just put, for ``get_tuple``'s one-round-trip read."""
        hints = self._hints
        if len(hints) >= _MAX_HINTS:
            hints.clear()
        hints[(thread_id, ev.ns)] = (checkpoint_key(ev.id), _version_keys(ev), position)

    # -- reading --

    def _tuple(self, loaded: Loaded) -> CheckpointTuple:
        ev = loaded.event
        loads = self.serde.loads_typed
        values = {}
        found, cache = loaded.found, loaded.decoded
        for pair in ev.versions.items():
            value = cache.get(pair, _MISSING)
            if value is _MISSING:
                b = found.get(pair)
                if b is None or b.type == "empty":
                    cache[pair] = value = _ABSENT
                else:
                    value = loads((b.type, b.data))
                    if value.__class__ in _IMMUTABLE:
                        # Shared by every checkpoint of the batch with this version: safe, as
                        # nothing can change it.
                        cache[pair] = value
            if value is not _ABSENT:
                values[pair[0]] = value
        checkpoint = cast(Checkpoint, {
            **ev.extra, "v": ev.v, "id": ev.id, "ts": ev.ts, "channel_values": values,
            "channel_versions": ev.versions, "versions_seen": ev.seen,
            "updated_channels": ev.updated_channels(),
        } if ev.extra else {
            "v": ev.v, "id": ev.id, "ts": ev.ts, "channel_values": values,
            "channel_versions": ev.versions, "versions_seen": ev.seen,
            "updated_channels": ev.updated_channels(),
        })
        pending: builtins.list[PendingWrite] = [
            (task_id, ch, loads((t, data))) for task_id, ch, t, data in loaded.writes]
        thread_id, ns = loaded.thread_id, loaded.ns
        config: RunnableConfig = {"configurable": {
            "thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": loaded.checkpoint_id}}
        parent: RunnableConfig | None = None
        if loaded.parent_id:
            parent = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                                       "checkpoint_id": loaded.parent_id}}
        return CheckpointTuple(config, checkpoint, cast(CheckpointMetadata, ev.metadata),
                               parent, pending)

    @staticmethod
    def _get_args(config: RunnableConfig) -> tuple[str, str, str | None]:
        conf = config["configurable"]
        return (_text(conf["thread_id"], "thread_id"),
                _text(conf.get("checkpoint_ns") or "", "checkpoint_ns"),
                _optional_checkpoint_id(config))

    @staticmethod
    def _list_args(config: RunnableConfig | None, before: RunnableConfig | None,
                   filter: object, limit: object
                   ) -> tuple[str | None, str | None, str | None, str | None]:
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise InvalidArgument(f"limit must be an int or None, got {type(limit).__name__}")
        if filter is not None and not isinstance(filter, Mapping):
            raise InvalidArgument(f"filter must be a mapping of metadata keys to values, got "
                                  f"{type(filter).__name__}")
        thread_id = ns = cid = None
        if config is not None:
            conf = config.get("configurable") or {}
            if conf.get("thread_id") is not None:
                thread_id = _text(conf["thread_id"], "thread_id")
            if conf.get("checkpoint_ns") is not None:
                ns = _text(conf["checkpoint_ns"], "checkpoint_ns")
            cid = _optional_checkpoint_id(config)
        before_id = None
        if before is not None and (given := get_checkpoint_id(before)) is not None:
            # An empty one is an id here, as LangGraph's SQL savers take it: nothing is before
            # it (the caller sees the empty id and lists nothing).
            before_id = _checkpoint_id(given)
        return thread_id, ns, cid, before_id

    @staticmethod
    def _check_prune(thread_ids: Sequence[str], strategy: str) -> builtins.list[str]:
        if isinstance(thread_ids, str):
            raise TypeError("thread_ids must be a sequence of thread IDs, not a str")
        if strategy not in PRUNE_STRATEGIES:
            raise ValueError(f"Unknown prune strategy: {strategy!r}")
        return [_text(t, "thread_id") for t in thread_ids]


def _matches(metadata: Mapping[str, Any], filter: Mapping[str, Any]) -> bool:
    """``list``'s filter: every key of ``filter`` has its value in the checkpoint's metadata."""
    return all(metadata.get(k) == v for k, v in filter.items())  # as InMemorySaver


def _page_size(limit: int | None, filter: Mapping[str, Any] | None) -> int:
    """Checkpoints a list() reads per transaction (its first page)."""
    if limit is not None and not filter:
        return max(1, min(limit, _LIST_PAGE))
    return _LIST_PAGE


def _next_page_size(size: int, thread_id: str | None) -> int:
    """A thread's pages come in index order; pages across threads are picked by a sort of the
    index rows after the previous page, so they double (a long listing sorts a few times, not
    once per page)."""
    return size if thread_id is not None else min(2 * size, _LIST_PAGE_MAX)


_MISSING = object()
_ABSENT = object()
_IMMUTABLE = frozenset({str, int, float, bool, bytes, type(None)})

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # ASCII order
_B62_INDEX = {c: i for i, c in enumerate(_B62)}
_B62_MAX8 = 62**8


def _to_b62(value: int, width: int) -> str:
    digits = []
    n = value
    while n:
        n, r = divmod(n, 62)
        digits.append(_B62[r])
    if len(digits) > width:
        raise OverflowError(f"channel version counter {value} does not fit {width} digits")
    return "".join(reversed(digits)).rjust(width, "0")


def _from_b62(text: str) -> int:
    n = 0
    for c in text:
        n = n * 62 + _B62_INDEX[c]
    return n


_CHECKPOINT_KEYS = frozenset({"v", "id", "ts", "channel_values", "channel_versions",
                              "versions_seen", "updated_channels"})


_STR_INT = frozenset({str, int})
_STR = frozenset({str})


def _is_version(value: object) -> bool:
    """A channel version JSON keeps: a str, an int or a finite float (a NaN or an infinity
    would come back as null, and the checkpoint would not decode)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**63  # (an index key's text, and JSON's, stay small)
    return isinstance(value, str)


def _check_checkpoint(checkpoint: Checkpoint, parent: object,
                      new_versions: ChannelVersions) -> None:
    """What ``put`` stores must read back (its events skip the store's round-trip check, see
    ``CheckpointSaved.__check_on_append__``): refuse the few fields JSON would change."""
    if not isinstance(checkpoint.get("id"), str) or not isinstance(checkpoint.get("ts"), str):
        raise InvalidArgument("a checkpoint's id and ts must be strings")
    v = checkpoint.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise InvalidArgument(f"a checkpoint's v must be an int, got {v!r}")
    if parent is not None and not isinstance(parent, str):
        raise InvalidArgument(f"checkpoint_id must be a string, got {parent!r}")
    seen = checkpoint["versions_seen"]
    for versions in (checkpoint["channel_versions"], new_versions, *seen.values()):
        kinds = set(map(type, versions.values()))
        if set(map(type, versions)) <= _STR and kinds <= _STR_INT and (
                int not in kinds or all(map(_is_version, versions.values()))):
            continue  # the usual case, checked in C
        if not all(isinstance(ch, str) and _is_version(ver) for ch, ver in versions.items()):
            raise InvalidArgument(f"channel versions map names to str, 64-bit int or finite "
                                  f"float versions, got {versions!r:.200}")
    if not all(isinstance(node, str) for node in seen):
        raise InvalidArgument("versions_seen must be keyed by node names (strings)")
    # Channel names and versions are index columns (text): PostgreSQL's refuses NUL.
    current = checkpoint["channel_versions"]
    if "\x00" in "".join((*current, *new_versions,
                           *(ver for ver in current.values() if ver.__class__ is str),
                           *(ver for ver in new_versions.values() if ver.__class__ is str))):
        raise InvalidArgument("channel names and versions must not contain NUL characters")


def _compact_updated(updated: Any, items: Sequence[Blob]) -> builtins.list[str] | bool | None:
    if updated is None:
        return None
    listed = builtins.list(updated)
    if not all(isinstance(ch, str) for ch in listed):
        raise InvalidArgument(f"updated_channels must be channel names, got {listed!r}")
    return True if listed and listed == sorted(b.channel for b in items) else listed


def _split(ev: CheckpointSaved, limit: int) -> builtins.list[Event]:
    """A checkpoint over the store's event size limit: its values in events of their own."""
    budget = max(1, int(limit * 0.7))
    out: builtins.list[Event] = []
    batch: builtins.list[Blob] = []
    size = 0
    for b in sorted(ev.blobs, key=lambda b: len(b.data)):
        cost = len(b.data) * 4 // 3 + len(b.channel) + 80
        if batch and size + cost > budget:
            out.append(ChannelValuesSaved(ns=ev.ns, checkpoint_id=ev.id, blobs=batch))
            batch, size = [], 0
        batch.append(msgspec.structs.replace(b, version=ev.version_of(b)))
        size += cost
    if batch:
        out.append(ChannelValuesSaved(ns=ev.ns, checkpoint_id=ev.id, blobs=batch))
    return [*out, msgspec.structs.replace(ev, blobs=[], updated=ev.updated_channels())]


def _split_writes(ev: WritesSaved, limit: int) -> builtins.list[Event]:
    budget = max(1, int(limit * 0.7))
    out: builtins.list[Event] = []
    batch: builtins.list[Write] = []
    size = 0
    for w in ev.writes:
        cost = len(w.data) * 4 // 3 + len(w.channel) + 60
        if batch and size + cost > budget:
            out.append(msgspec.structs.replace(ev, writes=batch))
            batch, size = [], 0
        batch.append(w)
        size += cost
    if batch:
        out.append(msgspec.structs.replace(ev, writes=batch))
    return out


_LOOP_CHECK_SECONDS = 0.5  # how often a sync call waiting on the loop checks it is not closed


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """``asyncio.to_thread(fn, *args)``, a ``StopIteration`` out of ``fn`` (a serializer's,
    say) raised as a ``RuntimeError``: the event loop cannot hand it to the caller, who waited
    for ever (a tester's find)."""
    return await asyncio.to_thread(no_stop_iteration, fn, *args)


def _loop_gone(loop: asyncio.AbstractEventLoop) -> RuntimeError:
    return RuntimeError("AsyncEventStoreSaver's event loop (the one it was created in) is "
                        f"{'closed' if loop.is_closed() else 'not running'}; its sync methods "
                        "run their calls there")


class EventStoreSaver(_Base):
    """A LangGraph checkpointer on an :class:`EventStore` (SQLite or PostgreSQL).

    ``tenant_id`` is the store tenant of every thread this saver sees.  The ``a*`` methods run the
    sync ones in a worker thread; for asyncio applications use :class:`AsyncEventStoreSaver`.
    """

    def __init__(self, store: EventStore, *, tenant_id: str = DEFAULT_TENANT,
                 serde: SerializerProtocol | None = None) -> None:
        check_sync_store(store, "EventStoreSaver",
                         "projections.langgraph_saver.AsyncEventStoreSaver")
        check_tenant(tenant_id)  # (every read and retention call uses it as it is)
        super().__init__(serde=serde)
        self.store = store
        self.tenant_id = tenant_id
        self._hints = {}
        store.add_inline_handler(index_events)

    @classmethod
    @contextlib.contextmanager
    def from_url(cls, url: str | None = None, *, tenant_id: str = DEFAULT_TENANT,
                 serde: SerializerProtocol | None = None) -> Iterator[EventStoreSaver]:
        """A saver on a store it opens, as a context manager (as ``SqliteSaver.from_conn_string``):
        ``with EventStoreSaver.from_url(url) as saver: ...`` closes the store on the way out."""
        check_tenant(tenant_id)
        with EventStore.open(url) as store:
            yield cls(store, tenant_id=tenant_id, serde=serde)

    def setup(self) -> None:
        """Nothing to do: migration 0003 (``eventstore migrate``) creates the index tables."""

    # -- writes --

    def put(self, config: RunnableConfig, checkpoint: Checkpoint,
            metadata: CheckpointMetadata, new_versions: ChannelVersions) -> RunnableConfig:
        thread_id, ev, next_config = self._checkpoint_events(config, checkpoint, metadata,
                                                             new_versions)
        position = self._append(thread_id, [ev], lambda limit: _split(ev, limit))
        self._remember(thread_id, ev, position)
        return next_config

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                   task_id: str, task_path: str = "") -> None:
        if not writes:
            return
        thread_id, ev = self._writes_event(config, writes, task_id, task_path)
        self._append(thread_id, [ev], lambda limit: _split_writes(ev, limit))

    def _append(self, thread_id: str, evs: builtins.list[Event],
                split: Callable[[int], builtins.list[Event]] | None = None,
                expected_version: int | None = None) -> int:
        """Append; returns the last event's position."""
        stream = stream_id_of(thread_id)
        try:
            result = self.store.append(stream, evs, tenant_id=self.tenant_id,
                                       expected_version=expected_version)
        except EventTooLarge as e:
            if split is None:
                raise
            result = self.store.append(stream, split(e.limit), tenant_id=self.tenant_id,
                                       expected_version=expected_version)
        return result.last_position

    # -- reads --

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        thread_id, ns, cid = self._get_args(config)
        hint = self._hints.get((thread_id, ns))
        try:
            with begin_read(self.store.engine) as conn:
                loaded = read_tuple(conn, self.tenant_id, thread_id, ns, cid, hint)
        except _Torn:
            with begin_snapshot(self.store.engine) as conn:
                loaded = read_tuple(conn, self.tenant_id, thread_id, ns, cid)
        return None if loaded is None else self._tuple(loaded)

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None
             ) -> Iterator[CheckpointTuple]:
        thread_id, ns, cid, before_id = self._list_args(config, before, filter, limit)
        remaining = limit
        if (remaining is not None and remaining <= 0) or before_id == "":  # nothing (as
            return  # InMemorySaver for a limit; the SQL savers for before an empty id)
        for item in self._listed(thread_id, ns, cid, before_id, _page_size(limit, filter),
                                 filter):
            yield self._tuple(item)
            if remaining is not None:
                remaining -= 1
                if remaining <= 0:
                    return

    def _listed(self, thread_id: str | None, ns: str | None, cid: str | None,
                before_id: str | None, size: int, filter: Mapping[str, Any] | None
                ) -> Iterator[Loaded]:
        """The checkpoints a list() gives, newest first, read page by page."""
        if thread_id is not None and ns is None:
            merge: _ListMerge | None = None
            while True:
                while merge is None or merge.wanting():
                    # The namespaces and every page a merge needs next: one snapshot (see
                    # list_page), so a merged page is one state of the thread.
                    with begin_snapshot(self.store.engine) as conn:
                        merge = _fill_merge(conn, self.tenant_id, thread_id, merge, cid,
                                            before_id, size, filter)
                item = merge.pop()
                if item is None:
                    return
                yield item
        after: tuple[bytes, str, str] | None = None
        while True:
            with begin_snapshot(self.store.engine) as conn:
                loaded, after = list_page(conn, self.tenant_id, thread_id, ns, cid, before_id,
                                          after, size, filter)
            yield from loaded
            if after is None:
                return
            size = _next_page_size(size, thread_id)

    # -- retention --

    def delete_thread(self, thread_id: str) -> None:
        thread_id = _text(thread_id, "thread_id")
        with begin_read(self.store.engine) as conn:
            _version, has_rows = thread_state(conn, self.tenant_id, thread_id)
        if has_rows:
            self._append(thread_id, [ThreadDeleted()])

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        for thread_id in self._check_prune(thread_ids, strategy):
            if strategy == "delete":
                with begin_read(self.store.engine) as conn:
                    _version, has_rows = thread_state(conn, self.tenant_id, thread_id)
                if has_rows:
                    self._append(thread_id, [CheckpointsPruned(strategy="delete")])
                continue
            for _attempt in range(_OPTIMISTIC_PRUNES):
                with begin_read(self.store.engine) as conn:
                    version, kept = plan_keep_latest(conn, self.tenant_id, thread_id)
                if kept is None:
                    break
                try:
                    self._append(thread_id, [CheckpointsPruned(strategy=strategy, kept=kept)],
                                 expected_version=version)
                    break
                except WrongExpectedVersion:
                    continue
            else:
                with transaction(self.store, write=True) as conn:
                    bound = prune_locked(conn, self.store, self.tenant_id, thread_id, strategy)
                bound.log_appended()

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        ids = [_text(r, "run_id") for r in run_ids]
        if not ids:
            return
        with begin_read(self.store.engine) as conn:
            affected = threads_of_runs(conn, self.tenant_id, ids)
        for thread_id, runs in sorted(affected.items()):
            self._append(thread_id, [RunsDeleted(run_ids=runs)])

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        source = _text(source_thread_id, "source_thread_id")
        target = _text(target_thread_id, "target_thread_id")
        with begin_read(self.store.engine) as conn:
            version, has_rows = thread_state(conn, self.tenant_id, source)
        if has_rows and source != target:
            self._append(target, [ThreadCopied(source_thread_id=source, source_version=version)])

    # -- asyncio: the sync methods in a worker thread --

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await _in_thread(self.get_tuple, config)

    async def alist(self, config: RunnableConfig | None, *,
                    filter: dict[str, Any] | None = None, before: RunnableConfig | None = None,
                    limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        items = await _in_thread(
            lambda: builtins.list(self.list(config, filter=filter, before=before, limit=limit)))
        for item in items:
            yield item

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata, new_versions: ChannelVersions
                   ) -> RunnableConfig:
        return await _in_thread(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        await _in_thread(self.put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        await _in_thread(self.delete_thread, thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await _in_thread(self.delete_for_runs, run_ids)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await _in_thread(self.copy_thread, source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await _in_thread(lambda: self.prune(thread_ids, strategy=strategy))


class AsyncEventStoreSaver(_Base):
    """A LangGraph checkpointer on an :class:`eventstore.aio.AsyncEventStore`.

    Native asyncio: every transaction runs on the async store's driver (psycopg async,
    aiosqlite) through ``AsyncEventStore.append`` / ``run_sync``; nothing blocks the event loop.
    The sync methods are for code on other threads (``graph.invoke`` from a worker thread): they
    run the async ones on the loop the saver was created on.
    """

    def __init__(self, store: AsyncEventStore, *, tenant_id: str = DEFAULT_TENANT,
                 serde: SerializerProtocol | None = None) -> None:
        check_async_store(store, "AsyncEventStoreSaver",
                          "projections.langgraph_saver.EventStoreSaver")
        check_tenant(tenant_id)  # (every read and retention call uses it as it is)
        super().__init__(serde=serde)
        self.store = store
        self.tenant_id = tenant_id
        self._hints = {}
        store.add_inline_handler(index_events)
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None

    @classmethod
    @contextlib.asynccontextmanager
    async def from_url(cls, url: str | None = None, *, tenant_id: str = DEFAULT_TENANT,
                       serde: SerializerProtocol | None = None
                       ) -> AsyncIterator[AsyncEventStoreSaver]:
        """A saver on an async store it opens, as an async context manager:
        ``async with AsyncEventStoreSaver.from_url(url) as saver: ...`` closes it on the way
        out."""
        from eventstore.aio import AsyncEventStore

        check_tenant(tenant_id)
        async with await AsyncEventStore.open(url) as store:
            yield cls(store, tenant_id=tenant_id, serde=serde)

    async def setup(self) -> None:
        """Nothing to do: migration 0003 (``eventstore migrate``) creates the index tables."""

    async def _append(self, thread_id: str, evs: builtins.list[Event],
                      split: Callable[[int], builtins.list[Event]] | None = None,
                      expected_version: int | None = None) -> int:
        """Append; returns the last event's position."""
        stream = stream_id_of(thread_id)
        try:
            result = await self.store.append(stream, evs, tenant_id=self.tenant_id,
                                             expected_version=expected_version)
        except EventTooLarge as e:
            if split is None:
                raise
            result = await self.store.append(stream, split(e.limit), tenant_id=self.tenant_id,
                                             expected_version=expected_version)
        return result.last_position

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata, new_versions: ChannelVersions
                   ) -> RunnableConfig:
        thread_id, ev, next_config = self._checkpoint_events(config, checkpoint, metadata,
                                                             new_versions)
        position = await self._append(thread_id, [ev], lambda limit: _split(ev, limit))
        self._remember(thread_id, ev, position)
        return next_config

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        if not writes:
            return
        thread_id, ev = self._writes_event(config, writes, task_id, task_path)
        await self._append(thread_id, [ev], lambda limit: _split_writes(ev, limit))

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        thread_id, ns, cid = self._get_args(config)
        hint = self._hints.get((thread_id, ns))
        try:
            loaded = await self.store.run_read(read_tuple, self.tenant_id, thread_id, ns, cid,
                                               hint)
        except _Torn:  # (see read_tuple)
            loaded = await self.store._run_snapshot(read_tuple, self.tenant_id, thread_id, ns,
                                                    cid)
        return None if loaded is None else self._tuple(loaded)

    async def alist(self, config: RunnableConfig | None, *,
                    filter: dict[str, Any] | None = None, before: RunnableConfig | None = None,
                    limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        thread_id, ns, cid, before_id = self._list_args(config, before, filter, limit)
        remaining = limit
        if (remaining is not None and remaining <= 0) or before_id == "":  # nothing (as
            return  # InMemorySaver for a limit; the SQL savers for before an empty id)
        async for item in self._alisted(thread_id, ns, cid, before_id,
                                        _page_size(limit, filter), filter):
            yield self._tuple(item)
            if remaining is not None:
                remaining -= 1
                if remaining <= 0:
                    return

    async def _alisted(self, thread_id: str | None, ns: str | None, cid: str | None,
                       before_id: str | None, size: int, filter: Mapping[str, Any] | None
                       ) -> AsyncIterator[Loaded]:
        """The checkpoints an alist() gives, newest first, read page by page."""
        if thread_id is not None and ns is None:
            merge: _ListMerge | None = None
            while True:
                while merge is None or merge.wanting():
                    merge = await self.store._run_snapshot(
                        _fill_merge, self.tenant_id, thread_id, merge, cid, before_id, size,
                        filter)
                item = merge.pop()
                if item is None:
                    return
                yield item
        after: tuple[bytes, str, str] | None = None
        while True:
            loaded, after = await self.store._run_snapshot(
                list_page, self.tenant_id, thread_id, ns, cid, before_id, after, size, filter)
            for item in loaded:
                yield item
            if after is None:
                return
            size = _next_page_size(size, thread_id)

    async def adelete_thread(self, thread_id: str) -> None:
        thread_id = _text(thread_id, "thread_id")
        _version, has_rows = await self.store.run_sync(thread_state, self.tenant_id, thread_id)
        if has_rows:
            await self._append(thread_id, [ThreadDeleted()])

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        for thread_id in self._check_prune(thread_ids, strategy):
            if strategy == "delete":
                _v, has_rows = await self.store.run_sync(thread_state, self.tenant_id, thread_id)
                if has_rows:
                    await self._append(thread_id, [CheckpointsPruned(strategy="delete")])
                continue
            for _attempt in range(_OPTIMISTIC_PRUNES):
                version, kept = await self.store.run_sync(plan_keep_latest, self.tenant_id,
                                                          thread_id)
                if kept is None:
                    break
                try:
                    await self._append(thread_id,
                                       [CheckpointsPruned(strategy=strategy, kept=kept)],
                                       expected_version=version)
                    break
                except WrongExpectedVersion:
                    continue
            else:
                bound = await self.store.run_sync(prune_locked, self.store, self.tenant_id,
                                                  thread_id, strategy, write=True)
                bound.log_appended()

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        ids = [_text(r, "run_id") for r in run_ids]
        if not ids:
            return
        affected = await self.store.run_sync(threads_of_runs, self.tenant_id, ids)
        for thread_id, runs in sorted(affected.items()):
            await self._append(thread_id, [RunsDeleted(run_ids=runs)])

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        source = _text(source_thread_id, "source_thread_id")
        target = _text(target_thread_id, "target_thread_id")
        version, has_rows = await self.store.run_sync(thread_state, self.tenant_id, source)
        if has_rows and source != target:
            await self._append(target,
                               [ThreadCopied(source_thread_id=source, source_version=version)])

    # -- sync entry points for other threads --

    def _sync(self, coro: Any) -> Any:
        loop = self.loop
        if loop is None:
            coro.close()
            raise RuntimeError("AsyncEventStoreSaver was created outside a running event loop; "
                               "its sync methods need that loop")
        try:
            if asyncio.get_running_loop() is loop:
                coro.close()
                raise asyncio.InvalidStateError(
                    "Synchronous calls to AsyncEventStoreSaver are only allowed from a different "
                    "thread. From the main thread, use the async interface. For example, use "
                    "`checkpointer.alist(...)` or `await graph.ainvoke(...)`.")
        except RuntimeError:
            pass
        if not loop.is_running():  # nothing would ever run the call: it would wait for ever
            coro.close()
            raise _loop_gone(loop)
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        while True:
            try:
                return future.result(timeout=_LOOP_CHECK_SECONDS)
            except concurrent.futures.TimeoutError:
                # A loop that stopped may run again (one driven by run_until_complete), and a
                # call it began may then finish (a write that lands): waited for.  A closed
                # loop never runs it again.
                if loop.is_closed() and not future.done():
                    future.cancel()
                    with contextlib.suppress(RuntimeError, ValueError):
                        coro.close()  # (never to run: no "never awaited" warning for it)
                    raise _loop_gone(loop) from None

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return cast(CheckpointTuple | None, self._sync(self.aget_tuple(config)))

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None
             ) -> Iterator[CheckpointTuple]:
        async def collect() -> builtins.list[CheckpointTuple]:
            return [t async for t in self.alist(config, filter=filter, before=before,
                                                limit=limit)]
        yield from cast(builtins.list[CheckpointTuple], self._sync(collect()))

    def put(self, config: RunnableConfig, checkpoint: Checkpoint,
            metadata: CheckpointMetadata, new_versions: ChannelVersions) -> RunnableConfig:
        return cast(RunnableConfig,
                    self._sync(self.aput(config, checkpoint, metadata, new_versions)))

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                   task_id: str, task_path: str = "") -> None:
        self._sync(self.aput_writes(config, writes, task_id, task_path))

    def delete_thread(self, thread_id: str) -> None:
        self._sync(self.adelete_thread(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._sync(self.adelete_for_runs(run_ids))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._sync(self.acopy_thread(source_thread_id, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._sync(self.aprune(thread_ids, strategy=strategy))


# -- migrating from another saver --


def import_checkpoints(source: BaseCheckpointSaver[Any], target: EventStoreSaver, *,
                       thread_ids: Iterable[str] | None = None) -> int:
    """Copy threads from another saver (``SqliteSaver``, ``PostgresSaver`` …) into ``target``.

    Every checkpoint goes over oldest first with its metadata, parent and pending writes
    (interrupts and resume values included), storing only the channels whose version changed
    from the parent, so an imported thread is as small as one written by this saver.  Values
    go over as the source's serializer wrote them when both savers use LangGraph's
    ``JsonPlusSerializer`` (the default): an object of the application's own classes is
    copied as its bytes, not built and serialized again, so the import needs neither those
    classes nor LangGraph's msgpack allow-list (built without its class, it would have
    become a plain dict for good).  ``thread_ids`` defaults to every thread of ``source``.
    Each thread goes over whole, in one atomic append, and only into a thread ``target`` does
    not have yet: threads already there are skipped, so an interrupted import can simply be
    run again.  Returns the number of checkpoints copied.  A thread this saver refuses (a
    thread id over 246 characters, a checkpoint it cannot store) is left out whole and the
    others go on; then :class:`ThreadsNotImported` names each such thread and why.  For an
    :class:`AsyncEventStoreSaver`, see :func:`aimport_checkpoints`.
    """
    if not isinstance(target, EventStoreSaver):
        raise InvalidArgument(
            f"import_checkpoints writes into an EventStoreSaver, not "
            f"{type(target).__name__}; for an AsyncEventStoreSaver use "
            "`await aimport_checkpoints(source, target)`")
    reader, writer = _byte_copying(source, target)
    if thread_ids is None:
        thread_ids = _thread_ids(reader.list(None))
    run = _ImportRun(target.tenant_id)
    for thread_id in thread_ids:
        with run.thread(thread_id) as copied:
            tuples = builtins.list(reader.list({"configurable": {"thread_id": thread_id}}))
            if events := _thread_events(writer, thread_id, tuples):
                target.store.append(stream_id_of(thread_id), events,
                                    tenant_id=target.tenant_id, expected_version=0)
                copied(len(tuples))
    return run.result()


async def aimport_checkpoints(source: BaseCheckpointSaver[Any], target: AsyncEventStoreSaver,
                              *, thread_ids: Iterable[str] | None = None) -> int:
    """:func:`import_checkpoints` into an :class:`AsyncEventStoreSaver`, reading ``source``
    through its async methods (``AsyncSqliteSaver``, ``AsyncPostgresSaver`` …)."""
    if not isinstance(target, AsyncEventStoreSaver):
        raise InvalidArgument(
            f"aimport_checkpoints writes into an AsyncEventStoreSaver, not "
            f"{type(target).__name__}; for an EventStoreSaver use import_checkpoints(source, "
            "target)")
    reader, writer = _byte_copying(source, target)
    if thread_ids is None:
        thread_ids = _thread_ids([t async for t in reader.alist(None)])
    run = _ImportRun(target.tenant_id)
    for thread_id in thread_ids:
        with run.thread(thread_id) as copied:
            tuples = [t async for t in reader.alist({"configurable": {"thread_id": thread_id}})]
            if events := _thread_events(writer, thread_id, tuples):
                await target.store.append(stream_id_of(thread_id), events,
                                          tenant_id=target.tenant_id, expected_version=0)
                copied(len(tuples))
    return run.result()


def _thread_ids(tuples: Iterable[CheckpointTuple]) -> builtins.list[str]:
    """Every thread of a source's ``list(None)``, once each, in the order first seen."""
    seen: dict[str, None] = {}
    for t in tuples:
        seen.setdefault(str(t.config["configurable"]["thread_id"]), None)
    return builtins.list(seen)


class _ImportRun:
    """What an import copied, skipped and was refused, thread by thread."""

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        self.copied = 0
        self.failed: dict[str, str] = {}

    @contextlib.contextmanager
    def thread(self, thread_id: str) -> Iterator[Callable[[int], None]]:
        """Around one thread's import, which calls the given function with the checkpoints
        it copied: a thread the target has already is skipped, one it refuses (its id or its
        data) is noted, and the others go on."""
        def copied(n: int) -> None:
            self.copied += n

        try:
            yield copied
        except WrongExpectedVersion:
            _log.info("import_thread_skipped", thread=thread_id, tenant=self.tenant_id)
        except InvalidArgument as e:
            self.failed[str(thread_id)] = f"{type(e).__name__}: {e}"
            _log.warning("import_thread_refused", thread=str(thread_id)[:100],
                         tenant=self.tenant_id, error=self.failed[str(thread_id)])

    def result(self) -> int:
        """The checkpoints copied; :class:`ThreadsNotImported` if any thread was refused."""
        if self.failed:
            raise ThreadsNotImported(self.failed, self.copied)
        return self.copied


class ThreadsNotImported(InvalidArgument):
    """:func:`import_checkpoints` left these threads out (``failed``: thread id -> why); the
    other threads were imported (``copied`` checkpoints)."""

    def __init__(self, failed: dict[str, str], copied: int) -> None:
        shown = "; ".join(f"{t[:60]!r}: {why}" for t, why in list(failed.items())[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        super().__init__(f"{len(failed)} thread(s) not imported ({shown}{more}); the others "
                         f"were ({copied} checkpoints)")
        self.failed = failed
        self.copied = copied


def _thread_events(target: EventStoreSaver | AsyncEventStoreSaver, thread_id: str,
                   tuples: Sequence[CheckpointTuple]) -> builtins.list[Event]:
    """The events of one imported thread (``tuples`` as ``list`` gives them, newest first),
    for one append."""
    limit = target.store._options.max_event_bytes
    events: builtins.list[Event] = []
    versions: dict[tuple[str, str], ChannelVersions] = {}
    for t in reversed(tuples):  # list() gives newest first
        conf = t.config["configurable"]
        ns = _text(conf.get("checkpoint_ns") or "", "checkpoint_ns")
        checkpoint, metadata = _built_outside_values(t.checkpoint, t.metadata, target.serde)
        parent_id = (t.parent_config or {}).get("configurable", {}).get("checkpoint_id")
        before = versions.get((ns, str(parent_id)), {}) if parent_id else {}
        changed = {ch: v for ch, v in checkpoint["channel_versions"].items()
                   if before.get(ch) != v}
        put_config: RunnableConfig = {"configurable": {
            "thread_id": thread_id, "checkpoint_ns": ns,
            **({"checkpoint_id": parent_id} if parent_id else {})}}
        _t, ev, stored = target._checkpoint_events(put_config, checkpoint, metadata, changed)
        events.extend(_fitted(ev, limit, _split))
        versions[(ns, str(checkpoint["id"]))] = dict(checkpoint["channel_versions"])
        by_task: dict[str, builtins.list[tuple[str, Any]]] = {}
        for task_id, channel, value in t.pending_writes or ():
            by_task.setdefault(task_id, []).append((channel, value))
        for n, (task_id, task_writes) in enumerate(by_task.items()):
            # The source gives no task paths, and this saver orders a checkpoint's writes
            # by (path, task, idx), as LangGraph wants them: paths that sort in the order
            # the source gave the tasks keep that order.
            _t, wev = target._writes_event(stored, task_writes, task_id, f"{n:08d}")
            events.extend(_fitted(wev, limit, _split_writes))
    return events


# -- imports copy serialized values as they are -------------------------------------------------

class _Packed:
    """An object in a msgpack value of LangGraph's serializer (an extension: a class and its
    arguments), kept as its bytes by an import (see :func:`_byte_copying`)."""

    __slots__ = ("code", "data")

    def __init__(self, code: int, data: bytes) -> None:
        self.code = code
        self.data = data


def _pack_back(obj: Any) -> Any:
    if isinstance(obj, _Packed):
        return ormsgpack.Ext(obj.code, obj.data)
    raise TypeError(f"not a kept msgpack value: {type(obj).__name__}")


def _holds_packed(obj: Any) -> bool:
    if isinstance(obj, _Packed):
        return True
    if isinstance(obj, dict):
        return any(_holds_packed(k) or _holds_packed(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return any(_holds_packed(v) for v in obj)
    return False


class _KeepBytes(SerializerProtocol):
    """A ``JsonPlusSerializer`` whose msgpack values keep their objects as :class:`_Packed`
    bytes when loaded, and write them back unchanged."""

    def __init__(self, serde: SerializerProtocol) -> None:
        self._serde = serde

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        if _holds_packed(obj):
            return "msgpack", ormsgpack.packb(obj, default=_pack_back,
                                              option=ormsgpack.OPT_NON_STR_KEYS)
        return self._serde.dumps_typed(obj)

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        if data[0] == "msgpack":
            return ormsgpack.unpackb(data[1], ext_hook=_Packed,
                                     option=ormsgpack.OPT_NON_STR_KEYS)
        return self._serde.loads_typed(data)

    def build(self, obj: Any) -> Any:
        """``obj`` with its kept objects built, as the wrapped serializer loads them."""
        if not _holds_packed(obj):
            return obj
        return self._serde.loads_typed(self.dumps_typed(obj))


_S = TypeVar("_S", bound=BaseCheckpointSaver[Any])
_B = TypeVar("_B", bound="_Base")


def _byte_copying(source: _S, target: _B) -> tuple[_S, _B]:
    """Views of an import's two savers that carry msgpack values over as their bytes, when
    both use LangGraph's ``JsonPlusSerializer`` itself (the source's encoding is then the
    target's); else the savers themselves (values are loaded and serialized again)."""
    if not (type(getattr(source, "serde", None)) is JsonPlusSerializer
            and type(target.serde) is JsonPlusSerializer):  # (a subclass may encode otherwise)
        return source, target
    try:
        reader, writer = copy.copy(source), copy.copy(target)
    except Exception:  # (a saver that cannot be copied: loaded and serialized again)
        return source, target
    reader.serde = _KeepBytes(source.serde)
    writer.serde = _KeepBytes(target.serde)
    return reader, writer


def _built_outside_values(checkpoint: Checkpoint, metadata: CheckpointMetadata,
                          serde: SerializerProtocol) -> tuple[Checkpoint, CheckpointMetadata]:
    """The checkpoint and its metadata with objects outside the channel values built (the
    log keeps those as JSON): a checkpoint format's extra keys, and metadata that a source
    loads through its serializer (``InMemorySaver``)."""
    if not isinstance(serde, _KeepBytes):
        return checkpoint, metadata
    extra = {k: serde.build(v) for k, v in checkpoint.items() if k not in _CHECKPOINT_KEYS}
    if extra:
        checkpoint = cast(Checkpoint, {**checkpoint, **extra})
    return checkpoint, cast(CheckpointMetadata, serde.build(metadata))


def _fitted(ev: _E, limit: int, split: Callable[[_E, int], builtins.list[Event]]
            ) -> builtins.list[Event]:
    """``ev``, or its parts when it is over the store's event size limit (as ``_append``)."""
    if len(encode_event(ev)[2]) <= limit:
        return [ev]
    return split(ev, limit)
