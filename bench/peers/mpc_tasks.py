"""The benchmark task of this project: one ``MetaMPTask`` whose ``op`` picks the workload's task."""
from __future__ import annotations

import os
import time

from flask_multiprocess_controller import MetaMPController, MetaMPTask

from .base import CHECKPOINT_EVERY, busy_step


class BenchTask(MetaMPTask, task_name="bench"):
    """add / stamp / checkpointing / ignoring / progress, as every peer runs them."""

    def execute(self, op: str, x: int = 0, y: int = 0, iterations: int = 0, report: bool = False):
        began = time.time()  # the first line: dispatch latency ends here
        if op == "add":
            return x + y
        if op == "stamp":
            return began
        if op == "checkpointing":
            while True:
                time.sleep(CHECKPOINT_EVERY)
                self.checkpoint()
        if op == "ignoring":
            while True:
                time.sleep(CHECKPOINT_EVERY)
        if op == "progress":
            upload_status = self.upload_status
            started = time.perf_counter()
            if report:
                for i in range(iterations):
                    busy_step()
                    upload_status(i)
            else:
                for _ in range(iterations):
                    busy_step()
            return time.perf_counter() - started
        raise ValueError(f"unknown op {op!r}")


class BenchController(MetaMPController, controller_name="bench"):
    """The benchmark's controller (named, so every serving process shares its tasks)."""


def make_controller(store: str, reused: bool, stop_grace: float = 10.0, **options) -> BenchController:
    """A controller as the benchmark runs it: two processes, fresh or reused, no queue bound."""
    return BenchController(BenchTask, max_num_process=2, max_tasks_per_child=0 if reused else 1,
                           store=store, stop_grace=stop_grace, **options)


def from_environment() -> BenchController:
    """The controller a benchmark server builds from ``BENCH_*`` variables."""
    return make_controller(os.environ["BENCH_STORE"], os.environ.get("BENCH_REUSED") == "1",
                           float(os.environ.get("BENCH_STOP_GRACE", "10")))
