"""How many write transactions a task costs the store: counted by a wrapper around each backend.

Each write method of a store is one transaction (its event rides in it). A task queued alone in
a fresh process costs four: enqueue, claim, start (the pid) and finish; a bulk of n tasks shares
one enqueue. In a reused process the claim records the pid too (claim_started): three. Progress
uploaded by a short task rides with its finish.
"""
from __future__ import annotations

import collections
from typing import Any

import pytest

from flask_multiprocess_controller import MemoryStore, MetaMPTask, SQLiteStore, TaskStore

#: The write methods of the store contract (each one transaction).
WRITES = ("enqueue", "claim", "claim_started", "start", "progress", "_finish", "requeue", "request_stop", "_retry",
          "purge",
          "stop_all", "reprioritise", "_transition", "fire")


class Quick(MetaMPTask):
    def execute(self, i: int = 0) -> int:
        self.upload_status(i)
        return i


def counting(store_cls: type) -> Any:
    """A subclass of ``store_cls`` counting its write calls (claims only when they claimed a task)."""
    counts: collections.Counter = collections.Counter()

    def wrap(name: str) -> Any:
        original = getattr(store_cls, name)

        def counted(self: TaskStore, *args: Any, **kwargs: Any) -> Any:
            answer = original(self, *args, **kwargs)
            if not name.startswith("claim") or answer is not None:
                counts[name] += 1
            return answer

        return counted

    cls = type(f"Counting{store_cls.__name__}", (store_cls,), {name: wrap(name) for name in WRITES})
    cls.counts = counts  # type: ignore[attr-defined]
    return cls


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_task_costs_four_writes_and_a_bulk_shares_its_enqueue(backend, make_controller, tmp_path):
    store_cls = counting(MemoryStore if backend == "memory" else SQLiteStore)
    store = store_cls() if backend == "memory" else store_cls(str(tmp_path / "w.sqlite3"))
    controller = make_controller(Quick, max_num_process=2, store=store)
    controller.wait(controller.submit(i=0), 20)
    store_cls.counts.clear()
    uuids = [controller.submit(i=i) for i in range(5)]
    for uuid in uuids:
        assert controller.wait(uuid, 20)["status"] == "succeeded"
    single = dict(store_cls.counts)
    store_cls.counts.clear()
    batch = controller.submit_many([{"i": i} for i in range(5)])
    assert controller.wait_batch(batch.id, 20)["ended"] == 5
    bulk = dict(store_cls.counts)
    assert {k: single.get(k, 0) for k in ("enqueue", "claim", "start", "_finish")} == {
        "enqueue": 5, "claim": 5, "start": 5, "_finish": 5}, single
    assert {k: bulk.get(k, 0) for k in ("enqueue", "claim", "start", "_finish")} == {
        "enqueue": 1, "claim": 5, "start": 5, "_finish": 5}, bulk
    counted = ("enqueue", "claim", "start", "_finish", "progress")
    others = {k: v for k, v in {**single, **bulk}.items() if k not in counted}
    assert others == {}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_task_in_a_reused_process_costs_three(backend, make_controller, tmp_path):
    store_cls = counting(MemoryStore if backend == "memory" else SQLiteStore)
    store = store_cls() if backend == "memory" else store_cls(str(tmp_path / "w.sqlite3"))
    controller = make_controller(Quick, max_num_process=1, max_tasks_per_child=0, store=store)
    first = controller.wait(controller.submit(i=0), 20)  # the slot's process starts with this one
    store_cls.counts.clear()
    uuids = [controller.submit(i=i) for i in range(5)]
    tasks = [controller.wait(uuid, 20) for uuid in uuids]
    assert {t["status"] for t in tasks} == {"succeeded"} and {t["pid"] for t in tasks} == {first["pid"]}
    counts = {k: v for k, v in store_cls.counts.items() if k != "progress"}
    assert counts == {"enqueue": 5, "claim_started": 5, "_finish": 5}, counts
