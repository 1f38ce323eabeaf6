"""A single-threaded fork server: the parent of every task process of a controller.

Why: the seed's examples have no ``if __name__ == "__main__"`` guard, so any start
method that re-imports the script (spawn, forkserver) would start a second web
server in each child; and forking straight from a server that already runs
threads can deadlock the child on a lock some other thread held. So the controller
forks this server once, when it is created (at import time in the seed, before
any thread exists). The server inherits the task class already defined in memory
and forks a child for each request; it never runs threads itself.

Protocol over a Unix socket pair: to start a task process the controller sends
``S`` and two file descriptors (the child's end of a duplex socket, and the write
end of a pipe); the server forks, answers the child's pid, and writes the child's
exit code (as :func:`os.waitstatus_to_exitcode` gives it) to the pipe when it reaps
the child. ``C`` instead of ``S`` also gives the child pipes for its descriptors 1
and 2 from birth; their read ends come with the pid (see :class:`~.capture.PipeReader`).
To signal a task's process group the controller sends ``K``, the pid and the signal;
the server signals the group only while that task process is its own, unreaped child,
so a pid the kernel has recycled is never hit. When a task process exits, the server
kills what is left in its process group before reaping it (the unreaped leader keeps
the group's id from being reused). The server reaps orphaned
grandchildren too (it is a child subreaper), and when the controller's end of the
socket closes (the controller shut down or its process died) it kills every task
process group it started and exits.
"""
from __future__ import annotations

import ctypes
import gc
import os
import select
import signal
import socket
import struct
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterable, Optional

import _signal

import psutil

from .capture import PipeReader, use_descriptors_for_print
from .proctree import set_process_name, signal_processes

#: The fork server's process name (``ps``, ``/proc/PID/comm``).
FORK_SERVER_NAME = "mpc-forkserver"

_PID = struct.Struct("i")
_KILL = struct.Struct("ii")  # pid, signal
_PR_SET_CHILD_SUBREAPER = 36
# Plain ints for the C signal functions a task process calls (see _become_task_process).
_SIGCHLD, _SIGINT, _SIGTERM, _SIG_DFL = (int(value) for value in (
    signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIG_DFL))

#: File descriptors that belong to the serving process only; a forked server closes its copies.
_PARENT_ONLY_FDS: set[int] = set()
# Guards _PARENT_ONLY_FDS.
_FDS_LOCK = threading.Lock()


def _remember_parent_only(*fds: int) -> None:
    with _FDS_LOCK:
        _PARENT_ONLY_FDS.update(fds)


def forget_parent_only(*fds: int) -> None:
    """Stop tracking descriptors the serving process has closed."""
    with _FDS_LOCK:
        _PARENT_ONLY_FDS.difference_update(fds)


class ChildProcess:
    """The serving process's handle on one task process.

    :param signal_group: signals the task's process group through the fork server.
    """

    def __init__(self, pid: int, conn: Connection, exit_fd: int,
                 signal_group: Callable[[int, int], bool], output: Optional[PipeReader] = None) -> None:
        self.pid = pid
        #: The pipes of the process's descriptors 1 and 2, when the serving process reads them.
        self.output = output
        #: Duplex channel to the child: commands out, progress/logs/results in.
        self.conn = conn
        #: Readable once the fork server has reaped the child; holds its exit code.
        self.exit_fd = exit_fd
        self.exit_code: Optional[int] = None
        self.exited = False
        self._signal_group = signal_group
        #: The task process as psutil saw it at its start: signals through it check the create time.
        self.process: Optional[psutil.Process]
        try:
            self.process = psutil.Process(pid)
            self.create_time: Optional[float] = self.process.create_time()
        except psutil.Error:
            self.process, self.create_time = None, None
        # Guards sends on conn: the controlling thread and request threads (stop) both send.
        self._send_lock = threading.Lock()

    def send(self, message: object) -> bool:
        """Send a command; False when the child is already gone."""
        with self._send_lock:
            try:
                self.conn.send(message)
                return True
            except (OSError, ValueError):
                return False

    def signal_tree(self, signum: int, seen: Iterable[psutil.Process] = ()) -> None:
        """Send ``signum`` to the task's process group, its live descendants and the processes ``seen``.

        Only processes proven to be the task's are signalled: the group through the fork
        server (while the task process is its unreaped child), the others through psutil,
        which checks each process's create time. "Already dead" counts as success.
        """
        if not self.exited:
            self._signal_group(self.pid, signum)
        targets: dict[int, psutil.Process] = {proc.pid: proc for proc in seen}
        if self.process is not None and not self.exited:
            try:
                targets.setdefault(self.pid, self.process)
                for proc in self.process.children(recursive=True):
                    targets.setdefault(proc.pid, proc)
            except psutil.Error:
                pass
        signal_processes(targets.values(), signum)

    def read_exit(self) -> Optional[int]:
        """Read the exit code after ``exit_fd`` became readable (None if the server died)."""
        if not self.exited:
            data = b""
            try:
                while len(data) < _PID.size:
                    chunk = os.read(self.exit_fd, _PID.size - len(data))
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            self.exit_code = _PID.unpack(data)[0] if len(data) == _PID.size else None
            self.exited = True
        return self.exit_code

    def close(self) -> None:
        """Release the descriptors (the process itself is handled elsewhere)."""
        fds = []
        try:
            fds.append(self.conn.fileno())
        except (OSError, ValueError):
            pass
        if self.output is not None:
            self.output.close()
        forget_parent_only(*fds, self.exit_fd)
        self.conn.close()
        try:
            os.close(self.exit_fd)
        except OSError:
            pass


class ForkServer:
    """Fork the server now; :meth:`spawn` asks it for task processes.

    :param child_main: run in each task process with its :class:`Connection` and whether its
        descriptors 1 and 2 are pipes the serving process reads; the process exits when it returns.
    :param prepare: run once in the fork server before its first fork: what it sets up
        there, every task process inherits instead of setting it up again.
    """

    def __init__(self, child_main: Callable[[Connection, bool], None],
                 prepare: Optional[Callable[[], None]] = None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the fork server
            code = 0
            try:
                ours.close()
                _close_parent_only_fds()
                _serve(theirs, child_main, prepare)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self._sock = ours
        # Guards the request/answer exchange on _sock: one spawn at a time.
        self._lock = threading.Lock()
        self._closed = False
        _remember_parent_only(ours.fileno())

    def spawn(self, capture_output: bool = False) -> ChildProcess:
        """Start a task process and return its handle.

        :param capture_output: the process's descriptors 1 and 2 are pipes from birth, read
            through the handle's :attr:`~ChildProcess.output` (for a process that runs one task).
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        exit_r, exit_w = os.pipe()
        pipes: list[int] = []
        try:
            with self._lock:
                if self._closed:
                    raise OSError("the fork server is closed")
                socket.send_fds(self._sock, [b"C" if capture_output else b"S"], [theirs.fileno(), exit_w])
                answer, pipes, _, _ = socket.recv_fds(self._sock, _PID.size, 2)
                if not answer:
                    raise OSError("the fork server has gone away")
                answer += _recv_exact(self._sock, _PID.size - len(answer))
        except BaseException:
            ours.close()
            os.close(exit_r)
            for fd in pipes:
                os.close(fd)
            raise
        finally:
            theirs.close()
            os.close(exit_w)
        (pid,) = _PID.unpack(answer)
        if pid <= 0:
            ours.close()
            os.close(exit_r)
            raise OSError(-pid, f"the fork server could not fork: {os.strerror(-pid)}")
        _remember_parent_only(ours.fileno(), exit_r, *pipes)
        output = PipeReader(dict(zip(pipes, (1, 2))), on_close=forget_parent_only) if pipes else None
        return ChildProcess(pid, Connection(ours.detach()), exit_r, self.signal_group, output)

    def signal_group(self, pid: int, signum: int) -> bool:
        """Signal the process group of task process ``pid``; False when it is no longer the server's child."""
        with self._lock:
            if self._closed:
                return False
            try:
                self._sock.sendall(b"K" + _KILL.pack(pid, signum))
                answer: int = _PID.unpack(_recv_exact(self._sock, _PID.size))[0]
            except OSError:
                return False
        return answer == 0

    def close(self, timeout: float = 5.0) -> None:
        """Close the server (it kills any task process left) and reap it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            forget_parent_only(self._sock.fileno())
            self._sock.close()
        try:
            psutil.Process(self.pid).wait(timeout)
        except psutil.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except psutil.NoSuchProcess:
            pass
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("the fork server has gone away")
        data += chunk
    return data


def _close_parent_only_fds() -> None:
    for fd in list(_PARENT_ONLY_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _PARENT_ONLY_FDS.clear()


def _close_listening_sockets() -> None:
    """Close inherited listening sockets (gunicorn's, say), so no task process keeps a server's port bound."""
    try:
        connections = psutil.Process().net_connections(kind="inet")
    except psutil.Error:
        return
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.fd >= 0:
            try:
                os.close(conn.fd)
            except OSError:
                pass


def _become_subreaper() -> None:
    """Adopt orphaned grandchildren so that they are reaped here, never left as zombies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _serve(sock: socket.socket, child_main: Callable[[Connection, bool], None],
           prepare: Optional[Callable[[], None]] = None) -> None:
    """The fork server's loop; never returns normally except on EOF."""
    os.setsid()  # out of the terminal's process group: Ctrl-C is for the serving process
    for signum in signal.valid_signals():  # drop handlers inherited from the server (gunicorn's, say)
        if callable(signal.getsignal(signum)):
            signal.signal(signum, signal.SIG_DFL)
    # It ends when its control socket closes, never by a signal meant for the server
    # (Ctrl-C, or a SIGTERM sent to every process of a service).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _close_listening_sockets()
    _become_subreaper()
    set_process_name(FORK_SERVER_NAME)  # what ps and top show; task processes rename themselves
    use_descriptors_for_print()
    if prepare is not None:
        prepare()
    # Everything alive now is shared with the task processes: keep the collector off it,
    # or the first collection in each child would copy every page of the heap.
    gc.collect()
    gc.freeze()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    exits: dict[int, int] = {}  # task pid -> write end of its exit pipe
    # A poll object holds no descriptor of its own: a task process has nothing of it to close.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    server_fd = sock.fileno()
    while True:
        for fd, _ in poller.poll():
            if fd == server_fd:
                if not _handle(sock, exits, child_main, (sock, wake_r, wake_w)):
                    _kill_all(exits)
                    return
            else:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
        _reap(exits)


def _handle(sock: socket.socket, exits: dict[int, int], child_main: Callable[[Connection, bool], None],
            server_objects: tuple[Any, ...]) -> bool:
    """Serve one request; False when the controller's end is closed."""
    try:
        message, fds, _, _ = socket.recv_fds(sock, 1, 2)
    except OSError:
        return False
    if message == b"K":
        try:
            pid, signum = _KILL.unpack(_recv_exact(sock, _KILL.size))
        except OSError:
            return False
        sock.sendall(_PID.pack(_signal_own_group(exits, pid, signum)))
        return True
    if message not in (b"S", b"C") or len(fds) != 2:
        for fd in fds:
            os.close(fd)
        return False
    child_fd, exit_w = fds
    return _fork_one(sock, exits, child_main, server_objects, child_fd, exit_w,
                     capture_output=message == b"C")


def _signal_own_group(exits: dict[int, int], pid: int, signum: int) -> int:
    """Signal the group of ``pid`` if it is an unreaped task process of this server: 0, else 1."""
    if pid not in exits:
        return 1
    try:
        os.killpg(pid, signum)
    except OSError:
        pass
    return 0


def _fork_one(sock: socket.socket, exits: dict[int, int], child_main: Callable[[Connection, bool], None],
              server_objects: tuple[Any, ...], child_fd: int, exit_w: int, capture_output: bool) -> bool:
    pipes: list[tuple[int, int]] = []  # (read end, write end) for descriptors 1 and 2
    try:
        if capture_output:
            pipes = [os.pipe(), os.pipe()]
        pid = os.fork()
    except OSError as exc:
        for fd in (child_fd, exit_w, *(fd for pipe in pipes for fd in pipe)):
            os.close(fd)
        sock.sendall(_PID.pack(-(exc.errno or 1)))
        return True
    if pid == 0:
        _become_task_process(exits, server_objects, exit_w)
        for target, (read_end, write_end) in zip((1, 2), pipes):
            os.dup2(write_end, target)
            os.close(write_end)
            os.close(read_end)
        code = 0
        try:
            child_main(Connection(child_fd), capture_output)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError, AttributeError):
                    pass
            os._exit(code)
    os.close(child_fd)
    exits[pid] = exit_w
    for _, write_end in pipes:
        os.close(write_end)
    read_ends = [read_end for read_end, _ in pipes]
    try:
        if read_ends:
            socket.send_fds(sock, [_PID.pack(pid)], read_ends)
        else:
            sock.sendall(_PID.pack(pid))
    finally:
        for fd in read_ends:
            os.close(fd)
    return True


def _become_task_process(exits: dict[int, int], server_objects: tuple[Any, ...], exit_w: int) -> None:
    """Drop the fork server's state in a freshly forked task process.

    It touches as little of the inherited heap as it can, since each page it writes is
    copied for this process alone: the C signal functions (no enum conversions), and a
    socket detached from its descriptor rather than closed through its object.
    """
    sock, wake_r, wake_w = server_objects
    _signal.set_wakeup_fd(-1)
    _signal.signal(_SIGCHLD, _SIG_DFL)
    _signal.signal(_SIGINT, _signal.default_int_handler)
    _signal.signal(_SIGTERM, _SIG_DFL)
    for fd in (sock.detach(), wake_r, wake_w, exit_w, *exits.values()):
        try:
            os.close(fd)
        except OSError:
            pass
    os.setpgid(0, 0)  # its own process group, so that its whole tree can be signalled at once


def _reap(exits: dict[int, int]) -> None:
    while True:
        try:
            exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if exited is None or exited.si_pid == 0:
            return
        pid = exited.si_pid
        if pid in exits:
            # The exited leader is not reaped yet, so its group id cannot have been reused:
            # whatever the task left in its group is killed here, and nothing else.
            _signal_own_group(exits, pid, signal.SIGKILL)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            continue
        exit_w = exits.pop(pid, None)
        if exit_w is not None:
            try:
                os.write(exit_w, _PID.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass
            os.close(exit_w)


def _kill_all(exits: dict[int, int]) -> None:
    for pid in list(exits):
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass
    for pid in list(exits):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    _reap(exits)
