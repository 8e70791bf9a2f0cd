"""Commit a change from another store between the statements of a read (PostgreSQL reads run
in autocommit, each statement on a snapshot of its own; SQLite's read is one transaction)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event


class AfterFirstStatement:
    """Run ``change`` once, after the next statement ``engine`` sends (its result is read on
    the snapshot it took; whatever the read sends next sees ``change`` committed).  Use as a
    context manager around the read; ``ran`` says whether it did run."""

    def __init__(self, engine: Engine, change: Callable[[], None]) -> None:
        self.engine, self.change, self.ran = engine, change, False

    def _after(self, *_args: Any) -> None:
        if not self.ran:
            self.ran = True
            self.change()

    def __enter__(self) -> AfterFirstStatement:
        event.listen(self.engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "after_cursor_execute", self._after)
