"""Tenants: each store's tenant index (one tenant's list, counts and stop-all read only its tasks),
the resource's counts and stop-all, health and schedules scoped by the ``tenant=`` hook, and the
tasks no request made (Python API, CLI, schedules) carrying ``SYSTEM_TENANT``, which no hook answer
(None included) matches.

The store tests count work, never time it: rows the memory store iterates, SQLite virtual-machine
steps (a progress handler), Redis commands run (``INFO commandstats``, commands of scripts included).
"""
from __future__ import annotations

import os
import time
import uuid as uuid_module
from typing import Any, Callable, Iterator

import pytest
import redis
from flask import Flask, request
from flask_restful import Api

from flask_multiprocess_controller import (
    ALL_TENANTS, SYSTEM_TENANT, MemoryStore, MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController,
    SQLiteStore, TaskStore,
)
from flask_multiprocess_controller.engine.schedules import ScheduleSpec, task_row
from flask_multiprocess_controller.store.base import hook_tenant
from flask_multiprocess_controller.store.redis import RedisStore

from serverproc import poll_until

CTL = "tenanted"
OWNER = "owner-1"


# -- the stores' tenant index --------------------------------------------------------------------------

class _CountingRows(dict):  # type: ignore[type-arg]
    """The memory store's task dict, counting the rows read from it (by iteration or by key)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read = 0

    def __iter__(self) -> Iterator[Any]:
        for key in super().__iter__():
            self.read += 1
            yield key

    def values(self) -> Any:
        return [self[key] for key in self]

    def items(self) -> Any:
        return [(key, self[key]) for key in self]

    def __getitem__(self, key: Any) -> Any:
        self.read += 1
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.read += 1
        return super().get(key, default)


def _memory_meter(store: MemoryStore) -> Callable[[], int]:
    rows = _CountingRows(store._rows)
    store._rows = rows
    return lambda: rows.read


def _sqlite_meter(store: SQLiteStore) -> Callable[[], int]:
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0  # go on

    opened = store._open

    def metered() -> Any:
        conn = opened()
        conn.set_progress_handler(tick, 10)  # one tick per 10 virtual-machine instructions
        return conn

    store._open = metered  # type: ignore[method-assign]
    store.close()  # the idle connections go: every later one is metered
    return lambda: steps[0]


def _redis_meter(store: RedisStore) -> Callable[[], int]:
    client = redis.Redis.from_url(store.url)

    def calls() -> int:
        stats = client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")

    return calls


BACKENDS: dict[str, Callable[[Any], tuple[TaskStore, Callable[[TaskStore], Callable[[], int]]]]] = {
    "memory": lambda env: (MemoryStore(), _memory_meter),
    "sqlite": lambda env: (SQLiteStore(str(env["tmp_path"] / "tenants.sqlite3")), _sqlite_meter),
    "redis": lambda env: (RedisStore(env["redis_url"], prefix=f"tenants-{uuid_module.uuid4().hex}:"), _redis_meter),
}


@pytest.fixture(params=list(BACKENDS))
def metered_store(request, tmp_path, redis_server):
    store, meter = BACKENDS[request.param]({"tmp_path": tmp_path, "redis_url": redis_server})
    yield store, meter
    store.close()


def _row(tenant: Any, priority: int = 0) -> dict[str, Any]:
    return {"uuid": str(uuid_module.uuid4()), "controller": CTL, "status": "queued", "priority": priority,
            "args": {"blob": "x" * 50}, "created_at": time.time(), "timeout": None, "attempt": 0,
            "stop_requested": False, "tenant": tenant}


def _crowd(store: TaskStore, tenant: str, n: int) -> None:
    """``n`` queued tasks of ``tenant``, one running (claimed at once, before any other queued task)."""
    rows = [_row(tenant, priority=-10 if i == 0 else 5) for i in range(n)]
    for start in range(0, n, 500):
        store.enqueue(rows[start:start + 500], -1)
    assert store.claim(CTL, OWNER, 1000)["uuid"] == rows[0]["uuid"]


def _small_tenant(store: TaskStore, tenant: str) -> list[str]:
    """Three tasks of ``tenant``: one running (claimed first), one queued, one that succeeded."""
    rows = [_row(tenant, priority=p) for p in (-20, -20, 100)]  # the queued one after every other task
    store.enqueue(rows, -1)
    done = store.claim(CTL, OWNER, 1000)
    assert store.finish(done["uuid"], "succeeded", OWNER, result=1) is not None
    assert store.claim(CTL, OWNER, 1000)["uuid"] == rows[1]["uuid"]
    return [r["uuid"] for r in rows]


def _use_the_tenant(store: TaskStore, tenant: str, uuids: list[str]) -> None:
    """List, count and stop-all one tenant's tasks, checking the answers."""
    done, running, queued = uuids
    assert [r["uuid"] for r in store.list_tasks(CTL, tenant=tenant)] == [queued, running, done]
    assert [r["uuid"] for r in store.list_tasks(CTL, ["queued", "running"], tenant=tenant)] == [queued, running]
    assert [r["uuid"] for r in store.list_tasks(CTL, limit=1, before=store.get(queued)["seq"], tenant=tenant)] \
        == [running]
    assert {k: v for k, v in store.counts(CTL, tenant=tenant).items() if v} == \
        {"queued": 1, "running": 1, "succeeded": 1}
    events = store.stop_all(CTL, tenant=tenant)
    assert [(e["kind"], e["uuid"]) for e in events] == [("ended", queued), ("stopping", running)]
    assert {k: v for k, v in store.counts(CTL, tenant=tenant).items() if v} == \
        {"stopped": 1, "stopping": 1, "succeeded": 1}


@pytest.mark.timeout(90)
def test_one_tenants_list_counts_and_stop_all_do_not_read_other_tenants_tasks(metered_store):
    store, make_meter = metered_store
    meter = make_meter(store)
    _crowd(store, "crowd-a", 30)
    first = _small_tenant(store, "small-a")
    before = meter()
    _use_the_tenant(store, "small-a", first)
    few = meter() - before  # with 30 other tasks around (of another tenant)
    _crowd(store, "crowd-b", 3000)
    second = _small_tenant(store, "small-b")
    before = meter()
    _use_the_tenant(store, "small-b", second)
    many = meter() - before  # with 3,030 other tasks around
    # The same work whatever the other tenants have (a little more for deeper indexes), where a scan
    # of the controller's tasks would do a hundred times more.
    assert many <= 2 * few + 50, (few, many)
    # Every tenant's view and stop-all are untouched.
    counts = store.counts(CTL)
    assert counts["queued"] == 3028 and counts["running"] == 2 and counts["stopping"] == 2
    assert len(store.list_tasks(CTL, ["queued"], limit=5000)) == 3028


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def any_store(request, tmp_path, redis_server):
    if request.param == "postgres":
        from flask_multiprocess_controller.store.postgres import PostgresStore

        store: TaskStore = PostgresStore(request.getfixturevalue("postgres_server").url(),
                                         schema=f"tenants_{uuid_module.uuid4().hex[:12]}")
    else:
        store, _ = BACKENDS[request.param]({"tmp_path": tmp_path, "redis_url": redis_server})
    yield store
    store.close()


@pytest.mark.timeout(60)
def test_tenant_none_and_the_system_tenant_have_indexes_of_their_own(any_store):
    store = any_store
    rows = [_row(None), _row(SYSTEM_TENANT), _row("acme"), _row(None)]
    store.enqueue(rows, -1)
    assert [r["uuid"] for r in store.list_tasks(CTL, tenant=None)] == [rows[3]["uuid"], rows[0]["uuid"]]
    assert [r["uuid"] for r in store.list_tasks(CTL, tenant=SYSTEM_TENANT)] == [rows[1]["uuid"]]
    assert store.counts(CTL, tenant=None) == {"queued": 2}
    assert len(store.stop_all(CTL, tenant=None)) == 2
    assert store.counts(CTL, tenant=SYSTEM_TENANT) == {"queued": 1}
    assert store.counts(CTL, tenant="acme") == {"queued": 1}
    # A purge takes the tasks out of the index too.
    assert store.purge(CTL, store.now() + 1) == 2
    assert store.list_tasks(CTL, tenant=None) == [] and store.counts(CTL, tenant=None) == {}
    assert [r["uuid"] for r in store.list_tasks(CTL, tenant="acme")] == [rows[2]["uuid"]]


@pytest.mark.timeout(60)
def test_a_redis_key_space_written_before_the_tenant_index_is_indexed_when_opened(redis_url):
    store = RedisStore(redis_url, prefix="older:")
    rows = [_row("acme"), _row(None), _row("acme")]
    store.enqueue(rows, -1)
    assert store.claim(CTL, OWNER, 10)["uuid"] == rows[0]["uuid"]
    client = redis.Redis.from_url(redis_url)
    try:
        # As an older version left it: no tenant index, no marker.
        for key in [*client.scan_iter(match="older:c:*:tn:*"), b"older:tenants:indexed"]:
            client.delete(key)
        assert store.counts(CTL, tenant="acme") == {}
        reopened = RedisStore(redis_url, prefix="older:")
        assert [r["uuid"] for r in reopened.list_tasks(CTL, tenant="acme")] == [rows[2]["uuid"], rows[0]["uuid"]]
        assert reopened.counts(CTL, tenant="acme") == {"queued": 1, "running": 1}
        assert reopened.counts(CTL, tenant=None) == {"queued": 1}
        assert len(reopened.stop_all(CTL, tenant="acme")) == 2
        assert store.get(rows[1]["uuid"])["status"] == "queued"
        reopened.close()
    finally:
        store.close()
        client.close()


# -- the tenant hook over HTTP ---------------------------------------------------------------------------

class Gate(MetaMPTask):
    """Runs until the file ``gate`` exists (checking for stop requests)."""

    def execute(self, value: Any = None, gate: str = "") -> Any:
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.01)
        return value


def _hook() -> Any:
    """The request's ``X-Tenant`` header; ``*`` is an operator, who sees every tenant's tasks."""
    name = request.headers.get("X-Tenant")
    return ALL_TENANTS if name == "*" else name


@pytest.fixture
def tenanted(tmp_path: Any) -> Iterator[tuple[Any, MetaMPController, str]]:
    controller = MetaMPController(Gate, max_num_process=1, store="memory://", stop_grace=0.5, tenant=_hook)
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, "/gate", "/gate/<string:uuid>", resource_class_args=(controller,))
    MultiprocessController(app)
    try:
        yield app.test_client(), controller, str(tmp_path / "gate")
    finally:
        controller.shutdown()


def _as(tenant: str) -> dict[str, str]:
    return {"X-Tenant": tenant}


@pytest.mark.timeout(60)
def test_the_resources_counts_health_and_stop_all_are_the_tenants(tenanted):
    client, controller, gate = tenanted
    running = client.post("/gate", json={"gate": gate}, headers=_as("alice")).get_json()["uuid"]
    poll_until(lambda: controller.status(running)["status"], lambda status: status == "running", timeout=20)
    client.post("/gate", json={"gate": gate}, headers=_as("alice"))
    for _ in range(2):
        client.post("/gate", json={"gate": gate}, headers=_as("bob"))
    listing = client.get("/gate", headers=_as("bob")).get_json()
    assert (listing["running"], listing["queued"], len(listing["tasks"])) == (0, 2, 2)
    listing = client.get("/gate", headers=_as("alice")).get_json()
    assert (listing["running"], listing["queued"], len(listing["tasks"])) == (1, 1, 2)
    health = client.get("/mpc/health", headers=_as("bob")).get_json()["controllers"][controller.name]
    assert (health["running"], health["queued"]) == (0, 2)
    health = client.get("/mpc/health", headers=_as("*")).get_json()["controllers"][controller.name]
    assert (health["running"], health["queued"]) == (1, 3)
    answer = client.delete("/gate?all=true", headers=_as("bob"))
    assert (answer.status_code, answer.get_json()) == (202, {"stopped": 2, "stopping": 0})
    assert controller.tasks()["queued"] == 1 and controller.status(running)["status"] == "running"
    answer = client.delete("/gate?all=true", headers=_as("alice"))
    assert answer.get_json() == {"stopped": 1, "stopping": 1}
    assert controller.wait(running, timeout=20)["status"] == "stopped"


@pytest.mark.timeout(60)
def test_tasks_no_request_made_are_the_systems_and_a_hook_answering_none_does_not_see_them(tenanted):
    client, controller, gate = tenanted
    system = controller.submit(gate=gate)  # the Python API (and the CLI, which calls it), outside a request
    assert controller.store.get(system)["tenant"] == SYSTEM_TENANT
    anonymous = client.post("/gate", json={"gate": gate}).get_json()["uuid"]  # the hook answers None
    assert controller.store.get(anonymous)["tenant"] is None
    for url in (f"/gate/{system}", f"/mpc/api/tasks/{system}"):
        assert client.get(url).status_code == 404
        assert client.get(url, headers=_as("alice")).status_code == 404
    assert client.delete(f"/gate/{system}").status_code == 404
    assert [t["uuid"] for t in client.get("/gate").get_json()["tasks"]] == [anonymous]
    assert [t["uuid"] for t in client.get("/mpc/api/tasks").get_json()["tasks"]] == [anonymous]
    # No hook answer is the system tenant, not even one spelled like it.
    assert hook_tenant(SYSTEM_TENANT) != SYSTEM_TENANT and hook_tenant("\x00\x00system") != "\x00system"
    assert hook_tenant(7) == "7" and hook_tenant(None) is None and hook_tenant(ALL_TENANTS) is ALL_TENANTS
    # An operator (the hook answers ALL_TENANTS) sees every task; what it queues is the system's.
    assert {t["uuid"] for t in client.get("/gate", headers=_as("*")).get_json()["tasks"]} == {system, anonymous}
    assert client.get(f"/mpc/api/tasks/{system}", headers=_as("*")).status_code == 200
    by_operator = client.post("/gate", json={"gate": gate}, headers=_as("*")).get_json()["uuid"]
    assert controller.store.get(by_operator)["tenant"] == SYSTEM_TENANT
    # The Python API may queue for a tenant by name.
    [for_alice] = controller.enqueue([{"gate": gate}], tenant="alice")
    assert [t["uuid"] for t in client.get("/gate", headers=_as("alice")).get_json()["tasks"]] == [for_alice["uuid"]]
    batch = controller.submit_many([{"gate": gate}], tenant="bob")
    assert client.get(f"/gate/{batch.tasks[0]['uuid']}", headers=_as("bob")).status_code == 200
    with pytest.raises(TypeError):
        controller.enqueue([{}], tenant=7)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_schedules_are_shown_to_their_tenant_and_to_operators_only(tenanted):
    client, controller, _ = tenanted
    controller.schedule("alice-nightly", every=3600, kwargs={"value": "alice's"}, tenant="alice")
    controller.schedule("sweep", every=3600, kwargs={"value": "system secret"})

    def names(headers: dict[str, str]) -> list[str]:
        answer = client.get("/mpc/api/schedules", headers=headers)
        assert answer.status_code == 200
        return [s["name"] for s in answer.get_json()["schedules"]]

    assert names(_as("bob")) == []
    assert names({}) == []  # a hook answering None: nobody in particular, not the system
    assert names(_as("alice")) == ["alice-nightly"]
    assert names(_as("*")) == ["alice-nightly", "sweep"]
    assert [s["tenant"] for s in controller.schedules()] == ["alice", None]  # outside a request: all
    # A firing stamps its task with the schedule's tenant, or the system's.
    assert task_row(ScheduleSpec.build("a", every=60, tenant="alice"), CTL, 60.0)["tenant"] == "alice"
    assert task_row(ScheduleSpec.build("s", every=60), CTL, 60.0)["tenant"] == SYSTEM_TENANT
    assert ScheduleSpec.from_json(ScheduleSpec.build("a", every=60, tenant="alice").to_json(), "a").tenant == "alice"
    with pytest.raises(TypeError):
        controller.schedule("bad", every=60, tenant=5)  # type: ignore[arg-type]
