"""Drive one task in one task process, from the start message to its outcome.

This is the body of a controlling thread's work for one task: it relays progress and
logs, samples the process tree, enforces the timeout and the memory limit, carries out
stop requests in steps (flag, ``stop_grace``, SIGTERM, SIGKILL to the whole tree) and
classifies how the task ended. When to act is the :class:`~.watchdog.Watchdog`'s call;
how the end is named is :func:`classify`'s; both are pure and tested without processes.
"""
from __future__ import annotations

import collections
import enum
import json
import logging
import math
import os
import select
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_ready
from typing import Any, Callable, Mapping, Optional

import psutil

from .. import defaults
from ..events import Event
from ..exceptions import MPCError, StoreError
from .config import Settings as Settings  # re-exported: classify takes it
from .flusher import ProgressFlusher
from .forkserver import ChildProcess
from .logs import LogListener, logger_levels, traceback_lines
from .pausing import TreePause
from .progressbuffer import MESSAGE_EVERY, open_reader, supported as buffers_supported
from .retrier import Retrier
from .proctree import TreeUsage, cpu_seconds, describe_exit, sample, signal_processes
from .protocol import (
    Done, ErrorRecord, LogRecordMessage, Output, Percent, Progress, Report, RunTask, SaveState,
    StateSaved, StopTask, clip_error, error_record,
)
from ..states import TaskStatus
from ..store import TaskStore
from ..tracing import trace_id
from .watchdog import Action, Schedule, Watchdog


class StopReason(str, enum.Enum):
    """Why a task is being stopped."""

    REQUESTED = "requested"
    #: Asked to finish now: the task returns its best answer so far, kept as its result.
    FINISH = "finish"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"
    MEMORY = "memory"
    #: Paused longer than ``max_pause``, with ``pause_expiry="stop"``.
    PAUSE_EXPIRED = "pause_expired"


def requested_stop(task: Mapping[str, Any]) -> StopReason:
    """The reason of the stop a stored task (or an event's task) asks for: a finish, or a plain stop."""
    return StopReason.FINISH if task.get("finish_requested") else StopReason.REQUESTED


class TaskRun:
    """A task that a controlling thread has claimed: what other threads may ask of it."""

    def __init__(self, uuid: str, timeout: Optional[float], wake: Callable[[], None],
                 progress: Any = None, percent: Optional[float] = None, attempt: Optional[int] = None,
                 claimed_at: Optional[float] = None) -> None:
        self.uuid = uuid
        #: When the store recorded the claim (its clock), to tell a claim made as the server began to stop.
        self.claimed_at = claimed_at
        #: Which run of the task this is (the store counts claims): events of other runs do not apply.
        self.attempt = attempt
        self.timeout = timeout
        self.started = time.monotonic()
        #: The latest progress and percent reported by the task (fresher than the store's).
        self.progress: Any = progress
        self.percent: Optional[float] = percent
        #: True while something waits to be written by the controlling thread: log lines (and, without a
        #: progress flusher, progress).
        self.dirty = False
        #: What the task's process tree used so far (sampled by the supervisor), None before it is watched.
        self.usage: Optional[TreeUsage] = None
        #: Monotonic time the usage figures were last written to the store (with progress, or on their own).
        self.usage_written_at = self.started
        #: Log lines of the task not yet written to the store (the newest LOG_KEEP_BYTES at most).
        self.log_lines: collections.deque[str] = collections.deque()
        self._log_bytes = 0
        #: True once the progress flusher reads the task's progress from its process's buffer (see
        #: .progressbuffer): the task's progress messages then carry nothing newer.
        self.progress_watched = False
        #: True once the task is known to be no longer this process's (settled elsewhere).
        self.abandoned = False
        #: True once this process lets go of the running task for another to adopt (see .handover).
        self.released = False
        self.stop_reason: Optional[StopReason] = None
        self.stop_at: Optional[float] = None
        self.child: Optional[ChildProcess] = None
        #: Whether the store says the task is paused; the controlling thread makes its tree follow.
        self.pause_wanted = False
        #: The errors of the task's earlier attempts, oldest first (what the store's ``errors`` held).
        self.errors: list[Any] = []
        #: Whether the task has a saved state (an earlier attempt's, or one this run stored): cut off by
        #: a shutdown, it is queued again to resume from it.
        self.has_state = False
        #: The task's W3C ``traceparent`` (see :mod:`...tracing`): its log records carry the trace id.
        self.traceparent: Optional[str] = None
        #: When the task was queued (the start of its ``mpc.queue`` span).
        self.created_at: Optional[float] = None
        self._wake = wake
        # Guards stop_reason, stop_at and child.
        self._lock = threading.Lock()

    def request_stop(self, reason: StopReason) -> None:
        """Ask the task to stop; the first reason given is the one recorded (memory overrides, and so does an
        expired pause over the request its own stop wrote: the feed may hand that event over first)."""
        with self._lock:
            overrides = reason is StopReason.MEMORY or (
                reason is StopReason.PAUSE_EXPIRED and self.stop_reason is StopReason.REQUESTED)
            if self.stop_reason is not None and not overrides:
                return
            self.stop_reason = reason
            if self.stop_at is None:
                self.stop_at = time.monotonic()
            child = self.child
        if child is not None:
            child.send(StopTask(self.uuid, finish=self.stop_reason is StopReason.FINISH))
        self._wake()

    @property
    def stopping(self) -> bool:
        """Whether a stop (of any reason) was asked for."""
        return self.stop_reason is not None

    def request_pause(self, paused: bool) -> None:
        """Suspend (or resume) the task's process tree, as the store now says (see :mod:`.pausing`)."""
        if paused != self.pause_wanted:
            self.pause_wanted = paused
            self._wake()

    def add_log_lines(self, lines: list[str]) -> None:
        """Keep lines for the task's log (the oldest unwritten ones go first past the per-task budget)."""
        if not lines:
            return
        for line in lines:
            self.log_lines.append(line)
            self._log_bytes += len(line)
        while self._log_bytes > defaults.LOG_KEEP_BYTES and self.log_lines:
            self._log_bytes -= len(self.log_lines.popleft())
        self.dirty = True

    def take_log_lines(self) -> list[str]:
        """The unwritten log lines, now counted as written."""
        lines = list(self.log_lines)
        self.log_lines.clear()
        self._log_bytes = 0
        return lines

    def abandon(self) -> None:
        """The task was settled by another process: its run here must end without a record."""
        self.abandoned = True
        self._wake()

    def release(self) -> None:
        """Stop supervising the task and leave its process running, for another serving process to adopt."""
        self.released = True
        self._wake()

    def attach(self, child: ChildProcess) -> None:
        """Record the process running the task; a stop requested before now is passed on."""
        with self._lock:
            self.child = child
            pending = self.stop_reason is not None
            finish = self.stop_reason is StopReason.FINISH
        if pending:
            child.send(StopTask(self.uuid, finish=finish))


@dataclass
class Outcome:
    """How a task ended: its terminal status and the fields to store with it."""

    status: TaskStatus
    fields: dict[str, Any]
    child_alive: bool
    #: For an exception raised by ``execute``: whether it matched the task class's ``retry_on``.
    retry_match: Optional[bool] = None


@dataclass
class Observation:
    """What a controlling thread saw of one run, the input of :func:`classify`."""

    stop_reason: Optional[StopReason]
    done: Optional[Done]
    exited: bool
    exit_code: Optional[int]
    timeout: Optional[float]
    progress: Any = None
    percent: Optional[float] = None
    usage: TreeUsage = field(default_factory=TreeUsage)
    ended_at: float = 0.0


class Supervisor:
    """Runs tasks in child processes for one controlling thread.

    :param publish: called with each event the supervisor's store writes produce.
    :param flusher: writes the progress of the runtime's tasks together (see :mod:`.flusher`); None: each
        controlling thread writes its task's own, every ``PROGRESS_INTERVAL`` seconds.
    """

    def __init__(self, settings: Settings, store: TaskStore, owner: str, logs: LogListener, wake_fd: int,
                 publish: Callable[[Event], None], logger: logging.Logger, retrier: Retrier,
                 flusher: Optional[ProgressFlusher] = None) -> None:
        self.settings = settings
        self.owner = owner
        self.store = store
        self.logs = logs
        self.wake_fd = wake_fd
        self._publish = publish
        self._logger = logger
        self._retrier = retrier
        self._flusher = flusher
        self._schedule = Schedule(
            stop_grace=settings.stop_grace,
            sample_every=(defaults.SAMPLE_INTERVAL_WITH_MEMORY_LIMIT if settings.max_memory
                          else defaults.SAMPLE_INTERVAL),
            sample_every_later=None if settings.max_memory else defaults.SAMPLE_INTERVAL_LATER,
            max_pause=settings.max_pause, timeout_while_paused=settings.timeout_while_paused)
        self._levels_cache: dict[str, int] = {}
        self._levels_at = 0.0
        self._flush_failed = False
        self._poller = Poller()
        #: Whether task processes write progress to a buffer that the flusher reads (see .progressbuffer).
        self._buffers = flusher is not None and buffers_supported()

    def run(self, run: TaskRun, child: ChildProcess, args: dict[str, Any], context: dict[str, Any],
            started: Optional[Event] = None, state: Any = None) -> Optional[Outcome]:
        """Start ``run`` in ``child`` and return once the task has ended (None: it was released, see
        :meth:`supervise`).

        :param started: the ``started`` event when the claim recorded ``child`` already (a reused
            process); else the process is recorded here, once the task was sent to it.
        :param state: the task's saved state (from the claimed row), its ``self.state``.
        """
        run.attach(child)
        child.send(RunTask(run.uuid, args, context, self._levels(), self.settings.limits, state,
                           progress_every=self._progress_every(), progress_buffer=self._buffers))
        if started is None:
            # The task runs already: an outage here is waited out (the pid is what stops and kills go by).
            started = self._retrier.call("recording a task's process", lambda: self.store.start(
                run.uuid, self.owner, child.pid, child.create_time or 0.0))
        if started is None:  # settled elsewhere between the claim and now
            run.abandon()
        else:
            self._publish(started)
        return self.supervise(run, child)

    def supervise(self, run: TaskRun, child: ChildProcess) -> Optional[Outcome]:
        """Watch ``run``, running in ``child`` already, until it ends, and classify its end.

        Also what an adopting process does with a task it took over (see :mod:`.handover`).
        Returns None when the run was released before it ended: its latest progress and log lines
        are written, and its process goes on for another serving process to adopt.
        """
        usage = run.usage = TreeUsage()
        if not self.settings.fresh_process and child.process is not None:
            usage.cpu_base = cpu_seconds(child.process)  # the CPU its earlier tasks used is not this task's
        done = self._watch(run, child, usage)
        if self._flusher is not None:  # from here on this thread writes the run's progress (or its end does)
            self._flusher.forget(run)
        self._read_buffer(run, child)
        if done is None and run.released and not child.exited:
            if not wait_ready([child.exit_fd], 0):
                self._flush(run, direct=True)
                return None
            # It ended before the release was said: its end is this process's to record.
            child.read_exit()
            done, _ = self._receive(run, child, None)
            if child.output is not None:
                run.add_log_lines(child.output.drain())
        if done is not None and done.kind == "error":  # the traceback, where the dashboard says it is
            run.add_log_lines(traceback_lines(done.error, time.time(), self._logger.name))
        self._write_log(run)
        if not child.exited and done is not None and not self.settings.fresh_process:
            self._reap_descendants(child, done.usage.children)
        else:  # whatever the task left behind (its group went with it when the fork server reaped it)
            child.signal_tree(signal.SIGKILL, usage.seen.values())
        observation = Observation(
            stop_reason=run.stop_reason, done=done, exited=child.exited, exit_code=child.exit_code,
            timeout=run.timeout, progress=run.progress, percent=run.percent, usage=usage, ended_at=time.time())
        return classify(observation, self.settings)

    def _progress_every(self) -> float:
        """Seconds between two progress messages of a task: one per write of its progress, no more (a value then
        waits at most an interval in the task and one in the flusher: visible within 0.4 s by default). Each
        message wakes a controlling thread of the serving process: two per write cost the web tier twice as much
        for values a write would have coalesced anyway."""
        if self._flusher is not None:
            return self._flusher.interval
        return self._schedule.flush_every

    def _levels(self) -> dict[str, int]:
        """The server's logger levels, computed at most once a second."""
        now = time.monotonic()
        if now >= self._levels_at:
            self._levels_cache, self._levels_at = logger_levels(), now + 1.0
        return self._levels_cache

    def _watch(self, run: TaskRun, child: ChildProcess, usage: TreeUsage) -> Optional[Done]:
        pause = TreePause(child, usage)
        done: Optional[Done] = None
        try:
            done = self._watch_run(run, child, usage, pause)
            return done
        finally:
            if done is not None or not run.released:  # a released task stays as it is, paused or not
                pause.release()  # a reused process must not wait frozen for its next task

    def _watch_run(self, run: TaskRun, child: ChildProcess, usage: TreeUsage, pause: TreePause) -> Optional[Done]:
        watchdog = Watchdog(self._schedule, run.started, run.timeout)
        done: Optional[Done] = None
        conn_open = True
        while True:
            if run.released and done is None:
                return None
            now = time.monotonic()
            pause.follow(run, watchdog, now)
            state = dict(stop_at=run.stop_at, stopping=run.stop_reason is not None, dirty=run.dirty,
                         ended=done is not None)
            for action in watchdog.due(now, **state):  # type: ignore[arg-type]
                self._act(action, run, child, usage, watchdog)
            if run.abandoned and not watchdog.killed:
                child.signal_tree(signal.SIGKILL, usage.seen.values())
                watchdog.killed_now()
            state.update(stopping=run.stop_reason is not None, dirty=run.dirty)
            timeout = watchdog.sleep_for(time.monotonic(), **state)  # type: ignore[arg-type]
            conn_fd = child.conn.fileno() if conn_open else -1
            watched: set[int] = {child.exit_fd, self.wake_fd}
            # Not while suspended: a message half written when the tree stopped would block the read.
            if conn_open and not pause.paused:
                watched.add(conn_fd)
            output = child.output
            if output is not None:
                watched.update(output.fds())
            ready = self._poller.wait(watched, timeout)
            if self.wake_fd in ready:
                _drain_fd(self.wake_fd)
            if conn_open and conn_fd in ready:
                done, conn_open = self._receive(run, child, done)
            if output is not None:  # after the channel: a log record sent before a print comes first
                for fd in output.fds():
                    if fd in ready:
                        run.add_log_lines(output.read(fd))
            if child.exit_fd in ready:
                child.read_exit()
                if conn_open:
                    done, conn_open = self._receive(run, child, done)
                if output is not None:  # what it wrote last (a process it left may write on: not waited for)
                    run.add_log_lines(output.drain())
                return done
            if done is not None and not self.settings.fresh_process:
                return done

    def _act(self, action: Action, run: TaskRun, child: ChildProcess, usage: TreeUsage,
             watchdog: Watchdog) -> None:
        if action is Action.TIMEOUT:
            run.request_stop(StopReason.TIMEOUT)
        elif action is Action.SAMPLE:
            if child.process is not None and not child.exited:
                sample(child.process, usage)
                if time.monotonic() - run.usage_written_at >= defaults.USAGE_WRITE_INTERVAL:
                    self._progressed(run)  # a task writing no progress still shows its usage every few seconds
            limit = self.settings.max_memory
            if limit and usage.memory_now > limit and not watchdog.killed:
                run.request_stop(StopReason.MEMORY)
                child.signal_tree(signal.SIGKILL, usage.seen.values())
                watchdog.killed_now()
        elif action is Action.TERMINATE:
            child.signal_tree(signal.SIGTERM, usage.seen.values())
        elif action is Action.KILL:
            child.signal_tree(signal.SIGKILL, usage.seen.values())
        elif action is Action.FLUSH:
            self._flush(run)
        elif action is Action.PAUSE_EXPIRED:
            self._end_pause(run)

    def _end_pause(self, run: TaskRun) -> None:
        """End a pause that lasted ``max_pause``: resume the task, or stop it, as ``pause_expiry`` says.

        The change is written to the store as a PATCH or a DELETE would write it (events ``resumed`` or
        ``stopping``), so every process sees it; this run follows it at once. A pause that ended
        meanwhile (resumed, stopped or settled elsewhere) is left as it is; a store outage is tried again
        by the watchdog a little later.
        """
        stop = self.settings.pause_expiry == "stop"
        try:
            if stop:
                row, event = self.store.request_stop(run.uuid, emitter=self.owner)
            else:
                row, event = self.store.resume(run.uuid, emitter=self.owner)
        except StoreError as exc:
            self._logger.warning("Cannot end the pause of task %s now: %s", run.uuid, exc)
            return
        except MPCError:  # no longer paused: resumed, stopped or ended meanwhile
            return
        if event is None:
            return
        self._logger.warning("Task %s was paused for %g s (max_pause): it is %s.", run.uuid,
                             self.settings.max_pause or 0.0, "stopped" if stop else "resumed")
        if stop and row.get("status") == TaskStatus.STOPPING:
            run.request_stop(StopReason.PAUSE_EXPIRED)  # kept over the request its event makes, whichever comes first
        elif not stop and row.get("status") == TaskStatus.RUNNING:
            run.request_pause(False)
        self._publish(event)

    def _receive(self, run: TaskRun, child: ChildProcess, done: Optional[Done]) -> tuple[Optional[Done], bool]:
        """Read every message waiting on the channel; return (done message, channel still open)."""
        conn = child.conn
        try:
            while conn.poll():
                message: Report = conn.recv()
                if isinstance(message, LogRecordMessage):
                    if run.traceparent is not None:  # for the app's handlers and formats (see .logs)
                        message.record.trace_id = trace_id(run.traceparent)
                        message.record.traceparent = run.traceparent
                    self.logs.put(message.record)
                    run.add_log_lines([log_line(message.record)])
                elif isinstance(message, Output) and message.uuid == run.uuid:
                    run.add_log_lines(message.lines)
                elif getattr(message, "uuid", None) != run.uuid:
                    continue
                elif isinstance(message, Progress):
                    if run.progress_watched:
                        continue  # the buffer holds this value or a later one: the flusher reads it
                    run.progress = message.value
                    if message.buffer_fd is not None:
                        self._watch_buffer(run, child, message.buffer_fd)
                    self._progressed(run)
                elif isinstance(message, Percent):
                    run.percent = message.value
                    self._progressed(run)
                elif isinstance(message, SaveState):
                    self._save_state(run, child, message)
                elif isinstance(message, Done):
                    done = message
                    if not self.settings.fresh_process:
                        return done, True
        except (EOFError, OSError):
            return done, False
        return done, True

    def _watch_buffer(self, run: TaskRun, child: ChildProcess, fd: int) -> None:
        """Have the flusher read the run's later progress from the progress buffer ``fd`` of its process (opened
        once per process; a buffer that cannot be opened leaves the run to the task's rarer messages)."""
        if self._flusher is None:
            return
        if child.progress_reader is None and not child.progress_reader_failed:
            child.progress_reader = open_reader(child.pid, fd)
            if child.progress_reader is None:
                child.progress_reader_failed = True
                self._logger.warning("Cannot read the progress buffer of task process %d: the progress of its "
                                     "tasks comes every %g s.", child.pid, MESSAGE_EVERY)
        if child.progress_reader is not None:
            run.progress_watched = True
            self._flusher.watch(run, child.progress_reader)

    @staticmethod
    def _read_buffer(run: TaskRun, child: ChildProcess) -> None:
        """Take the run's latest progress from its process's buffer (once the flusher no longer reads it)."""
        if child.progress_reader is not None:
            changed, value = child.progress_reader.read(run.uuid)
            if changed:
                run.progress = value

    def _save_state(self, run: TaskRun, child: ChildProcess, message: SaveState) -> None:
        """Store the state the task saved, and tell it whether the store holds it.

        One attempt, no retry: the task waits for the answer (bounded on its side), and a later
        save replaces this one anyway. Progress is not flushed with it (it has its own pace).
        """
        try:
            stored = self.store.save_state(run.uuid, self.owner, json.loads(message.state_json))
        except StoreError as exc:
            self._logger.warning("Cannot save the state of task %s: %s", run.uuid, exc)
            stored = False
        if stored:
            run.has_state = True
        child.send(StateSaved(run.uuid, message.number, stored))

    def _write_log(self, run: TaskRun) -> None:
        lines = run.take_log_lines()
        if not lines:
            return
        try:
            self.store.logs.append(run.uuid, lines)
        except StoreError as exc:  # the log is best kept; the task goes on
            self._logger.warning("Cannot keep %d log line(s) of task %s: %s", len(lines), run.uuid, exc)

    def _progressed(self, run: TaskRun) -> None:
        """The run's progress, percent or usage changed: have it written (by the flusher, if there is one)."""
        if self._flusher is not None:
            self._flusher.mark(run)
        else:
            run.dirty = True

    def _flush(self, run: TaskRun, direct: bool = False) -> None:
        """Write the run's log lines and, without a flusher (or ``direct``), its progress."""
        run.dirty = False
        self._write_log(run)
        if self._flusher is not None and not direct:
            return
        try:
            event = self.store.progress(run.uuid, self.owner, run.progress, run.percent, usage=(
                run.usage.figures() if run.usage is not None else None))
            run.usage_written_at = time.monotonic()
        except StoreError as exc:  # kept in memory: the next flush (or the end record) writes it
            run.dirty = True
            if not self._flush_failed:
                self._logger.warning("Cannot write the progress of task %s: %s", run.uuid, exc)
            self._flush_failed = True
            return
        self._flush_failed = False
        if event is not None:
            self._publish(event)

    @staticmethod
    def _reap_descendants(child: ChildProcess, reported: Optional[list[int]]) -> None:
        """Kill what a task left behind in a process that will run more tasks.

        The child reports its live children when a task ends; only if it could not
        (no /proc support) or some are left is the whole process table scanned.
        """
        if reported == [] or child.process is None:
            return
        try:
            leftovers = child.process.children(recursive=True)
        except psutil.Error:
            return
        signal_processes(leftovers, signal.SIGKILL)


class Poller:
    """Waits for descriptors to become readable, keeping them registered from one wait to the next.

    A controlling thread waits on the same few descriptors (its task's channel, exit and output pipes, its
    wake-up pipe) at every message its task sends: :func:`multiprocessing.connection.wait` built and filled
    a new selector each time, a cost paid many times a second per busy task. This one ``poll`` set only
    changes when the watched descriptors do (a new task, a closed pipe). ``poll`` rather than ``epoll``:
    its set lives in this process, so a descriptor closed (and its number reused) between two waits cannot
    leave a stale registration in the kernel.
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._fds: set[int] = set()

    def wait(self, fds: set[int], timeout: Optional[float]) -> set[int]:
        """The descriptors of ``fds`` that are readable (or at their end) within ``timeout`` seconds (None:
        no limit); an empty set when none is."""
        if fds != self._fds:
            for fd in self._fds - fds:
                self._poll.unregister(fd)
            for fd in fds - self._fds:
                self._poll.register(fd, select.POLLIN)
            self._fds = set(fds)
        ms = None if timeout is None else math.ceil(max(0.0, timeout) * 1000)
        return {fd for fd, _ in self._poll.poll(ms)}


def log_line(record: logging.LogRecord) -> str:
    """A task's log record as one line of its kept log; the trace id of a task that has one follows its
    logger's name (``trace_id=<32 hex digits>``)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.created))
    traced = getattr(record, "trace_id", None)
    name = f"{record.name} trace_id={traced}" if traced else record.name
    return f"{when} {record.levelname} {name}: {record.getMessage()}"


def _drain_fd(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def classify(seen: Observation, settings: Settings) -> Outcome:
    """Turn what was observed of a run into a terminal status and the fields recorded with it."""
    usage = seen.usage
    report = seen.done.usage if seen.done is not None else None
    fields: dict[str, Any] = {
        "ended_at": seen.ended_at,
        "exit_code": seen.exit_code if seen.exited else None,
        "progress": seen.progress,
        "percent": seen.percent,
        "memory_peak": max(usage.memory_peak, report.maxrss if report else 0) or None,
        "cpu_time": max(usage.cpu_time if settings.fresh_process else 0.0,
                        report.cpu_time if report else 0.0) or None,
    }
    if seen.done is not None and seen.done.artifacts is not None:
        fields["artifacts"] = seen.done.artifacts
    reason = seen.stop_reason
    alive = not seen.exited
    if reason is StopReason.MEMORY:
        fields["error"] = error_record(
            "MemoryLimitExceeded", f"The task's process tree used {usage.memory_now or usage.memory_peak} bytes "
                                   f"of memory, over the limit of {settings.max_memory} bytes, and was killed.")
        return Outcome(TaskStatus.FAILED, fields, alive)
    if seen.done is not None:
        if seen.done.kind == "ok":
            fields["result"] = json.loads(seen.done.result_json or "null")
            if reason is StopReason.FINISH:  # asked to finish now, it returned its answer so far
                fields["stopped_with_result"] = True
                return Outcome(TaskStatus.STOPPED, fields, alive)
            return Outcome(TaskStatus.SUCCEEDED, fields, alive)
        if seen.done.kind == "error":
            # Clipped where it is recorded (the task process clips it too): the store never holds more.
            error = seen.done.error
            fields["error"] = None if error is None else clip_error(error, settings.limits.message_bytes)
            return Outcome(TaskStatus.FAILED, fields, alive, retry_match=seen.done.retryable)
        return _stopped(reason, fields, alive, seen.timeout, None, settings)
    how = describe_exit(seen.exit_code if seen.exited else None)
    if reason is None:
        fields["error"] = error_record("ProcessDied", f"The task process {how} before returning a result.")
        return Outcome(TaskStatus.FAILED, fields, False)
    return _stopped(reason, fields, False, seen.timeout, how, settings)


def _stopped(reason: Optional[StopReason], fields: dict[str, Any], alive: bool, timeout: Optional[float],
             how: Optional[str], settings: Settings) -> Outcome:
    killed = f" It did not stop within {settings.stop_grace:g} s and {how}." if how else ""
    error: Optional[ErrorRecord] = None
    if reason is StopReason.TIMEOUT:
        fields["error"] = error_record("TaskTimeout", f"The task ran longer than its timeout of {timeout:g} s.{killed}")
        return Outcome(TaskStatus.TIMED_OUT, fields, alive)
    if reason is StopReason.SHUTDOWN:
        error = error_record("Shutdown", f"The task was stopped because its server shut down.{killed}")
    elif reason is StopReason.PAUSE_EXPIRED:
        error = error_record("PauseExpired", f"The task was stopped because it stayed paused for "
                                             f"{settings.max_pause or 0.0:g} s (max_pause).{killed}")
    elif how:
        error = error_record("Killed", f"The task was asked to stop.{killed}")
    if error is not None:
        fields["error"] = error
    return Outcome(TaskStatus.STOPPED, fields, alive)
