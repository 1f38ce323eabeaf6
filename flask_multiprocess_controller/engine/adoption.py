"""The adopting side of a hand-over: a serving process takes over tasks whose serving process ended.

Each serving process that can adopt listens on a Unix socket in its controller's private folder
(:func:`~.handover.handover_directory`). A holder (the fork server of the ended process, see
:mod:`.handover`) connects and offers its task processes, with their descriptors. For each, the
adopter finds the running task in the store (by owner, pid and the process's create time),
records itself as its owner (:meth:`~.store.base.TaskStore.adopt`, event ``adopted``) and starts a
controlling thread that supervises it as a slot would have (:class:`AdoptedRun`): progress, logs,
output, timeout, memory limit, pause, stop, and the end recorded with the real exit code and result.
The connection stays open as the way to signal the tasks' process groups through the holder.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from .capture import PipeReader
from .channel import PacketChannel
from ..exceptions import StoreError
from .forkserver import ChildProcess, forget_parent_only, remember_parent_only
from .handover import OFFER_TIMEOUT, announce_release, recv_packet, request_signal, send_packet, wait_readable
from .retrier import Retrier
from .proctree import IDLE_NAME, process_name
from ..states import TaskStatus
from ..store.base import Row
from .supervisor import TaskRun, requested_stop

if TYPE_CHECKING:
    from .runtime import Runtime

_CREDENTIALS = struct.Struct("3i")  # pid, uid, gid of a Unix socket's peer
#: Seconds apart the create time of a process and the one the store recorded may be.
_CREATED_SLACK = 0.01


class Link:
    """The adopter's connection to a holder: how it signals the holder's task processes."""

    def __init__(self, sock: socket.socket, holder: int) -> None:
        self._sock = sock
        #: The holder's pid (its fork server's).
        self.holder = holder
        # Guards the request/answer exchange and the count.
        self._lock = threading.Lock()
        #: Users of the link: the adopted tasks running, and the listener until its answer was sent.
        self._tasks = 1
        self._closed = False

    def add(self) -> None:
        with self._lock:
            self._tasks += 1

    def signal_group(self, pid: int, signum: int) -> bool:
        """Signal task process ``pid``'s group through the holder; False when that is not possible."""
        with self._lock:
            if self._closed:
                return False
            try:
                return request_signal(self._sock, pid, signum)
            except OSError:
                return False

    def release(self) -> None:
        """Tell the holder this process lets its tasks go: their ends are kept for the next adopter."""
        with self._lock:
            if not self._closed:
                try:
                    announce_release(self._sock)
                except OSError:
                    pass

    def task_ended(self) -> None:
        """One adopted task is no longer this process's; the last one closes the link (the holder then exits)."""
        with self._lock:
            self._tasks -= 1
            if self._tasks <= 0:
                self._close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()


class Offer:
    """One task process a holder offers: what it says of it, and its descriptors."""

    def __init__(self, meta: dict[str, Any], fds: list[int]) -> None:
        self.pid = int(meta["pid"])
        self.created = float(meta["created"])
        self.exited = bool(meta["exited"])
        outputs = int(meta["outputs"])
        if len(fds) != 2 + outputs:
            raise ValueError("an offer with the wrong number of descriptors")
        self.fds = fds

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def child(self, signal_group: Any) -> ChildProcess:
        """The handle of the offered process (it takes the descriptors)."""
        channel, exit_r, *outputs = self.fds
        self.fds = []
        remember_parent_only(channel, exit_r, *outputs)
        output = PipeReader(dict(zip(outputs, (1, 2))), on_close=forget_parent_only) if outputs else None
        return ChildProcess(self.pid, PacketChannel(channel), exit_r, signal_group, output)


class AdoptionListener(threading.Thread):
    """Takes offers of task processes from holders, for one controller of this serving process."""

    def __init__(self, runtime: "Runtime", directory: str) -> None:
        super().__init__(name=f"mpc-{runtime.config.name}-adoption", daemon=True)
        self.runtime = runtime
        self.path = os.path.join(directory, f"{os.getpid()}.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            os.unlink(self.path)  # left by a process of this pid that was killed
        except FileNotFoundError:
            pass
        self._listener.bind(self.path)
        self._listener.listen(16)
        remember_parent_only(self._listener.fileno())
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False

    def run(self) -> None:
        try:
            while not self.stopping():
                ready = wait_readable([self._listener.fileno(), self._wake_r], 3600.0)
                if self.stopping():
                    return
                if self._listener.fileno() in ready:
                    try:
                        conn, _ = self._listener.accept()
                    except OSError:
                        continue
                    try:
                        self._serve(conn)
                    except Exception:  # one bad offer must not end the listener
                        self.runtime.logger.exception("Taking over tasks offered for adoption failed.")
                        conn.close()
        finally:
            self._close()

    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Take no more offers (an offer being served is finished first)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass
        if self.is_alive():
            self.join()

    def _close(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
        forget_parent_only(self._listener.fileno())
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _serve(self, conn: socket.socket) -> None:
        rt = self.runtime
        peer, uid, _ = _CREDENTIALS.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
        if uid != os.getuid():
            rt.logger.warning("Refused an offer of tasks from a process of another user (uid %d).", uid)
            conn.close()
            return
        conn.settimeout(OFFER_TIMEOUT)
        offers: list[Offer] = []
        try:
            hello, _ = recv_packet(conn)
            for _ in range(int(hello["tasks"])):
                meta, fds = recv_packet(conn, max_fds=4)
                try:
                    offers.append(Offer(meta, fds))
                except (KeyError, TypeError, ValueError):
                    for fd in fds:
                        os.close(fd)
                    raise
            owner = str(hello["owner"])
        except (OSError, EOFError, KeyError, TypeError, ValueError):
            for offer in offers:
                offer.close()
            conn.close()
            return
        link = Link(conn, peer)
        accepted = rt.take_over(owner, offers, link) if not self._stopping else None
        for offer in offers:
            offer.close()
        try:
            if accepted is None:
                send_packet(conn, {"refused": True})
            else:
                send_packet(conn, {"owner": rt.owner, "accepted": accepted})
            conn.settimeout(None)
        except OSError:
            pass
        link.task_ended()  # the listener's own use ends: the link closes with its last task (or now, if none)


def adoptable(offer: Offer, row: Optional[Row], fresh_process: bool) -> bool:
    """Whether ``offer`` is the process the store says runs ``row``'s task (and still runs it)."""
    if row is None:
        return False
    # A reaped process is matched by its pid alone: its holder, its parent, reaped it, so the store's pid of a
    # task of the ended owner is still that process; a live one must have the stored create time too.
    if not offer.exited and abs((row.get("pid_created") or 0.0) - offer.created) > _CREATED_SLACK:
        return False
    # A reused process between tasks runs none, whatever the store says (its end was not read).
    return fresh_process or offer.exited or process_name(offer.pid) != IDLE_NAME


class AdoptedRun(threading.Thread):
    """A controlling thread for one adopted task: supervises it, then records its end."""

    def __init__(self, runtime: "Runtime", row: Row, child: ChildProcess, link: Link) -> None:
        super().__init__(name=f"mpc-{runtime.config.name}-adopted-{child.pid}", daemon=True)
        self.runtime = runtime
        self.row = row
        self.child = child
        self.link = link
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Guards _open and the pipe's descriptors, which wake() writes from other threads.
        self._pipe_lock = threading.Lock()
        self._open = True
        self._retrier = Retrier(runtime.logger, runtime.give_up_event)
        self._supervisor = runtime.new_supervisor(self._wake_r, self._retrier)

    def wake(self) -> None:
        with self._pipe_lock:
            if self._open:
                try:
                    os.write(self._wake_w, b"!")
                except BlockingIOError:
                    pass

    def run(self) -> None:
        rt, row, child = self.runtime, self.row, self.child
        run = TaskRun(row["uuid"], row.get("timeout"), self.wake, row.get("progress"), row.get("percent"),
                      attempt=row.get("attempt"), claimed_at=row.get("started_at"))
        run.started = time.monotonic() - _elapsed(rt, row)  # the timeout counts from the task's start
        run.errors = list(row.get("errors") or [])
        run.has_state = row.get("state_saved_at") is not None
        run.traceparent, run.created_at = row.get("traceparent"), row.get("created_at")
        rt.register_adopted(run)
        try:
            run.attach(child)
            if row.get("stop_requested"):
                run.request_stop(requested_stop(row))
            run.request_pause(row.get("status") == TaskStatus.PAUSED.value)
            outcome = self._supervisor.supervise(run, child)
            if outcome is not None:
                if outcome.child_alive:
                    rt.retire(child)
                rt.record(run, outcome, self._retrier, claim_next=False)
        except Exception as exc:  # the thread must record something whatever happens
            rt.logger.exception("Controlling thread failed while running adopted task %s.", row["uuid"])
            rt.fail(row["uuid"], exc, self._retrier)
        finally:
            rt.unregister(run)
            child.close()
            self.link.task_ended()
            with self._pipe_lock:
                self._open = False
                os.close(self._wake_r)
                os.close(self._wake_w)
            rt.adopted_run_ended(self)


def _elapsed(rt: "Runtime", row: Row) -> float:
    """Seconds the task has run, on the store's clock (0 when the store cannot say now)."""
    try:
        return max(0.0, rt.store.now() - (row.get("started_at") or rt.store.now()))
    except StoreError:
        return 0.0
