"""Celery: a prefork worker with a concurrency of 2, Redis as broker and result backend.

The worker is started the documented way, ``celery -A bench.peers.celery_tasks worker --pool
prefork --concurrency 2``, against a private Redis server. Settings are Celery's defaults except
``task_track_started`` (see :mod:`bench.peers.celery_tasks`).

How the interface maps onto Celery:

* submit: ``task.delay(...)``, the handle is the :class:`~celery.result.AsyncResult`;
* result: ``AsyncResult.get(timeout=...)`` (the Redis backend waits on pub/sub), which re-raises
  the task's exception if it failed;
* running: the task's state is ``STARTED`` (written by the pool process just before the task
  body runs, thanks to ``task_track_started``);
* stop: ``AsyncResult.revoke(terminate=True)``, which broadcasts the revoke to the worker; the
  worker sends SIGTERM (the default signal) to the pool process running the task and then
  replaces that process. Celery has no cooperative stop request, so the checkpointing task is
  stopped exactly like the ignoring one;
* stopped: the state read back from the backend is ``REVOKED``. The worker stores this state
  right after it sent the signal (``Request.terminate``), not once the process has exited;
* progress: ``self.update_state(state="PROGRESS", meta=...)`` once per step.
"""
from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

from . import base
from .base import Peer, PeerUnavailable

#: Poll interval of :meth:`CeleryPeer.wait_running` and :meth:`CeleryPeer.wait_stopped`.
POLL = 0.001


class CeleryPeer(Peer):
    """Celery prefork worker (``--concurrency 2``) with Redis as broker and result backend."""

    key = "celery"
    label = "Celery (prefork, Redis)"
    supports = frozenset({base.BURST, base.SEQUENTIAL, base.DISPATCH, base.STOP_CHECKPOINT,
                          base.STOP_IGNORING, base.MEMORY, base.PROGRESS})

    def __init__(self, workdir, python: str | None = None) -> None:
        super().__init__(workdir, python)
        self.redis: base.RedisServer | None = None
        self.worker: subprocess.Popen | None = None
        self.tasks = None

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        try:
            from . import celery_tasks
        except ImportError as exc:
            raise PeerUnavailable(f"celery is not installed: {exc}") from exc
        self.redis = base.RedisServer(self.workdir).start()
        self.tasks = celery_tasks
        app = celery_tasks.configure(self.redis.url)
        log = self.workdir / "celery-worker.log"
        self.worker = base.spawn(
            [self.python, "-m", "celery", "-A", "bench.peers.celery_tasks", "worker",
             "--pool", "prefork", "--concurrency", str(base.CONCURRENCY)],
            log, env={celery_tasks.URL_ENV: self.redis.url})
        self._wait_ready(app, log)
        # Warm both pool processes so the first measured task pays no first-call costs.
        for n in range(4 * base.CONCURRENCY):
            self.result(self.submit_add(n, 1), timeout=base.WAIT_TIMEOUT)

    def _wait_ready(self, app, log) -> None:
        """Wait until the worker answers a ``ping`` broadcast."""
        deadline = time.monotonic() + base.WAIT_TIMEOUT
        while time.monotonic() < deadline:
            if self.worker.poll() is not None:
                raise RuntimeError(f"celery worker exited with {self.worker.returncode}\n"
                                   f"{log.read_text()[-3000:]}")
            if app.control.ping(timeout=0.5):
                return
        raise RuntimeError(f"celery worker did not answer a ping within {base.WAIT_TIMEOUT:.0f} s\n"
                           f"{log.read_text()[-3000:]}")

    def close(self) -> None:
        # Warm shutdown (SIGTERM) waits for running tasks; stop_tree kills whatever is left.
        base.stop_tree(self.worker, signal.SIGTERM, timeout=10.0)
        self.worker = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def versions(self) -> dict:
        import celery
        import kombu
        import redis

        info = redis.Redis.from_url(self.redis.url).info("server") if self.redis else {}
        return {"celery": celery.__version__, "kombu": kombu.__version__, "redis-py": redis.__version__,
                "redis-server": info.get("redis_version", "?")}

    # -- tasks -----------------------------------------------------------------------------
    def submit_add(self, x: int, y: int) -> Any:
        return self.tasks.add.delay(x, y)

    def result(self, handle: Any, timeout: float = base.WAIT_TIMEOUT) -> Any:
        return handle.get(timeout=timeout)

    def submit_stamp(self) -> Any:
        return self.tasks.stamp.delay()

    def submit_checkpointing(self) -> Any:
        return self.tasks.checkpointing.delay()

    def submit_ignoring(self) -> Any:
        return self.tasks.ignoring.delay()

    def submit_progress(self, iterations: int, report: bool) -> Any:
        return self.tasks.progress.delay(iterations, report)

    # -- stop ------------------------------------------------------------------------------
    def _wait_state(self, handle: Any, states: set, timeout: float) -> str:
        return base.poll_until(lambda: handle.state, lambda state: state in states, timeout,
                               f"task {handle.id} in {sorted(states)}", POLL)

    def wait_running(self, handle: Any, timeout: float = base.WAIT_TIMEOUT) -> None:
        state = self._wait_state(handle, {"STARTED", "SUCCESS", "FAILURE", "REVOKED"}, timeout)
        if state != "STARTED":
            raise RuntimeError(f"task {handle.id} ended ({state}) before it was seen running")

    def stop(self, handle: Any) -> None:
        handle.revoke(terminate=True)

    def wait_stopped(self, handle: Any, timeout: float = base.WAIT_TIMEOUT) -> None:
        self._wait_state(handle, {"REVOKED", "FAILURE"}, timeout)

    # -- memory ----------------------------------------------------------------------------
    def server_pids(self) -> list[int]:
        return [self.worker.pid] if self.worker is not None else []

    def cpu_roles(self) -> dict:
        """The worker's main process serves, its pool processes run tasks; Redis besides."""
        from . import accounting
        roles = super().cpu_roles()
        roles["redis"] = sum(map(accounting.own, accounting.processes([self.redis.proc.pid])))
        return roles
