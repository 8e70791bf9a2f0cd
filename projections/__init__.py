"""Projections of the agent-state domain, and the engine that runs them.

Facades: ``Conversations`` (variables), ``Continuations`` (tool-call pauses and resumes),
``AgentSessions`` (session snapshots), ``Jobs`` (durable background jobs), ``Flows`` (flow state
and human feedback).  The engine (``Projection``, ``Projector``, ``rebuild``, ``verify``) runs
any fold live, inline or from a projector.
"""

from ._engine import (
    Difference,
    Projection,
    ProjectionFailed,
    ProjectionStatus,
    Projector,
    RowIndex,
    UndecodableRow,
    current,
    fold_live,
    inline,
    load_row,
    query_rows,
    rebuild,
    register,
    registered,
    restart,
    snapshot_now,
    status,
    verify,
)
from .continuations import Continuation, Continuations
from .conversation import ConversationProjection, Conversations, ConversationState, VariableChange
from .errors import (
    Conflict,
    LeaseLost,
    NoPendingContinuation,
    NoPendingFeedback,
    NotFound,
    ProjectionStopped,
    ResumeInProgress,
)
from .flows import Flows, PendingFeedback
from .jobs import Job, JobEvent, Jobs
from .sessions import AgentSessions, SessionKey, SessionSnapshot

__all__ = [
    "AgentSessions",
    "Conflict",
    "Continuation",
    "Continuations",
    "Flows",
    "Job",
    "JobEvent",
    "Jobs",
    "LeaseLost",
    "NoPendingContinuation",
    "NoPendingFeedback",
    "NotFound",
    "PendingFeedback",
    "ResumeInProgress",
    "SessionKey",
    "SessionSnapshot",
    "ConversationProjection",
    "ConversationState",
    "Conversations",
    "Difference",
    "Projection",
    "ProjectionFailed",
    "ProjectionStatus",
    "ProjectionStopped",
    "Projector",
    "RowIndex",
    "UndecodableRow",
    "VariableChange",
    "current",
    "fold_live",
    "inline",
    "load_row",
    "query_rows",
    "rebuild",
    "register",
    "registered",
    "restart",
    "snapshot_now",
    "status",
    "verify",
]
