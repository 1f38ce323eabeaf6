"""One ``LISTEN`` connection per process for every PostgreSQL store of one database and schema.

Each controller has a store object of its own, and a serving process runs several controllers; a
listening connection per store would cost the database a connection per controller and process.
Here the stores of one URL and channel share a listener thread: it wakes every subscribed store at
each notification (and after each reconnection, which may have missed some), and ends when the last
store unsubscribes. A forked process starts listeners of its own.
"""
from __future__ import annotations

import os
import select
import threading
from typing import Any, Callable

#: Seconds the listener sleeps at most without a notification: then it reads the connection once anyway, so
#: that a connection the server dropped without a word is found out (and replaced) within this time.
_IDLE_CHECK = 30.0
#: poll() events of a socket whose connection is gone.
_BROKEN = select.POLLHUP | select.POLLERR | select.POLLNVAL
#: Seconds between two attempts to connect while the server is away.
_RETRY = 0.5


class FeedListener:
    """The thread that LISTENs on one channel for the stores subscribed to it."""

    def __init__(self, connect: Callable[[], Any], channel: str) -> None:
        self._connect = connect
        self._channel = channel
        # Guards _subscribers and _pipe_closed.
        self._lock = threading.Lock()
        self._pipe_closed = False
        self._subscribers: dict[int, Callable[[], None]] = {}
        self._stopping = threading.Event()
        # Written by remove() when the last store left: ends the listener's sleep at once.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name=f"mpc-pg-listener-{channel}", daemon=True)

    def subscribe(self, key: int, wake: Callable[[], None]) -> None:
        with self._lock:
            self._subscribers[key] = wake
        if not self._thread.is_alive() and not self._stopping.is_set():
            self._thread.start()

    def remove(self, key: int) -> bool:
        """Forget a subscriber; when it was the last, tell the thread to end (see :meth:`join`). Whether it was."""
        with self._lock:
            self._subscribers.pop(key, None)
            last = not self._subscribers
            if last:
                self._stopping.set()
                if not self._pipe_closed:
                    try:
                        os.write(self._wake_w, b"!")
                    except OSError:  # full: a wake is pending anyway
                        pass
        return last

    def join(self) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _wake_all(self) -> None:
        with self._lock:
            wakes = list(self._subscribers.values())
        for wake in wakes:
            wake()

    def _run(self) -> None:
        try:
            self._listen()
        finally:
            with self._lock:
                self._pipe_closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)

    def _listen(self) -> None:
        """Sleep on the connection's socket (and the stop pipe) until the server sends something, then take
        every notification it sent: an idle process makes no wake-up at all (psycopg's own wait for
        notifications looks at the socket ten times a second)."""
        import psycopg

        while not self._stopping.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {self._channel}")
                    self._wake_all()
                    server = conn.pgconn.socket
                    sleeper = select.poll()  # not select(): a busy process's descriptors may be past FD_SETSIZE
                    sleeper.register(server, select.POLLIN)
                    sleeper.register(self._wake_r, select.POLLIN)
                    while not self._stopping.is_set():
                        ready = dict(sleeper.poll(int(_IDLE_CHECK * 1000)))
                        if ready.get(server, 0) & _BROKEN:  # never readable again: without this, a busy loop
                            raise psycopg.OperationalError("the listening connection was closed")
                        if any(True for _ in conn.notifies(timeout=0)):  # reads what came; raises if it broke
                            self._wake_all()
            except psycopg.Error:
                self._wake_all()
                self._stopping.wait(_RETRY)


#: The listeners of this process: (url, channel) -> listener.
_listeners: dict[tuple[str, str], FeedListener] = {}
_listeners_pid = os.getpid()
_listeners_guard = threading.Lock()  # guards _listeners and _listeners_pid


def subscribe(url: str, channel: str, key: int, wake: Callable[[], None], connect: Callable[[], Any]) -> None:
    """Have ``wake`` called at each notification on ``channel`` of the database at ``url``."""
    global _listeners_pid
    with _listeners_guard:
        if _listeners_pid != os.getpid():  # forked: the parent's threads do not run here
            _listeners.clear()
            _listeners_pid = os.getpid()
        listener = _listeners.get((url, channel))
        if listener is None:
            listener = _listeners[(url, channel)] = FeedListener(connect, channel)
        listener.subscribe(key, wake)


def unsubscribe(url: str, channel: str, key: int) -> None:
    """Stop waking ``key``; the listener ends with its last subscriber."""
    with _listeners_guard:
        listener = _listeners.get((url, channel)) if _listeners_pid == os.getpid() else None
        if listener is None or not listener.remove(key):
            return
        del _listeners[(url, channel)]
    listener.join()
