"""Pauses that end, timeouts that count, health that sees pauses, and who may change a task.

Real task processes on real stores: a task paused longer than ``max_pause`` is resumed (or stopped,
with ``pause_expiry="stop"``) by the serving process that supervises it, also when the pause was
written by another process; a paused task still times out; ``/mpc/health`` counts paused tasks in
every store; the ``can_change`` hook refuses PATCH and DELETE with 403 and leaves the task as it was.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import wait_until
from flask import Flask, request
from flask_restful import Api

from flask_multiprocess_controller import (
    MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController, TaskAlreadyFinished,
)
from flask_multiprocess_controller.store import resolve_store
from flask_multiprocess_controller.store.redis import RedisStore


class Count(MetaMPTask):
    """Counts into ``path`` (checkpointing) until ``gate`` exists, then returns the count."""

    def execute(self, path: str, gate: str = "") -> int:
        count = 0
        while not (gate and os.path.exists(gate)):
            count += 1
            with open(path + ".tmp", "w") as out:
                out.write(str(count))
            os.replace(path + ".tmp", path)
            self.checkpoint()
            time.sleep(0.01)
        return count


def read_count(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except FileNotFoundError:
        return 0


def suspended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


def feed_kinds(controller: MetaMPController, uuid: str) -> list[tuple[str, Any]]:
    """The kinds and emitters of the task's events, oldest first."""
    store = controller.store
    events = store.changes("0-0" if isinstance(store, RedisStore) else "0", limit=10_000).events
    return [(e["kind"], e["emitter"]) for e in events if e["uuid"] == uuid]


def mounted(controller: MetaMPController, extension: bool = False) -> Any:
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))
    if extension:
        MultiprocessController(app)
    return app.test_client()


# -- max_pause ----------------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_pause_written_by_another_process_ends_after_max_pause(make_controller, sqlite_url, tmp_path):
    controller = make_controller(Count, store=sqlite_url, max_pause=1.0, stop_grace=0.5)
    counts, gate = tmp_path / "count", tmp_path / "gate"
    uuid = controller.submit(path=str(counts), gate=str(gate))
    wait_until(lambda: read_count(counts) > 3, 20)
    pid = controller.status(uuid)["pid"]
    # Another serving process's PATCH: written to the shared store, learnt by this one through the change feed.
    elsewhere = resolve_store(sqlite_url)
    try:
        elsewhere.pause(uuid, emitter="another-process")
    finally:
        elsewhere.close()
    wait_until(lambda: suspended(pid), 10)
    frozen = read_count(counts)
    # Resumed by the supervising process once the pause lasted max_pause: an ordinary 'resumed' event.
    wait_until(lambda: controller.status(uuid)["status"] == "running", 15)
    wait_until(lambda: read_count(counts) > frozen + 3, 10)
    assert not suspended(pid)
    owner = controller.runtime.owner
    assert ("paused", "another-process") in feed_kinds(controller, uuid)
    assert ("resumed", owner) in feed_kinds(controller, uuid), feed_kinds(controller, uuid)
    gate.touch()
    task = controller.wait(uuid, timeout=20)
    assert task["status"] == "succeeded" and task["result"] > frozen, task


@pytest.mark.timeout(60)
def test_with_pause_expiry_stop_a_long_pause_stops_the_task(make_client, sqlite_url, tmp_path):
    client, controller = make_client(Count, store=sqlite_url, max_pause=1.0, pause_expiry="stop", stop_grace=0.5)
    counts = tmp_path / "count"
    uuid = client.post("/tasks", json={"path": str(counts)}).json["uuid"]
    wait_until(lambda: read_count(counts) > 3, 20)
    paused = client.patch(f"/tasks/{uuid}", json={"status": "paused"})
    assert paused.status_code == 200 and paused.json["status"] == "paused", paused.json
    task = controller.wait(uuid, timeout=20)
    assert task["status"] == "stopped", task
    assert task["error"]["type"] == "PauseExpired" and "max_pause" in task["error"]["message"], task
    assert ("stopping", controller.runtime.owner) in feed_kinds(controller, uuid)


@pytest.mark.timeout(60)
def test_a_paused_task_still_times_out(make_controller, tmp_path):
    controller = make_controller(Count, timeout=1.5, stop_grace=0.5)  # max_pause: the default hour
    counts = tmp_path / "count"
    uuid = controller.submit(path=str(counts))
    wait_until(lambda: read_count(counts) > 0, 20)
    assert controller.pause(uuid)["status"] == "paused"
    task = controller.wait(uuid, timeout=20)
    assert task["status"] == "timed_out" and task["error"]["type"] == "TaskTimeout", task


def test_pause_settings_are_checked_and_read_from_the_app(make_controller):
    for bad in (dict(max_pause=-1), dict(max_pause=float("nan")), dict(max_pause="soon"), dict(max_pause=True),
                dict(pause_expiry="kill"), dict(timeout_while_paused="no"), dict(can_change="admin")):
        with pytest.raises((TypeError, ValueError)):
            MetaMPController(Count, store="memory://", **bad)
    unlimited = MetaMPController(None, max_pause=0)
    unlimited.shutdown()
    assert unlimited.max_pause is None, "0: no limit"
    controller = make_controller(Count)
    given = make_controller(Count, max_pause=7.0)
    app = Flask(__name__)
    app.config.update(MPC_MAX_PAUSE="30", MPC_PAUSE_EXPIRY="stop", MPC_TIMEOUT_WHILE_PAUSED="false")
    MultiprocessController(app)
    assert (controller.max_pause, controller.pause_expiry, controller.timeout_while_paused) == (30.0, "stop", False)
    settings = controller.runtime.config.supervision
    assert (settings.max_pause, settings.pause_expiry, settings.timeout_while_paused) == (30.0, "stop", False)
    assert given.max_pause == 7.0, "the constructor's word wins over the app's"
    make_controller(Count)  # not bound yet: the next app's configuration is read for it
    app = Flask(__name__)
    app.config["MPC_PAUSE_EXPIRY"] = "kill"
    with pytest.raises(ValueError, match="MPC_PAUSE_EXPIRY"):
        MultiprocessController(app)


# -- health ---------------------------------------------------------------------------------------------------------

@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def any_store(request, tmp_path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/tasks.sqlite3"
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return request.getfixturevalue("redis_url")


@pytest.mark.timeout(60)
def test_health_counts_paused_tasks(make_controller, any_store, tmp_path):
    controller = make_controller(Count, store=any_store, max_num_process=2, stop_grace=0.5)
    client = mounted(controller, extension=True)
    counts = tmp_path / "count"
    paused = client.post("/tasks", json={"path": str(counts)}).json["uuid"]
    running = client.post("/tasks", json={"path": str(tmp_path / "other")}).json["uuid"]
    wait_until(lambda: read_count(counts) > 0, 20)
    assert client.patch(f"/tasks/{paused}", json={"status": "paused"}).json["status"] == "paused"
    entry = client.get("/mpc/health").get_json()["controllers"][controller.name]
    assert (entry["paused"], entry["running"], entry["queued"]) == (1, 1, 0), entry
    client.delete("/tasks?all=true")
    for uuid in (paused, running):
        assert controller.wait(uuid, timeout=20)["status"] == "stopped"
    entry = client.get("/mpc/health").get_json()["controllers"][controller.name]
    assert (entry["paused"], entry["running"]) == (0, 0), entry


# -- can_change -------------------------------------------------------------------------------------------------------

class Referee:
    """A can_change hook: only a request with ``X-Role: admin`` may change a task; every call is kept."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any, Any]] = []

    def __call__(self, action: str, task: dict) -> bool:
        self.calls.append((action, task["uuid"], task["status"], task.get("tenant")))
        return request.headers.get("X-Role") == "admin"


ADMIN = {"X-Role": "admin"}


@pytest.mark.timeout(60)
def test_can_change_refuses_patch_and_delete_with_403_and_changes_nothing(make_controller, tmp_path):
    referee = Referee()
    controller = make_controller(Count, max_num_process=1, stop_grace=0.5, can_change=referee,
                                 tenant=lambda: request.headers.get("X-Tenant"))
    client = mounted(controller, extension=True)
    counts, gate = tmp_path / "count", tmp_path / "gate"
    headers = {"X-Tenant": "acme"}
    running = client.post("/tasks", json={"path": str(counts), "gate": str(gate)}, headers=headers).json["uuid"]
    queued = client.post("/tasks", json={"path": str(tmp_path / "q"), "gate": str(gate)}, headers=headers).json["uuid"]
    wait_until(lambda: read_count(counts) > 0, 20)

    def refused(response: Any) -> None:
        assert response.status_code == 403, (response.status_code, response.get_json())
        assert "may not" in response.get_json()["message"], response.get_json()

    refused(client.patch(f"/tasks/{running}", json={"status": "paused"}, headers=headers))
    refused(client.patch(f"/mpc/api/tasks/{running}", json={"status": "paused"}, headers=headers))
    refused(client.patch(f"/tasks/{queued}", json={"priority": -5}, headers=headers))
    refused(client.delete(f"/tasks/{running}", headers=headers))
    refused(client.delete(f"/tasks/{queued}", headers=headers))
    refused(client.delete(f"/mpc/api/tasks/{running}", headers=headers))
    refused(client.delete("/tasks?all=true", headers=headers))
    refused(client.delete(f"/mpc/api/tasks?controller={controller.name}&all=true", headers=headers))
    assert ("pause", running, "running", "acme") in referee.calls, "called with the action and the task"
    assert {call[0] for call in referee.calls} == {"pause", "priority", "stop"}
    # Nothing changed.
    assert controller.status(running)["status"] == "running"
    assert (controller.status(queued)["status"], controller.status(queued)["priority"]) == ("queued", 0)
    before = read_count(counts)
    wait_until(lambda: read_count(counts) > before, 10)

    # Allowed: the usual answers.
    paused = client.patch(f"/tasks/{running}", json={"status": "paused"}, headers={**headers, **ADMIN})
    assert (paused.status_code, paused.json["status"]) == (200, "paused")
    refused(client.patch(f"/mpc/api/tasks/{running}", json={"status": "running"}, headers=headers))
    assert controller.status(running)["status"] == "paused"
    assert ("resume", running, "paused", "acme") in referee.calls
    resumed = client.patch(f"/mpc/api/tasks/{running}", json={"status": "running"}, headers={**headers, **ADMIN})
    assert (resumed.status_code, resumed.get_json()["status"]) == (200, "running")
    moved = client.patch(f"/tasks/{queued}", json={"priority": -5}, headers={**headers, **ADMIN})
    assert (moved.status_code, moved.json["priority"]) == (200, -5)
    stopped = client.delete("/tasks?all=true", headers={**headers, **ADMIN})
    assert (stopped.status_code, stopped.json) == (202, {"stopped": 1, "stopping": 1})
    # The Python API is not a request: the hook is not asked.
    calls = len(referee.calls)
    assert controller.wait(running, timeout=20)["status"] == "stopped"
    with pytest.raises(TaskAlreadyFinished):
        controller.stop(running)  # finished (409), not refused
    assert len(referee.calls) == calls


def test_the_openapi_document_names_the_403():
    from flask_multiprocess_controller.http.openapi import extension_paths

    paths = extension_paths("/mpc")
    assert "403" in paths["/mpc/api/tasks/{uuid}"]["patch"]["responses"]
    assert "403" in paths["/mpc/api/tasks/{uuid}"]["delete"]["responses"]
    assert "403" in paths["/mpc/api/tasks"]["delete"]["responses"]
