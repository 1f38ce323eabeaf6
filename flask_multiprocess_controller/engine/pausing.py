"""Pausing a running task: its whole process tree suspended (SIGSTOP) and resumed (SIGCONT).

A PATCH reaching any serving process marks the task ``paused`` in the store (:meth:`TaskStore.pause`);
the ``paused`` event reaches the serving process that runs it, wherever that is, and its controlling
thread suspends the tree: the task's process group through the fork server (which signals only its
own unreaped child's group) and every other process of the tree through psutil, as stops and kills
do (:meth:`~.forkserver.ChildProcess.signal_tree`). The task keeps its slot, and its timeout goes on
counting unless the controller says ``timeout_while_paused=False`` (:meth:`~.watchdog.Watchdog.pause`).

A pause does not last for ever: once the tree has been suspended for the controller's ``max_pause``
seconds, the process supervising it (whichever process made the pause) writes the end of the pause to
the store, as a PATCH or a DELETE would: the task is resumed (event ``resumed``), or with
``pause_expiry="stop"`` stopped gracefully (event ``stopping``; it ends ``stopped`` with the error
``PauseExpired``). See :meth:`~.supervisor.Supervisor._end_pause`.

Every change of the process's state happens in the controlling thread, in :class:`TreePause`: other
threads only say what the store wants (:meth:`~.supervisor.TaskRun.request_pause`) and wake it. A
stop of a paused task resumes it first, so that it can reach a checkpoint, and then escalates as usual.
"""
from __future__ import annotations

import signal
from typing import Any, Callable, Optional, Protocol

from ..events import Event, EventKind
from .forkserver import ChildProcess
from .proctree import TreeUsage
from ..states import TaskStatus
from .watchdog import Watchdog


class PausableRun(Protocol):
    """What :class:`TreePause` needs of a :class:`~.supervisor.TaskRun`."""

    pause_wanted: bool
    abandoned: bool

    @property
    def stopping(self) -> bool: ...

    def request_pause(self, paused: bool) -> None: ...


class TreePause:
    """Keeps one run's process tree suspended exactly while it should be (one controlling thread's).

    :param child: the task process.
    :param usage: the tree's samples; every process seen there is signalled too.
    """

    def __init__(self, child: ChildProcess, usage: TreeUsage) -> None:
        self._child = child
        self._usage = usage
        #: Whether the tree is suspended now.
        self.paused = False

    def follow(self, run: PausableRun, watchdog: Watchdog, now: float) -> None:
        """Suspend or resume the tree so that it matches the run's wish at monotonic time ``now``.

        A stop (of any reason) or the loss of the task wins over a pause: the tree runs again,
        so that it can reach a checkpoint or be terminated.
        """
        wanted = run.pause_wanted and not run.stopping and not run.abandoned and not self._child.exited
        if wanted and not self.paused:
            self._signal(signal.SIGSTOP)
            watchdog.pause(now)
            self.paused = True
        elif not wanted and self.paused:
            self.release()
            watchdog.resume(now)

    def release(self) -> None:
        """Resume the tree if it is suspended (the run is over, or must stop): nothing stays frozen."""
        if self.paused:
            self._signal(signal.SIGCONT)
            self.paused = False

    def _signal(self, signum: int) -> None:
        if not self._child.exited:
            self._child.signal_tree(signum, self._usage.seen.values())


def follow_pause_event(run: PausableRun, event: Event, current_status: Callable[[], Optional[str]]) -> None:
    """Tell ``run`` whether its task should be paused, after one of its events.

    A ``started`` event carries the status the task had when its process was recorded (a PATCH
    may have come between the claim and the start). A ``paused`` or ``resumed`` event is checked
    against the store's current status: two PATCHes through different processes may reach this
    one in either order, and the later write must win.
    """
    status: Any = event["task"].get("status")
    if event["kind"] in (EventKind.PAUSED, EventKind.RESUMED):
        status = current_status() or status
    run.request_pause(status == TaskStatus.PAUSED)
