"""Load: many tasks from many threads, none lost, none run twice, the process limit never exceeded."""
from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

from flask_multiprocess_controller import MetaMPTask

TASKS = 500
THREADS = 8
MAX_PROCESSES = 2


class AppendArg(MetaMPTask):
    """Appends its argument to a shared file (one O_APPEND write) and returns it."""

    def execute(self, n: int, path: str) -> dict:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{n}\n".encode())
        finally:
            os.close(fd)
        return {"n": n, "pid": os.getpid()}


class _ChildSampler(threading.Thread):
    """Counts the fork server's children every few milliseconds; keeps the maximum seen."""

    def __init__(self, forkserver_pid: int) -> None:
        super().__init__(name="child-sampler", daemon=True)
        self.fork_server = psutil.Process(forkserver_pid)
        self.most = 0
        self.samples = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                # Zombies count too: a task process exists until the fork server has reaped it.
                self.most = max(self.most, len(self.fork_server.children()))
                self.samples += 1
                self._halt.wait(0.003)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def _submit(client, numbers: range, path: str, uuids: dict, failures: list) -> None:
    try:
        for n in numbers:
            response = client.post("/tasks", json={"n": n, "path": path})
            if response.status_code != 202:
                failures.append((n, response.status_code, response.get_data(as_text=True)))
                continue
            uuids[n] = response.json["uuid"]
    except BaseException as exc:  # reported by the test
        failures.append((None, "exception", repr(exc)))


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("max_tasks_per_child", [1, 0], ids=["fresh-process", "reused-process"])
def test_many_tasks_from_many_threads_none_lost(max_tasks_per_child, make_client, sqlite_url, tmp_path):
    client, controller = make_client(AppendArg, max_num_process=MAX_PROCESSES, store=sqlite_url,
                                     max_tasks_per_child=max_tasks_per_child)
    app = client.application
    path = str(tmp_path / "ran.txt")
    sampler = _ChildSampler(controller.forkserver_pid)
    sampler.start()
    uuids: dict[int, str] = {}
    failures: list = []
    started = time.monotonic()
    try:
        threads = [
            threading.Thread(target=_submit, name=f"submitter-{i}",
                             args=(app.test_client(), range(i, TASKS, THREADS), path, uuids, failures))
            for i in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(t.is_alive() for t in threads), "submitters did not finish within 120 s"
        submitted = time.monotonic()
        assert failures == []
        assert sorted(uuids) == list(range(TASKS))
        assert len(set(uuids.values())) == TASKS

        deadline = time.monotonic() + 180
        results = {}
        for n, uuid in uuids.items():
            results[n] = controller.wait(uuid, timeout=max(0.1, deadline - time.monotonic()))
        finished = time.monotonic()
    finally:
        sampler.stop()

    not_done = {n: t["status"] for n, t in results.items() if t["status"] != "succeeded"}
    assert not_done == {}, not_done
    assert all(results[n]["result"]["n"] == n and results[n]["attempt"] == 1 for n in range(TASKS))
    with open(path) as ran:
        lines = ran.read().split()
    assert len(lines) == TASKS, f"{len(lines)} runs recorded for {TASKS} tasks"
    assert sorted(int(line) for line in lines) == list(range(TASKS))  # each exactly once
    listing = controller.tasks(limit=1000)
    assert (listing["running"], listing["queued"]) == (0, 0)
    assert len(listing["tasks"]) == TASKS and {t["status"] for t in listing["tasks"]} == {"succeeded"}

    assert sampler.error is None, sampler.error
    assert sampler.samples > 10
    assert 1 <= sampler.most <= MAX_PROCESSES, f"{sampler.most} task processes alive at once"
    pids = {t["result"]["pid"] for t in results.values()}
    if max_tasks_per_child == 0:
        assert len(pids) <= MAX_PROCESSES, f"{len(pids)} task processes for reused workers"
    else:
        assert len(pids) > MAX_PROCESSES
    print(f"\n[load, max_tasks_per_child={max_tasks_per_child}] {TASKS} tasks from {THREADS} threads: "
          f"submitted in {submitted - started:.2f} s, all done in {finished - started:.2f} s, "
          f"{TASKS / (finished - started):.0f} tasks/s; at most {sampler.most} task processes "
          f"in {sampler.samples} samples")
