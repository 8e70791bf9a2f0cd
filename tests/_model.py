"""What the model tests share: the refusal a model predicts, and what the README's limits let
through."""

from __future__ import annotations

from typing import Any


def is_text(value: Any) -> bool:
    """A string JSON can hold (no lone surrogate)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_id(value: Any, limit: int = 255) -> bool:
    """An id: non-empty text of at most ``limit`` characters, with no NUL."""
    return is_text(value) and 0 < len(value) <= limit and "\x00" not in value


class Refused(Exception):
    """What a model expects a refused call to raise: the error type and, where the error has
    one, its ``reason``."""

    def __init__(self, kind: type[Exception], reason: str | None = None) -> None:
        super().__init__(kind.__name__, reason)
        self.kind = kind
        self.reason = reason
