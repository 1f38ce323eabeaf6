"""What runs inside a task process: receive a task, run ``execute``, report back.

The messages are the dataclasses of :mod:`.protocol`: commands :class:`RunTask`,
:class:`StopTask` and :class:`Exit` come in; :class:`Progress`, :class:`Percent`,
:class:`LogRecordMessage` and, once per task, :class:`Done` go out. ``save_state()`` sends
:class:`SaveState` and waits for its :class:`StateSaved`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import resource
import threading
import time
from typing import Any, Optional, Type

from .. import defaults, task as task_module
from ..artifacts import ArtifactWriter
from ..exceptions import AbortException, StateTooLarge
from ..jsonvalues import too_deep
from .progressbuffer import MESSAGE_EVERY, ProgressBuffer, supported as buffers_supported
from .proctree import IDLE_NAME, set_process_name, task_process_name
from .capture import OutputCapture, flush_python_streams
from .channel import PacketChannel
from .logs import ChannelQueue, MetaMPLoggerConfigurator, apply_logger_levels
from .protocol import (
    Command, Done, Exit, Limits, LogRecordMessage, Output, Percent, Progress, RunTask, SaveState, StateSaved,
    StopTask, Usage, error_record, exception_record,
)
from .retries import RetryPolicy
from ..task import MetaMPTask

#: Seconds between two progress messages of a task at least, whatever its :class:`RunTask` says.
PUBLISH_INTERVAL = defaults.PUBLISH_INTERVAL


_NOTHING = object()

#: Made at import, so that a task process finds them in the fork server's memory instead of making them.
_LOGGER = logging.getLogger(__name__)
#: ``json.dumps(value, allow_nan=False)`` without a new encoder per call (NaN and Infinity are no JSON).
_STRICT_JSON = json.JSONEncoder(allow_nan=False)


#: Progress values that are JSON-serialisable by their type alone (checked without encoding).
_JSON_SCALARS = frozenset({int, float, str, bool, type(None)})
_INFINITIES = (math.inf, -math.inf)


class _Channel:
    """The child's end of the task channel (one task at a time).

    Progress is coalesced here: :meth:`publish` only keeps the latest value, and a flusher thread
    sends it at most every ``RunTask.progress_every`` seconds (the serving process's flush interval,
    ``PUBLISH_INTERVAL`` at least), so a task may report progress in a tight loop at the cost of an
    attribute store. The last value is always sent before the task's end.

    When the serving process asks for it (``RunTask.progress_buffer``), values go to the process's progress
    buffer instead (see :mod:`.progressbuffer`), at most every ``PUBLISH_INTERVAL``, and a message carries
    the first value of a task, one every ``MESSAGE_EVERY`` seconds after it, and the last.
    """

    def __init__(self, conn: PacketChannel) -> None:
        self._conn = conn
        self.task_id: Optional[str] = None
        self._stop = False
        #: The stop asked for is a finish (see MetaMPTask.finishing).
        self._finish = False
        self._pending: list[Command] = []  # commands read while a task ran, for the next task
        self.exit_requested = False
        # Sends come from the task's thread and from the flusher: one message at a time.
        self._send_lock = threading.Lock()
        # Progress waiting to be sent (always the running task's: it is flushed before each end),
        # and whether the flusher was told.
        self._progress: Any = _NOTHING
        self._armed = False
        self._kick: Optional[threading.Event] = None  # made with the flusher thread, by the first publish
        self._flush_lock = threading.Lock()
        self._next_send = 0.0
        self._every = PUBLISH_INTERVAL
        #: The process's progress buffer (made by the first task that uses one), and whether this task does.
        self._buffer: Optional[ProgressBuffer] = None
        self._buffered = False
        #: Monotonic time of the next progress message of a buffered task; its latest value not sent as one.
        self._next_message = 0.0
        self._unsent: Any = _NOTHING
        self._limit = 0
        self._short_str = 0
        self._state_limit = 0
        self._logger = _LOGGER
        # Reads of the connection come from the task's thread, or from a thread of it saving its state.
        self._recv_lock = threading.Lock()
        #: Numbers the task's saves, so that a late answer to one that timed out is told apart.
        self._saves = 0
        #: Seconds a save waits for the serving process's answer.
        self.ack_timeout = defaults.STATE_ACK_TIMEOUT

    def send(self, message: object) -> None:
        # What Connection.send does, less its ForkingPickler (made per message, for what only
        # descriptors and connections need): the serving process's recv() reads it the same.
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self._conn.send_bytes(data)

    def begin(self, command: RunTask, logger: logging.Logger) -> None:
        self.task_id = command.uuid
        self._stop = self._finish = False
        self._every = max(PUBLISH_INTERVAL, command.progress_every)
        self._buffered = False
        if command.progress_buffer and buffers_supported():
            try:
                if self._buffer is None:
                    self._buffer = ProgressBuffer()
                self._buffered = True
                self._every = PUBLISH_INTERVAL  # a write to the buffer wakes no one
            except OSError:  # no memfd here after all: messages, as without the buffer
                pass
        self._next_message = 0.0
        self._unsent = _NOTHING
        self._limit = command.limits.progress_bytes
        # A string this short cannot encode to more than the limit (JSON escapes take 6 bytes at most).
        self._short_str = self._limit // 6
        self._state_limit = command.limits.state_bytes
        self._logger = logger

    def publish(self, value: Any) -> None:
        kind = type(value)
        if kind is float:
            if value != value or value in _INFINITIES:
                self._refuse(f"{value!r} is not a JSON number")
                return
        elif kind is str:
            if len(value) > self._short_str and len(json.dumps(value)) > self._limit:
                self._refuse(f"it has {len(value)} characters, over the limit of {self._limit} bytes")
                return
        elif kind not in _JSON_SCALARS:
            if too_deep(value, defaults.MAX_VALUE_DEPTH):
                # Checked here, in the task: a value this deep would break the pickling and JSON encoding
                # that carry it to the store (and with them the thread that sends progress).
                raise ValueError(f"upload_status() needs a value nested at most {defaults.MAX_VALUE_DEPTH} "
                                 f"levels deep; nothing was published, the previous progress stays.")
            try:
                size = len(_STRICT_JSON.encode(value))
            except TypeError as exc:
                raise TypeError(f"upload_status() needs a JSON-serialisable value: {exc}") from None
            except ValueError as exc:  # NaN or Infinity inside: not valid JSON for any client
                self._refuse(str(exc))
                return
            if size > self._limit:
                self._refuse(f"it encodes to {size} bytes, over the limit of {self._limit} bytes")
                return
        self._progress = value
        if not self._armed:
            self._arm()

    def _refuse(self, why: str) -> None:
        self._logger.warning("upload_status() of task %s refused: %s; the previous progress stays.",
                             self.task_id, why)

    def _arm(self) -> None:
        self._armed = True
        if self._kick is None:
            self._kick = threading.Event()
            threading.Thread(target=self._flush_loop, args=(self._kick,), name="mpc-progress",
                             daemon=True).start()
        self._kick.set()

    def _flush_loop(self, kick: threading.Event) -> None:
        while True:
            kick.wait()
            kick.clear()
            delay = self._next_send - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                self.flush_progress()
            except OSError:  # the serving process is gone; the task's own next send will notice
                return
            except Exception:  # a value that cannot be sent is dropped; later ones must still go
                self._logger.exception("Progress of task %s could not be sent; it is dropped.", self.task_id)

    def flush_progress(self, final: bool = False) -> None:
        """Send the latest unsent progress value now (``final``: the task ended, its last value goes as a
        message too)."""
        with self._flush_lock:
            self._armed = False  # before taking the value: a publish from now on arms again
            pending, self._progress = self._progress, _NOTHING
            buffer = self._buffer if self._buffered else None
            if buffer is None:
                if pending is not _NOTHING:
                    self.send(Progress(self.task_id, pending))
                    self._next_send = time.monotonic() + self._every
                return
            now = time.monotonic()
            if pending is not _NOTHING:
                buffer.write(self.task_id or "", _STRICT_JSON.encode(pending))
                self._next_send = now + self._every
                self._unsent = pending
            if self._unsent is not _NOTHING and (final or now >= self._next_message):
                value, self._unsent = self._unsent, _NOTHING
                self.send(Progress(self.task_id, value, buffer.fd))
                self._next_message = now + MESSAGE_EVERY

    def publish_percent(self, percent: float) -> None:
        self.send(Percent(self.task_id, percent))

    def stop_requested(self) -> bool:
        if not self._recv_lock.acquire(blocking=False):  # a save reads the connection now, and keeps the stop
            return self._stop
        try:
            while not self._stop and self._conn.poll():
                self._take(self._conn.recv())
        finally:
            self._recv_lock.release()
        return self._stop

    def finish_requested(self) -> bool:
        """Whether the stop requested (see :meth:`stop_requested`) is a finish: the task is to return now."""
        return self._finish

    def save_state(self, value: Any) -> bool:
        """Have ``value`` stored as the task's saved state; return True once the store holds it.

        The value is checked here (JSON without NaN or Infinity, at most ``max_state_size`` bytes),
        sent to the serving process as :class:`SaveState`, and the answer :class:`StateSaved` awaited
        for at most :attr:`ack_timeout` seconds. Commands read meanwhile are kept as
        :meth:`stop_requested` keeps them (a stop is seen by the next ``checkpoint()``). No answer in
        time, a refusal (the task is no longer this server's) or a lost serving process is logged
        and gives False: the task goes on.

        :raises TypeError: ``value`` is not JSON-serialisable.
        :raises ValueError: it holds NaN or Infinity, or nests too deep.
        :raises StateTooLarge: its JSON is over the limit.
        """
        if too_deep(value, defaults.MAX_VALUE_DEPTH):
            raise ValueError(f"save_state() needs a value nested at most {defaults.MAX_VALUE_DEPTH} levels deep; "
                             f"nothing was saved.")
        try:
            text = _STRICT_JSON.encode(value)
        except TypeError as exc:
            raise TypeError(f"save_state() needs a JSON-serialisable value: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"save_state() needs a JSON value (NaN and Infinity are not JSON): {exc}") \
                from None
        if len(text) > self._state_limit:  # ASCII: one byte per character
            raise StateTooLarge(len(text), self._state_limit)
        with self._recv_lock:
            self._saves += 1
            number = self._saves
            try:
                self.send(SaveState(self.task_id or "", number, text))
                answer = self._await_saved(number)
            except (OSError, EOFError):
                self._logger.warning("save_state() of task %s: the serving process is gone; the state may "
                                     "not be stored.", self.task_id)
                return False
        if answer is None:
            self._logger.warning("save_state() of task %s: no answer from the serving process within %g s; "
                                 "the state may not be stored, and the task goes on.", self.task_id,
                                 self.ack_timeout)
            return False
        if not answer.stored:
            self._logger.warning("save_state() of task %s: the state was not stored (the task is no longer "
                                 "this server's, or the store failed).", self.task_id)
        return answer.stored

    def _await_saved(self, number: int) -> Optional[StateSaved]:
        """Read the connection until the answer to save ``number`` comes (None after the timeout)."""
        deadline = time.monotonic() + self.ack_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._conn.poll(remaining):
                return None
            message = self._conn.recv()
            if isinstance(message, StateSaved):
                if message.uuid == self.task_id and message.number == number:
                    return message
            else:
                self._take(message)

    def _take(self, message: Command) -> None:
        if isinstance(message, StopTask):
            if message.uuid == self.task_id or message.uuid is None:
                if not self._stop:  # the first request says how the task ends
                    self._finish = message.finish
                self._stop = True
        elif isinstance(message, Exit):
            self.exit_requested = True
        elif not isinstance(message, StateSaved):  # a late answer to a save that stopped waiting
            self._pending.append(message)

    def next_command(self) -> Command:
        while self._pending:
            message = self._pending.pop(0)
            if isinstance(message, RunTask):
                return message
        if self.exit_requested:
            return Exit()
        command: Command = self._conn.recv()
        return command


def _usage() -> tuple[float, int]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    return cpu, max(own.ru_maxrss, kids.ru_maxrss) * 1024  # ru_maxrss is in KiB on Linux


def _child_pids() -> Optional[list[int]]:
    """Pids of this process's live children, read cheaply from /proc; None where the kernel does not say."""
    pids: list[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as listing:
                pids += [int(pid) for pid in listing.read().split()]
    except OSError:
        return None
    return pids


def _result(task_id: str, result: Any, limit: int) -> Done:
    """The report of a task that returned ``result``: its JSON, or why it cannot be stored."""
    if too_deep(result, defaults.MAX_VALUE_DEPTH):
        return Done(task_id, "error", error=error_record(
            "ResultNotSerializable", f"execute() returned a value nested more than {defaults.MAX_VALUE_DEPTH} "
                                     f"levels deep, which the store does not take."))
    try:
        text = _STRICT_JSON.encode(result)
    except (TypeError, ValueError, RecursionError) as exc:
        return Done(task_id, "error", error=error_record(
            "ResultNotSerializable",
            f"execute() returned a value of type {type(result).__name__}, which is not JSON-serialisable: "
            f"{str(exc)[:200]}"))
    if len(text) > limit:
        return Done(task_id, "error", error=error_record(
            "ResultTooLarge", f"execute() returned {len(text)} bytes of JSON, over the controller's "
                              f"max_result_size of {limit} bytes."))
    return Done(task_id, "ok", result_json=text)


def _run_one(task_cls: Type[MetaMPTask], channel: _Channel, command: RunTask, reused: bool,
             capture: Optional[OutputCapture]) -> Done:
    """Run one task and return its report.

    :param reused: the process serves more tasks after this one. A process that serves one
        only ends after it: it takes no idle name and lists no children (its whole process
        group goes with it, and the serving process looks at its tree itself).
    :param capture: this process's capture of its output; None when its descriptors 1 and 2
        are pipes from birth, read by the serving process (see :mod:`.capture`).
    """
    task_id = command.uuid
    channel.begin(command, task_cls.logger)
    cpu_before, _ = _usage()
    set_process_name(task_process_name(task_id))  # the proof that this process is the task's
    if capture is not None:
        capture.begin(task_id)
    task = task_cls(task_id, channel, command.context, state=command.state)
    writer = ArtifactWriter(task_id, command.limits, task_cls.logger) if command.limits.artifacts_url else None
    task._artifacts = writer  # type: ignore[attr-defined]  # see MetaMPTask.save_artifact
    task_module._set_current(task)
    try:
        done = _result(task_id, task.execute(**command.args), command.limits.result_bytes)
    except AbortException:
        done = Done(task_id, "aborted")
    except BaseException as exc:  # the task's own failure, whatever it is, is data for the parent
        done = Done(task_id, "error", error=exception_record(exc, command.limits.message_bytes),
                    retryable=RetryPolicy.of(task_cls).retries_raised(exc))
    finally:
        task_module._set_current(None)
        if capture is not None:
            capture.end()
        else:
            flush_python_streams()
        if reused:
            set_process_name(IDLE_NAME)
    artifacts = writer.finish() if writer is not None else None
    channel.flush_progress(final=True)
    cpu_after, maxrss = _usage()
    usage = Usage(cpu_time=cpu_after - cpu_before, maxrss=maxrss, children=_child_pids() if reused else None)
    return Done(done.uuid, done.kind, done.result_json, done.error, usage, done.retryable,
                [dict(info) for info in artifacts] if artifacts is not None else None)


def _send_quietly(channel: _Channel, message: Output) -> None:
    try:
        channel.send(message)
    except OSError:  # the serving process is gone
        pass


#: The channel of this task process (None in the fork server): where its log records go.
_channel: Optional[_Channel] = None
#: Whether the fork server set up this process's logging already (see :func:`prepare_fork_server`).
_logging_ready = False


def _send_log_record(message: object) -> None:
    """Send a log record over this task process's channel (the fork server has none: it prints it)."""
    if _channel is not None:
        _channel.send(message)
    elif isinstance(message, LogRecordMessage) and logging.lastResort is not None:
        logging.lastResort.handle(message.record)


def prepare_fork_server(configurator: Type[MetaMPLoggerConfigurator]) -> None:
    """Set up once, in the fork server, what every task process would otherwise set up at its start.

    The default ``worker_log_setup`` runs here (its QueueHandler sends over whichever channel the
    task process has); an overridden one still runs in each task process, as it always did. The
    protocol's first pickling and JSON encoding fill their caches here too. All of this is then
    shared, copy-on-write, by every task process instead of costing each its own pages.
    """
    global _logging_ready
    if configurator.worker_log_setup is MetaMPLoggerConfigurator.worker_log_setup:
        configurator.worker_log_setup(ChannelQueue(_send_log_record))
        _logging_ready = True
    sample = Done("", "ok", result_json=_STRICT_JSON.encode(None), usage=Usage(children=[]))
    pickle.loads(pickle.dumps(sample))
    pickle.loads(pickle.dumps(RunTask("", {}, {}, {}, Limits(0, 0, 0))))
    pickle.loads(pickle.dumps(SaveState("", 0, "")))


def run_child(conn: PacketChannel, output_captured: bool, task_cls: Type[MetaMPTask],
              configurator: Type[MetaMPLoggerConfigurator], max_tasks: int) -> None:
    """Serve tasks over ``conn`` until ``max_tasks`` ran (0 = no limit) or the parent says exit.

    :param output_captured: the fork server gave this process pipes for its descriptors 1 and 2.
    """
    global _channel
    channel = _channel = _Channel(conn)
    if not _logging_ready:
        configurator.worker_log_setup(ChannelQueue(_send_log_record))
    capture = None if output_captured else OutputCapture(
        lambda task_id, lines: _send_quietly(channel, Output(task_id, lines)))
    done = 0
    while max_tasks <= 0 or done < max_tasks:
        try:
            message = channel.next_command()
        except EOFError:
            return
        if isinstance(message, Exit):
            return
        if not isinstance(message, RunTask):
            continue
        apply_logger_levels(message.levels)
        report = _run_one(task_cls, channel, message, reused=max_tasks != 1, capture=capture)
        try:
            channel.send(report)
        except OSError:
            return
        done += 1
