"""The event catalogue of the agent-state domain: every event type, with what it records.

Tags are stable names (past-tense facts) and never change; a new field always gets a default, so
events written today stay readable after fields are added (msgspec's evolution rules).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import msgspec

from eventstore import Event

from .typed_json import check_typed

# -- conversations: variables a workflow assigns ------------------------------------------------


class VariableValue(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One variable's new value and its value type (``string``, ``integer``, ``object`` …)."""

    name: str
    value: Any
    value_type: str


class VariablesAssigned(Event, tag="VariablesAssigned"):
    """A workflow node set conversation variables: added when new, overwritten when present."""

    conversation_id: str
    variables: list[VariableValue]
    workflow_run_id: str | None = None
    node_id: str | None = None


class VariablesReset(Event, tag="VariablesReset"):
    """Variables were put back to their default values (the values carried here)."""

    conversation_id: str
    variables: list[VariableValue]
    workflow_run_id: str | None = None
    node_id: str | None = None


class VariablesDeleted(Event, tag="VariablesDeleted"):
    """Variables were removed from the conversation."""

    conversation_id: str
    names: list[str]
    workflow_run_id: str | None = None
    node_id: str | None = None


# -- tool-call continuations: a paused agent waiting for approval or client tools -----------------


class ToolCallsPaused(Event, tag="ToolCallsPaused"):
    """The engine paused on tool calls; the whole execution state to resume with is kept."""

    conversation_id: str
    user_id: str
    pause_id: str
    messages: list[Any]
    pending_tool_calls: list[Any]
    tools: list[Any]
    tool_schemas: list[Any]
    agent_config: dict[str, Any]
    expires_at: datetime
    client_tools: list[Any] | None = None
    # When the facade's clock says it paused (older events: their recorded_at).
    paused_at: datetime | None = None
    # The pause's time to live, which a release or a reverted claim starts afresh (older
    # events: the facade's default).  In JSON an ISO 8601 duration, e.g. "PT1800S".
    ttl: timedelta | None = None


class ResumeStarted(Event, tag="ResumeStarted"):
    """A resumer claimed the pending pause (pending -> resuming)."""

    pause_id: str
    claim_id: str
    claimed_at: datetime


class ToolCallsResumed(Event, tag="ToolCallsResumed"):
    """The resumer delivered the tool results; the continuation is consumed."""

    pause_id: str
    claim_id: str
    tool_results: list[Any]


class ResumeReleased(Event, tag="ResumeReleased"):
    """The resumer gave the claim back (resuming -> pending) with a fresh time to live."""

    pause_id: str
    claim_id: str
    expires_at: datetime
    error: str | None = None


class ResumeTimedOut(Event, tag="ResumeTimedOut"):
    """A claim outlived the claim timeout (the resumer died); the pause is pending again."""

    pause_id: str
    claim_id: str
    expires_at: datetime


class ContinuationExpired(Event, tag="ContinuationExpired"):
    """A pending pause outlived its time to live and can no longer be resumed."""

    pause_id: str
    expired_at: datetime


# -- agent sessions: snapshots carried between runs of one node -----------------------------------


class SessionSnapshotSaved(Event, tag="SessionSnapshotSaved"):
    """An agent run saved its session snapshot and the specs to rebuild its composition."""

    tenant_id: str
    workflow_run_id: str
    node_id: str
    binding_id: str
    agent_id: str
    snapshot: Any
    layer_specs: Any
    saved_at: datetime
    pending_form_id: str | None = None
    pending_tool_call_id: str | None = None


class SessionRetired(Event, tag="SessionRetired"):
    """The session may not be resumed any more (failed or cancelled run, or the run ended)."""

    reason: str
    retired_at: datetime


# -- background jobs -------------------------------------------------------------------------------


class JobSubmitted(Event, tag="JobSubmitted"):
    """A job to run a workflow in the background was queued."""

    job_id: str
    workflow_id: str
    inputs: Any
    user_id: str
    submitted_at: datetime
    dedupe_key: str | None = None
    max_attempts: int = 3


class JobClaimed(Event, tag="JobClaimed"):
    """A worker took the job with a lease (queued -> running)."""

    worker_id: str
    attempt: int
    lease_until: datetime
    at: datetime | None = None  # added later: older events use their recorded_at


class JobHeartbeat(Event, tag="JobHeartbeat"):
    """The owning worker extended its lease."""

    worker_id: str
    lease_until: datetime
    at: datetime | None = None  # added later: older events use their recorded_at


class MilestoneRecorded(Event, tag="MilestoneRecorded"):
    """The owning worker reported durable progress."""

    worker_id: str
    milestone: Any
    at: datetime


class JobSuspended(Event, tag="JobSuspended"):
    """The job waits for human input (running -> suspended); the lease is given up."""

    worker_id: str
    request_id: str
    prompt: Any
    deadline: datetime | None = None
    at: datetime | None = None  # added later: older events use their recorded_at


class JobResumed(Event, tag="JobResumed"):
    """Input for the pending request arrived (suspended -> queued, to be claimed again)."""

    request_id: str
    input: Any
    at: datetime


class JobRequeued(Event, tag="JobRequeued"):
    """The job's lease expired and it was put back in the queue for another attempt."""

    reason: str
    at: datetime


class JobCompleted(Event, tag="JobCompleted"):
    """The job finished successfully (terminal)."""

    worker_id: str
    at: datetime
    result: Any = None


class JobFailed(Event, tag="JobFailed"):
    """The job failed (terminal): an error, a lost worker past max attempts, or a deadline."""

    error: str
    at: datetime
    worker_id: str | None = None


class JobCancelled(Event, tag="JobCancelled"):
    """The job was cancelled (terminal)."""

    at: datetime
    reason: str | None = None


# -- flows: state saved after each step, and human feedback ---------------------------------------


class FlowStateSaved(Event, tag="FlowStateSaved"):
    """A flow step completed; the flow's whole state after it (type-tagged JSON)."""

    flow_id: str
    method_name: str
    state: Any
    at: datetime

    def __check_appended__(self) -> None:
        check_typed(self.state, "FlowStateSaved.state")


class FeedbackRequested(Event, tag="FeedbackRequested"):
    """The flow paused for human feedback."""

    flow_id: str
    context: Any
    state: Any
    at: datetime

    def __check_appended__(self) -> None:
        check_typed(self.context, "FeedbackRequested.context")
        check_typed(self.state, "FeedbackRequested.state")


class FeedbackResolved(Event, tag="FeedbackResolved"):
    """The pending feedback was answered; the flow may go on."""

    flow_id: str
    feedback: Any
    at: datetime

    def __check_appended__(self) -> None:
        check_typed(self.feedback, "FeedbackResolved.feedback")
