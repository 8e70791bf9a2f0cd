"""Projections of the agent-state domain, and the engine that runs them.

``Conversations`` keeps conversation variables; the engine (``Projection``, ``Projector``,
``rebuild``, ``verify``) runs any fold live, inline or from a projector.
"""

from ._engine import (
    Difference,
    Projection,
    ProjectionFailed,
    ProjectionStatus,
    Projector,
    RowIndex,
    fold_live,
    inline,
    rebuild,
    register,
    registered,
    restart,
    status,
    verify,
)
from .conversation import ConversationProjection, Conversations, ConversationState, VariableChange

__all__ = [
    "ConversationProjection",
    "ConversationState",
    "Conversations",
    "Difference",
    "Projection",
    "ProjectionFailed",
    "ProjectionStatus",
    "Projector",
    "RowIndex",
    "VariableChange",
    "fold_live",
    "inline",
    "rebuild",
    "register",
    "registered",
    "restart",
    "status",
    "verify",
]
