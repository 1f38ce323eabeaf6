"""When a controlling thread must act on a running task: the schedule, apart from the acting.

A :class:`Watchdog` is told the time and what it should know (a stop was asked at some
moment, progress waits to be written, the task reported its end) and answers which
actions are due and how long the thread may sleep. It never reads a clock, sleeps or
touches a process, so the stop escalation (flag, ``stop_grace``, SIGTERM,
``KILL_AFTER_TERM``, SIGKILL) and the timeout are tested with plain numbers.

A task's timeout counts the time it is paused too (its slot is held all along), unless the schedule
says ``timeout_while_paused=False``: then :meth:`Watchdog.pause` stops its clock and
:meth:`Watchdog.resume` moves the deadline by the time spent paused. A pause longer than the
schedule's ``max_pause`` makes :attr:`Action.PAUSE_EXPIRED` due: the caller resumes or stops the task.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from .. import defaults


class Action(str, enum.Enum):
    """Something a controlling thread must do now."""

    #: The task ran past its timeout: ask it to stop (reason: timeout).
    TIMEOUT = "timeout"
    #: Sample the process tree's memory and CPU.
    SAMPLE = "sample"
    #: Write the latest progress to the store.
    FLUSH = "flush"
    #: The task ignored the stop for ``stop_grace`` seconds: SIGTERM its tree.
    TERMINATE = "terminate"
    #: SIGTERM did not end it within ``kill_after_term`` seconds: SIGKILL its tree.
    KILL = "kill"
    #: The task has been paused for ``max_pause`` seconds: end the pause (resume or stop it).
    PAUSE_EXPIRED = "pause_expired"


@dataclass(frozen=True)
class Schedule:
    """The intervals a watchdog keeps, in seconds."""

    stop_grace: float
    sample_every: float
    flush_every: float = defaults.PROGRESS_INTERVAL
    kill_after_term: float = defaults.KILL_AFTER_TERM
    #: Seconds a pause may last before :attr:`Action.PAUSE_EXPIRED` is due (None or 0: no limit).
    max_pause: Optional[float] = None
    #: Whether the timeout counts the time the task is paused.
    timeout_while_paused: bool = True
    #: Seconds before :attr:`Action.PAUSE_EXPIRED` is due again if the pause did not end after it.
    pause_retry: float = defaults.PAUSE_EXPIRY_RETRY
    #: Seconds between two samples once the task has run ``sample_warmup`` seconds (None: ``sample_every``
    #: all along). A long task's tree is read less often: its end report carries exact figures anyway.
    sample_every_later: Optional[float] = None
    #: Seconds a task runs before its samples come every ``sample_every_later`` seconds.
    sample_warmup: float = defaults.SAMPLE_WARMUP


class Watchdog:
    """The action schedule of one run of one task.

    :param started: monotonic time the task started.
    :param timeout: seconds it may run, None for no limit.
    """

    def __init__(self, schedule: Schedule, started: float, timeout: Optional[float]) -> None:
        self.schedule = schedule
        #: Monotonic time after which the task has run too long (it moves on by each pause, if paused time
        #: does not count).
        self.deadline = started + timeout if timeout else None
        #: When the current pause began; None while the task is not paused.
        self.paused_since: Optional[float] = None
        #: When the current pause has lasted ``max_pause`` (None: not paused, or no limit).
        self._pause_ends_at: Optional[float] = None
        # The first sample waits a full interval: short tasks are measured by their own report,
        # and a sample scans the process table.
        self._started = started
        self._next_sample = started + schedule.sample_every
        self._next_flush = started + schedule.flush_every
        self._term_at: Optional[float] = None
        #: True once the tree was SIGKILLed (by the schedule or by the caller): no escalation is left.
        self.killed = False

    def _sample_interval(self, now: float) -> float:
        later = self.schedule.sample_every_later
        if later is not None and now - self._started >= self.schedule.sample_warmup:
            return later
        return self.schedule.sample_every

    def killed_now(self) -> None:
        """Record that the caller killed the tree (memory limit, ownership lost)."""
        self.killed = True

    def pause(self, now: float) -> None:
        """The task was suspended at ``now``: its pause is timed, and its timeout clock stops if paused time
        does not count (a second call changes nothing)."""
        if self.paused_since is None:
            self.paused_since = now
            if self.schedule.max_pause:
                self._pause_ends_at = now + self.schedule.max_pause

    def resume(self, now: float) -> None:
        """The task was resumed at ``now``: if paused time does not count, the deadline moves by it."""
        if self.paused_since is None:
            return
        if self.deadline is not None and not self.schedule.timeout_while_paused:
            self.deadline += max(0.0, now - self.paused_since)
        self.paused_since = None
        self._pause_ends_at = None

    def _live_deadline(self, stopping: bool) -> Optional[float]:
        """The deadline while it may fall due (its clock runs and no stop is under way), else None."""
        frozen = self.paused_since is not None and not self.schedule.timeout_while_paused
        return None if stopping or frozen else self.deadline

    def _pause_end(self, stopping: bool) -> Optional[float]:
        """When the current pause must end, while that may fall due (no stop under way), else None."""
        return None if stopping else self._pause_ends_at

    def due(self, now: float, *, stop_at: Optional[float], stopping: bool, dirty: bool,
            ended: bool) -> list[Action]:
        """The actions due at ``now``, in the order to carry them out.

        :param stop_at: when a stop was first asked for, None if never.
        :param stopping: whether a stop (of any reason) has been asked for.
        :param dirty: progress waits to be written.
        :param ended: the task already reported its end (nothing to escalate).
        """
        actions: list[Action] = []
        deadline = self._live_deadline(stopping)
        if deadline is not None and now >= deadline:
            actions.append(Action.TIMEOUT)
        pause_end = self._pause_end(stopping)
        if pause_end is not None and now >= pause_end:
            actions.append(Action.PAUSE_EXPIRED)
            self._pause_ends_at = now + self.schedule.pause_retry  # due again only if the pause goes on
        if now >= self._next_sample:
            actions.append(Action.SAMPLE)
            self._next_sample = now + self._sample_interval(now)
        if stop_at is not None and not ended and not self.killed:
            if self._term_at is None and now >= stop_at + self.schedule.stop_grace:
                actions.append(Action.TERMINATE)
                self._term_at = now
            elif self._term_at is not None and now >= self._term_at + self.schedule.kill_after_term:
                actions.append(Action.KILL)
                self.killed = True
        if dirty and now >= self._next_flush:
            actions.append(Action.FLUSH)
            self._next_flush = now + self.schedule.flush_every
        return actions

    def sleep_for(self, now: float, *, stop_at: Optional[float], stopping: bool, dirty: bool,
                  ended: bool) -> float:
        """Seconds until the next action may be due (0 if one is due now)."""
        moments = [self._next_sample]
        deadline = self._live_deadline(stopping)
        if deadline is not None:
            moments.append(deadline)
        pause_end = self._pause_end(stopping)
        if pause_end is not None:
            moments.append(pause_end)
        if stop_at is not None and not ended and not self.killed:
            moments.append(self._term_at + self.schedule.kill_after_term if self._term_at is not None
                           else stop_at + self.schedule.stop_grace)
        if dirty:
            moments.append(self._next_flush)
        return max(0.0, min(moments) - now)
