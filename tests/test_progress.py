"""Progress reported in a tight loop is coalesced in the task process, yet the last value always
arrives."""
from __future__ import annotations

import time

import pytest

from conftest import wait_until
from flask_multiprocess_controller import MetaMPTask


class Chatty(MetaMPTask):
    """Reports progress many times in a burst, then stays quiet until stopped."""

    def execute(self, calls: int = 50_000, then_wait: bool = True) -> int:
        for i in range(calls):
            self.upload_status({"i": i} if i % 1000 == 0 else i)
        while then_wait:
            time.sleep(0.01)
            self.checkpoint()
        return calls


@pytest.mark.timeout(60)
def test_last_value_of_a_burst_arrives_while_the_task_is_quiet(make_controller):
    controller = make_controller(Chatty, store="memory://")
    uuid = controller.submit(calls=50_000)
    # No further call follows the burst: only the task process's own flushing can publish 49,999.
    task = wait_until(lambda: (lambda t: t if t["progress"] == 49_999 else None)(controller.status(uuid)),
                      timeout=20)
    assert task["status"] == "running"
    controller.stop(uuid)
    assert controller.wait(uuid, timeout=20)["status"] == "stopped"


@pytest.mark.timeout(60)
def test_the_final_progress_is_recorded_with_the_end(make_controller):
    controller = make_controller(Chatty, store="memory://")
    task = controller.wait(controller.submit(calls=20_002, then_wait=False), timeout=30)
    assert task["status"] == "succeeded", task
    assert task["progress"] == 20_001
    assert task["result"] == 20_002


class BadProgress(MetaMPTask):
    def execute(self) -> str:
        for i in range(100):
            self.upload_status(i)
        self.upload_status({"at": object()})
        return "unreachable"


@pytest.mark.timeout(60)
def test_unserialisable_progress_still_fails_at_the_call(make_controller):
    controller = make_controller(BadProgress, store="memory://")
    task = controller.wait(controller.submit(), timeout=30)
    assert task["status"] == "failed", task
    assert task["error"]["type"] == "TypeError"
    assert "JSON-serialisable" in task["error"]["message"]
    assert task["progress"] == 99


@pytest.mark.timeout(30)
def test_a_process_writes_its_tasks_progress_together_latest_value_wins():
    """The progress flusher: many progress calls of several tasks, one store write with the latest of each;
    what a run's end makes it forget is never written after."""
    import logging

    from flask_multiprocess_controller.engine.flusher import ProgressFlusher
    from flask_multiprocess_controller.engine.supervisor import TaskRun
    from flask_multiprocess_controller.store import MemoryStore
    from test_store_contract import add, claim

    store = MemoryStore()
    owner = "owner-1"
    uuids = add(store, 3)
    for _ in uuids:
        claim(store, owner=owner)
    batches: list[list] = []
    write_many = store.progress_many
    store.progress_many = lambda who, writes: batches.append(list(writes)) or write_many(who, writes)  # type: ignore
    events: list = []
    flusher = ProgressFlusher(store, owner, 3600.0, events.append, logging.getLogger("test"))
    runs = [TaskRun(uuid, None, lambda: None) for uuid in uuids]
    flusher.mark(runs[0])  # wakes the flusher thread: it writes at once, and then not for an hour
    wait_until(lambda: batches, timeout=10)
    for n in range(100):
        for run in runs:
            run.progress = n
            flusher.mark(run)
    flusher.forget(runs[2])  # its end is being written: nothing more of it
    flusher.flush()
    flusher.close()
    assert len(batches) == 2
    assert [(w.uuid, w.progress) for w in batches[1]] == [(uuids[0], 99), (uuids[1], 99)]
    assert [store.get(uuid)["progress"] for uuid in uuids[:2]] == [99, 99]
    assert [e["task"]["progress"] for e in events[-2:]] == [99, 99]


class Steady(MetaMPTask):
    """Reports progress every few milliseconds for ``seconds`` seconds, then answers how many calls it made."""

    def execute(self, seconds: float = 1.5) -> int:
        calls = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            calls += 1
            self.upload_status(calls)
            time.sleep(0.005)
        return calls


@pytest.mark.timeout(60)
def test_a_task_process_sends_progress_no_more_often_than_it_is_written(make_controller, monkeypatch):
    """Without a progress buffer, with a flush interval of 2 s (a message a second), a task reporting progress
    for 1.5 s wakes its controlling thread a few times (its first value, one a second, its last), not at every
    call, and its last value still arrives."""
    from flask_multiprocess_controller.engine import supervisor
    from flask_multiprocess_controller.engine.supervisor import Supervisor

    received: list = []
    progressed = Supervisor._progressed
    monkeypatch.setattr(Supervisor, "_progressed", lambda self, run: received.append(run.progress)
                        or progressed(self, run))
    monkeypatch.setattr(supervisor, "buffers_supported", lambda: False)
    monkeypatch.setenv("MPC_PROGRESS_FLUSH", "2.0")
    controller = make_controller(Steady, store="memory://")
    task = controller.wait(controller.submit(seconds=1.5), timeout=30)
    assert task["status"] == "succeeded", task
    assert task["progress"] == task["result"] > 10
    assert 2 <= len(received) <= 4, received
    assert received[-1] == task["result"]


@pytest.mark.timeout(60)
def test_progress_read_from_the_task_process_buffer_wakes_no_controlling_thread(make_controller, monkeypatch):
    """With a progress buffer (the default on Linux), the controlling thread hears of a task's progress by
    message once (its first value; the next would come after MESSAGE_EVERY), yet the store follows the task's
    values while it runs and holds its last one at the end."""
    from flask_multiprocess_controller.engine.progressbuffer import MESSAGE_EVERY, supported
    from flask_multiprocess_controller.engine.supervisor import Supervisor

    assert supported(), "this suite runs on Linux, where task processes have progress buffers"
    received: list = []
    progressed = Supervisor._progressed
    monkeypatch.setattr(Supervisor, "_progressed", lambda self, run: received.append(run.progress)
                        or progressed(self, run))
    seconds = 2.5
    assert seconds < MESSAGE_EVERY
    controller = make_controller(Steady, store="memory://")
    uuid = controller.submit(seconds=seconds)
    seen = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        task = controller.store.get(uuid)
        if task["status"] not in ("running", "queued"):
            break
        if task["status"] == "running" and task["progress"] is not None:
            seen.add(task["progress"])
        time.sleep(0.05)
    task = controller.wait(uuid, timeout=30)
    assert task["status"] == "succeeded", task
    assert task["progress"] == task["result"] > 10
    assert len(seen) >= 3, f"the store showed {sorted(seen)} while the task ran"
    assert len(received) == 1 and received[0] <= min(seen), received