"""What the README's limits let through, for the model tests' predictions."""

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
