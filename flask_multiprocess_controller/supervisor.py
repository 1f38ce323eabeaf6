"""Drive one task in one task process, from the start message to its recorded outcome.

This is the body of a controlling thread's work for one task: it relays progress
and logs, samples the process tree, enforces the timeout and the memory limit,
carries out stop requests in steps (flag, ``stop_grace``, SIGTERM, SIGKILL to the
whole tree) and classifies how the task ended.
"""
from __future__ import annotations

import enum
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_ready
from typing import Any, Callable, Optional

import psutil

from . import defaults
from .forkserver import ChildProcess
from .logs import logger_levels
from .proctree import TreeUsage, describe_exit, kill_tree, sample, signal_tree
from .states import ACTIVE, TaskStatus

_ACTIVE_VALUES = frozenset(s.value for s in ACTIVE)


class StopReason(str, enum.Enum):
    """Why a task is being stopped."""

    REQUESTED = "requested"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"
    MEMORY = "memory"


class TaskRun:
    """A task that a controlling thread has claimed: what other threads may ask of it."""

    def __init__(self, row: dict, timeout: Optional[float], wake: Callable[[], None]) -> None:
        self.row = row
        self.uuid: str = row["uuid"]
        self.timeout = timeout
        self.started = time.monotonic()
        self.progress: Any = row.get("progress")
        self.percent: Optional[float] = row.get("percent")
        #: True while progress holds a value not yet written to the store.
        self.dirty = False
        #: True once the store shows the task is no longer this process's (settled elsewhere).
        self.abandoned = False
        self.stop_reason: Optional[StopReason] = None
        self.stop_at: Optional[float] = None
        self.child: Optional[ChildProcess] = None
        self._wake = wake
        # Guards stop_reason, stop_at and child.
        self._lock = threading.Lock()

    def request_stop(self, reason: StopReason) -> None:
        """Ask the task to stop; the first reason given is the one recorded (memory overrides)."""
        with self._lock:
            if self.stop_reason is not None and reason is not StopReason.MEMORY:
                return
            self.stop_reason = reason
            if self.stop_at is None:
                self.stop_at = time.monotonic()
            child = self.child
        if child is not None:
            child.send(("stop", self.uuid))
        self._wake()

    def attach(self, child: ChildProcess) -> None:
        """Record the process running the task; a stop requested before now is passed on."""
        with self._lock:
            self.child = child
            pending = self.stop_reason is not None
        if pending:
            child.send(("stop", self.uuid))


@dataclass
class Settings:
    """The controller settings a controlling thread needs."""

    stop_grace: float
    max_memory: Optional[int]
    fresh_process: bool
    shared_store: bool


@dataclass
class Outcome:
    """How a task ended: its terminal status and the fields to store with it."""

    status: TaskStatus
    fields: dict
    child_alive: bool


class Supervisor:
    """Runs tasks in child processes for one controlling thread."""

    def __init__(self, settings: Settings, store: Any, owner: str, log_queue: Any, wake_fd: int) -> None:
        self.settings = settings
        self.owner = owner
        self.store = store
        self.log_queue = log_queue
        self.wake_fd = wake_fd
        self._levels_cache: dict = {}
        self._levels_at = 0.0

    def run(self, run: TaskRun, child: ChildProcess, args: dict, context: dict) -> Outcome:
        """Start ``run`` in ``child`` and return once the task has ended."""
        run.attach(child)
        child.send(("run", run.uuid, args, context, self._levels()))
        self.store.update(run.uuid, owner=self.owner, pid=child.pid, pid_created=child.create_time)
        usage = TreeUsage()
        done = self._watch(run, child, usage)
        if not child.exited and done is not None and not self.settings.fresh_process:
            self._reap_descendants(child.pid, done[4].get("children"))
        else:
            kill_tree(child.pid, usage)  # whatever the task left behind in its process group
        return _classify(run, done, child, usage, self.settings)

    def _levels(self) -> dict:
        """The server's logger levels, computed at most once a second."""
        now = time.monotonic()
        if now >= self._levels_at:
            self._levels_cache, self._levels_at = logger_levels(), now + 1.0
        return self._levels_cache

    def _watch(self, run: TaskRun, child: ChildProcess, usage: TreeUsage) -> Optional[tuple]:
        settings = self.settings
        sample_every = (defaults.SAMPLE_INTERVAL_WITH_MEMORY_LIMIT if settings.max_memory
                        else defaults.SAMPLE_INTERVAL)
        now = time.monotonic()
        # The first sample waits a full interval: short tasks are measured by the
        # child's own report, and a sample scans the whole process table.
        next_sample = now + sample_every
        next_flush = now + defaults.PROGRESS_INTERVAL
        next_poll = now + defaults.STORE_POLL_INTERVAL
        deadline = run.started + run.timeout if run.timeout else None
        term_at: Optional[float] = None
        killed = False
        done: Optional[tuple] = None
        conn_open = True
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline and run.stop_reason is None:
                run.request_stop(StopReason.TIMEOUT)
            if now >= next_sample:
                sample(child.pid, usage)
                next_sample = now + sample_every
                if settings.max_memory and usage.memory_now > settings.max_memory and not killed:
                    run.request_stop(StopReason.MEMORY)
                    kill_tree(child.pid, usage)
                    killed = True
            if settings.shared_store and now >= next_poll and not killed:
                next_poll = now + defaults.STORE_POLL_INTERVAL
                if self._lost_ownership(run):
                    kill_tree(child.pid, usage)
                    killed = True
            if run.stop_at is not None and done is None and not killed:
                grace_end = run.stop_at + settings.stop_grace
                if term_at is None and now >= grace_end:
                    signal_tree(child.pid, signal.SIGTERM, usage)
                    term_at = now
                elif term_at is not None and now >= term_at + defaults.KILL_AFTER_TERM:
                    kill_tree(child.pid, usage)
                    killed = True
            if run.dirty and now >= next_flush:
                self._flush(run)
                next_flush = now + defaults.PROGRESS_INTERVAL
            waits = [next_sample, next_poll] if settings.shared_store else [next_sample]
            if deadline is not None and run.stop_reason is None:
                waits.append(deadline)
            if run.stop_at is not None and not killed and done is None:
                waits.append(term_at + defaults.KILL_AFTER_TERM if term_at is not None
                             else run.stop_at + settings.stop_grace)
            if run.dirty:
                waits.append(next_flush)
            timeout = max(0.0, min(waits) - time.monotonic())
            watched: list = [child.exit_fd, self.wake_fd]
            if conn_open:
                watched.append(child.conn)
            ready = wait_ready(watched, timeout)
            if self.wake_fd in ready:
                _drain_fd(self.wake_fd)
            if conn_open and child.conn in ready:
                done, conn_open = self._receive(run, child, done)
            if child.exit_fd in ready:
                child.read_exit()
                if conn_open:
                    done, conn_open = self._receive(run, child, done)
                return done
            if done is not None and not settings.fresh_process:
                return done

    def _lost_ownership(self, run: TaskRun) -> bool:
        """Look at the stored task: pass on a stop requested elsewhere; True if it is no longer ours.

        A serving process paused past its lease finds its tasks settled (or claimed
        again) by others when it wakes up; it must then give them up at once.
        """
        row = self.store.get(run.uuid)
        if row is None or row["status"] not in _ACTIVE_VALUES or row.get("owner") != self.owner:
            run.abandoned = True
            return True
        if row.get("stop_requested") and run.stop_reason is None:
            run.request_stop(StopReason.REQUESTED)
        return False

    def _receive(self, run: TaskRun, child: ChildProcess, done: Optional[tuple]) -> tuple[Optional[tuple], bool]:
        """Read every message waiting on the channel; return (done message, channel still open)."""
        conn = child.conn
        try:
            while conn.poll():
                message = conn.recv()
                kind = message[0]
                if kind == "log":
                    self.log_queue.put(message[1])
                elif message[1] != run.uuid:
                    continue
                elif kind == "progress":
                    run.progress, run.dirty = message[2], True
                elif kind == "percent":
                    run.percent, run.dirty = message[2], True
                elif kind == "done":
                    done = message
                    if not self.settings.fresh_process:
                        return done, True
        except (EOFError, OSError):
            return done, False
        return done, True

    def _flush(self, run: TaskRun) -> None:
        run.dirty = False
        self.store.update(run.uuid, owner=self.owner, progress=run.progress, percent=run.percent)

    @staticmethod
    def _reap_descendants(pid: int, reported: Optional[list]) -> None:
        """Kill what a task left behind in a process that will run more tasks.

        The child reports its live children when a task ends; only if it could not
        (no /proc support) or some are left is the whole process table scanned.
        """
        if reported == []:
            return
        try:
            leftovers = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.Error:
                pass


def _drain_fd(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _classify(run: TaskRun, done: Optional[tuple], child: ChildProcess, usage: TreeUsage,
              settings: Settings) -> Outcome:
    """Turn what was observed into a terminal status and the fields recorded with it."""
    report = done[4] if done is not None else {}
    fields: dict = {
        "ended_at": time.time(),
        "exit_code": child.exit_code if child.exited else None,
        "progress": run.progress,
        "percent": run.percent,
        "memory_peak": max(usage.memory_peak, report.get("maxrss", 0)) or None,
        "cpu_time": max(usage.cpu_time if settings.fresh_process else 0.0, report.get("cpu_time", 0.0)) or None,
    }
    reason = run.stop_reason
    alive = not child.exited
    if reason is StopReason.MEMORY:
        fields["error"] = _err("MemoryLimitExceeded",
                               f"The task's process tree used {usage.memory_now or usage.memory_peak} bytes of "
                               f"memory, over the limit of {settings.max_memory} bytes, and was killed.")
        return Outcome(TaskStatus.FAILED, fields, alive)
    if done is not None:
        kind, payload = done[2], done[3]
        if kind == "ok":
            fields["result"] = json.loads(payload)
            return Outcome(TaskStatus.SUCCEEDED, fields, alive)
        if kind == "error":
            fields["error"] = payload
            return Outcome(TaskStatus.FAILED, fields, alive)
        return _stopped(reason, fields, alive, run, None, settings)
    how = describe_exit(child.exit_code)
    if reason is None:
        fields["error"] = _err("ProcessDied", f"The task process {how} before returning a result.")
        return Outcome(TaskStatus.FAILED, fields, False)
    return _stopped(reason, fields, False, run, how, settings)


def _stopped(reason: Optional[StopReason], fields: dict, alive: bool, run: TaskRun, how: Optional[str],
             settings: Settings) -> Outcome:
    killed = f" It did not stop within {settings.stop_grace:g} s and {how}." if how else ""
    if reason is StopReason.TIMEOUT:
        fields["error"] = _err("TaskTimeout", f"The task ran longer than its timeout of {run.timeout:g} s.{killed}")
        return Outcome(TaskStatus.TIMED_OUT, fields, alive)
    if reason is StopReason.SHUTDOWN:
        fields["error"] = _err("Shutdown", f"The task was stopped because its server shut down.{killed}")
    elif how:
        fields["error"] = _err("Killed", f"The task was asked to stop.{killed}")
    return Outcome(TaskStatus.STOPPED, fields, alive)


def _err(kind: str, message: str) -> dict:
    return {"type": kind, "message": message, "traceback": None}
