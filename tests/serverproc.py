"""Real server processes for the tests: start one on 127.0.0.1, wait for its port, stop it, and
check that its whole process tree (workers, fork servers, task processes) is gone.

Every process ever seen in a server's tree is remembered (psutil keeps each one's create time, so
a recycled pid is never mistaken for it): a fork server or task process re-parented to init after
its parent died is still checked.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import psutil
import requests

#: Seconds a server gets to open its port.
START_TIMEOUT = 30.0


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """True when 127.0.0.1:``port`` can be bound (nothing listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _default_sigint() -> None:  # pragma: no cover - runs in the child before exec
    # A shell that starts pytest in the background may leave SIGINT ignored, and an ignored signal
    # stays ignored across exec: give the server the Ctrl-C behaviour a terminal user has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _describe(proc: psutil.Process) -> str:
    try:
        command = " ".join(proc.cmdline())[:120]
        return f"pid {proc.pid} ({command!r}, status {proc.status()}, ppid {proc.ppid()})"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


class Server:
    """One server process (and its descendants) started by a test."""

    def __init__(self, args: Sequence[str], *, cwd: Path, env: dict, port: int, log_path: Path) -> None:
        self.args = list(args)
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(self.args, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_default_sigint)
        self.root = psutil.Process(self.proc.pid)
        #: Every process seen in the tree so far, by pid.
        self.seen: dict[int, psutil.Process] = {self.root.pid: self.root}

    # -- observing ------------------------------------------------------------

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def remember(self) -> list[psutil.Process]:
        """Add the tree's current members to :attr:`seen`; return the live ones."""
        try:
            members = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            members = []
        for proc in members:
            self.seen.setdefault(proc.pid, proc)
        for proc in list(self.seen.values()):
            # Re-parented descendants (an orphaned fork server, say) and their children.
            if not _gone(proc):
                try:
                    for child in proc.children(recursive=True):
                        self.seen.setdefault(child.pid, child)
                except psutil.Error:
                    pass
        return [p for p in self.seen.values() if not _gone(p)]

    def alive(self) -> list[psutil.Process]:
        """The remembered processes that still run."""
        return [p for p in self.seen.values() if not _gone(p)]

    def wait_ready(self, timeout: float = START_TIMEOUT, path: str = "/") -> None:
        """Wait until the server answers HTTP on its port; fail with its log if it died or timed out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server {self.args} exited with {self.proc.returncode} "
                                     f"before listening:\n{self.log()}")
            if _listening(self.port):
                try:
                    requests.get(self.base + path, timeout=5)
                    break
                except requests.RequestException:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server {self.args} did not listen on port {self.port} "
                                     f"within {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        self.remember()

    # -- stopping -------------------------------------------------------------

    def send(self, signum: int, group: bool = False) -> None:
        """Send ``signum`` to the server (or to its whole process group, as a terminal's Ctrl-C does)."""
        self.remember()
        try:
            if group:
                os.killpg(self.proc.pid, signum)
            else:
                self.proc.send_signal(signum)
        except ProcessLookupError:
            pass

    def wait_gone(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` s for every remembered process to end; return descriptions of survivors."""
        deadline = time.monotonic() + timeout
        while True:
            self.proc.poll()  # reap the server itself (our child)
            for proc in list(self.seen.values()):
                if not _gone(proc):
                    try:
                        for child in proc.children(recursive=True):
                            self.seen.setdefault(child.pid, child)
                    except psutil.Error:
                        pass
            survivors = self.alive()
            if not survivors and self.proc.returncode is not None:
                return []
            if time.monotonic() > deadline:
                return [_describe(p) for p in survivors] or [f"server pid {self.proc.pid} not reaped"]
            time.sleep(0.05)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0, group: bool = False) -> list[str]:
        """Signal the server, wait for its whole tree to end, and kill (and report) what survived."""
        self.send(signum, group=group)
        survivors = self.wait_gone(timeout)
        if survivors:
            self.kill()
        return survivors

    def kill(self) -> None:
        """SIGKILL everything that is left of the tree, and reap the server."""
        self.remember()
        for proc in self.seen.values():
            try:
                if not _gone(proc):
                    proc.kill()
            except psutil.Error:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.wait_gone(10)
        self._log.close()


class ServerPool:
    """Servers started by one test; :meth:`close` kills whatever a failed test left running."""

    def __init__(self) -> None:
        self.servers: list[Server] = []

    def start(self, args: Sequence[str], *, cwd: Path, port: int, log_path: Path,
              env: Optional[dict] = None, ready_path: str = "/") -> Server:
        full_env = dict(os.environ)
        full_env.pop("MPC_STORE_URL", None)
        full_env.pop("FLASK_RUN_FROM_CLI", None)
        full_env.update(env or {})
        server = Server(args, cwd=cwd, env=full_env, port=port, log_path=log_path)
        self.servers.append(server)
        server.wait_ready(path=ready_path)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.kill()


def python(*args: str) -> list[str]:
    """The command line running this interpreter with ``args``."""
    return [sys.executable, *args]


def gunicorn(*args: str) -> list[str]:
    """The command line of gunicorn run by this interpreter (the one the package is installed in)."""
    return [sys.executable, "-m", "gunicorn", *args]


def poll_until(fetch: Callable[[], dict], done: Callable[[dict], bool], timeout: float,
               interval: float = 0.05) -> dict:
    """Call ``fetch`` until ``done(value)``; fail with the last value after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last value: {value}")
        time.sleep(interval)


def statuses(tasks: Iterable[dict]) -> dict[str, int]:
    """Count task objects by status."""
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task["status"]] = counts.get(task["status"], 0) + 1
    return counts
