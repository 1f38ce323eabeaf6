"""RQ: two ``rq worker`` processes of RQ's default ``Worker`` class on a private Redis server.

RQ runs one job at a time per worker, and its docs say "If you want to perform jobs concurrently,
simply start more workers"; the docs' supervisor recipe runs one ``rq worker`` per process and
scales with ``numprocs``. So the concurrency of 2 is two ``rq worker`` processes, not
``rq worker-pool -n 2`` (a convenience that starts the same workers under one extra supervising
process). The default ``Worker`` forks a work horse per job, and the work horse imports the job's
module after the fork (RQ's docs, "Performance Notes"), so every job pays that import. Every
setting is RQ's default, including its per-job INFO logging (to a file in the work directory).

How the interface maps onto RQ:

* submit: ``queue.enqueue(func, ...)``, the handle is the :class:`~rq.job.Job`;
* result: ``job.latest_result(timeout=...)``, RQ's blocking result call (a blocking ``XREAD`` on the
  job's result stream); a result of any type other than ``SUCCESSFUL`` raises. The client's Redis
  connection has no socket timeout (redis-py 8 defaults to 5 s, shorter than the block);
* running: the job's status is ``started`` (set by the worker right before it forks the work
  horse), polled every millisecond;
* stop: ``send_stop_job_command(redis, job_id)``: the worker that runs the job gets the command on
  its pub/sub channel and SIGKILLs the work horse. RQ has no cooperative stop request, so the
  checkpointing job is stopped exactly like the ignoring one;
* stopped: the worker then writes the job's status ``stopped`` and a ``FAILED`` result in one
  transaction; :meth:`RQPeer.wait_stopped` blocks on that result, then checks the status;
* progress: ``job.meta[...] = i; job.save_meta()`` once per step.
"""
from __future__ import annotations

import math
import subprocess
import time
from typing import Any

from . import base
from .base import Peer, PeerUnavailable

#: Poll interval of :meth:`RQPeer.wait_running`.
POLL = 0.001
#: Job statuses that mean the job ended without a value after a stop request.
STOPPED_STATUSES = {"stopped", "failed", "canceled"}


class RQPeer(Peer):
    """Two ``rq worker`` processes (fork per job) with Redis."""

    key = "rq"
    label = "RQ (2 workers, fork per job)"
    supports = frozenset({base.BURST, base.SEQUENTIAL, base.DISPATCH, base.STOP_CHECKPOINT,
                          base.STOP_IGNORING, base.MEMORY, base.PROGRESS})

    def __init__(self, workdir, python: str | None = None) -> None:
        super().__init__(workdir, python)
        self.redis_server: base.RedisServer | None = None
        self.workers: list[subprocess.Popen] = []
        self.connection = None
        self.queue = None
        self.tasks = None

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        try:
            import redis
            import rq

            from . import rq_tasks
        except ImportError as exc:
            raise PeerUnavailable(f"rq is not installed: {exc}") from exc
        self.redis_server = base.RedisServer(self.workdir).start()
        # redis-py 8 gives every connection a 5 s socket timeout, which would cut RQ's blocking
        # result read (a blocking XREAD) short for any job longer than that. RQ's workers
        # likewise raise their own connection's timeout above their blocking dequeue.
        self.connection = redis.Redis.from_url(self.redis_server.url, socket_timeout=None)
        self.queue = rq.Queue(connection=self.connection)
        self.tasks = rq_tasks
        for n in range(base.CONCURRENCY):
            self.workers.append(base.spawn(
                [self.python, "-m", "rq.cli", "worker", "--url", self.redis_server.url],
                self.workdir / f"rq-worker-{n}.log"))
        self._wait_ready()
        for n in range(4 * base.CONCURRENCY):
            self.result(self.submit_add(n, 1))

    def _wait_ready(self) -> None:
        """Wait until both workers registered themselves in Redis."""
        from rq import Worker

        deadline = time.monotonic() + base.WAIT_TIMEOUT
        while Worker.count(connection=self.connection) < len(self.workers):
            for n, proc in enumerate(self.workers):
                if proc.poll() is not None:
                    log = (self.workdir / f"rq-worker-{n}.log").read_text()[-3000:]
                    raise RuntimeError(f"rq worker exited with {proc.returncode}\n{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"rq workers did not register within {base.WAIT_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def close(self) -> None:
        # SIGTERM is RQ's warm shutdown (the current job finishes); stop_tree kills what is left.
        for proc in self.workers:
            base.stop_tree(proc, timeout=10.0)
        self.workers = []
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None

    def versions(self) -> dict:
        import redis
        import rq

        info = self.connection.info("server") if self.connection is not None else {}
        return {"rq": rq.__version__, "redis-py": redis.__version__,
                "redis-server": info.get("redis_version", "?")}

    # -- jobs ------------------------------------------------------------------------------
    def submit_add(self, x: int, y: int) -> Any:
        return self.queue.enqueue(self.tasks.add, x, y)

    def result(self, handle: Any, timeout: float = base.WAIT_TIMEOUT) -> Any:
        outcome = handle.latest_result(timeout=max(1, math.ceil(timeout)))
        if outcome is None:
            raise TimeoutError(f"job {handle.id} has no result after {timeout:.0f} s")
        if outcome.type != outcome.Type.SUCCESSFUL:
            raise RuntimeError(f"job {handle.id} ended {outcome.type.name}: {outcome.exc_string}")
        return outcome.return_value

    def submit_stamp(self) -> Any:
        return self.queue.enqueue(self.tasks.stamp)

    def submit_checkpointing(self) -> Any:
        return self.queue.enqueue(self.tasks.checkpointing)

    def submit_ignoring(self) -> Any:
        return self.queue.enqueue(self.tasks.ignoring)

    def submit_progress(self, iterations: int, report: bool) -> Any:
        return self.queue.enqueue(self.tasks.progress, iterations, report)

    # -- stop ------------------------------------------------------------------------------
    def wait_running(self, handle: Any, timeout: float = base.WAIT_TIMEOUT) -> None:
        def started(status: str) -> bool:
            if status in {"finished", *STOPPED_STATUSES}:
                raise RuntimeError(f"job {handle.id} ended ({status}) before it was seen running")
            return status == "started"

        base.poll_until(lambda: handle.get_status(refresh=True), started, timeout, f"job {handle.id} started", POLL)

    def stop(self, handle: Any) -> None:
        from rq.command import send_stop_job_command

        send_stop_job_command(self.connection, handle.id)

    def wait_stopped(self, handle: Any, timeout: float = base.WAIT_TIMEOUT) -> None:
        # The worker writes the result and the status in one transaction: once the (failed)
        # result is there, the status is final.
        if handle.latest_result(timeout=max(1, math.ceil(timeout))) is not None:
            status = handle.get_status(refresh=True)
            if status in STOPPED_STATUSES:
                return
            raise RuntimeError(f"job {handle.id} ended {status} after a stop request")
        raise TimeoutError(f"job {handle.id} not stopped after {timeout:.0f} s "
                           f"(status {handle.get_status(refresh=True)})")

    # -- memory ----------------------------------------------------------------------------
    def server_pids(self) -> list[int]:
        return [proc.pid for proc in self.workers]

    def cpu_roles(self) -> dict:
        """Each worker serves (it dequeues), the work horse it forks per job runs the task; Redis besides."""
        from . import accounting
        roles = super().cpu_roles()
        roles["redis"] = sum(map(accounting.own, accounting.processes([self.redis_server.proc.pid])))
        return roles
