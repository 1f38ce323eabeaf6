"""Serving an app for a benchmark script, and reading the CPU time of what serves it.

The scripts that measure this project behind HTTP (``bench/idle.py``, ``bench/web_tier.py``,
``bench/long_tasks.py``, ``bench/scale_out.py``, ``bench/cross_host.py``) all start an app under the
dev server or gunicorn, wait until it answers with its controllers' fork servers up, read the CPU
seconds of some of its processes over a window, and stop its whole process tree however the run
ends. :class:`Server` does the serving part and names the processes each figure counts; the
``cpu_*`` functions read and compare CPU seconds; :func:`torn_down` runs a script's body and stops
everything it started.

CPU seconds here are user + system time from psutil (clock ticks), summed over processes that are
keyed by (pid, start time), so that a pid reused within a window is not taken for the same process.
"""
from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence, TypeVar

import psutil
import requests

from bench import pgcluster
from bench.peers.base import REPO_DIR, free_port, poll_until, spawn, stop_tree, wait_port

#: The name this project's fork servers give themselves (``/proc/PID/comm``).
FORK_SERVER_NAME = "mpc-forkserver"
#: Seconds a server may take to answer with every serving process and fork server up.
READY_TIMEOUT = 60.0
#: A CPU sample: seconds so far of each process, by (pid, start time).
CpuSample = dict[tuple[int, float], float]
T = TypeVar("T")


def gunicorn_argv(app_module: str, port: int, workers: int, threads: int) -> list[str]:
    """gunicorn serving ``app_module`` on 127.0.0.1: ``workers`` gthread workers of ``threads`` threads."""
    return [sys.executable, "-m", "gunicorn", "-w", str(workers), "-k", "gthread", "--threads", str(threads),
            "--timeout", "120", "--graceful-timeout", "15", "-b", f"127.0.0.1:{port}", app_module]


def _children(proc: psutil.Process, recursive: bool = False) -> list[psutil.Process]:
    """The children of ``proc``, none once it is gone."""
    try:
        return proc.children(recursive=recursive)
    except psutil.Error:
        return []


class Server:
    """One app served by a benchmark script in its own session, with its whole process tree.

    ``workers`` is gunicorn's worker count, 0 for the dev server (the server is then its only serving
    process). The app mounts its resource at ``/tasks`` and reads its port from ``PORT``; its output
    goes to ``<workdir>/<name>.log``.
    """

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], workdir: Path, port: int,
                 workers: int) -> None:
        self.name = name
        self.port = port
        self.workers = workers
        self.log = workdir / f"{name}.log"
        #: The command line with the project's and the benchmark's variables, as a report shows it.
        variables = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith(("MPC_", "BENCH_")))
        self.command = variables + " " + " ".join(str(a) for a in argv)
        self.proc = spawn(argv, self.log, cwd=REPO_DIR,
                          env={**env, "PORT": str(port), "PYTHONUNBUFFERED": "1"})
        self.root = psutil.Process(self.proc.pid)
        self.base = f"http://127.0.0.1:{port}/tasks"

    @classmethod
    def dev(cls, name: str, app: Path, env: dict[str, str], workdir: Path) -> Server:
        """The app's own script (the threaded Werkzeug dev server) at a free port."""
        return cls(name, [sys.executable, str(app)], env, workdir, free_port(), workers=0)

    @classmethod
    def gunicorn(cls, name: str, app_module: str, env: dict[str, str], workdir: Path, workers: int,
                 threads: int) -> Server:
        """``app_module`` under gunicorn (see :func:`gunicorn_argv`) at a free port."""
        port = free_port()
        argv = gunicorn_argv(app_module, port, workers, threads)
        return cls(name, argv, env, workdir, port, workers=workers)

    # -- talking to it ---------------------------------------------------------------------------------
    def url(self, uuid: str) -> str:
        return f"{self.base}/{uuid}"

    def tail(self) -> str:
        """The last lines of its log, for an error message."""
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def wait_ready(self, timeout: float = READY_TIMEOUT, http: bool = True,
                   fork_servers: bool = True) -> None:
        """Wait until every serving process is up and, with ``fork_servers``, has its controller's fork
        server. With ``http`` a GET of ``/tasks`` must answer 200 (an app without that route is waited
        for until its port accepts connections instead). Fails at once if the server exits."""
        if not http:
            wait_port(self.port, self.proc, timeout, log=self.log)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if http and requests.get(self.base, timeout=5).status_code != 200:
                    return False
                serving = self.serving()
                return len(serving) == max(1, self.workers) and (
                    not fork_servers or all(p.children() for p in serving))
            except (requests.RequestException, psutil.Error):
                return False
        poll_until(ready, bool, timeout, f"{self.name} ready", interval=0.1)

    # -- its processes ---------------------------------------------------------------------------------
    def serving(self) -> list[psutil.Process]:
        """The processes that serve requests: gunicorn's workers, or the dev server itself."""
        return _children(self.root) if self.workers else [self.root]

    def arbiter(self) -> list[psutil.Process]:
        """gunicorn's master (which serves no request itself); none for the dev server."""
        return [self.root] if self.workers else []

    def serving_with_children(self) -> list[psutil.Process]:
        """Each serving process followed by its own children (its controllers' fork servers)."""
        return [p for proc in self.serving() for p in (proc, *_children(proc))]

    def web_tier(self) -> list[psutil.Process]:
        """The serving processes (and gunicorn's arbiter) and their fork servers: not the task processes."""
        procs = [self.root]
        try:
            for proc in self.root.children(recursive=True):
                try:
                    if proc.ppid() == self.root.pid and self.workers:
                        procs.append(proc)  # a gunicorn worker
                    elif proc.name() == FORK_SERVER_NAME:
                        procs.append(proc)
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        return procs

    def tree(self) -> list[psutil.Process]:
        """Every process of the server's tree, task processes included."""
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def pids(self) -> set[int]:
        return {p.pid for p in self.tree()}

    def cpu_seconds(self) -> CpuSample:
        """CPU seconds so far of each process of the tree, with the children each has reaped."""
        return cpu_seconds(self.tree(), reaped=True)

    def client_ports(self) -> set[int]:
        """Ports of the clients whose connections the server's processes have accepted and hold open."""
        ports = set()
        for proc in self.tree():
            try:
                for conn in proc.net_connections(kind="tcp"):
                    accepted = conn.status == psutil.CONN_ESTABLISHED and conn.laddr \
                        and conn.laddr.port == self.port
                    if accepted and conn.raddr:
                        ports.add(conn.raddr.port)
            except psutil.Error:
                continue
        return ports

    def stop(self) -> None:
        """Stop the whole tree; a server frozen with SIGSTOP is woken first, or it would miss its SIGTERM."""
        try:
            self.root.resume()
        except psutil.Error:
            pass
        stop_tree(self.proc)


class PostgresStore:
    """A private PostgreSQL cluster (:mod:`bench.pgcluster`) that is stopped, like a server, by ``stop``."""

    def __init__(self) -> None:
        self.cluster = pgcluster.PostgresCluster()

    def stop(self) -> None:
        self.cluster.destroy()


# -- CPU seconds ---------------------------------------------------------------------------------------


def cpu_seconds(procs: Iterable[psutil.Process], reaped: bool = False) -> CpuSample:
    """CPU seconds so far of each of ``procs`` (those gone are left out), with ``reaped`` also those of
    the children each has waited for."""
    seconds = {}
    for proc in procs:
        try:
            times = proc.cpu_times()
            used = times.user + times.system
            if reaped:
                used += times.children_user + times.children_system
            seconds[(proc.pid, proc.create_time())] = used
        except psutil.Error:
            continue
    return seconds


def cpu_spent(before: CpuSample, after: CpuSample, count_new: bool) -> float:
    """CPU seconds spent between two samples by the processes alive at the second. A process absent
    from the first counts all it used since it started with ``count_new``, nothing without it."""
    return sum(used - before.get(key, 0.0 if count_new else used) for key, used in after.items())


def tree_cpu_seconds(root: psutil.Process) -> float:
    """CPU seconds so far of ``root`` and all its descendants (a store server with its backends)."""
    return sum(cpu_seconds([root, *_children(root, recursive=True)]).values())


class CpuSampler(Protocol):
    """Anything whose CPU seconds a window can read: a :class:`Server`, a :class:`Process`."""

    def cpu_seconds(self) -> CpuSample: ...


class Process:
    """One plain process (a store's server) read like :meth:`Server.cpu_seconds`: its own CPU only."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)

    def cpu_seconds(self) -> CpuSample:
        return cpu_seconds([self.proc])


def cpu_rates(samplers: Sequence[CpuSampler], window: float) -> list[float]:
    """CPU seconds per wall second of each of ``samplers`` over ``window`` seconds of sleep (a process
    that started during it counts all it used)."""
    before = [s.cpu_seconds() for s in samplers]
    began = time.monotonic()
    time.sleep(window)
    after = [s.cpu_seconds() for s in samplers]
    elapsed = time.monotonic() - began
    return [cpu_spent(b, a, count_new=True) / elapsed for b, a in zip(before, after)]


# -- tearing down ----------------------------------------------------------------------------------------


class Stoppable(Protocol):
    """Anything a script starts and must stop: a :class:`Server`, a Redis server, a cluster."""

    def stop(self) -> None: ...


def torn_down(prefix: str, body: Callable[[Path, list[Stoppable]], T]) -> T:
    """Run ``body(workdir, started)`` in a fresh temporary directory; whatever it appends to ``started``
    (servers, Redis, a cluster: anything with ``stop``) is stopped in reverse order however it ends, also
    on SIGTERM, and the directory removed. When it fails, the last lines of each server's log are printed."""
    # SIGTERM unwinds like Ctrl-C, so that the finally clause below tears everything down.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    started: list[Stoppable] = []
    try:
        return body(workdir, started)
    except Exception:
        for thing in started:
            if isinstance(thing, Server):
                print(f"--- last lines of {thing.name}'s log ---\n{thing.tail()}", file=sys.stderr)
        raise
    finally:
        for thing in reversed(started):
            thing.stop()
        shutil.rmtree(workdir, ignore_errors=True)


__all__ = ["FORK_SERVER_NAME", "CpuSample", "Process", "PostgresStore", "Server", "cpu_rates", "cpu_seconds",
           "cpu_spent", "gunicorn_argv", "torn_down", "tree_cpu_seconds"]
