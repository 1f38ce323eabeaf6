"""A slot: one controlling thread of a controller, which runs one task process at a time.

It claims a task (see :meth:`~.runtime.Runtime.next_task`), starts it in its task process (a fresh one,
or the one it keeps for reuse), has the :class:`~.supervisor.Supervisor` watch it, and records the end
together with the claim of its next task.
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, NamedTuple, Optional

from ..events import Event
from ..store.base import Row
from .forkserver import ChildProcess
from .retrier import Retrier
from .supervisor import TaskRun, requested_stop

if TYPE_CHECKING:
    from .runtime import Runtime


class Claim(NamedTuple):
    """A task a slot claimed, and the ``started`` event when its process was recorded with the claim."""

    row: Row
    started: Optional[Event]


class Slot(threading.Thread):
    """A controlling thread: runs one task process at a time, and one task in it at a time."""

    def __init__(self, runtime: Runtime, index: int) -> None:
        super().__init__(name=f"mpc-{runtime.config.name}-slot-{index}", daemon=True)
        self.runtime = runtime
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Guards _pipe_open and the pipe's descriptors, which wake() writes from other threads.
        self._pipe_lock = threading.Lock()
        self._pipe_open = True
        self._retrier = Retrier(runtime.logger, runtime._give_up)
        self._supervisor = runtime.new_supervisor(self._wake_r, self._retrier)
        self._child: Optional[ChildProcess] = None
        self._tasks_in_child = 0
        #: A task claimed with the end of the slot's last one (same write), run next.
        self._next: Optional[Claim] = None

    def wake(self) -> None:
        """Interrupt the controlling thread's wait (a stop, a shutdown); harmless once it has ended."""
        with self._pipe_lock:
            if self._pipe_open:
                try:
                    os.write(self._wake_w, b"!")
                except BlockingIOError:  # full: a wake is pending anyway
                    pass

    def run(self) -> None:
        rt = self.runtime
        try:
            while True:
                ready, self._next = self._next, None
                claim = rt.adopt(ready, self._retrier) if ready is not None else None
                if claim is None:
                    claim = rt.next_task(self._retrier, self._child)
                if claim is None:
                    return
                self._run_task(claim)
        finally:
            self._retire_child()
            # A descriptor number is reused at once: no wake may write to it after this.
            with self._pipe_lock:
                self._pipe_open = False
                os.close(self._wake_r)
                os.close(self._wake_w)

    def _run_task(self, claim: Claim) -> None:
        row = claim.row
        rt = self.runtime
        c = rt.config
        run = TaskRun(row["uuid"], row.get("timeout"), self.wake, row.get("progress"), row.get("percent"),
                      attempt=row.get("attempt"), claimed_at=row.get("started_at"))
        run.errors = list(row.get("errors") or [])
        run.has_state = row.get("state_saved_at") is not None
        run.traceparent, run.created_at = row.get("traceparent"), row.get("created_at")
        rt.register(run)
        try:
            if row.get("stop_requested"):
                run.request_stop(requested_stop(row))
            child = self._warm_child()
            if rt.closing or rt.draining:  # the process began to go away since the claim: do not start it
                rt.give_back(claim, self._retrier)
                return
            outcome = self._supervisor.run(run, child, row["args"], dict(c.context), claim.started,
                                           row.get("state"))
            if outcome is None:  # released: its process goes on, for another serving process to adopt
                self._child = None
                child.close()
                return
            self._tasks_in_child += 1
            if not outcome.child_alive or self._tasks_in_child >= c.max_tasks_per_child > 0:
                self._retire_child()
            # The slot is free once the end is written: its next claim rides along (recording the
            # process, when the slot keeps one).
            self._next = rt.record(run, outcome, self._retrier, child=self._child)
        except Exception as exc:  # the slot must survive anything: record the failure and go on
            rt.logger.exception("Controlling thread failed while running task %s.", row["uuid"])
            self._retire_child()
            rt.fail(row["uuid"], exc, self._retrier)
        finally:
            rt.unregister(run)

    def _warm_child(self) -> ChildProcess:
        if self._child is None:
            self._child = self.runtime.fork_server.spawn(capture_output=self.runtime.config.fresh_process)
            self._tasks_in_child = 0
        return self._child

    def _retire_child(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        self.runtime.retire(child)
        child.close()
