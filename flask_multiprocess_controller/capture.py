"""Capturing what a task writes to its standard output and error, at the file-descriptor level.

While a task runs, file descriptors 1 and 2 of its process are pipes: a C extension's ``printf``
and a child process's output are caught as well as ``print``. A pump thread per pipe copies the
bytes on to the original descriptors (the server's console sees them as before) and sends the
complete lines to the serving process, which keeps them in the task's log.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable, Optional

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
        _flush_python_streams()
        try:
            for fd in (1, 2):
                read_end, write_end = os.pipe()
                saved = os.dup(fd)
                os.dup2(write_end, fd)
                os.close(write_end)
                self._saved.append(saved)
                pump = threading.Thread(target=self._pump, args=(read_end, saved), name="mpc-output", daemon=True)
                pump.start()
                self._pumps.append(pump)
        except OSError:
            self.end()
            return
        # print() writes to whatever sys.stdout is (a test runner's capture, say): make it the descriptors.
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")

    def end(self) -> None:
        """Put the original descriptors back and pass on what the task wrote last."""
        _flush_python_streams()
        if self._streams is not None:
            sys.stdout, sys.stderr = self._streams
            self._streams = None
        for fd, saved in zip((1, 2), self._saved):
            try:
                os.dup2(saved, fd)  # the pipe's last writer (unless a leftover child holds it) goes away
            except OSError:
                pass
        for pump in self._pumps:
            pump.join(_DRAIN)
        self._pumps = []
        self._saved = []  # the pumps close them (a pump kept alive by a leftover child still writes)

    def _pump(self, read_end: int, console: int) -> None:
        pending = b""
        try:
            while True:
                data = os.read(read_end, 65536)
                if not data:
                    break
                _write_all(console, data)
                pending += data
                *complete, pending = pending.split(b"\n")
                if complete:
                    self._send([_text(line) for line in complete])
            if pending:
                self._send([_text(pending)])
        except OSError:
            pass
        finally:
            os.close(read_end)
            os.close(console)


def _text(line: bytes) -> str:
    return line[:_LINE_MAX].decode("utf-8", "replace").rstrip("\r")


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # the console is gone: the log keeps the lines anyway
        pass


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        flush: Optional[Callable[[], None]] = getattr(stream, "flush", None)
        if flush is not None:
            try:
                flush()
            except (OSError, ValueError):
                pass
