"""One contract suite for every TaskStore implementation (store/base.py), run against each backend.

To add a backend, add one line to ``BACKENDS``: a name and a function of the test's environment
(``env.tmp_path``, ``env.redis_url``) that returns a fresh, empty store.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid as uuid_module
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import pytest
import redis

from flask_multiprocess_controller import (
    MemoryStore, QueueFull, SQLiteStore, TaskAlreadyFinished, TaskNotFound, TaskStore,
)
from flask_multiprocess_controller.events import CALLBACK_KINDS, Changes, Event
from flask_multiprocess_controller.exceptions import StoreError, StoreUnavailable
from flask_multiprocess_controller.store import resolve_store
from flask_multiprocess_controller.store.redis import RedisStore

from conftest import free_port, wait_until


def _redis_store(env: SimpleNamespace) -> TaskStore:
    return RedisStore(env.redis_url, prefix=f"contract-{uuid_module.uuid4().hex}:")  # a fresh key space


BACKENDS: dict[str, Callable[[SimpleNamespace], TaskStore]] = {
    "memory": lambda env: MemoryStore(),
    "sqlite": lambda env: SQLiteStore(str(env.tmp_path / "contract.sqlite3")),
    "redis": _redis_store,
}


#: The backends whose store several processes (and store objects) share.
SHARED_BACKENDS = ["sqlite", "redis"]


@pytest.fixture(params=list(BACKENDS))
def store(request, tmp_path, redis_server):
    env = SimpleNamespace(tmp_path=tmp_path, redis_url=redis_server)
    made = BACKENDS[request.param](env)
    yield made
    made.close()


@pytest.fixture(params=SHARED_BACKENDS)
def shared_store(request, tmp_path, redis_server):
    env = SimpleNamespace(tmp_path=tmp_path, redis_url=redis_server)
    made = BACKENDS[request.param](env)
    yield made
    made.close()


def reopen(store: TaskStore) -> TaskStore:
    """A new store object on the same SQLite file or Redis key space."""
    if isinstance(store, SQLiteStore):
        return SQLiteStore(store.path)
    assert isinstance(store, RedisStore)
    return RedisStore(store.url, prefix=store.prefix)


def location(store: TaskStore) -> tuple[str, str, str]:
    """(kind, location, prefix) of a shared store, for a child process to open the same one."""
    if isinstance(store, SQLiteStore):
        return "sqlite", store.path, ""
    assert isinstance(store, RedisStore)
    return "redis", store.url, store.prefix


#: The keys every stored task has (store/base.py's module docstring).
ROW_KEYS = {
    "uuid", "controller", "status", "priority", "seq", "args", "progress", "percent", "result", "error",
    "created_at", "started_at", "ended_at", "pid", "pid_created", "exit_code", "owner", "stop_requested",
    "timeout", "memory_peak", "cpu_time", "attempt",
}
CTL = "contract"
OTHER = "other-controller"
OWNER = "owner-1"
EVENT_KEYS = {"cursor", "kind", "uuid", "controller", "at", "emitter", "task"}


def make_row(controller: str = CTL, priority: int = 0, args: Any = None, created_at: float | None = None,
             timeout: float | None = None) -> dict:
    """A new task row as MetaMPController.enqueue builds it."""
    return {
        "uuid": str(uuid_module.uuid4()), "controller": controller, "status": "queued", "priority": priority,
        "args": {} if args is None else args, "created_at": time.time() if created_at is None else created_at,
        "timeout": timeout, "attempt": 0, "stop_requested": False,
    }


def add(store: TaskStore, n: int = 1, controller: str = CTL, max_queued: int = -1,
        **kwargs: Any) -> list[str]:
    rows = [make_row(controller, **kwargs) for _ in range(n)]
    store.enqueue(rows, max_queued)
    return [r["uuid"] for r in rows]


def claim(store: TaskStore, controller: str = CTL, max_running: int = 1000, owner: str = OWNER):
    return store.claim(controller, owner, max_running)


def stop(store: TaskStore, uuid: str) -> dict:
    """Request a stop; return the task afterwards."""
    return store.request_stop(uuid)[0]


def status_of(store: TaskStore, uuid: str) -> str:
    return store.get(uuid)["status"]


def fetch(store: TaskStore, uuid: str):
    """``store.get`` with every documented key present (a missing key reads as None).

    Whether a store returns every key is checked once, in test_get_returns_every_documented_key;
    the other tests look at behaviour only.
    """
    row = store.get(uuid)
    return None if row is None else {key: row.get(key) for key in ROW_KEYS | set(row)}


def counts(store: TaskStore, controller: str = CTL) -> dict:
    """``store.counts`` without zero entries (absent and 0 mean the same)."""
    return {status: n for status, n in store.counts(controller).items() if n}


def full(row: dict) -> dict:
    return {key: row.get(key) for key in ROW_KEYS | set(row)}


# -- enqueue ------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_enqueue_assigns_increasing_seq_and_keeps_fields(store):
    rows = [make_row(priority=p, args={"i": i}, timeout=t)
            for i, (p, t) in enumerate([(0, None), (3, 2.5), (-1, None)])]
    store.enqueue(rows, -1)
    later = add(store)
    stored = [fetch(store, r["uuid"]) for r in rows] + [fetch(store, later[0])]
    seqs = [r["seq"] for r in stored]
    assert all(isinstance(s, int) for s in seqs)
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    for original, got in zip(rows, stored):
        assert got["uuid"] == original["uuid"]
        assert got["controller"] == CTL
        assert got["status"] == "queued"
        assert got["priority"] == original["priority"]
        assert got["args"] == original["args"]
        assert got["created_at"] == original["created_at"]
        assert got["timeout"] == original["timeout"]
        assert got["attempt"] == 0
        assert got["stop_requested"] is False


@pytest.mark.timeout(30)
def test_get_returns_every_documented_key(store):
    (uuid,) = add(store)
    for when in ("queued", "running", "finished"):
        row = store.get(uuid)
        assert ROW_KEYS <= set(row), (when, sorted(ROW_KEYS - set(row)))
        for key in ("progress", "percent", "result", "error", "pid", "exit_code"):
            assert row[key] is None, (when, key)
        assert (row["ended_at"] is None) == (when != "finished")  # finish() defaults it to the store's now
        if when == "queued":
            assert row["started_at"] is None and row["owner"] is None
            claimed = claim(store)
            assert ROW_KEYS <= set(claimed), sorted(ROW_KEYS - set(claimed))
        elif when == "running":
            store.finish(uuid, "succeeded")
    for row in store.list_tasks(CTL) + store.active(CTL):
        assert ROW_KEYS <= set(row)
    (other,) = add(store)
    stopped, event = store.request_stop(other)
    assert ROW_KEYS <= set(stopped), sorted(ROW_KEYS - set(stopped))
    assert ROW_KEYS <= set(event["task"]), sorted(ROW_KEYS - set(event["task"]))
    assert store.get(str(uuid_module.uuid4())) is None


@pytest.mark.timeout(30)
def test_enqueue_is_all_or_nothing_when_the_queue_is_full(store):
    add(store, 2, max_queued=3)
    with pytest.raises(QueueFull) as info:
        add(store, 2, max_queued=3)
    assert info.value.retry_after >= 0
    assert store.counts(CTL).get("queued", 0) == 2
    assert len(store.list_tasks(CTL)) == 2
    add(store, 1, max_queued=3)  # fits exactly
    assert store.counts(CTL)["queued"] == 3
    with pytest.raises(QueueFull):
        add(store, 1, max_queued=3)
    with pytest.raises(QueueFull):
        add(store, 1, max_queued=0)
    assert store.counts(CTL)["queued"] == 3


@pytest.mark.timeout(30)
def test_queue_bound_counts_only_this_controllers_queued_tasks(store):
    add(store, 3, controller=OTHER)
    add(store, 2, max_queued=2)  # the other controller's tasks do not count
    with pytest.raises(QueueFull):
        add(store, 1, max_queued=2)
    claim(store)  # running tasks do not count
    add(store, 1, max_queued=2)
    assert counts(store, CTL) == {"queued": 2, "running": 1}
    add(store, 50, max_queued=-1)  # -1 = unbounded
    assert store.counts(CTL)["queued"] == 52


# -- claim --------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_claim_order_is_priority_then_seq(store):
    by_priority = [5, 1, 3, 1, 0, 5, -2, 3]
    uuids = []
    for p in by_priority:
        uuids += add(store, priority=p)
    add(store, 3, controller=OTHER, priority=-100)
    expected = [u for _, _, u in sorted((p, i, u) for i, (p, u) in enumerate(zip(by_priority, uuids)))]
    claimed = []
    started = {}
    before = store.now()
    while (row := claim(store)) is not None:
        assert row["status"] == "running"
        assert row["owner"] == OWNER
        assert row["attempt"] == 1
        assert row["controller"] == CTL
        claimed.append(row["uuid"])
        started[row["uuid"]] = row["started_at"]
    after = store.now()
    assert claimed == expected
    assert all(before <= started[u] <= after for u in claimed)  # the store's clock, at the claim
    for uuid in claimed:
        got = fetch(store, uuid)
        assert got["status"] == "running" and got["owner"] == OWNER and got["started_at"] == started[uuid]
        assert got["attempt"] == 1
    assert counts(store, OTHER) == {"queued": 3}


@pytest.mark.timeout(30)
def test_claim_respects_max_running_counting_stopping(store):
    add(store, 5)
    first, second = claim(store, max_running=2), claim(store, max_running=2)
    assert first is not None and second is not None
    assert claim(store, max_running=2) is None
    stop(store, first["uuid"])
    assert status_of(store, first["uuid"]) == "stopping"
    assert claim(store, max_running=2) is None  # stopping still holds its slot
    assert store.finish(first["uuid"], "stopped", ended_at=time.time())
    third = claim(store, max_running=2)
    assert third is not None
    assert claim(store, max_running=2) is None
    assert claim(store, max_running=3) is not None
    # Other controllers' running tasks do not count against this one's limit.
    add(store, 1, controller=OTHER)
    assert claim(store, controller=OTHER, max_running=1) is not None
    assert counts(store, CTL) == {"queued": 1, "running": 3, "stopped": 1}


@pytest.mark.timeout(30)
def test_claim_returns_none_when_nothing_is_queued(store):
    assert claim(store) is None
    assert claim(store, controller="never-used") is None
    (uuid,) = add(store)
    assert claim(store, controller=OTHER) is None
    assert claim(store)["uuid"] == uuid
    assert claim(store) is None
    assert counts(store, CTL) == {"running": 1}


# -- start, progress, finish, requeue -------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_start_and_progress_only_touch_active_tasks(store):
    running, stopping, finished, queued = add(store, 4)
    for _ in range(3):
        claim(store)
    stop(store, stopping)
    store.finish(finished, "succeeded", ended_at=time.time(), result=1)
    for uuid in (queued, running, stopping, finished):
        started = store.start(uuid, OWNER, 4242, 1.5)
        progressed = store.progress(uuid, OWNER, {"step": uuid[:4]}, 50.0)
        active = uuid in (running, stopping)
        assert (started is not None, progressed is not None) == (active, active), uuid
    for uuid in (running, stopping):
        row = fetch(store, uuid)
        assert (row["progress"], row["percent"], row["pid"], row["pid_created"]) == \
            ({"step": uuid[:4]}, 50.0, 4242, 1.5)
    for uuid in (queued, finished):
        row = fetch(store, uuid)
        assert (row["progress"], row["percent"], row["pid"]) == (None, None, None)
    assert [status_of(store, u) for u in (queued, running, stopping, finished)] == \
        ["queued", "running", "stopping", "succeeded"]
    unknown = str(uuid_module.uuid4())
    assert store.progress(unknown, OWNER, 1, None) is None  # unknown: no error, no row
    assert store.start(unknown, OWNER, 1, 1.0) is None
    assert store.get(unknown) is None
    assert store.progress(running, OWNER, None, None) is not None  # clearing progress
    assert (fetch(store, running)["progress"], fetch(store, running)["percent"]) == (None, None)


@pytest.mark.timeout(30)
def test_finish_is_compare_and_set(store):
    running, stopping, queued = add(store, 3)
    claim(store)
    claim(store)
    stop(store, stopping)
    assert store.finish(running, "failed", ended_at=100.0, exit_code=1, error={"type": "X", "message": "m",
                                                                              "traceback": None}) is not None
    row = fetch(store, running)
    assert (row["status"], row["ended_at"], row["exit_code"]) == ("failed", 100.0, 1)
    assert store.finish(running, "succeeded", ended_at=200.0, result="late") is None
    row = fetch(store, running)
    assert (row["status"], row["ended_at"], row["result"]) == ("failed", 100.0, None)
    assert store.finish(stopping, "stopped", ended_at=101.0) is not None
    assert status_of(store, stopping) == "stopped"
    assert store.finish(queued, "succeeded", ended_at=102.0) is None
    assert status_of(store, queued) == "queued"
    assert fetch(store, queued)["ended_at"] is None
    assert store.finish(str(uuid_module.uuid4()), "lost", ended_at=1.0) is None


@pytest.mark.timeout(30)
def test_finish_is_compare_and_set_under_concurrency(store):
    """Two finishers race for each task (an owner and a reconciler): exactly one wins each."""
    uuids = add(store, 40)
    while claim(store) is not None:
        pass
    wins: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(2)

    def finisher(status: str) -> None:
        try:
            start.wait(10)
            for uuid in uuids:
                if store.finish(uuid, status, ended_at=time.time()):
                    with lock:
                        wins.append((uuid, status))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=finisher, args=(s,)) for s in ("succeeded", "lost")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert sorted(u for u, _ in wins) == sorted(uuids)
    for uuid, status in wins:
        assert status_of(store, uuid) == status


@pytest.mark.timeout(30)
def test_requeue_keeps_the_old_queue_place(store):
    a, b, c = add(store, 3)
    first = claim(store, max_running=1)
    assert first["uuid"] == a
    store.start(a, OWNER, 999, 1.5)
    assert store.requeue(a) is not None
    row = fetch(store, a)
    assert row["status"] == "queued"
    assert row["owner"] is None and row["pid"] is None and row["started_at"] is None
    assert row["stop_requested"] is False
    assert store.position(row) == 1
    assert store.position(fetch(store, c)) == 3
    again = claim(store, max_running=1, owner="owner-2")
    assert again["uuid"] == a
    assert again["attempt"] == 2
    assert again["owner"] == "owner-2"
    # A stopping task can be requeued too (its stop request is dropped with it).
    stop(store, a)
    assert store.requeue(a) is not None
    assert fetch(store, a)["stop_requested"] is False
    assert [claim(store)["uuid"] for _ in range(3)] == [a, b, c]
    # Only active tasks go back.
    store.finish(a, "succeeded", ended_at=time.time())
    assert store.requeue(a) is None
    assert status_of(store, a) == "succeeded"
    (queued,) = add(store)
    assert store.requeue(queued) is None
    assert store.requeue(str(uuid_module.uuid4())) is None


# -- stop ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_request_stop_of_queued_task_stops_it(store):
    (uuid,) = add(store)
    before = store.now()
    row = full(stop(store, uuid))
    after = store.now()
    assert row["uuid"] == uuid
    assert row["status"] == "stopped"
    assert before <= row["ended_at"] <= after  # the store's clock
    assert row["stop_requested"] is True
    got = fetch(store, uuid)
    assert (got["status"], got["ended_at"], got["started_at"]) == ("stopped", row["ended_at"], None)
    assert claim(store) is None  # never started
    with pytest.raises(TaskAlreadyFinished):
        store.request_stop(uuid)
    assert fetch(store, uuid)["ended_at"] == row["ended_at"]


@pytest.mark.timeout(30)
def test_request_stop_of_running_task_marks_it_stopping(store):
    (uuid,) = add(store)
    claim(store)
    row = full(stop(store, uuid))
    assert row["status"] == "stopping"
    assert row["stop_requested"] is True
    assert row["ended_at"] is None
    got = fetch(store, uuid)
    assert (got["status"], got["stop_requested"], got["ended_at"]) == ("stopping", True, None)
    again, event = store.request_stop(uuid)  # stopping: returned unchanged, nothing written
    assert full(again)["status"] == "stopping" and full(again)["ended_at"] is None
    assert event is None
    assert store.finish(uuid, "stopped", ended_at=12.0)


@pytest.mark.timeout(30)
def test_request_stop_of_finished_or_unknown_task_raises(store):
    (uuid,) = add(store)
    claim(store)
    store.finish(uuid, "succeeded", ended_at=5.0, result=[1])
    with pytest.raises(TaskAlreadyFinished):
        store.request_stop(uuid)
    row = fetch(store, uuid)
    assert (row["status"], row["stop_requested"], row["ended_at"]) == ("succeeded", False, 5.0)
    with pytest.raises(TaskNotFound):
        store.request_stop(str(uuid_module.uuid4()))


@pytest.mark.timeout(30)
def test_active_lists_running_and_stopping_of_the_controller(store):
    running, stopping, queued = add(store, 3)
    add(store, 1, controller=OTHER)
    claim(store)
    claim(store)
    claim(store, controller=OTHER)
    stop(store, stopping)
    assert sorted(r["uuid"] for r in store.active(CTL)) == sorted([running, stopping])
    assert {r["status"] for r in store.active(CTL)} == {"running", "stopping"}
    store.finish(running, "succeeded", ended_at=2.0)
    assert [r["uuid"] for r in store.active(CTL)] == [stopping]
    assert store.active("nobody") == []


# -- reading --------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_list_is_newest_first_with_status_filter_and_limit(store):
    uuids = add(store, 3) + add(store, 2, priority=-5)
    add(store, 2, controller=OTHER)
    claim(store)  # uuids[3]: lowest priority, oldest of those
    stop(store, uuids[0])
    newest_first = list(reversed(uuids))
    assert [r["uuid"] for r in store.list_tasks(CTL)] == newest_first
    assert [r["uuid"] for r in store.list_tasks(CTL, limit=2)] == newest_first[:2]
    assert [r["uuid"] for r in store.list_tasks(CTL, ["queued"])] == [uuids[4], uuids[2], uuids[1]]
    assert [r["uuid"] for r in store.list_tasks(CTL, ["queued"], limit=1)] == [uuids[4]]
    assert [r["uuid"] for r in store.list_tasks(CTL, ["running", "stopped"])] == [uuids[3], uuids[0]]
    assert [r["uuid"] for r in store.list_tasks(CTL, iter(["stopped"]))] == [uuids[0]]
    assert store.list_tasks(CTL, ["failed"]) == []
    assert store.list_tasks("nobody") == []
    assert len(store.list_tasks(OTHER)) == 2


@pytest.mark.timeout(30)
def test_counts_per_status(store):
    assert counts(store, CTL) == {}
    a, b, c, d, e = add(store, 5)
    add(store, 2, controller=OTHER)
    claim(store)  # a
    claim(store)  # b
    claim(store)  # c
    stop(store, b)
    store.finish(c, "timed_out", ended_at=2.0)
    stop(store, d)
    assert counts(store) == \
        {"running": 1, "stopping": 1, "timed_out": 1, "stopped": 1, "queued": 1}
    assert counts(store, OTHER) == {"queued": 2}


@pytest.mark.timeout(30)
def test_position_is_the_one_based_place_in_the_queue(store):
    low = add(store, 2, priority=1)
    high = add(store, 1, priority=-1)
    add(store, 3, controller=OTHER, priority=-9)
    expected = {high[0]: 1, low[0]: 2, low[1]: 3}
    assert {u: store.position(fetch(store, u)) for u in expected} == expected
    running = claim(store)
    assert running["uuid"] == high[0]
    assert store.position(fetch(store, high[0])) is None
    assert store.position(fetch(store, low[0])) == 1
    assert store.position(fetch(store, low[1])) == 2
    stop(store, low[0])
    assert store.position(fetch(store, low[0])) is None
    assert store.position(fetch(store, low[1])) == 1


# -- purge ----------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_purge_removes_only_old_finished_tasks_of_that_controller(store):
    old_done, new_done, stopped_queued, running, still_queued = add(store, 5)
    (other_old,) = add(store, 1, controller=OTHER)
    claim(store)  # old_done
    claim(store)  # new_done
    claim(store, controller=OTHER)
    stopped_at = stop(store, stopped_queued)["ended_at"]  # the store's clock: now
    claim(store)  # running
    assert store.finish(old_done, "failed", ended_at=100.0)
    assert store.finish(new_done, "succeeded", ended_at=1000.0)
    assert store.finish(other_old, "succeeded", ended_at=10.0)
    assert store.purge(CTL, 500.0) == 1
    assert fetch(store, old_done) is None
    for uuid in (new_done, stopped_queued, running, still_queued, other_old):
        assert fetch(store, uuid) is not None
    assert store.purge(CTL, 500.0) == 0
    assert store.purge(CTL, 1000.0) == 0  # strictly before the cutoff
    assert store.purge(CTL, 1000.5) == 1
    assert fetch(store, new_done) is None
    assert store.purge(CTL, stopped_at) == 0
    assert store.purge(CTL, stopped_at + 1.0) == 1
    assert fetch(store, stopped_queued) is None
    assert status_of(store, running) == "running"
    assert status_of(store, still_queued) == "queued"
    assert counts(store) == {"running": 1, "queued": 1}
    assert store.purge(OTHER, 1e12) == 1
    assert store.list_tasks(OTHER) == [] and counts(store, OTHER) == {}


# -- JSON fields ----------------------------------------------------------------------------------------

PROGRESS_VALUES = ["text", "", 0, 7, -1.25, 0.0, True, False, None, [], [1, "a", None, {"b": [2.5]}], {},
                   {"stage": "load", "done": 3, "of": 10, "nested": {"ok": True, "list": [None, 1e-9]}},
                   "ünïcödé ✓ \u2028 \"quoted\" \\ slash"]


@pytest.mark.timeout(30)
def test_json_fields_round_trip(store):
    args = {"n": 1, "f": 2.5, "s": "ünï ✓", "b": False, "none": None, "list": [1, [2, {"x": "y"}]],
            "obj": {"deep": {"deeper": [True, None, -3]}}, "empty": {}, "big": 2 ** 53}
    (uuid,) = add(store, args=args)
    assert fetch(store, uuid)["args"] == args
    assert claim(store)["args"] == args
    for value in PROGRESS_VALUES:
        store.progress(uuid, OWNER, value, None)
        got = fetch(store, uuid)["progress"]
        assert got == value and type(got) is type(value), (value, got)
    error = {"type": "ValueError", "message": "bad ✗ \"value\"",
             "traceback": "Traceback (most recent call last):\n  x"}
    assert store.finish(uuid, "failed", ended_at=1.0, error=error, result=None)
    row = fetch(store, uuid)
    assert row["error"] == error
    assert row["result"] is None
    assert row["args"] == args
    assert row["progress"] == PROGRESS_VALUES[-1]
    listed = store.list_tasks(CTL)[0]
    assert (listed["args"], listed["error"]) == (args, error)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("result", [0, "", False, [], {}, 3.5, "done", [1, {"a": None}], {"k": [True]}],
                         ids=repr)
def test_falsy_and_nested_results_round_trip(store, result):
    (uuid,) = add(store)
    claim(store)
    assert store.finish(uuid, "succeeded", ended_at=1.0, result=result)
    got = fetch(store, uuid)["result"]
    assert got == result and type(got) is type(result)


@pytest.mark.timeout(30)
def test_returned_rows_are_copies(store):
    (uuid,) = add(store, args={"k": [1]})
    row = fetch(store, uuid)
    row["args"]["k"].append(2)
    row["status"] = "succeeded"
    assert fetch(store, uuid)["args"] == {"k": [1]}
    assert status_of(store, uuid) == "queued"


# -- heartbeats -----------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_heartbeats_record_the_last_beat_of_each_owner_on_the_store_clock(store):
    assert store.heartbeats() == {}
    a, b = "host-a:123:1700000000.125", "host-b:456:1700000001.5"
    before = store.now()
    store.heartbeat(a)
    store.heartbeat(b)
    after = store.now()
    beats = store.heartbeats()
    assert set(beats) == {a, b}
    assert all(before <= beat <= after for beat in beats.values())
    store.heartbeat(a)
    again = store.heartbeats()
    assert again[a] >= beats[a] and again[b] == beats[b]
    store.forget_owner(a)
    assert store.heartbeats() == {b: beats[b]}
    store.forget_owner("never-seen")
    store.heartbeat(a)  # an owner may come back
    assert set(store.heartbeats()) == {a, b}


@pytest.mark.timeout(30)
def test_now_is_the_store_clock_in_unix_seconds(store):
    first, second = store.now(), store.now()
    assert isinstance(first, float) and first <= second
    assert abs(first - time.time()) < 5.0  # one machine here: the clocks agree


# -- concurrency ----------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_concurrent_claims_from_threads_claim_each_task_once(store):
    uuids = add(store, 200)
    claimed: list[list[str]] = [[] for _ in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(index: int) -> None:
        try:
            start.wait(10)
            while (row := store.claim(CTL, f"thread-{index}", 200)) is not None:
                claimed[index].append(row["uuid"])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), name=f"claimer-{i}") for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(45)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    everything = [u for part in claimed for u in part]
    assert len(everything) == 200
    assert sorted(everything) == sorted(uuids)
    assert counts(store, CTL) == {"running": 200}
    for index, part in enumerate(claimed):
        for uuid in part:
            assert fetch(store, uuid)["owner"] == f"thread-{index}"


_CLAIM_SCRIPT = textwrap.dedent("""
    import json, os, sys, time

    kind, location, prefix, controller, owner, go = sys.argv[1:7]
    if kind == "sqlite":
        from flask_multiprocess_controller import SQLiteStore
        store = SQLiteStore(location)
    else:
        from flask_multiprocess_controller.store.redis import RedisStore
        store = RedisStore(location, prefix=prefix)
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit("never told to start")
        time.sleep(0.005)
    claimed, max_active, refused = [], 0, 0
    while time.monotonic() < deadline:
        row = store.claim(controller, owner, 3)
        if row is None:
            counts = store.counts(controller)
            if not counts.get("queued"):
                break
            refused += 1
            time.sleep(0.001)
            continue
        claimed.append(row["uuid"])
        # Every committed state keeps the limit, so any snapshot read here must too.
        counts = store.counts(controller)
        max_active = max(max_active, counts.get("running", 0) + counts.get("stopping", 0))
        time.sleep(0.002)
        if not store.finish(row["uuid"], "succeeded", ended_at=time.time(), result=owner):
            raise SystemExit("finish of a task this process claimed failed: " + row["uuid"])
    store.close()
    print(json.dumps({"claimed": claimed, "max_active": max_active, "refused": refused}))
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_claims_from_several_processes_are_exactly_once(tmp_path, redis_server, kind):
    """4 processes claim (max_running=3) and finish 120 tasks of one shared store: each exactly once."""
    if kind == "sqlite":
        location, prefix = str(tmp_path / "shared.sqlite3"), ""
        store: TaskStore = SQLiteStore(location)
    else:
        location = redis_server
        prefix = f"multi-{uuid_module.uuid4().hex}:"
        store = RedisStore(location, prefix=prefix)
    rows = [make_row() for _ in range(120)]
    uuids = [r["uuid"] for r in rows]
    store.enqueue(rows, -1)
    go = tmp_path / "go"
    procs = []
    try:
        for i in range(4):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _CLAIM_SCRIPT, kind, location, prefix, CTL, f"proc-{i}", str(go)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        go.touch()
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err[-2000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    everything = [u for out in outputs for u in out["claimed"]]
    assert len(everything) == len(set(everything)), "a task was claimed twice"
    assert sorted(everything) == sorted(uuids), "a task was never claimed"
    assert max(out["max_active"] for out in outputs) <= 3
    assert counts(store, CTL) == {"succeeded": 120}
    for i, out in enumerate(outputs):
        for uuid in out["claimed"]:
            row = store.get(uuid)
            assert row["owner"] == f"proc-{i}" and row["result"] == f"proc-{i}"
    store.close()


@pytest.mark.timeout(30)
def test_writes_are_fenced_by_the_owner(store):
    """A process that lost a task (settled or claimed again elsewhere) cannot write to it any more."""
    (uuid,) = add(store)
    claim(store, owner="host-a:1:1.0")
    latest = store.latest_cursor()
    assert store.progress(uuid, "host-b:2:2.0", "stale", None) is None
    assert store.start(uuid, "host-b:2:2.0", 1, 1.0) is None
    assert store.get(uuid)["progress"] is None and store.get(uuid)["pid"] is None
    assert store.finish(uuid, "succeeded", owner="host-b:2:2.0", result=1) is None
    assert store.requeue(uuid, owner="host-b:2:2.0") is None
    assert store.latest_cursor() == latest  # a write fenced out writes no event either
    assert store.progress(uuid, "host-a:1:1.0", "mine", None) is not None
    assert store.get(uuid)["progress"] == "mine"
    assert store.get(uuid)["status"] == "running"
    # Settled by a survivor, then claimed again by another process: the old owner is fenced out.
    assert store.requeue(uuid, owner="host-a:1:1.0") is not None
    claim(store, owner="host-b:2:2.0")
    assert store.requeue(uuid, owner="host-a:1:1.0") is None
    assert store.finish(uuid, "lost", owner="host-a:1:1.0") is None
    assert store.finish(uuid, "succeeded", owner="host-b:2:2.0", result=2) is not None
    row = store.get(uuid)
    assert (row["status"], row["result"], row["owner"], row["attempt"]) == ("succeeded", 2, "host-b:2:2.0", 2)


@pytest.mark.timeout(60)
def test_sqlite_store_does_not_keep_a_connection_per_finished_thread(tmp_path):
    """A server that starts a thread per request (the dev server) must not leave a connection
    (a file descriptor and its page cache) behind for each request."""
    import psutil

    from flask_multiprocess_controller.store.sqlite import SQLiteStore

    path = tmp_path / "tasks.sqlite3"
    store = SQLiteStore(str(path))
    try:
        def open_connections() -> int:
            return sum(1 for f in psutil.Process().open_files() if f.path == str(path))

        for _ in range(200):
            worker = threading.Thread(target=lambda: (store.get(str(uuid_module.uuid4())), store.heartbeat("x")))
            worker.start()
            worker.join()
        assert open_connections() <= 2, open_connections()  # one pooled connection (and its WAL file)
    finally:
        store.close()
    assert open_connections() == 0
