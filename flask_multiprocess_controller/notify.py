"""Nudges between the serving processes of one host: "this task ended", "stop this task".

The store is the truth; these datagrams only tell another process to look at it now instead of at
its next poll. So a GET ``?wait=`` answered by one gunicorn worker returns as soon as the worker
running the task records its end, and a DELETE answered by any worker reaches the task at once.
A lost nudge costs only time: every reader still polls the store.

Each runtime listens on an abstract Unix datagram socket named after its controller and its
owner id (``host:pid:create_time``), so a nudge never reaches a recycled pid, and nothing is left
on disk. Processes on other hosts are not nudged; they poll.
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import Callable, Iterable, Optional

#: Longest datagram: a verb and a task uuid.
_MAX = 256


def address(controller: str, owner: str) -> bytes:
    """The abstract socket address of one controller's runtime in one serving process."""
    return b"\0mpc/" + controller.encode() + b"/" + owner.encode()


class HostBus:
    """Listens for nudges to this runtime and sends nudges to the others of this host."""

    def __init__(self, controller: str, owner: str, on_ended: Callable[[str], None],
                 on_stop: Callable[[str], None], logger: logging.Logger) -> None:
        self.controller = controller
        self.owner = owner
        self._on = {b"ended": on_ended, b"stop": on_stop}
        self._logger = logger
        self._peers: tuple[str, ...] = ()
        self._sock: Optional[socket.socket] = None
        self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._out.setblocking(False)
        self._thread: Optional[threading.Thread] = None
        self._closing = False

    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(address(self.controller, self.owner))
        except OSError as exc:  # not fatal: the others poll
            self._logger.warning("No nudges between serving processes (%s); they poll the store instead.", exc)
            sock.close()
            return
        self._sock = sock
        self._thread = threading.Thread(target=self._listen, name=f"mpc-{self.controller}-bus", daemon=True)
        self._thread.start()

    def set_peers(self, owners: Iterable[str]) -> None:
        """The other serving processes of this host that may run or wait for this controller's tasks."""
        self._peers = tuple(o for o in owners if o != self.owner)

    def ended(self, uuid: str) -> None:
        """Tell the other processes of this host that ``uuid`` ended."""
        message = b"ended " + uuid.encode()
        for owner in self._peers:
            self._send(owner, message)

    def stop(self, owner: str, uuid: str) -> None:
        """Tell ``owner`` (on this host) to look at the stop request of ``uuid``."""
        self._send(owner, b"stop " + uuid.encode())

    def _send(self, owner: str, message: bytes) -> None:
        try:
            self._out.sendto(message, address(self.controller, owner))
        except OSError:  # gone, or its buffer is full: it polls
            pass

    def _listen(self) -> None:
        sock = self._sock
        while True:
            try:
                data = sock.recv(_MAX)
            except OSError:
                return
            if self._closing:
                return
            verb, _, uuid = data.partition(b" ")
            handler = self._on.get(verb)
            if handler is None:
                continue
            try:
                handler(uuid.decode())
            except Exception:  # a nudge must never end the listener
                self._logger.exception("Handling a nudge (%r) failed.", data)

    def close(self) -> None:
        self._closing = True
        if self._sock is not None:
            self._send(self.owner, b"bye")
            if self._thread is not None:
                self._thread.join(5)
            self._sock.close()
            self._sock = None
        self._out.close()
