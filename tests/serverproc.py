"""Real server processes for the tests: start one on 127.0.0.1, wait for its port, stop it, and
check that its whole process tree (workers, fork servers, task processes) is gone.

Every process ever seen in a server's tree is remembered (psutil keeps each one's create time, so
a recycled pid is never mistaken for it): a fork server or task process re-parented to init after
its parent died is still checked.
"""
from __future__ import annotations

import importlib.util
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import psutil
import requests

#: Seconds a server gets to open its port.
START_TIMEOUT = 30.0


#: The example app of the README (``examples/app.py``).
EXAMPLE_APP = Path(__file__).resolve().parent.parent / "examples" / "app.py"


def load_example_app() -> types.ModuleType:
    """Import ``examples/app.py`` as the module ``app`` (test apps that extend it run it this way)."""
    spec = importlib.util.spec_from_file_location("app", EXAMPLE_APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["app"] = module
    spec.loader.exec_module(module)
    return module


#: The line a task's own traceback follows in a server's log: its end, or its failed attempt before a retry (the
#: server logs them on purpose, see engine/logs.py).
_TASK_TRACEBACK_HEAD = re.compile(r"Task [0-9a-f-]{36} (ended [a-z_]+: |[a-z_]+ on attempt \d+ )")


def unexpected_tracebacks(log: str) -> list[str]:
    """The tracebacks in a server's log other than those of tasks that raised: what a test that wants no error
    of the server itself looks for (each with the line before it and a few after)."""
    lines = log.splitlines()
    return ["\n".join(lines[max(0, i - 1):i + 12]) for i, line in enumerate(lines)
            if "Traceback (most recent call last):" in line
            and not (i and _TASK_TRACEBACK_HEAD.search(lines[i - 1]))]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, chosen below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` is an ephemeral one, and any outgoing connection
    made before the server binds it may take it; a port below that range is never given away. Under
    pytest-xdist each worker draws from a part of the range of its own, so that two workers never pick
    the same port between the look and the server's bind.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first = min(20000, low // 2)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    index = int(worker[2:]) % workers if worker[2:].isdigit() else 0
    span = (low - first) // workers
    first += index * span
    for _ in range(200):
        port = random.randint(first, first + span - 1)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
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
        self._adopt_descendants()
        return [p for p in self.seen.values() if not _gone(p)]

    def _adopt_descendants(self) -> None:
        """Remember the children of every remembered process: re-parented ones (an orphaned fork server, say) too."""
        for proc in list(self.seen.values()):
            if not _gone(proc):
                try:
                    for child in proc.children(recursive=True):
                        self.seen.setdefault(child.pid, child)
                except psutil.Error:
                    pass

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
            self._adopt_descendants()
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
        # Running tasks end with their server unless a test asks for the hand-over (test_handover.py).
        full_env["MPC_HANDOVER_WINDOW"] = "0"
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


Polled = TypeVar("Polled")


def poll_until(fetch: Callable[[], Polled], done: Callable[[Polled], bool], timeout: float,
               interval: float = 0.05) -> Polled:
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


# -- gunicorn trees: workers, fork servers, task processes -----------------------------------------
#
# Under gunicorn the tree is master -> worker -> fork server -> task process; under a single
# server process (the dev server) it is server -> fork server -> task process.

#: A small app module for the multi-process tests (guarded ``app.run()``), configured through the
#: ``APP_CONFIG`` environment variable (JSON: max_num_process, max_num_queue, lease, restartable).
#: Its tasks append ``n`` to the file ``append`` (one O_APPEND write), wait until the file ``gate``
#: exists (checking for stop requests), sleep ``sleep`` seconds and return
#: ``{"n", "pid", "host"}``; every response names the serving process in ``X-Worker-Pid``.
JOB_APP = r'''
import json
import os
import time

from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask

CONFIG = json.loads(os.environ.get("APP_CONFIG") or "{}")


class Job(MetaMPTask):
    restartable = bool(CONFIG.get("restartable", False))

    def execute(self, n: int, gate: str = "", sleep: float = 0.0, append: str = "") -> dict:
        if append:
            fd = os.open(append, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{n}\n".encode())
            finally:
                os.close(fd)
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.02)
        if sleep:
            time.sleep(sleep)
        return {"n": n, "pid": os.getpid(), "host": os.environ.get("MPC_HOST_ID")}


class JobController(MetaMPController, controller_name="jobs"):
    pass


controller = JobController(Job, max_num_process=CONFIG.get("max_num_process", 2),
                           max_num_queue=CONFIG.get("max_num_queue", -1),
                           stop_grace=CONFIG.get("stop_grace", 0.5), lease=CONFIG.get("lease", 3))
app = Flask(__name__)
Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))


@app.after_request
def name_the_worker(response):
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response


@app.before_request
def hold_the_worker():
    # X-Hold-Worker: S keeps the worker on this request S seconds (at most 1) before it is handled,
    # so that concurrent requests are spread over the workers instead of drained by the first awake.
    from flask import request

    hold = request.headers.get("X-Hold-Worker")
    if hold:
        time.sleep(min(1.0, float(hold)))


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]))
'''


def write_job_app(directory: Path, name: str = "app") -> Path:
    """Write :data:`JOB_APP` as ``<directory>/<name>.py``; return its path."""
    path = Path(directory) / f"{name}.py"
    path.write_text(JOB_APP)
    return path


def process_table() -> dict[int, int]:
    """``pid -> ppid`` of every process (zombies included), read from /proc in one pass."""
    table: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                data = stat.read()
        except OSError:
            continue
        fields = data.rpartition(b")")[2].split()
        try:
            table[int(name)] = int(fields[1])
        except (IndexError, ValueError):
            continue
    return table


def descendants_at_depth(table: dict[int, int], root: int, depth: int) -> list[int]:
    """The pids exactly ``depth`` generations below ``root`` in a :func:`process_table`."""
    children: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    level = [root] if root in table else []
    for _ in range(depth):
        level = [child for pid in level for child in children.get(pid, [])]
    return level


def gunicorn_workers(server: Server) -> list[psutil.Process]:
    """The live (not zombie) workers of a gunicorn master."""
    try:
        return [p for p in server.root.children() if not _gone(p)]
    except psutil.Error:
        return []


def fork_servers(server: Server, depth: int = 2) -> list[int]:
    """Pids of the fork servers of a server's tree (``depth`` 2 under gunicorn, 1 for one process)."""
    return descendants_at_depth(process_table(), server.root.pid, depth)


def task_processes(server: Server, depth: int = 3) -> list[int]:
    """Pids of a server's task processes (``depth`` 3 under gunicorn, 2 for one process)."""
    return descendants_at_depth(process_table(), server.root.pid, depth)


def worker_of(server: Server, task_pid: int) -> psutil.Process:
    """The gunicorn worker whose fork server is the parent of task process ``task_pid``."""
    fork_server = psutil.Process(task_pid).parent()
    assert fork_server is not None, f"task process {task_pid} has no parent"
    worker = fork_server.parent()
    assert worker is not None and worker.ppid() == server.root.pid, \
        f"task process {task_pid} is not master -> worker -> fork server -> task in {server.args}"
    return worker


class TaskProcessSampler(threading.Thread):
    """Counts the task processes of some servers together every few ms; keeps the maximum seen.

    Zombies count: a task process holds its slot until its fork server has reaped it.
    """

    def __init__(self, servers: Sequence[Server], depth: int = 3, interval: float = 0.005) -> None:
        super().__init__(name="task-process-sampler", daemon=True)
        self.roots = [s.root.pid for s in servers]
        self.depth = depth
        self.interval = interval
        self.most = 0
        self.samples = 0
        self.error: Optional[BaseException] = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                table = process_table()
                count = sum(len(descendants_at_depth(table, root, self.depth)) for root in self.roots)
                self.most = max(self.most, count)
                self.samples += 1
                self._halt.wait(self.interval)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def __enter__(self) -> "TaskProcessSampler":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def all_threads_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (or gone).

    ``kill(SIGSTOP)`` returns before the stop has taken effect: the kernel hands the signal to
    one thread, which stops the others once it runs. Until then the other threads run on, and a
    serving process "frozen" so may still read a task's ``queued`` event and claim it.
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as stat:
                state = stat.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
        if state not in (b"T", b"t", b"Z", b"X"):
            return False
    return True


@contextmanager
def suspended(procs: Iterable[psutil.Process]) -> Iterator[None]:
    """SIGSTOP ``procs`` for the duration of the block (so that other processes must answer), then SIGCONT.

    The block starts once every thread of every process has stopped, not merely been signalled.
    """
    stopped: list[psutil.Process] = []
    try:
        for proc in procs:
            proc.suspend()
            stopped.append(proc)
        poll_until(lambda: [p.pid for p in stopped if not all_threads_stopped(p.pid)], lambda left: not left,
                   10, interval=0.001)
        yield
    finally:
        for proc in stopped:
            try:
                proc.resume()
            except psutil.Error:
                pass


def process_gone(proc: psutil.Process) -> bool:
    """True when ``proc`` (a psutil handle, so a recycled pid does not count) has ended."""
    return _gone(proc)


#: Task statuses a task never leaves.
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "stopped", "timed_out", "lost"})


class JobApi:
    """HTTP calls to the :data:`JOB_APP` controller mounted at ``<base>/tasks``; each call opens a fresh
    connection unless a ``session`` is given."""

    def __init__(self, base: str, timeout: float = 30.0, log: Optional[Callable[[], str]] = None) -> None:
        """:param log: returns the server's log, shown when a wait fails (what the server said then)."""
        self.url = base + "/tasks"
        self.timeout = timeout
        self._log = log

    def _poll(self, fetch: Callable[[], dict], done: Callable[[dict], bool], timeout: float,
              interval: float = 0.05) -> dict:
        try:
            return poll_until(fetch, done, timeout, interval)
        except AssertionError as exc:
            if self._log is None:
                raise
            raise AssertionError(f"{exc}\n--- server log (end) ---\n{self._log()[-12000:]}") from None

    def post(self, session: Optional[requests.Session] = None, hold: Optional[float] = None,
             **args: object) -> requests.Response:
        """POST ``args``; ``hold``: seconds the worker that takes it is kept on it first (``X-Hold-Worker``)."""
        headers = {"X-Hold-Worker": str(hold)} if hold else None
        return (session or requests).post(self.url, json=args, timeout=self.timeout, headers=headers)

    def submit(self, **args: object) -> dict:
        response = self.post(**args)
        assert response.status_code == 202, response.text
        return response.json()

    def get(self, uuid: str, session: Optional[requests.Session] = None) -> dict:
        response = (session or requests).get(f"{self.url}/{uuid}", timeout=self.timeout)
        assert response.status_code == 200, response.text
        return response.json()

    def delete(self, uuid: str) -> requests.Response:
        return requests.delete(f"{self.url}/{uuid}", timeout=self.timeout)

    def listing(self, **params: object) -> dict:
        response = requests.get(self.url, params=params, timeout=self.timeout)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_running(self, uuid: str, timeout: float = 20.0) -> dict:
        """Wait until the task runs in a task process whose pid is known."""
        return self._poll(lambda: self.get(uuid), lambda t: t["status"] == "running" and t["pid"], timeout)

    def wait_ended(self, uuid: str, timeout: float = 30.0) -> dict:
        return self._poll(lambda: self.get(uuid), lambda t: t["status"] in TERMINAL_STATUSES, timeout)

    def wait_idle(self, timeout: float) -> dict:
        """Wait until no task of the controller is queued or running (every task posted so far ended)."""
        return self._poll(self.listing, lambda v: v["running"] == 0 and v["queued"] == 0, timeout, interval=0.2)
