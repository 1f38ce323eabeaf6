"""Flask's habit for logs nobody configured: records at INFO and above still reach standard error.

Flask gives ``app.logger`` a stream handler unless a handler already takes records
at the logger's level (``flask.logging.has_level_handler``). The controller does the
same for its own records and for the records its task processes send, with two
differences: the check is made for each record when it is emitted, so an app that
configures logging after creating its controllers (``logging.basicConfig`` under the
``__main__`` guard, say) gets nothing extra from then on; and while no handler takes
them, records at INFO are printed too (not only from WARNING, Python's default
level), so task start and end lines and a task's own ``logger.info`` are seen, as
they were with upstream 0.1. No handler is ever added to the app's loggers.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Optional, TextIO, Union

#: Records below this level are never printed by the fallback.
CONSOLE_LEVEL = logging.INFO

#: Format of the lines the fallback prints.
CONSOLE_FORMAT = "[%(asctime)s] %(levelname)s in %(name)s [%(processName)s:%(process)d]: %(message)s"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a test may have replaced it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # StreamHandler.__init__ assigns it; the property always answers sys.stderr


_handler = _StderrHandler()
_handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))


def has_level_handler(logger: logging.Logger) -> bool:
    """Whether a handler on ``logger`` or the loggers it propagates to takes its effective level.

    Flask's function of the same name: Python's last-resort handler does not count.
    """
    level = logger.getEffectiveLevel()
    current: Optional[logging.Logger] = logger
    while current is not None:
        if any(handler.level <= level for handler in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def _printed(level: int) -> bool:
    return level >= CONSOLE_LEVEL and logging.root.manager.disable < level


def handle(logger: logging.Logger, record: logging.LogRecord) -> None:
    """Hand a finished record (from a task process) to ``logger``, or to the fallback if nothing takes it."""
    if has_level_handler(logger):
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
    elif _printed(record.levelno):
        _handler.handle(record)


def child_root_level() -> int:
    """The root level a task process should log at, so that the fallback sees what it would print."""
    root = logging.getLogger()
    if has_level_handler(root):
        return root.level
    return min(root.level, CONSOLE_LEVEL)


class ConsoleFallbackLogger(logging.Logger):
    """A stand-in for ``logger`` that prints INFO and above itself while no handler would take them.

    Once a handler of the app takes a record, the record is handled by ``logger``
    exactly as if it had been logged there (its level, filters and handlers).
    Levels, handlers and filters set on the stand-in are set on ``logger``.

    .. versionadded:: 0.3
    """

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger.name)
        #: The app's logger this one stands in for.
        self.wrapped = logger
        self.parent = logger  # getEffectiveLevel() and hasHandlers() answer for the app's logger

    def isEnabledFor(self, level: int) -> bool:
        if has_level_handler(self.wrapped):
            return self.wrapped.isEnabledFor(level)
        return _printed(level)

    def handle(self, record: logging.LogRecord) -> None:
        handle(self.wrapped, record)

    def setLevel(self, level: Union[int, str]) -> None:
        self.wrapped.setLevel(level)

    def addHandler(self, hdlr: logging.Handler) -> None:
        self.wrapped.addHandler(hdlr)

    def removeHandler(self, hdlr: logging.Handler) -> None:
        self.wrapped.removeHandler(hdlr)

    def addFilter(self, filter: Any) -> None:  # noqa: A002 - logging's parameter name
        self.wrapped.addFilter(filter)

    def removeFilter(self, filter: Any) -> None:  # noqa: A002 - logging's parameter name
        self.wrapped.removeFilter(filter)


def console_aware(logger: logging.Logger) -> logging.Logger:
    """``logger`` wrapped in a :class:`ConsoleFallbackLogger` (unless it already is one)."""
    if isinstance(logger, ConsoleFallbackLogger) or not isinstance(logger, logging.Logger):
        return logger
    return ConsoleFallbackLogger(logger)
