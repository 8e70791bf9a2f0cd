"""Event types shared by tests and their worker processes (importable under spawn)."""

from __future__ import annotations

from typing import Any

from eventstore import Event


class NoteAdded(Event, tag="test.NoteAdded"):
    text: str


class CounterIncremented(Event, tag="test.CounterIncremented"):
    by: int = 1
    writer: str = ""


class Blob(Event, tag="test.Blob"):
    payload: str


class Anything(Event, tag="test.Anything"):
    value: Any = None
