"""The limits end to end, with real servers and task processes: per-key and per-tenant bounds under gunicorn
``-w 3`` on SQLite and on two hosts over Redis, fair share between tenants, admission by declared resources
(422 for a task no host can hold; a task that fits only when another ends starts then), and tenant quotas
(429 with ``Retry-After``, queued tasks held by real claims, recovery once the window passes).

The tasks write their own start and end times (``time.time()`` in the task process) to a file; a task holds its
place from before its start until after its end, so two of them whose written intervals overlap held places
at the same time: the largest overlap of a key, a tenant or the controller is bounded by its limit.
"""
from __future__ import annotations

import json
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import pytest
import requests
from flask import Flask, request
from flask_restful import Api

from flask_multiprocess_controller import (
    ALL_TENANTS, MetaMPResource, MetaMPTask, defaults,
)
from flask_multiprocess_controller.store import resolve_store

from serverproc import Server, ServerPool, free_port, gunicorn, poll_until, python, unexpected_tracebacks

pytestmark = pytest.mark.slow

HTTP_TIMEOUT = 30.0

#: The app the servers of these tests run (``<tmp>/app.py``), configured by ``APP_CONFIG`` (JSON): ``tenants``
#: (the tenant is the ``X-Tenant`` header; ``*`` is an operator's request, which sees every tenant),
#: ``max_num_process``, ``concurrency_key``, ``max_per_key``, ``max_per_tenant``, ``tenant_quota``,
#: ``resources`` of the ``jobs`` task, and ``big``: the resources of a second controller, ``big``, at ``/big``.
#: A task appends ``{"n", "host", "start", "end"}`` to the file ``log``; it burns CPU (``burn``) or sleeps until
#: the file ``gate`` exists, then sleeps ``sleep`` seconds.
LIMITS_APP = r'''
import json
import os
import time

from flask import Flask, request
from flask_restful import Api

from flask_multiprocess_controller import (ALL_TENANTS, MetaMPController, MetaMPResource, MetaMPTask,
                                           MultiprocessController)

CONFIG = json.loads(os.environ.get("APP_CONFIG") or "{}")


class Job(MetaMPTask):
    resources = CONFIG.get("resources")

    def execute(self, n: int = 0, account: str = "none", gate: str = "", burn: bool = False, sleep: float = 0.0,
                log: str = "") -> int:
        start = time.time()
        while gate and not os.path.exists(gate):
            self.checkpoint()
            if burn:
                until = time.process_time() + 0.02
                while time.process_time() < until:
                    pass
            else:
                time.sleep(0.02)
        if sleep:
            time.sleep(sleep)
        end = time.time()
        if log:
            line = json.dumps({"n": n, "host": os.environ.get("MPC_HOST_ID"), "start": start, "end": end})
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        return n


class Big(MetaMPTask):
    resources = CONFIG.get("big")

    def execute(self) -> None:
        pass


def tenant():
    name = request.headers.get("X-Tenant")
    return ALL_TENANTS if name == "*" else name


LIMITS = {name: CONFIG[name] for name in ("concurrency_key", "max_per_key", "max_per_tenant") if name in CONFIG}
if CONFIG.get("tenant_quota"):
    LIMITS["tenant_quota"] = tuple(CONFIG["tenant_quota"])
if CONFIG.get("tenants"):
    LIMITS["tenant"] = tenant
class Jobs(MetaMPController, controller_name="jobs"):
    pass


class Bigs(MetaMPController, controller_name="big"):
    pass


jobs = Jobs(Job, max_num_process=CONFIG.get("max_num_process", 2),
                        stop_grace=0.5, lease=3, **LIMITS)
if CONFIG.get("slots"):  # this process's controlling threads, fewer than the controller's places
    jobs.slots = CONFIG["slots"]
app = Flask(__name__)
api = Api(app)
api.add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(jobs,))
if CONFIG.get("big"):
    big = Bigs(Big, max_num_process=1, stop_grace=0.5, lease=3)
    api.add_resource(MetaMPResource, "/big", "/big/<string:uuid>", endpoint="big", resource_class_args=(big,))
MultiprocessController(app)

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
'''

#: Task statuses a task never leaves.
ENDED = ("succeeded", "failed", "stopped", "timed_out", "lost")


class LimitsServer:
    """One server of :data:`LIMITS_APP` (gunicorn ``-w N``, or the dev server as one process)."""

    def __init__(self, pool: ServerPool, tmp_path: Path, store_url: str, config: dict[str, Any],
                 workers: int = 0, host: Optional[str] = None, env: Optional[dict[str, str]] = None) -> None:
        (tmp_path / "app.py").write_text(LIMITS_APP)
        port = free_port()
        name = host or "server"
        full_env = {"MPC_STORE_URL": store_url, "APP_CONFIG": json.dumps(config), "PORT": str(port), **(env or {})}
        if host:
            full_env["MPC_HOST_ID"] = host
        args = (gunicorn("-w", str(workers), "-b", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "app:app")
                if workers else python(str(tmp_path / "app.py")))
        self.server: Server = pool.start(args, cwd=tmp_path, port=port, log_path=tmp_path / f"{name}.log",
                                         env=full_env, ready_path="/mpc/health")
        self.base = self.server.base

    def post(self, path: str, body: Any, tenant: Optional[str] = None) -> requests.Response:
        headers = {"X-Tenant": tenant} if tenant else {}
        return requests.post(self.base + path, json=body, headers=headers, timeout=HTTP_TIMEOUT)

    def submit(self, body: Any, tenant: Optional[str] = None) -> Any:
        answer = self.post("/tasks", body, tenant)
        assert answer.status_code == 202, answer.text
        found = answer.json()
        return [task["uuid"] for task in found["tasks"]] if isinstance(body, list) else found["uuid"]

    def get(self, uuid: str, path: str = "/tasks") -> dict:
        answer = requests.get(f"{self.base}{path}/{uuid}", headers={"X-Tenant": "*"}, timeout=HTTP_TIMEOUT)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def wait_ended(self, uuids: list[str], timeout: float = 60.0) -> list[dict]:
        try:
            return poll_until(lambda: [self.get(uuid) for uuid in uuids],
                              lambda tasks: all(t["status"] in ENDED for t in tasks), timeout, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- server log (end) ---\n{self.server.log()[-8000:]}") from None

    def stop(self) -> None:
        survivors = self.server.stop(signal.SIGTERM, timeout=30)
        assert survivors == [], survivors
        assert not unexpected_tracebacks(self.server.log()), self.server.log()


def runs(log: Path) -> dict[int, dict]:
    """The runs the tasks wrote, by ``n`` (each task ran once)."""
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    by_n = {line["n"]: line for line in lines}
    assert len(by_n) == len(lines), "a task ran twice"
    return by_n


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of ``(start, end)`` intervals that overlap at one moment."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda event: (event[0], event[1]))  # an end before a start at the same instant
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# -- 1, 2: per-key and per-tenant bounds across gunicorn workers, and across hosts ----------------------------------

#: Tenant t1 queues four tasks of account "a" (one at a time: max_per_key=1), then six of accounts of their own;
#: t2 queues two. t1 runs two tasks at most (max_per_tenant=2) although the controller has four places.
LIMITS = {"tenants": True, "max_num_process": 4, "concurrency_key": "account", "max_per_key": 1,
          "max_per_tenant": 2}
T1 = [("a", n) for n in range(4)] + [(f"b{n}", 4 + n) for n in range(6)]
T2 = [(f"c{n}", 10 + n) for n in range(2)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("setup", ["sqlite-gunicorn-w3", "redis-two-hosts"])
def test_per_key_and_per_tenant_limits_hold_across_workers_and_hosts(setup: str, pool: ServerPool,
                                                                     tmp_path: Path, request: Any) -> None:
    log = tmp_path / "runs.jsonl"
    if setup.startswith("sqlite"):
        first = LimitsServer(pool, tmp_path, f"sqlite:///{tmp_path}/tasks.sqlite3", LIMITS, workers=3)
        servers = [first]
    else:
        url = request.getfixturevalue("redis_url")
        servers = []
        for host in ("host-a", "host-b"):
            (tmp_path / host).mkdir()
            # Two slots each: neither host can take all four places, so both run tasks however the claims race
            # (a host whose slot ends a task claims the next in the same step, and could otherwise keep them all).
            servers.append(LimitsServer(pool, tmp_path / host, url, {**LIMITS, "slots": 2}, host=host))
    t1 = servers[0].submit([{"n": n, "account": key, "sleep": 0.25, "log": str(log)} for key, n in T1], "t1")
    t2 = servers[-1].submit([{"n": n, "account": key, "sleep": 0.25, "log": str(log)} for key, n in T2], "t2")
    for task in servers[0].wait_ended(t1 + t2):
        assert task["status"] == "succeeded", task

    ran = runs(log)
    assert sorted(ran) == list(range(12))
    interval = {n: (run["start"], run["end"]) for n, run in ran.items()}
    keys = {n: key for key, n in T1 + T2}
    for key in set(keys.values()):
        assert most_at_once([interval[n] for n in keys if keys[n] == key]) <= 1, f"account {key} ran twice at once"
    t1_most = most_at_once([interval[n] for _, n in T1])
    assert t1_most <= 2, f"{t1_most} tasks of t1 ran at once (max_per_tenant=2)"
    assert most_at_once(list(interval.values())) <= 4
    # Keys and tenants with room were not held up behind the held ones: t1's other accounts started while
    # account "a" still had tasks to run, and t2 started before t1's last task did.
    a_starts = [interval[n][0] for key, n in T1 if key == "a"]
    assert min(interval[n][0] for key, n in T1 if key != "a") < max(a_starts), ran
    assert min(interval[n][0] for _, n in T2) < max(interval[n][0] for _, n in T1), ran
    if len(servers) == 2:
        assert {run["host"] for run in ran.values()} == {"host-a", "host-b"}, "one host ran every task"
    for server in servers:
        server.stop()


# -- 3: fair share between tenants ---------------------------------------------------------------------------------

class Tiny(MetaMPTask):
    def execute(self) -> None:
        time.sleep(0.02)


@pytest.mark.timeout(120)
def test_a_tenant_queueing_five_after_another_queued_two_hundred_starts_within_the_next_few(
        make_controller: Any, tmp_path: Path) -> None:
    controller = make_controller(Tiny, store=f"sqlite:///{tmp_path}/tasks.sqlite3", max_num_process=6,
                                 tenant=lambda: request.headers.get("X-Tenant") or ALL_TENANTS)
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))
    client = app.test_client()
    answer = client.post("/tasks", json=[{}] * 200, headers={"X-Tenant": "big"})
    assert answer.status_code == 202, answer.get_json()
    cursor = controller.store.changes(None).cursor
    answer = client.post("/tasks", json=[{}] * 5, headers={"X-Tenant": "small"})
    assert answer.status_code == 202, answer.get_json()
    small = [task["uuid"] for task in answer.get_json()["tasks"]]
    for uuid in small:
        assert controller.wait(uuid, timeout=60)["status"] == "succeeded"
    controller.stop_all()
    tasks = controller.tasks(limit=1000)["tasks"]
    assert len(tasks) == 205
    # A claim stamps started_at and an insert its queued event's time inside the store's write lock, so they order
    # the claims that came after the small tenant's tasks were queued (created_at would not: it is stamped before
    # the insert waits for that lock, and the feed's started events come once a task's process runs).
    queued_at = None
    while queued_at is None:
        changes = controller.store.changes(cursor, limit=1000)
        assert changes.events and not changes.reset, "the small tenant's queued events are missing from the feed"
        cursor = changes.cursor
        queued_at = max((event["at"] for event in changes.events
                         if event["kind"] == "queued" and event["uuid"] in small), default=None)
    starts = sorted((at(task["started_at"]), task["uuid"] in small) for task in tasks
                    if task["started_at"] and at(task["started_at"]) > queued_at)
    assert sum(is_small for _, is_small in starts) == 5, "a small task claimed before its queued event"
    fifth = max(i for i, (_, is_small) in enumerate(starts) if is_small) + 1
    # Fair share: the tenant with fewer active tasks goes first, so the small tenant takes about half of the six
    # slots as they free up; its fifth start comes within about two rounds of the slots, where without fair share
    # it would wait for the big tenant's ~190 queued tasks.
    assert fifth <= 12, f"the small tenant's fifth task was start {fifth} after it queued them (fair share: ~8)"


# -- 4: admission by declared resources ------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_a_task_too_large_for_every_host_is_refused_and_one_that_fits_only_alone_waits_its_turn(
        pool: ServerPool, tmp_path: Path) -> None:
    config = {"max_num_process": 2, "resources": {"memory": "3GiB", "cpus": 1}, "big": {"memory": "8GiB"}}
    server = LimitsServer(pool, tmp_path, f"sqlite:///{tmp_path}/tasks.sqlite3", config,
                          env={"MPC_RESOURCES": "memory=4GiB,cpus=2"})
    refused = server.post("/big", {})  # the serving process published its capacity before it checks a submit
    assert refused.status_code == 422, refused.text
    assert "largest capacity seen is memory 4 GiB" in refused.json()["message"], refused.json()

    log, gate = tmp_path / "runs.jsonl", tmp_path / "gate"
    first = server.submit({"n": 1, "gate": str(gate), "log": str(log)})
    poll_until(lambda: server.get(first)["status"], lambda status: status == "running", 20)
    second = server.submit({"n": 2, "log": str(log)})
    waiting = poll_until(lambda: server.get(second), lambda task: task["waiting_on"] == "resources", 10)
    assert (waiting["status"], waiting["waiting_for"]) == ("queued", "memory"), waiting
    gate.touch()
    for task in server.wait_ended([first, second]):
        assert task["status"] == "succeeded", task
    ran = runs(log)
    assert ran[2]["start"] >= ran[1]["end"], "the second task started while the first held the memory"
    server.stop()


# -- 5: tenant quotas ------------------------------------------------------------------------------------------------

WINDOW = 3.0
#: A submit's reading of the usage is at most a heartbeat old once two heartbeats passed (see below).
assert defaults.LIMITS_TTL <= defaults.HEARTBEAT_INTERVAL


def _claims_see_the_store_after(store_url: str, moment: float) -> None:
    """Wait until every serving process read the tenants' usage after ``moment`` (store clock): it reads it right
    after each heartbeat, so a second heartbeat after ``moment`` comes after such a read."""
    store = resolve_store(store_url)
    try:
        first = poll_until(store.heartbeats, lambda beats: beats and min(beats.values()) > moment, 10)
        poll_until(store.heartbeats, lambda beats: all(beat > first[owner] for owner, beat in beats.items()
                                                       if owner in first), 10)
    finally:
        store.close()


@pytest.mark.timeout(90)
def test_a_tenant_over_its_quota_is_refused_its_queue_held_and_it_recovers(pool: ServerPool, tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path}/tasks.sqlite3"
    config = {"tenants": True, "max_num_process": 1, "tenant_quota": [0.3, WINDOW]}
    server = LimitsServer(pool, tmp_path, store_url, config)
    gate = tmp_path / "gate"
    burner = server.submit({"n": 1, "gate": str(gate), "burn": True}, "acme")
    poll_until(lambda: server.get(burner)["status"], lambda status: status == "running", 20)
    held = server.submit({"n": 2}, "acme")  # behind the burner in the only place

    def usage() -> dict:
        answer = requests.get(server.base + "/mpc/api/usage", headers={"X-Tenant": "acme"}, timeout=HTTP_TIMEOUT)
        assert answer.status_code == 200, answer.text
        return answer.json()["usage"][0]["tenants"][0]

    over = poll_until(usage, lambda mine: mine["over"], 20, interval=0.1)
    assert over["tenant"] == "acme" and over["cpu_seconds"] >= 0.3, over
    shown = poll_until(lambda: server.get(held), lambda task: task["waiting_on"] == "quota", 10)
    assert (shown["status"], shown["waiting_for"]) == ("queued", "acme"), shown
    # Past a heartbeat, the claims hold acme's tasks; and a submit reads the usage afresh (kept 1 s at most).
    _claims_see_the_store_after(store_url, resolve_now(store_url))
    refused = server.post("/tasks", {"n": 3}, "acme")
    assert refused.status_code == 429 and "quota" in refused.json()["message"], refused.text
    assert 1 <= int(refused.headers["Retry-After"]) <= WINDOW + 1, refused.headers
    other = server.submit({"n": 4}, "bob")  # queued after acme's
    gate.touch()
    # The place the burner leaves goes to bob's task: acme's, ahead of it, is held while acme is over quota (a real
    # claim skips it). Recovery: once the burner's CPU time leaves the window, acme's queued task starts, and acme
    # submits again.
    burnt, done, bobs = server.wait_ended([burner, held, other])
    assert [t["status"] for t in (burnt, done, bobs)] == ["succeeded"] * 3, (burnt, done, bobs)
    assert burnt["cpu_time"] >= 0.3, burnt
    assert at(bobs["started_at"]) < at(done["started_at"]), "bob's task, queued after acme's, started first"
    assert at(done["started_at"]) >= at(burnt["ended_at"]) + WINDOW - 0.05, (burnt, done)
    again = poll_until(lambda: server.post("/tasks", {"n": 5}, "acme"), lambda answer: answer.status_code != 429, 10,
                       interval=0.2)
    assert again.status_code == 202, again.text
    server.wait_ended([again.json()["uuid"]])
    server.stop()


def resolve_now(store_url: str) -> float:
    """The store's clock now."""
    store = resolve_store(store_url)
    try:
        return store.now()
    finally:
        store.close()
