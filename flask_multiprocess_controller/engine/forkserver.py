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
import pickle
import select
import signal
import socket
import struct
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import _signal

import psutil

from .capture import PipeReader, use_descriptors_for_print
from .channel import PacketChannel, channel_pair
from .progressbuffer import BufferReader
from .proctree import set_process_name, signal_processes

if TYPE_CHECKING:
    from .handover import HandoverConfig

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


def remember_parent_only(*fds: int) -> None:
    """Track descriptors of the serving process's own, which a fork server forked later must close."""
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

    def __init__(self, pid: int, conn: PacketChannel, exit_fd: int,
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
        #: The reader of the process's progress buffer, once a progress message named it (see .progressbuffer),
        #: and whether opening it failed (not tried again).
        self.progress_reader: Optional[BufferReader] = None
        self.progress_reader_failed = False

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
        if self.progress_reader is not None:
            self.progress_reader.close()
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

    def __init__(self, child_main: Callable[[PacketChannel, bool], None],
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
        remember_parent_only(ours.fileno())

    def spawn(self, capture_output: bool = False) -> ChildProcess:
        """Start a task process and return its handle.

        :param capture_output: the process's descriptors 1 and 2 are pipes from birth, read
            through the handle's :attr:`~ChildProcess.output` (for a process that runs one task).
        """
        ours, theirs = channel_pair()
        exit_r, exit_w = os.pipe()
        pipes: list[int] = []
        try:
            with self._lock:
                if self._closed:
                    raise OSError("the fork server is closed")
                # The server keeps a copy of our end, so that the task can be handed over (see .handover).
                socket.send_fds(self._sock, [b"C" if capture_output else b"S"],
                                [theirs.fileno(), exit_w, ours.fileno()])
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
        remember_parent_only(ours.fileno(), exit_r, *pipes)
        output = PipeReader(dict(zip(pipes, (1, 2))), on_close=forget_parent_only) if pipes else None
        return ChildProcess(pid, PacketChannel(ours.detach()), exit_r, self.signal_group, output)

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

    def arm_handover(self, config: "HandoverConfig") -> None:
        """Make the server keep its task processes running when this process ends, for a live serving
        process of the same controller to adopt (see :mod:`.handover`)."""
        data = pickle.dumps(config)
        with self._lock:
            if not self._closed:
                self._sock.sendall(b"H" + _PID.pack(len(data)) + data)

    def release_tasks(self) -> None:
        """Say that this process lets its running tasks go: the server keeps the end of each from now on, for
        the process that adopts them (see :mod:`.handover`)."""
        with self._lock:
            if not self._closed:
                self._sock.sendall(b"R")

    def close(self, timeout: float = 5.0, hand_over: bool = False) -> None:
        """Close the server and reap it: it kills any task process left, unless ``hand_over``.

        :param hand_over: the running task processes are to be adopted: the server outlives this
            process with them (when it was armed), and is not waited for.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            forget_parent_only(self._sock.fileno())
            if not hand_over:
                try:
                    self._sock.sendall(b"Q")
                except OSError:
                    pass
            self._sock.close()
        if hand_over:
            return
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


def _serve(sock: socket.socket, child_main: Callable[[PacketChannel, bool], None],
           prepare: Optional[Callable[[], None]] = None) -> None:
    """The fork server's life; returns once it has no controller and no task process left."""
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
    _Server(sock, child_main).run()


class Task:
    """A task process of this fork server, and the descriptors the server keeps for it.

    The server keeps a copy of the serving process's end of the task's channel and of its output
    pipes, so that a process adopting the task can be given them (see :mod:`.handover`).
    """

    def __init__(self, pid: int, exit_w: int, channel: int = -1, outputs: tuple[int, ...] = ()) -> None:
        self.pid = pid
        #: Where the exit code goes once the process is reaped (the supervising process reads it).
        self.exit_w = exit_w
        self.channel = channel
        self.outputs = outputs
        #: Set once reaped (its adopter is told at once).
        self.exit_code: Optional[int] = None
        #: Whether the process adopting the task took it (else it is killed).
        self.adopted = False
        #: Whether an adopter refused it (no such running task in the store): nobody needs its end.
        self.declined = False

    def create_time(self) -> float:
        """The process's create time, what an adopter checks against the store (0.0 once it was reaped: then the
        pid, still this task's in the store, is enough). Read only for an offer, never on the spawn path."""
        if self.exit_code is not None:
            return 0.0
        try:
            return psutil.Process(self.pid).create_time()
        except psutil.Error:
            return 0.0

    def kept_fds(self) -> list[int]:
        return [fd for fd in (self.exit_w, self.channel, *self.outputs) if fd >= 0]

    def report_exit(self, code: int) -> bool:
        """Write the exit code for whoever supervises the task now; False when nobody holds the pipe's
        other end any more (its serving process ended: the code must be kept for an adopter)."""
        self.exit_code = code
        delivered = False
        if self.exit_w >= 0:
            try:
                os.write(self.exit_w, _PID.pack(code))
                delivered = True
            except OSError:
                pass
            os.close(self.exit_w)
            self.exit_w = -1
        return delivered

    def new_exit_pipe(self) -> int:
        """A fresh exit pipe for a new supervisor; its read end (the code is in it already if reaped)."""
        if self.exit_w >= 0:
            os.close(self.exit_w)
        exit_r, self.exit_w = os.pipe()
        if self.exit_code is not None:
            self.report_exit(self.exit_code)
        return exit_r

    def release(self) -> None:
        """Close what the server kept for the task (it was reaped and its exit code delivered)."""
        for fd in (self.exit_w, self.channel, *self.outputs):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.exit_w, self.channel, self.outputs = -1, -1, ()


class _Server:
    """The fork server's loop: requests from its controller, then, once the controller is gone, the
    hand-over of the task processes left (see :mod:`.handover`)."""

    def __init__(self, sock: socket.socket, child_main: Callable[[PacketChannel, bool], None]) -> None:
        self.sock: Optional[socket.socket] = sock
        self.child_main = child_main
        self.tasks: dict[int, Task] = {}
        self.config: Optional["HandoverConfig"] = None
        #: Set once the controller is gone and task processes are kept for adoption.
        self.holder: Any = None
        #: Set when the controller said it lets its running tasks go (they end unwatched from then on).
        self.releasing = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        # A poll object holds no descriptor of its own: a task process has nothing of it to close.
        while self.sock is not None or self.holder is not None:
            poller = select.poll()
            poller.register(self.wake_r, select.POLLIN)
            if self.sock is not None:
                poller.register(self.sock, select.POLLIN)
            timeout = None
            if self.holder is not None:
                for fd in self.holder.fds():
                    poller.register(fd, select.POLLIN)
                timeout = self.holder.timeout()
            for fd, _ in poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1)):
                if self.sock is not None and fd == self.sock.fileno():
                    if not self._handle():
                        self._controller_gone()
                elif fd == self.wake_r:
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                elif self.holder is not None:
                    self.holder.ready(fd)
            self.reap()
            if self.holder is not None:
                self.holder.tick()
                if self.holder.finished():
                    self.holder = None

    def _controller_gone(self, quit_now: bool = False) -> None:
        """The controller closed its end: keep the task processes for adoption, or kill them all."""
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        if quit_now or self.config is None or not self.tasks:
            self.kill_all()
            return
        from .handover import Holder

        self.holder = Holder(self, self.config)

    def _handle(self) -> bool:
        """Serve one request; False when the controller's end is closed."""
        sock = self.sock
        assert sock is not None
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1, 3)
        except OSError:
            return False
        if message == b"K":
            try:
                pid, signum = _KILL.unpack(_recv_exact(sock, _KILL.size))
            except OSError:
                return False
            sock.sendall(_PID.pack(self.signal_group(pid, signum)))
            return True
        if message == b"H":
            try:
                (size,) = _PID.unpack(_recv_exact(sock, _PID.size))
                self.config = pickle.loads(_recv_exact(sock, size))
            except (OSError, pickle.UnpicklingError, EOFError):
                return False
            return True
        if message == b"R":
            self.releasing = True
            return True
        if message == b"Q":
            self._controller_gone(quit_now=True)
            return True
        if message not in (b"S", b"C") or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            return False
        child_fd, exit_w, channel = fds
        return self._fork_one(sock, child_fd, exit_w, channel, capture_output=message == b"C")

    def signal_group(self, pid: int, signum: int) -> int:
        """Signal the group of ``pid`` if it is an unreaped task process of this server: 0, else 1."""
        task = self.tasks.get(pid)
        if task is None or task.exit_code is not None:
            return 1
        try:
            os.killpg(pid, signum)
        except OSError:
            pass
        return 0

    def _fork_one(self, sock: socket.socket, child_fd: int, exit_w: int, channel: int,
                  capture_output: bool) -> bool:
        pipes: list[tuple[int, int]] = []  # (read end, write end) for descriptors 1 and 2
        try:
            if capture_output:
                pipes = [os.pipe(), os.pipe()]
            pid = os.fork()
        except OSError as exc:
            for fd in (child_fd, exit_w, channel, *(fd for pipe in pipes for fd in pipe)):
                os.close(fd)
            sock.sendall(_PID.pack(-(exc.errno or 1)))
            return True
        if pid == 0:
            self._become_task_process(exit_w, channel)
            for target, (read_end, write_end) in zip((1, 2), pipes):
                os.dup2(write_end, target)
                os.close(write_end)
                os.close(read_end)
            code = 0
            try:
                self.child_main(PacketChannel(child_fd), capture_output)
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
        for _, write_end in pipes:
            os.close(write_end)
        read_ends = [read_end for read_end, _ in pipes]
        self.tasks[pid] = Task(pid, exit_w, channel, tuple(read_ends))
        if read_ends:
            socket.send_fds(sock, [_PID.pack(pid)], read_ends)
        else:
            sock.sendall(_PID.pack(pid))
        return True

    def _become_task_process(self, exit_w: int, channel: int) -> None:
        """Drop the fork server's state in a freshly forked task process.

        It touches as little of the inherited heap as it can, since each page it writes is
        copied for this process alone: the C signal functions (no enum conversions), and a
        socket detached from its descriptor rather than closed through its object.
        """
        _signal.set_wakeup_fd(-1)
        _signal.signal(_SIGCHLD, _SIG_DFL)
        _signal.signal(_SIGINT, _signal.default_int_handler)
        _signal.signal(_SIGTERM, _SIG_DFL)
        sock = self.sock
        kept = [fd for task in self.tasks.values() for fd in task.kept_fds()]
        for fd in (sock.detach() if sock is not None else -1, self.wake_r, self.wake_w, exit_w, channel, *kept):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        os.setpgid(0, 0)  # its own process group, so that its whole tree can be signalled at once

    def reap(self) -> None:
        while True:
            try:
                exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if exited is None or exited.si_pid == 0:
                return
            pid = exited.si_pid
            task = self.tasks.get(pid)
            if task is not None:
                # The exited leader is not reaped yet, so its group id cannot have been reused:
                # whatever the task left in its group is killed here, and nothing else.
                self.signal_group(pid, signal.SIGKILL)
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                continue
            if task is None:
                continue
            delivered = task.report_exit(os.waitstatus_to_exitcode(status))
            if self.holder is None and delivered and not self.releasing or (
                    self.holder is not None and self.holder.forget_when_reaped(task, delivered)):
                del self.tasks[pid]
                task.release()

    def kill_all(self) -> None:
        for pid in list(self.tasks):
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for pid in list(self.tasks):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            task = self.tasks.pop(pid)
            task.release()
        self.reap()
