"""The SQLite store's signal of events a runtime's follower acts on: a file written after each commit that made one.

Every commit writes the database's ``-wal`` file, so a watch of it (see :mod:`.filewatch`) wakes a waiting
reader at each write of any process: a heartbeat, a claim, a batch of progress. A runtime's follower acts on
none of those writes unless they made an event other than ``progress`` (see :meth:`~.base.TaskStore.changes`),
so such a commit also writes one byte to a file beside the database (``<file>-feed``, made with the database's
mode), and the followers watch that file itself instead (not its directory, whose every write would wake them). A writer that does not (an older version, or one that died
between its commit and the byte) is found by the followers' look every ``FEED_FALLBACK_POLL`` seconds.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

__all__ = ["FeedSignal", "SUFFIX"]

#: What the signal file's name adds to the database file's.
SUFFIX = "-feed"


class FeedSignal:
    """One store object's writing side of the signal: which transactions owe it, and the file's descriptor."""

    def __init__(self, path: str, mode: int) -> None:
        self.path = path + SUFFIX
        self._mode = mode
        # Per thread: whether the transaction it runs made an event a follower acts on.
        self._owed = threading.local()
        # Guards _fd and _pid: the descriptor of the process that opened it (a forked child opens its own).
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        self._pid = 0

    def owe(self) -> None:
        """The transaction of the calling thread made an event a follower acts on: signal once it commits."""
        self._owed.value = True

    def settle(self, committed: bool) -> None:
        """The calling thread's transaction ended: write the signal if it committed and owed one."""
        if not getattr(self._owed, "value", False):
            return
        self._owed.value = False
        if committed:
            self.send()

    def ensure(self) -> bool:
        """Make the signal file if it is missing (a watch needs it); False when it cannot be made."""
        with self._lock:
            try:
                self._descriptor()
                return True
            except OSError:
                return False

    def send(self) -> None:
        """Write the signal (a failure is left to the followers' regular look: the commit stands)."""
        with self._lock:
            try:
                fd = self._descriptor()
                os.pwrite(fd, b"\0", 0)
            except OSError:
                self._drop()

    def _descriptor(self) -> int:
        if self._fd is not None and self._pid == os.getpid():
            if os.fstat(self._fd).st_nlink > 0:
                return self._fd
            self._drop()  # the file was removed: a new one is what the watches see
        elif self._fd is not None:
            self._fd = None  # the parent's, in a forked child: left to the parent
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, self._mode)
        self._pid = os.getpid()
        return self._fd

    def _drop(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None

    def close(self) -> None:
        with self._lock:
            self._drop()
