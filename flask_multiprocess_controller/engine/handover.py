"""Hand-over: running tasks outlive the serving process that started them.

A restart of the web app (a gunicorn reload, a worker recycled after ``--max-requests``, a worker
killed for a timeout, a deploy) ends serving processes, not tasks. Every task process is a child
of its controller's fork server (see :mod:`.forkserver`), which keeps a copy of the serving
process's end of each task's channel and output pipes. When the serving process ends — it
released its tasks on the way out, or it was killed — the fork server stays with the task
processes (a *holder*) and offers them to a live serving process of the same controller on the
same host, over a Unix socket in a private directory (see :func:`handover_directory`): the
descriptors travel with ``SCM_RIGHTS``, and the adopting process checks that the peer runs as
its own user (``SO_PEERCRED``). The adopter records itself as the tasks' owner (one store write
each, event ``adopted``) and supervises them from then on as if it had started them (see
:mod:`.adoption`); it signals their process groups through the holder, which stays their parent.

When no serving process takes them within ``handover_window`` seconds (a full stop), the holder
does what the ending serving process would have done: it stops them in the usual steps (the
stop request, ``stop_grace``, SIGTERM, SIGKILL) and records each end, or queues the task again
when its class is ``restartable`` or it saved state. While it holds tasks it keeps a heartbeat
(:func:`held_key`) so that no reconciliation on another host settles them meanwhile.

Adopted tasks keep running the code they started with: a deploy changes the code of the tasks
started after it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import select
import signal
import socket
import stat
import struct
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import psutil

from .. import defaults
from .config import Settings

if TYPE_CHECKING:
    from .forkserver import Task, _Server
    from ..store import TaskStore

#: Environment variable (and app config key) of the seconds running tasks wait to be adopted.
HANDOVER_WINDOW_ENV = "MPC_HANDOVER_WINDOW"
#: Environment variable that makes Ctrl-C (SIGINT) hand tasks over too, instead of stopping them.
HANDOVER_ON_SIGINT_ENV = "MPC_HANDOVER_ON_SIGINT"
#: Environment variable naming the folder of the hand-over sockets (default: a private one in /tmp).
HANDOVER_DIR_ENV = "MPC_HANDOVER_DIR"
#: Seconds between two looks of a holder for a serving process to adopt its tasks.
OFFER_INTERVAL = 0.1
#: Seconds one offer may take (the adopter reads the store to check each task).
OFFER_TIMEOUT = 15.0
#: Bytes of one hand-over packet's JSON at most.
_PACKET = 64 * 1024
_SIGNAL = struct.Struct("ii")
_ANSWER = struct.Struct("i")

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandoverConfig:
    """What a fork server needs to hold its task processes for adoption, and to settle them if none comes."""

    #: The folder of the controller's adoption sockets.
    directory: str
    #: The serving process that owns the tasks in the store.
    owner: str
    #: Seconds to wait for an adopter.
    window: float
    store_url: str
    controller: str
    #: The controller's supervision settings (:attr:`~.config.RuntimeConfig.supervision`).
    supervision: Settings
    restartable: bool


def held_key(owner: str, holder: int) -> str:
    """The heartbeat that holder ``holder`` (a fork server's pid) keeps for the tasks of ``owner`` it holds.

    One per holder: the tasks of one owner may be held by several (its own fork server, and those whose
    tasks it had adopted), and one of them being adopted must not end the others' (see
    :func:`~.owners.owner_alive`).
    """
    return f"{held_prefix(owner)}{holder}"


def held_prefix(owner: str) -> str:
    """What every :func:`held_key` of ``owner`` begins with."""
    return f"held:{owner}#"


def configured_window(value: Optional[float]) -> float:
    """The hand-over window: the value given, else ``MPC_HANDOVER_WINDOW``, else the default."""
    if value is None:
        raw = os.environ.get(HANDOVER_WINDOW_ENV)
        value = float(raw) if raw not in (None, "") else defaults.HANDOVER_WINDOW
    if value != value or value < 0:
        raise ValueError(f"handover_window must be a non-negative number of seconds, not {value!r}.")
    return float(value)


def reopen_url(store: "TaskStore") -> Optional[str]:
    """A URL that opens ``store`` again in another process, or None (a store of one process, or of its own kind)."""
    from ..store.sqlite import SQLiteStore

    if isinstance(store, SQLiteStore):
        return "sqlite:///" + store.path
    if type(store).__name__ == "RedisStore" and getattr(store, "prefix", None) == "mpc:":
        return str(getattr(store, "url"))
    if type(store).__name__ == "PostgresStore":
        return str(getattr(store, "reopen_url"))
    return None


def handover_directory(host: str, controller: str, store_url: str) -> Optional[str]:
    """The private folder of one controller's adoption sockets on this host (made if needed), or None.

    None when no private folder can be had (it exists but belongs to another user, or others may
    read it): the hand-over is then off, rather than open to other users of the machine.
    """
    base = os.environ.get(HANDOVER_DIR_ENV) or os.path.join(tempfile.gettempdir(), f"mpc-{os.getuid()}")
    key = hashlib.sha256(f"{host}\0{controller}\0{store_url}".encode()).hexdigest()[:16]
    for folder in (base, os.path.join(base, key)):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            _LOGGER.warning("Hand-over is off: cannot make %s (%s).", folder, exc)
            return None
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            _LOGGER.warning("Hand-over is off: %s is not a folder of this user that only it may use.", folder)
            return None
    return os.path.join(base, key)


def live_adopters(directory: str) -> list[int]:
    """Pids of the serving processes that listen for adoptions in ``directory`` (this one's excluded)."""
    found = []
    for path in glob.glob(os.path.join(directory, "*.sock")):
        try:
            pid = int(os.path.basename(path)[:-len(".sock")])
        except ValueError:
            continue
        if pid != os.getpid() and psutil.pid_exists(pid):
            found.append(pid)
    return found


def send_packet(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one JSON message (and descriptors) as one packet."""
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def recv_packet(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """Receive one packet sent by :func:`send_packet`; EOFError when the peer is gone."""
    data, fds, _, _ = socket.recv_fds(sock, _PACKET, max_fds)
    if not data:
        for fd in fds:
            os.close(fd)
        raise EOFError("the peer closed the connection")
    try:
        message = json.loads(data)
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise EOFError("a packet that is not JSON") from None
    if not isinstance(message, dict):
        raise EOFError("a packet that is not a JSON object")
    return message, fds


def announce_release(sock: socket.socket) -> None:
    """Tell a holder that its adopter lets the tasks go (it is ending): it keeps their ends for the next."""
    sock.sendall(_SIGNAL.pack(0, 0))


def request_signal(sock: socket.socket, pid: int, signum: int) -> bool:
    """Ask a holder to signal the process group of its task process ``pid``; False when it is not its."""
    sock.sendall(_SIGNAL.pack(pid, signum))
    answer = sock.recv(_ANSWER.size)
    return len(answer) == _ANSWER.size and _ANSWER.unpack(answer)[0] == 0


class Holder:
    """A fork server's life after its controller: it keeps its task processes for adoption.

    Driven by the fork server's loop (:class:`~.forkserver._Server`): :meth:`fds` and
    :meth:`timeout` say what to wait for, :meth:`ready` and :meth:`tick` act.
    """

    def __init__(self, server: "_Server", config: HandoverConfig) -> None:
        self.server = server
        self.config = config
        #: The owner of the tasks in the store: the ended serving process (then each adopter that ends).
        self.owner = config.owner
        self.deadline = time.monotonic() + config.window
        #: The adopter's connection, once one took the tasks.
        self.link: Optional[socket.socket] = None
        self._link_owner: Optional[str] = None
        self._store: Optional["TaskStore"] = None
        self._next_offer = 0.0
        self._next_beat = 0.0
        self._done = False
        #: Set when the adopter said it lets the tasks go: their ends are kept for the next one.
        self._released = False

    # -- the fork server's loop ------------------------------------------------------------

    def fds(self) -> list[int]:
        return [self.link.fileno()] if self.link is not None else []

    def timeout(self) -> Optional[float]:
        if self.link is not None:
            return None
        return max(0.0, min(self._next_offer, self._next_beat, self.deadline) - time.monotonic())

    def ready(self, fd: int) -> None:
        """The adopter asked something, or ended."""
        link = self.link
        if link is None or fd != link.fileno():
            return
        try:
            request = link.recv(_SIGNAL.size)
        except OSError:
            request = b""
        if len(request) == _SIGNAL.size:
            pid, signum = _SIGNAL.unpack(request)
            if pid == 0:  # the adopter lets its tasks go (it is ending): keep every end from now on
                self._released = True
                return
            try:
                link.sendall(_ANSWER.pack(self.server.signal_group(pid, signum)))
                return
            except OSError:
                pass
        self._adopter_gone()

    def tick(self) -> None:
        if self.link is not None or self._done:
            return
        if time.monotonic() >= self._next_offer:
            self._next_offer = time.monotonic() + OFFER_INTERVAL
            if self._offer():
                return
        now = time.monotonic()
        if now >= self._next_beat:
            self._beat()
            self._next_beat = now + defaults.HEARTBEAT_INTERVAL
        if now >= self.deadline:
            self._give_up()

    def finished(self) -> bool:
        """True once no task is left: the fork server may exit."""
        if self.server.tasks and not self._done:
            return False
        if self.link is not None:
            self.link.close()
            self.link = None
        self._forget_beat()
        if self._store is not None:
            self._store.close()
        return True

    def forget_when_reaped(self, task: "Task", delivered: bool) -> bool:
        """Whether a reaped task can be forgotten: yes once its adopter has its exit code (and was not letting
        its tasks go), or when nobody needs it."""
        adopter_has_it = self.link is not None and task.adopted and delivered and not self._released
        return adopter_has_it or task.declined

    # -- offers -----------------------------------------------------------------------------

    def _offer(self) -> bool:
        """Offer the tasks to the first live adopter of the controller on this host; True when one took them."""
        for path in sorted(glob.glob(os.path.join(self.config.directory, "*.sock"))):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.settimeout(OFFER_TIMEOUT)
            try:
                sock.connect(path)
                answer = self._offer_to(sock)
            except (OSError, EOFError, KeyError, TypeError):
                sock.close()
                continue
            if answer is None:
                sock.close()
                continue
            self.link, self._link_owner = sock, answer
            sock.settimeout(None)
            self._forget_beat()
            return True
        return False

    def _offer_to(self, sock: socket.socket) -> Optional[str]:
        """One offer of every task; the adopter's owner id when it took them (None: it refused)."""
        tasks = list(self.server.tasks.values())
        send_packet(sock, {"owner": self.owner, "tasks": len(tasks)})
        for task in tasks:
            exit_r = task.new_exit_pipe()
            try:
                send_packet(sock, {"pid": task.pid, "created": task.create_time(),
                                   "exited": task.exit_code is not None, "outputs": len(task.outputs)},
                            [task.channel, exit_r, *task.outputs])
            finally:
                os.close(exit_r)
        answer, _ = recv_packet(sock)
        if answer.get("refused"):
            return None
        accepted = {int(pid) for pid in answer["accepted"]}
        for task in tasks:
            task.adopted = task.pid in accepted
            if not task.adopted:  # no such running task in the store (or the adopter could not prove it)
                task.declined = True
                self.server.signal_group(task.pid, signal.SIGKILL)
                if task.exit_code is not None:
                    del self.server.tasks[task.pid]
                    task.release()
        return str(answer["owner"])

    def _adopter_gone(self) -> None:
        """The adopter ended too: hold what is left for the next one, as for the first."""
        if self.link is not None:
            self.link.close()
        self.link = None
        self.owner = self._link_owner or self.owner
        self.deadline = time.monotonic() + self.config.window
        self._next_offer = self._next_beat = 0.0
        self._released = False
        for task in self.server.tasks.values():
            task.adopted = False

    # -- the store ---------------------------------------------------------------------------

    def store(self) -> "TaskStore":
        if self._store is None:
            from ..store import resolve_store

            self._store = resolve_store(self.config.store_url)
        return self._store

    def _beat(self) -> None:
        from ..exceptions import StoreError

        try:
            self.store().heartbeat(held_key(self.owner, os.getpid()))
        except StoreError:
            pass

    def _forget_beat(self) -> None:
        from ..exceptions import StoreError

        try:
            if self._store is not None:
                self._store.forget_owner(held_key(self.owner, os.getpid()))
        except StoreError:
            pass

    # -- nobody came -------------------------------------------------------------------------

    def _give_up(self) -> None:
        """No serving process came in time: stop the tasks in the usual steps and record their ends."""
        from .settle import settle_held

        self._done = True
        try:
            settle_held(self.server, self.config, self.owner, self.store())
        except Exception:  # nothing may keep the processes alive: kill them, the next start settles the rest
            _LOGGER.exception("Settling the tasks held for adoption failed; they are killed.")
        self.server.kill_all()


def wait_readable(fds: Sequence[int], timeout: float) -> list[int]:
    """The descriptors of ``fds`` readable within ``timeout`` seconds."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(max(0, int(timeout * 1000)))]
