"""Per-task logs (kept, bounded, followed), the task-event stream over SSE with Last-Event-ID, the OpenAPI
document, schedules and stop-all under the extension's prefix, and their ``flask mpc`` commands."""
from __future__ import annotations

import ctypes
import json
import os
import time
from typing import Any

import pytest
import requests
from conftest import free_port, wait_until
from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController
from flask_multiprocess_controller.store import resolve_store


class Chatty(MetaMPTask):
    """Logs ``lines`` lines of about 1 KiB, writes one line from C, then prints its last line."""

    def execute(self, lines: int = 10, gate: str = "") -> str:
        filler = "z" * 1000
        for i in range(lines):
            self.logger.warning("line %d %s", i, filler)
        libc = ctypes.CDLL(None)
        text = b"written by C\n"
        libc.write(1, text, len(text))
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.01)
        print("the very last line", flush=True)
        return "done"


def _app(controller: MetaMPController) -> Any:
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, "/chatty", "/chatty/<string:uuid>", resource_class_args=(controller,))
    MultiprocessController(app)
    return app


@pytest.mark.timeout(120)
def test_a_tasks_log_is_kept_bounded_and_ends_with_its_last_line(make_controller, sqlite_url):
    controller = make_controller(Chatty, store=sqlite_url)
    app = _app(controller)
    client = app.test_client()
    uuid = client.post("/chatty", json={"lines": 10_000}).get_json()["uuid"]
    assert client.get(f"/chatty/{uuid}?wait=60").get_json()["status"] == "succeeded"
    lines, after = [], 0
    while True:
        page = client.get(f"/mpc/api/tasks/{uuid}/logs?after={after}").get_json()
        if not page["lines"]:
            break
        lines += page["lines"]
        after = page["next"]
    texts = [entry["line"] for entry in lines]
    assert texts[-1] == "the very last line"
    assert "written by C" in texts
    assert sum(len(t) for t in texts) <= 256 * 1024
    assert len(texts) < 10_000, "the oldest lines were dropped"
    assert "line 9999 " in texts[-3]
    assert client.get(f"/mpc/api/tasks/{uuid}/logs").get_json()["lines"][0]["n"] == lines[0]["n"]
    runner = app.test_cli_runner()
    printed = runner.invoke(args=["mpc", "logs", uuid])
    assert printed.exit_code == 0 and printed.output.splitlines()[-1] == "the very last line"


@pytest.mark.timeout(60)
def test_logs_can_be_followed_until_the_task_ends(make_controller, sqlite_url, tmp_path):
    gate = tmp_path / "gate"
    controller = make_controller(Chatty, store=sqlite_url)
    app = _app(controller)
    client = app.test_client()
    uuid = client.post("/chatty", json={"lines": 3, "gate": str(gate)}).get_json()["uuid"]
    wait_until(lambda: client.get(f"/mpc/api/tasks/{uuid}/logs").get_json()["lines"], timeout=20)
    gate.touch()
    followed = client.get(f"/mpc/api/tasks/{uuid}/logs?follow=1")
    assert followed.mimetype == "text/event-stream"
    body = followed.get_data(as_text=True)
    events = [block for block in body.split("\n\n") if block.startswith("id:") or "event: end" in block]
    data = [json.loads(block.split("data: ", 1)[1]) for block in events]
    assert data[-1] == {"status": "succeeded"}
    assert [d["line"] for d in data[:-1]][-1] == "the very last line"
    runner = app.test_cli_runner()
    assert runner.invoke(args=["mpc", "logs", uuid, "--follow"]).output.splitlines()[-1] == "the very last line"


@pytest.mark.timeout(60)
def test_a_purged_task_takes_its_log_with_it(make_controller, sqlite_url):
    controller = make_controller(Chatty, store=sqlite_url, retention=0.01)
    uuid = controller.submit(lines=2)
    assert controller.wait(uuid, timeout=20)["status"] == "succeeded"
    assert controller.store.logs.read(uuid)
    time.sleep(0.05)
    controller.runtime.purge()
    wait_until(lambda: controller.store.logs.read(uuid) == [], timeout=10)


# -- the event stream ---------------------------------------------------------------------------------

def _read_events(response: Any, until: Any, limit: float = 30.0) -> list[dict]:
    """Parse SSE blocks from a streaming requests response until ``until(events)`` or the stream ends."""
    found: list[dict] = []
    block: dict[str, str] = {}
    deadline = time.monotonic() + limit
    for raw in response.iter_lines(decode_unicode=True):
        if raw == "":
            if "event" in block:
                found.append({"id": block.get("id"), "event": block["event"], "data": json.loads(block["data"])})
                if until(found):
                    return found
            block = {}
        elif not raw.startswith(":"):
            key, _, value = raw.partition(": ")
            block[key] = value
        if time.monotonic() > deadline:
            break
    return found


EVENTS_APP = '''
import os
import time

from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController


class Quick(MetaMPTask):
    def execute(self, n: int = 0):
        return n


mpc = MultiprocessController()
quick = MetaMPController(Quick)
app = Flask(__name__)
app.config["MPC_MAX_WAIT"] = 5
Api(app).add_resource(MetaMPResource, "/quick", "/quick/<string:uuid>", resource_class_args=(quick,))
mpc.init_app(app)

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
'''


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_events_resume_with_last_event_id_across_a_server_restart(tmp_path, pool, sqlite_url):
    from serverproc import python

    (tmp_path / "events_app.py").write_text(EVENTS_APP)
    env = {"MPC_STORE_URL": sqlite_url}

    def start() -> str:
        port = free_port()
        pool.start(python(str(tmp_path / "events_app.py")), cwd=tmp_path, port=port,
                   log_path=tmp_path / f"server-{port}.log", env={**env, "PORT": str(port)}, ready_path="/quick")
        return f"http://127.0.0.1:{port}"

    base = start()
    stream = requests.get(f"{base}/mpc/events", stream=True, timeout=30)
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    first = requests.post(f"{base}/quick", json={"n": 1}, timeout=30).json()["uuid"]
    seen = _read_events(stream, lambda evs: any(e["event"] == "ended" and e["data"]["uuid"] == first for e in evs))
    stream.close()
    assert [e["event"] for e in seen if e["data"]["uuid"] == first] == ["queued", "started", "ended"]
    last_id = seen[-1]["id"]
    store = resolve_store(sqlite_url)
    # While no client listens, the server goes away and comes back, and more happens.
    for server in list(pool.servers):
        server.stop()
    offline = [row["uuid"] for row in _enqueue(store, 3)]
    base = start()
    resumed = requests.get(f"{base}/mpc/events", headers={"Last-Event-ID": last_id}, stream=True, timeout=30)
    events = _read_events(resumed, lambda evs: {e["data"]["uuid"] for e in evs if e["event"] == "ended"} >= set(offline))
    resumed.close()
    expected = store.changes(last_id, 0.0).events
    got = [e["id"] for e in events]
    assert [e["cursor"] for e in expected][:len(got)] == got[:len(expected)], "no event lost or reordered"
    assert {e["data"]["uuid"] for e in events if e["event"] == "queued"} >= set(offline)
    too_old = requests.get(f"{base}/mpc/events", headers={"Last-Event-ID": "no-such-cursor"}, stream=True,
                           timeout=30)
    assert _read_events(too_old, lambda evs: True)[0]["event"] == "reset"
    too_old.close()
    store.close()


def _enqueue(store: Any, n: int) -> list[dict]:
    rows = [{"uuid": __import__("uuid").uuid4().__str__(), "controller": "Quick", "status": "queued", "priority": 0,
             "args": {"n": i}, "created_at": time.time(), "timeout": None, "attempt": 0, "stop_requested": False}
            for i in range(n)]
    store.enqueue(rows, -1)
    return rows


@pytest.mark.timeout(60)
def test_the_event_stream_ends_at_max_wait_with_heartbeats_and_filters(make_controller, sqlite_url):
    controller = make_controller(Chatty, store=sqlite_url)
    app = _app(controller)
    app.config["MPC_MAX_WAIT"] = 1
    client = app.test_client()
    assert client.get("/mpc/events?controller=nobody").status_code == 400
    began = time.monotonic()
    body = client.get("/mpc/events").get_data(as_text=True)
    assert time.monotonic() - began < 10
    assert body.startswith("retry: 1000")


# -- the other extension URLs ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_openapi_schedules_and_stop_all_under_the_prefix(make_controller, sqlite_url, tmp_path):
    gate = tmp_path / "gate"
    controller = make_controller(Chatty, store=sqlite_url, max_num_process=1, stop_grace=0.2)
    app = _app(controller)
    client = app.test_client()
    document = client.get("/mpc/openapi.json").get_json()
    assert document["openapi"].startswith("3.1") and "/chatty" in document["paths"]
    controller.schedule("hourly", every=3600, kwargs={"lines": 1})
    listed = client.get("/mpc/api/schedules").get_json()["schedules"]
    assert [s["name"] for s in listed] == ["hourly"]
    runner = app.test_cli_runner()
    assert "hourly" in runner.invoke(args=["mpc", "schedules"]).output
    running = client.post("/chatty", json={"gate": str(gate)}).get_json()["uuid"]
    wait_until(lambda: controller.status(running)["status"] == "running", timeout=20)
    queued = [client.post("/chatty", json={"gate": str(gate)}).get_json()["uuid"] for _ in range(3)]
    stopped = runner.invoke(args=["mpc", "stop", "--all", "--controller", controller.name])
    assert stopped.exit_code == 0, stopped.output
    assert "Stopped 3 queued task(s); 1 running task(s) are stopping." in stopped.output
    assert controller.wait(running, timeout=20)["status"] == "stopped"
    assert all(controller.status(u)["status"] == "stopped" for u in queued)
    assert runner.invoke(args=["mpc", "stop", "--all"]).exit_code != 0
