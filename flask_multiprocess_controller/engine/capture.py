"""Capturing what a task writes to its standard output and error, at the file-descriptor level.

While a task runs, file descriptors 1 and 2 of its process are pipes: a C extension's ``printf``
and a child process's output are caught as well as ``print``. The bytes are copied on to the
original descriptors (the server's console sees them as before) and the complete lines are kept
in the task's log.

Two ways, by process kind. A process that runs one task (the default) gets its pipes from the
fork server at birth and the serving process reads them (:class:`PipeReader`): no thread is
started in the task process, whose start is what a fresh process per task pays for. A process
that runs many tasks makes its descriptors pipes at its first task, for the rest of its life, and
pumps them from a thread of its own (:class:`OutputCapture`), sending each task's lines over its
channel.
"""
from __future__ import annotations

import os
import select
import sys
import threading
from typing import Any, Callable, Mapping, Optional

#: Characters of one line kept (a longer one is cut).
_LINE_MAX = 8192


class OutputCapture:
    """Descriptors 1 and 2 of a process that runs many tasks, as pipes from its first task on.

    One pump thread copies the pipes on to the original descriptors and sends the complete lines
    as the running task's (:meth:`begin` names it). :meth:`end` takes what the task left in the
    pipes, its partial last line included, before the task's end is reported: every line reaches
    its own task's log, in order. The pipes and the pump are made once, not per task: a thread
    and four descriptors per task were most of what a reused process paid to start a task.

    :param send: called with a task's uuid and a batch of its complete lines.
    """

    def __init__(self, send: Callable[[str, list[str]], None]) -> None:
        self._send = send
        # Held while lines are read and sent (by the pump, or by end()): they go out in order,
        # each as the task's that ran when it was read.
        self._lock = threading.Lock()
        self._task: Optional[str] = None
        self._reader: Optional[PipeReader] = None
        self._write_ends: dict[int, int] = {}  # descriptor (1 or 2) -> write end of its pipe
        self._streams: Optional[tuple[Any, Any]] = None

    def begin(self, task_id: str) -> None:
        """Capture what task ``task_id`` writes (a no-op where the descriptors cannot be redirected)."""
        flush_python_streams()
        if self._reader is None and not self._start():
            return
        for fd, write_end in self._write_ends.items():  # again: the last task may have pointed them elsewhere
            try:
                os.dup2(write_end, fd)
            except OSError:
                pass
        # print() writes to whatever sys.stdout is (a test runner's capture, say): make it the descriptors.
        sys.stdout, sys.stderr = self._streams or (sys.stdout, sys.stderr)
        with self._lock:
            self._task = task_id

    def end(self) -> None:
        """Send what the task wrote last; what is written from now on is no task's until the next begin()."""
        flush_python_streams()
        reader = self._reader
        if reader is None:
            return
        with self._lock:
            lines: list[str] = []
            for fd in reader.fds():
                lines += reader.read(fd)
                lines += reader.take_partial(fd)
            task, self._task = self._task, None
            if lines and task is not None:
                self._send(task, lines)

    def _start(self) -> bool:
        pipes: list[list[Any]] = []  # [descriptor, read end, write end, saved original]
        try:
            for fd in (1, 2):
                read_end, write_end = os.pipe()
                pipes.append([fd, read_end, write_end, None])
                pipes[-1][3] = os.dup(fd)
                os.dup2(write_end, fd)
        except OSError:
            for fd, read_end, write_end, saved in pipes:
                if saved is not None:
                    os.dup2(saved, fd)
                    os.close(saved)
                os.close(read_end)
                os.close(write_end)
            return False
        self._write_ends = {fd: write_end for fd, _, write_end, _ in pipes}
        self._reader = PipeReader({read_end: saved for _, read_end, _, saved in pipes})
        self._streams = (open(1, "w", buffering=1, closefd=False, errors="backslashreplace"),
                         open(2, "w", buffering=1, closefd=False, errors="backslashreplace"))
        threading.Thread(target=self._pump, args=(self._reader,), name="mpc-output", daemon=True).start()
        return True

    def _pump(self, reader: PipeReader) -> None:
        """Copy each pipe to its original descriptor and send its complete lines, for good."""
        poller = select.poll()
        for read_end in reader.fds():
            poller.register(read_end, select.POLLIN)
        while reader.fds():
            try:
                ready = poller.poll()
            except OSError:
                return
            with self._lock:
                lines: list[str] = []
                for read_end, _ in ready:
                    lines += reader.read(read_end)
                    if read_end not in reader.fds():
                        poller.unregister(read_end)
                if lines and self._task is not None:
                    self._send(self._task, lines)


class PipeReader:
    """The reading end of output pipes: the serving process's for a task process that runs one
    task, the pump thread's in a process that runs many.

    :meth:`read` takes what one pipe holds now; the bytes go on to the pipe's console descriptor,
    the complete lines are returned. Non-blocking throughout: a process the task left behind may
    hold a pipe open long after the task ended.

    :param consoles: each pipe's read end and the descriptor its bytes are copied to.
    :param on_close: told of each pipe once it ended, just before it is closed here.
    """

    def __init__(self, consoles: Mapping[int, int], on_close: Callable[[int], None] = lambda fd: None) -> None:
        self._on_close = on_close
        self._consoles = dict(consoles)
        self._pending = {fd: b"" for fd in self._consoles}
        for fd in self._consoles:
            os.set_blocking(fd, False)

    def fds(self) -> list[int]:
        """The pipes still open."""
        return list(self._consoles)

    def read(self, fd: int) -> list[str]:
        """Lines completed by what pipe ``fd`` holds now (the partial last one too once it ended)."""
        lines: list[str] = []
        while fd in self._consoles:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                lines += self._finish(fd)
                break
            _write_all(self._consoles[fd], data)
            *complete, self._pending[fd] = (self._pending[fd] + data).split(b"\n")
            lines += [_text(line) for line in complete]
            if len(data) < 65536:
                break
        return lines

    def take_partial(self, fd: int) -> list[str]:
        """The partial last line pipe ``fd`` holds, as a line of its own (none if it holds none)."""
        rest = self._pending.get(fd, b"")
        if not rest:
            return []
        self._pending[fd] = b""
        return [_text(rest)]

    def drain(self) -> list[str]:
        """Everything the pipes hold now, partial lines included; the pipes are closed."""
        lines: list[str] = []
        for fd in self.fds():
            lines += self.read(fd)
            lines += self._finish(fd)
        return lines

    def _finish(self, fd: int) -> list[str]:
        if fd not in self._consoles:
            return []
        del self._consoles[fd]
        rest = self._pending.pop(fd)
        self._on_close(fd)
        os.close(fd)
        return [_text(rest)] if rest else []

    def close(self) -> None:
        for fd in self.fds():
            self._finish(fd)


def _text(line: bytes) -> str:
    return line[:_LINE_MAX].decode("utf-8", "replace").rstrip("\r")


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # the console is gone: the log keeps the lines anyway
        pass


#: Streams replaced by :func:`use_descriptors_for_print`, kept: freeing one would close its
#: descriptor, whose number a forked process may since have given to something else.
_REPLACED_STREAMS: list[Any] = []


def use_descriptors_for_print() -> None:
    """Make ``sys.stdout``/``sys.stderr`` write to descriptors 1 and 2, whatever they were (a test
    runner's capture, say), so that print() reaches the pipes of the task processes forked from here."""
    _REPLACED_STREAMS.extend((sys.stdout, sys.stderr))
    sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")


def flush_python_streams() -> None:
    """Push what print() buffered to the descriptors."""
    for stream in (sys.stdout, sys.stderr):
        flush: Optional[Callable[[], None]] = getattr(stream, "flush", None)
        if flush is not None:
            try:
                flush()
            except (OSError, ValueError):
                pass
