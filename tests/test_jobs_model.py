"""A model-based test of ``projections.Jobs``: the facade against a plain-Python model.

The model is written from what the README ("Durable background jobs") and the docstrings of
``projections.jobs`` and ``projections.errors`` promise: the states a job goes through, which
call moves it where, which typed error (and which ``reason``) a refused call raises, and what
``get``, ``list``, ``events`` and ``sweep`` report.  Hypothesis draws random sequences of calls
(time moves by an injected clock, never by sleeping); after each call the return value or the
exact error type must match the model, and so must every job's whole observable state.  Each
example works under a tenant of its own on the shared store.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from eventstore import EventStore
from projections.errors import Conflict, LeaseLost, NotFound
from projections.jobs import Job, Jobs, dedupe_group
from tests._clock import Clock
from tests._examples import examples
from tests._model import Refused

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)
MAX_ATTEMPTS = 2
WORKERS = ["w1", "w2", "w3"]
REQUESTS = ["r1", "r2", "r3"]
KEYS = [None, "key-a", "key-b"]
UNKNOWN = "no-such-job"
FINISHED = ("completed", "failed", "cancelled")


@dataclass
class MJob:
    """The model's job: the fields ``Job`` documents, kept the way the documents say."""

    job_id: str
    workflow_id: str
    inputs: Any
    user_id: str
    dedupe_key: str | None
    submitted_at: datetime
    status: str = "queued"
    attempt: int = 0
    lost: int = 0
    worker_id: str | None = None
    lease_until: datetime | None = None
    milestones: list[tuple[int, str, Any, datetime]] = field(default_factory=list)
    pending: tuple[str, Any, datetime | None, datetime, str] | None = None
    resumed_request_id: str | None = None
    resume_input: Any = None
    answered: list[str] = field(default_factory=list)
    result: Any = None
    error: str | None = None
    cancel_reason: str | None = None
    queued_at: datetime | None = None
    finished_at: datetime | None = None
    events: list[str] = field(default_factory=list)
    # Not part of Job, but what the documents make decisions on:
    requests: list[str] = field(default_factory=list)  # every request id suspended on, in order
    queue_order: int = 0  # tie-break of queued_at: the order in which jobs entered the queue
    resumed_unclaimed: bool = False  # queued by a resume and not claimed since
    deadline_failed: bool = False  # failed because its request's deadline passed

    def finished(self) -> bool:
        return self.status in FINISHED

    def observable(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "status": self.status, "workflow_id": self.workflow_id,
            "inputs": self.inputs, "user_id": self.user_id, "dedupe_key": self.dedupe_key,
            "max_attempts": MAX_ATTEMPTS, "attempt": self.attempt, "lost": self.lost,
            "worker_id": self.worker_id, "lease_until": self.lease_until,
            "milestones": self.milestones, "pending": self.pending,
            "resumed_request_id": self.resumed_request_id, "resume_input": self.resume_input,
            "answered": self.answered, "result": self.result, "error": self.error,
            "cancel_reason": self.cancel_reason, "submitted_at": self.submitted_at,
            "queued_at": self.queued_at, "finished_at": self.finished_at,
            "version": len(self.events),
        }


def observed(job: Job) -> dict[str, Any]:
    """The same view of a real ``Job``."""
    pending = job.pending
    return {
        "job_id": job.job_id, "status": job.status, "workflow_id": job.workflow_id,
        "inputs": job.inputs, "user_id": job.user_id, "dedupe_key": job.dedupe_key,
        "max_attempts": job.max_attempts, "attempt": job.attempt, "lost": job.lost,
        "worker_id": job.worker_id, "lease_until": job.lease_until,
        "milestones": [(m.seq, m.worker_id, m.milestone, m.at) for m in job.milestones],
        "pending": None if pending is None else (pending.request_id, pending.prompt,
                                                 pending.deadline, pending.requested_at,
                                                 pending.worker_id),
        "resumed_request_id": job.resumed_request_id, "resume_input": job.resume_input,
        "answered": list(job.answered), "result": job.result, "error": job.error,
        "cancel_reason": job.cancel_reason, "submitted_at": job.submitted_at,
        "queued_at": job.queued_at, "finished_at": job.finished_at, "version": job.version,
    }


class Model:
    """The jobs of one tenant as the documents describe them."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.jobs: list[MJob] = []  # in submission order
        self.key_counts: dict[str, int] = {}
        self.queue_counter = 0
        self.last_claimed: str | None = None  # the job of the last claim that took one

    def by_id(self, job_id: str) -> MJob:
        for job in self.jobs:
            if job.job_id == job_id:
                return job
        raise Refused(NotFound, "not_found")

    def enqueue(self, job: MJob) -> None:
        self.queue_counter += 1
        job.status, job.worker_id, job.lease_until = "queued", None, None
        job.queued_at, job.queue_order = self.clock.now, self.queue_counter

    def finish(self, job: MJob, status: str, event: str) -> None:
        job.status, job.lease_until, job.pending = status, None, None
        job.finished_at = self.clock.now
        job.resumed_unclaimed = False
        job.events.append(event)

    # -- calls --

    def submit(self, workflow_id: str, inputs: Any, user_id: str, dedupe_key: str | None,
               new_id: str | None) -> MJob:
        if dedupe_key is not None:
            for job in self.jobs:
                if job.dedupe_key == dedupe_key and not job.finished():
                    return job
            n = self.key_counts.get(dedupe_key, 0) + 1
            self.key_counts[dedupe_key] = n
            new_id = f"{dedupe_group(dedupe_key)}-{n}"
        assert new_id is not None
        job = MJob(new_id, workflow_id, inputs, user_id, dedupe_key, self.clock.now)
        self.enqueue(job)
        job.events.append("JobSubmitted")
        self.jobs.append(job)
        return job

    def claim(self, worker_id: str) -> MJob | None:
        queued = [j for j in self.jobs if j.status == "queued"]
        if not queued:
            return None
        job = min(queued, key=lambda j: (j.queued_at, j.queue_order))
        job.status, job.worker_id = "running", worker_id
        job.attempt += 1
        job.lease_until = self.clock.now + LEASE
        job.resumed_unclaimed = False
        job.events.append("JobClaimed")
        self.last_claimed = job.job_id
        return job

    def owned(self, job_id: str, worker_id: str, attempt: int | None) -> MJob:
        job = self.by_id(job_id)
        if job.status != "running":
            raise Refused(LeaseLost, job.status)
        if job.worker_id != worker_id:
            raise Refused(LeaseLost, "other_worker")
        if attempt is not None and attempt != job.attempt:
            raise Refused(LeaseLost, "other_attempt")
        return job

    def heartbeat(self, job_id: str, worker_id: str, attempt: int | None) -> MJob:
        job = self.owned(job_id, worker_id, attempt)
        assert job.lease_until is not None
        job.lease_until = max(job.lease_until, self.clock.now + LEASE)
        job.events.append("JobHeartbeat")
        return job

    def record(self, job_id: str, worker_id: str, milestone: Any, attempt: int | None) -> MJob:
        job = self.owned(job_id, worker_id, attempt)
        job.events.append("MilestoneRecorded")
        job.milestones.append((len(job.events), worker_id, milestone, self.clock.now))
        return job

    def complete(self, job_id: str, worker_id: str, result: Any, attempt: int | None) -> MJob:
        job = self.owned(job_id, worker_id, attempt)
        job.result = result
        self.finish(job, "completed", "JobCompleted")
        return job

    def fail(self, job_id: str, worker_id: str, error: str, attempt: int | None) -> MJob:
        job = self.owned(job_id, worker_id, attempt)
        job.error = error
        self.finish(job, "failed", "JobFailed")
        return job

    def suspend(self, job_id: str, worker_id: str, request_id: str, prompt: Any,
                deadline: datetime | None, attempt: int | None) -> MJob:
        job = self.owned(job_id, worker_id, attempt)
        if request_id in job.requests:
            raise Refused(Conflict, "duplicate_request_id")
        job.status, job.worker_id, job.lease_until = "suspended", None, None
        job.pending = (request_id, prompt, deadline, self.clock.now, worker_id)
        job.requests.append(request_id)
        job.events.append("JobSuspended")
        return job

    def past_deadline(self, job: MJob) -> bool:
        return (job.pending is not None and job.pending[2] is not None
                and self.clock.now > job.pending[2])

    def resume(self, job_id: str, request_id: str, input: Any) -> MJob:
        job = self.by_id(job_id)
        last = job.requests[-1] if job.requests else None
        if request_id in job.requests and request_id != last:
            raise Refused(Conflict, "stale_request")
        if request_id == last:
            if request_id in job.answered:
                raise Refused(Conflict, "already_resumed")
            if job.status == "suspended":
                if self.past_deadline(job):
                    raise Refused(Conflict, "deadline_passed")
                job.pending = None
                job.answered.append(request_id)
                job.resumed_request_id, job.resume_input = request_id, input
                self.enqueue(job)
                job.resumed_unclaimed = True
                job.events.append("JobResumed")
                return job
            if job.deadline_failed:
                raise Refused(Conflict, "deadline_passed")
            raise Refused(Conflict, job.status)
        # A request id this job never suspended on: the documents name the reasons for the
        # job's last request and for earlier ones, not for an id it never had, so only a job
        # that never asked anything and can still be asked has a reason to expect.
        if not job.requests and not job.finished():
            raise Refused(Conflict, "not_suspended")
        raise Refused(Conflict, None)

    def cancel(self, job_id: str, reason: str | None, force: bool) -> MJob:
        job = self.by_id(job_id)
        if job.finished():
            raise Refused(Conflict, "deadline_passed" if job.deadline_failed else job.status)
        if job.status == "suspended" and self.past_deadline(job):
            job.error, job.deadline_failed = "deadline passed", True
            self.finish(job, "failed", "JobFailed")
            raise Refused(Conflict, "deadline_passed")
        if job.resumed_unclaimed and not force:
            raise Refused(Conflict, "already_resumed")
        job.cancel_reason = reason
        self.finish(job, "cancelled", "JobCancelled")
        return job

    def sweep(self) -> list[tuple[str, str, int]]:
        now = self.clock.now
        swept = []
        for job in self.jobs:
            if job.status == "running" and job.lease_until is not None and now > job.lease_until:
                if job.lost + 1 < MAX_ATTEMPTS:
                    job.lost += 1
                    self.enqueue(job)
                    job.events.append("JobRequeued")
                    swept.append((job.job_id, "requeued", job.attempt))
                else:
                    job.error = "worker lost"
                    self.finish(job, "failed", "JobFailed")
                    swept.append((job.job_id, "failed", job.attempt))
            elif job.status == "suspended" and self.past_deadline(job):
                job.error, job.deadline_failed = "deadline passed", True
                self.finish(job, "failed", "JobFailed")
                swept.append((job.job_id, "failed", job.attempt))
        return sorted(swept)


# -- operations --

# A job: the oldest running or suspended one (the jobs most calls can act on), one by its index
# among the jobs so far (modulo their number), or -1: an id no job has.
JOB = st.sampled_from(["claimed", "claimed", "running", "suspended", "suspended", 0, 1, 2, -1])
WORKER = st.sampled_from(WORKERS)
# Owner calls name the job's worker half of the time, resumes the pending request a quarter of
# the time, and suspends a request id the job has not used yet often: else few examples would
# get past the first refusal.
OWNER_WORKER = st.sampled_from(["owner", "owner", "owner", *WORKERS])
RESUME_REQUEST = st.sampled_from(["pending", "pending", "pending", *REQUESTS])
SUSPEND_REQUEST = st.sampled_from(["fresh", "fresh", *REQUESTS])
ATTEMPT = st.sampled_from([None, "current", "previous"])
VALUES = st.none() | st.integers(-5, 5) | st.text(max_size=4) | st.fixed_dictionaries(
    {"k": st.integers(0, 3)})

SUBMIT = st.tuples(st.just("submit"), st.sampled_from(["wf-a", "wf-b"]), VALUES,
                   st.sampled_from(["u1", "u2"]), st.sampled_from(KEYS))
CLAIM = st.tuples(st.just("claim"), WORKER)
ADVANCE = st.tuples(st.just("advance"), st.sampled_from([1, 10, 29, 30, 31, 45, 120]))
# Owner calls mostly name a running job (else nearly all of them would just be refused).
OWNER_JOB = st.sampled_from(["running", "running", "running", "running", "claimed", 0, 1, -1])
HEARTBEAT = st.tuples(st.just("heartbeat"), OWNER_JOB, OWNER_WORKER, ATTEMPT)
RECORD = st.tuples(st.just("record"), OWNER_JOB, OWNER_WORKER, ATTEMPT, VALUES)
COMPLETE = st.tuples(st.just("complete"), OWNER_JOB, OWNER_WORKER, ATTEMPT, VALUES)
FAIL = st.tuples(st.just("fail"), OWNER_JOB, OWNER_WORKER, ATTEMPT,
                 st.sampled_from(["boom", "bad"]))
SUSPEND = st.tuples(st.just("suspend"), OWNER_JOB, OWNER_WORKER, ATTEMPT, SUSPEND_REQUEST,
                    VALUES, st.sampled_from([None, 15, 60]))
RESUME = st.tuples(st.just("resume"), st.sampled_from(["suspended", "claimed", 0, 1, -1]),
                   RESUME_REQUEST, VALUES)
SWEEP = st.tuples(st.just("sweep"))
# A claim, then a suspend of the job it took: a job's requests are where most rules are.
CLAIM_SUSPEND = st.tuples(st.just("claim+suspend"), WORKER, VALUES,
                          st.sampled_from([None, 15, 60]))
# A claim whose lease then runs out and is swept: requeues, lost workers and later attempts.
CLAIM_LAPSE = st.tuples(st.just("claim+lapse"), WORKER, st.sampled_from([30, 31, 45]))
# Weighted by repetition: the calls that move jobs on come more often than those that end them.
OPERATIONS = st.one_of(
    SUBMIT, SUBMIT, CLAIM, CLAIM, CLAIM, CLAIM_SUSPEND, CLAIM_SUSPEND, CLAIM_LAPSE,
    ADVANCE, ADVANCE, ADVANCE, HEARTBEAT, HEARTBEAT,
    RECORD, COMPLETE, FAIL, SUSPEND, SUSPEND, SUSPEND, RESUME, RESUME, RESUME, SWEEP, SWEEP,
    st.tuples(st.just("cancel"), JOB, st.sampled_from([None, "stop"]), st.booleans()),
    st.tuples(st.just("get"), JOB),
)


def pick(model: Model, which: int | str) -> str:
    """The id of the job claimed last, of the oldest job of a status (else the first job), of
    the ``which``-th job submitted (modulo their number), or an id no job has."""
    if not model.jobs or which == -1:
        return UNKNOWN
    if which == "claimed" and model.last_claimed is not None:
        return model.last_claimed
    if isinstance(which, str):
        of_status = [j for j in model.jobs if j.status == which]
        return (of_status or model.jobs)[0].job_id
    return model.jobs[which % len(model.jobs)].job_id


def attempt_of(model: Model, job_id: str, which: str | None) -> int | None:
    if which is None or job_id == UNKNOWN:
        return None
    current = model.by_id(job_id).attempt
    if which == "current":
        return current or None  # attempts count from 1: an unclaimed job has none to name
    return current - 1 if current >= 2 else None  # an attempt the job has left, if any


def owner(model: Model, job_id: str) -> str:
    """The worker that holds (or last held) the job: the one most likely to be let in."""
    if job_id == UNKNOWN:
        return WORKERS[0]
    return model.by_id(job_id).worker_id or WORKERS[0]


def pending_request(model: Model, job_id: str) -> str:
    """The request the job waits for, else its last one."""
    if job_id == UNKNOWN:
        return REQUESTS[0]
    job = model.by_id(job_id)
    if job.pending is not None:
        return str(job.pending[0])
    return job.requests[-1] if job.requests else REQUESTS[0]


def fresh_request(model: Model, job_id: str) -> str:
    """A request id the job has not suspended on."""
    used = [] if job_id == UNKNOWN else model.by_id(job_id).requests
    return f"r{len(used) + 1}" if f"r{len(used) + 1}" not in used else f"q{len(used)}"


def run(jobs: Jobs, model: Model, tenant: str, op: tuple[Any, ...]) -> tuple[Any, Any]:
    """Perform ``op`` on the facade and on the model; each outcome is a value or an error."""
    name = op[0]
    clock = model.clock

    def both(real: Any, modelled: Any) -> tuple[Any, Any]:
        try:
            got: Any = real()
        except Conflict as e:
            got = (type(e), e.reason)
        try:
            want: Any = modelled()
        except Refused as e:
            want = (e.kind, e.reason)
        return got, want

    def as_job(fn: Any) -> Any:
        """A call returning a job, compared by the job's observable state."""
        def call() -> Any:
            result = fn()
            if isinstance(result, Job):
                return observed(result)
            if isinstance(result, MJob):
                return result.observable()
            return result
        return call

    if name == "advance":
        clock.advance(seconds=op[1])
        return None, None
    if name == "submit":
        _, wf, inputs, user, key = op
        real = jobs.submit(wf, inputs, user_id=user, dedupe_key=key, tenant_id=tenant)
        known = {j.job_id for j in model.jobs}
        new_id = None if real.job_id in known else real.job_id
        return observed(real), model.submit(wf, inputs, user, key, new_id).observable()
    if name == "claim":
        return both(as_job(lambda: jobs.claim(op[1], tenant_id=tenant)),
                    as_job(lambda: model.claim(op[1])))
    if name == "sweep":
        def real_sweep() -> list[tuple[str, str, int]]:
            swept = jobs.sweep(tenant_id=tenant)
            assert all(s.tenant_id == tenant for s in swept)
            return sorted((s.job_id, s.action, s.attempt) for s in swept)
        return both(real_sweep, model.sweep)
    job_id = pick(model, op[1])
    if name == "get":
        return both(as_job(lambda: jobs.get(job_id, tenant_id=tenant)),
                    as_job(lambda: model.by_id(job_id)))
    if name == "resume":
        _, _, rid, value = op
        if rid == "pending":
            rid = pending_request(model, job_id)
        return both(as_job(lambda: jobs.resume(job_id, request_id=rid, input=value,
                                               tenant_id=tenant)),
                    as_job(lambda: model.resume(job_id, rid, value)))
    if name == "cancel":
        _, _, reason, force = op
        return both(as_job(lambda: jobs.cancel(job_id, reason, tenant_id=tenant, force=force)),
                    as_job(lambda: model.cancel(job_id, reason, force)))
    worker, which = op[2], op[3]
    if worker == "owner":
        worker = owner(model, job_id)
    attempt = attempt_of(model, job_id, which)
    if name == "heartbeat":
        return both(as_job(lambda: jobs.heartbeat(job_id, worker, tenant_id=tenant,
                                                  attempt=attempt)),
                    as_job(lambda: model.heartbeat(job_id, worker, attempt)))
    if name == "record":
        value = op[4]
        return both(as_job(lambda: jobs.record(job_id, worker, value, tenant_id=tenant,
                                               attempt=attempt)),
                    as_job(lambda: model.record(job_id, worker, value, attempt)))
    if name == "complete":
        value = op[4]
        return both(as_job(lambda: jobs.complete(job_id, worker, value, tenant_id=tenant,
                                                 attempt=attempt)),
                    as_job(lambda: model.complete(job_id, worker, value, attempt)))
    if name == "fail":
        error = op[4]
        return both(as_job(lambda: jobs.fail(job_id, worker, error, tenant_id=tenant,
                                             attempt=attempt)),
                    as_job(lambda: model.fail(job_id, worker, error, attempt)))
    assert name == "suspend"
    _, _, _, _, rid, prompt, after = op
    if rid == "fresh":
        rid = fresh_request(model, job_id)
    deadline = None if after is None else clock.now + timedelta(seconds=after)
    return both(as_job(lambda: jobs.suspend(job_id, worker, request_id=rid, prompt=prompt,
                                            deadline=deadline, tenant_id=tenant,
                                            attempt=attempt)),
                as_job(lambda: model.suspend(job_id, worker, rid, prompt, deadline, attempt)))


def same_outcome(got: Any, want: Any) -> bool:
    """Equal, except that a refusal the documents give no reason for matches any reason."""
    if (isinstance(want, tuple) and len(want) == 2 and isinstance(want[0], type)
            and want[1] is None and isinstance(got, tuple) and len(got) == 2):
        return got[0] is want[0]
    return bool(got == want)


def outcome(want: Any) -> str:
    """A label of what a call did, for ``--hypothesis-show-statistics``."""
    if isinstance(want, tuple) and len(want) == 2 and isinstance(want[0], type):
        return f"{want[0].__name__}({want[1]})"
    if isinstance(want, dict):
        return f"-> {want['status']}"
    return "ok" if want else "none"


def check_state(jobs: Jobs, model: Model, tenant: str, full: bool) -> None:
    """The facade's jobs agree with the model (``full``: also their events and every list)."""
    for job in model.jobs:
        assert observed(jobs.get(job.job_id, tenant_id=tenant)) == job.observable(), job.job_id
        if full:
            seen = list(jobs.events(job.job_id, tenant_id=tenant))
            assert [e.type for e in seen] == job.events
            assert [e.seq for e in seen] == list(range(1, len(job.events) + 1))
    assert listed(jobs.list(tenant_id=tenant)) == listed(model.jobs)
    if not full:
        return
    for status in ("queued", "running", "suspended", *FINISHED):
        assert listed(jobs.list(status, tenant_id=tenant)) == listed(
            [j for j in model.jobs if j.status == status]), status


def listed(found: list[Any]) -> list[tuple[datetime | None, set[str]]]:
    """Jobs in their order, as runs of one submission time: "oldest submitted first" says
    nothing of the order of jobs submitted at the same instant."""
    runs: list[tuple[datetime | None, set[str]]] = []
    for job in found:
        if runs and runs[-1][0] == job.submitted_at:
            runs[-1][1].add(job.job_id)
        else:
            runs.append((job.submitted_at, {job.job_id}))
    return runs


def expand(op: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """The calls one drawn operation stands for."""
    if op[0] == "claim+suspend":
        _, worker, prompt, after = op
        return [("claim", worker),
                ("suspend", "claimed", "owner", "current", "fresh", prompt, after)]
    if op[0] == "claim+lapse":
        return [("claim", op[1]), ("advance", op[2]), ("sweep",)]
    return [op]


@settings(max_examples=examples(25), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(first=st.lists(SUBMIT, min_size=1, max_size=3),
       ops=st.lists(OPERATIONS, min_size=10, max_size=40))
def test_jobs_behave_as_documented(store: EventStore, first: list[tuple[Any, ...]],
                                   ops: list[tuple[Any, ...]]) -> None:
    """Random calls on the facade and on the model have the same outcomes and states."""
    ops = first + [step for op in ops for step in expand(op)]
    tenant = f"t-{uuid.uuid4().hex}"
    clock = Clock(T0)
    jobs = Jobs(store, lease=LEASE, max_attempts=MAX_ATTEMPTS, clock=clock)
    model = Model(clock)
    for step, op in enumerate(ops):
        got, want = run(jobs, model, tenant, op)
        assert same_outcome(got, want), (step, op, got, want)
        event(f"{op[0]}: {outcome(want)}")
        check_state(jobs, model, tenant, full=step % 5 == 4 or step == len(ops) - 1)
