"""Durable background jobs: submit, claim, leases, milestones, suspend/resume, sweep, events.

Every race runs real threads on both backends; the clock is injected (tests never sleep).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from typing import Any

import pytest

from eventstore import EventStore, InvalidArgument
from projections import fold_live, verify
from projections.errors import Conflict, LeaseLost, NotFound
from projections.events import JobFailed, JobResumed
from projections.jobs import Job, JobProjection, Jobs, dedupe_group
from tests._clock import Clock

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def job_store(url: str, clock: Clock) -> Iterator[EventStore]:
    s = EventStore.open(url, clock=clock)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def jobs(job_store: EventStore, clock: Clock) -> Jobs:
    return Jobs(job_store, lease=LEASE, max_attempts=3, clock=clock)


def types(store: EventStore, job_id: str, tenant_id: str = "default") -> list[str]:
    """The event types of a job's stream, in order."""
    return [e.type for e in store.read_stream(Jobs.stream_id(job_id), tenant_id=tenant_id)]


def race(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls at once on threads; each result is its return value or its exception."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[i] = call()
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a racing thread hung"
    return results


def running(jobs: Jobs, worker_id: str = "w1", **submit: Any) -> Job:
    """Submit a job and claim it for ``worker_id``."""
    job = jobs.submit(submit.pop("workflow_id", "wf"), submit.pop("inputs", {}),
                      user_id="u1", **submit)
    claimed = jobs.claim(worker_id, tenant_id=job.tenant_id)
    assert claimed is not None and claimed.job_id == job.job_id
    return claimed


# -- submit --


def test_submit_queues_a_job_with_its_fields(jobs: Jobs, clock: Clock) -> None:
    """A submitted job is queued with its workflow, inputs, user and submit time."""
    job = jobs.submit("wf-report", {"month": "2026-01"}, user_id="u1")
    assert (job.status, job.workflow_id, job.inputs, job.user_id) == (
        "queued", "wf-report", {"month": "2026-01"}, "u1")
    assert (job.attempt, job.worker_id, job.lease_until, job.milestones) == (0, None, None, [])
    assert job.submitted_at == job.queued_at == T0 and job.version == 1
    assert len(job.job_id) == 32
    assert jobs.get(job.job_id) == job


def test_same_dedupe_key_returns_the_unfinished_job(jobs: Jobs, job_store: EventStore) -> None:
    """Submitting a dedupe key again returns the open job, queued, running or suspended."""
    first = jobs.submit("wf", {"n": 1}, user_id="u1", dedupe_key="order-7")
    assert jobs.submit("wf", {"n": 2}, user_id="u1", dedupe_key="order-7").job_id == first.job_id
    jobs.claim("w1")
    assert jobs.submit("wf", {}, user_id="u1", dedupe_key="order-7").status == "running"
    jobs.suspend(first.job_id, "w1", request_id="r1", prompt="ok?")
    again = jobs.submit("wf", {}, user_id="u1", dedupe_key="order-7")
    assert (again.job_id, again.status, again.inputs) == (first.job_id, "suspended", {"n": 1})
    assert types(job_store, first.job_id).count("JobSubmitted") == 1


def test_dedupe_key_after_a_finished_job_starts_a_new_job(jobs: Jobs) -> None:
    """Once the key's job finished, the same key submits a new job with the next number."""
    first = running(jobs, dedupe_key="k")
    jobs.complete(first.job_id, "w1", {"ok": True})
    second = jobs.submit("wf", {}, user_id="u1", dedupe_key="k")
    assert second.job_id != first.job_id and second.status == "queued"
    assert (first.job_id.rsplit("-", 1)[1], second.job_id.rsplit("-", 1)[1]) == ("1", "2")
    jobs.cancel(second.job_id)
    third = jobs.submit("wf", {}, user_id="u1", dedupe_key="k")
    assert third.job_id.endswith("-3") and jobs.get(first.job_id).status == "completed"


def test_concurrent_submits_with_one_dedupe_key_make_one_job(jobs: Jobs,
                                                             job_store: EventStore) -> None:
    """Eight threads submitting one dedupe key at once all get the same single job."""
    results = race([partial(jobs.submit, "wf", {"i": i}, user_id="u1", dedupe_key="once")
                    for i in range(8)])
    assert all(isinstance(r, Job) for r in results), results
    assert len({r.job_id for r in results}) == 1
    assert len(jobs.list()) == 1
    assert types(job_store, results[0].job_id) == ["JobSubmitted"]


# -- claim --


def test_claim_takes_the_oldest_queued_job_with_a_lease(jobs: Jobs, clock: Clock) -> None:
    """claim leases the job queued first, counts the attempt and sets lease_until."""
    older = jobs.submit("wf", {"n": 1}, user_id="u1")
    clock.advance(seconds=1)
    newer = jobs.submit("wf", {"n": 2}, user_id="u1")
    clock.advance(seconds=1)
    job = jobs.claim("w1")
    assert job is not None and job.job_id == older.job_id
    assert (job.status, job.worker_id, job.attempt) == ("running", "w1", 1)
    assert job.lease_until == clock.now + LEASE and job.started_at == clock.now
    nxt = jobs.claim("w2")
    assert nxt is not None and nxt.job_id == newer.job_id


def test_a_resumed_job_queues_behind_jobs_that_waited_longer(jobs: Jobs, clock: Clock) -> None:
    """A job queued again (resumed) is ordered by when it was queued again, not by when it
    was first submitted: jobs already waiting are claimed first."""
    first = jobs.submit("wf", {"n": 1}, user_id="u1")
    assert jobs.claim("w1") is not None
    jobs.suspend(first.job_id, "w1", request_id="r1", prompt="?")
    clock.advance(minutes=1)
    waiting = jobs.submit("wf", {"n": 2}, user_id="u1")
    clock.advance(minutes=9)
    jobs.resume(first.job_id, request_id="r1", input="ok")
    clock.advance(minutes=1)
    job = jobs.claim("w2")
    assert job is not None and job.job_id == waiting.job_id
    again = jobs.claim("w3")
    assert again is not None and again.job_id == first.job_id


def test_claim_is_first_in_first_out_when_the_clock_stands_still(jobs: Jobs,
                                                                  clock: Clock) -> None:
    """Jobs queued at the same instant (a frozen clock) are claimed in submission order, and
    jobs a sweep requeues together come back in the order they were claimed."""
    submitted = [jobs.submit("wf", {"i": i}, user_id="u1").job_id for i in range(8)]
    claimed = []
    while (job := jobs.claim("w1")) is not None:
        claimed.append(job.job_id)
    assert claimed == submitted
    clock.advance(seconds=LEASE.total_seconds() + 1)
    assert [s.job_id for s in jobs.sweep()] == submitted
    again = []
    while (job := jobs.claim("w2")) is not None:
        again.append(job.job_id)
    assert again == submitted


def test_claim_returns_none_when_nothing_is_queued(jobs: Jobs) -> None:
    """With no queued job, claim returns None and writes nothing."""
    assert jobs.claim("w1") is None
    running(jobs)
    assert jobs.claim("w2") is None


def test_concurrent_claims_take_each_job_once(jobs: Jobs, job_store: EventStore,
                                              clock: Clock) -> None:
    """Eight workers claiming at once from six jobs: each job is claimed by exactly one."""
    submitted = []
    for i in range(6):
        submitted.append(jobs.submit("wf", {"i": i}, user_id="u1").job_id)
        clock.advance(milliseconds=1)

    def drain(worker: str) -> list[str]:
        got = []
        while (job := jobs.claim(worker)) is not None:
            got.append(job.job_id)
        return got

    results = race([partial(drain, f"w{i}") for i in range(8)])
    claimed = [j for r in results for j in r]
    assert sorted(claimed) == sorted(submitted)
    for job_id in submitted:
        assert types(job_store, job_id) == ["JobSubmitted", "JobClaimed"]


# -- the owner's calls --


def test_a_clock_whose_lease_would_end_past_the_last_datetime_is_refused(
        jobs: Jobs, clock: Clock) -> None:
    """claim and heartbeat at a time whose lease ends past the last datetime: InvalidArgument,
    nothing written (a bare OverflowError before)."""
    job = jobs.submit("wf", {}, user_id="u1")
    jobs.claim("w1")
    late = datetime.max.replace(tzinfo=UTC) - timedelta(seconds=1)
    other = jobs.submit("wf", {}, user_id="u1")
    clock.now = late
    with pytest.raises(InvalidArgument, match="past the last datetime"):
        jobs.claim("w2")
    with pytest.raises(InvalidArgument, match="past the last datetime"):
        jobs.heartbeat(job.job_id, "w1")
    assert jobs.get(other.job_id).version == 1 and jobs.get(job.job_id).version == 2


def test_times_at_the_ends_of_the_range_in_other_zones_are_refused(jobs: Jobs) -> None:
    """A time that has no UTC datetime (datetime.max at -05:00, datetime.min at +05:00): a
    sweep's ``now`` and a deadline are refused with InvalidArgument (a bare OverflowError)."""
    from projections import Continuations

    job = jobs.submit("wf", {}, user_id="u1")
    jobs.claim("w1")
    late = datetime.max.replace(tzinfo=timezone(timedelta(hours=-5)))
    early = datetime.min.replace(tzinfo=timezone(timedelta(hours=5)))
    for now in (late, early):
        with pytest.raises(InvalidArgument, match="outside the datetimes of UTC"):
            jobs.sweep(now=now)
        with pytest.raises(InvalidArgument, match="outside the datetimes of UTC"):
            Continuations(jobs.store).sweep(now=now)
    with pytest.raises(InvalidArgument, match="outside the datetimes of UTC"):
        jobs.suspend(job.job_id, "w1", request_id="r1", prompt="ok?", deadline=late)
    assert jobs.get(job.job_id).status == "running"


def test_heartbeat_extends_the_lease(jobs: Jobs, clock: Clock) -> None:
    """A heartbeat moves lease_until to now + lease."""
    job = running(jobs)
    clock.advance(seconds=20)
    beat = jobs.heartbeat(job.job_id, "w1")
    assert beat.lease_until == clock.now + LEASE and beat.status == "running"


def test_live_heartbeat_is_never_swept(jobs: Jobs, clock: Clock) -> None:
    """A job whose lease was renewed in time is left alone by a sweep after the old lease."""
    job = running(jobs)
    assert job.lease_until is not None
    clock.advance(seconds=25)
    jobs.heartbeat(job.job_id, "w1")
    assert jobs.sweep(job.lease_until + timedelta(seconds=1)) == []
    assert jobs.sweep(job.lease_until) == [] and jobs.get(job.job_id).status == "running"


def test_heartbeat_of_another_worker_raises_lease_lost(jobs: Jobs,
                                                       job_store: EventStore) -> None:
    """Only the owning worker may heartbeat; another gets LeaseLost naming the owner."""
    job = running(jobs)
    with pytest.raises(LeaseLost, match="worker w1 owns it") as e:
        jobs.heartbeat(job.job_id, "w2")
    assert e.value.reason == "other_worker"
    assert types(job_store, job.job_id) == ["JobSubmitted", "JobClaimed"]


def test_expired_lease_nobody_took_can_be_renewed(jobs: Jobs, clock: Clock) -> None:
    """A heartbeat after the lease ran out still renews it while no sweep requeued the job."""
    job = running(jobs)
    clock.advance(minutes=5)
    assert jobs.heartbeat(job.job_id, "w1").lease_until == clock.now + LEASE


def test_heartbeat_after_a_requeue_raises_lease_lost(jobs: Jobs, clock: Clock) -> None:
    """Once swept, the old owner's heartbeat raises LeaseLost; after a new claim too."""
    job = running(jobs)
    clock.advance(seconds=31)
    assert [s.action for s in jobs.sweep()] == ["requeued"]
    with pytest.raises(LeaseLost, match="requeued after its lease expired") as e:
        jobs.heartbeat(job.job_id, "w1")
    assert e.value.reason == "queued"
    jobs.claim("w2")
    with pytest.raises(LeaseLost) as e:
        jobs.heartbeat(job.job_id, "w1")
    assert e.value.reason == "other_worker"


def test_owner_calls_naming_an_earlier_attempt_raise_lease_lost(jobs: Jobs,
                                                                  clock: Clock) -> None:
    """A worker that claims again a job whose lease it let expire (one worker id, several
    threads): calls that name the earlier attempt are refused, so that attempt cannot complete
    the new one (without attempt=, the worker id alone cannot tell them apart)."""
    first = running(jobs)
    assert first.attempt == 1
    clock.advance(seconds=31)
    assert [s.action for s in jobs.sweep()] == ["requeued"]
    second = jobs.claim("w1")
    assert second is not None and second.attempt == 2
    calls = [lambda a: jobs.heartbeat(first.job_id, "w1", attempt=a),
             lambda a: jobs.record(first.job_id, "w1", {"step": 1}, attempt=a),
             lambda a: jobs.suspend(first.job_id, "w1", request_id="r9", prompt="?", attempt=a),
             lambda a: jobs.fail(first.job_id, "w1", "boom", attempt=a),
             lambda a: jobs.complete(first.job_id, "w1", {"from": "attempt 1"}, attempt=a)]
    for call in calls:
        with pytest.raises(LeaseLost, match="the job is in attempt 2") as e:
            call(1)
        assert e.value.reason == "other_attempt"
    for bad in (0, "2", True):
        with pytest.raises(InvalidArgument, match="attempt"):
            jobs.heartbeat(first.job_id, "w1", attempt=bad)  # type: ignore[arg-type]
    assert jobs.get(first.job_id).status == "running"
    done = jobs.complete(first.job_id, "w1", {"from": "attempt 2"}, attempt=2)
    assert (done.status, done.result) == ("completed", {"from": "attempt 2"})


def test_record_appends_milestones_in_order(jobs: Jobs, clock: Clock) -> None:
    """Milestones keep their order, value, worker, time and stream seq."""
    job = running(jobs)
    jobs.record(job.job_id, "w1", {"step": "fetch"})
    clock.advance(seconds=2)
    done = jobs.record(job.job_id, "w1", "summarize")
    assert [(m.milestone, m.worker_id, m.seq, m.at) for m in done.milestones] == [
        ({"step": "fetch"}, "w1", 3, T0), ("summarize", "w1", 4, T0 + timedelta(seconds=2))]
    assert jobs.get(job.job_id).milestones == done.milestones


def test_record_by_a_non_owner_raises_and_writes_nothing(jobs: Jobs,
                                                         job_store: EventStore) -> None:
    """A worker that does not own the job cannot record milestones."""
    job = running(jobs)
    with pytest.raises(LeaseLost):
        jobs.record(job.job_id, "w2", "x")
    jobs.cancel(job.job_id)
    with pytest.raises(LeaseLost) as e:
        jobs.record(job.job_id, "w1", "x")
    assert e.value.reason == "cancelled"
    assert "MilestoneRecorded" not in types(job_store, job.job_id)


def test_complete_finishes_with_the_result(jobs: Jobs, clock: Clock) -> None:
    """complete stores the result and finish time; the job is terminal."""
    job = running(jobs)
    clock.advance(seconds=3)
    done = jobs.complete(job.job_id, "w1", {"rows": 42})
    assert (done.status, done.result, done.finished_at, done.lease_until) == (
        "completed", {"rows": 42}, clock.now, None)
    assert done.finished
    with pytest.raises(LeaseLost) as e:
        jobs.complete(job.job_id, "w1")
    assert e.value.reason == "completed"


def test_fail_finishes_with_the_error(jobs: Jobs) -> None:
    """fail stores the error; the job is terminal and is not retried."""
    job = running(jobs)
    failed = jobs.fail(job.job_id, "w1", "boom: division by zero")
    assert (failed.status, failed.error, failed.worker_id) == (
        "failed", "boom: division by zero", "w1")
    assert jobs.claim("w2") is None


def test_cancel_stops_queued_and_running_jobs(jobs: Jobs) -> None:
    """A queued or running job can be cancelled; its worker then gets LeaseLost(cancelled)."""
    active = running(jobs)
    queued = jobs.submit("wf", {}, user_id="u1")
    assert jobs.cancel(queued.job_id, "not needed").cancel_reason == "not needed"
    assert jobs.cancel(active.job_id).status == "cancelled"
    with pytest.raises(LeaseLost) as e:
        jobs.heartbeat(active.job_id, "w1")
    assert e.value.reason == "cancelled"
    assert jobs.claim("w2") is None


def test_cancel_of_a_finished_job_raises_conflict(jobs: Jobs, job_store: EventStore) -> None:
    """Cancelling a completed, failed or cancelled job raises Conflict with its status."""
    job = running(jobs)
    jobs.complete(job.job_id, "w1")
    with pytest.raises(Conflict, match="already completed") as e:
        jobs.cancel(job.job_id)
    assert e.value.reason == "completed"
    assert types(job_store, job.job_id)[-1] == "JobCompleted"


# -- suspend and resume --


def test_suspend_and_resume_requeue_the_job_with_the_input(jobs: Jobs, clock: Clock) -> None:
    """suspend gives up the lease; resume queues the job and the next claim gets the input."""
    job = running(jobs)
    deadline = T0 + timedelta(hours=1)
    held = jobs.suspend(job.job_id, "w1", request_id="r1", prompt={"ask": "approve?"},
                        deadline=deadline)
    assert (held.status, held.worker_id, held.lease_until) == ("suspended", None, None)
    assert held.pending is not None
    assert (held.pending.request_id, held.pending.prompt, held.pending.deadline) == (
        "r1", {"ask": "approve?"}, deadline)
    assert jobs.sweep(clock.advance(minutes=30)) == []
    resumed = jobs.resume(job.job_id, request_id="r1", input={"approved": True})
    assert (resumed.status, resumed.pending, resumed.queued_at) == ("queued", None, clock.now)
    again = jobs.claim("w2")
    assert again is not None and again.job_id == job.job_id
    assert (again.attempt, again.resume_input, again.resumed_request_id) == (
        2, {"approved": True}, "r1")


def test_suspend_by_a_non_owner_raises_lease_lost(jobs: Jobs) -> None:
    """Only the running owner can suspend its job."""
    job = running(jobs)
    with pytest.raises(LeaseLost):
        jobs.suspend(job.job_id, "w2", request_id="r1", prompt="?")
    assert jobs.get(job.job_id).status == "running"


def test_suspend_reusing_an_answered_request_id_is_refused(jobs: Jobs) -> None:
    """A request id answered before cannot be used again on the same job."""
    job = running(jobs)
    jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?")
    jobs.resume(job.job_id, request_id="r1", input=1)
    jobs.claim("w1")
    with pytest.raises(Conflict) as e:
        jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?")
    assert e.value.reason == "duplicate_request_id"


def test_resume_of_a_stale_request_id_is_refused(jobs: Jobs) -> None:
    """Resuming an old request while another is pending names both ids."""
    job = running(jobs)
    jobs.suspend(job.job_id, "w1", request_id="r1", prompt="first?")
    jobs.resume(job.job_id, request_id="r1", input="yes")
    jobs.claim("w1")
    jobs.suspend(job.job_id, "w1", request_id="r2", prompt="second?")
    with pytest.raises(Conflict, match="stale request id r1, pending r2") as e:
        jobs.resume(job.job_id, request_id="r1", input="late")
    assert e.value.reason == "stale_request"
    assert jobs.get(job.job_id).status == "suspended"


def test_resume_twice_is_refused_as_already_resumed(jobs: Jobs, job_store: EventStore) -> None:
    """The second resume of one request raises Conflict(already_resumed), writing nothing."""
    job = running(jobs)
    jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?")
    jobs.resume(job.job_id, request_id="r1", input=1)
    with pytest.raises(Conflict, match="already resumed") as e:
        jobs.resume(job.job_id, request_id="r1", input=2)
    assert e.value.reason == "already_resumed"
    assert types(job_store, job.job_id).count("JobResumed") == 1
    assert jobs.get(job.job_id).resume_input == 1


def test_a_deadline_more_than_a_century_away_is_refused(jobs: Jobs, clock: Clock) -> None:
    """As leases, TTLs and timeouts: a suspension's deadline at most a century from now
    (as the README says), and after now; nothing written otherwise."""
    job = running(jobs)
    with pytest.raises(InvalidArgument, match="days from now"):
        jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?",
                     deadline=T0 + timedelta(days=36_526))
    assert jobs.get(job.job_id).status == "running"
    with pytest.raises(InvalidArgument, match="not after now"):  # (born expired)
        jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?", deadline=clock.now)
    assert jobs.get(job.job_id).status == "running"
    done = jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?",
                        deadline=T0 + timedelta(days=36_525))
    assert done.status == "suspended"


def test_resume_after_the_deadline_is_refused(jobs: Jobs, clock: Clock) -> None:
    """A resume after the deadline raises Conflict(deadline_passed), before and after a sweep."""
    job = running(jobs)
    jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?",
                 deadline=T0 + timedelta(minutes=10))
    clock.advance(minutes=11)
    with pytest.raises(Conflict, match="deadline passed") as e:
        jobs.resume(job.job_id, request_id="r1", input=1)
    assert e.value.reason == "deadline_passed"
    jobs.sweep()
    with pytest.raises(Conflict) as e:
        jobs.resume(job.job_id, request_id="r1", input=1)
    assert e.value.reason == "deadline_passed"


def test_a_cancel_after_the_deadline_records_the_deadline_s_failure_and_is_refused(
        jobs: Jobs, job_store: EventStore, clock: Clock) -> None:
    """Past the deadline, before a sweep, the deadline has decided the request: a cancel gets
    Conflict(deadline_passed) as a resume does (a cancel won, and the refused resume's reason
    changed to cancelled), and records the failure a sweep would, so that a job with no sweeper
    does not stay suspended; everything after says deadline_passed."""
    job = running(jobs)
    jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?",
                 deadline=T0 + timedelta(minutes=10))
    clock.advance(minutes=10, microseconds=1)
    with pytest.raises(Conflict, match="deadline of request r1 passed") as e:
        jobs.cancel(job.job_id, "too late")
    assert e.value.reason == "deadline_passed"
    assert types(job_store, job.job_id)[-1] == "JobFailed"
    assert (jobs.get(job.job_id).status, jobs.get(job.job_id).error) == ("failed",
                                                                        "deadline passed")
    assert jobs.sweep() == []
    for call in (lambda: jobs.resume(job.job_id, request_id="r1", input=1),
                 lambda: jobs.cancel(job.job_id)):
        with pytest.raises(Conflict) as e:
            call()
        assert e.value.reason == "deadline_passed"


@pytest.mark.parametrize("command", ["resume", "cancel"])
def test_a_command_that_decides_again_after_a_conflict_sees_the_deadline_pass(
        jobs: Jobs, job_store: EventStore, clock: Clock, url: str, command: str) -> None:
    """The deadline is checked against the time of each decision, not of the call: a resume
    (or cancel) whose first decision, a moment before the deadline, lost to another write and
    that decides again after it is refused with deadline_passed (the deadline's failure is
    recorded), not let through on the call's earlier time."""
    from projections.events import MilestoneRecorded

    job = running(jobs)
    deadline = T0 + timedelta(minutes=10)
    jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?", deadline=deadline)
    clock.advance(minutes=10, microseconds=-1)
    decided: list[datetime] = []
    real = jobs._now

    def now_then_a_write_lands() -> datetime:
        when = real()
        decided.append(when)
        if len(decided) == 1:  # another process writes to the job meanwhile, then time passes
            with EventStore.open(url) as other:
                other.append(Jobs.stream_id(job.job_id), [MilestoneRecorded(
                    worker_id="w1", milestone="late", at=when)])
            clock.advance(microseconds=2)
        return when

    jobs._now = now_then_a_write_lands  # type: ignore[method-assign]
    with pytest.raises(Conflict) as e:
        if command == "resume":
            jobs.resume(job.job_id, request_id="r1", input=1)
        else:
            jobs.cancel(job.job_id, "too late")
    assert e.value.reason == "deadline_passed"
    assert decided[0] < deadline < decided[-1]
    if command == "cancel":
        assert types(job_store, job.job_id)[-1] == "JobFailed"
    else:
        assert "JobResumed" not in types(job_store, job.job_id)


def test_resume_of_a_cancelled_job_is_refused(jobs: Jobs) -> None:
    """A cancelled suspended job cannot be resumed."""
    job = running(jobs)
    jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?")
    jobs.cancel(job.job_id, "user gave up")
    with pytest.raises(Conflict, match="cancelled") as e:
        jobs.resume(job.job_id, request_id="r1", input=1)
    assert e.value.reason == "cancelled"


def test_a_request_is_decided_once_whatever_comes_after(jobs: Jobs) -> None:
    """In sequence as in a race: a cancel after the resume won gets Conflict(already_resumed)
    (force cancels anyway; once a worker runs the job a cancel is a cancel again), and a
    resume of an earlier request id is stale_request also once the job moved on."""
    job = running(jobs)
    jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?")
    jobs.resume(job.job_id, request_id="r1", input="yes")
    with pytest.raises(Conflict, match="r1 was resumed") as e:
        jobs.cancel(job.job_id, "too late")
    assert e.value.reason == "already_resumed"
    with pytest.raises(Conflict) as e:
        jobs.resume(job.job_id, request_id="r0", input="old")
    assert e.value.reason == "stale_request"
    assert jobs.get(job.job_id).status == "queued"
    jobs.claim("w2")
    assert jobs.cancel(job.job_id, "stop").status == "cancelled"  # running: the cancel's
    with pytest.raises(Conflict) as e:
        jobs.resume(job.job_id, request_id="r0", input="old")
    assert e.value.reason == "stale_request"
    other = running(jobs)
    jobs.suspend(other.job_id, "w1", request_id="q1", prompt="?")
    jobs.resume(other.job_id, request_id="q1", input="yes")
    with pytest.raises(Conflict) as e:  # the last request, answered
        jobs.resume(other.job_id, request_id="q1", input="again")
    assert e.value.reason == "already_resumed"
    jobs.claim("w3")
    jobs.suspend(other.job_id, "w3", request_id="q2", prompt="?")
    jobs.resume(other.job_id, request_id="q2", input="yes")
    for earlier in ("q1", "q0"):  # answered or never asked: an earlier request is stale
        with pytest.raises(Conflict) as e:
            jobs.resume(other.job_id, request_id=earlier, input="late")
        assert e.value.reason == "stale_request"
    assert jobs.cancel(other.job_id, "anyway", force=True).status == "cancelled"
    with pytest.raises(InvalidArgument):
        jobs.cancel(other.job_id, force="yes")  # type: ignore[arg-type]


def test_resume_of_a_job_that_is_not_suspended_is_refused(jobs: Jobs) -> None:
    """Resuming a running job raises Conflict(not_suspended)."""
    job = running(jobs)
    with pytest.raises(Conflict, match="job is running, no request is pending") as e:
        jobs.resume(job.job_id, request_id="r1", input=1)
    assert e.value.reason == "not_suspended"


def test_concurrent_resumes_cancel_and_deadline_have_one_winner(
        jobs: Jobs, job_store: EventStore, clock: Clock) -> None:
    """Resumes, a stale resume, a late resume, a cancel and a sweep race: exactly one wins
    (a cancel that comes after the resume won loses too), the others say why."""
    deadline = T0 + timedelta(minutes=5)
    late = Jobs(job_store, lease=LEASE, clock=lambda: deadline + timedelta(seconds=1))
    says = {"already_resumed": "already resumed", "cancelled": "cancelled",
            "stale_request": "stale request id r1",
            "deadline_passed": "deadline passed"}

    def contenders(job_id: str) -> list[Callable[[], Any]]:
        return [
            *(partial(jobs.resume, job_id, request_id="r2", input=i) for i in range(4)),
            partial(jobs.resume, job_id, request_id="r1", input="stale"),
            partial(late.resume, job_id, request_id="r2", input="late"),
            partial(jobs.cancel, job_id, "race"),
            partial(jobs.sweep, deadline + timedelta(seconds=1)),
        ]

    for _ in range(3):
        clock.now = T0
        job = running(jobs)
        jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?")
        jobs.resume(job.job_id, request_id="r1", input=0)
        jobs.claim("w1")
        jobs.suspend(job.job_id, "w1", request_id="r2", prompt="?", deadline=deadline)
        before = job_store.stream_version(Jobs.stream_id(job.job_id))
        results = race(contenders(job.job_id))
        resumes, cancel = results[:6], results[6]
        (first,) = job_store.read_stream(Jobs.stream_id(job.job_id), from_version=before + 1,
                                         limit=1)
        winner = first.data
        won = [r for r in resumes if isinstance(r, Job)]
        for r in resumes:
            if not isinstance(r, Job):
                assert isinstance(r, Conflict) and r.reason in says, r
                assert says[r.reason] in str(r)
        if isinstance(winner, JobResumed):
            assert len(won) == 1 and winner.input == won[0].resume_input
            assert isinstance(cancel, Conflict) and cancel.reason == "already_resumed"
            assert jobs.get(job.job_id).status == "queued"
        else:
            assert won == [] and first.type in ("JobCancelled", "JobFailed")
        if isinstance(winner, JobFailed):
            assert winner.error == "deadline passed"
            # (the deadline's failure: deadline_passed, as a resume says, not just "failed")
            assert isinstance(cancel, Conflict) and cancel.reason == "deadline_passed"
        assert types(job_store, job.job_id).count("JobResumed") == 1 + len(won)
        assert len(won) + isinstance(cancel, Job) + isinstance(winner, JobFailed) == 1
        stale = results[4]  # r1: answered before r2 was asked, stale whatever won
        assert isinstance(stale, Conflict) and stale.reason == "stale_request"
        if jobs.get(job.job_id).status == "queued":  # (out of the next round's claim)
            jobs.cancel(job.job_id, "done", force=True)


# -- sweep --


def test_sweep_requeues_expired_leases_then_fails_the_job(jobs: Jobs, clock: Clock) -> None:
    """An expired lease is requeued until max_attempts leases were lost, then failed."""
    job = jobs.submit("wf", {}, user_id="u1")
    actions = []
    for attempt in (1, 2, 3):
        claimed = jobs.claim(f"w{attempt}")
        assert claimed is not None and claimed.attempt == attempt
        clock.advance(seconds=31)
        (swept,) = jobs.sweep()
        assert (swept.job_id, swept.tenant_id, swept.attempt) == (job.job_id, "default", attempt)
        actions.append((swept.action, swept.reason if swept.action == "failed" else None))
    assert actions == [("requeued", None), ("requeued", None), ("failed", "worker lost")]
    final = jobs.get(job.job_id)
    assert (final.status, final.error, final.lost) == ("failed", "worker lost", 2)


def test_sweep_fails_a_suspended_job_past_its_deadline(jobs: Jobs, clock: Clock) -> None:
    """A suspended job past its deadline fails with "deadline passed"; one without waits."""
    timed = running(jobs)
    jobs.suspend(timed.job_id, "w1", request_id="r1", prompt="?",
                 deadline=T0 + timedelta(minutes=1))
    patient = running(jobs)
    jobs.suspend(patient.job_id, "w1", request_id="r1", prompt="?")
    assert jobs.sweep(T0 + timedelta(minutes=1)) == []
    (swept,) = jobs.sweep(clock.advance(days=30))
    assert (swept.job_id, swept.action, swept.reason) == (timed.job_id, "failed",
                                                          "deadline passed")
    assert jobs.get(timed.job_id).error == "deadline passed"
    assert jobs.get(patient.job_id).status == "suspended"


def test_concurrent_sweepers_sweep_each_job_once(jobs: Jobs, job_store: EventStore,
                                                 clock: Clock) -> None:
    """Six sweepers racing over expired leases and deadlines write one event per job."""
    expired = [running(jobs, f"w{i}").job_id for i in range(4)]
    doomed = running(jobs, "wd")
    jobs.suspend(doomed.job_id, "wd", request_id="r", prompt="?",
                 deadline=T0 + timedelta(seconds=10))
    when = clock.advance(minutes=1)
    results = race([lambda: jobs.sweep(when) for _ in range(6)])
    swept = [s for r in results for s in r]
    assert sorted(s.job_id for s in swept) == sorted([*expired, doomed.job_id])
    for job_id in expired:
        assert types(job_store, job_id)[2:] == ["JobRequeued"]
    assert types(job_store, doomed.job_id)[-1] == "JobFailed"
    assert types(job_store, doomed.job_id).count("JobFailed") == 1


def test_heartbeats_racing_sweepers_have_one_outcome_per_job(
        jobs: Jobs, job_store: EventStore, clock: Clock) -> None:
    """A late heartbeat and a sweep race: either the lease is renewed or the job is requeued."""
    ids = [running(jobs, f"w{i}").job_id for i in range(4)]
    when = clock.advance(seconds=31)
    calls: list[Callable[[], Any]] = [
        *(lambda i=i, j=j: jobs.heartbeat(j, f"w{i}") for i, j in enumerate(ids)),
        lambda: jobs.sweep(when), lambda: jobs.sweep(when)]
    results = race(calls)
    swept = {s.job_id for r in results[4:] for s in r}
    for job_id, beat in zip(ids, results[:4], strict=True):
        tail = types(job_store, job_id)[2:]
        if isinstance(beat, Job):
            assert tail == ["JobHeartbeat"] and job_id not in swept
            assert jobs.get(job_id).status == "running"
        else:
            assert isinstance(beat, LeaseLost) and beat.reason == "queued", beat
            assert tail == ["JobRequeued"] and job_id in swept
    assert sum(len(r) for r in results[4:]) == len(swept)


# -- events --


def lifecycle(jobs: Jobs) -> Job:
    """A job taken through suspend, resume and completion (9 events)."""
    job = running(jobs)
    jobs.record(job.job_id, "w1", 1)
    jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?")
    jobs.resume(job.job_id, request_id="r1", input="go")
    jobs.claim("w2")
    jobs.heartbeat(job.job_id, "w2")
    jobs.record(job.job_id, "w2", 2)
    return jobs.complete(job.job_id, "w2", "done")


def test_events_after_a_seq_reattach_without_gaps(jobs: Jobs) -> None:
    """Reading after the last seen seq continues exactly where the first read stopped."""
    job = lifecycle(jobs)
    every = list(jobs.events(job.job_id))
    assert [e.seq for e in every] == list(range(1, 10))
    assert every[0].type == "JobSubmitted" and every[-1].type == "JobCompleted"
    head = list(jobs.events(job.job_id))[:4]
    tail = list(jobs.events(job.job_id, after=head[-1].seq))
    assert head + tail == every
    assert all(e.at.tzinfo is not None and e.at.utcoffset() == timedelta(0) for e in every)


def test_event_times_follow_the_jobs_clock(url: str, clock: Clock) -> None:
    """Each JobEvent's ``at`` is the Jobs clock's, as the job's own times are (the store runs on
    the real clock here)."""
    real_clock_store = EventStore.open(url)
    jobs = Jobs(real_clock_store, lease=LEASE, clock=clock)
    job = jobs.submit("wf", {}, user_id="u1")
    clock.advance(seconds=10)
    jobs.claim("w1")
    clock.advance(seconds=5)
    jobs.record(job.job_id, "w1", "half")
    clock.advance(seconds=5)
    done = jobs.complete(job.job_id, "w1", "ok")
    ats = [e.at for e in jobs.events(job.job_id)]
    assert ats == [T0, T0 + timedelta(seconds=10), T0 + timedelta(seconds=15),
                   T0 + timedelta(seconds=20)]
    assert (ats[0], ats[1], ats[-1]) == (done.submitted_at, done.started_at, done.finished_at)
    real_clock_store.close()


def test_events_follow_ends_after_the_terminal_event(jobs: Jobs) -> None:
    """A follower sees every event as the job runs and stops after its completion."""
    job = jobs.submit("wf", {}, user_id="u1")
    seen: list[Any] = []
    follower = threading.Thread(target=lambda: seen.extend(
        jobs.events(job.job_id, follow=True, timeout=20, poll_interval=0.01)))
    follower.start()
    jobs.claim("w1")
    jobs.record(job.job_id, "w1", "half")
    jobs.complete(job.job_id, "w1")
    follower.join(20)
    assert not follower.is_alive()
    assert [(e.seq, e.type) for e in seen] == [
        (1, "JobSubmitted"), (2, "JobClaimed"), (3, "MilestoneRecorded"), (4, "JobCompleted")]


def test_events_follow_of_a_finished_job_ends_at_once(jobs: Jobs) -> None:
    """Following a finished job from its end, or re-attaching at it, returns at once."""
    job = lifecycle(jobs)
    started = time.monotonic()
    assert len(list(jobs.events(job.job_id, follow=True))) == 9
    assert list(jobs.events(job.job_id, after=9, follow=True)) == []
    assert time.monotonic() - started < 5


def test_a_follow_from_past_the_end_ends_when_the_job_finishes(jobs: Jobs) -> None:
    """A client whose ``after`` is ahead of the job's stream: when the job finishes during the
    follow (its terminal event at or before ``after``), the follow ends, as it does when the
    job had finished before the call (it polled until its timeout, for ever without one)."""
    job = jobs.submit("wf", {}, user_id="u1")
    seen: list[Any] = []
    follower = threading.Thread(target=lambda: seen.extend(
        jobs.events(job.job_id, after=5, follow=True, timeout=30, poll_interval=0.01)))
    started = time.monotonic()
    follower.start()
    time.sleep(0.1)  # the follower polls the unfinished job first
    jobs.claim("w1")
    jobs.complete(job.job_id, "w1")  # seq 3, before the follower's after=5
    follower.join(30)
    assert not follower.is_alive()
    assert time.monotonic() - started < 10
    assert seen == []


def test_an_idle_follow_reads_once_per_poll(jobs: Jobs, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """A follower re-attached at a running job's last event polls with one read each time
    (the check for a job that ended before ``after`` came as a second read per poll)."""
    job = running(jobs)
    reads = 0
    real = jobs.store.read_stream

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs.store, "read_stream", counted)
    polls = 0
    real_sleep = time.sleep

    def counted_sleep(seconds: float) -> None:
        nonlocal polls
        polls += 1
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", counted_sleep)
    assert list(jobs.events(job.job_id, after=2, follow=True, timeout=0.3,
                            poll_interval=0.02)) == []
    assert polls >= 3 and reads <= polls + 1


def test_events_follow_stops_at_the_timeout(jobs: Jobs) -> None:
    """Following a job that does not finish ends quietly after the timeout."""
    job = running(jobs)
    started = time.monotonic()
    seen = list(jobs.events(job.job_id, after=1, follow=True, timeout=0.1,
                            poll_interval=0.02))
    assert [e.type for e in seen] == ["JobClaimed"]
    assert 0.1 <= time.monotonic() - started < 5


# -- tenancy, queries, input checks --


def test_tenants_never_see_each_others_jobs(jobs: Jobs, clock: Clock) -> None:
    """get, claim, list, events and sweep of one tenant never touch another's jobs."""
    job = jobs.submit("wf", {}, user_id="u1", tenant_id="acme")
    with pytest.raises(NotFound):
        jobs.get(job.job_id, tenant_id="globex")
    with pytest.raises(NotFound):
        jobs.events(job.job_id, tenant_id="globex")
    with pytest.raises(NotFound):
        jobs.cancel(job.job_id, tenant_id="globex")
    assert jobs.claim("w1", tenant_id="globex") is None and jobs.list(tenant_id="globex") == []
    assert jobs.claim("w1") is None
    claimed = jobs.claim("w1", tenant_id="acme")
    assert claimed is not None and claimed.tenant_id == "acme"
    when = clock.advance(minutes=1)
    assert jobs.sweep(when, tenant_id="globex") == []
    assert [(s.tenant_id, s.action) for s in jobs.sweep(when, tenant_id="acme")] == [
        ("acme", "requeued")]


def test_same_dedupe_key_in_two_tenants_makes_two_jobs(jobs: Jobs) -> None:
    """Dedupe keys are per tenant."""
    a = jobs.submit("wf", {}, user_id="u1", dedupe_key="k", tenant_id="a")
    b = jobs.submit("wf", {}, user_id="u1", dedupe_key="k", tenant_id="b")
    jobs.cancel(a.job_id, tenant_id="a")
    assert jobs.get(b.job_id, tenant_id="b").status == "queued"


def test_unknown_job_raises_not_found(jobs: Jobs) -> None:
    """get and every command on a job that does not exist raise NotFound."""
    for call in (lambda: jobs.get("nope"), lambda: jobs.heartbeat("nope", "w1"),
                 lambda: jobs.resume("nope", request_id="r", input=1),
                 lambda: jobs.cancel("nope"), lambda: jobs.events("nope")):
        with pytest.raises(NotFound) as e:
            call()
        assert e.value.reason == "not_found"


def test_list_filters_by_status(jobs: Jobs, clock: Clock) -> None:
    """list returns the tenant's jobs, of the given statuses, oldest submitted first."""
    a = running(jobs)
    clock.advance(seconds=1)
    b = jobs.submit("wf", {}, user_id="u1")
    clock.advance(seconds=1)
    c = jobs.submit("wf", {}, user_id="u1")
    assert [j.job_id for j in jobs.list()] == [a.job_id, b.job_id, c.job_id]
    assert [j.job_id for j in jobs.list("queued")] == [b.job_id, c.job_id]
    assert [j.job_id for j in jobs.list(["running", "completed"])] == [a.job_id]
    assert jobs.list(tenant_id="other") == []


def test_times_are_aware_utc(job_store: EventStore) -> None:
    """A clock in another time zone still yields UTC times on the job."""
    plus2 = timezone(timedelta(hours=2))
    jobs = Jobs(job_store, clock=lambda: datetime(2026, 1, 1, 14, 0, tzinfo=plus2))
    job = jobs.submit("wf", {}, user_id="u1")
    claimed = jobs.claim("w1")
    assert claimed is not None and claimed.lease_until is not None
    for t in (job.submitted_at, claimed.lease_until, claimed.started_at):
        assert t is not None and t.tzinfo == UTC
    assert job.submitted_at == T0


def test_a_lease_of_exactly_a_century_is_the_longest_taken(job_store: EventStore,
                                                          clock: Clock) -> None:
    century = timedelta(days=36_525)
    claimed = running(Jobs(job_store, lease=century, clock=clock))
    assert claimed.lease_until == clock.now + century


def test_bad_input_raises_invalid_argument_and_writes_nothing(jobs: Jobs,
                                                              job_store: EventStore) -> None:
    """Malformed arguments raise InvalidArgument before anything is appended."""
    job = running(jobs)
    jobs.submit("wf", {}, user_id="u1", dedupe_key="open")
    written = job_store.stats()["events"]
    naive = datetime(2026, 1, 2, 12, 0)
    bad: list[Callable[[], Any]] = [
        lambda: Jobs(job_store, lease=timedelta(0)),
        lambda: Jobs(job_store, max_attempts=0),
        lambda: jobs.submit("", {}, user_id="u1"),
        lambda: jobs.submit("wf", {}, user_id=""),
        lambda: jobs.submit("wf", {"x": object()}, user_id="u1"),
        lambda: jobs.submit("wf", {}, user_id="u1", dedupe_key=""),
        lambda: jobs.submit("wf", {}, user_id="u1", tenant_id=""),
        lambda: jobs.claim(""),
        lambda: jobs.record(job.job_id, "w1", {"at": object()}),
        lambda: jobs.fail(job.job_id, "w1", ""),
        lambda: jobs.suspend(job.job_id, "w1", request_id="r", prompt="?", deadline=naive),
        lambda: jobs.suspend(job.job_id, "w1", request_id="r", prompt="?",
                             deadline=T0 - timedelta(seconds=1)),
        lambda: jobs.suspend(job.job_id, "w1", request_id="", prompt="?"),
        lambda: jobs.sweep(naive),
        lambda: jobs.events(job.job_id, after=-1),
        lambda: jobs.events(job.job_id, poll_interval=0),
        lambda: jobs.events(job.job_id, follow=True, poll_interval=float("nan")),
        lambda: jobs.events(job.job_id, follow=True, timeout=float("nan")),
        lambda: jobs.events(job.job_id, follow=True, timeout=float("inf")),
        lambda: jobs.list("paused"),
        lambda: jobs.list(5),  # type: ignore[arg-type]
        lambda: jobs.list([5]),  # type: ignore[list-item]
        lambda: jobs.events(job.job_id, follow=True, timeout=10**400),  # (OverflowError)
        lambda: jobs.events(job.job_id, follow=True, poll_interval=10**400),
        lambda: Jobs(job_store, lease=timedelta.max),  # (every claim overflowed the datetime)
        lambda: Jobs(job_store, lease=timedelta(days=36_526)),
        lambda: Jobs(job_store, clock=lambda: naive).submit("wf", {}, user_id="u1"),
        lambda: Jobs(job_store, max_attempts=True),
        lambda: jobs.events(job.job_id, after=True),
        lambda: jobs.events(job.job_id, follow="yes"),  # type: ignore[arg-type]
        lambda: jobs.events(job.job_id, follow=True, poll_interval=86_400),
        lambda: jobs.events(job.job_id, follow=True, timeout=True),
        lambda: jobs.cancel(job.job_id, 5),  # type: ignore[arg-type]
        lambda: jobs.resume(job.job_id, request_id="", input=1),
        lambda: jobs.list(limit="2"),  # type: ignore[arg-type]
        lambda: jobs.list(limit=True),
        # bad input is refused before the job's state is looked at
        lambda: jobs.submit("wf", {"x": object()}, user_id="u1", dedupe_key="open"),
        lambda: jobs.record(job.job_id, "w2", {"at": object()}),
        lambda: jobs.complete(job.job_id, "w2", object()),
        lambda: jobs.suspend(job.job_id, "w2", request_id="r", prompt=object()),
        lambda: jobs.resume(job.job_id, request_id="r", input=object()),
    ]
    for call in bad:
        with pytest.raises(InvalidArgument):
            call()
    assert job_store.stats()["events"] == written
    assert jobs.get(job.job_id).status == "running"


def test_list_takes_any_iterable_of_statuses(jobs: Jobs) -> None:
    """A set, a frozenset (the module's own TERMINAL), a list or a generator of statuses."""
    from projections.jobs import TERMINAL

    done = lifecycle(jobs)
    assert [j.job_id for j in jobs.list(TERMINAL)] == [done.job_id]
    assert [j.job_id for j in jobs.list({"completed"})] == [done.job_id]
    assert [j.job_id for j in jobs.list(s for s in ("completed",))] == [done.job_id]
    assert jobs.list(["failed", "cancelled"]) == []
    with pytest.raises(InvalidArgument):
        jobs.list(b"completed")  # type: ignore[arg-type]


def test_rows_equal_the_replayed_log(jobs: Jobs, job_store: EventStore, clock: Clock) -> None:
    """The inline rows equal a rebuild from the log and the live fold of each stream."""
    done = lifecycle(jobs)
    requeued = running(jobs, dedupe_key="k")
    clock.advance(minutes=2)
    jobs.sweep()
    assert verify(job_store, JobProjection()) == []
    for job_id in (done.job_id, requeued.job_id):
        live, _version = fold_live(job_store, JobProjection(), Jobs.stream_id(job_id),
                                  tenant_id="default", use_snapshots=False)
        assert live == jobs.get(job_id)


def test_job_times_come_from_the_facade_clock_not_the_store(url: str) -> None:
    """With the store on the real clock, start and request times still follow Jobs' clock."""
    clock = Clock(T0)
    with EventStore.open(url) as real_time_store:
        jobs = Jobs(real_time_store, clock=clock)
        job = jobs.submit("wf", {}, user_id="u")
        clock.advance(seconds=5)
        started = jobs.claim("w1")
        assert started is not None and started.started_at == clock.now
        clock.advance(seconds=5)
        suspended = jobs.suspend(job.job_id, "w1", request_id="r1", prompt="ok?")
        assert suspended.pending is not None and suspended.pending.requested_at == clock.now


def test_a_heartbeat_never_shortens_the_lease(jobs: Jobs, clock: Clock) -> None:
    """A worker whose clock stepped back heartbeats: the lease keeps its later end, so a
    sweeper with a right clock does not requeue the live job."""
    job = jobs.submit("wf", {}, user_id="u")
    assert jobs.claim("w1") is not None
    clock.advance(seconds=10)
    ends = jobs.heartbeat(job.job_id, "w1").lease_until
    assert ends == clock.now + LEASE
    clock.advance(minutes=-5)  # the worker's clock steps back
    assert jobs.heartbeat(job.job_id, "w1").lease_until == ends
    clock.advance(minutes=5, seconds=2)  # a sweep just after the earlier lease's end
    assert jobs.sweep() == [] and jobs.get(job.job_id).status == "running"


def test_the_facade_saves_no_snapshots_it_would_never_read(jobs: Jobs,
                                                           job_store: EventStore) -> None:
    """Jobs answers from rows, never from a live fold: a job of many events leaves no
    snapshots behind."""
    from sqlalchemy import select

    from eventstore._schema import snapshots

    job = running(jobs)
    for _ in range(120):
        jobs.heartbeat(job.job_id, "w1")
    with job_store.engine.connect() as c:
        assert c.execute(select(snapshots.c.version)).all() == []


# -- fields the fold keeps (added by mutation testing) --


def test_defaults_are_a_30_second_lease_and_3_attempts(job_store: EventStore,
                                                        clock: Clock) -> None:
    jobs = Jobs(job_store, clock=clock)
    job = jobs.submit("wf", {}, user_id="u1")
    assert job.max_attempts == 3
    claimed = jobs.claim("w1")
    assert claimed is not None and claimed.lease_until == T0 + timedelta(seconds=30)


def test_a_job_keeps_the_max_attempts_of_the_facade_that_submitted_it(
        job_store: EventStore, clock: Clock) -> None:
    once = Jobs(job_store, lease=LEASE, max_attempts=1, clock=clock)
    job = once.submit("wf", {}, user_id="u1")
    assert (job.max_attempts, once.get(job.job_id).max_attempts) == (1, 1)
    assert once.claim("w1") is not None
    clock.advance(seconds=31)
    (swept,) = Jobs(job_store, lease=LEASE, max_attempts=5, clock=clock).sweep()
    assert (swept.action, swept.reason) == ("failed", "worker lost")


def test_a_dedupe_key_s_job_id_is_its_hash_and_a_count(jobs: Jobs) -> None:
    import hashlib


    job = jobs.submit("wf", {}, user_id="u1", dedupe_key="order-7")
    digest = hashlib.sha256(b"order-7").hexdigest()[:24]
    assert (job.job_id, job.dedupe_key, dedupe_group("order-7")) == (
        f"{digest}-1", "order-7", digest)
    assert jobs.get(job.job_id).dedupe_key == "order-7"


def test_updated_at_is_the_time_of_the_last_change(jobs: Jobs, clock: Clock) -> None:
    job = jobs.submit("wf", {}, user_id="u1")
    assert job.updated_at == T0
    clock.advance(seconds=1)
    assert (c := jobs.claim("w1")) is not None and c.updated_at == clock.now
    clock.advance(seconds=1)
    assert jobs.heartbeat(job.job_id, "w1").updated_at == clock.now
    clock.advance(seconds=1)
    assert jobs.record(job.job_id, "w1", "half").updated_at == clock.now
    clock.advance(seconds=1)
    held = jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?")
    assert held.updated_at == clock.now
    assert held.pending is not None and (held.pending.worker_id,
                                         held.pending.requested_at) == ("w1", clock.now)
    clock.advance(seconds=1)
    assert jobs.resume(job.job_id, request_id="r1", input=1).updated_at == clock.now
    assert jobs.get(job.job_id).updated_at == clock.now


def test_a_requeued_job_has_no_owner_and_queues_behind_jobs_that_waited_longer(
        jobs: Jobs, clock: Clock) -> None:
    lost = running(jobs)
    clock.advance(seconds=10)
    waiting = jobs.submit("wf", {}, user_id="u1")
    when = T0 + timedelta(seconds=40)  # a sweep at a time of its own, not the clock's
    assert [s.job_id for s in jobs.sweep(when)] == [lost.job_id]
    again = jobs.get(lost.job_id)
    assert (again.status, again.worker_id, again.lease_until, again.queued_at, again.lost) == (
        "queued", None, None, when, 1)
    assert [j.job_id for j in (jobs.claim("w2"), jobs.claim("w3")) if j] == [
        waiting.job_id, lost.job_id]


def test_a_finished_job_holds_no_lease_or_request_and_has_its_finish_time(
        jobs: Jobs, clock: Clock) -> None:
    failed = running(jobs)
    cancelled = running(jobs, "w2")
    doomed = running(jobs, "w3")
    asked = running(jobs, "w4")
    jobs.suspend(doomed.job_id, "w3", request_id="r1", prompt="?",
                 deadline=T0 + timedelta(minutes=1))
    jobs.suspend(asked.job_id, "w4", request_id="r1", prompt="?")
    clock.advance(seconds=5)
    done = [jobs.fail(failed.job_id, "w1", "boom"), jobs.cancel(cancelled.job_id),
            jobs.cancel(asked.job_id)]
    when = T0 + timedelta(minutes=5)  # a sweep at a time of its own, not the clock's
    assert [s.job_id for s in jobs.sweep(when)] == [doomed.job_id]
    done.append(jobs.get(doomed.job_id))
    assert [(j.status, j.lease_until, j.pending, j.finished_at) for j in done] == [
        ("failed", None, None, T0 + timedelta(seconds=5)),
        ("cancelled", None, None, T0 + timedelta(seconds=5)),
        ("cancelled", None, None, T0 + timedelta(seconds=5)),
        ("failed", None, None, when)]
    assert [jobs.get(j.job_id) for j in done] == done
    assert list(jobs.events(failed.job_id))[-1].data.worker_id == "w1"  # type: ignore[union-attr]


@pytest.mark.parametrize("end", ["cancel", "fail"])
def test_events_follow_ends_after_a_cancel_or_a_failure(jobs: Jobs, end: str) -> None:
    job = running(jobs)
    if end == "cancel":
        jobs.cancel(job.job_id)
    else:
        jobs.fail(job.job_id, "w1", "boom")
    started = time.monotonic()
    seen = [e.type for e in jobs.events(job.job_id, follow=True, timeout=10,
                                        poll_interval=0.01)]
    assert seen[-1] == {"cancel": "JobCancelled", "fail": "JobFailed"}[end]
    assert time.monotonic() - started < 5


def test_heartbeat_times_follow_the_jobs_clock(url: str, clock: Clock) -> None:
    with EventStore.open(url) as real_time_store:
        jobs = Jobs(real_time_store, lease=LEASE, clock=clock)
        job = running(jobs)
        clock.advance(seconds=5)
        beat = jobs.heartbeat(job.job_id, "w1")
        assert beat.updated_at == clock.now == list(jobs.events(job.job_id))[-1].at


def test_expiry_is_strictly_after_the_lease_end_and_the_deadline(jobs: Jobs,
                                                                 clock: Clock) -> None:
    held = running(jobs)
    jobs.suspend(held.job_id, "w1", request_id="r1", prompt="?",
                 deadline=T0 + timedelta(seconds=30))
    other = running(jobs, "w2")
    asked = running(jobs, "w3")
    jobs.suspend(asked.job_id, "w3", request_id="r1", prompt="?",
                 deadline=T0 + timedelta(seconds=30))
    clock.now = T0 + LEASE  # the instant other's lease ends and both deadlines are due
    assert other.lease_until == clock.now
    assert jobs.sweep() == []
    assert jobs.resume(held.job_id, request_id="r1", input=1).status == "queued"
    assert jobs.cancel(asked.job_id, "no").status == "cancelled"
    assert jobs.get(other.job_id).status == "running"


def test_resume_of_a_finished_job_says_its_status(jobs: Jobs) -> None:
    done = running(jobs)
    jobs.complete(done.job_id, "w1")
    failed = running(jobs)
    jobs.fail(failed.job_id, "w1", "boom")
    for job_id, status in ((done.job_id, "completed"), (failed.job_id, "failed")):
        with pytest.raises(Conflict) as e:
            jobs.resume(job_id, request_id="r1", input=1)
        assert e.value.reason == status


def test_cancel_of_a_resumed_job_a_sweep_requeued_is_a_plain_cancel(jobs: Jobs,
                                                                    clock: Clock) -> None:
    job = running(jobs)
    jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?")
    jobs.resume(job.job_id, request_id="r1", input="yes")
    assert jobs.claim("w2") is not None
    clock.advance(seconds=31)
    assert [s.action for s in jobs.sweep()] == ["requeued"]
    assert jobs.cancel(job.job_id, "stop").status == "cancelled"


def test_attempts_a_resume_took_do_not_count_as_lost_leases(job_store: EventStore,
                                                            clock: Clock) -> None:
    jobs = Jobs(job_store, lease=LEASE, max_attempts=2, clock=clock)
    job = running(jobs)
    jobs.suspend(job.job_id, "w1", request_id="r1", prompt="?")
    jobs.resume(job.job_id, request_id="r1", input="yes")
    claimed = jobs.claim("w2")
    assert claimed is not None and claimed.attempt == 2
    clock.advance(seconds=31)
    assert [(s.action, s.attempt) for s in jobs.sweep()] == [("requeued", 2)]
    jobs.claim("w3")
    clock.advance(seconds=31)
    assert [(s.action, s.reason) for s in jobs.sweep()] == [("failed", "worker lost")]
    final = list(jobs.events(job.job_id))[-1]
    assert (final.type, final.data.worker_id) == ("JobFailed", "w3")  # type: ignore[union-attr]


def test_events_follow_takes_a_timeout_from_0_to_a_century(jobs: Jobs) -> None:
    job = running(jobs)
    assert [e.seq for e in jobs.events(job.job_id, follow=True, timeout=0)] == [1, 2]
    jobs.complete(job.job_id, "w1")
    century = 36_525 * 86_400
    assert [e.seq for e in jobs.events(job.job_id, follow=True, timeout=century)] == [1, 2, 3]


def test_events_follow_never_sleeps_past_its_timeout(jobs: Jobs) -> None:
    job = running(jobs)
    started = time.monotonic()
    assert len(list(jobs.events(job.job_id, follow=True, timeout=0.05, poll_interval=30))) == 2
    assert time.monotonic() - started < 10


def test_list_is_in_submission_order_and_takes_a_limit(jobs: Jobs, clock: Clock) -> None:
    first = running(jobs)
    jobs.suspend(first.job_id, "w1", request_id="r1", prompt="?")
    clock.advance(seconds=1)
    second = jobs.submit("wf", {}, user_id="u1")
    clock.advance(seconds=1)
    jobs.resume(first.job_id, request_id="r1", input=1)  # queued again after the second
    ties = sorted(jobs.submit("wf", {}, user_id="u1").job_id for _ in range(4))
    ids = [first.job_id, second.job_id, *ties]
    assert [j.job_id for j in jobs.list()] == ids
    assert [j.job_id for j in jobs.list("queued", limit=2)] == ids[:2]
    assert jobs.list(limit=0) == []
