"""How many write transactions a task costs the store: counted by a wrapper around each backend.

Each write method of a store is one transaction (its event rides in it). A task queued alone in
a fresh process costs at most four: enqueue, claim, start (the pid) and finish; a bulk of n tasks
shares one enqueue, and a slot whose task ended claims its next task in the same write as that end
(finish_and_claim). In a reused process the claim records the pid too (claim_started), and a task
that ends claims the next one for the same process in the same write (finish_and_claim_started):
three writes for a task queued alone, two in a burst. Progress uploaded by a short task rides with
its finish.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any

import pytest
from test_store_contract import make_row

from flask_multiprocess_controller import MemoryStore, MetaMPTask, SQLiteStore, TaskStore

#: The write methods of the store contract (each one transaction).
WRITES = ("enqueue", "claim", "claim_started", "start", "progress", "_finish", "finish_and_claim",
          "finish_and_claim_started", "requeue", "request_stop", "_retry", "purge", "stop_all", "reprioritise",
          "_transition", "fire")


class Quick(MetaMPTask):
    def execute(self, i: int = 0) -> int:
        self.upload_status(i)
        return i


def counting(store_cls: type) -> Any:
    """A subclass of ``store_cls`` counting its write calls (claims only when they claimed a task)."""
    counts: collections.Counter = collections.Counter()
    inflight = [0]  # writes begun and not returned yet (their commit may already be seen by a waiter)
    lock = threading.Lock()

    def wrap(name: str) -> Any:
        original = getattr(store_cls, name)

        def counted(self: TaskStore, *args: Any, **kwargs: Any) -> Any:
            with lock:
                inflight[0] += 1
            try:
                answer = original(self, *args, **kwargs)
            finally:
                with lock:
                    inflight[0] -= 1
            if not name.startswith("claim") or answer is not None:
                counts[name] += 1
            if name.startswith("finish_and_claim") and answer[1] is not None:
                counts["claimed with an end"] += 1
            return answer

        return counted

    cls = type(f"Counting{store_cls.__name__}", (store_cls,), {name: wrap(name) for name in WRITES})
    cls.writes = counts  # type: ignore[attr-defined]
    cls.inflight = inflight  # type: ignore[attr-defined]
    return cls


def settled(store: Any) -> collections.Counter:
    """The store's write counts once no write is under way: a waiter may wake on a write's commit (the change
    feed sees it) before the write returns and is counted."""
    deadline = time.monotonic() + 10
    while store.inflight[0] and time.monotonic() < deadline:
        time.sleep(0.001)
    return store.writes


def counting_store(backend: str, tmp_path: Any) -> Any:
    """A counting store of ``backend`` ("memory" or "sqlite"); its write calls are in ``.writes``."""
    store_cls = counting(MemoryStore if backend == "memory" else SQLiteStore)
    return store_cls() if backend == "memory" else store_cls(str(tmp_path / "w.sqlite3"))


def _summary(counts: dict, n: int) -> dict:
    """Per kind of write, for n tasks: the claims made either way, the ends either way, all writes."""
    claims = counts.get("claim", 0) + counts.get("claimed with an end", 0)
    ends = counts.get("_finish", 0) + counts.get("finish_and_claim", 0)
    writes = sum(v for k, v in counts.items() if k not in ("claimed with an end", "progress"))
    return {"claims": claims, "ends": ends, "starts": counts.get("start", 0), "per_task": writes / n}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_task_costs_at_most_four_writes_and_a_bulk_shares_its_enqueue(backend, make_controller, tmp_path):
    store = counting_store(backend, tmp_path)
    controller = make_controller(Quick, max_num_process=2, store=store)
    controller.wait(controller.submit(i=0), 20)
    settled(store).clear()
    uuids = [controller.submit(i=i) for i in range(5)]
    for uuid in uuids:
        assert controller.wait(uuid, 20)["status"] == "succeeded"
    single = dict(settled(store))
    settled(store).clear()
    batch = controller.submit_many([{"i": i} for i in range(5)])
    assert controller.wait_batch(batch.id, 20)["ended"] == 5
    bulk = dict(settled(store))
    assert single["enqueue"] == 5 and bulk["enqueue"] == 1
    for counts in (single, bulk):
        summary = _summary(counts, 5)
        assert (summary["claims"], summary["ends"], summary["starts"]) == (5, 5, 5), counts
        assert summary["per_task"] <= 4, counts
        others = set(counts) - {"enqueue", "claim", "start", "_finish", "finish_and_claim", "claimed with an end",
                                "progress"}
        assert others == set(), counts
    # Of a bulk, every task but those the free slots claimed at first is claimed with an end.
    assert bulk.get("claimed with an end", 0) + bulk.get("claim", 0) == 5
    assert _summary(bulk, 5)["per_task"] < 3.5, bulk


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_task_in_a_reused_process_costs_three_alone_and_two_in_a_burst(backend, make_controller, tmp_path):
    store = counting_store(backend, tmp_path)
    controller = make_controller(Quick, max_num_process=1, max_tasks_per_child=0, store=store)
    first = controller.wait(controller.submit(i=0), 20)  # the slot's process starts with this one
    settled(store).clear()
    tasks = [controller.wait(controller.submit(i=i), 20) for i in range(5)]
    assert {t["status"] for t in tasks} == {"succeeded"} and {t["pid"] for t in tasks} == {first["pid"]}
    counts = {k: v for k, v in settled(store).items() if k != "progress"}
    # One at a time: each end finds nothing queued, so the next task is claimed when it comes.
    assert counts == {"enqueue": 5, "claim_started": 5, "finish_and_claim_started": 5}, counts
    settled(store).clear()
    batch = controller.submit_many([{"i": i} for i in range(5)])
    tasks = controller.wait_batch(batch.id, 20)["tasks"]
    assert [t["result"] for t in tasks] == [0, 1, 2, 3, 4] and {t["pid"] for t in tasks} == {first["pid"]}
    counts = {k: v for k, v in settled(store).items() if k != "progress"}
    # Queued together: the first is claimed on its own, each next one with the end of the last.
    assert counts == {"enqueue": 1, "claim_started": 1, "finish_and_claim_started": 5, "claimed with an end": 4}, \
        counts


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_one_slot_claims_each_next_task_with_the_end_of_the_last(backend, make_controller, tmp_path):
    store = counting_store(backend, tmp_path)
    controller = make_controller(Quick, max_num_process=1, store=store)
    controller.wait(controller.submit(i=0), 20)
    settled(store).clear()
    batch = controller.submit_many([{"i": i} for i in range(5)])
    view = controller.wait_batch(batch.id, 20)
    assert [t["result"] for t in view["tasks"]] == [0, 1, 2, 3, 4]
    counts = {k: v for k, v in settled(store).items() if k != "progress"}
    assert counts == {"enqueue": 1, "claim": 1, "start": 5, "finish_and_claim": 5, "claimed with an end": 4}, counts


class TracedSQLiteStore(SQLiteStore):
    """A SQLite store that counts the write transactions its connections begin."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.write_transactions = 0
        super().__init__(*args, **kwargs)

    def _open(self) -> Any:
        conn = super()._open()

        def trace(sql: str) -> None:
            if sql.lstrip().upper().startswith("BEGIN IMMEDIATE"):
                self.write_transactions += 1

        conn.set_trace_callback(trace)
        return conn


@pytest.mark.timeout(30)
def test_a_claim_that_cannot_succeed_takes_no_write_lock(tmp_path):
    """Slots of several processes compete for a controller's places: while all are taken, or nothing is
    ready, a claim only reads."""
    store = TracedSQLiteStore(str(tmp_path / "s.sqlite3"))
    try:
        assert store.claim("c", "host:1:1.0", 1) is None  # nothing queued
        assert store.write_transactions == 0
        store.enqueue([make_row("c") for _ in range(3)], -1)
        assert store.claim("c", "host:1:1.0", 1) is not None
        before = store.write_transactions
        assert store.claim("c", "host:2:1.0", 1) is None  # the one place is taken
        assert store.write_transactions == before
        assert store.claim("c", "host:2:1.0", 2) is not None  # a place free: the claim writes
        assert store.write_transactions == before + 1
    finally:
        store.close()
