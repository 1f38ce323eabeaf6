"""The store contract's operations for task policies (version 3, store/base.py), on every backend.

The backends of tests/test_store_contract.py (its ``BACKENDS``: memory, SQLite, Redis): retries that wait
out of the ready queue, pause and resume, re-prioritising, stop-all, leases and schedule firings.
"""
from __future__ import annotations

import sqlite3
import threading
import time
import uuid as uuid_module
from pathlib import Path

import pytest

from flask_multiprocess_controller import (
    InvalidTransition, QueueFull, SQLiteStore, TaskAlreadyFinished, TaskNotFound,
)
from flask_multiprocess_controller.store.base import FireOutcome

from conftest import wait_until
from test_store_contract import (
    BACKENDS, CTL, OTHER, OWNER, SHARED_BACKENDS, _env, add, claim, counts, fetch, make_row, reopen, status_of, stop,
)

ERROR = {"type": "ValueError", "message": "boom", "traceback": None}


@pytest.fixture(params=list(BACKENDS))
def store(request, tmp_path, redis_server):
    made = BACKENDS[request.param](_env(request, tmp_path, redis_server))
    yield made
    made.close()


@pytest.fixture(params=SHARED_BACKENDS)
def shared_store(request, tmp_path, redis_server):
    made = BACKENDS[request.param](_env(request, tmp_path, redis_server))
    yield made
    made.close()


def running(store, n: int = 1) -> list[str]:
    """Queue ``n`` tasks and claim them all; return their uuids."""
    uuids = add(store, n)
    for _ in uuids:
        claim(store)
    return uuids


# -- retries ------------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_retry_queues_an_attempt_again_out_of_the_ready_queue_until_its_time(store):
    (uuid,) = running(store)
    store.start(uuid, OWNER, 4242, 1.5)
    before = store.now()
    event = store.retry(uuid, 0.6, owner=OWNER, errors=[ERROR])
    after = store.now()
    assert event["kind"] == "requeued" and event["emitter"] == OWNER and event["uuid"] == uuid
    row = fetch(store, uuid)
    assert event["task"]["status"] == row["status"] == "queued"
    assert row["attempt"] == 1, "the next claim counts the attempt"
    assert before + 0.6 <= row["retry_at"] <= after + 0.6
    assert row["errors"] == [ERROR] and row["error"] is None
    assert (row["owner"], row["pid"], row["pid_created"], row["started_at"]) == (None, None, None, None)
    assert store.position(row) is None, "a task waiting for its retry has no place in the queue yet"
    assert store.next_retry_at(CTL) == row["retry_at"]
    assert store.next_retry_at(OTHER) is None
    assert claim(store) is None, "claimed before its retry_at"
    assert counts(store) == {"queued": 1}
    time.sleep(max(0.0, row["retry_at"] - store.now()) + 0.05)
    again = claim(store)
    assert again["uuid"] == uuid and again["attempt"] == 2 and again["retry_at"] is None
    assert again["errors"] == [ERROR]
    assert store.next_retry_at(CTL) is None


@pytest.mark.timeout(30)
def test_a_waiting_retry_never_blocks_ready_tasks_behind_it(store):
    (first,) = add(store, priority=-10)
    claim(store)
    store.retry(first, 30.0, owner=OWNER)
    later = add(store, 3, priority=0)
    assert [store.position(fetch(store, u)) for u in later] == [1, 2, 3]
    assert [claim(store)["uuid"] for _ in later] == later
    assert claim(store) is None
    assert status_of(store, first) == "queued"


@pytest.mark.timeout(30)
def test_retries_are_never_refused_by_the_queue_bound_but_count_in_it(store):
    running(store, 2)
    add(store, 1, max_queued=1)
    for row in store.active(CTL):
        assert store.retry(row["uuid"], 10.0, owner=OWNER) is not None
    assert counts(store) == {"queued": 3}
    with pytest.raises(QueueFull):
        add(store, 1, max_queued=3)


@pytest.mark.timeout(30)
def test_retry_writes_nothing_for_a_stop_requested_a_foreign_or_an_inactive_task(store):
    stopping, fenced, queued = add(store, 3)
    claim(store)
    claim(store, owner="someone-else")
    stop(store, stopping)
    latest = store.latest_cursor()
    assert store.retry(stopping, 0.0, owner=OWNER) is None, "a stopped task never runs again"
    assert store.retry(fenced, 0.0, owner=OWNER) is None
    assert store.retry(queued, 0.0) is None
    assert store.retry(str(uuid_module.uuid4()), 0.0) is None
    assert store.latest_cursor() == latest
    assert [status_of(store, u) for u in (stopping, fenced, queued)] == ["stopping", "running", "queued"]
    with pytest.raises(ValueError):
        store.retry(fenced, 0.0, owner="someone-else", status="queued")


@pytest.mark.timeout(30)
def test_a_task_waiting_for_its_retry_can_be_stopped_and_never_runs(store):
    uuid, control = running(store, 2)
    store.retry(uuid, 0.1, owner=OWNER)
    row, event = store.request_stop(uuid)
    assert row["status"] == "stopped" and event["kind"] == "ended"
    # A task whose retry falls due later is claimed once due: the stopped task's retry time has passed by then.
    store.retry(control, 0.1, owner=OWNER)
    claimed = wait_until(lambda: claim(store), 10, interval=0.01)
    assert claimed["uuid"] == control
    assert claim(store) is None
    assert store.next_retry_at(CTL) is None


@pytest.mark.timeout(30)
def test_retry_state_survives_a_new_store_object(shared_store):
    (uuid,) = running(shared_store)
    shared_store.retry(uuid, 0.3, owner=OWNER, errors=[ERROR])
    other = reopen(shared_store)
    try:
        assert other.get(uuid)["errors"] == [ERROR]
        assert claim(other) is None
        time.sleep(0.4)
        assert claim(other)["attempt"] == 2
    finally:
        other.close()


# -- pause and resume ---------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_pause_and_resume_a_running_task(store):
    (uuid,) = running(store)
    add(store)
    row, event = store.pause(uuid, emitter="host-b")
    assert row["status"] == "paused" and event["kind"] == "paused" and event["emitter"] == "host-b"
    assert event["task"]["status"] == "paused"
    again, nothing = store.pause(uuid)
    assert again["status"] == "paused" and nothing is None, "pausing a paused task changes nothing"
    assert [r["uuid"] for r in store.active(CTL)] == [uuid]
    assert claim(store, max_running=1) is None, "a paused task keeps its slot"
    assert store.progress(uuid, OWNER, "still mine", None) is not None
    row, event = store.resume(uuid)
    assert row["status"] == "running" and event["kind"] == "resumed"
    assert store.resume(uuid)[1] is None
    assert store.pause(uuid)[0]["status"] == "paused"
    assert store.finish(uuid, "succeeded", owner=OWNER, result=1)["task"]["status"] == "succeeded"


@pytest.mark.timeout(30)
def test_pause_and_resume_refuse_tasks_they_do_not_apply_to(store):
    (stopping,) = running(store)
    stop(store, stopping)
    (finished,) = add(store)
    stop(store, finished)
    (waiting,) = add(store)
    latest = store.latest_cursor()
    for change in (store.pause, store.resume):
        with pytest.raises(TaskAlreadyFinished):
            change(finished)
        with pytest.raises(TaskNotFound):
            change(str(uuid_module.uuid4()))
        for uuid, status in ((stopping, "stopping"), (waiting, "queued")):
            with pytest.raises(InvalidTransition) as info:
                change(uuid)
            assert info.value.status == status and info.value.uuid == uuid and status in info.value.message
    assert store.latest_cursor() == latest, "a refused change writes no event"
    assert [status_of(store, u) for u in (stopping, finished, waiting)] == ["stopping", "stopped", "queued"]


@pytest.mark.timeout(30)
def test_stopping_a_paused_task_makes_it_stopping(store):
    (uuid,) = running(store)
    store.pause(uuid)
    row, event = store.request_stop(uuid)
    assert row["status"] == "stopping" and row["stop_requested"] and event["kind"] == "stopping"


# -- re-prioritise ------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_reprioritise_moves_a_queued_task_at_once(store):
    a, b, c = add(store, 3)
    row, event = store.reprioritise(c, -5, emitter="host-b")
    assert row["priority"] == -5 and event["kind"] == "queued" and event["task"]["priority"] == -5
    assert [store.position(fetch(store, u)) for u in (c, a, b)] == [1, 2, 3]
    store.reprioritise(a, 7)  # lowered: runs last
    assert [store.position(fetch(store, u)) for u in (c, b, a)] == [1, 2, 3]
    assert [claim(store)["uuid"] for _ in range(3)] == [c, b, a]
    with pytest.raises(InvalidTransition) as info:
        store.reprioritise(a, 0)
    assert info.value.status == "running"
    store.finish(a, "succeeded")
    with pytest.raises(TaskAlreadyFinished):
        store.reprioritise(a, 0)
    with pytest.raises(TaskNotFound):
        store.reprioritise(str(uuid_module.uuid4()), 0)


@pytest.mark.timeout(30)
def test_reprioritising_a_task_waiting_for_its_retry_keeps_it_waiting(store):
    (uuid,) = running(store)
    store.retry(uuid, 0.3, owner=OWNER)
    (other,) = add(store, priority=0)
    store.reprioritise(uuid, -100)
    assert claim(store)["uuid"] == other
    assert claim(store) is None
    time.sleep(0.4)
    (late,) = add(store, priority=0)
    assert claim(store)["uuid"] == uuid, "once due it runs at its new priority"
    assert claim(store)["uuid"] == late


# -- stop all -----------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_stop_all_stops_every_queued_running_and_paused_task_of_the_controller(store):
    run, paused, stopping, waiting = running(store, 4)
    store.pause(paused)
    stop(store, stopping)
    store.retry(waiting, 30.0, owner=OWNER)
    queued = add(store, 5)
    (done,) = add(store)
    stop(store, done)
    others = add(store, 2, controller=OTHER)
    events = store.stop_all(CTL, emitter="host-b")
    kinds = [e["kind"] for e in events]
    assert kinds == ["ended"] * 6 + ["stopping"] * 2, kinds
    assert {e["uuid"] for e in events} == {*queued, waiting, run, paused}
    assert all(e["emitter"] == "host-b" for e in events)
    for uuid in [*queued, waiting]:
        row = fetch(store, uuid)
        assert row["status"] == "stopped" and row["started_at"] is None and row["ended_at"] is not None
    assert status_of(store, run) == status_of(store, paused) == status_of(store, stopping) == "stopping"
    assert counts(store, OTHER) == {"queued": 2} and all(status_of(store, u) == "queued" for u in others)
    assert claim(store) is None
    assert store.stop_all(CTL) == []


# -- leases ---------------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_a_lease_has_one_holder_until_it_expires_or_is_released(store):
    assert store.acquire_lease("scheduler:x", "a", 0.3)
    assert not store.acquire_lease("scheduler:x", "b", 10.0)
    assert store.acquire_lease("scheduler:x", "a", 0.3), "the holder renews it"
    assert store.acquire_lease("scheduler:y", "b", 10.0), "leases are by name"
    time.sleep(0.45)
    assert store.acquire_lease("scheduler:x", "b", 10.0), "an expired lease is free"
    assert not store.acquire_lease("scheduler:x", "a", 10.0)
    store.release_lease("scheduler:x", "a")  # not the holder: no effect
    assert not store.acquire_lease("scheduler:x", "a", 10.0)
    store.release_lease("scheduler:x", "b")
    assert store.acquire_lease("scheduler:x", "a", 10.0)


@pytest.mark.timeout(60)
def test_a_free_lease_goes_to_exactly_one_of_many_contenders(shared_store):
    stores = [reopen(shared_store) for _ in range(4)]
    won: list[str] = []
    go = threading.Barrier(len(stores))

    def contend(i: int) -> None:
        go.wait()
        if stores[i].acquire_lease("scheduler:race", f"owner-{i}", 10.0):
            won.append(f"owner-{i}")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for other in stores:
        other.close()
    assert len(won) == 1, won


# -- schedules ------------------------------------------------------------------------------------------------

def scheduled_row(firing: float, name: str = "nightly") -> dict:
    row = make_row(args={"firing": firing})
    row["schedule"] = {"name": name, "firing": firing}
    return row


@pytest.mark.timeout(30)
def test_declaring_schedules_records_them_and_when(store):
    before = store.now()
    store.declare_schedules(CTL, {"nightly": {"cron": "0 3 * * *"}, "often": {"every": 5}}, "host-a")
    first = {s["name"]: s for s in store.schedules(CTL)}
    assert sorted(first) == ["nightly", "often"] and store.schedules(OTHER) == []
    nightly = first["nightly"]
    assert nightly["controller"] == CTL and nightly["spec"] == {"cron": "0 3 * * *"}
    assert before <= nightly["fired_until"] == nightly["seen_at"] <= store.now()
    assert (nightly["declared_by"], nightly["skipped"], nightly["last_fired"], nightly["last_task"],
            nightly["last_skipped"]) == ("host-a", 0, None, None, None)
    time.sleep(0.02)
    store.declare_schedules(CTL, {"nightly": {"cron": "0 4 * * *"}}, "host-b")
    again = {s["name"]: s for s in store.schedules(CTL)}
    assert again["nightly"]["spec"] == {"cron": "0 4 * * *"} and again["nightly"]["declared_by"] == "host-b"
    assert again["nightly"]["seen_at"] > nightly["seen_at"]
    assert again["nightly"]["fired_until"] == nightly["fired_until"], "re-declaring keeps what was fired"
    assert again["often"] == first["often"]


@pytest.mark.timeout(30)
def test_each_firing_is_handled_once_and_in_order(store):
    store.declare_schedules(CTL, {"nightly": {"cron": "0 3 * * *"}}, "host-a")
    start = store.schedules(CTL)[0]["fired_until"]
    assert store.fire(CTL, "nightly", start - 60, scheduled_row(start - 60), -1).outcome is FireOutcome.STALE
    row = scheduled_row(start + 1)
    fired = store.fire(CTL, "nightly", start + 1, row, -1, emitter="host-a")
    assert fired.outcome is FireOutcome.QUEUED and fired.event["kind"] == "queued"
    assert fired.event["emitter"] == "host-a" and isinstance(row["seq"], int)
    task = fetch(store, row["uuid"])
    assert task["status"] == "queued" and task["schedule"] == {"name": "nightly", "firing": start + 1}
    assert store.fire(CTL, "nightly", start + 1, scheduled_row(start + 1), -1) == (FireOutcome.STALE, None)
    assert store.fire(CTL, "nightly", start + 0.5, scheduled_row(start + 0.5), -1).outcome is FireOutcome.STALE
    state = store.schedules(CTL)[0]
    assert (state["fired_until"], state["last_fired"], state["last_task"]) == (start + 1, start + 1, row["uuid"])
    assert store.fire(CTL, "nightly", start + 2, None, -1) == (FireOutcome.MISSED, None)
    assert store.schedules(CTL)[0]["fired_until"] == start + 2
    assert counts(store) == {"queued": 1}
    assert store.fire(CTL, "undeclared", start + 3, scheduled_row(start + 3), -1).outcome is FireOutcome.STALE


@pytest.mark.timeout(30)
def test_a_firing_that_meets_a_full_queue_is_skipped_and_counted(store):
    store.declare_schedules(CTL, {"often": {"every": 1}}, "host-a")
    start = store.schedules(CTL)[0]["fired_until"]
    add(store, 2)
    fired = store.fire(CTL, "often", start + 1, scheduled_row(start + 1, "often"), 2)
    assert fired == (FireOutcome.FULL, None)
    state = store.schedules(CTL)[0]
    assert (state["skipped"], state["last_skipped"], state["fired_until"], state["last_task"]) == \
        (1, start + 1, start + 1, None)
    assert counts(store) == {"queued": 2}
    assert store.fire(CTL, "often", start + 2, scheduled_row(start + 2, "often"), 3).outcome is FireOutcome.QUEUED
    assert store.schedules(CTL)[0]["skipped"] == 1


@pytest.mark.timeout(60)
def test_a_firing_tried_by_many_processes_at_once_is_queued_once(shared_store):
    shared_store.declare_schedules(CTL, {"often": {"every": 1}}, "host-a")
    start = shared_store.schedules(CTL)[0]["fired_until"]
    stores = [reopen(shared_store) for _ in range(4)]
    outcomes: list[FireOutcome] = []
    go = threading.Barrier(len(stores))

    def fire_all(i: int) -> None:
        go.wait()
        for k in range(1, 11):
            outcomes.append(stores[i].fire(CTL, "often", start + k, scheduled_row(start + k, "often"), -1).outcome)

    threads = [threading.Thread(target=fire_all, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for other in stores:
        other.close()
    assert outcomes.count(FireOutcome.QUEUED) == 10 and len(outcomes) == 40
    firings = sorted(row["schedule"]["firing"] for row in shared_store.list_tasks(CTL, limit=100))
    assert firings == [start + k for k in range(1, 11)], "a firing was queued twice or never"


# -- backend specifics ----------------------------------------------------------------------------------------

def _old_sqlite_file(tmp_path: Path, later_columns: str = "") -> str:
    """A task table as the first release made it (plus ``later_columns``), holding one queued task ``u-old``."""
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(f"""
        CREATE TABLE mpc_tasks (seq INTEGER PRIMARY KEY AUTOINCREMENT, uuid TEXT NOT NULL UNIQUE,
            controller TEXT NOT NULL, status TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0,
            args TEXT NOT NULL, progress TEXT, percent REAL, result TEXT, error TEXT, created_at REAL NOT NULL,
            started_at REAL, ended_at REAL, pid INTEGER, pid_created REAL, exit_code INTEGER, owner TEXT,
            stop_requested INTEGER NOT NULL DEFAULT 0, timeout REAL, memory_peak INTEGER, cpu_time REAL,
            attempt INTEGER NOT NULL DEFAULT 0{later_columns});
        INSERT INTO mpc_tasks (uuid, controller, status, args, created_at) VALUES ('u-old', 'contract', 'queued',
            '{{}}', 1.0);
    """)
    old.close()
    return str(path)


@pytest.mark.timeout(30)
def test_a_sqlite_file_of_an_older_version_gets_the_new_columns(tmp_path):
    store = SQLiteStore(_old_sqlite_file(tmp_path))
    try:
        row = store.get("u-old")
        assert (row["retry_at"], row["errors"], row["schedule"]) == (None, None, None)
        assert store.position(row) == 1
        assert claim(store)["uuid"] == "u-old"
        assert store.retry("u-old", 0.0, owner=OWNER, errors=[ERROR]) is not None
        assert claim(store)["attempt"] == 2
    finally:
        store.close()


@pytest.mark.timeout(30)
def test_a_sqlite_file_of_an_older_version_gets_the_batch_column(tmp_path):
    store = SQLiteStore(_old_sqlite_file(tmp_path, ", retry_at REAL, errors TEXT, schedule TEXT, tenant TEXT"))
    try:
        assert store.get("u-old")["batch"] is None
        batch = uuid_module.uuid4().hex
        rows = [dict(make_row(), batch=batch) for _ in range(2)]
        store.enqueue(rows, -1)
        assert [r["uuid"] for r in store.batch("contract", batch)] == [r["uuid"] for r in rows]
    finally:
        store.close()
