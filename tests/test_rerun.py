"""Running an ended task again: ``POST <prefix>/api/tasks/<uuid>/rerun``, ``controller.rerun`` and ``flask mpc rerun``.

Real task processes on the memory and SQLite stores behind a Flask test client: the new task has the first
one's arguments, priority, timeout and tenant; ``rerun_of`` and ``reruns`` link the two; a task that has not
ended is refused (409), another tenant's is not found (404), the ``can_change`` hook is asked (403). The
stores' index of reruns is checked on every store (PostgreSQL and Redis included), purges trimming it.
"""
from __future__ import annotations

import os
import time
import uuid as uuid_module
from typing import Any, Iterator

import pytest
from conftest import wait_until
from flask import Flask, request
from flask_restful import Api

from flask_multiprocess_controller import (
    MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController, TaskStillActive,
)
from flask_multiprocess_controller.store import MemoryStore, SQLiteStore
from flask_multiprocess_controller.store.redis import RedisStore


class Echo(MetaMPTask):
    """Waits until the file ``gate`` exists (checking for stop requests); fails with ``value`` if ``fail``."""

    def execute(self, value: Any = None, fail: bool = False, gate: str = "") -> Any:
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.01)
        if fail:
            raise ValueError(value)
        return value


def _may_change(action: str, task: dict) -> bool:
    """A ``can_change`` hook: a request saying ``X-Role: viewer`` may change nothing."""
    return request.headers.get("X-Role") != "viewer"


@pytest.fixture(params=["memory", "sqlite"])
def served(request: Any, tmp_path: Any) -> Iterator[tuple[Any, MetaMPController]]:
    store = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/rerun.sqlite3"
    controller = MetaMPController(Echo, max_num_process=1, store=store, stop_grace=0.5, timeout=60,
                                  tenant=lambda: request_tenant(), can_change=_may_change)
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, "/echo", "/echo/<string:uuid>", resource_class_args=(controller,))
    MultiprocessController(app)
    try:
        yield app.test_client(), controller
    finally:
        controller.shutdown()


def request_tenant() -> Any:
    return request.headers.get("X-Tenant")


ALICE = {"X-Tenant": "alice"}


def _rerun(client: Any, uuid: str, headers: dict[str, str] = ALICE) -> Any:
    return client.post(f"/mpc/api/tasks/{uuid}/rerun", headers=headers)


@pytest.mark.timeout(60)
def test_an_ended_task_runs_again_with_its_arguments_linked_both_ways(served, tmp_path):
    client, controller = served
    posted = client.post("/echo?priority=3&timeout=20", json={"value": "again", "fail": True}, headers=ALICE)
    first = posted.get_json()["uuid"]
    assert controller.wait(first, timeout=20)["status"] == "failed"

    # Refused: another tenant's task, an unknown one, a request the hook refuses; none queues a task.
    for uuid, headers, code in ((first, {"X-Tenant": "bob"}, 404), (str(uuid_module.uuid4()), ALICE, 404),
                                (first, {**ALICE, "X-Role": "viewer"}, 403), ("not-a-uuid", ALICE, 400)):
        answer = _rerun(client, uuid, headers)
        assert answer.status_code == code, (code, answer.get_json())
        assert answer.get_json()["message"], answer.get_json()
    assert len(controller.tasks()["tasks"]) == 1

    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    answer = _rerun(client, first, {**ALICE, "traceparent": trace})
    assert answer.status_code == 202, answer.get_json()
    assert answer.get_json()["traceparent"].split("-")[1] == trace.split("-")[1], "queued in the request's trace"
    again = answer.get_json()
    assert again["uuid"] != first and answer.headers["Location"].endswith(f"/mpc/api/tasks/{again['uuid']}")
    assert (again["rerun_of"], again["reruns"], again["args"], again["priority"], again["timeout"]) == \
        (first, [], {"value": "again", "fail": True}, 3, 20)
    assert controller.store.get(again["uuid"])["tenant"] == "alice"
    assert client.get(answer.headers["Location"], headers=ALICE).get_json()["uuid"] == again["uuid"]
    ended = controller.wait(again["uuid"], timeout=20)
    assert (ended["status"], ended["error"]["message"], ended["rerun_of"]) == ("failed", "again", first)
    # The first task names its reruns, newest first, in its own view (both URLs); a list view does not read them.
    newest = _rerun(client, first).get_json()["uuid"]
    for url in (f"/mpc/api/tasks/{first}", f"/echo/{first}"):
        assert client.get(url, headers=ALICE).get_json()["reruns"] == [newest, again["uuid"]], url
    listed = {t["uuid"]: t for t in client.get("/mpc/api/tasks", headers=ALICE).get_json()["tasks"]}
    assert listed[newest]["rerun_of"] == first and listed[first]["reruns"] is None
    controller.wait(newest, timeout=20)

    # A task that has not ended is refused (409); stopped, it may run again (the Python API asks no hook).
    gate = tmp_path / "gate"
    running = client.post("/echo", json={"value": 1, "gate": str(gate)}, headers=ALICE).get_json()["uuid"]
    wait_until(lambda: controller.status(running)["status"] == "running", 20)
    refused = _rerun(client, running)
    assert refused.status_code == 409 and "only an ended task" in refused.get_json()["message"], refused.get_json()
    with pytest.raises(TaskStillActive):
        controller.rerun(running)
    controller.stop(running)
    assert controller.wait(running, timeout=20)["status"] == "stopped"
    gate.touch()
    rerun = controller.rerun(running)
    assert rerun["rerun_of"] == running and controller.store.get(rerun["uuid"])["tenant"] == "alice"
    succeeded = controller.wait(rerun["uuid"], timeout=20)
    assert (succeeded["status"], succeeded["result"]) == ("succeeded", 1)
    # A succeeded task may run again too; the rerun of a rerun names the one it ran again.
    third = _rerun(client, rerun["uuid"]).get_json()
    assert third["rerun_of"] == rerun["uuid"] and controller.wait(third["uuid"], timeout=20)["status"] == "succeeded"
    assert controller.status(running)["reruns"] == [rerun["uuid"]]


# -- the stores' index of reruns ----------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def any_store(request: Any, tmp_path: Any, redis_server: str) -> Iterator[Any]:
    if request.param == "memory":
        made: Any = MemoryStore()
    elif request.param == "sqlite":
        made = SQLiteStore(str(tmp_path / "reruns.sqlite3"))
    elif request.param == "postgres":
        from flask_multiprocess_controller.store.postgres import PostgresStore

        made = PostgresStore(request.getfixturevalue("postgres_url"))
    else:
        made = RedisStore(redis_server, prefix=f"reruns-{uuid_module.uuid4().hex}:")
    yield made
    made.close()


def _queued(rerun_of: Any = None, controller: str = "c") -> dict[str, Any]:
    return {"uuid": str(uuid_module.uuid4()), "controller": controller, "status": "queued", "priority": 0,
            "args": {}, "created_at": time.time(), "attempt": 0, "stop_requested": False, "rerun_of": rerun_of}


@pytest.mark.timeout(60)
def test_every_store_keeps_rerun_of_and_finds_the_reruns_newest_first(any_store):
    first = _queued()
    reruns = [_queued(first["uuid"]) for _ in range(3)]
    other = _queued(first["uuid"], controller="other")  # another controller's task is not its rerun
    for row in (first, *reruns, other):
        any_store.enqueue([row], -1)
    assert any_store.get(reruns[0]["uuid"])["rerun_of"] == first["uuid"]
    assert any_store.get(first["uuid"])["rerun_of"] is None
    newest_first = [row["uuid"] for row in reversed(reruns)]
    assert any_store.reruns("c", first["uuid"]) == newest_first
    assert any_store.reruns("c", first["uuid"], limit=2) == newest_first[:2]
    assert any_store.reruns("c", reruns[0]["uuid"]) == []
    # A purged rerun leaves the index.
    any_store.request_stop(reruns[1]["uuid"])
    assert any_store.purge("c", any_store.now() + 60) == 1
    assert any_store.reruns("c", first["uuid"]) == [reruns[2]["uuid"], reruns[0]["uuid"]]
    if type(any_store).__name__ == "PostgresStore":  # a schema of a release before the field gets it, indexed
        import psycopg

        with psycopg.connect(any_store.url, autocommit=True) as admin:
            admin.execute("ALTER TABLE mpc.tasks DROP COLUMN rerun_of")
        type(any_store)(any_store.url).close()
        assert any_store.get(first["uuid"])["rerun_of"] is None and any_store.reruns("c", first["uuid"]) == []
        assert any_store._query("SELECT to_regclass('mpc.tasks_rerun_of') IS NOT NULL") == [(True,)]
