"""Durable background jobs: queued, leased to a worker, suspended for human input, swept.

Stream per job: ``job-<job_id>``.  Every transition is a compare-and-set on the stream's version
(:func:`projections._command.decide`: read the state, decide, append with ``expected_version``,
read again and decide again on a conflict), so two actors can never both move a job out of the
same state: two workers claiming one job, a resume racing a cancel or a deadline, two sweepers
requeueing one expired lease, a heartbeat racing a sweep — one append wins, the others re-read and
see the new state (and refuse, or find nothing left to do).

Queries across jobs ("the oldest queued job", "expired leases", "the open job of this dedupe
key") read the inline projection :class:`JobProjection`, whose row per job is indexed by:

* ``status``: ``queued``, ``running``, ``suspended``, ``completed``, ``failed``, ``cancelled``;
* ``group_key``: the hash of the job's dedupe key (``None`` without one);
* ``sort_key``: the time (UTC microseconds) at which the job next needs someone — when it was
  queued for a queued job (oldest first is FIFO), when its lease runs out for a running job, its
  deadline for a suspended one (``None`` without a deadline), when it finished for a finished one.
  So "expired leases at ``now``" is ``status='running' AND sort_key < now`` on the index.

Rows are only a way to find candidates; every decision is made on the stream's current state
(the row topped up from the log), never on the row alone.

A lease counts as expired, and a deadline as passed, once ``now`` is strictly after it.  Times
come from the facade's clock and are carried by the events themselves.
"""

from __future__ import annotations

import builtins
import hashlib
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard

import msgspec

from eventstore import AppendResult, EventStore, RecordedEvent, WrongExpectedVersion
from eventstore._core import check_int, check_limit
from eventstore._time import to_micros
from eventstore.errors import InvalidArgument
from eventstore.events import Event, RawEvent
from eventstore.logs import get_logger

from ._command import (
    MAX_DURATION,
    Clock,
    check_duration,
    check_tenant,
    check_text,
    check_time,
    decide,
    fold_appended,
    sweep_time,
    time_after,
    utc_clock,
)
from ._engine import Projection, RowIndex, current, inline, query_rows, register
from ._stores import check_sync_store
from .errors import Conflict, LeaseLost, NotFound
from .events import (
    JobCancelled,
    JobClaimed,
    JobCompleted,
    JobFailed,
    JobHeartbeat,
    JobRequeued,
    JobResumed,
    JobSubmitted,
    JobSuspended,
    MilestoneRecorded,
)

__all__ = [
    "CANCELLED",
    "COMPLETED",
    "DEADLINE_PASSED",
    "FAILED",
    "QUEUED",
    "RUNNING",
    "SUSPENDED",
    "STATUSES",
    "TERMINAL",
    "WORKER_LOST",
    "dedupe_group",
    "Job",
    "JobEvent",
    "JobProjection",
    "Jobs",
    "Milestone",
    "PendingRequest",
    "Swept",
]

CATEGORY = "job"

QUEUED = "queued"
RUNNING = "running"
SUSPENDED = "suspended"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
STATUSES = (QUEUED, RUNNING, SUSPENDED, COMPLETED, FAILED, CANCELLED)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})
TERMINAL_EVENTS = frozenset({"JobCompleted", "JobFailed", "JobCancelled"})
DEFAULT_LEASE = timedelta(seconds=30)  # how long a claim is a worker's without a heartbeat
DEFAULT_MAX_ATTEMPTS = 3  # claims a job gets before a lost worker fails it
SWEPT_STATUSES = (RUNNING, SUSPENDED)  # what sweep looks at: leases and deadlines

WORKER_LOST = "worker lost"
"""The error of a job failed because its lease ran out with no attempts left."""
DEADLINE_PASSED = "deadline passed"
"""The error of a suspended job failed because nobody resumed it before its deadline."""

_PAGE = 200
_DEFAULT_TENANT = "default"

_log = get_logger("eventstore.jobs")


# -- state -----------------------------------------------------------------------------------------


class Milestone(msgspec.Struct, frozen=True, kw_only=True):
    """Durable progress a worker reported; ``seq`` is the event's stream version."""

    seq: int
    worker_id: str
    milestone: Any
    at: datetime


class PendingRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The human input a suspended job waits for."""

    request_id: str
    prompt: Any
    deadline: datetime | None
    requested_at: datetime
    worker_id: str


class Job(msgspec.Struct, kw_only=True):
    """One job's state, folded from its stream (also the projection's row state).

    ``attempt`` counts claims; ``lost`` counts leases that ran out and were requeued.
    ``resume_input`` (with ``resumed_request_id``) is the input of the last resume, kept for the
    worker that claims the job next.
    """

    job_id: str
    tenant_id: str
    status: str = ""
    workflow_id: str = ""
    inputs: Any = None
    user_id: str = ""
    dedupe_key: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    attempt: int = 0
    lost: int = 0
    worker_id: str | None = None
    lease_until: datetime | None = None
    milestones: list[Milestone] = msgspec.field(default_factory=list)
    pending: PendingRequest | None = None
    resumed_request_id: str | None = None
    resume_input: Any = None
    answered: list[str] = msgspec.field(default_factory=list)
    result: Any = None
    error: str | None = None
    cancel_reason: str | None = None
    submitted_at: datetime | None = None
    queued_at: datetime | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    version: int = 0

    @property
    def finished(self) -> bool:
        """Completed, failed or cancelled: no transition leaves these."""
        return self.status in TERMINAL


@dataclass(frozen=True)
class JobEvent:
    """One event of a job's stream: ``seq`` is its stream version (1, 2, …); ``at`` its time by
    the Jobs clock (as the job's own times), or the store's for an event that has none."""

    seq: int
    type: str
    data: Event | RawEvent
    at: datetime


def _event_time(ev: RecordedEvent) -> datetime:
    """When a job event happened by the Jobs clock (its own time), as the job's times are;
    its ``recorded_at`` for an event without one."""
    d = ev.data
    at = d.submitted_at if isinstance(d, JobSubmitted) else getattr(d, "at", None)
    return _utc(at if isinstance(at, datetime) else ev.recorded_at)


@dataclass(frozen=True)
class Swept:
    """What one sweep did to one job: ``action`` is ``requeued`` or ``failed``."""

    job_id: str
    tenant_id: str
    action: str
    reason: str
    attempt: int


def _utc(when: datetime) -> datetime:
    return when.astimezone(UTC)


def dedupe_group(dedupe_key: str) -> str:
    """The hash prefix that names the jobs of one dedupe key (and is their ``group_key``)."""
    return hashlib.sha256(dedupe_key.encode()).hexdigest()[:24]


class JobProjection(Projection[Job]):
    """Folds a job's events into its :class:`Job` state (see the module docstring's index)."""

    name = "jobs"
    version = 1
    categories = (CATEGORY,)
    state_type = Job

    def __init__(self, *, snapshot_every: int | None = 100) -> None:
        self.snapshot_every = snapshot_every

    def initial(self, tenant_id: str, stream_id: str) -> Job:
        """A job before its first event (status ``""``; never returned by the facade)."""
        return Job(job_id=stream_id[len(CATEGORY) + 1:], tenant_id=tenant_id)

    def evolve(self, state: Job, event: RecordedEvent) -> Job:
        """The job after one event (times from the event, else its ``recorded_at``)."""
        d = event.data
        v = event.version
        at = _utc(event.recorded_at)
        new = msgspec.structs.replace
        if isinstance(d, JobSubmitted):
            t = _utc(d.submitted_at)
            return new(state, status=QUEUED, workflow_id=d.workflow_id, inputs=d.inputs,
                       user_id=d.user_id, dedupe_key=d.dedupe_key, max_attempts=d.max_attempts,
                       submitted_at=t, queued_at=t, updated_at=t, version=v)
        if isinstance(d, (JobClaimed, JobHeartbeat, JobSuspended)) and d.at is not None:
            at = _utc(d.at)
        if isinstance(d, JobClaimed):
            return new(state, status=RUNNING, worker_id=d.worker_id, attempt=d.attempt,
                       lease_until=_utc(d.lease_until), started_at=at, updated_at=at, version=v)
        if isinstance(d, JobHeartbeat):
            return new(state, lease_until=_utc(d.lease_until), updated_at=at, version=v)
        if isinstance(d, MilestoneRecorded):
            m = Milestone(seq=v, worker_id=d.worker_id, milestone=d.milestone, at=_utc(d.at))
            return new(state, milestones=[*state.milestones, m], updated_at=_utc(d.at),
                       version=v)
        if isinstance(d, JobSuspended):
            p = PendingRequest(request_id=d.request_id, prompt=d.prompt,
                               deadline=_utc(d.deadline) if d.deadline is not None else None,
                               requested_at=at, worker_id=d.worker_id)
            return new(state, status=SUSPENDED, pending=p, worker_id=None, lease_until=None,
                       updated_at=at, version=v)
        if isinstance(d, JobResumed):
            t = _utc(d.at)
            return new(state, status=QUEUED, pending=None, resumed_request_id=d.request_id,
                       resume_input=d.input, answered=[*state.answered, d.request_id],
                       queued_at=t, updated_at=t, version=v)
        if isinstance(d, JobRequeued):
            t = _utc(d.at)
            return new(state, status=QUEUED, worker_id=None, lease_until=None,
                       lost=state.lost + 1, queued_at=t, updated_at=t, version=v)
        if isinstance(d, JobCompleted):
            t = _utc(d.at)
            return new(state, status=COMPLETED, worker_id=d.worker_id, lease_until=None,
                       result=d.result, finished_at=t, updated_at=t, version=v)
        if isinstance(d, JobFailed):
            t = _utc(d.at)
            return new(state, status=FAILED, lease_until=None, pending=None, error=d.error,
                       worker_id=d.worker_id if d.worker_id is not None else state.worker_id,
                       finished_at=t, updated_at=t, version=v)
        if isinstance(d, JobCancelled):
            t = _utc(d.at)
            return new(state, status=CANCELLED, lease_until=None, pending=None,
                       cancel_reason=d.reason, finished_at=t, updated_at=t, version=v)
        return new(state, version=v)

    def index(self, state: Job) -> RowIndex:
        """Status, dedupe group and the time the job next needs someone (module docstring)."""
        when: datetime | None
        if state.status == QUEUED:
            when = state.queued_at
        elif state.status == RUNNING:
            when = state.lease_until
        elif state.status == SUSPENDED:
            when = state.pending.deadline if state.pending is not None else None
        else:
            when = state.finished_at
        return RowIndex(
            status=state.status or None,
            group_key=dedupe_group(state.dedupe_key) if state.dedupe_key is not None else None,
            sort_key=to_micros(when) if when is not None else None,
        )


register("jobs", JobProjection)


# -- checks ---------------------------------------------------------------------------------------


def check_events_args(job_id: object, tenant_id: object, after: object, follow: object,
                      timeout: object, poll_interval: object) -> None:
    """The arguments of ``events`` (sync and async)."""
    check_text(job_id, "job_id")
    check_tenant(tenant_id)
    if not isinstance(after, int) or isinstance(after, bool) or after < 0:
        raise InvalidArgument(f"after must be an int >= 0, got {after!r}")
    if not isinstance(follow, bool):
        raise InvalidArgument("follow must be a bool")
    if timeout is not None and not (_real(timeout) and 0 <= timeout <= _MAX_TIMEOUT):
        raise InvalidArgument(f"timeout must be None or a number of seconds from 0 to "
                              f"{_MAX_TIMEOUT:,.0f}, got {timeout!r:.80}")
    if not (_real(poll_interval) and 0 < poll_interval < 86_400):
        raise InvalidArgument(f"poll_interval must be a positive number of seconds (under a "
                              f"day), got {poll_interval!r:.80}")


_MAX_TIMEOUT = MAX_DURATION.total_seconds()


def _real(value: object) -> TypeGuard[float]:
    """An int or float that is a number (not a bool, NaN or an infinity)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _finished_reason(job: Job) -> str:
    """A finished job's status, as a refused command's reason (``deadline_passed`` for a job
    its request's deadline failed, as :meth:`Jobs.resume` says)."""
    if job.status == FAILED and job.error == DEADLINE_PASSED:
        return "deadline_passed"
    return job.status


def _check_owner_ids(job_id: object, worker_id: object, tenant_id: object) -> None:
    """The ids every call of the worker that owns a job passes."""
    check_text(job_id, "job_id")
    check_text(worker_id, "worker_id")
    check_tenant(tenant_id)


def _check_json(value: object, what: str) -> None:
    try:
        msgspec.json.encode(value)
    except (msgspec.EncodeError, TypeError, OverflowError, ValueError) as e:
        raise InvalidArgument(f"{what} must be JSON-encodable: {e}") from e


def _check_error(error: object) -> str:
    if not isinstance(error, str) or not error:
        raise InvalidArgument(f"error must be a non-empty string, got {error!r:.80}")
    return error


def _lease_lost(state: Job, worker_id: str, action: str,
                attempt: int | None = None) -> LeaseLost | None:
    """Why ``worker_id`` may not act on the job as its owner (``None``: it may); with an
    ``attempt``, only in that attempt (the one its claim returned)."""
    if state.status != RUNNING:
        why = f"job is {state.status}"
        if state.status == QUEUED and state.lost:
            why += " (requeued after its lease expired)"
        return LeaseLost(f"job {state.job_id} (tenant {state.tenant_id}): worker {worker_id} "
                         f"cannot {action}: {why}", reason=state.status)
    if state.worker_id != worker_id:
        return LeaseLost(f"job {state.job_id} (tenant {state.tenant_id}): worker {worker_id} "
                         f"cannot {action}: worker {state.worker_id} owns it now "
                         f"(attempt {state.attempt})", reason="other_worker")
    if attempt is not None and attempt != state.attempt:
        return LeaseLost(f"job {state.job_id} (tenant {state.tenant_id}): worker {worker_id} "
                         f"cannot {action} in attempt {attempt}: the job is in attempt "
                         f"{state.attempt} (its lease expired and it was claimed again)",
                         reason="other_attempt")
    return None


# -- the facade -----------------------------------------------------------------------------------


class Jobs:
    """Durable background jobs on the event log (see the module docstring).

    A worker loop: ``claim`` → (``heartbeat`` / ``record`` …) → ``complete`` / ``fail`` /
    ``suspend``; a :class:`LeaseLost` from any owner call means stop working on that job.  Some
    process calls ``sweep`` now and then, which requeues jobs of dead workers and fails jobs past
    their deadline.  Every owner call raises :class:`LeaseLost` (``reason``: the job's status, or
    ``other_worker``) once the job is not running for that worker; an unknown job raises
    :class:`NotFound`; bad input raises :class:`InvalidArgument` and writes nothing.  Owner
    calls take ``attempt=`` (the claimed job's ``attempt``): a worker that runs jobs on several
    threads under one id passes it, so that a thread still busy with an attempt whose lease
    expired, after the same worker claimed the job again, gets :class:`LeaseLost`
    (``reason="other_attempt"``) instead of acting on the new attempt.
    """

    def __init__(self, store: EventStore, *, lease: timedelta = DEFAULT_LEASE,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, clock: Clock | None = None) -> None:
        check_duration(lease, "lease")
        if (not isinstance(max_attempts, int) or isinstance(max_attempts, bool)
                or max_attempts < 1):
            raise InvalidArgument(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        if clock is not None and not callable(clock):
            raise InvalidArgument("clock must be a callable returning an aware datetime")
        check_sync_store(store, "Jobs", "projections.aio.AsyncJobs")
        self.store = store
        self.lease = lease
        self.max_attempts = max_attempts
        self._clock = utc_clock(clock)
        # No snapshots: the facade reads rows (topped up from the log), never a live fold, so
        # inline snapshots every N events would only grow a table.
        self.projection = JobProjection(snapshot_every=None)
        inline(store, self.projection)

    @staticmethod
    def stream_id(job_id: str) -> str:
        """The stream of a job."""
        return f"{CATEGORY}-{job_id}"

    def _now(self) -> datetime:
        return check_time(self._clock(), "the clock's time")

    # -- plumbing --

    def _fold_appended(self, stream: str, tenant_id: str, state: Job, version: int,
                       result: AppendResult | None) -> Job:
        """The state right after our append: ``state`` plus the events it wrote."""
        if result is None:
            return msgspec.structs.replace(state, version=version)
        return fold_appended(self.store, self.projection, stream, tenant_id=tenant_id,
                             state=state, version=version, result=result)

    def _event_type_at(self, job_id: str, tenant_id: str, version: int) -> str | None:
        """The type of the job's event at ``version`` (its last, for a decision at it)."""
        for ev in self.store.read_stream(self.stream_id(job_id), tenant_id=tenant_id,
                                         from_version=version, to_version=version):
            return ev.type
        return None

    def _last_request(self, job_id: str, tenant_id: str, version: int) -> str | None:
        """The request the job asked last, up to ``version`` (None: it never suspended).  A
        read back through the stream: only refusals need it."""
        for ev in self.store.read_stream(self.stream_id(job_id), tenant_id=tenant_id,
                                         to_version=version, backwards=True):
            if isinstance(ev.data, JobSuspended):
                return ev.data.request_id
        return None

    def _command(self, job_id: str, tenant_id: str,
                 decision: Callable[[Job], Sequence[Event]]) -> Job:
        """Decide on the job's current state and append at its version (retrying on conflict)."""
        stream = self.stream_id(job_id)

        def on_state(state: Job, version: int) -> Sequence[Event]:
            if version == 0:
                raise NotFound(f"job {job_id} not found (tenant {tenant_id})")
            return decision(state)

        state, version, result = decide(self.store, self.projection, stream,
                                        tenant_id=tenant_id, decision=on_state)
        return self._fold_appended(stream, tenant_id, state, version, result)

    def _owner_command(self, job_id: str, worker_id: str, tenant_id: str,
                       attempt: int | None, action: str,
                       events: Callable[[Job], Sequence[Event]]) -> Job:
        if attempt is not None:
            check_int(attempt, "attempt", minimum=1)

        def decision(state: Job) -> Sequence[Event]:
            lost = _lease_lost(state, worker_id, action, attempt)
            if lost is not None:
                raise lost
            return events(state)

        return self._command(job_id, tenant_id, decision)

    # -- submitting and claiming --

    def submit(self, workflow_id: str, inputs: Any, *, user_id: str,
               dedupe_key: str | None = None, tenant_id: str = _DEFAULT_TENANT) -> Job:
        """Queue a job to run ``workflow_id`` with ``inputs``; returns it.

        With a ``dedupe_key``, while a job of that key is not finished, submitting again (also at
        the same moment from several threads or hosts) returns that job instead of a new one.
        The job id is then ``<sha256(key)[:24]>-<n>``, ``n`` counting the key's jobs from 1: the
        first append to a job's stream expects version 0, so of two racing submits one creates
        the job and the other gets a version conflict, re-reads and returns the winner's job.
        """
        check_text(workflow_id, "workflow_id")
        check_text(user_id, "user_id")
        check_tenant(tenant_id)
        if dedupe_key is not None:
            check_text(dedupe_key, "dedupe_key")
        _check_json(inputs, "inputs")
        now = self._now()

        def submitted(job_id: str) -> JobSubmitted:
            return JobSubmitted(job_id=job_id, workflow_id=workflow_id, inputs=inputs,
                                user_id=user_id, submitted_at=now, dedupe_key=dedupe_key,
                                max_attempts=self.max_attempts)

        if dedupe_key is None:
            return self._create(uuid.uuid4().hex, tenant_id, submitted)
        group = dedupe_group(dedupe_key)
        n = self._latest_of_group(group, tenant_id)
        while True:
            job_id = f"{group}-{n}"
            state, version = current(self.store, self.projection, self.stream_id(job_id),
                                     tenant_id=tenant_id)
            if version > 0:
                if not state.finished:
                    return msgspec.structs.replace(state, version=version)
                n += 1  # that one is finished: the key's next job
                continue
            try:
                return self._create(job_id, tenant_id, submitted)
            except WrongExpectedVersion:
                continue  # a racing submit created it first: read it again

    def _create(self, job_id: str, tenant_id: str,
                submitted: Callable[[str], JobSubmitted]) -> Job:
        stream = self.stream_id(job_id)
        result = self.store.append(stream, [submitted(job_id)], expected_version=0,
                                   tenant_id=tenant_id)
        return self._fold_appended(stream, tenant_id,
                                   self.projection.initial(tenant_id, stream), 0, result)

    def _latest_of_group(self, group: str, tenant_id: str) -> int:
        """The highest ``n`` of the dedupe group's jobs in the rows (1 when there are none)."""
        best = 1
        for _t, stream_id, _state, _v in query_rows(self.store, self.projection,
                                                     tenant_id=tenant_id, group_key=group):
            suffix = stream_id.rsplit("-", 1)[-1]
            if suffix.isdigit():
                best = max(best, int(suffix))
        return best

    def claim(self, worker_id: str, *, tenant_id: str = _DEFAULT_TENANT) -> Job | None:
        """Lease the oldest queued job (the longest in the queue) to ``worker_id``; ``None`` when
        the queue is empty.

        The claim is a compare-and-set on the job's version: a worker that loses the race for a
        job re-reads it, sees it running and tries the next oldest.
        """
        check_text(worker_id, "worker_id")
        check_tenant(tenant_id)
        now = self._now()
        until = time_after(now, self.lease, "the lease's end")
        tried: set[str] = set()

        def decision(state: Job, version: int) -> Sequence[Event]:
            if state.status != QUEUED:
                return []
            return [JobClaimed(worker_id=worker_id, attempt=state.attempt + 1,
                               lease_until=until, at=now)]

        while True:
            rows = query_rows(self.store, self.projection, tenant_id=tenant_id, status=QUEUED,
                              limit=_PAGE + len(tried))
            fresh = [stream for _t, stream, _s, _v in rows if stream not in tried]
            if not fresh:
                return None
            for stream in fresh:
                tried.add(stream)
                state, version, result = decide(self.store, self.projection, stream,
                                                tenant_id=tenant_id, decision=decision)
                if result is not None:
                    return self._fold_appended(stream, tenant_id, state, version, result)

    # -- the owner's calls --

    def heartbeat(self, job_id: str, worker_id: str, *, tenant_id: str = _DEFAULT_TENANT,
                  attempt: int | None = None) -> Job:
        """Extend the lease of a job ``worker_id`` runs to now + ``lease``; returns the job.

        A lease that expired is renewed too while nobody took the job over (no sweep requeued
        it); otherwise :class:`LeaseLost`.
        """
        _check_owner_ids(job_id, worker_id, tenant_id)
        now = self._now()
        until = time_after(now, self.lease, "the lease's end")
        # Never shorter than the lease it extends: a worker whose clock stepped back must not
        # hand a sweeper with a right clock a live job.
        return self._owner_command(
            job_id, worker_id, tenant_id, attempt, "heartbeat",
            lambda s: [JobHeartbeat(worker_id=worker_id, at=now, lease_until=(
                max(until, s.lease_until) if s.lease_until is not None else until))])

    def record(self, job_id: str, worker_id: str, milestone: Any, *,
               tenant_id: str = _DEFAULT_TENANT, attempt: int | None = None) -> Job:
        """Append a durable milestone (any JSON value) of the job ``worker_id`` runs."""
        _check_owner_ids(job_id, worker_id, tenant_id)
        _check_json(milestone, "milestone")
        now = self._now()
        return self._owner_command(
            job_id, worker_id, tenant_id, attempt, "record a milestone",
            lambda s: [MilestoneRecorded(worker_id=worker_id, milestone=milestone, at=now)])

    def complete(self, job_id: str, worker_id: str, result: Any = None, *,
                 tenant_id: str = _DEFAULT_TENANT, attempt: int | None = None) -> Job:
        """Finish the job ``worker_id`` runs with ``result`` (terminal)."""
        _check_owner_ids(job_id, worker_id, tenant_id)
        _check_json(result, "result")
        now = self._now()
        return self._owner_command(
            job_id, worker_id, tenant_id, attempt, "complete",
            lambda s: [JobCompleted(worker_id=worker_id, at=now, result=result)])

    def fail(self, job_id: str, worker_id: str, error: str, *,
             tenant_id: str = _DEFAULT_TENANT, attempt: int | None = None) -> Job:
        """Fail the job ``worker_id`` runs with ``error`` (terminal, no retry)."""
        _check_owner_ids(job_id, worker_id, tenant_id)
        _check_error(error)
        now = self._now()
        return self._owner_command(
            job_id, worker_id, tenant_id, attempt, "fail",
            lambda s: [JobFailed(error=error, at=now, worker_id=worker_id)])

    def suspend(self, job_id: str, worker_id: str, *, request_id: str, prompt: Any,
                deadline: datetime | None = None, tenant_id: str = _DEFAULT_TENANT,
                attempt: int | None = None) -> Job:
        """Suspend the job ``worker_id`` runs until ``resume`` answers ``request_id``.

        The lease is given up.  With a ``deadline`` (in the future), a sweep after it fails the
        job with ``deadline passed``.  A request id may be used once per job.
        """
        _check_owner_ids(job_id, worker_id, tenant_id)
        check_text(request_id, "request_id")
        _check_json(prompt, "prompt")
        now = self._now()
        if deadline is not None:
            deadline = check_time(deadline, "deadline")
            if deadline <= now:
                raise InvalidArgument(f"deadline {deadline.isoformat()} is not after now "
                                      f"({now.isoformat()})")
            if deadline - now > MAX_DURATION:
                raise InvalidArgument(f"deadline {deadline.isoformat()} is more than "
                                      f"{MAX_DURATION.days:,} days from now")

        def events(state: Job) -> Sequence[Event]:
            if request_id in state.answered:
                raise Conflict(f"job {job_id} (tenant {tenant_id}): request id {request_id} "
                               "was already used and answered", reason="duplicate_request_id")
            return [JobSuspended(worker_id=worker_id, request_id=request_id, prompt=prompt,
                                 deadline=deadline, at=now)]

        return self._owner_command(job_id, worker_id, tenant_id, attempt, "suspend", events)

    # -- anyone's calls --

    def resume(self, job_id: str, *, request_id: str, input: Any,
               tenant_id: str = _DEFAULT_TENANT) -> Job:
        """Answer the suspended job's pending ``request_id`` with ``input``; it is queued again.

        Exactly one of concurrent resumes (and a cancel, and the deadline) wins; the others get a
        :class:`Conflict` whose ``reason`` says why: ``already_resumed`` (the job's last
        request, answered), ``stale_request`` (an earlier request than the job's last, answered
        or not), ``cancelled``, ``deadline_passed``, ``not_suspended``, or the finished job's
        status.
        """
        check_text(job_id, "job_id")
        check_text(request_id, "request_id")
        check_tenant(tenant_id)
        _check_json(input, "input")

        def decision(s: Job) -> Sequence[Event]:
            # The time of this decision (not of the call): one made again after a conflict,
            # or under the append lock after a wait, sees whether the deadline passed since.
            now = self._now()

            def refuse(why: str, reason: str) -> Conflict:
                return Conflict(f"job {job_id} (tenant {tenant_id}): cannot resume request "
                                f"{request_id}: {why}", reason=reason)

            pending = s.pending
            if s.status == SUSPENDED and pending is not None:
                if pending.request_id != request_id:
                    raise refuse(f"stale request id {request_id}, pending {pending.request_id}",
                                 "stale_request")
                if pending.deadline is not None and now > pending.deadline:
                    raise refuse(f"deadline passed ({pending.deadline.isoformat()})",
                                 "deadline_passed")
                return [JobResumed(request_id=request_id, input=input, at=now)]
            # An earlier request than the job's last is stale, answered or not (as it is while
            # a later one is pending); the last one, answered, is already resumed.
            last = self._last_request(job_id, tenant_id, s.version)
            if last is not None and request_id != last:
                raise refuse(f"stale request id {request_id}, the job's last request was "
                             f"{last}", "stale_request")
            if request_id in s.answered:
                raise refuse("already resumed", "already_resumed")
            if s.status == CANCELLED:
                raise refuse("cancelled", "cancelled")
            if s.status == FAILED and s.error == DEADLINE_PASSED:
                raise refuse("deadline passed", "deadline_passed")
            raise refuse(f"job is {s.status}, no request is pending",
                         s.status if s.finished else "not_suspended")

        return self._command(job_id, tenant_id, decision)

    def cancel(self, job_id: str, reason: str | None = None, *,
               tenant_id: str = _DEFAULT_TENANT, force: bool = False) -> Job:
        """Cancel a job that is not finished (a running worker learns it by :class:`LeaseLost`).

        A finished job raises :class:`Conflict` with its status as ``reason``
        (``deadline_passed`` for one its request's deadline failed).  A suspended job's request
        is decided once, by a resume, a cancel or its deadline:

        - past the deadline the request is the deadline's: the cancel records the failure the
          next :meth:`sweep` would (so the job is not left suspended without a sweeper), then
          raises :class:`Conflict` with ``reason="deadline_passed"``;
        - a job a resume queued again, and no worker has claimed since, is the resume's: the
          cancel raises :class:`Conflict` with ``reason="already_resumed"``, unless ``force``
          (cancel it anyway, the input notwithstanding; or cancel it once it runs).
        """
        job, missed = self._cancel(job_id, reason, tenant_id, force)
        if missed is not None:
            raise missed
        return job

    def _cancel(self, job_id: str, reason: str | None, tenant_id: str, force: bool = False
                ) -> tuple[Job, Conflict | None]:
        """:meth:`cancel`, returning the deadline's Conflict instead of raising it, so that
        the caller raises it after the failure is committed (the async twin runs this inside a
        transaction, which raising would roll back)."""
        check_text(job_id, "job_id")
        check_tenant(tenant_id)
        if reason is not None and not isinstance(reason, str):
            raise InvalidArgument(f"reason must be a string or None, got {reason!r:.80}")
        if not isinstance(force, bool):
            raise InvalidArgument(f"force must be a bool, got {force!r:.80}")
        missed: list[str] = []  # the request whose deadline decided, when one did

        def decision(s: Job) -> Sequence[Event]:
            missed.clear()
            now = self._now()  # (the decision's time, as resume's)
            if s.finished:
                raise Conflict(f"job {job_id} (tenant {tenant_id}) is already {s.status}",
                               reason=_finished_reason(s))
            pending = s.pending
            if (s.status == SUSPENDED and pending is not None and pending.deadline is not None
                    and now > pending.deadline):
                missed.append(f"the deadline of request {pending.request_id} passed "
                              f"({pending.deadline.isoformat()})")
                return [JobFailed(error=DEADLINE_PASSED, at=now)]
            if (not force and s.status == QUEUED and s.resumed_request_id is not None
                    and self._event_type_at(job_id, tenant_id, s.version) == "JobResumed"):
                raise Conflict(f"job {job_id} (tenant {tenant_id}): its request "
                               f"{s.resumed_request_id} was resumed, and the job is queued to "
                               f"run with that input (cancel(..., force=True) cancels it "
                               f"anyway)", reason="already_resumed")
            return [JobCancelled(at=now, reason=reason)]

        job = self._command(job_id, tenant_id, decision)
        if not missed:
            return job, None
        _log.info("job_deadline_passed", job=job_id, tenant=tenant_id, by="cancel")
        return job, Conflict(f"job {job_id} (tenant {tenant_id}): {missed[0]}; it failed, "
                             f"not cancelled", reason="deadline_passed")

    def sweep(self, now: datetime | None = None, *,
              tenant_id: str | None = None) -> builtins.list[Swept]:
        """Requeue or fail running jobs whose lease expired; fail suspended jobs past deadline.

        A job whose lease ran out is requeued while the leases it lost (this one included) are
        fewer than its ``max_attempts``, else failed with ``worker lost``.  Each job is swept
        exactly once however many sweepers race (a compare-and-set on its version; a sweeper
        that loses re-reads and finds nothing left to do), and a lease renewed in time is never
        swept.  ``tenant_id=None`` sweeps every tenant (an operator's job).
        """
        when = sweep_time(now, tenant_id, self._now)
        out: builtins.list[Swept] = []
        for status in SWEPT_STATUSES:
            seen: set[tuple[str, str]] = set()
            while fresh := self._sweep_candidates(status, when, tenant_id, seen):
                for key in fresh:
                    seen.add(key)
                    swept = self._sweep_one(key[0], key[1], when)
                    if swept is not None:
                        out.append(swept)
        return out

    # sweep's steps (each job its own transaction; AsyncJobs runs them one by one too)

    def _sweep_candidates(self, status: str, when: datetime, tenant_id: str | None,
                          seen: set[tuple[str, str]]) -> builtins.list[tuple[str, str]]:
        """The next (tenant, stream) of jobs in ``status`` due at ``when``, not yet seen."""
        rows = query_rows(self.store, self.projection, tenant_id=tenant_id, status=status,
                          sort_before=to_micros(when), limit=_PAGE + len(seen))
        return [(t, s) for t, s, _state, _v in rows if (t, s) not in seen]

    def _sweep_one(self, tenant_id: str, stream: str, when: datetime) -> Swept | None:
        outcome: list[Swept] = []

        def decision(s: Job, version: int) -> Sequence[Event]:
            outcome.clear()
            if s.status == RUNNING and s.lease_until is not None and when > s.lease_until:
                if s.lost + 1 < s.max_attempts:
                    why = f"lease of worker {s.worker_id} expired (attempt {s.attempt})"
                    outcome.append(Swept(s.job_id, tenant_id, "requeued", why, s.attempt))
                    return [JobRequeued(reason=why, at=when)]
                outcome.append(Swept(s.job_id, tenant_id, FAILED, WORKER_LOST, s.attempt))
                return [JobFailed(error=WORKER_LOST, at=when, worker_id=s.worker_id)]
            deadline = s.pending.deadline if s.pending is not None else None
            if s.status == SUSPENDED and deadline is not None and when > deadline:
                outcome.append(Swept(s.job_id, tenant_id, FAILED, DEADLINE_PASSED, s.attempt))
                return [JobFailed(error=DEADLINE_PASSED, at=when)]
            return []

        _state, _version, result = decide(self.store, self.projection, stream,
                                          tenant_id=tenant_id, decision=decision)
        if result is None or not outcome:
            return None
        swept = outcome[0]
        _log.info("job_swept", job=swept.job_id, tenant=tenant_id, action=swept.action,
                  reason=swept.reason, attempt=swept.attempt)
        return swept

    # -- queries --

    def get(self, job_id: str, *, tenant_id: str = _DEFAULT_TENANT) -> Job:
        """The job now (its row topped up from the log); :class:`NotFound` when unknown."""
        check_text(job_id, "job_id")
        check_tenant(tenant_id)
        state, version = current(self.store, self.projection, self.stream_id(job_id),
                                 tenant_id=tenant_id)
        if version == 0:
            raise NotFound(f"job {job_id} not found (tenant {tenant_id})")
        return msgspec.structs.replace(state, version=version)

    def events(self, job_id: str, *, after: int = 0, follow: bool = False,
               tenant_id: str = _DEFAULT_TENANT, timeout: float | None = None,
               poll_interval: float = 0.05) -> Iterator[JobEvent]:
        """The job's events after seq ``after``, in order, with no gaps or repeats.

        Re-attach by passing the last ``seq`` seen.  With ``follow=True`` it waits for new events
        (polling the stream every ``poll_interval`` seconds) and ends after the terminal event
        (completed, failed or cancelled) — at once if the job already finished — or, without
        raising, once ``timeout`` seconds have passed.  Arguments are checked when called.
        """
        check_events_args(job_id, tenant_id, after, follow, timeout, poll_interval)
        stream = self.stream_id(job_id)
        if self.store.stream_version(stream, tenant_id=tenant_id) == 0:
            raise NotFound(f"job {job_id} not found (tenant {tenant_id})")
        return self._events(stream, tenant_id, after, follow, timeout, float(poll_interval))

    def _events(self, stream: str, tenant_id: str, after: int, follow: bool,
                timeout: float | None, poll_interval: float) -> Iterator[JobEvent]:
        ends = time.monotonic() + timeout if timeout is not None else None
        seq = after
        while True:
            # Until an event comes, ``seq`` is the caller's ``after``, which may lie past the
            # job's end (a client ahead of the stream): each poll reads the job's last event
            # first, which says whether there is more to read, or a terminal event at or
            # before ``after`` (there before the call or written since) that ends the follow.
            # Once an event came, ``seq`` is a real version: the terminal event is read below.
            last = self._last_event(stream, tenant_id) if follow and seq == after else None
            if last is None or last.version > seq:
                for ev in self.store.read_stream(stream, tenant_id=tenant_id,
                                                 from_version=seq + 1):
                    yield JobEvent(seq=ev.version, type=ev.type, data=ev.data,
                                   at=_event_time(ev))
                    seq = ev.version
                    if follow and ev.type in TERMINAL_EVENTS:
                        return
            elif last.type in TERMINAL_EVENTS:
                return
            if not follow:
                return
            if ends is not None:
                left = ends - time.monotonic()
                if left <= 0:
                    return
                time.sleep(min(poll_interval, left))
            else:
                time.sleep(poll_interval)

    def _last_event(self, stream: str, tenant_id: str) -> RecordedEvent | None:
        for ev in self.store.read_stream(stream, tenant_id=tenant_id, backwards=True, limit=1):
            return ev
        return None

    def _ended_before(self, stream: str, tenant_id: str, after: int) -> bool:
        """Whether the job's terminal event is at or before seq ``after`` (a follower
        re-attached after the end: nothing will follow)."""
        if after <= 0:
            return False
        last = self._last_event(stream, tenant_id)
        return last is not None and last.version <= after and last.type in TERMINAL_EVENTS

    def list(self, status: str | Iterable[str] | None = None, *,
             tenant_id: str = _DEFAULT_TENANT, limit: int | None = None) -> builtins.list[Job]:
        """The tenant's jobs (of one status, or of any in an iterable of them), oldest
        submitted first."""
        check_tenant(tenant_id)
        wanted: builtins.list[str] | None
        if status is None:
            wanted = None
        else:
            if not isinstance(status, (str, Iterable)) or isinstance(status, (bytes, bytearray)):
                raise InvalidArgument(f"status must be a job status or an iterable of them, "
                                      f"got {status!r:.80}")
            wanted = [status] if isinstance(status, str) else builtins.list(status)
            for s in wanted:
                if not isinstance(s, str) or s not in STATUSES:
                    raise InvalidArgument(f"unknown job status {s!r}; one of {STATUSES}")
        check_limit(limit)
        rows = query_rows(self.store, self.projection, tenant_id=tenant_id,
                          status=wanted if wanted is not None else builtins.list(STATUSES))
        jobs = [msgspec.structs.replace(state, version=v) for _t, _s, state, v in rows]
        jobs.sort(key=lambda j: (j.submitted_at or datetime.min.replace(tzinfo=UTC), j.job_id))
        return jobs[:limit] if limit is not None else jobs
