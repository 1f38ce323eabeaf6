"""The messages between a controlling thread and its task process, and the one error record type.

Each message is a small frozen dataclass, pickled over the task's channel. Commands go to the
task process (:class:`RunTask`, :class:`StopTask`, :class:`Exit`, and :class:`StateSaved` answering a
:class:`SaveState`); reports come back (:class:`Progress`, :class:`Percent`, :class:`LogRecordMessage`,
:class:`SaveState`, and once per task :class:`Done`).
"""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional, TypedDict, Union

from .. import defaults


class ErrorRecord(TypedDict):
    """Why a task failed, as data: it crosses processes, the store and HTTP in this shape."""

    type: str
    message: str
    traceback: Optional[str]


def error_record(kind: str, message: str, tb: Optional[str] = None) -> ErrorRecord:
    """Build an :class:`ErrorRecord`."""
    return {"type": kind, "message": message, "traceback": tb}


def exception_record(exc: BaseException) -> ErrorRecord:
    """The :class:`ErrorRecord` of an exception being handled (its traceback included)."""
    kind = type(exc)
    if kind.__module__ in ("builtins", "__main__"):
        name = kind.__qualname__
    else:
        name = f"{kind.__module__}.{kind.__qualname__}"
    return error_record(name, str(exc), traceback.format_exc())


# -- commands to the task process -------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """Sizes a task's reports may have, in bytes of JSON."""

    result_bytes: int
    progress_bytes: int
    state_bytes: int = defaults.MAX_STATE_SIZE


@dataclass(frozen=True)
class RunTask:
    """Run one task: ``execute(**args)`` with ``context``, logging at the server's ``levels``.

    ``state`` is what an earlier attempt of the task saved (``self.state``), None when nothing was.
    """

    uuid: str
    args: dict[str, Any]
    context: dict[str, Any]
    levels: dict[str, int]
    limits: Limits
    state: Any = None


@dataclass(frozen=True)
class StopTask:
    """Make the next ``checkpoint()`` of task ``uuid`` raise (None: of whichever task runs)."""

    uuid: Optional[str]


@dataclass(frozen=True)
class Exit:
    """Leave the task loop: the process is retired."""


@dataclass(frozen=True)
class StateSaved:
    """The answer to :class:`SaveState` number ``number`` of task ``uuid``: ``stored`` says whether the
    store now holds it (False: the task is no longer this server's, or the store failed)."""

    uuid: str
    number: int
    stored: bool


Command = Union[RunTask, StopTask, Exit, StateSaved]


# -- reports from the task process ------------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    """The latest ``upload_status`` value of task ``uuid``."""

    uuid: Optional[str]
    value: Any


@dataclass(frozen=True)
class Percent:
    """The latest ``percent`` of task ``uuid`` (from ``track``)."""

    uuid: Optional[str]
    value: float


@dataclass(frozen=True)
class SaveState:
    """Store ``state_json`` (checked JSON text) as task ``uuid``'s saved state, then answer
    :class:`StateSaved` with the same ``number``."""

    uuid: str
    number: int
    state_json: str


@dataclass(frozen=True)
class Output:
    """Lines task ``uuid`` (or a process it started) wrote to its standard output or error."""

    uuid: str
    lines: list[str]


@dataclass(frozen=True)
class LogRecordMessage:
    """A log record prepared by the task process's QueueHandler."""

    record: logging.LogRecord


@dataclass(frozen=True)
class Usage:
    """What the task used, measured by the task process itself."""

    cpu_time: float = 0.0
    maxrss: int = 0
    #: Pids of the task process's live children when the task ended; None where unknown.
    children: Optional[list[int]] = field(default=None)


@dataclass(frozen=True)
class Done:
    """Task ``uuid`` ended in the task process.

    ``kind`` is ``ok`` (``result_json`` holds the result as JSON text), ``error``
    (``error`` says what failed) or ``aborted`` (it stopped at a checkpoint). ``retryable``
    says whether an exception raised by ``execute`` matches the task class's ``retry_on``.
    """

    uuid: str
    kind: str
    result_json: Optional[str] = None
    error: Optional[ErrorRecord] = None
    usage: Usage = field(default_factory=Usage)
    retryable: bool = False


Report = Union[Progress, Percent, LogRecordMessage, Output, SaveState, Done]
