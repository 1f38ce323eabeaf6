"""Schedules: each firing queued exactly once by whichever serving process holds the lease.

Under ``gunicorn -w 3`` (SQLite and Redis) an ``every=1`` schedule queues one task a second, never two
for one firing, and when the worker that fires is killed another one takes over without a gap. In one
process: a firing that meets a full queue is skipped and counted, a schedule no serving process
declares any more shows as inactive, and missed firings are skipped or caught up once as ``catchup``
says (the scheduler driven round by round against a store whose clock the test moves).
"""
from __future__ import annotations

import logging
import signal
import time
from datetime import datetime

import psutil
import pytest
import requests

from conftest import wait_until
from flask_multiprocess_controller import InvalidArguments, MetaMPTask
from flask_multiprocess_controller.events import Event
from flask_multiprocess_controller.engine.schedules import ScheduleSpec, Scheduler
from flask_multiprocess_controller.store import MemoryStore, resolve_store
from flask_multiprocess_controller.store.redis import RedisStore

from serverproc import ServerPool, fork_servers, free_port, gunicorn, gunicorn_workers, poll_until

HTTP_TIMEOUT = 30.0
LEASE = 3.0

TICK_APP = '''
import os

from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask


class Tick(MetaMPTask):
    def execute(self, note: str = "") -> dict:
        return {"note": note, "pid": os.getpid()}


controller = MetaMPController(Tick, max_num_process=2, stop_grace=0.5, lease=float(os.environ["LEASE"]))
controller.schedule("tick", every=1, kwargs={"note": "tick"})
app = Flask(__name__)
Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))
'''


class Tick(MetaMPTask):
    def execute(self, note: str = "") -> str:
        return note


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store/tasks.sqlite3"
    return request.getfixturevalue(f"{request.param}_url")


def scheduled(base: str) -> list[dict]:
    """The tasks the schedule queued so far."""
    listing = requests.get(base + "/tasks", params={"limit": 1000}, timeout=HTTP_TIMEOUT).json()
    return [t for t in listing["tasks"] if t["schedule"]]


def firings(tasks: list[dict]) -> list[float]:
    """The firing times of scheduled tasks, in UNIX seconds, sorted."""
    return sorted(datetime.fromisoformat(t["schedule"]["firing"]).timestamp() for t in tasks)


def holder_pid(store_url: str) -> int:
    """The pid of the serving process that queued the latest scheduled task (the lease holder)."""
    store = resolve_store(store_url)
    try:
        events = store.changes("0-0" if isinstance(store, RedisStore) else "0", limit=10_000).events
    finally:
        store.close()
    emitter = [e["emitter"] for e in events if e["kind"] == "queued" and e["task"].get("schedule")][-1]
    return int(emitter.rpartition(":")[0].rpartition(":")[2])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_second_under_three_workers_queues_each_firing_once_even_across_a_failover(tmp_path, pool: ServerPool,
                                                                                         store_url):
    (tmp_path / "tick_app.py").write_text(TICK_APP)
    port = free_port()
    server = pool.start(gunicorn("-w", "3", "-b", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "tick_app:app"),
                        cwd=tmp_path, port=port, log_path=tmp_path / "gunicorn.log",
                        env={"MPC_STORE_URL": store_url, "LEASE": str(LEASE)}, ready_path="/tasks")
    poll_until(lambda: len(fork_servers(server)), lambda n: n == 3, 60, interval=0.1)
    poll_until(lambda: scheduled(server.base), bool, 20)

    before = len(scheduled(server.base))
    time.sleep(5.0)
    during = scheduled(server.base)
    assert 4 <= len(during) - before <= 6, f"{len(during) - before} tasks queued in 5 s by an every=1 schedule"
    seen = firings(during)
    assert len(seen) == len(set(seen)), "a firing was queued twice"
    assert seen == [seen[0] + i for i in range(len(seen))], f"firings skipped or off the second: {seen}"
    assert {t["args"]["note"] for t in during} == {"tick"}
    listing = requests.get(server.base + "/tasks", timeout=HTTP_TIMEOUT).json()
    assert listing["queued"] + listing["running"] <= 2, "the tasks do not run"

    # The worker that fires is killed: another takes the lease over once it lapses, and catches up.
    holder = psutil.Process(holder_pid(store_url))
    assert holder.pid in {w.pid for w in gunicorn_workers(server)}
    holder.kill()
    killed_at = time.time()
    poll_until(lambda: firings(scheduled(server.base))[-1], lambda last: last >= killed_at + LEASE + 2, 30)
    after = firings(scheduled(server.base))
    assert len(after) == len(set(after)), "a firing was queued twice across the failover"
    assert after == [after[0] + i for i in range(len(after))], f"a firing was lost across the failover: {after}"
    assert holder_pid(store_url) != holder.pid
    assert server.stop(signal.SIGTERM, timeout=30) == []


@pytest.mark.timeout(60)
def test_a_firing_that_meets_a_full_queue_is_skipped_logged_and_counted(make_controller, caplog):
    controller = make_controller(Tick, max_num_queue=0, lease=2.0)
    with caplog.at_level(logging.WARNING):
        controller.schedule("tick", every=1, kwargs={"note": "x"})
        state = wait_until(lambda: [s for s in controller.schedules() if s["skipped"] >= 2], 10)[0]
    assert state["active"] and state["last_skipped"] is not None and state["last_task"] is None, state
    assert controller.tasks()["tasks"] == []
    assert "the queue is full" in caplog.text


@pytest.mark.timeout(60)
def test_scheduled_tasks_carry_their_schedule_and_arguments(make_controller):
    controller = make_controller(Tick, lease=2.0)
    controller.schedule("tick", every=1, kwargs={"note": "hello"}, priority=-3)
    task = wait_until(lambda: controller.tasks(["succeeded"])["tasks"], 10)[0]
    assert task["schedule"]["name"] == "tick", task
    assert datetime.fromisoformat(task["schedule"]["firing"]).timestamp() % 1 == 0, "firings fall on the second"
    assert (task["args"], task["priority"], task["result"]) == ({"note": "hello"}, -3, "hello"), task
    [info] = controller.schedules()
    assert info["every"] == 1.0 and info["active"] and info["last_task"] is not None, info
    assert info["next_firing"] > info["last_firing"]
    with pytest.raises(InvalidArguments):
        controller.schedule("wrong", every=5, kwargs={"unknown": 1})
    with pytest.raises(ValueError):
        controller.schedule("wrong", cron="every day")
    assert [s["name"] for s in controller.schedules()] == ["tick"], "a refused schedule is not declared"


@pytest.mark.timeout(60)
def test_a_schedule_no_serving_process_declares_any_more_is_inactive(make_controller, sqlite_url):
    old = make_controller(Tick, store=sqlite_url, lease=1.0)
    old.schedule("old", cron="0 3 * * *", kwargs={"note": "o"})
    wait_until(lambda: [s for s in old.schedules() if s["active"]], 10)
    old.shutdown()
    new = make_controller(Tick, store=sqlite_url, lease=1.0)
    new.schedule("new", every=3600)
    new.tasks()  # it serves from now on (a mount or a request would start it too)
    time.sleep(1.5)
    shown = {s["name"]: s for s in new.schedules()}
    assert set(shown) == {"old", "new"}
    assert not shown["old"]["active"] and shown["old"]["next_firing"] is None and shown["old"]["cron"] == "0 3 * * *"
    assert shown["new"]["active"] and shown["new"]["next_firing"].endswith(":00:00+00:00"), shown["new"]


@pytest.mark.timeout(60)
def test_a_stored_schedule_with_a_time_zone_this_host_does_not_know_is_shown_without_next_firing(
        make_controller, sqlite_url):
    """Another process (another version, another host's tz database) declared a time zone unknown here: the
    listing shows the schedule, with no next firing, rather than failing."""
    other = resolve_store(sqlite_url)
    try:
        other.declare_schedules("Tick", {"elsewhere": {"cron": "0 3 * * *", "tz": "Mars/Olympus_Mons",
                                                       "kwargs": {"note": "m"}}}, "other-host:1:1.0")
    finally:
        other.close()
    here = make_controller(Tick, store=sqlite_url)
    shown = {s["name"]: s for s in here.schedules()}
    assert shown["elsewhere"]["tz"] == "Mars/Olympus_Mons" and shown["elsewhere"]["next_firing"] is None


class ClockStore(MemoryStore):
    """A memory store whose clock the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = time.time()

    def now(self) -> float:
        return self.clock


@pytest.mark.timeout(30)
@pytest.mark.parametrize("catchup, expected", [("skip", 0), ("one", 1)])
def test_firings_missed_while_nothing_ran_follow_catchup(catchup, expected, caplog):
    store = ClockStore()
    queued: list[Event] = []
    scheduler = Scheduler(store, "ticks", "host:1:1.0", lease=10.0, max_queued=-1,
                          logger=logging.getLogger("ticks"), publish=queued.append)
    spec = ScheduleSpec.build("tick", every=60, kwargs={"note": "n"}, catchup=catchup)
    scheduler.add(spec)  # no thread: the test runs the rounds
    scheduler.run_once()
    assert scheduler.holder and queued == []
    # An hour with no serving process; now is 40 s past a firing, so none is on time.
    last_missed = (store.clock + 3600) // 60 * 60
    store.clock = last_missed + 40
    with caplog.at_level(logging.WARNING):
        scheduler.run_once()
    assert len(queued) == expected
    [state] = store.schedules("ticks")
    assert state["fired_until"] == last_missed, "every missed firing was handled"
    if catchup == "skip":
        assert "missed while no server ran" in caplog.text
    else:
        assert queued[0]["task"]["schedule"]["firing"] == last_missed
    store.clock = last_missed + 65  # the next firing, 5 s late: on time, queued whatever catchup says
    scheduler.run_once()
    assert len(queued) == expected + 1 and queued[-1]["task"]["schedule"]["firing"] == last_missed + 60
    scheduler.stop()
