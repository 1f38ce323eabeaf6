"""The task channel: pickled messages over a message-preserving Unix socket.

Why not :class:`multiprocessing.connection.Connection` over a stream socket: a running task
outlives the serving process that reads its channel when that process is replaced (see
:mod:`.handover`), and a reader that dies in the middle of a message would leave the next reader
in the middle of a byte stream. A ``SOCK_SEQPACKET`` socket delivers each packet whole or not at
all, so a new reader always starts at a packet boundary.

A packet holds one message, or one fragment of a message larger than :data:`FRAGMENT` bytes:
its first byte says which (``W`` whole, ``F`` first, ``M`` middle, ``L`` last). A reader that
starts inside a fragmented message (its first reader died after the first fragments) drops the
rest of that message and goes on with the next one: a message can be lost that way, never
misread.
"""
from __future__ import annotations

import pickle
import select
import socket
from typing import Any, Optional

#: Bytes of payload in one packet at most: well below the kernel's default socket buffer, which
#: bounds the size of a packet.
FRAGMENT = 64 * 1024

_WHOLE, _FIRST, _MIDDLE, _LAST = b"W", b"F", b"M", b"L"


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected ends of a new task channel (the serving process's, the task process's)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class PacketChannel:
    """One end of a task channel: :meth:`send` and :meth:`recv` whole pickled messages.

    It offers what the callers used of ``Connection`` (``send``, ``send_bytes``, ``recv``,
    ``poll``, ``fileno``, ``close``), so that :func:`multiprocessing.connection.wait` takes it.
    Sends from several threads must be serialised by the caller (a fragmented message is several
    packets).
    """

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(True)
        self._poller: Optional[select.poll] = None
        self.closed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, message: object) -> None:
        """Send one message (pickled)."""
        self.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))

    def send_bytes(self, data: bytes) -> None:
        """Send one message already pickled."""
        if self.closed:
            raise OSError("the channel is closed")
        sock = self._sock
        if len(data) <= FRAGMENT:
            sock.sendmsg([_WHOLE, data])
            return
        view = memoryview(data)
        last = len(data) - FRAGMENT
        for start in range(0, len(data), FRAGMENT):
            mark = _FIRST if start == 0 else _LAST if start >= last else _MIDDLE
            sock.sendmsg([mark, view[start:start + FRAGMENT]])

    def recv(self) -> Any:
        """The next whole message; EOFError once the other end is closed."""
        parts: Optional[list[bytes]] = None
        while True:
            try:
                packet = self._sock.recv(FRAGMENT + 1)
            except OSError as exc:
                raise EOFError(str(exc)) from None
            if not packet:
                raise EOFError("the channel was closed")
            mark, body = packet[:1], packet[1:]
            if mark == _WHOLE:  # (after an unfinished message, that one is lost)
                return pickle.loads(body)
            if mark == _FIRST:
                parts = [body]
            elif parts is None:
                continue  # the rest of a message whose start an earlier reader took
            else:
                parts.append(body)
                if mark == _LAST:
                    return pickle.loads(b"".join(parts))

    def poll(self, timeout: float = 0.0) -> bool:
        """Whether a packet (or the end of the channel) can be read within ``timeout`` seconds."""
        if self.closed:
            raise OSError("the channel is closed")
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._sock.fileno(), select.POLLIN)
        return bool(self._poller.poll(max(0, int(timeout * 1000))))

    def detach(self) -> int:
        """Give up the descriptor without closing it."""
        self.closed = True
        return self._sock.detach()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()
