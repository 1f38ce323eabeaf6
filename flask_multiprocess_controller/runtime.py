"""The moving parts of a controller in one serving process.

Data flow::

    submit ─▶ store (queued) ─▶ wake the slots
    slot thread (one per process slot, so one controlling thread per child process):
        claim the next task from the store (atomic, honours max_num_process across processes)
        ─▶ fork server forks a task process (or the slot's warm one is reused)
        ─▶ Supervisor relays progress/logs, enforces stop/timeout/memory, classifies the end
        ─▶ store (terminal state), wake waiters, fire the callback, claim the next task

Nothing here sleeps on the dispatch path: a submit wakes an idle slot at once and a
slot that finishes a task claims the next one itself. Idle slots also look at a
shared store every ``STORE_POLL_INTERVAL`` for work queued by other processes.
"""
from __future__ import annotations

import functools
import os
import socket
import threading
import time
from multiprocessing.connection import wait as wait_ready
from typing import TYPE_CHECKING, Optional

import psutil

from . import defaults
from .child import run_child
from .forkserver import ChildProcess, ForkServer
from .logs import LogListener, MetaMPLoggerConfigurator, log_task_ended, log_task_started
from .notify import HostBus
from .proctree import kill_tree, process_alive
from .states import TaskStatus
from .supervisor import Outcome, Settings, StopReason, Supervisor, TaskRun
from .waiters import Waiters

if TYPE_CHECKING:
    from .controller import MetaMPController


def host_id() -> str:
    """This host's name in the store: ``MPC_HOST_ID``, else the host name."""
    return os.environ.get(defaults.HOST_ID_ENV) or socket.gethostname()


def owner_id(host: str) -> str:
    """Name this serving process uniquely, even across pid reuse: ``host:pid:create_time``."""
    return f"{host}:{os.getpid()}:{psutil.Process().create_time():.3f}"


def _parse_owner(owner: str) -> tuple[str, int, float]:
    rest, _, created = owner.rpartition(":")
    host, _, pid = rest.rpartition(":")
    return host, int(pid), float(created)


def _owner_host(owner: Optional[str]) -> Optional[str]:
    try:
        return _parse_owner(owner)[0] if owner else None
    except ValueError:
        return None


def owner_alive(owner: Optional[str], host: str, heartbeats: dict[str, float], now: float, lease: float) -> bool:
    """Whether the serving process ``owner`` still runs.

    On this host the process table decides at once; elsewhere a heartbeat younger
    than ``lease`` seconds does.
    """
    if not owner:
        return False
    try:
        owner_host, pid, created = _parse_owner(owner)
    except ValueError:
        return False
    if owner_host == host:
        return process_alive(pid, created)
    beat = heartbeats.get(owner)
    return beat is not None and now - beat <= lease


class Runtime:
    """Fork server, slot threads, log listener and the registry of running tasks of one controller."""

    def __init__(self, controller: "MetaMPController", configurator: type[MetaMPLoggerConfigurator]) -> None:
        self.controller = controller
        self.store = controller.store
        self.logger = controller.logger
        self.pid = os.getpid()
        child_main = functools.partial(run_child, task_cls=controller.target_task, configurator=configurator,
                                       max_tasks=controller.max_tasks_per_child)
        # Forked first, while this process may still be single-threaded.
        self.fork_server = ForkServer(child_main)
        self.host = host_id()
        self.owner = owner_id(self.host)
        self.logs = LogListener()
        # Guards _generation and closing; slots wait on it for work.
        self._work = threading.Condition()
        self._generation = 0
        self.closing = False
        # Guards _runs: the tasks running in this process, by uuid.
        self._runs_lock = threading.Lock()
        self._runs: dict[str, TaskRun] = {}
        #: Threads waiting for tasks to end; woken when a task run by this process ends.
        self.waiters = Waiters()
        self._slots = [_Slot(self, i) for i in range(controller.max_num_process)]
        self._keeper = _Keeper(self)
        self.bus = HostBus(controller.name, self.owner, on_ended=self.wake_waiters, on_stop=self._stop_nudged,
                           logger=self.logger)

    def start(self) -> None:
        self.logs.start()
        if self.store.shared:
            self.bus.start()
        self.store.heartbeat(self.owner, time.time())
        self.reconcile()
        self.purge()
        self._keeper.start()
        for slot in self._slots:
            slot.start()

    # -- work -----------------------------------------------------------------

    def notify_work(self) -> None:
        """Wake idle slots: tasks were queued."""
        with self._work:
            self._generation += 1
            self._work.notify_all()

    def next_task(self) -> Optional[dict]:
        """Claim the next task for a slot, waiting while there is none; None when closing."""
        c = self.controller
        while True:
            with self._work:
                if self.closing:
                    return None
                generation = self._generation
            row = self.store.claim(c.name, self.owner, c.max_num_process, time.time())
            if row is not None:
                return row
            with self._work:
                if self._generation == generation and not self.closing:
                    self._work.wait(defaults.STORE_POLL_INTERVAL if self.store.shared else None)

    def purge(self) -> None:
        """Delete the controller's tasks that ended longer than ``retention`` ago."""
        now = time.time()
        purged = self.store.purge(self.controller.name, now - self.controller.retention)
        if purged:
            self.logger.info("Purged %d tasks that ended more than %g s ago.", purged, self.controller.retention)

    def reconcile(self) -> None:
        """Settle the active tasks of serving processes that died: ``lost``, or queued again.

        Their leftover processes on this host are killed first (the pid and its
        create time must both match, so a recycled pid is never hit).
        """
        c = self.controller
        now = time.time()
        beats = self.store.heartbeats()
        self.bus.set_peers(owner for owner in beats if _owner_host(owner) == self.host)
        settled = 0
        for row in self.store.active(c.name):
            owner = row.get("owner")
            if owner == self.owner or owner_alive(owner, self.host, beats, now, c.lease):
                continue
            if _owner_host(owner) == self.host and process_alive(row.get("pid"), row.get("pid_created")):
                kill_tree(row["pid"])
            settled += 1
            if c.target_task.restartable and self.store.requeue(row["uuid"], owner=owner):
                self.logger.warning("Task %s was cut off when its server (%s) died; queued again.", row["uuid"], owner)
                continue
            error = {"type": "Lost", "traceback": None,
                     "message": f"The serving process that ran this task ({owner}) died."}
            if self.store.finish(row["uuid"], TaskStatus.LOST.value, owner=owner, ended_at=now, error=error):
                self.logger.warning("Task %s was lost with the process that ran it (%s).", row["uuid"], owner)
        self._forget_dead_owners(beats, now)
        if settled:
            self.wake_waiters()
            self.notify_work()

    def _forget_dead_owners(self, beats: dict[str, float], now: float) -> None:
        """Drop the heartbeats of serving processes that are gone, so the table does not grow with crashes."""
        for owner, beat in beats.items():
            if owner != self.owner and now - beat > self.controller.lease and not owner_alive(
                    owner, self.host, beats, now, self.controller.lease):
                self.store.forget_owner(owner)

    def wake_waiters(self, uuid: Optional[str] = None) -> None:
        """Wake the threads waiting in :meth:`MetaMPController.wait` for ``uuid`` (default: all)."""
        if uuid is None:
            self.waiters.wake_all()
        else:
            self.waiters.wake(uuid)

    # -- running tasks ----------------------------------------------------------

    def register(self, run: TaskRun) -> None:
        with self._runs_lock:
            self._runs[run.uuid] = run

    def unregister(self, run: TaskRun) -> None:
        with self._runs_lock:
            self._runs.pop(run.uuid, None)

    def nudge_stop(self, row: dict) -> None:
        """Tell the process of this host that runs ``row`` to look at its stop request now."""
        owner = row.get("owner")
        if owner and owner != self.owner and _owner_host(owner) == self.host:
            self.bus.stop(owner, row["uuid"])

    def _stop_nudged(self, uuid: str) -> None:
        run = self.local_run(uuid)
        if run is None:
            return
        row = self.store.get(uuid)
        if row is not None and row.get("stop_requested") and row.get("owner") == self.owner:
            run.request_stop(StopReason.REQUESTED)

    def local_run(self, uuid: str) -> Optional[TaskRun]:
        with self._runs_lock:
            return self._runs.get(uuid)

    def record(self, run: TaskRun, outcome: Outcome) -> None:
        """Store a task's outcome (or requeue it), then wake whoever waits for it."""
        c = self.controller
        if run.abandoned:
            self.logger.warning("Task %s was settled elsewhere while this process was unresponsive; its run "
                                "here was killed and is not recorded.", run.uuid)
            return
        log_task_ended(self.logger, run.uuid, outcome.status.value, outcome.fields.get("error"))
        if (run.stop_reason is StopReason.SHUTDOWN and c.target_task.restartable
                and outcome.status is not TaskStatus.SUCCEEDED and self.store.requeue(run.uuid, owner=self.owner)):
            self.logger.info("Task %s will run again after the restart.", run.uuid)
        elif not self.store.finish(run.uuid, outcome.status.value, owner=self.owner, **outcome.fields):
            self.logger.warning("Task %s had already been settled elsewhere; its outcome %s is dropped.",
                                run.uuid, outcome.status.value)
        self.wake_waiters(run.uuid)
        self.bus.ended(run.uuid)
        c._task_ended(run.uuid)

    # -- shutdown -------------------------------------------------------------

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stop taking tasks, stop the running ones (stop_grace, then kill) and release everything."""
        with self._work:
            self.closing = True
            self._work.notify_all()
        with self._runs_lock:
            runs = list(self._runs.values())
        if runs:
            self.logger.warning("Shutting down: stopping %d running task(s); those that ignore the stop are "
                                "killed after %g s.", len(runs), self.controller.stop_grace)
        for run in runs:
            run.request_stop(StopReason.SHUTDOWN)
        for slot in self._slots:
            slot.wake()
        for slot in self._slots:
            if slot.is_alive():
                slot.join(timeout)
        self._keeper.stop()
        self.bus.close()
        try:
            self.store.forget_owner(self.owner)
        except Exception:  # the store may be gone at exit; the lease covers it then
            self.logger.warning("Could not remove this process's heartbeat from the store.")
        self.fork_server.close()
        self.logs.stop()
        self.wake_waiters()


class _Slot(threading.Thread):
    """A controlling thread: runs one task process at a time, and one task in it at a time."""

    def __init__(self, runtime: Runtime, index: int) -> None:
        super().__init__(name=f"mpc-{runtime.controller.name}-slot-{index}", daemon=True)
        self.runtime = runtime
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        c = runtime.controller
        settings = Settings(stop_grace=c.stop_grace, max_memory=c.max_memory,
                            fresh_process=c.max_tasks_per_child == 1, shared_store=runtime.store.shared)
        self._supervisor = Supervisor(settings, runtime.store, runtime.owner, runtime.logs.queue, self._wake_r)
        self._child: Optional[ChildProcess] = None
        self._tasks_in_child = 0

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass

    def run(self) -> None:
        rt = self.runtime
        try:
            while True:
                row = rt.next_task()
                if row is None:
                    return
                self._run_task(row)
        finally:
            self._retire_child()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run_task(self, row: dict) -> None:
        rt = self.runtime
        c = rt.controller
        run = TaskRun(row, row.get("timeout"), self.wake)
        rt.register(run)
        try:
            if row.get("stop_requested"):
                run.request_stop(StopReason.REQUESTED)
            if rt.closing:
                run.request_stop(StopReason.SHUTDOWN)
            child = self._warm_child()
            log_task_started(rt.logger, row["uuid"], child.pid)
            c._task_started(row["uuid"])
            outcome = self._supervisor.run(run, child, row["args"], c.context)
            self._tasks_in_child += 1
            if not outcome.child_alive or self._tasks_in_child >= c.max_tasks_per_child > 0:
                self._retire_child()
            rt.record(run, outcome)
        except Exception as exc:  # the slot must survive anything: record the failure and go on
            rt.logger.exception("Controlling thread failed while running task %s.", row["uuid"])
            self._retire_child()
            error = {"type": "ControllerError", "message": f"The controller failed to run the task: {exc}",
                     "traceback": None}
            rt.store.finish(row["uuid"], TaskStatus.FAILED.value, owner=rt.owner, ended_at=time.time(), error=error)
            rt.wake_waiters(row["uuid"])
        finally:
            rt.unregister(run)

    def _warm_child(self) -> ChildProcess:
        if self._child is None:
            self._child = self.runtime.fork_server.spawn()
            self._tasks_in_child = 0
        return self._child

    def _retire_child(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        if not child.exited:
            child.send(("exit",))
            if not wait_ready([child.exit_fd], 2.0):
                kill_tree(child.pid)
                wait_ready([child.exit_fd], 2.0)
            child.read_exit()
        child.close()


class _Keeper(threading.Thread):
    """Heartbeats for this serving process, settles the tasks of dead ones, purges old tasks."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(name=f"mpc-{runtime.controller.name}-keeper", daemon=True)
        self.runtime = runtime
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()

    def run(self) -> None:
        rt = self.runtime
        next_reconcile = time.monotonic() + defaults.RECONCILE_INTERVAL
        next_purge = time.monotonic()
        while not self._stop_event.wait(defaults.HEARTBEAT_INTERVAL):
            now = time.monotonic()
            for due, action in ((True, self._beat), (now >= next_reconcile, rt.reconcile),
                                (now >= next_purge, rt.purge)):
                if not due:
                    continue
                try:
                    action()
                except Exception:  # a failing store must not end the keeper; it retries next round
                    rt.logger.exception("Store housekeeping (%s) failed.", getattr(action, "__name__", action))
            if now >= next_reconcile:
                next_reconcile = now + defaults.RECONCILE_INTERVAL
            if now >= next_purge:
                next_purge = now + defaults.PURGE_INTERVAL

    def _beat(self) -> None:
        self.runtime.store.heartbeat(self.runtime.owner, time.time())
