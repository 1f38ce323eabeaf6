"""Sleep until a file changes: the SQLite store's readers wake when any process commits to the database.

Every commit of a SQLite database in WAL mode writes its ``-wal`` file (a checkpoint writes the database
file; a rollback journal, its ``-journal``), so a reader waiting for other processes' events waits for
one of those files to change instead of looking at the database every few milliseconds: an idle
serving process then sleeps. On Linux the kernel tells (inotify, through :mod:`ctypes`, on the
directory, since SQLite deletes and re-creates the ``-wal`` file); elsewhere, or when inotify cannot
be used (no free instance or watch), :func:`watch` returns None and the store polls as before.

One :class:`FileWatch` per store object and process serves all its waiting threads: the first to
wait reads the kernel's notices, the others wait on a condition it notifies (no thread of its own).
"""
from __future__ import annotations

import ctypes
import os
import select
import struct
import sys
import threading
import weakref
from typing import Callable, Optional

# inotify(7)
_IN_MODIFY = 0x00000002
_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_Q_OVERFLOW = 0x00004000
_IN_IGNORED = 0x00008000
_IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = 0o2000000
_MASK = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
#: ``struct inotify_event`` without its name: wd, mask, cookie, len.
_EVENT = struct.Struct("iIII")
#: Bytes read from the inotify descriptor at once (many notices; the kernel never splits one).
_READ_SIZE = 64 * 1024

def _load_inotify() -> Optional[ctypes.CDLL]:
    """The C library's inotify functions, from the symbols this process already has loaded (Linux), else None.

    Not :func:`ctypes.util.find_library`: it runs ``ldconfig`` (or a compiler) in a subprocess, slowly, and it
    was called lazily by the first waiting thread while it held the store's watch lock, which every commit of the
    process takes to wake the waiters: a dashboard's stream and the process's own writes stalled behind it (once
    for as long as the subprocess took to start, seen past 20 s under load).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return libc


#: Loaded at import: nothing is looked up while a store waits.
_LIBC = _load_inotify()


#: The watches of this process, closed in a forked child (whose store opens its own).
_open_watches: "weakref.WeakSet[FileWatch]" = weakref.WeakSet()


def _close_in_child() -> None:
    for found in list(_open_watches):
        found.close()


os.register_at_fork(after_in_child=_close_in_child)


class FileWatch:
    """Wakes the threads of this process that wait for a change of some files of one directory.

    :meth:`wait` returns once one of the files changed since the caller read :attr:`generation`, once
    :meth:`wake` was called, or at its timeout. Made by :func:`watch`.
    """

    def __init__(self, fd: int, names: frozenset[bytes]) -> None:
        self._fd = fd
        self._names = names
        self._wake_r, self._wake_w = os.pipe()
        for end in (self._wake_r, self._wake_w):
            os.set_blocking(end, False)
        #: The process the descriptors belong to.
        self.pid = os.getpid()
        # Guards generation, _reader and _broken; notified when generation moves or the reader leaves.
        self._cond = threading.Condition()
        #: Counts the changes seen (and the wakes): a waiter returns once it moved past what it read.
        self.generation = 0
        self._reader = False
        #: Set when the kernel stopped watching (the directory went away): :attr:`broken` then.
        self._broken = False
        self._closed = False
        _open_watches.add(self)

    @property
    def broken(self) -> bool:
        """True once the watch can no longer tell of changes (the store then polls)."""
        return self._broken or self._closed

    def wait(self, seen: int, timeout: float, clock: Callable[[], float]) -> int:
        """Block until :attr:`generation` is not ``seen``, or ``timeout`` seconds passed; return it.

        :param clock: :func:`time.monotonic` (given, so that a test may drive it).
        """
        deadline = clock() + timeout
        with self._cond:
            while self.generation == seen and not self.broken:
                remaining = deadline - clock()
                if remaining <= 0:
                    break
                if self._reader:  # another thread reads the kernel's notices: it tells us
                    self._cond.wait(remaining)
                    continue
                self._reader = True
                self._cond.release()
                try:
                    changed = self._read(remaining)
                finally:
                    self._cond.acquire()
                    self._reader = False
                if changed:
                    self.generation += 1
                self._cond.notify_all()  # the news, or the reading handed on to a waiter with time left
            return self.generation

    def _read(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for notices; whether one was about the files (or a wake, or lost notices)."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(max(1, int(timeout * 1000) + 1))}
        changed = False
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except (BlockingIOError, OSError):
                pass
            changed = True
        if self._fd in ready:
            changed = self._drain() or changed
        return changed

    def _drain(self) -> bool:
        changed = False
        while True:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return changed
            except OSError:  # closed under us (a fork's child, or close())
                self._broken = True
                return True
            if not data:
                return changed
            offset = 0
            while offset + _EVENT.size <= len(data):
                _, mask, _, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                if mask & (_IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF):
                    self._broken = True  # the directory is gone or moved: the store polls from now on
                    changed = True
                elif mask & _IN_Q_OVERFLOW or name in self._names:
                    changed = True

    def wake(self) -> None:
        """Make every :meth:`wait` return now (as if a file changed)."""
        with self._cond:
            self.generation += 1
            self._cond.notify_all()
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):  # full: a wake is pending anyway; closed: nobody waits
            pass

    def close(self) -> None:
        """Give the descriptors back (a waiter still reading then finds the watch broken)."""
        if self._closed:
            return
        self._closed = True
        _open_watches.discard(self)
        for fd in (self._fd, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


#: What the names of the files a commit writes add to the database file's (a checkpoint writes the database file).
DATABASE_SUFFIXES = ("", "-wal", "-journal")


def _inotify(target: str, mask: int) -> Optional[int]:
    """An inotify descriptor watching ``target`` for ``mask``, or None where the kernel cannot (not Linux, no
    inotify instance or watch left, no access, no such file)."""
    libc = _LIBC
    if libc is None:
        return None
    fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        return None
    if libc.inotify_add_watch(fd, os.fsencode(target), mask) < 0:
        os.close(fd)
        return None
    return int(fd)


def watch(path: str, suffixes: tuple[str, ...] = DATABASE_SUFFIXES) -> Optional[FileWatch]:
    """A watch of the SQLite database ``path`` and its ``-wal`` and ``-journal`` files (the files named ``path``
    plus each of ``suffixes``), or None where the kernel cannot tell of their changes (not Linux, no inotify
    instance or watch left)."""
    directory, base = os.path.split(os.path.abspath(path))
    fd = _inotify(directory, _MASK)
    if fd is None:
        return None
    name = os.fsencode(base)
    return FileWatch(fd, frozenset(name + os.fsencode(suffix) for suffix in suffixes))


def watch_file(path: str) -> Optional[FileWatch]:
    """A watch of the one file ``path`` itself (it must exist): writes to other files of its directory do not
    reach it, as they reach a watch of the directory. None where the kernel cannot tell (see :func:`watch`), or
    the file is missing; the watch is :attr:`~FileWatch.broken` once the file is removed or moved."""
    fd = _inotify(path, _IN_MODIFY | _IN_DELETE_SELF | _IN_MOVE_SELF)
    if fd is None:
        return None
    return FileWatch(fd, frozenset({b""}))  # a file's own notices carry no name
