"""The dashboard over HTTP: its page and files (package data, CSP, no inline script, relative URLs),
the extension's decorator and tenant hook on it, the per-minute stats, the PATCH and stop-all of the
extension's task API, and a wheel installed in a fresh venv serving it. The browser tests are in
test_dashboard_browser.py."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid as uuid_module
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask, abort, request
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController

from conftest import free_port, wait_until
from serverproc import poll_until

REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "flask_multiprocess_controller" / "static"


class Gate(MetaMPTask):
    """Runs until the file ``gate`` exists (checking for stop requests), then returns ``value``."""

    def execute(self, value: Any = None, gate: str = "") -> Any:
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.01)
        if value == "fail":
            raise ValueError("asked to fail")
        return value


class OtherGate(Gate):
    """The same task under another name, for a second controller (a controller is named after its task)."""


@pytest.fixture
def controllers():
    made: list[MetaMPController] = []

    def make(*args: Any, **kwargs: Any) -> MetaMPController:
        kwargs.setdefault("store", "memory://")
        kwargs.setdefault("stop_grace", 0.5)
        controller = MetaMPController(*args, **kwargs)
        made.append(controller)
        return controller

    yield make
    for controller in made:
        controller.shutdown()


def make_app(controller: MetaMPController, path: str = "/gate", **extension: Any) -> Flask:
    app = Flask(__name__)
    resource = type(f"R{uuid_module.uuid4().hex}", (MetaMPResource,), {})
    Api(app).add_resource(resource, path, f"{path}/<string:uuid>", resource_class_args=(controller,))
    config = extension.pop("config", {})
    app.config.update(config)
    MultiprocessController(app, **extension)
    return app


def wait_status(client: Any, uuid: str, status: str, headers: Any = None) -> dict:
    return poll_until(lambda: client.get(f"/mpc/api/tasks/{uuid}", headers=headers).get_json(),
                      lambda task: task.get("status") == status, timeout=20)


# -- the page and its files ----------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_page_and_files_are_served_with_their_types_and_a_strict_policy(controllers):
    client = make_app(controllers(Gate)).test_client()
    for url, mimetype in (("/mpc/", "text/html"), ("/mpc/dashboard.js", "text/javascript"),
                          ("/mpc/dashboard.css", "text/css")):
        answer = client.get(url)
        assert answer.status_code == 200, url
        assert answer.mimetype == mimetype, url
        policy = answer.headers["Content-Security-Policy"]
        for directive in ("default-src 'self'", "script-src 'self'", "object-src 'none'", "base-uri 'none'",
                          "frame-ancestors 'none'", "style-src 'self'", "connect-src 'self'"):
            assert directive in policy, (url, directive)
        assert "unsafe" not in policy
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get("/mpc").status_code == 308  # to the page's canonical URL, which relative URLs need


def test_the_page_has_no_inline_script_or_style_and_only_relative_urls():
    html = (STATIC / "index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S | re.I)
    assert scripts == [""], "one script element, loaded from a file, with no inline code"
    assert re.search(r"<script\b[^>]*\bsrc=\"dashboard.js\"", html)
    assert not re.search(r"\son[a-z]+\s*=", html, re.I), "no inline event handler"
    assert not re.search(r"\sstyle\s*=|<style\b", html, re.I), "no inline style"
    for url in re.findall(r"(?:src|href)=\"([^\"]*)\"", html):
        assert not url.startswith(("/", "http:", "https:")), f"{url}: the page must work under any prefix"


def test_the_script_builds_the_page_as_text_only():
    script = (STATIC / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "setAttribute(\"on", ".style."):
        assert sink not in script, sink
    # Every URL the script calls is relative to the page (<prefix>/), so any prefix and SCRIPT_NAME work.
    for url in re.findall(r"(?:fetch|api|EventSource)\(\s*\"([^\"]*)\"", script):
        assert not url.startswith("/"), url


@pytest.mark.timeout(30)
def test_the_dashboard_follows_the_prefix_and_the_script_root(controllers):
    app = make_app(controllers(Gate), config={"MPC_URL_PREFIX": "/ops/tasks/"})
    client = app.test_client()
    assert client.get("/ops/tasks/", environ_base={"SCRIPT_NAME": "/app"}).status_code == 200
    assert client.get("/ops/tasks/dashboard.js").status_code == 200
    assert client.get("/ops/tasks/api/stats").status_code == 200
    assert client.get("/mpc/").status_code == 404


# -- the decorator and the tenant hook -----------------------------------------------------------------

def _token_required(view: Any) -> Any:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if request.headers.get("X-Token") != "let-me-in":
            abort(401)
        return view(*args, **kwargs)

    guarded.__name__ = view.__name__
    return guarded


@pytest.mark.timeout(60)
def test_the_decorator_guards_the_dashboard_and_the_new_api(controllers, tmp_path):
    controller = controllers(Gate, max_num_process=1)
    client = make_app(controller, decorator=_token_required).test_client()
    ok = {"X-Token": "let-me-in"}
    gate = str(tmp_path / "gate")
    uuid = client.post("/gate", json={"gate": gate}).get_json()["uuid"]
    for url in ("/mpc/", "/mpc/dashboard.js", "/mpc/dashboard.css", "/mpc/api/stats"):
        assert client.get(url).status_code == 401, url
        assert client.get(url, headers=ok).status_code == 200, url
    assert client.patch(f"/mpc/api/tasks/{uuid}", json={"priority": 3}).status_code == 401
    assert client.delete(f"/mpc/api/tasks?controller={controller.name}&all=true").status_code == 401
    assert controller.status(uuid)["status"] in ("queued", "running"), "refused requests changed nothing"
    assert client.delete(f"/mpc/api/tasks?controller={controller.name}&all=true", headers=ok).status_code == 202
    assert controller.wait(uuid, timeout=20)["status"] == "stopped"


@pytest.mark.timeout(60)
def test_tenants_see_change_and_stop_only_their_own_tasks(controllers, tmp_path):
    controller = controllers(Gate, max_num_process=1, tenant=lambda: request.headers.get("X-Tenant"))
    client = make_app(controller).test_client()
    alice, bob = {"X-Tenant": "alice"}, {"X-Tenant": "bob"}
    gate = str(tmp_path / "gate")
    running = client.post("/gate", json={"gate": gate}, headers=alice).get_json()["uuid"]
    queued = client.post("/gate", json={"gate": gate}, headers=alice).get_json()["uuid"]
    wait_status(client, running, "running", alice)
    ended = client.post("/gate?priority=-1", json={"value": 1}, headers=bob).get_json()["uuid"]
    assert client.patch(f"/mpc/api/tasks/{queued}", json={"priority": 5}, headers=bob).status_code == 404
    assert client.patch(f"/mpc/api/tasks/{running}", json={"status": "paused"}, headers=bob).status_code == 404
    # bob's stop-all stops bob's task only (queued ahead of alice's: lower priority number).
    assert client.delete(f"/mpc/api/tasks?controller={controller.name}&all=true", headers=bob).get_json() == \
        {"stopped": 1, "stopping": 0}
    assert client.get(f"/mpc/api/tasks/{ended}", headers=bob).get_json()["status"] == "stopped"
    assert controller.status(queued)["status"] == "queued" and controller.status(running)["status"] == "running"
    # The chart counts each tenant's ended tasks.
    assert sum(map(sum, client.get("/mpc/api/stats", headers=bob).get_json()["counts"].values())) == 1
    assert sum(map(sum, client.get("/mpc/api/stats", headers=alice).get_json()["counts"].values())) == 0
    answer = client.delete(f"/mpc/api/tasks?controller={controller.name}&all=true", headers=alice)
    assert (answer.status_code, answer.get_json()) == (202, {"stopped": 1, "stopping": 1})
    assert controller.wait(running, timeout=20)["status"] == "stopped"


# -- PATCH and stop-all of the extension's task API ----------------------------------------------------

@pytest.mark.timeout(60)
def test_patch_pauses_resumes_and_reprioritises_as_the_resource_does(controllers, tmp_path):
    controller = controllers(Gate, max_num_process=1)
    client = make_app(controller).test_client()
    gate = tmp_path / "gate"
    running = client.post("/gate", json={"gate": str(gate), "value": 2}).get_json()["uuid"]
    queued = client.post("/gate", json={"value": 3}).get_json()["uuid"]
    wait_status(client, running, "running")
    url = f"/mpc/api/tasks/{running}"
    paused = client.patch(url, json={"status": "paused"})
    assert (paused.status_code, paused.get_json()["status"]) == (200, "paused")
    assert client.patch(url, json={"priority": 1}).status_code == 409, "only a queued task is re-prioritised"
    resumed = client.patch(url, json={"status": "running"})
    assert (resumed.status_code, resumed.get_json()["status"]) == (200, "running")
    moved = client.patch(f"/mpc/api/tasks/{queued}", json={"priority": -4})
    assert (moved.status_code, moved.get_json()["priority"]) == (200, -4)
    assert client.patch(f"/mpc/api/tasks/{queued}", json={"status": "paused"}).status_code == 409
    for bad in ({"status": "stopped"}, {"priority": "high"}, {"priority": 1, "status": "paused"}, {}, [1], {"x": 1}):
        answer = client.patch(url, json=bad)
        assert answer.status_code == 400 and answer.get_json()["message"], bad
    answer = client.patch(url, data="{not json", content_type="application/json")
    assert answer.status_code == 400 and answer.get_json()["message"]
    assert client.patch(f"/mpc/api/tasks/{uuid_module.uuid4()}", json={"priority": 1}).status_code == 404
    assert client.patch("/mpc/api/tasks/not-a-uuid", json={"priority": 1}).status_code in (400, 404)
    gate.touch()
    assert controller.wait(running, timeout=20)["status"] == "succeeded"
    assert client.patch(url, json={"status": "paused"}).status_code == 409


@pytest.mark.timeout(60)
def test_stop_all_answers_as_the_resource_and_refuses_unclear_requests(controllers, tmp_path):
    controller = controllers(Gate, max_num_process=1)
    other = controllers(OtherGate, max_num_process=1)
    app = make_app(controller)
    Api(app).add_resource(type("Other", (MetaMPResource,), {}), "/other", resource_class_args=(other,))
    client = app.test_client()
    gate = str(tmp_path / "gate")
    mine = [client.post("/gate", json={"gate": gate}).get_json()["uuid"] for _ in range(3)]
    theirs = client.post("/other", json={"gate": gate}).get_json()["uuid"]
    wait_status(client, mine[0], "running")
    for query in ("", f"?controller={controller.name}", f"?controller={controller.name}&all=false",
                  "?all=true", "?controller=nobody&all=true", f"?controller={controller.name}&all=maybe"):
        answer = client.delete(f"/mpc/api/tasks{query}")
        assert answer.status_code == 400 and answer.get_json()["message"], query
    assert all(controller.status(u)["status"] in ("queued", "running") for u in mine), "400s stopped nothing"
    answer = client.delete(f"/mpc/api/tasks?controller={controller.name}&all=true")
    assert (answer.status_code, answer.get_json()) == (202, {"stopped": 2, "stopping": 1})
    assert [controller.wait(u, timeout=20)["status"] for u in mine] == ["stopped"] * 3
    assert other.status(theirs)["status"] in ("queued", "running"), "another controller's tasks are left alone"
    assert client.delete(f"/mpc/api/tasks/{theirs}").status_code in (200, 202)
    assert other.wait(theirs, timeout=20)["status"] == "stopped"


@pytest.mark.timeout(60)
def test_a_patch_override_keeps_the_resource_url_and_the_extension_api_keeps_the_default(controllers, tmp_path):
    class Custom(MetaMPController):
        def patch(self, *args: Any, **kwargs: Any) -> Any:
            return {"custom": True}

    controller = Custom(Gate, store="memory://", max_num_process=1, stop_grace=0.5)
    try:
        client = make_app(controller).test_client()
        uuid = client.post("/gate", json={"gate": str(tmp_path / "gate")}).get_json()["uuid"]
        assert client.patch(f"/gate/{uuid}", json={"priority": 1}).get_json() == {"custom": True}
        wait_status(client, uuid, "running")
        assert client.patch(f"/mpc/api/tasks/{uuid}", json={"status": "paused"}).get_json()["status"] == "paused"
        assert client.delete(f"/mpc/api/tasks/{uuid}").status_code == 202
        assert controller.wait(uuid, timeout=20)["status"] == "stopped"
    finally:
        controller.shutdown()


# -- the chart's counts --------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_stats_count_ended_tasks_per_minute_and_outcome(controllers, tmp_path):
    controller = controllers(Gate, max_num_process=2)
    client = make_app(controller).test_client()
    done = client.post("/gate?wait=20", json={"value": 1}).get_json()
    failed = client.post("/gate?wait=20", json={"value": "fail"}).get_json()
    assert (done["status"], failed["status"]) == ("succeeded", "failed")
    stopped = client.post("/gate", json={"gate": str(tmp_path / "gate")}).get_json()["uuid"]
    client.delete(f"/mpc/api/tasks/{stopped}")
    controller.wait(stopped, timeout=20)
    stats = client.get("/mpc/api/stats").get_json()
    assert stats["minutes"] == 60 and stats["step"] == 60
    since, now = (datetime.fromisoformat(stats[key]).timestamp() for key in ("since", "now"))
    assert since + 59 * 60 <= now < since + 60 * 60, "the last minute of the window is the current one"
    assert set(stats["counts"]) == {"succeeded", "failed", "stopped", "timed_out", "lost"}
    assert all(len(counts) == 60 for counts in stats["counts"].values())
    assert {status: sum(counts) for status, counts in stats["counts"].items()} == \
        {"succeeded": 1, "failed": 1, "stopped": 1, "timed_out": 0, "lost": 0}
    assert sum(stats["counts"]["succeeded"][-2:]) == 1, "a task that just ended is in the last minutes"
    assert len(client.get(f"/mpc/api/stats?minutes=5&controller={controller.name}").get_json()["counts"]["failed"]) == 5
    for query in ("minutes=0", "minutes=1441", "minutes=soon", "controller=nobody"):
        answer = client.get(f"/mpc/api/stats?{query}")
        assert answer.status_code == 400 and answer.get_json()["message"], query


# -- shipped in the wheel ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_wheel_installed_in_a_fresh_venv_serves_the_dashboard(tmp_path, pool):
    """Build the wheel from a copy of the sources, install it (not editable) in a new venv, and serve
    the example app with that venv's Python from outside the repository."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE.md", "setup.cfg"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "flask_multiprocess_controller", source / "flask_multiprocess_controller",
                    ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels)], check=True, timeout=90, cwd=tmp_path)
    [wheel] = wheels.glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   timeout=90, cwd=tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(REPO / "examples" / "app.py", run / "app.py")
    (run / "serve.py").write_text(
        "import os, sys\n"
        "import flask_multiprocess_controller as package\n"
        "print('PACKAGE', package.__file__, flush=True)\n"
        "from app import app\n"
        "app.run(host='127.0.0.1', port=int(os.environ['PORT']))\n")
    port = free_port()
    server = pool.start([python, "serve.py"], cwd=run, port=port, log_path=tmp_path / "server.log",
                        ready_path="/mpc/health",
                        env={"PYTHONPATH": "", "PORT": str(port),
                             "MPC_STORE_URL": f"sqlite:///{tmp_path}/tasks.sqlite3"})
    imported = wait_until(lambda: re.search(r"PACKAGE (\S+)", server.log()), timeout=10).group(1)
    assert imported.startswith(str(venv)), f"the package came from {imported}, not the venv"
    for url, mimetype in (("/mpc/", "text/html"), ("/mpc/dashboard.js", "text/javascript"),
                          ("/mpc/dashboard.css", "text/css")):
        answer = requests.get(server.base + url, timeout=10)
        assert answer.status_code == 200, url
        assert answer.headers["Content-Type"].split(";")[0] == mimetype, url
    assert (STATIC / "dashboard.js").read_bytes() == requests.get(server.base + "/mpc/dashboard.js", timeout=10).content
    assert server.stop() == []


@pytest.mark.timeout(30)
def test_the_openapi_document_describes_the_extension_task_api(controllers):
    from openapi_spec_validator import validate

    app = make_app(controllers(Gate), config={"MPC_URL_PREFIX": "/ops"})
    document = app.test_client().get("/ops/openapi.json").get_json()
    validate(document)
    paths = document["paths"]
    assert set(paths["/ops/api/tasks"]) == {"get", "delete"}
    assert {"get", "delete", "patch"} <= set(paths["/ops/api/tasks/{uuid}"])
    assert set(paths["/ops/api/tasks"]["delete"]["responses"]) == {"202", "400", "403", "503"}
    assert set(paths["/ops/api/tasks/{uuid}"]["patch"]["responses"]) == {"200", "400", "403", "404", "409", "413",
                                                                        "503"}
    assert "get" in paths["/ops/api/stats"]
