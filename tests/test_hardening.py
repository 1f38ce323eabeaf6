"""Hostile and oversized input, and trust between processes: bounded payloads, nothing leaked to
clients, and no process signalled on a stored row's word."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

import psutil
import pytest
from conftest import wait_until
from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask
from flask_multiprocess_controller.engine import runtime as runtime_module
from flask_multiprocess_controller.engine.proctree import task_process_name
from flask_multiprocess_controller.engine.owners import host_id, owner_alive
from flask_multiprocess_controller.store import resolve_store

TERMINAL = {"succeeded", "failed", "stopped", "timed_out", "lost"}


class Returns(MetaMPTask):
    """Returns what it is told to, after reporting the progress it is told to."""

    def execute(self, size: int = 0, nan: bool = False, progress: list = [], gate: str = "",  # noqa: B006
                args_blob: str = "") -> Any:
        for value in progress:
            self.upload_status(float(value) if value in ("nan", "inf") else value)
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.01)
        if nan:
            return {"score": float("nan")}
        return "x" * size


class Fails(MetaMPTask):
    def execute(self) -> None:
        raise KeyError("secret path /srv/app/config.py")


class Chatty(MetaMPTask):
    """Logs ``lines`` lines of 1 KiB as fast as it can."""

    def execute(self, lines: int = 1000) -> int:
        line = "y" * 1024
        for i in range(lines):
            self.logger.warning("%d %s", i, line)
        return lines


def mount(controller: MetaMPController, debug: bool = False) -> Any:
    app = Flask(__name__)
    app.debug = debug
    Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))
    return app.test_client()


# -- 1. sizes of results and progress --------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_result_over_max_result_size_fails_and_is_not_stored(make_controller):
    controller = make_controller(Returns, max_result_size=10_000)
    small = controller.wait(controller.submit(size=9_000), timeout=30)
    assert small["status"] == "succeeded" and len(small["result"]) == 9_000
    big = controller.wait(controller.submit(size=20_000), timeout=30)
    assert big["status"] == "failed" and big["result"] is None
    assert big["error"]["type"] == "ResultTooLarge"
    assert "10000 bytes" in big["error"]["message"]


@pytest.mark.timeout(60)
def test_the_default_result_limit_is_one_mebibyte(make_controller):
    controller = make_controller(Returns)
    task = controller.wait(controller.submit(size=2 * 1024 * 1024), timeout=30)
    assert task["status"] == "failed" and task["error"]["type"] == "ResultTooLarge"


@pytest.mark.timeout(60)
def test_a_nan_result_fails_as_not_serialisable(make_controller):
    controller = make_controller(Returns)
    client = mount(controller)
    uuid = client.post("/tasks", json={"nan": True}).get_json()["uuid"]
    answer = client.get(f"/tasks/{uuid}?wait=20")
    assert answer.get_json()["status"] == "failed"
    assert answer.get_json()["error"]["type"] == "ResultNotSerializable"
    assert b"NaN" not in answer.data


@pytest.mark.timeout(60)
def test_oversized_and_non_finite_progress_is_refused_and_the_previous_value_stays(make_controller, caplog):
    caplog.set_level(logging.WARNING)
    controller = make_controller(Returns, max_progress_size=1000)
    uuid = controller.submit(progress=["first", "z" * 2000, "nan", "inf", {"deep": ["z" * 2000]}])
    task = controller.wait(uuid, timeout=30)
    assert task["status"] == "succeeded", task
    assert task["progress"] == "first"
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 4, refused
    assert all(uuid in line for line in refused)


@pytest.mark.timeout(60)
def test_the_list_view_clips_large_values_and_the_item_url_gives_them_whole(make_controller):
    controller = make_controller(Returns)
    client = mount(controller)
    blob = "b" * 10_000
    uuid = client.post("/tasks", json={"args_blob": blob, "size": 5_000}).get_json()["uuid"]
    client.get(f"/tasks/{uuid}?wait=20")
    item = [t for t in client.get("/tasks").get_json()["tasks"] if t["uuid"] == uuid][0]
    assert item["args"] is None and item["result"] is None
    assert sorted(item["truncated"]) == ["args", "result"]
    whole = client.get(f"/tasks/{uuid}").get_json()
    assert whole["args"]["args_blob"] == blob and len(whole["result"]) == 5_000
    assert "truncated" not in whole


# -- 2. bulk posts ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_bulk_post_over_max_bulk_is_413_and_queues_nothing(make_controller):
    controller = make_controller(Returns, max_bulk=10)
    client = mount(controller)
    answer = client.post("/tasks", json=[{"gate": "/nonexistent"}] * 11)
    assert answer.status_code == 413 and "limit is 10" in answer.get_json()["message"]
    assert client.get("/tasks").get_json()["tasks"] == []


@pytest.mark.timeout(60)
def test_a_bulk_post_asks_the_store_for_one_position(make_controller, monkeypatch, tmp_path):
    controller = make_controller(Returns, max_num_process=1, stop_grace=0.2)
    gate = str(tmp_path / "gate")
    busy = controller.submit(gate=gate)  # holds the only slot, so the bulk stays queued as posted
    wait_until(lambda: controller.status(busy)["status"] == "running", timeout=20)
    calls = []
    original = type(controller.store).position
    monkeypatch.setattr(type(controller.store), "position",
                        lambda self, row: calls.append(row["uuid"]) or original(self, row))
    tasks = mount(controller).post("/tasks", json=[{"gate": gate}] * 500).get_json()["tasks"]
    assert len(calls) == 1
    assert [t["position"] for t in tasks] == list(range(1, 501))
    monkeypatch.undo()
    assert [controller.status(t["uuid"])["position"] for t in (tasks[0], tasks[-1])] == [1, 500]
    open(gate, "w").close()
    assert controller.wait(tasks[-1]["uuid"], timeout=60)["status"] == "succeeded"


# -- 3. long polls are clamped ---------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_long_wait_is_clamped_to_max_wait(make_controller, tmp_path):
    gate = tmp_path / "gate"
    controller = make_controller(Returns, max_wait=0.5)
    client = mount(controller)
    uuid = client.post("/tasks", json={"gate": str(gate)}).get_json()["uuid"]
    answer = client.get(f"/tasks/{uuid}?wait=3600")
    assert answer.status_code == 200 and answer.get_json()["status"] in ("queued", "running")
    posted = client.post("/tasks?wait=3600", json={"gate": str(gate)})
    assert posted.status_code == 202  # not finished within the clamped wait
    gate.touch()
    assert controller.wait(uuid, timeout=20)["status"] == "succeeded"
    assert controller.wait(posted.get_json()["uuid"], timeout=20)["status"] == "succeeded"


def test_the_default_max_wait_is_below_gunicorns_default_timeout():
    from flask_multiprocess_controller import defaults

    assert defaults.MAX_WAIT == 25.0


# -- 4. callbacks to a receiver that never answers --------------------------------------------------

@pytest.mark.timeout(60)
def test_shutdown_does_not_wait_for_a_receiver_that_never_answers(make_controller):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(100)  # connections are accepted by the kernel, and never answered
    try:
        controller = make_controller(Returns, callback_url=f"http://127.0.0.1:{silent.getsockname()[1]}/hook",
                                     stop_grace=0.5)
        uuids = [controller.submit() for _ in range(20)]
        for uuid in uuids:
            assert controller.wait(uuid, timeout=30)["status"] == "succeeded"
        began = time.monotonic()
        controller.shutdown()
        # stop_grace + one callback attempt (5 s) + the shutdown margin, whatever is queued
        assert time.monotonic() - began < 0.5 + 5 + 3 + 2
    finally:
        silent.close()


# -- 5. a task that logs faster than the handlers write ----------------------------------------------

class _Slow(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        time.sleep(0.001)


@pytest.mark.timeout(120)
def test_a_flood_of_task_logs_is_dropped_not_held(make_controller, caplog):
    slow = _Slow()
    task_logger = logging.getLogger("Chatty")
    task_logger.addHandler(slow)
    try:
        controller = make_controller(Chatty)
        before = psutil.Process().memory_info().rss
        uuid = controller.submit(lines=60_000)
        assert controller.wait(uuid, timeout=90)["status"] == "succeeded"
        grown = psutil.Process().memory_info().rss - before
        began = time.monotonic()
        controller.shutdown()
        assert time.monotonic() - began < 10
    finally:
        task_logger.removeHandler(slow)
    assert grown < 60 * 1024 * 1024, f"the server grew by {grown} bytes"
    assert slow.count < 60_000
    assert any("dropped" in r.getMessage() for r in caplog.records)


# -- 6. tracebacks ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_tracebacks_are_hidden_from_clients_unless_exposed(make_controller):
    hidden = make_controller(Fails)
    client = mount(hidden)
    uuid = client.post("/tasks", json={}).get_json()["uuid"]
    task = client.get(f"/tasks/{uuid}?wait=20").get_json()
    assert task["error"]["type"] == "KeyError" and "secret path" in task["error"]["message"]
    assert task["error"]["traceback"] is None
    assert client.get("/tasks").get_json()["tasks"][0]["error"]["traceback"] is None
    assert "Traceback" in hidden.status(uuid)["error"]["traceback"], "the Python API keeps it"
    assert mount(hidden, debug=True).get(f"/tasks/{uuid}").get_json()["error"]["traceback"]
    exposed = make_controller(Fails, expose_tracebacks=True)
    client = mount(exposed)
    uuid = client.post("/tasks", json={}).get_json()["uuid"]
    assert "Traceback" in client.get(f"/tasks/{uuid}?wait=20").get_json()["error"]["traceback"]


@pytest.mark.timeout(60)
def test_callbacks_carry_no_traceback_unless_exposed(make_controller):
    from test_lifecycle import Receiver

    with Receiver() as receiver:
        controller = make_controller(Fails, callback_url=receiver.url)
        uuid = controller.submit()
        assert controller.wait(uuid, timeout=20)["status"] == "failed"
        ended = wait_until(lambda: receiver.events(uuid).get("ended"), timeout=20)
        assert ended["task"]["error"]["type"] == "KeyError"
        assert ended["task"]["error"]["traceback"] is None
        controller.shutdown()


# -- 7. hostile JSON ---------------------------------------------------------------------------------

def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.timeout(60)
@pytest.mark.parametrize("store", ["memory://", "sqlite"])
def test_hostile_bodies_and_options_get_a_400(make_controller, sqlite_url, store):
    controller = make_controller(Returns, store=sqlite_url if store == "sqlite" else store)
    client = mount(controller)
    for body in ('{"self": 1}', '{"progress": ' + _nested(500) + '}', '{"progress": ' + _nested(900) + '}',
                 '{"progress": ' + _nested(101) + '}', '{"size": NaN}', '{"size": Infinity}',
                 '{"size": -Infinity}'):
        answer = client.post("/tasks", data=body, content_type="application/json")
        assert answer.status_code == 400, (body[:40], answer.status_code, answer.get_data(as_text=True)[:200])
        assert answer.get_json()["message"]
        assert "Traceback" not in answer.get_data(as_text=True)
    for option in ("timeout=inf", "timeout=nan", "wait=inf", "timeout=-1", "wait=1e999"):
        answer = client.post(f"/tasks?{option}", json={})
        assert answer.status_code == 400, option
    ok = client.post("/tasks", json={"progress": json.loads(_nested(99))})
    assert ok.status_code == 202, ok.get_data(as_text=True)
    assert controller.wait(ok.get_json()["uuid"], timeout=20)["status"] == "succeeded"
    assert all(t["status"] in TERMINAL for t in controller.tasks()["tasks"]), "nothing else was queued"


# -- 8. the store's word is not enough to kill a process ----------------------------------------------

def _dead_owner() -> str:
    dead = subprocess.Popen(["true"])
    dead.wait()
    return f"{host_id()}:{dead.pid}:1.000"


@pytest.mark.timeout(60)
def test_reconciliation_does_not_kill_a_process_a_row_merely_names(make_controller, sqlite_url):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store = resolve_store(sqlite_url)
        row = {"uuid": "00000000-0000-4000-8000-000000000001", "controller": "Returns", "status": "queued",
               "priority": 0, "args": {}, "created_at": time.time(), "timeout": None, "attempt": 0,
               "stop_requested": False}
        store.enqueue([row], -1)
        owner = _dead_owner()
        store.claim("Returns", owner, 1)
        store.start(row["uuid"], owner, bystander.pid, psutil.Process(bystander.pid).create_time())
        controller = make_controller(Returns, store=sqlite_url)  # reconciles at start
        assert controller.status(row["uuid"])["status"] == "lost"
        assert bystander.poll() is None, "a process that does not carry the task's name was killed"
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.timeout(60)
def test_a_task_process_carries_its_tasks_name(make_controller, tmp_path):
    gate = tmp_path / "gate"
    controller = make_controller(Returns)
    uuid = controller.submit(gate=str(gate))
    task = wait_until(lambda: (t := controller.status(uuid))["pid"] and t, timeout=20)
    # The process takes the name once it received its task, which may be just after its pid was recorded.
    wait_until(lambda: psutil.Process(task["pid"]).name() == task_process_name(uuid), timeout=10)
    gate.touch()
    assert controller.wait(uuid, timeout=20)["status"] == "succeeded"


# -- 9. hosts in other pid namespaces ---------------------------------------------------------------

@pytest.mark.timeout(60)
def test_the_default_host_identity_differs_in_another_pid_namespace(monkeypatch):
    monkeypatch.delenv("MPC_HOST_ID", raising=False)
    if not os.path.exists("/usr/bin/unshare"):
        pytest.fail("unshare (util-linux) is needed for this test")
    code = "from flask_multiprocess_controller.engine.owners import host_id; print(host_id())"
    inside = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=30, env={**os.environ, "MPC_HOST_ID": ""})
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.strip() != host_id()
    assert inside.stdout.strip().split("/")[0] == host_id().split("/")[0], "same host name"
    # So a process of the other namespace is judged by its heartbeat, not by this process table.
    other = f"{inside.stdout.strip()}:1:{time.time():.3f}"
    assert owner_alive(other, host_id(), {other: 100.0}, now=101.0, lease=3.0)
    assert not owner_alive(other, host_id(), {other: 100.0}, now=110.0, lease=3.0)


# -- 10. leases are judged on the store's clock ------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_skewed_local_clock_does_not_make_a_live_host_look_dead(make_controller, redis_url, monkeypatch):
    store = resolve_store(redis_url)
    row = {"uuid": "00000000-0000-4000-8000-000000000002", "controller": "Returns", "status": "queued",
           "priority": 0, "args": {}, "created_at": time.time(), "timeout": None, "attempt": 0,
           "stop_requested": False}
    store.enqueue([row], -1)
    other_host = "elsewhere:4242:1.000"
    store.claim("Returns", other_host, 1)
    store.heartbeat(other_host)
    controller = make_controller(Returns, store=redis_url, lease=3.0)
    real_time = time.time
    monkeypatch.setattr(runtime_module.time, "time", lambda: real_time() + 3600)  # this host's clock is off
    controller.runtime.reconcile()
    assert controller.status(row["uuid"])["status"] == "running"
    store.close()


# -- 12. no nudge socket to abuse --------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_the_server_listens_on_no_unix_datagram_socket(make_controller, sqlite_url):
    make_controller(Returns, store=sqlite_url)
    datagram = [c for c in psutil.Process().net_connections(kind="unix") if c.type == socket.SOCK_DGRAM]
    assert datagram == []


# -- 13. no signal to a reaped pid ------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_normal_end_signals_no_process(make_controller, monkeypatch):
    signalled: list[tuple[str, int]] = []
    real_killpg, real_kill = os.killpg, os.kill
    monkeypatch.setattr(os, "killpg", lambda pid, sig: signalled.append(("killpg", pid)) or real_killpg(pid, sig))
    monkeypatch.setattr(os, "kill", lambda pid, sig: signalled.append(("kill", pid)) or real_kill(pid, sig))
    controller = make_controller(Returns)
    pids = set()
    for _ in range(3):
        task = controller.wait(controller.submit(), timeout=20)
        assert task["status"] == "succeeded"
        pids.add(task["pid"])
    assert not [s for s in signalled if s[1] in pids], signalled


@pytest.mark.timeout(30)
def test_a_query_priority_out_of_range_is_refused_whatever_the_body_says(make_controller):
    client = mount(make_controller(Returns))
    for body in ({}, {"priority": 1}):
        answer = client.post(f"/tasks?priority={2 ** 63}", json=body)
        assert answer.status_code == 400 and "between" in answer.get_json()["message"], answer.get_data(as_text=True)
    assert client.get("/tasks").get_json()["tasks"] == [], "nothing was queued"
