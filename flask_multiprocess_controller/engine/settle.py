"""What a holder does when no serving process adopted its tasks in time (see :mod:`.handover`).

The same as the shutdown of the serving process would have done, had it not handed them over:
each task is asked to stop, gets ``stop_grace`` seconds to reach a checkpoint, then SIGTERM and
SIGKILL; its end is classified as the controlling thread classifies it (:func:`~.supervisor.classify`,
a stop for a shutdown) and recorded in the store — or the task is queued again when its class is
``restartable`` or it saved state. It runs in the fork server, which is still the parent of the
task processes, with no thread of its own.
"""
from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Any, Optional

from .. import defaults
from .capture import PipeReader
from .channel import PacketChannel
from .handover import wait_readable
from ..exceptions import StoreError
from .protocol import Done, LogRecordMessage, Output, Percent, Progress, StopTask
from ..states import TaskStatus
from .supervisor import Observation, StopReason, classify, log_line

if TYPE_CHECKING:
    from .forkserver import Task, _Server
    from .handover import HandoverConfig
    from ..store import TaskStore

#: Seconds past the SIGKILL that a settle waits for the processes to be reaped at most.
_REAP_MARGIN = 5.0

_UNSET: Any = object()


class _Held:
    """What a holder reads of one task process while it stops it."""

    def __init__(self, task: "Task", fresh_process: bool) -> None:
        self.task = task
        self.fresh_process = fresh_process
        self.channel: Optional[PacketChannel] = PacketChannel(os.dup(task.channel)) if task.channel >= 0 else None
        self.output = PipeReader({os.dup(fd): target for fd, target in zip(task.outputs, (1, 2))})
        self.done: Optional[Done] = None
        self.progress: Any = _UNSET
        self.percent: Any = _UNSET
        self.lines: list[str] = []

    @property
    def running(self) -> bool:
        """Whether the task may still report (its process runs, and has not ended a task of a reused process)."""
        return self.task.exit_code is None and (self.fresh_process or self.done is None)

    def fds(self) -> list[int]:
        return ([self.channel.fileno()] if self.channel is not None else []) + self.output.fds()

    def read(self) -> None:
        """Take every message and output line waiting now."""
        for fd in self.output.fds():
            self.lines += self.output.read(fd)
        channel = self.channel
        if channel is None:
            return
        try:
            while channel.poll():
                message = channel.recv()
                if isinstance(message, Done):
                    self.done = message
                elif isinstance(message, Progress):
                    self.progress = message.value
                elif isinstance(message, Percent):
                    self.percent = message.value
                elif isinstance(message, LogRecordMessage):
                    self.lines.append(log_line(message.record))
                elif isinstance(message, Output):
                    self.lines += message.lines
        except (EOFError, OSError):
            channel.close()
            self.channel = None

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.output.close()


def settle_held(server: "_Server", config: "HandoverConfig", owner: str, store: "TaskStore") -> None:
    """Stop every task process ``server`` holds, then record each task's end (or queue it again)."""
    rows = {row.get("pid"): row for row in store.active(config.controller) if row.get("owner") == owner}
    held = [_Held(task, config.supervision.fresh_process) for task in server.tasks.values()]
    for one in held:
        if one.task.exit_code is None and one.channel is not None:
            try:
                one.channel.send(StopTask(None))
            except OSError:
                pass
    started = time.monotonic()
    term_at = started + config.supervision.stop_grace
    kill_at = term_at + defaults.KILL_AFTER_TERM
    termed = False
    while any(one.running for one in held) and time.monotonic() < kill_at + _REAP_MARGIN:
        now = time.monotonic()
        if now >= term_at and not termed:
            _signal_running(server, held, signal.SIGTERM)
            termed = True
        if now >= kill_at:
            _signal_running(server, held, signal.SIGKILL)
        ready = wait_readable([server.wake_r, *(fd for one in held for fd in one.fds())], 0.1)
        if server.wake_r in ready:
            try:
                while os.read(server.wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        for one in held:
            one.read()
        server.reap()
    for one in held:
        one.read()
        one.close()
        row = rows.get(one.task.pid)
        if row is not None:
            _record(store, config, owner, row, one)


def _signal_running(server: "_Server", held: list[_Held], signum: int) -> None:
    for one in held:
        if one.task.exit_code is None:
            server.signal_group(one.task.pid, signum)


def _record(store: "TaskStore", config: "HandoverConfig", owner: str, row: Any, one: _Held) -> None:
    uuid = row["uuid"]
    try:
        if one.lines:
            store.logs.append(uuid, one.lines)
        seen = Observation(
            stop_reason=StopReason.SHUTDOWN, done=one.done, exited=one.task.exit_code is not None,
            exit_code=one.task.exit_code, timeout=row.get("timeout"),
            progress=row.get("progress") if one.progress is _UNSET else one.progress,
            percent=row.get("percent") if one.percent is _UNSET else one.percent, ended_at=time.time())
        outcome = classify(seen, config.supervision)
        saved = row.get("state_saved_at") is not None and not row.get("stop_requested")
        if outcome.status is not TaskStatus.SUCCEEDED and (config.restartable or saved):
            store.requeue(uuid, owner=owner, emitter=owner)
            return
        fields = dict(outcome.fields)
        if fields.get("error") is not None:
            fields["errors"] = [*(row.get("errors") or []), fields["error"]]
        store.finish(uuid, outcome.status.value, owner=owner, emitter=owner, **fields)
    except StoreError:  # its row stays active under a dead owner: the next reconciliation settles it
        pass
