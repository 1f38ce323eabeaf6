"""The body both long tasks of ``bench/long_tasks.py`` share (this project's and Celery's): a schedule of
steps and the progress value each step reports. Standard library only, so that importing it starts nothing."""
from __future__ import annotations

import time
from typing import Iterator


def progress_value(i: int) -> dict:
    """What a long task reports: its step and the wall-clock time it reported it at (the reader's
    clock is the same machine's, so the value's age can be read off when a GET returns it)."""
    return {"i": i, "t": time.time()}


def steps(seconds: float, rate: float) -> Iterator[int]:
    """Yield the step numbers at ``rate`` steps a second for ``seconds``, sleeping to the next step
    (on a schedule, so a late step does not push the later ones back)."""
    period = 1.0 / rate
    began = time.monotonic()
    i = 0
    while True:
        i += 1
        due = began + i * period
        if due > began + seconds:
            return
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        yield i
