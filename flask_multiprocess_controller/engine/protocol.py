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


#: Types of the errors the package itself records (a crash, a timeout...): their messages are its own
#: sentences, holding no exception text, so ``expose_errors=False`` leaves them shown.
OWN_ERROR_TYPES = frozenset({"ProcessDied", "TaskTimeout", "MemoryLimitExceeded", "ResultTooLarge", "Shutdown",
                             "Killed", "Lost"})


def error_record(kind: str, message: str, tb: Optional[str] = None) -> ErrorRecord:
    """Build an :class:`ErrorRecord`."""
    return {"type": kind, "message": message, "traceback": tb}


def clip_text(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, saying so at its end (whole when it fits).

    .. versionadded:: 0.3
    """
    if len(text) * 4 <= limit:  # fits whatever its characters are: no encoding needed
        return text
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    marker = f"… [clipped: {len(data)} bytes in all]"
    keep = max(0, limit - len(marker.encode("utf-8")))
    return data[:keep].decode("utf-8", "ignore") + marker[:limit]


def clip_traceback(tb: Optional[str], message: str, clipped: str, limit: int) -> Optional[str]:
    """A traceback's text with its exception's message as clipped, then at most ``limit`` bytes: its head
    and its tail (where the innermost frames and the exception are), the middle left out."""
    if tb is None:
        return None
    if clipped != message and message:
        tb = tb.replace(message, clipped)
    if len(tb) * 4 <= limit or len(tb.encode("utf-8", "replace")) <= limit:
        return tb
    half = limit // 2 - 40
    data = tb.encode("utf-8", "replace")
    return (data[:half].decode("utf-8", "ignore") + f"\n… [clipped: {len(data)} bytes in all] …\n"
            + data[-half:].decode("utf-8", "ignore"))


def clip_error(error: ErrorRecord, limit: int) -> ErrorRecord:
    """``error`` with its message clipped to ``limit`` bytes, and its traceback bounded too (see
    :data:`~.defaults.MAX_TRACEBACK_SIZE`): the store never holds an unbounded message.

    .. versionadded:: 0.3
    """
    message = str(error.get("message") or "")
    clipped = clip_text(message, limit)
    tb = error.get("traceback")
    bounded = clip_traceback(tb, message, clipped, max(limit, defaults.MAX_TRACEBACK_SIZE))
    if clipped is message and bounded is tb:
        return error
    return {**error, "message": clipped, "traceback": bounded}


def exception_record(exc: BaseException, message_limit: int = defaults.MAX_MESSAGE_SIZE) -> ErrorRecord:
    """The :class:`ErrorRecord` of an exception being handled (its traceback included), its message clipped
    to ``message_limit`` bytes."""
    kind = type(exc)
    if kind.__module__ in ("builtins", "__main__") and kind.__qualname__ not in OWN_ERROR_TYPES:
        name = kind.__qualname__
    else:
        name = f"{kind.__module__}.{kind.__qualname__}"
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ fails is still a failure to record
        message = f"<{name} whose message could not be made>"
    return clip_error(error_record(name, message, traceback.format_exc()), message_limit)


# -- commands to the task process -------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """Sizes a task's reports may have, in bytes of JSON."""

    result_bytes: int
    progress_bytes: int
    state_bytes: int = defaults.MAX_STATE_SIZE
    #: Bytes (UTF-8) of an error's message that are kept.
    message_bytes: int = defaults.MAX_MESSAGE_SIZE
    #: Bytes one artifact may take, and how many a task may keep (see :mod:`..artifacts`).
    artifact_bytes: int = defaults.MAX_ARTIFACT_SIZE
    artifact_count: int = defaults.MAX_ARTIFACTS
    #: Where artifacts are kept (an absolute directory or a ``file://`` URL; "": the task saves none).
    artifacts_url: str = ""


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
    #: Seconds between two :class:`Progress` messages of the task at least (the latest value wins): the
    #: serving process writes progress no more often than that (its ``progress_flush``), so sending it
    #: more often only wakes the serving process for values it overwrites unwritten.
    progress_every: float = defaults.PUBLISH_INTERVAL
    #: Write progress to the process's shared buffer (see :mod:`.progressbuffer`), sending a message now and
    #: then only: the serving process reads the buffer at its flush interval.
    progress_buffer: bool = False


@dataclass(frozen=True)
class StopTask:
    """Make the next ``checkpoint()`` of task ``uuid`` raise (None: of whichever task runs); with ``finish``, raise
    ``FinishRequested``: the task is to return its best answer so far."""

    uuid: Optional[str]
    finish: bool = False


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
    #: The task process's descriptor of its progress buffer, where its later values are (None: it has none,
    #: they come as messages).
    buffer_fd: Optional[int] = None


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
    #: The task's artifacts when the attempt ended (see :mod:`..artifacts`); None: it never touched them.
    artifacts: Optional[list[dict[str, Any]]] = None


Report = Union[Progress, Percent, LogRecordMessage, Output, SaveState, Done]
