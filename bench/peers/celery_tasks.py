"""The Celery application and the benchmark tasks, imported by the worker and by the client.

The worker finds the broker through the ``BENCH_CELERY_URL`` environment variable (set by
:class:`~bench.peers.celery_peer.CeleryPeer` when it spawns the worker); the client sets the same
URL with :func:`configure` before its first call. The one Redis server serves as broker and as
result backend.

Every setting is Celery's default except ``task_track_started``: without it a running task stays
PENDING until it ends, so nobody could tell it is running (Celery documents this setting for
exactly that purpose).
"""
from __future__ import annotations

import os
import time

from celery import Celery

from .base import CHECKPOINT_EVERY, busy_step

#: Environment variable holding the Redis URL (broker and result backend).
URL_ENV = "BENCH_CELERY_URL"

app = Celery("bench")
app.conf.task_track_started = True


def configure(url: str) -> Celery:
    """Point the application at the Redis server at ``url`` (broker and result backend)."""
    app.conf.update(broker_url=url, result_backend=url)
    return app


if os.environ.get(URL_ENV):
    configure(os.environ[URL_ENV])


@app.task
def add(x: int, y: int) -> int:
    """The trivial task."""
    return x + y


@app.task
def stamp() -> float:
    """Return the wall-clock time at the task's first line (dispatch latency)."""
    return time.time()


@app.task
def checkpointing() -> None:
    """Loop forever, sleeping :data:`CHECKPOINT_EVERY` per step.

    Celery has no cooperative stop request a task could check for, so this task is the same as
    :func:`ignoring` with a shorter sleep: it only ends when ``revoke(terminate=True)`` signals
    the pool process running it.
    """
    while True:
        time.sleep(CHECKPOINT_EVERY)


@app.task
def ignoring() -> None:
    """Loop forever, sleeping 10 ms per step, never checking for a stop request."""
    while True:
        time.sleep(0.01)


@app.task(bind=True)
def progress(self, iterations: int, report: bool) -> float:
    """``iterations`` steps of :func:`busy_step`, each followed by ``update_state`` (Celery's
    documented way of reporting progress) when ``report``; return the loop's duration in s."""
    began = time.perf_counter()
    for i in range(iterations):
        busy_step()
        if report:
            self.update_state(state="PROGRESS", meta={"i": i})
    return time.perf_counter() - began
