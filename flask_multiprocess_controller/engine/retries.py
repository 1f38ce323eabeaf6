"""Retries: a failed attempt of a task runs again, after a growing pause, while its class allows.

A task class says how with four attributes (see :class:`~.task.MetaMPTask`): ``max_retries``
(default 0: never), ``retry_backoff`` (seconds before the first retry; each further retry waits
twice as long), ``retry_backoff_max`` (the longest pause) and ``retry_on`` (the exception types
that are retried; None: any exception ``execute`` raises). The pause has jitter: it is drawn
between half and all of the exponential value, so that tasks failing together do not all come
back at the same moment.

Only failures are retried. An exception from ``execute`` is matched against ``retry_on`` in the
task process, where the exception object exists (subclasses match). A crash, a timeout or the
memory limit is retried only when ``retry_on`` names its type (:class:`~.exceptions.ProcessDied`,
:class:`~.exceptions.TaskTimeout`, :class:`~.exceptions.MemoryLimitExceeded`, or a base of theirs
such as :class:`~.exceptions.TaskFailure`). A stop (a DELETE, a shutdown) is never retried, and a
task lost with its server follows ``restartable`` only.

A retried attempt goes back to the store as ``queued`` with a ``retry_at`` (event ``requeued``,
:meth:`~.store.base.TaskStore.retry`), so retries survive restarts and run on whichever serving
process or host has a free slot once they are due. The number of retries used is the number of
errors kept in the task's ``errors``.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..exceptions import MemoryLimitExceeded, ProcessDied, TaskFailure, TaskTimeout

#: The failures outside ``execute``, by the ``type`` of their error record.
FAILURES: dict[str, type[TaskFailure]] = {
    kind.__name__: kind for kind in (ProcessDied, TaskTimeout, MemoryLimitExceeded)}


@dataclass(frozen=True)
class RetryPolicy:
    """How a task class's failed attempts are retried (read from its class attributes by :meth:`of`)."""

    #: Retries after the first attempt, at most.
    max_retries: int = 0
    #: Seconds before the first retry, and the longest pause.
    backoff: float = 1.0
    backoff_max: float = 600.0
    #: Exception types retried; None: any exception ``execute`` raises (but no crash, timeout or memory limit).
    retry_on: Optional[tuple[type[BaseException], ...]] = None

    @classmethod
    def of(cls, task_cls: Any) -> "RetryPolicy":
        """The policy of a task class.

        :raises TypeError: ``retry_on`` is not an exception class or a tuple of them.
        :raises ValueError: a negative ``max_retries`` or a backoff that is not a finite, non-negative number.
        """
        max_retries = getattr(task_cls, "max_retries", 0)
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise ValueError(f"{task_cls.__name__}.max_retries must be a non-negative integer, not {max_retries!r}.")
        backoff = _seconds(task_cls, "retry_backoff")
        backoff_max = _seconds(task_cls, "retry_backoff_max")
        return cls(max_retries, backoff, max(backoff, backoff_max), _exception_types(task_cls))

    def retries_raised(self, exc: BaseException) -> bool:
        """Whether an exception raised by ``execute`` (in the task process) may be retried."""
        if self.retry_on is None:
            return isinstance(exc, Exception)
        return isinstance(exc, self.retry_on)

    def retries_failure(self, error_type: Optional[str]) -> bool:
        """Whether a failure outside ``execute`` (an error record's ``type``) may be retried: only when named."""
        kind = FAILURES.get(error_type or "")
        return kind is not None and self.retry_on is not None and issubclass(kind, self.retry_on)

    def delay(self, retries_done: int, draw: Callable[[], float] = random.random) -> float:
        """Seconds before the retry that follows ``retries_done`` earlier ones: exponential, with jitter.

        :param draw: a number in [0, 1) (injected by tests).
        """
        if self.backoff <= 0:
            return 0.0
        exponent = min(retries_done, 64)  # 2**64 pauses are far past any backoff_max
        full = min(self.backoff_max, self.backoff * math.pow(2, exponent))
        return full / 2 + draw() * full / 2

    def next_delay(self, status: str, error: Optional[dict[str, Any]], raised_match: Optional[bool],
                   stopped: bool, retries_done: int) -> Optional[float]:
        """Seconds until the next attempt if an attempt that ended so is retried, else None (the end is final).

        :param status: the attempt's terminal status (``failed`` and ``timed_out`` may be retried).
        :param error: its error record.
        :param raised_match: for an exception raised by ``execute``, whether it matched ``retry_on``
            (decided in the task process); None for any other end.
        :param stopped: a stop was asked for (a DELETE or a shutdown): never retried.
        :param retries_done: retries the task had before this attempt.
        """
        if stopped or status not in ("failed", "timed_out") or retries_done >= self.max_retries:
            return None
        matched = raised_match if raised_match is not None else self.retries_failure((error or {}).get("type"))
        return self.delay(retries_done) if matched else None


def _seconds(task_cls: Any, name: str) -> float:
    value = getattr(task_cls, name, getattr(RetryPolicy, name.replace("retry_", ""), 0.0))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{task_cls.__name__}.{name} must be a finite, non-negative number of seconds, "
                         f"not {value!r}.")
    return float(value)


def _exception_types(task_cls: Any) -> Optional[tuple[type[BaseException], ...]]:
    given = getattr(task_cls, "retry_on", None)
    if given is None:
        return None
    kinds = given if isinstance(given, tuple) else (given,)
    if not kinds or not all(isinstance(kind, type) and issubclass(kind, BaseException) for kind in kinds):
        raise TypeError(f"{task_cls.__name__}.retry_on must be an exception class or a tuple of them, "
                        f"not {given!r}.")
    return kinds
