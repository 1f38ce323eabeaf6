"""The floors: a ``multiprocessing`` process per task (what a fresh process costs at least), and
``concurrent.futures.ProcessPoolExecutor(2)`` (what a reused worker costs at least).

A fork costs more the larger the process being forked (its page tables are copied, and each page
the child or parent then writes is copied too), so the fork-per-task floor runs twice: from a bare
parent that imported only the standard library, and from a parent of the size of a serving process,
with the imports of ``examples/app.py`` (Flask, flask-restful, psutil, this package) and an app
built. The fresh-process targets are judged against the second, the fair one; the report shows both.

Neither has a queue of its own beyond a thread pool or the executor's, a store, an HTTP layer or a
way to stop a running task: they are the floors, not products.
"""
from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable, Optional

from . import base
from .base import Peer


def add(x: int, y: int) -> int:
    return x + y


def stamp() -> float:
    return time.time()


def _children_cpu() -> dict:
    """The task processes' CPU: this process's children, alive or reaped."""
    import psutil

    from . import accounting
    me = psutil.Process()
    below = accounting.children(me, recursive=True)
    return {"tasks": sum(map(accounting.own, below)) + accounting.reaped(me) + sum(map(accounting.reaped, below))}


def _child(conn: Any, func: Callable, args: tuple) -> None:
    conn.send(func(*args))
    conn.close()


class ForkPerTask(Peer):
    """A new forked ``multiprocessing.Process`` per task, at most two at once; the result comes
    back over a ``Pipe``."""

    key, label = "mp-fork", "multiprocessing, a forked process per task"
    in_process = True

    def start(self) -> None:
        self.context = multiprocessing.get_context("fork")
        self.runners: Optional[ThreadPoolExecutor] = ThreadPoolExecutor(base.CONCURRENCY)

    def close(self) -> None:
        if getattr(self, "runners", None) is not None:
            self.runners.shutdown(wait=True)
            self.runners = None

    def versions(self) -> dict:
        return {"python": sys.version.split()[0]}

    def _run(self, func: Callable, args: tuple) -> Any:
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(target=_child, args=(send, func, args))
        process.start()
        send.close()
        try:
            return receive.recv()
        finally:
            receive.close()
            process.join()

    def cpu_roles(self) -> dict:
        return _children_cpu()

    def submit_add(self, x: int, y: int) -> Future:
        return self.runners.submit(self._run, add, (x, y))

    def submit_stamp(self) -> Future:
        return self.runners.submit(self._run, stamp, ())

    def result(self, handle: Future, timeout: float = base.WAIT_TIMEOUT) -> Any:
        return handle.result(timeout)


class ForkPerTaskFair(ForkPerTask):
    """:class:`ForkPerTask` from a parent the size of a serving process: the imports of
    ``examples/app.py`` and a Flask app with a flask-restful ``Api``, built before any fork."""

    key, label = "mp-fork-fair", "multiprocessing, a forked process per task, from a Flask-sized parent"

    def start(self) -> None:
        import flask
        import flask_restful
        import psutil  # noqa: F401

        import flask_multiprocess_controller  # noqa: F401

        self.app = flask.Flask(__name__)
        flask_restful.Api(self.app)
        super().start()

    def versions(self) -> dict:
        import flask
        return {**super().versions(), "flask": flask.__version__,
                "parent imports": "flask, flask_restful, psutil, flask_multiprocess_controller"}


class PoolExecutor(Peer):
    """``ProcessPoolExecutor(max_workers=2)`` with the fork start method, workers reused."""

    key, label = "pool", "ProcessPoolExecutor(2), reused workers"
    in_process = True

    def start(self) -> None:
        self.pool: Optional[ProcessPoolExecutor] = ProcessPoolExecutor(
            base.CONCURRENCY, mp_context=multiprocessing.get_context("fork"))
        for future in [self.pool.submit(add, 1, 1) for _ in range(base.CONCURRENCY * 2)]:
            future.result(base.WAIT_TIMEOUT)  # both workers up before the first figure

    def close(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def versions(self) -> dict:
        return {"python": sys.version.split()[0]}

    def cpu_roles(self) -> dict:
        return _children_cpu()

    def submit_add(self, x: int, y: int) -> Future:
        return self.pool.submit(add, x, y)

    def submit_stamp(self) -> Future:
        return self.pool.submit(stamp)

    def result(self, handle: Future, timeout: float = base.WAIT_TIMEOUT) -> Any:
        return handle.result(timeout)
