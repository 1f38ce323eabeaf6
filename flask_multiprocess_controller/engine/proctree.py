"""A task's process tree: sampling its resources and killing all of it (psutil)."""
from __future__ import annotations

import ctypes
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import psutil

_PR_SET_NAME = 15


@dataclass
class TreeUsage:
    """What a process tree has used so far."""

    #: Highest summed RSS of the tree seen in any sample, in bytes.
    memory_peak: int = 0
    #: RSS of the tree in the last sample, in bytes.
    memory_now: int = 0
    #: CPU seconds (user + system) of the tree in the last sample.
    cpu_time: float = 0.0
    #: Every process of the tree seen so far, so that even re-parented ones can be killed.
    seen: dict[int, psutil.Process] = field(default_factory=dict)
    #: CPU seconds the tree had used before the task began (a reused process's earlier tasks): not counted.
    cpu_base: float = 0.0

    def figures(self) -> dict[str, Any]:
        """``memory_peak`` and ``cpu_time`` as a task's row holds them: empty before the first sample."""
        if not self.memory_peak:
            return {}
        return {"memory_peak": self.memory_peak, "cpu_time": round(self.cpu_time, 3)}


def _children_files() -> bool:
    """Whether this kernel lists each thread's children in ``/proc/PID/task/TID/children`` (Linux 3.5+)."""
    return os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


#: Checked once at import: a tree is then read from its own processes' files instead of the whole process table.
_CHILDREN_FILES = _children_files()


def _child_pids(pid: int) -> list[int]:
    """The pids of the children of process ``pid`` (of each of its threads); empty when it is gone."""
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:
        try:  # a bare descriptor: a file object per read cost more than the read
            fd = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # the thread ended meanwhile
            continue
        try:
            data = os.read(fd, 65536)
            while len(data) % 65536 == 0 and data:  # a listing that long is read whole
                more = os.read(fd, 65536)
                if not more:
                    break
                data += more
            found += [int(child) for child in data.split()]
        except (OSError, ValueError):
            continue
        finally:
            os.close(fd)
    return found


def tree_processes(root: psutil.Process, known: Optional[dict[int, psutil.Process]] = None) -> list[psutil.Process]:
    """``root`` and its live descendants.

    On Linux the tree is walked through the ``children`` files of its own processes: a few small reads,
    where psutil's ``children(recursive=True)`` reads the ``stat`` file of every process of the machine
    (which, done for every running task twice a second, was most of what a busy serving process spent).
    Processes already in ``known`` are reused as they are (no new create-time read). Elsewhere, psutil's.

    :raises psutil.Error: ``root`` cannot be read (psutil's way only).
    """
    if not _CHILDREN_FILES:
        return [root, *root.children(recursive=True)]
    known = known or {}
    procs = [root]
    pending = _child_pids(root.pid)
    visited = {root.pid}
    while pending:
        pid = pending.pop()
        if pid in visited:
            continue
        visited.add(pid)
        proc = known.get(pid)
        if proc is None:
            try:
                proc = psutil.Process(pid)
            except psutil.Error:  # ended meanwhile: its children (if any) were re-parented out of the tree
                continue
        procs.append(proc)
        pending += _child_pids(pid)
    return procs


def sample(root: psutil.Process, usage: TreeUsage) -> None:
    """Add one sample of the tree rooted at the task process ``root`` to ``usage``."""
    try:
        procs = tree_processes(root, usage.seen)
    except psutil.Error:
        return
    rss = 0
    cpu = 0.0
    for proc in procs:
        try:
            with proc.oneshot():
                rss += proc.memory_info().rss
                times = proc.cpu_times()
                cpu += times.user + times.system
        except psutil.Error:
            continue
        usage.seen.setdefault(proc.pid, proc)
    usage.memory_now = rss
    usage.memory_peak = max(usage.memory_peak, rss)
    usage.cpu_time = max(usage.cpu_time, cpu - usage.cpu_base)


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU seconds (user + system) ``proc`` itself used so far; 0 when it cannot be read."""
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def signal_processes(procs: Iterable[psutil.Process], signum: int) -> None:
    """Send ``signum`` to each of ``procs`` that still runs.

    psutil checks each process's create time, so a pid the kernel recycled for
    another process is never hit; "already dead" counts as success.
    """
    for proc in procs:
        try:
            if proc.is_running():
                proc.send_signal(signum)
        except psutil.Error:
            pass


#: The name of a reused task process between tasks.
IDLE_NAME = "mpc-idle"


def process_name(pid: int) -> Optional[str]:
    """The name of process ``pid`` as the kernel keeps it (``/proc/PID/comm``), None when it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().rstrip("\n")
    except OSError:
        return None


def task_process_name(uuid: str) -> str:
    """The name a task process takes while it runs task ``uuid`` (14 bytes: the kernel keeps 15)."""
    return "mpc-" + uuid.replace("-", "")[:10]


def _load_prctl() -> Optional[Any]:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


#: ``prctl`` of the C library, looked up once at import: in the serving process, before the fork
#: server is forked, so that a task process finds it ready instead of loading it (and copying the
#: pages it touches) at each start.
_PRCTL = _load_prctl()


def set_process_name(name: str) -> None:
    """Set this process's name as ``ps`` and ``/proc/PID/comm`` show it (Linux ``PR_SET_NAME``)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


#: What a serving process's name begins with (a web server's process), and a worker's (``flask mpc worker``).
SERVE_PREFIX = "mpc-serve:"
WORKER_PREFIX = "mpc-worker:"

# The name this process gave itself as a serving process, if it did (guarded by the GIL: one assignment).
_serving_name: Optional[str] = None


def name_serving_process(app_name: Optional[str], worker: bool = False) -> None:
    """Name this process after its role and app, as ``ps -o comm``, ``top`` and ``pgrep`` show it:
    ``mpc-serve:<app>`` for a process that serves HTTP and runs tasks, ``mpc-worker:<app>`` for a worker
    (15 bytes at most, the kernel's limit: a long app name is cut). Its command line is left as it is.

    The whole process is named, whichever thread asks (``/proc/self/comm`` names the main thread, whose
    name ``ps`` shows), and a worker's name is kept when a controller starts in it later.
    """
    global _serving_name
    if not worker and _serving_name is not None and _serving_name.startswith(WORKER_PREFIX):
        return
    name = ((WORKER_PREFIX if worker else SERVE_PREFIX) + (app_name or "")).encode()[:15].decode(errors="ignore")
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name)
    except OSError:
        if threading.current_thread() is not threading.main_thread():
            return  # PR_SET_NAME would name this thread only
        set_process_name(name)
    _serving_name = name


def proven_task_process(pid: Optional[int], create_time: Optional[float], uuid: str) -> Optional[psutil.Process]:
    """The process ``pid`` if it proves to be the running task ``uuid``'s own process, else None.

    A stored row's word is not enough to kill a process: the process itself must
    carry the task's name (which it takes only once its task was claimed), the
    create time must match, and it must lead its own process group.
    """
    if not pid or create_time is None:
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.01 or proc.name() != task_process_name(uuid):
            return None
        if os.getpgid(pid) != pid:
            return None
        return proc
    except (psutil.Error, OSError):
        return None


def kill_process_tree(proc: psutil.Process) -> None:
    """SIGKILL ``proc`` and its live descendants (psutil-checked, so no recycled pid is hit)."""
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        family = [proc]
    signal_processes(family, signal.SIGKILL)


def process_alive(pid: Optional[int], create_time: Optional[float]) -> bool:
    """True when ``pid`` runs and, if given, was created at ``create_time`` (not a recycled pid)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe_exit(code: Optional[int]) -> str:
    """Say in words how a process ended, from its exit code (negative = killed by a signal)."""
    if code is None:
        return "ended in an unknown way (its exit status was lost)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"
