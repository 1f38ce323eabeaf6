"""Where the time goes: CPU seconds by process role, and this project's store write transactions.

CPU: every figure is the user + system time the kernel accounted to a process, read with psutil at
the start and the end of a run of a workload (clock-tick resolution, 10 ms, summed over all the
processes of a role). A process that exited and was reaped in between is counted through its
parent's ``children_user + children_system``; one alive at both ends through its own times, so the
sum over a role stays right when a reused worker is replaced mid-run.

Store writes: the benchmark's own servers of this project wrap the SQLite store's connections with a
trace callback (:func:`install_write_counter`, set up before the controller exists, so the fork server
and the task processes inherit it). Each write transaction that commits (a ``COMMIT`` after
``BEGIN IMMEDIATE`` or after a write statement, or a write statement in autocommit mode) appends one
byte to a file opened with ``O_APPEND`` (atomic across processes); the count is the file's size.
Read-only transactions are not counted. A Python callback on every statement costs a little, so the
write counts come from one extra run of each workload (:mod:`bench.peer_main`), not the measured ones.
"""
from __future__ import annotations

import os
import types
from typing import Any, Iterable, Optional

#: Environment variable naming the counter file of a benchmark server.
WRITE_LOG_ENV = "BENCH_WRITE_LOG"
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")

# -- CPU ---------------------------------------------------------------------------------------------------


def own(proc: Any) -> float:
    """CPU seconds of ``proc`` itself (0 if it is gone)."""
    import psutil
    try:
        times = proc.cpu_times()
        return times.user + times.system
    except psutil.Error:
        return 0.0


def reaped(proc: Any) -> float:
    """CPU seconds of the children ``proc`` has waited for."""
    import psutil
    try:
        times = proc.cpu_times()
        return times.children_user + times.children_system
    except psutil.Error:
        return 0.0


def children(proc: Any, recursive: bool = False) -> list:
    import psutil
    try:
        return proc.children(recursive=recursive)
    except psutil.Error:
        return []


def processes(pids: Iterable[int]) -> list:
    import psutil
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            continue
    return found


def tree_roles(roots: list) -> dict[str, float]:
    """The default split: the roots serve; everything below them (alive, or reaped) runs tasks."""
    below = [p for root in roots for p in children(root, recursive=True)]
    return {"serving": sum(own(p) for p in roots),
            "tasks": sum(own(p) for p in below) + sum(reaped(p) for p in [*roots, *below])}


def mpc_roles(serving: list, include_serving: bool = True) -> dict[str, float]:
    """This project's split: ``serving`` are the serving processes (a dev server, gunicorn's master
    and workers, or this very process for the Python API); each one's children are its controllers'
    fork servers, and everything below a fork server is a task process."""
    serving_pids = {p.pid for p in serving}
    forkservers = [c for p in serving for c in children(p) if c.pid not in serving_pids]
    tasks = [t for f in forkservers for t in children(f, recursive=True)]
    roles = {"fork server": sum(own(f) for f in forkservers),
             "tasks": sum(own(t) for t in tasks) + sum(reaped(p) for p in [*forkservers, *tasks])}
    if include_serving:
        roles["serving"] = sum(own(p) for p in serving)
    return roles


# -- store writes ------------------------------------------------------------------------------------------


class _CountingSqlite3(types.ModuleType):
    """Stands in for ``sqlite3`` in the store's module: ``connect`` adds the trace callback."""

    def __init__(self, real: types.ModuleType, path: str) -> None:
        super().__init__("sqlite3")
        self._real = real
        self._path = path
        self._fd: Optional[int] = None
        self._pid = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _count(self) -> None:
        if self._pid != os.getpid():  # forked: open a descriptor of this process's own
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        os.write(self._fd, b".")

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        conn = self._real.connect(*args, **kwargs)
        state = {"open": False, "wrote": False}

        def trace(sql: str) -> None:
            head = sql.lstrip()[:16].upper()
            if head.startswith("BEGIN"):
                state["open"] = True
                state["wrote"] = "IMMEDIATE" in head or "EXCLUSIVE" in head
            elif head.startswith(("COMMIT", "END")):
                if state["open"] and state["wrote"]:
                    self._count()
                state["open"] = state["wrote"] = False
            elif head.startswith("ROLLBACK"):
                state["open"] = state["wrote"] = False
            elif head.startswith(_WRITES):
                if state["open"]:
                    state["wrote"] = True
                else:
                    self._count()

        conn.set_trace_callback(trace)
        return conn


def install_write_counter(path: Optional[str] = None) -> Optional[str]:
    """Count this project's SQLite write transactions into ``path`` (default: ``$BENCH_WRITE_LOG``)."""
    path = path or os.environ.get(WRITE_LOG_ENV)
    if not path:
        return None
    from flask_multiprocess_controller.store import sqlite as sqlite_store
    real = sqlite_store.sqlite3
    if isinstance(real, _CountingSqlite3):
        real = real._real
    sqlite_store.sqlite3 = _CountingSqlite3(real, path)  # type: ignore[assignment]
    return path


def writes(path: Any) -> int:
    """Write transactions counted so far in ``path``."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


__all__ = ["WRITE_LOG_ENV", "install_write_counter", "writes", "mpc_roles", "tree_roles", "own", "reaped",
           "processes", "children"]
