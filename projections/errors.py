"""Errors of the agent-state facades: every refused transition says why."""

from __future__ import annotations

from eventstore.errors import EventStoreError

__all__ = ["Conflict", "LeaseLost", "NoPendingContinuation", "NoPendingFeedback", "NotFound",
           "ProjectionStopped", "RebuildInProgress", "ResumeInProgress"]


class Conflict(EventStoreError):
    """A state transition was refused because the state does not allow it; ``reason`` says why."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotFound(Conflict):
    """The entity does not exist (for this tenant)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="not_found")


class ResumeInProgress(Conflict):
    """Another resumer already claimed the continuation."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="resuming")


class NoPendingContinuation(Conflict):
    """No pending continuation: ``reason`` is ``absent``, ``expired`` or ``consumed``; or, for
    ``complete`` and ``release``, ``not_claimed``: the pause is pending, not being resumed (its
    claim was released, or timed out and a sweep put it back)."""


class RebuildInProgress(Conflict):
    """Another process is rebuilding the projection (``reason``: ``rebuilding``); its rows are
    swapped in when it is done."""


class ProjectionStopped(EventStoreError):
    """An append to the categories of an inline projection that is stopped after a failure:
    refused until an operator restarts it (``projections restart NAME``), so that its rows never
    go on past the event they failed on.  ``projection`` names it; ``projections status``
    shows where and why it failed."""

    def __init__(self, message: str, *, projection: str) -> None:
        super().__init__(message)
        self.projection = projection


class LeaseLost(Conflict):
    """The worker no longer owns the job: ``reason`` is the job's status, ``other_worker``, or
    ``other_attempt`` (the call named an attempt the job has left)."""


class NoPendingFeedback(Conflict, ValueError):
    """The flow has no pending feedback request (none, or already resolved).

    Also a ``ValueError``, as CrewAI's "No pending feedback found" is (``Flow.from_pending``
    raises that one itself: ``EventStoreFlowPersistence.load_pending_feedback`` returns
    ``None`` when there is nothing to claim)."""
