"""One contract suite (version 2, store/base.py) for every TaskStore implementation, run against each backend.

To add a backend, add one line to ``BACKENDS``: a name and a function of the test's environment
(``env.tmp_path``, ``env.redis_url``) that returns a fresh, empty store; add its name to
``SHARED_BACKENDS`` too when several processes can share it (the multi-process and durability
tests then run on it). The tests of one backend's own failure modes and options come last.
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
    SYSTEM_TENANT, MemoryStore, QueueFull, SQLiteStore, TaskAlreadyFinished, TaskNotFound, TaskStore,
)
from flask_multiprocess_controller.events import CALLBACK_KINDS, Changes, Event
from flask_multiprocess_controller.exceptions import StoreError, StoreUnavailable
from flask_multiprocess_controller.store import resolve_store
from flask_multiprocess_controller.store.base import hook_tenant
from flask_multiprocess_controller.store.base import ProgressWrite
from flask_multiprocess_controller.store.postgres import PostgresStore
from flask_multiprocess_controller.store.redis import RedisStore

from conftest import free_port, wait_until


def _redis_store(env: SimpleNamespace) -> TaskStore:
    return RedisStore(env.redis_url, prefix=f"contract-{uuid_module.uuid4().hex}:")  # a fresh key space


def _postgres_store(env: SimpleNamespace) -> TaskStore:
    return PostgresStore(env.postgres_url, schema=f"contract_{uuid_module.uuid4().hex[:16]}")  # a fresh schema


BACKENDS: dict[str, Callable[[SimpleNamespace], TaskStore]] = {
    "memory": lambda env: MemoryStore(),
    "sqlite": lambda env: SQLiteStore(str(env.tmp_path / "contract.sqlite3")),
    "redis": _redis_store,
    "postgres": _postgres_store,
}


#: The backends whose store several processes (and store objects) share.
SHARED_BACKENDS = ["sqlite", "redis", "postgres"]


def _env(request: Any, tmp_path: Path, redis_server: str) -> SimpleNamespace:
    """What a backend's store is made from; the PostgreSQL cluster is started only for its tests."""
    postgres_url = request.getfixturevalue("postgres_server").url() if request.param == "postgres" else None
    return SimpleNamespace(tmp_path=tmp_path, redis_url=redis_server, postgres_url=postgres_url)


@pytest.fixture(params=list(BACKENDS))
def store(request, tmp_path, redis_server):
    made = BACKENDS[request.param](_env(request, tmp_path, redis_server))
    yield made
    made.close()


@pytest.fixture(params=SHARED_BACKENDS)
def shared_store(request, tmp_path, redis_server):
    env = _env(request, tmp_path, redis_server)
    made = BACKENDS[request.param](env)
    yield made
    made.close()


def reopen(store: TaskStore) -> TaskStore:
    """A new store object on the same SQLite file or Redis key space."""
    if isinstance(store, SQLiteStore):
        return SQLiteStore(store.path)
    if isinstance(store, PostgresStore):
        return PostgresStore(store.url, schema=store.schema)
    assert isinstance(store, RedisStore)
    return RedisStore(store.url, prefix=store.prefix)


def location(store: TaskStore) -> tuple[str, str, str]:
    """(kind, location, prefix) of a shared store, for a child process to open the same one."""
    if isinstance(store, SQLiteStore):
        return "sqlite", store.path, ""
    if isinstance(store, PostgresStore):
        return "postgres", store.url, store.schema
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
#: What the task of every event carries.
BASE_KEYS = {"seq", "uuid", "controller", "status", "tenant", "attempt", "pid"}


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
    # An end carries the whole task but its unbounded inputs (see the lean events tests).
    assert ROW_KEYS - {"args"} <= set(event["task"]), sorted(ROW_KEYS - {"args"} - set(event["task"]))
    assert "args" not in event["task"]
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
def test_claim_started_claims_and_records_the_process_at_once(store):
    first, second = add(store, 2)
    assert store.claim_started(CTL, OWNER, 1, 4242, 123.5)[0]["uuid"] == first
    row = fetch(store, first)
    assert (row["status"], row["owner"], row["pid"], row["pid_created"], row["attempt"]) == (
        "running", OWNER, 4242, 123.5, 1)
    assert row["started_at"] is not None
    assert store.claim_started(CTL, OWNER, 1, 4343, 1.0) is None  # the limit holds as for claim()
    assert status_of(store, second) == "queued"
    store.finish(first, "succeeded", owner=OWNER)
    before = store.latest_cursor()
    claimed, event = store.claim_started(CTL, OWNER, 1, 4343, 2.0)
    assert claimed["uuid"] == second and claimed["pid"] == 4343 and claimed["status"] == "running"
    assert EVENT_KEYS <= set(event)
    assert (event["kind"], event["uuid"], event["emitter"]) == ("started", second, OWNER)
    assert event["task"]["pid"] == 4343 and event["task"]["status"] == "running"
    feed = store.changes(before)  # the one event of the step, in the feed as start() writes it
    assert [(e["kind"], e["cursor"]) for e in feed.events] == [("started", event["cursor"])]
    assert store.claim_started(CTL, OWNER, 5, 1, 1.0) is None  # nothing queued


@pytest.mark.timeout(30)
def test_finish_and_claim_ends_a_task_and_claims_the_next_for_its_owner(store):
    first, second, third = add(store, 3)
    assert claim(store, max_running=1)["uuid"] == first
    assert store.finish_and_claim(first, "succeeded", "someone-else", CTL, 1) == (None, None)  # fenced
    event, claimed = store.finish_and_claim(first, "succeeded", OWNER, CTL, 1, result=7)
    assert (event["kind"], event["uuid"], event["task"]["status"], event["task"]["result"]) == (
        "ended", first, "succeeded", 7)
    assert claimed["uuid"] == second and claimed["status"] == "running" and claimed["owner"] == OWNER
    assert (status_of(store, first), status_of(store, second), status_of(store, third)) == (
        "succeeded", "running", "queued")
    assert claim(store)["uuid"] == third
    event, claimed = store.finish_and_claim(second, "failed", OWNER, CTL, 1)  # third still runs: the limit holds
    assert event is not None and claimed is None
    with pytest.raises(ValueError):
        store.finish_and_claim(third, "running", OWNER, CTL, 1)


@pytest.mark.timeout(30)
def test_finish_and_claim_started_hands_the_process_on_to_the_next_task(store):
    first, second, third = add(store, 3)
    assert store.claim_started(CTL, OWNER, 1, 4242, 12.5)[0]["uuid"] == first
    assert store.finish_and_claim_started(first, "succeeded", "someone-else", CTL, 1, 4242, 12.5) == (None, None)
    before = store.latest_cursor()
    ended, (claimed, started) = store.finish_and_claim_started(first, "succeeded", OWNER, CTL, 1, 4242, 12.5,
                                                               result=7)
    assert (ended["kind"], ended["uuid"], ended["task"]["result"]) == ("ended", first, 7)
    assert (claimed["uuid"], claimed["status"], claimed["owner"], claimed["pid"], claimed["pid_created"]) == (
        second, "running", OWNER, 4242, 12.5)
    assert (started["kind"], started["uuid"], started["task"]["pid"]) == ("started", second, 4242)
    row = fetch(store, second)
    assert (row["pid"], row["pid_created"], row["attempt"]) == (4242, 12.5, 1)
    feed = store.changes(before)  # the end, then the start it made room for
    assert [(e["kind"], e["uuid"]) for e in feed.events] == [("ended", first), ("started", second)]
    assert claim(store, max_running=1) is None  # the limit holds: second runs
    ended, claimed = store.finish_and_claim_started(second, "failed", OWNER, CTL, 0, 4242, 12.5)
    assert ended is not None and claimed is None and status_of(store, third) == "queued"


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
    # What the task's tree used so far rides with a progress write (and its event); a write without it keeps it.
    event = store.progress(running, OWNER, 2, None, usage={"memory_peak": 7 << 20, "cpu_time": 1.5})
    assert event is not None and (event["task"]["memory_peak"], event["task"]["cpu_time"]) == (7 << 20, 1.5)
    assert store.progress(running, OWNER, 3, None) is not None
    assert (fetch(store, running)["memory_peak"], fetch(store, running)["cpu_time"]) == (7 << 20, 1.5)


@pytest.mark.timeout(30)
def test_progress_many_writes_a_batch_as_progress_writes_each(store):
    """A flusher's batch: each active task of the owner gets its progress and its event, in order; a task
    that is not (queued, ended, another owner's, unknown) gets None and keeps its row."""
    running, other, finished, queued = add(store, 4)
    for _ in range(3):
        claim(store)
    store.finish(finished, "succeeded", ended_at=time.time(), result=1)
    unknown = str(uuid_module.uuid4())
    events = store.progress_many(OWNER, [
        ProgressWrite(running, {"n": 1}, 10.0, {"memory_peak": 5 << 20, "cpu_time": 0.5}),
        ProgressWrite(queued, {"n": 2}, 20.0), ProgressWrite(finished, 3, None), ProgressWrite(unknown, 4, None),
        ProgressWrite(other, [5], None)])
    assert [e is not None for e in events] == [True, False, False, False, True]
    first, fifth = events[0], events[4]
    assert first is not None and fifth is not None
    assert (first["kind"], first["uuid"], first["emitter"], first["task"]["progress"], first["task"]["percent"],
            first["task"]["memory_peak"]) == ("progress", running, OWNER, {"n": 1}, 10.0, 5 << 20)
    assert (fifth["uuid"], fifth["task"]["progress"]) == (other, [5])
    assert (fetch(store, running)["progress"], fetch(store, other)["progress"]) == ({"n": 1}, [5])
    assert fetch(store, queued)["progress"] is None and fetch(store, finished)["progress"] is None
    assert store.progress_many("host-b:2:2.0", [ProgressWrite(running, "stale", None)]) == [None]
    assert store.progress_many(OWNER, []) == []
    assert fetch(store, running)["progress"] == {"n": 1}


@pytest.mark.timeout(30)
def test_finish_is_compare_and_set(store):
    running, stopping, queued = add(store, 3)
    claim(store)
    claim(store)
    stop(store, stopping)
    error = {"type": "X", "message": "m", "traceback": None}
    assert store.finish(running, "failed", ended_at=100.0, exit_code=1, error=error) is not None
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
    assert fetch(store, uuid)["finish_requested"] is False and fetch(store, uuid)["stopped_with_result"] is False


@pytest.mark.timeout(30)
def test_request_stop_with_finish_is_carried_to_the_running_task_and_its_result_kept(store):
    (uuid,) = add(store)
    claim(store)
    row, event = store.request_stop(uuid, emitter="stopper", finish=True)
    assert (row["status"], row["stop_requested"], row["finish_requested"]) == ("stopping", True, True)
    assert event["task"]["finish_requested"] is True  # what the process running it reads
    assert store.finish(uuid, "stopped", ended_at=12.0, result={"best": 3}, stopped_with_result=True)
    got = fetch(store, uuid)
    assert (got["status"], got["result"], got["stopped_with_result"]) == ("stopped", {"best": 3}, True)


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
def test_find_by_prefix_of_any_controller_newest_first(store):
    def row(uuid: str, controller: str = CTL) -> dict:
        return {**make_row(controller), "uuid": uuid}

    older, newer, other, elsewhere = ("abcd1234-0000-4000-8000-000000000001", "abcd1234-ff00-4000-8000-000000000002",
                                      "abcd1234-ff00-4000-8000-000000000003", "abcd1235-0000-4000-8000-000000000000")
    store.enqueue([row(older), row(newer), row(elsewhere)], -1)
    store.enqueue([row(other, OTHER)], -1)
    assert [r["uuid"] for r in store.find_by_prefix("abcd1234")] == [other, newer, older]
    assert [r["uuid"] for r in store.find_by_prefix("abcd1234", limit=1)] == [other]
    assert [r["uuid"] for r in store.find_by_prefix("abcd1234-ff00-4000-8000-00000000000")] == [other, newer]
    assert [(r["uuid"], r["controller"]) for r in store.find_by_prefix("abcd1234-0")] == [(older, CTL)]
    assert store.find_by_prefix("abcd1233") == [] and store.find_by_prefix("0bcd1234") == []
    assert "state" not in store.find_by_prefix(older[:8])[-1]


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
def test_ended_counts_per_slot_and_status(store):
    """What the dashboard's chart of ended tasks reads: terminal tasks since a time, per slot and status."""
    rows = [make_row() for _ in range(6)]
    rows[5]["tenant"] = "acme"
    store.enqueue(rows, -1)
    other = add(store, 1, controller=OTHER)
    a, b, c, d, e, f = (r["uuid"] for r in rows)
    for _ in range(6):
        claim(store)
    since = 1000.0
    store.finish(a, "succeeded", ended_at=since - 1)  # before the window
    store.finish(b, "succeeded", ended_at=since)  # the window starts at since, inclusive
    store.finish(c, "succeeded", ended_at=since + 59.5)
    store.finish(d, "failed", ended_at=since + 60)
    store.finish(f, "timed_out", ended_at=since + 125)
    claim(store, OTHER)
    store.finish(other[0], "failed", ended_at=since + 1)
    # e still runs: not counted.
    assert store.ended_counts(CTL, since) == {(0, "succeeded"): 2, (1, "failed"): 1, (2, "timed_out"): 1}
    assert store.ended_counts(CTL, since, step=3600.0) == {(0, "succeeded"): 2, (0, "failed"): 1,
                                                           (0, "timed_out"): 1}
    assert store.ended_counts(CTL, since, tenant="acme") == {(2, "timed_out"): 1}
    assert store.ended_counts(CTL, since, tenant="nobody") == {}
    assert store.ended_counts(OTHER, since) == {(0, "failed"): 1}
    assert store.ended_counts(CTL, since + 200) == {}
    stop(store, e)
    assert sum(store.ended_counts(CTL, since).values()) == 4  # stopping is not an end yet


@pytest.mark.timeout(30)
def test_ended_timings_read_the_times_of_tasks_ended_since_latest_first(store):
    """What the wait-time and run-time histograms of <prefix>/metrics read."""
    created = store.now() - 100.0
    rows = [make_row(created_at=created) for _ in range(4)]
    store.enqueue(rows, -1)
    early, late, retried, never_ran = (r["uuid"] for r in rows)
    add(store, 1, controller=OTHER)
    claim(store), claim(store), claim(store), claim(store, OTHER)
    since = store.now() + 1000.0  # ended_at values of the future: no store clock is that far ahead
    store.finish(early, "succeeded", owner=OWNER, ended_at=since - 1)  # before the window
    store.finish(late, "failed", owner=OWNER, ended_at=since + 20)
    store.retry(retried, 0.0, owner=OWNER)
    wait_until(lambda: claim(store) is not None, timeout=5)
    store.finish(retried, "succeeded", owner=OWNER, ended_at=since + 30)
    store.request_stop(never_ran)  # ended at the store's clock, before the window
    timings = store.ended_timings(CTL, since)
    assert [(t.status, t.ended_at, t.attempt) for t in timings] == [("succeeded", since + 30, 2), ("failed", since + 20, 1)]
    assert all(t.created_at == created and t.started_at is not None and created < t.started_at < since for t in timings)
    assert store.ended_timings(CTL, since, limit=1) == timings[:1]
    stopped = store.ended_timings(CTL, since - 2000)
    assert len(stopped) == 4 and (stopped[-1].started_at, stopped[-1].attempt) == (None, 0)
    assert store.ended_timings(OTHER, since - 2000) == []  # running


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
def test_batch_lists_the_tasks_of_one_batch_in_input_order(store):
    batch, other_batch = uuid_module.uuid4().hex, uuid_module.uuid4().hex
    rows = [dict(make_row(priority=p), batch=batch) for p in (5, -1, 0)]
    store.enqueue(rows, -1)
    store.enqueue([dict(make_row(), batch=other_batch)], -1)
    store.enqueue([dict(make_row(OTHER), batch=batch)], -1)  # another controller's: not in CTL's batch
    (alone,) = add(store)
    assert [r["uuid"] for r in store.batch(CTL, batch)] == [r["uuid"] for r in rows]
    assert all(ROW_KEYS <= set(r) and r["batch"] == batch for r in store.batch(CTL, batch))
    assert [r["batch"] for r in store.batch(CTL, other_batch)] == [other_batch]
    assert store.get(alone)["batch"] is None
    assert store.batch(CTL, uuid_module.uuid4().hex) == []
    # Claims, ends and purges show in it.
    assert claim(store)["uuid"] == rows[1]["uuid"]
    assert store.finish(rows[1]["uuid"], "succeeded", ended_at=10.0)
    assert [r["status"] for r in store.batch(CTL, batch)] == ["queued", "succeeded", "queued"]
    assert store.purge(CTL, 100.0) == 1
    assert [r["uuid"] for r in store.batch(CTL, batch)] == [rows[0]["uuid"], rows[2]["uuid"]]


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
def test_known_hosts_come_from_the_heartbeats_with_each_host_s_newest_beat(store):
    assert store.known_hosts() == {}
    a1, a2 = "host-a/pidns-1:123:1700000000.125", "host-a/pidns-1:124:1700000000.5"
    b = "b:with:colons:456:1700000001.5"
    for owner in (a1, a2, b, "not-an-owner-id"):
        store.heartbeat(owner)
    beats = store.heartbeats()
    assert store.known_hosts() == {"host-a/pidns-1": max(beats[a1], beats[a2]), "b:with:colons": beats[b]}
    store.forget_owner(b)
    assert set(store.known_hosts()) == {"host-a/pidns-1"}


@pytest.mark.timeout(30)
def test_drained_hosts_keep_their_first_since_until_undrained(store):
    assert store.drained_hosts() == {}
    store.set_drained("host-b", False)  # undraining a host that is not drained changes nothing
    assert store.drained_hosts() == {}
    before = store.now()
    store.set_drained("host-a/pidns-1/boot-1", True)
    store.set_drained("host-b", True)
    after = store.now()
    drained = store.drained_hosts()
    assert set(drained) == {"host-a/pidns-1/boot-1", "host-b"}
    assert all(isinstance(since, float) and before <= since <= after for since in drained.values())
    store.set_drained("host-b", True)  # again: the first since stays
    assert store.drained_hosts() == drained
    store.set_drained("host-b", False)
    assert store.drained_hosts() == {"host-a/pidns-1/boot-1": drained["host-a/pidns-1/boot-1"]}
    store.set_drained("host-b", True)
    assert store.drained_hosts()["host-b"] >= drained["host-b"]


@pytest.mark.timeout(30)
def test_a_keeper_s_round_beats_and_reads_the_drained_hosts_in_one_call(store):
    """What the keeper calls each second: the heartbeat is recorded as heartbeat() records it, and the answer is
    what drained_hosts() says."""
    before = store.now()
    assert store.heartbeat_and_drained(OWNER) == {}
    assert before <= store.heartbeats()[OWNER] <= store.now()
    store.set_drained("host-b", True)
    first = store.heartbeats()[OWNER]
    wait_until(lambda: store.now() > first + 0.002, timeout=5.0, interval=0.001)
    assert store.heartbeat_and_drained(OWNER) == store.drained_hosts() and "host-b" in store.drained_hosts()
    assert store.heartbeats()[OWNER] > first


@pytest.mark.timeout(30)
def test_drained_hosts_are_shared_by_every_store_object(shared_store):
    other = reopen(shared_store)
    try:
        shared_store.set_drained("host-a", True)
        assert set(other.drained_hosts()) == {"host-a"}
        other.set_drained("host-a", False)
        assert shared_store.drained_hosts() == {}
    finally:
        other.close()


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
    elif kind == "postgres":
        from flask_multiprocess_controller.store.postgres import PostgresStore
        store = PostgresStore(location, schema=prefix)
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
@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
def test_claims_from_several_processes_are_exactly_once(request, tmp_path, redis_server, kind):
    """4 processes claim (max_running=3) and finish 120 tasks of one shared store: each exactly once."""
    if kind == "sqlite":
        location, prefix = str(tmp_path / "shared.sqlite3"), ""
        store: TaskStore = SQLiteStore(location)
    elif kind == "postgres":
        location, prefix = request.getfixturevalue("postgres_server").url(), "multi_" + uuid_module.uuid4().hex[:12]
        store = PostgresStore(location, schema=prefix)
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


# -- saved state -------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_save_state_is_fenced_by_the_owner_and_only_touches_active_tasks(store):
    running, queued = add(store, 2)
    claim(store, max_running=1, owner="host-a:1:1.0")
    assert fetch(store, running)["state"] is None and fetch(store, running)["state_saved_at"] is None
    before = store.now()
    assert store.save_state(running, "host-b:2:2.0", {"n": 1}) is False  # not its owner's
    assert store.save_state(queued, "host-a:1:1.0", {"n": 1}) is False  # not active
    assert store.save_state(str(uuid_module.uuid4()), "host-a:1:1.0", 1) is False  # unknown: no row made
    assert fetch(store, running)["state"] is None
    assert store.save_state(running, "host-a:1:1.0", {"n": [1, 2.5, None, "x"], "deep": {"k": True}}) is True
    after = store.now()
    row = fetch(store, running)
    assert row["state"] == {"n": [1, 2.5, None, "x"], "deep": {"k": True}}
    assert before <= row["state_saved_at"] <= after
    assert store.save_state(running, "host-a:1:1.0", 7) is True  # the latest value replaces the last
    assert fetch(store, running)["state"] == 7
    stop(store, running)
    assert store.save_state(running, "host-a:1:1.0", 8) is True  # a stopping task may still save
    store.finish(running, "stopped")
    assert store.save_state(running, "host-a:1:1.0", 9) is False  # an ended one may not
    row = fetch(store, running)
    assert (row["status"], row["state"]) == ("stopped", 8)  # an end keeps what was saved
    assert fetch(store, queued)["state"] is None


@pytest.mark.timeout(30)
def test_saved_state_survives_requeue_and_retry_and_comes_with_the_next_claim(store):
    (uuid,) = add(store)
    claim(store, owner="host-a:1:1.0")
    assert store.save_state(uuid, "host-a:1:1.0", {"done": 10})
    saved_at = fetch(store, uuid)["state_saved_at"]
    assert store.requeue(uuid, owner="host-a:1:1.0") is not None
    row = fetch(store, uuid)
    assert (row["status"], row["state"], row["state_saved_at"]) == ("queued", {"done": 10}, saved_at)
    claimed = claim(store, owner="host-b:2:2.0")
    assert (claimed["uuid"], claimed["state"], claimed["state_saved_at"]) == (uuid, {"done": 10}, saved_at)
    assert store.save_state(uuid, "host-b:2:2.0", {"done": 20})
    error = {"type": "X", "message": "m", "traceback": None}
    assert store.retry(uuid, 0.0, owner="host-b:2:2.0", errors=[error])
    assert fetch(store, uuid)["state"] == {"done": 20}
    claimed = wait_until(lambda: claim(store, owner="host-c:3:3.0"), timeout=10)
    assert (claimed["uuid"], claimed["state"], claimed["attempt"]) == (uuid, {"done": 20}, 3)
    started = store.claim_started  # a claim that records the process returns the state too
    assert store.requeue(uuid, owner="host-c:3:3.0") is not None
    got = started(CTL, "host-d:4:4.0", 10, 4242, 1.5)
    assert got is not None and got[0]["state"] == {"done": 20}
    assert "state" not in got[1]["task"]


@pytest.mark.timeout(30)
def test_lists_and_answers_of_writes_leave_the_saved_state_out_but_get_has_it(store):
    (uuid,) = add(store)
    rows = [make_row() for _ in range(2)]
    for row in rows:
        row["batch"] = "b" * 32
    store.enqueue(rows, -1)
    for owner in ("o-1", "o-2", "o-3"):
        claim(store, owner=owner)
    for owner, row_uuid in zip(("o-1", "o-2", "o-3"), (uuid, rows[0]["uuid"], rows[1]["uuid"])):
        assert store.save_state(row_uuid, owner, {"big": "y" * 10_000})
    listed = store.list_tasks(CTL) + store.list_tasks(CTL, statuses=["running"]) + store.batch(CTL, "b" * 32)
    assert len(listed) == 3 + 3 + 2
    for row in listed:
        assert row.get("state") is None and row["state_saved_at"] is not None
        assert ROW_KEYS <= set(row)
    stopped, _ = store.request_stop(uuid)
    assert stopped.get("state") is None and stopped["status"] == "stopping"
    assert store.get(uuid)["state"] == {"big": "y" * 10_000}
    assert [row["state"] for row in store.active(CTL)] == [{"big": "y" * 10_000}] * 3


@pytest.mark.timeout(30)
def test_saved_state_is_never_in_events(store):
    (uuid,) = add(store)
    big = {"blob": "x" * 50_000}
    claim(store)
    assert store.save_state(uuid, OWNER, big)
    since = store.changes(None).cursor
    events = [store.start(uuid, OWNER, 4242, 1.5), store.progress(uuid, OWNER, {"p": 1}, 10.0),
              stop(store, uuid) and None, store.requeue(uuid, owner=OWNER)]
    claimed = claim(store)
    assert claimed["state"] == big
    events.append(store.finish(uuid, "succeeded", owner=OWNER, result=1))
    returned = [e for e in events if e is not None]
    assert len(returned) == 4
    feed = store.changes(since, limit=100).events
    assert [e["kind"] for e in feed] == ["started", "progress", "stopping", "requeued", "ended"]
    for event in returned + feed:
        assert event["task"].get("state") is None, event["kind"]
        assert "x" * 1000 not in json.dumps(event)
    saved_at = fetch(store, uuid)["state_saved_at"]
    # when, but never what (the events that carry it: a progress write and the whole-task kinds)
    assert [e["task"]["state_saved_at"] for e in feed if "state_saved_at" in e["task"]] == [saved_at] * 3
    assert all("x" * 1000 not in json.dumps(e) for e in store.unacked(CTL))
    store.purge(CTL, time.time() + 1)
    assert all(e["task"].get("state") is None for e in store.changes(since, limit=100).events)


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


# -- events: every state-changing write returns its event, and the feed shows the same ----------------

def check_event(event: Optional[Event], kind: str, uuid: str, emitter: Optional[str], status: str,
                controller: str = CTL) -> Event:
    """Assert the shape of one event; return it."""
    assert event is not None, kind
    assert set(event) == EVENT_KEYS
    assert isinstance(event["cursor"], str) and isinstance(event["at"], float)
    assert (event["kind"], event["uuid"], event["controller"], event["emitter"]) == (kind, uuid, controller, emitter)
    assert BASE_KEYS <= set(event["task"]) and "args" not in event["task"] and "state" not in event["task"]
    if kind in ("queued", "started", "adopted", "ended"):
        assert ROW_KEYS - {"args"} <= set(event["task"])  # the whole task but its inputs
    assert (event["task"]["uuid"], event["task"]["status"]) == (uuid, status)
    return event


@pytest.mark.timeout(30)
def test_every_state_change_returns_its_event_and_the_feed_shows_the_same_in_order(store):
    since = store.changes(None).cursor
    before = store.now()
    written: list[Event] = []
    rows = [make_row(priority=p) for p in (0, 1, 2)]
    a, b, c = (r["uuid"] for r in rows)
    queued = store.enqueue(rows, -1, emitter="client-1")
    assert [e["task"]["seq"] for e in queued] == [r["seq"] for r in rows]  # input order
    written += [check_event(e, "queued", r["uuid"], "client-1", "queued") for e, r in zip(queued, rows)]

    assert claim(store)["uuid"] == a  # no event: "started" comes with the pid
    started = check_event(store.start(a, OWNER, 4242, 1.5), "started", a, OWNER, "running")
    assert (started["task"]["pid"], started["task"]["pid_created"], started["task"]["owner"]) == (4242, 1.5, OWNER)
    progressed = check_event(store.progress(a, OWNER, {"step": 1}, 10.0), "progress", a, OWNER, "running")
    assert (progressed["task"]["progress"], progressed["task"]["percent"]) == ({"step": 1}, 10.0)
    row, stopping = store.request_stop(a, emitter="stopper")
    check_event(stopping, "stopping", a, "stopper", "stopping")
    assert row["stop_requested"] is True and row["args"] == {}  # the answer is the whole task
    assert stopping["task"] == {key: row[key] for key in BASE_KEYS | {"stop_requested", "finish_requested"}}
    assert store.request_stop(a, emitter="stopper")[1] is None  # already stopping: nothing written
    requeued = check_event(store.requeue(a, owner=OWNER), "requeued", a, OWNER, "queued")  # emitter = owner
    assert (requeued["task"]["owner"], requeued["task"]["pid"], requeued["task"]["stop_requested"]) == \
        (None, None, False)
    written += [started, progressed, stopping, requeued]

    assert claim(store)["uuid"] == a
    ended = check_event(store.finish(a, "succeeded", owner=OWNER, result=[1]), "ended", a, OWNER, "succeeded")
    assert ended["task"]["result"] == [1]
    assert ended["task"]["ended_at"] == ended["at"]  # ended_at defaults to the store's clock at the change
    assert claim(store)["uuid"] == b
    lost = check_event(store.finish(b, "lost", emitter="reconciler", ended_at=5.0), "ended", b, "reconciler",
                       "lost")
    assert lost["task"]["ended_at"] == 5.0
    row, stopped = store.request_stop(c)
    check_event(stopped, "ended", c, None, "stopped")
    assert stopped["task"] == {k: v for k, v in row.items() if k != "args"} and row["ended_at"] == stopped["at"]
    written += [ended, lost, stopped]

    assert store.purge(CTL, store.now() + 1.0, emitter="janitor") == 3
    purged = store.changes(stopped["cursor"]).events
    assert sorted(e["uuid"] for e in purged) == sorted([a, b, c])
    by_uuid = {e["uuid"]: e for e in written}
    for event in purged:  # which task, and its status when it was deleted
        check_event(event, "purged", event["uuid"], "janitor", by_uuid[event["uuid"]]["task"]["status"])
        assert set(event["task"]) == BASE_KEYS
    written += purged
    after = store.now()

    feed = store.changes(since)
    assert feed.events == written
    assert (feed.cursor, feed.reset) == (written[-1]["cursor"], False)
    assert feed.cursor == store.latest_cursor()
    assert len({e["cursor"] for e in written}) == len(written)
    assert all(before <= e["at"] <= after for e in written)
    # A limit cuts the batch; its cursor resumes right after it.
    first = store.changes(since, limit=4)
    assert (first.events, first.cursor) == (written[:4], written[3]["cursor"])
    assert store.changes(first.cursor).events == written[4:]


@pytest.mark.timeout(30)
def test_writes_that_change_nothing_write_no_event(store):
    running, queued = add(store, 2)
    claim(store)
    latest = store.latest_cursor()
    assert store.claim(CTL, OWNER, 1) is None  # the limit: no event either way
    assert store.start(queued, OWNER, 1, 1.0) is None
    assert store.progress(queued, OWNER, 1, None) is None
    assert store.finish(queued, "succeeded") is None
    assert store.requeue(queued) is None
    assert store.purge(CTL, 0.0) == 0
    with pytest.raises(QueueFull):
        add(store, 1, max_queued=1)
    assert store.latest_cursor() == latest
    assert store.changes(latest) == Changes([], latest, False)


@pytest.mark.timeout(30)
def test_enqueue_returns_one_event_per_row_in_input_order(store):
    rows = [make_row(priority=i % 3, args={"i": i}) for i in range(300)]
    events = store.enqueue(rows, -1)
    assert [e["uuid"] for e in events] == [r["uuid"] for r in rows]
    assert all("args" not in e["task"] for e in events)  # never in an event: read the task
    assert [e["task"]["priority"] for e in events] == [i % 3 for i in range(300)]
    assert [e["task"]["seq"] for e in events] == [r["seq"] for r in rows]
    assert {e["kind"] for e in events} == {"queued"} and {e["emitter"] for e in events} == {None}
    assert store.enqueue([], -1) == []


# -- the change feed --------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_changes_from_none_returns_nothing_and_the_latest_cursor(store):
    empty = store.changes(None)
    assert empty == Changes([], store.latest_cursor(), False)
    assert store.changes(empty.cursor) == Changes([], empty.cursor, False)
    (uuid,) = add(store)
    now = store.changes(None, timeout=5.0)  # "from now": does not wait for what comes next
    assert now.events == [] and now.reset is False
    assert now.cursor == store.latest_cursor() != empty.cursor
    assert [e["uuid"] for e in store.changes(empty.cursor).events] == [uuid]
    assert store.changes(now.cursor) == Changes([], now.cursor, False)


@pytest.mark.timeout(30)
def test_waiting_changes_return_after_the_timeout_with_nothing(store):
    latest = store.latest_cursor()
    started = time.monotonic()
    assert store.changes(latest, timeout=0.2) == Changes([], latest, False)
    assert time.monotonic() - started >= 0.19


@pytest.mark.timeout(60)
def test_waiting_changes_wake_when_another_thread_writes(store):
    since = store.latest_cursor()
    rows = [make_row()]
    failures: list[BaseException] = []

    def write_later() -> None:
        try:
            time.sleep(0.3)  # let the reader block first
            store.enqueue(rows, -1, emitter="writer-thread")
        except BaseException as exc:  # reported below
            failures.append(exc)

    writer = threading.Thread(target=write_later, name="feed-writer")
    writer.start()
    try:
        started = time.monotonic()
        found = store.changes(since, timeout=30.0)
        waited = time.monotonic() - started
    finally:
        writer.join(30)
    assert failures == []
    assert [(e["uuid"], e["emitter"]) for e in found.events] == [(rows[0]["uuid"], "writer-thread")]
    assert found.cursor == found.events[0]["cursor"] and found.reset is False
    assert waited < 15.0  # woken by the write, not by the timeout


_WRITE_SCRIPT = textwrap.dedent("""
    import json, os, sys, time, uuid

    kind, location, prefix, controller, go = sys.argv[1:6]
    if kind == "sqlite":
        from flask_multiprocess_controller import SQLiteStore
        store = SQLiteStore(location)
    elif kind == "postgres":
        from flask_multiprocess_controller.store.postgres import PostgresStore
        store = PostgresStore(location, schema=prefix)
    else:
        from flask_multiprocess_controller.store.redis import RedisStore
        store = RedisStore(location, prefix=prefix)
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit("never told to start")
        time.sleep(0.005)
    time.sleep(0.3)  # let the parent block first
    row = {"uuid": str(uuid.uuid4()), "controller": controller, "status": "queued", "priority": 0, "args": {},
           "created_at": time.time(), "timeout": None, "attempt": 0, "stop_requested": False}
    (event,) = store.enqueue([row], -1, emitter="writer-process")
    store.close()
    print(json.dumps({"uuid": row["uuid"], "cursor": event["cursor"]}))
""")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("foreign_only, without_progress", [(False, False), (True, False), (True, True)],
                         ids=["plain", "foreign-only", "follower"])
def test_waiting_changes_wake_when_another_process_writes(shared_store, tmp_path, foreign_only, without_progress):
    since = shared_store.latest_cursor()
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", _WRITE_SCRIPT, *location(shared_store), CTL, str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        go.touch()
        started = time.monotonic()
        found = shared_store.changes(since, timeout=30.0, foreign_only=foreign_only,
                                     without_progress=without_progress)
        waited = time.monotonic() - started
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert proc.returncode == 0, err[-2000:]
    written = json.loads(out.strip().splitlines()[-1])
    assert [(e["uuid"], e["cursor"], e["emitter"]) for e in found.events] == \
        [(written["uuid"], written["cursor"], "writer-process")]
    assert waited < 15.0


@pytest.mark.timeout(30)
def test_a_read_without_progress_leaves_them_out_and_waits_through_them(store):
    """What a runtime's follower reads: no progress events (the cursor moves past them), and a wait that
    progress writes do not end with nothing; a reader of everything still gets them all."""
    [uuid] = add(store)
    claim(store)
    since = store.latest_cursor()
    store.progress(uuid, OWNER, 1, None)
    found = store.changes(since, without_progress=True)
    assert found == Changes([], store.latest_cursor(), False)
    failures: list[BaseException] = []

    def write_later() -> None:
        try:
            time.sleep(0.3)  # let the reader block first
            for n in range(2, 6):
                store.progress(uuid, OWNER, n, None)
                time.sleep(0.05)
            store.request_stop(uuid)
        except BaseException as exc:  # reported below
            failures.append(exc)

    writer = threading.Thread(target=write_later, name="feed-writer")
    writer.start()
    try:
        later = store.changes(found.cursor, timeout=20.0, without_progress=True)
    finally:
        writer.join(30)
    assert failures == []
    assert [e["kind"] for e in later.events] == ["stopping"]
    assert later.cursor == later.events[0]["cursor"] == store.latest_cursor() and not later.reset
    assert [e["kind"] for e in store.changes(since).events] == ["progress"] * 5 + ["stopping"]


@pytest.mark.timeout(30)
def test_a_foreign_only_read_still_returns_this_process_s_own_events(store):
    # The hint lets a store skip waking for local writes, never hide them from the reader.
    since = store.latest_cursor()
    (event,) = store.enqueue([make_row()], -1, emitter="here")
    found = store.changes(since, timeout=5.0, foreign_only=True)
    assert [e["cursor"] for e in found.events] == [event["cursor"]]
    assert store.changes(found.cursor, timeout=0.1, foreign_only=True).events == []


def wait_past(store: TaskStore, event: Event) -> None:
    """Return once the store's clock is past ``event`` (so a retention of 0 covers it)."""
    wait_until(lambda: store.now() > event["at"] + 0.002, timeout=5.0, interval=0.001)


@pytest.mark.timeout(30)
def test_a_cursor_whose_events_were_pruned_gives_a_reset(store):
    since = store.latest_cursor()
    events = store.enqueue([make_row() for _ in range(3)], -1)
    claim(store)
    events.append(store.start(events[0]["uuid"], OWNER, 1, 1.0))  # a callback event: in the outbox
    assert store.unacked(CTL) == [events[-1]]
    wait_past(store, events[-1])
    store.event_retention = 0.0
    assert store.purge(CTL, 0.0) == 0  # no task to purge, but old events go
    latest = store.latest_cursor()
    assert latest == events[-1]["cursor"]  # pruning keeps the latest cursor
    for pruned in (since, events[0]["cursor"], events[2]["cursor"]):
        assert store.changes(pruned) == Changes([], latest, True)
        assert store.changes(pruned, timeout=10.0) == Changes([], latest, True)  # at once
    assert store.changes(latest) == Changes([], latest, False)  # nothing after it was lost
    assert store.unacked(CTL) == [events[-1]]  # the outbox keeps its entries: it has a retention of its own
    store.event_retention = 3600.0
    later = store.progress(events[0]["uuid"], OWNER, 1, None)
    assert store.changes(latest) == Changes([later], later["cursor"], False)


@pytest.mark.timeout(30)
def test_events_beyond_max_events_are_pruned_oldest_first(store):
    since = store.latest_cursor()
    store.max_events = 3
    events = store.enqueue([make_row() for _ in range(6)], -1)
    store.purge(CTL, 0.0)
    assert store.changes(since).reset is True
    assert store.changes(events[1]["cursor"]).reset is True
    kept = store.changes(events[2]["cursor"])
    assert (kept.events, kept.reset) == (events[3:], False)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("garbage", ["", "garbage", "-1", "1.5", "  3", "0x10", "1-2-3", "9" * 30,
                                     "123456789", "99999999999999-0", "18446744073709551616-0", "١٢"])
def test_a_cursor_that_is_not_one_of_the_stores_gives_a_reset(store, garbage):
    add(store, 2)
    latest = store.latest_cursor()
    assert store.changes(garbage) == Changes([], latest, True)
    assert store.changes(garbage, timeout=10.0) == Changes([], latest, True)  # at once, no exception
    store.ack(CTL, [garbage])  # ignored


@pytest.mark.timeout(30)
def test_the_feed_and_the_outbox_survive_a_new_store_object(shared_store):
    since = shared_store.latest_cursor()
    (uuid,) = add(shared_store)
    claim(shared_store)
    started = shared_store.start(uuid, OWNER, 7, 7.0)
    ended = shared_store.finish(uuid, "failed", owner=OWNER)
    written = shared_store.changes(since).events
    other = reopen(shared_store)
    try:
        assert other.latest_cursor() == shared_store.latest_cursor() == ended["cursor"]
        assert other.changes(since) == Changes(written, ended["cursor"], False)
        assert other.unacked(CTL) == [started, ended]
        other.ack(CTL, [started["cursor"]])
        assert shared_store.unacked(CTL) == [ended]
        wait_past(shared_store, ended)
        shared_store.event_retention = 0.0
        shared_store.purge(CTL, 0.0)
        assert other.changes(since).reset is True  # the pruned mark is stored too
        assert other.changes(ended["cursor"]) == Changes([], ended["cursor"], False)
    finally:
        other.close()


# -- the callback outbox ----------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_the_outbox_keeps_callback_events_until_acknowledged(store):
    assert CALLBACK_KINDS == {"started", "ended"}
    running, stopped, stopping = add(store, 3)
    since = store.latest_cursor()
    (elsewhere,) = add(store, 1, controller=OTHER)
    claim(store)
    started = store.start(running, OWNER, 1, 1.0)
    store.progress(running, OWNER, 1, None)  # not a callback kind
    ended = store.finish(running, "succeeded", owner=OWNER)
    stopped_event = store.request_stop(stopped)[1]
    claim(store)
    store.request_stop(stopping)  # "stopping": not a callback kind
    claim(store, controller=OTHER)
    other_started = store.start(elsewhere, OWNER, 2, 2.0)
    written = store.changes(since).events
    assert store.unacked(CTL) == [started, ended, stopped_event]
    assert store.unacked(CTL, limit=2) == [started, ended]
    assert store.unacked(OTHER) == [other_started]
    assert store.unacked("nobody") == []
    assert (store.callbacks_pending(CTL), store.callbacks_pending(OTHER), store.callbacks_pending("nobody")) == (3, 1, 0)
    store.ack(CTL, [started["cursor"], other_started["cursor"], "garbage"])  # another controller's: ignored
    assert store.unacked(CTL) == [ended, stopped_event]
    assert store.callbacks_pending(CTL) == 2
    assert store.unacked(OTHER) == [other_started]
    store.ack(CTL, iter([ended["cursor"], stopped_event["cursor"], ended["cursor"]]))
    assert store.unacked(CTL) == []
    store.ack(CTL, [])
    assert store.changes(since).events == written  # acknowledging leaves the feed alone


# -- lean events, the feed's bounds, the outbox's own retention, reads by tenant and by bytes ---------------

def test_events_carry_what_changed_never_the_arguments(store):
    big = {"blob": "x" * 100_000}
    since = store.latest_cursor()
    (uuid,) = add(store, args=big)
    claim(store)
    assert store.save_state(uuid, OWNER, {"saved": "y" * 10_000})
    store.start(uuid, OWNER, 4242, 1.5)
    progressed = store.progress(uuid, OWNER, {"step": 3}, 30.0)
    store.pause(uuid)
    store.resume(uuid)
    stopping = store.request_stop(uuid)[1]
    store.requeue(uuid, owner=OWNER)
    claim(store)
    store.finish(uuid, "succeeded", owner=OWNER, result=[1])
    store.purge(CTL, store.now() + 1.0)
    feed = store.changes(since, limit=100).events
    assert [e["kind"] for e in feed] == ["queued", "started", "progress", "paused", "resumed", "stopping",
                                         "requeued", "ended", "purged"]
    for event in feed + [progressed, stopping]:
        task = event["task"]
        assert BASE_KEYS <= set(task), (event["kind"], sorted(BASE_KEYS - set(task)))
        assert "args" not in task and "state" not in task, event["kind"]
        assert (task["uuid"], task["controller"], task["attempt"] >= 1 or event["kind"] == "queued") == \
            (uuid, CTL, True)
        assert len(json.dumps(event)) < 2000, event["kind"]  # what changed: never the inputs
    progress_events = [e for e in feed if e["kind"] == "progress"] + [progressed]
    for event in progress_events:
        assert set(event["task"]) == BASE_KEYS | {"progress", "percent", "state_saved_at", "memory_peak", "cpu_time"}
        assert (event["task"]["progress"], event["task"]["percent"], event["task"]["pid"]) == ({"step": 3}, 30.0, 4242)
    assert store.get(uuid) is None and fetch_events_task_keys(feed, "purged") == BASE_KEYS


def fetch_events_task_keys(feed: list, kind: str) -> set:
    (event,) = [e for e in feed if e["kind"] == kind]
    return set(event["task"])


def footprint(store: TaskStore) -> int:
    """The bytes the store's change feed takes where it lives: the SQLite file and its WAL, the Redis
    stream's memory, the memory store's events as JSON."""
    if isinstance(store, SQLiteStore):
        return sum(os.path.getsize(store.path + suffix) for suffix in ("", "-wal") if os.path.exists(store.path + suffix))
    if isinstance(store, RedisStore):
        client = redis.Redis.from_url(store.url)
        try:
            return int(client.memory_usage(store.prefix + "events", samples=0) or 0)
        finally:
            client.close()
    if isinstance(store, PostgresStore):  # the events' table with its TOAST and indexes (dead rows included)
        return int(store._query(f"SELECT pg_total_relation_size('{store.schema}.events')")[0][0])
    kept = store.changes(str(store._pruned), limit=10 ** 9).events  # type: ignore[attr-defined]
    return len(json.dumps(kept))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("store", ["memory", pytest.param("sqlite", marks=pytest.mark.slow), "redis", "postgres"],
                         indirect=True)
def test_ten_thousand_progress_events_of_a_task_with_a_900_kb_argument_take_less_than_10_mb(store):
    (uuid,) = add(store, args={"blob": "x" * 900_000})
    claim(store)
    before = footprint(store)
    for n in range(1, 10_001):
        assert store.progress(uuid, OWNER, {"step": n}, n / 100) is not None
        if n in (20, 200, 2_000, 10_000):  # early checks: a feed that copies the argument fails at once
            grown = footprint(store) - before
            assert grown < 10 * 1024 * 1024, (n, grown)


def kept_events(store: TaskStore, cursors: list) -> list:
    """The events the feed still has of those written (by their cursors), read from the oldest kept."""
    for i, cursor in enumerate(cursors):
        if not store.changes(cursor).reset:
            return store.changes(cursor, limit=10 ** 6).events if i else []
    return []


@pytest.mark.timeout(60)
def test_every_write_prunes_the_feed_to_its_byte_bound(store):
    (uuid,) = add(store)
    claim(store)
    store.max_event_bytes = 50_000
    written = [store.progress(uuid, OWNER, {"blob": "p" * 5_000, "n": n}, None) for n in range(100)]
    cursors = [e["cursor"] for e in written]
    assert store.changes(cursors[0]).reset is True  # pruned as written: no purge was needed
    kept = kept_events(store, cursors)
    assert kept and kept[-1] == written[-1]  # the newest are kept
    assert sum(len(json.dumps(e["task"])) for e in kept) <= 50_000
    assert len(kept) >= 5  # and as many of them as fit
    store.max_events = 10  # the count bound too, as written
    more = [store.progress(uuid, OWNER, n, None) for n in range(30)]
    assert store.changes(more[-12]["cursor"]).reset is True
    assert store.changes(more[-10]["cursor"]).events == more[-9:]


@pytest.mark.timeout(60)
def test_the_outbox_keeps_a_callback_whatever_the_feed_prunes(store):
    store.max_events = 50
    (uuid,) = add(store)
    claim(store)
    started = store.start(uuid, OWNER, 1, 1.0)
    for n in range(60):  # progress events never count towards the outbox
        store.progress(uuid, OWNER, n, None)
    store.purge(CTL, 0.0)
    assert store.changes(started["cursor"]).reset is True  # the feed let it go ...
    assert store.unacked(CTL) == [started]  # ... the outbox did not
    wait_past(store, started)
    store.event_retention = 0.0
    store.purge(CTL, 0.0)
    assert store.unacked(CTL) == [started]
    assert store.callbacks_dropped(CTL) == 0


@pytest.mark.timeout(60)
def test_callbacks_older_than_their_max_age_are_dropped_and_counted(store):
    old, new = add(store, 2)
    (elsewhere,) = add(store, controller=OTHER)
    claim(store)
    claim(store, controller=OTHER)
    first = store.start(old, OWNER, 1, 1.0)
    ended = store.finish(old, "failed", owner=OWNER)
    other = store.start(elsewhere, OWNER, 2, 2.0)
    wait_past(store, ended)
    wait_past(store, other)
    claim(store)
    fresh = store.start(new, OWNER, 3, 3.0)
    assert store.expire_callbacks(CTL, 3600.0) == []
    age = store.now() - ended["at"]
    assert store.expire_callbacks(CTL, age / 2) in ([first, ended], [first, ended, fresh])
    assert store.unacked(CTL) in ([fresh], [])
    assert store.callbacks_dropped(CTL) == 3 - len(store.unacked(CTL))
    assert store.unacked(OTHER) == [other] and store.callbacks_dropped(OTHER) == 0  # one controller's only
    assert store.callbacks_dropped("nobody") == 0


@pytest.mark.timeout(60)
def test_a_feed_read_for_one_tenant_is_filtered_in_the_store_and_moves_past_the_others(store):
    since = store.latest_cursor()
    rows = [dict(make_row(), tenant=tenant) for tenant in ("a", "b", None, "a", "b", "a")]
    written = store.enqueue(rows, -1)
    mine = [e for e in written if e["task"]["tenant"] == "a"]
    found = store.changes(since, tenant="a")
    assert found.events == mine and found.reset is False
    assert store.changes(since, tenant=None).events == [written[2]]
    assert store.changes(since, tenant="nobody").events == []
    first = store.changes(since, limit=2, tenant="a")
    assert (first.events, first.cursor) == (mine[:2], mine[1]["cursor"])
    assert store.changes(first.cursor, tenant="a").events == mine[2:]
    # Other tenants' events only: the cursor moves past them, so the reader does not read them again.
    latest = store.latest_cursor()
    others = store.enqueue([dict(make_row(), tenant="b") for _ in range(5)], -1)
    quiet = store.changes(latest, tenant="a")
    assert quiet.events == [] and quiet.reset is False
    assert quiet.cursor == others[-1]["cursor"] == store.latest_cursor()
    started = time.monotonic()
    assert store.changes(latest, timeout=0.3, tenant="a").events == []  # waits, then answers empty
    assert time.monotonic() - started < 20
    later = store.enqueue([dict(make_row(), tenant="a")], -1)
    assert store.changes(quiet.cursor, tenant="a").events == later


@pytest.mark.timeout(60)
def test_the_system_s_tenant_and_tenants_with_nul_or_backslashes_are_kept_as_given(store):
    """The tasks no request made carry SYSTEM_TENANT, which starts with NUL (a hook's answer that does gets
    one more): a store whose text cannot hold NUL still takes, returns and filters by them as they are."""
    tenants = [SYSTEM_TENANT, hook_tenant(SYSTEM_TENANT), "a\\0b", "a\x00b", "\\", None]
    since = store.latest_cursor()
    written = store.enqueue([dict(make_row(), tenant=tenant) for tenant in tenants], -1)
    assert [e["task"]["tenant"] for e in written] == tenants
    assert [store.get(e["uuid"])["tenant"] for e in written] == tenants
    assert [t["tenant"] for t in reversed(store.list_tasks(CTL))] == tenants
    for tenant, event in zip(tenants, written):
        assert [t["uuid"] for t in store.list_tasks(CTL, tenant=tenant)] == [event["uuid"]], tenant
        assert store.counts(CTL, tenant=tenant) == {"queued": 1}, tenant
        assert store.changes(since, tenant=tenant).events == [event], tenant


@pytest.mark.timeout(60)
def test_a_feed_read_is_bounded_by_bytes_with_at_least_one_event(store):
    (uuid,) = add(store)
    claim(store)
    since = store.latest_cursor()
    written = [store.progress(uuid, OWNER, "p" * 1_000, None) for _ in range(6)]
    size = len(json.dumps(written[0]["task"]))
    assert size > 1_000
    batch = store.changes(since, max_bytes=2 * size + 1)
    assert (batch.events, batch.cursor) == (written[:3], written[2]["cursor"])  # stops once it reached it
    assert store.changes(batch.cursor, max_bytes=1).events == written[3:4]  # always one
    assert store.changes(since, max_bytes=10 ** 9).events == written
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            store.changes(since, max_bytes=bad)


# -- the store clock inside claim -------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_claim_takes_started_at_inside_its_atomic_step(store):
    """With one slot, each claim succeeds only after the finish that freed the slot committed: its
    started_at, read inside the claim's atomic step, is never earlier than that finish's ended_at."""
    uuids = add(store, 15)
    claimed: list[dict] = []
    ended_at: dict[str, float] = {}
    failures: list[BaseException] = []
    deadline = time.monotonic() + 40

    def claimer() -> None:
        try:
            while len(claimed) < len(uuids) and time.monotonic() < deadline:
                row = store.claim(CTL, "claimer", 1)
                if row is None:
                    time.sleep(0.001)
                else:
                    claimed.append(row)
        except BaseException as exc:  # reported below
            failures.append(exc)

    def finisher() -> None:
        try:
            while len(ended_at) < len(uuids) and time.monotonic() < deadline:
                for row in store.active(CTL):
                    event = store.finish(row["uuid"], "succeeded")  # ended_at: the store's clock
                    if event is not None:
                        ended_at[row["uuid"]] = event["task"]["ended_at"]
                time.sleep(0.001)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=claimer, name="claimer"), threading.Thread(target=finisher, name="finisher")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50)
    assert failures == []
    assert sorted(r["uuid"] for r in claimed) == sorted(uuids) == sorted(ended_at)
    for previous, row in zip(claimed, claimed[1:]):
        assert row["started_at"] >= ended_at[previous["uuid"]], (previous["uuid"], row["uuid"])
    for row in claimed:
        assert row["started_at"] <= ended_at[row["uuid"]]


# -- list paging ------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_list_tasks_pages_with_before(store):
    uuids = add(store, 9)
    for _ in range(3):
        claim(store)  # uuids[0..2] running
    stop(store, uuids[1])  # stopping
    for uuid in (uuids[3], uuids[6]):
        stop(store, uuid)  # stopped
    newest_first = list(reversed(uuids))

    def pages(statuses: Optional[list[str]], size: int) -> list[list[str]]:
        found, before = [], None
        while page := store.list_tasks(CTL, statuses, limit=size, before=before):
            found.append([r["uuid"] for r in page])
            before = page[-1]["seq"]
        return found

    assert pages(None, 4) == [newest_first[:4], newest_first[4:8], newest_first[8:]]
    queued_or_stopped = [u for u in newest_first if u not in uuids[:3]]
    assert pages(["queued", "stopped"], 2) == [queued_or_stopped[i:i + 2] for i in range(0, 6, 2)]
    assert pages(["stopped", "running", "stopping"], 10) == \
        [[uuids[6], uuids[3], uuids[2], uuids[1], uuids[0]]]
    seq = {u: fetch(store, u)["seq"] for u in uuids}
    assert [r["uuid"] for r in store.list_tasks(CTL, ["queued"], limit=2, before=seq[uuids[7]])] == \
        [uuids[5], uuids[4]]
    assert store.list_tasks(CTL, before=seq[uuids[0]]) == []
    assert store.list_tasks(CTL, ["queued"], before=seq[uuids[0]]) == []
    assert [r["uuid"] for r in store.list_tasks(CTL, ["running"], before=seq[uuids[8]])] == [uuids[2], uuids[0]]


# -- finish()'s arguments are checked once, in the base class ----------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("status, fields", [
    ("succeeded", {"bogus": 1}), ("succeeded", {"seq": 5}), ("succeeded", {"owner_id": "x"}),
    ("succeeded", {"result": 1, "attempt": 3}), ("running", {}), ("queued", {}), ("stopping", {}), ("done", {}),
], ids=repr)
def test_finish_rejects_unknown_fields_and_non_terminal_statuses(store, status, fields):
    assert type(store).finish is TaskStore.finish  # the backends implement _finish only
    (uuid,) = add(store)
    claim(store)
    latest = store.latest_cursor()
    with pytest.raises(ValueError):
        store.finish(uuid, status, **fields)
    with pytest.raises(ValueError):
        store.finish(uuid, status, owner=OWNER, emitter="x", **fields)
    assert status_of(store, uuid) == "running"
    assert store.latest_cursor() == latest


# -- driver errors ----------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_locked_sqlite_file_gives_store_unavailable_until_released(tmp_path):
    path = tmp_path / "locked.sqlite3"
    store = SQLiteStore(str(path), busy_timeout=0.1)
    locker = sqlite3.connect(str(path), isolation_level=None)
    try:
        (queued,) = add(store)
        locker.execute("BEGIN EXCLUSIVE")
        for write in (lambda: add(store), lambda: claim(store), lambda: store.heartbeat("x"),
                      lambda: store.request_stop(queued), lambda: store.purge(CTL, 1e12)):
            with pytest.raises(StoreUnavailable) as info:
                write()
            assert isinstance(info.value, StoreError) and info.value.retry_after >= 1
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
            assert "locked" in str(info.value.__cause__)
        assert store.get(queued)["status"] == "queued"  # readers are not blocked in WAL mode
        locker.execute("ROLLBACK")
        add(store)  # works again, on fresh connections
        assert claim(store)["uuid"] == queued
        assert counts(store) == {"queued": 1, "running": 1}
        with pytest.raises(QueueFull):  # domain errors pass unchanged
            add(store, 1, max_queued=1)
    finally:
        locker.close()
        store.close()


@pytest.mark.timeout(30)
def test_a_file_that_is_not_a_database_gives_store_error(tmp_path):
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"this is not a SQLite database\n" * 200)
    with pytest.raises(StoreError) as info:
        SQLiteStore(str(path))
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def start_redis(port: int) -> subprocess.Popen:
    """A redis-server of this test only, on ``port``, ready to answer."""
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, retry=None)
    try:
        wait_until(lambda: proc.poll() is not None or _pings(client), timeout=10.0)
    finally:
        client.close()
    assert proc.poll() is None, "redis-server did not start"
    return proc


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def stop_redis(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def own_redis() -> Iterator[tuple[int, Callable[[], subprocess.Popen]]]:
    """A free port and a starter of redis-servers on it; whatever was started is stopped at the end."""
    port = free_port()
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        started.append(start_redis(port))
        return started[-1]

    yield port, start
    for proc in started:
        if proc.poll() is None:
            stop_redis(proc)


@pytest.mark.timeout(120)
def test_a_stopped_redis_gives_store_unavailable_until_it_is_back(own_redis):
    port, start = own_redis
    url = f"redis://127.0.0.1:{port}/0"
    server = start()
    store = RedisStore(url, prefix="down:")
    try:
        add(store)
        since = store.latest_cursor()
        stop_redis(server)
        for call in (lambda: add(store), lambda: store.get("x"), lambda: store.changes(since, timeout=0.5),
                     lambda: store.heartbeat("x")):
            with pytest.raises(StoreUnavailable) as info:
                call()
            assert isinstance(info.value.__cause__, redis.ConnectionError)
        with pytest.raises(StoreUnavailable):
            RedisStore(url, prefix="down:")
        start()  # an empty server (no persistence): the scripts must be loaded again
        (uuid,) = add(store)
        assert claim(store)["uuid"] == uuid
        assert store.start(uuid, OWNER, 1, 1.0)["kind"] == "started"
        assert counts(store) == {"running": 1}
    finally:
        store.close()


@pytest.mark.timeout(30)
def test_a_redis_error_reply_gives_store_error(redis_server):
    store = RedisStore(redis_server, prefix=f"wrongtype-{uuid_module.uuid4().hex}:")
    client = redis.Redis.from_url(redis_server)
    # Keys of the wrong type, which the scripts' first commands touch (a script that fails halfway
    # is not rolled back: Redis scripts are atomic, not transactional).
    broken = [f"{store.prefix}events", f"{store.prefix}c:{CTL}:q"]
    try:
        for key in broken:
            client.set(key, "not what the store keeps here")
        for call in (store.latest_cursor, lambda: store.changes("0-0"), lambda: add(store)):
            with pytest.raises(StoreError) as info:
                call()
            assert not isinstance(info.value, StoreUnavailable)
            assert isinstance(info.value.__cause__, redis.ResponseError)
        client.delete(*broken)
        assert store.list_tasks(CTL) == []  # nothing was half written
        add(store)
        assert counts(store) == {"queued": 1}
    finally:
        client.close()
        store.close()


# -- SQLite file permissions ------------------------------------------------------------------------------

def modes(path: Path) -> dict[str, int]:
    """The permission bits of the database file and of its -wal and -shm files."""
    files = {suffix: Path(f"{path}{suffix}") for suffix in ("", "-wal", "-shm")}
    assert all(f.exists() for f in files.values()), [s for s, f in files.items() if not f.exists()]
    return {suffix: stat.S_IMODE(os.stat(f).st_mode) for suffix, f in files.items()}


@pytest.mark.timeout(30)
def test_sqlite_file_of_an_older_version_gets_the_saved_state_columns(tmp_path):
    path = tmp_path / "old.sqlite3"
    SQLiteStore(str(path)).close()
    with sqlite3.connect(path) as db:  # the table as a version before saved states made it
        db.execute("ALTER TABLE mpc_tasks DROP COLUMN state")
        db.execute("ALTER TABLE mpc_tasks DROP COLUMN state_saved_at")
    store = SQLiteStore(str(path))
    (uuid,) = add(store)
    claim(store)
    assert store.save_state(uuid, OWNER, {"resume_at": 3})
    assert store.get(uuid)["state"] == {"resume_at": 3}
    store.close()


@pytest.mark.timeout(30)
def test_sqlite_files_are_created_0600(tmp_path):
    path = tmp_path / "private.sqlite3"
    store = SQLiteStore(str(path))
    try:
        add(store)  # the pooled connection keeps -wal and -shm in place
        assert modes(path) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
    finally:
        store.close()


@pytest.mark.timeout(30)
def test_sqlite_url_mode_sets_the_files_permissions(tmp_path):
    path = tmp_path / "group.sqlite3"
    store = resolve_store(f"sqlite:///{path}?mode=0640")
    try:
        assert isinstance(store, SQLiteStore) and store.path == str(path)
        add(store)
        assert modes(path) == {"": 0o640, "-wal": 0o640, "-shm": 0o640}
    finally:
        store.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("query", ["mode=999", "mode=abc", "mode=", "mode=01777", "mode=-600", "other=1",
                                   "mode=0600&mode=0640x"])
def test_a_bad_sqlite_url_option_gives_store_error(tmp_path, query):
    with pytest.raises(StoreError):
        resolve_store(f"sqlite:///{tmp_path}/bad.sqlite3?{query}")
    assert not (tmp_path / "bad.sqlite3").exists()


@pytest.mark.timeout(30)
def test_requeue_can_take_the_claim_back(store):
    [uuid] = add(store)
    assert claim(store)["attempt"] == 1
    event = store.requeue(uuid, owner="owner-1", uncount=True)
    assert event["kind"] == "requeued" and event["task"]["attempt"] == 0
    assert fetch(store, uuid)["status"] == "queued" and fetch(store, uuid)["attempt"] == 0
    assert claim(store)["attempt"] == 1, "the claim given back did not count"
    store.requeue(uuid, owner="owner-1")
    assert claim(store)["attempt"] == 2
