"""The RQ job functions of the benchmark.

RQ's default worker imports a job's function inside the work horse it forks for that job (the
RQ docs, "Performance Notes"), so this module is imported once per job and keeps its own imports
to what the jobs need.
"""
from __future__ import annotations

import time

from rq import get_current_job

from .base import CHECKPOINT_EVERY, busy_step


def add(x: int, y: int) -> int:
    """The trivial job."""
    return x + y


def stamp() -> float:
    """Return the wall-clock time at the job's first line (dispatch latency)."""
    return time.time()


def checkpointing() -> None:
    """Loop forever, sleeping :data:`CHECKPOINT_EVERY` per step.

    RQ has no cooperative stop request a job could check for, so this job is the same as
    :func:`ignoring` with a shorter sleep: it only ends when ``send_stop_job_command`` makes the
    worker kill the work horse.
    """
    while True:
        time.sleep(CHECKPOINT_EVERY)


def ignoring() -> None:
    """Loop forever, sleeping 10 ms per step, never checking for a stop request."""
    while True:
        time.sleep(0.01)


def progress(iterations: int, report: bool) -> float:
    """``iterations`` steps of :func:`busy_step`, each followed by writing the step to
    ``job.meta`` and ``job.save_meta()`` (RQ's documented way of reporting progress) when
    ``report``; return the loop's duration in seconds."""
    job = get_current_job()
    began = time.perf_counter()
    for i in range(iterations):
        busy_step()
        if report:
            job.meta["i"] = i
            job.save_meta()
    return time.perf_counter() - began
