"""The memory store on a fake clock: what the store's clock decides (retries coming due, leases
expiring, the times it stamps), stepped to the exact moment, with no sleep.

The same operations are checked on every backend, with real waits, in tests/test_store_policies.py.
"""
from __future__ import annotations

from flask_multiprocess_controller.store import MemoryStore

from fakes import FakeClock

CTL = "ctl"
OWNER = "owner-1"
ERROR = {"type": "ValueError", "message": "boom", "traceback": None}


def queued_row(uuid: str) -> dict:
    return {"uuid": uuid, "controller": CTL, "status": "queued", "priority": 0, "args": {}, "created_at": 1.0,
            "timeout": None, "attempt": 0, "stop_requested": False}


def setup(*uuids: str) -> tuple[FakeClock, MemoryStore]:
    clock = FakeClock(1000.0)
    store = MemoryStore(clock=clock)
    store.enqueue([queued_row(u) for u in uuids], -1)
    return clock, store


def test_the_store_stamps_its_own_clock() -> None:
    clock, store = setup("a")
    assert store.now() == 1000.0
    clock.advance(2.5)
    row = store.claim(CTL, OWNER, 1)
    assert row is not None and row["started_at"] == 1002.5
    clock.advance(1.0)
    event = store.finish("a", "succeeded", owner=OWNER)
    assert event is not None and event["at"] == event["task"]["ended_at"] == 1003.5


def test_a_retry_comes_due_at_its_retry_at_and_not_before() -> None:
    clock, store = setup("a")
    store.claim(CTL, OWNER, 1)
    store.retry("a", 30.0, owner=OWNER, errors=[ERROR])
    assert store.next_retry_at(CTL) == 1030.0
    clock.set(1029.999)
    assert store.claim(CTL, OWNER, 1) is None
    clock.set(1030.0)
    again = store.claim(CTL, OWNER, 1)
    assert again is not None and again["uuid"] == "a" and again["attempt"] == 2 and again["retry_at"] is None


def test_a_task_waiting_for_its_retry_that_was_stopped_never_comes_due() -> None:
    clock, store = setup("a")
    store.claim(CTL, OWNER, 1)
    store.retry("a", 0.1, owner=OWNER)
    row, event = store.request_stop("a")
    assert row["status"] == "stopped" and event is not None and event["kind"] == "ended"
    clock.advance(3600.0)
    assert store.claim(CTL, OWNER, 1) is None
    assert store.next_retry_at(CTL) is None


def test_a_lease_is_held_until_the_moment_it_expires() -> None:
    clock, store = setup()
    assert store.acquire_lease("scheduler:x", "a", 10.0)
    clock.advance(9.999)
    assert not store.acquire_lease("scheduler:x", "b", 10.0)
    assert store.acquire_lease("scheduler:x", "a", 10.0), "the holder renews it, from now"
    clock.advance(9.999)
    assert not store.acquire_lease("scheduler:x", "b", 10.0)
    clock.advance(0.001)
    assert store.acquire_lease("scheduler:x", "b", 10.0), "an expired lease is free"


def test_declaring_again_moves_seen_at_but_not_fired_until() -> None:
    clock, store = setup()
    store.declare_schedules(CTL, {"nightly": {"cron": "0 3 * * *"}}, "host-a")
    clock.advance(5.0)
    store.declare_schedules(CTL, {"nightly": {"cron": "0 4 * * *"}}, "host-b")
    (state,) = store.schedules(CTL)
    assert (state["fired_until"], state["seen_at"], state["declared_by"]) == (1000.0, 1005.0, "host-b")
