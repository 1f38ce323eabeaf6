"""Capturing what a task writes to its standard output and error, at the file-descriptor level.

While a task runs, file descriptors 1 and 2 of its process are pipes: a C extension's ``printf``
and a child process's output are caught as well as ``print``. The bytes are copied on to the
original descriptors (the server's console sees them as before) and the complete lines are kept
in the task's log.

Two ways, by process kind. A process that runs one task (the default) gets its pipes from the
fork server at birth and the serving process reads them (:class:`PipeReader`): no thread is
started in the task process, whose start is what a fresh process per task pays for. A process
that runs many tasks redirects its descriptors around each task and pumps them from a thread of
its own (:class:`OutputCapture`), sending the lines over its channel.
"""
from __future__ import annotations

import os
import select
import sys
import threading
from typing import Any, Callable, Mapping, Optional

#: Seconds the end of a task waits for the pumps to pass on what is left in the pipes.
_DRAIN = 1.0
#: Characters of one line kept (a longer one is cut).
_LINE_MAX = 8192


class OutputCapture:
    """Redirects descriptors 1 and 2 to pipes for the duration of a task.

    :param send: called with each batch of complete lines.
    """

    def __init__(self, send: Callable[[list[str]], None]) -> None:
        self._send = send
        self._saved: list[int] = []
        self._pumps: list[threading.Thread] = []
        self._streams: Optional[tuple[Any, Any]] = None

    def begin(self) -> None:
        """Start capturing (a no-op where the descriptors cannot be redirected)."""
        flush_python_streams()
        pipes: list[tuple[int, int]] = []  # (read end, original descriptor), for the pump
        try:
            for fd in (1, 2):
                read_end, write_end = os.pipe()
                saved = os.dup(fd)
                os.dup2(write_end, fd)
                os.close(write_end)
                self._saved.append(saved)
                pipes.append((read_end, saved))
        except OSError:
            for read_end, _ in pipes:
                os.close(read_end)
            self._restore()
            return
        # One pump for both pipes: a thread is the dearest thing a fresh task process starts.
        pump = threading.Thread(target=self._pump, args=(pipes,), name="mpc-output", daemon=True)
        pump.start()
        self._pumps.append(pump)
        # print() writes to whatever sys.stdout is (a test runner's capture, say): make it the descriptors.
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")

    def end(self) -> None:
        """Put the original descriptors back and pass on what the task wrote last."""
        flush_python_streams()
        if self._streams is not None:
            sys.stdout, sys.stderr = self._streams
            self._streams = None
        self._restore()
        for pump in self._pumps:
            pump.join(_DRAIN)
        self._pumps = []

    def _restore(self) -> None:
        for fd, saved in zip((1, 2), self._saved):
            try:
                os.dup2(saved, fd)  # the pipe's last writer (unless a leftover child holds it) goes away
            except OSError:
                pass
        if not self._pumps:  # nobody pumps (begin failed): the saved copies are ours to close
            for saved in self._saved:
                os.close(saved)
        self._saved = []  # else the pump closes them (a pump kept alive by a leftover child still writes)

    def _pump(self, pipes: list[tuple[int, int]]) -> None:
        """Copy each pipe to its original descriptor and send its complete lines, until every pipe ends."""
        consoles = dict(pipes)
        reader = PipeReader(consoles, on_close=lambda read_end: os.close(consoles[read_end]))
        poller = select.poll()
        for read_end in consoles:
            poller.register(read_end, select.POLLIN)
        while reader.fds():
            try:
                ready = poller.poll()
            except OSError:
                break
            for read_end, _ in ready:
                lines = reader.read(read_end)
                if lines:
                    self._send(lines)
                if read_end not in reader.fds():
                    poller.unregister(read_end)
        reader.close()  # poll failed: release what is left


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
