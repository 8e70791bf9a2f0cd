"""The library's loggers: structlog, silent until the application configures structlog.

The library never configures logging and never prints.  An unconfigured structlog would print
every line to stdout, so these loggers stay silent until ``structlog.is_configured()``; from then
on each call goes to ``structlog.get_logger(name)`` with the bound context, and callers' context
(``structlog.contextvars.bound_contextvars``) is merged by the application's processors as usual.
"""

from __future__ import annotations

from typing import Any

import structlog

__all__ = ["get_logger"]


def _config_key() -> tuple[int, ...] | None:
    """Identifies structlog's current configuration (None if it cannot be told)."""
    try:
        c = structlog._config._CONFIG
        return (id(c.default_processors), id(c.default_wrapper_class), id(c.logger_factory),
                id(c.default_context_class))
    except AttributeError:  # pragma: no cover - another structlog layout: no caching
        return None


class Logger:
    """A structlog logger that emits only once the application has configured structlog.

    The concrete logger is built once per configuration (structlog's lazy proxy would build one
    on every call, which cost more than a filtered-out debug line on the append path).
    """

    __slots__ = ("_cached", "_context", "_key", "_name")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = context or {}
        self._cached: Any = None
        self._key: tuple[int, ...] | None = None

    def bind(self, **kwargs: Any) -> Logger:
        return Logger(self._name, {**self._context, **kwargs})

    def _emit(self, level: str, event: str, kwargs: dict[str, Any]) -> None:
        if not structlog.is_configured():
            return
        key = _config_key()
        logger = self._cached
        if key is None or key != self._key or logger is None:
            logger = structlog.get_logger(self._name).bind()
            self._cached, self._key = logger, key
        # A key given on the line replaces the same key bound on the logger (as structlog's
        # own bind does), rather than failing as a repeated keyword argument.
        getattr(logger, level)(event, **({**self._context, **kwargs} if self._context
                                         else kwargs))

    def debug(self, event: str, **kwargs: Any) -> None:
        self._emit("debug", event, kwargs)

    def info(self, event: str, **kwargs: Any) -> None:
        self._emit("info", event, kwargs)

    def warning(self, event: str, **kwargs: Any) -> None:
        self._emit("warning", event, kwargs)

    def error(self, event: str, **kwargs: Any) -> None:
        self._emit("error", event, kwargs)


def get_logger(name: str) -> Logger:
    """The logger for ``name`` (``eventstore``, ``eventstore.projections`` …)."""
    return Logger(name)
