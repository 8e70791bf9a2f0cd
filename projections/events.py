"""The event catalogue of the agent-state domain: every event type, with what it records.

Tags are stable names (past-tense facts) and never change; a new field always gets a default, so
events written today stay readable after fields are added (msgspec's evolution rules).
"""

from __future__ import annotations

from typing import Any

import msgspec

from eventstore import Event

# -- conversations: variables a workflow assigns ------------------------------------------------


class VariableValue(msgspec.Struct, frozen=True, kw_only=True):
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
