"""What every peer of the benchmark provides, and the helpers peers share.

A peer is one way of running "return x + y" (and the few other benchmark tasks) in child
processes with a concurrency of 2: a bare ``multiprocessing`` process per task, a
``ProcessPoolExecutor``, Celery, RQ, the upstream 0.1.1 release, restful-functions, or this
project. The workloads in :mod:`bench.workloads` drive every peer through this interface only,
so each figure means the same thing for every peer.

Handles are whatever the peer needs to find a task again (a uuid, an ``AsyncResult``, ...).
Everything a peer starts (servers, workers, child processes) it stops in :meth:`Peer.close`.
"""
from __future__ import annotations

import abc
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, TypeVar

if TYPE_CHECKING:
    import psutil

T = TypeVar("T")

# psutil is imported where it is used: RQ imports this module in every job's fresh process, and
# its figures should not include an import they do not need.

#: Every benchmark task runs with this many processes at once.
CONCURRENCY = 2
#: The stop workloads' checkpointing task sleeps this long between checkpoints.
CHECKPOINT_EVERY = 0.01
#: Seconds any single wait of a workload may take before the peer is reported as stalled.
WAIT_TIMEOUT = 60.0

#: Workload names (see :mod:`bench.workloads`); a peer lists those it supports in ``supports``.
BURST = "burst"
SEQUENTIAL = "sequential"
DISPATCH = "dispatch"
STOP_CHECKPOINT = "stop_checkpoint"
STOP_IGNORING = "stop_ignoring"
MEMORY = "memory"
PROGRESS = "progress"
STORED = "stored"
POST = "post"

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent


class PeerUnavailable(Exception):
    """The peer cannot run here (a package or program is missing); the report says why."""


class Peer(abc.ABC):
    """One system under test.

    ``start`` brings it up (servers answering, workers idle and warm enough that the first task
    does not pay import costs), ``close`` tears everything down. The task methods submit one
    task and return a handle at once; ``result`` blocks until that task's value is known.
    """

    #: Short stable key, used on the command line and in the results file.
    key: str = ""
    #: Human label for the report.
    label: str = ""
    #: Which workloads this peer takes part in (the others are reported as "n/a").
    supports: frozenset = frozenset({BURST, SEQUENTIAL, DISPATCH})
    #: True when the peer serves from the benchmark's own process (the floors, the Python API): the
    #: CPU of that process, less the client threads' own, is then its serving CPU.
    in_process: bool = False

    def __init__(self, workdir: Path, python: Optional[str] = None) -> None:
        #: A private directory for this peer's files (logs, databases, sockets).
        self.workdir = workdir
        #: The interpreter of the benchmark environment (for servers and workers this peer starts).
        self.python = python or sys.executable

    # -- life cycle --------------------------------------------------------------------------
    @abc.abstractmethod
    def start(self) -> None:
        """Bring the peer up; raise :class:`PeerUnavailable` if it cannot run here."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop everything :meth:`start` started; safe to call twice and after a failed start."""

    def versions(self) -> dict:
        """Versions worth printing in the report, e.g. ``{"celery": "5.4.0"}``."""
        return {}

    def prepare(self, workload: str) -> None:
        """Called before each workload; a peer that needs another configuration for it (say, a
        stop grace of 0 for the ignoring task) switches here. Most peers need nothing."""

    def recover(self) -> None:
        """Called after a run of a workload failed (a stall, a timeout): get the peer back into a
        state where the next run can start. By default nothing is done."""

    # -- the trivial task -------------------------------------------------------------------
    @abc.abstractmethod
    def submit_add(self, x: int, y: int) -> Any:
        """Queue ``add(x, y)``; return its handle."""

    @abc.abstractmethod
    def result(self, handle: Any, timeout: float = WAIT_TIMEOUT) -> Any:
        """Block until the task ends; return its result (raise on failure or timeout)."""

    def submit_stamp(self) -> Any:
        """Queue a task whose first line returns ``time.time()`` (dispatch latency)."""
        raise NotImplementedError

    # -- stop -------------------------------------------------------------------------------
    def submit_checkpointing(self) -> Any:
        """Queue a task that loops forever, sleeping :data:`CHECKPOINT_EVERY` then checking
        for a stop request the peer's own way (for peers without one, it just loops)."""
        raise NotImplementedError

    def submit_ignoring(self) -> Any:
        """Queue a task that loops forever and never checks for a stop request."""
        raise NotImplementedError

    def wait_running(self, handle: Any, timeout: float = WAIT_TIMEOUT) -> None:
        """Block until the task is known to be running."""
        raise NotImplementedError

    def stop(self, handle: Any) -> None:
        """Ask the peer to stop the task the way its users would (DELETE, revoke, ...)."""
        raise NotImplementedError

    def wait_stopped(self, handle: Any, timeout: float = WAIT_TIMEOUT) -> None:
        """Block until the peer reports the task as stopped (or revoked, killed, ...)."""
        raise NotImplementedError

    # -- memory -----------------------------------------------------------------------------
    def server_pids(self) -> list[int]:
        """Pids of the peer's own long-lived processes (servers, workers; not Redis); their
        descendants are included by :func:`tree_pss`."""
        return []

    # -- where the time goes ------------------------------------------------------------------
    def cpu_roles(self) -> dict:
        """CPU seconds so far of the peer's processes by role (``serving``, ``fork server``, ``tasks``,
        ``redis``), outside the benchmark's own process; by default the server pids serve and
        everything below them runs tasks. :mod:`bench.peers.accounting` says how each is read."""
        from . import accounting
        return accounting.tree_roles(accounting.processes(self.server_pids()))

    def store_writes(self) -> Optional[int]:
        """Store write transactions so far, for peers that can count them (else None)."""
        return None

    # -- progress ---------------------------------------------------------------------------
    def submit_progress(self, iterations: int, report: bool) -> Any:
        """Queue the tight loop: ``iterations`` steps of fixed work, each followed by the peer's
        progress call when ``report``; the result is the loop's own duration in seconds."""
        raise NotImplementedError


# -- helpers shared by peers -------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, chosen below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` is an ephemeral one, and any outgoing connection
    made before the server binds it may take it; a port below that range is never given away.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randint(min(20000, low // 2), low - 1)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, proc: Optional[subprocess.Popen] = None, timeout: float = 60.0,
              log: Optional[Path] = None) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f} s")


def poll_until(read: Callable[[], T], done: Callable[[T], bool], timeout: float, what: str,
               interval: float = 0.001) -> T:
    """Call ``read`` every ``interval`` seconds until ``done`` accepts its value; return that value.

    ``done`` may raise to give up early (the task ended another way); after ``timeout`` seconds a
    :class:`TimeoutError` names ``what`` was awaited and the last value read.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s (last seen: {value!r})")
        time.sleep(interval)


def spawn(argv: Sequence[str], log: Path, cwd: Optional[Path] = None, env: Optional[dict] = None) -> subprocess.Popen:
    """Start a server or worker in its own session, output to ``log``."""
    merged = dict(os.environ)
    merged["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_DIR), merged.get("PYTHONPATH", "")]))
    merged.update(env or {})
    with open(log, "ab") as out:
        return subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(cwd or REPO_DIR), env=merged, start_new_session=True)


def _tree(pids: Iterable[int]) -> list["psutil.Process"]:
    import psutil
    seen: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                seen[proc.pid] = proc
        except psutil.Error:
            continue
    return list(seen.values())


def stop_tree(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Signal ``proc``, wait for it, then SIGKILL whatever is left of its whole tree."""
    import psutil
    if proc is None:
        return
    procs = _tree([proc.pid])
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    procs += _tree([proc.pid]) if proc.poll() is None else []
    for leftover in procs:
        try:
            leftover.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    psutil.wait_procs(procs, timeout=5)


def tree_pss(pids: Iterable[int]) -> int:
    """Proportional set size, in bytes, of these processes and all their descendants."""
    import psutil
    total = 0
    for proc in _tree(pids):
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            continue
    return total


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1 at a free port, without persistence."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise PeerUnavailable("redis-server is not on PATH (the benchmark installs Debian's redis-server)")
        self.port = free_port()
        self.proc = spawn([binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                           "--appendonly", "no", "--dir", str(self.workdir)], self.workdir / "redis.log")
        wait_port(self.port, self.proc, log=self.workdir / "redis.log")
        return self

    def stop(self) -> None:
        stop_tree(self.proc)
        self.proc = None


def busy_step() -> int:
    """The fixed unit of work of the progress loop (a few microseconds of pure Python)."""
    total = 0
    for i in range(40):
        total += i * i
    return total
