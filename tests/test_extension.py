"""The Flask extension object: both set-up styles, config and store precedence, the URLs under the
prefix (health, task API) behind the extension's decorator, and tenants."""
from __future__ import annotations

import base64
import importlib
import os
import shutil
import subprocess
import sys
import time
import uuid as uuid_module
from typing import Any

import pytest
from conftest import free_port, wait_until
from flask import Flask, abort, request
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController
from flask_multiprocess_controller.store import resolve_store

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


class Echo(MetaMPTask):
    def execute(self, value: Any = None, gate: str = "") -> Any:
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.01)
        return value


@pytest.fixture
def controllers():
    made: list[MetaMPController] = []

    def make(*args: Any, **kwargs: Any) -> MetaMPController:
        controller = MetaMPController(*args, **kwargs)
        made.append(controller)
        return controller

    yield make
    for controller in made:
        controller.shutdown()


def mount(app: Flask, controller: MetaMPController, path: str = "/echo") -> None:
    Api(app).add_resource(type(f"R{uuid_module.uuid4().hex}", (MetaMPResource,), {}), path, f"{path}/<string:uuid>",
                          resource_class_args=(controller,))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("style", ["app-in-constructor", "init-app-later"])
def test_both_styles_serve_health_and_the_task_api(controllers, tmp_path, style):
    controller = controllers(Echo, store=f"sqlite:///{tmp_path}/t.sqlite3")
    app = Flask(__name__)
    mount(app, controller)
    if style == "app-in-constructor":
        mpc = MultiprocessController(app)
    else:
        mpc = MultiprocessController()
        mpc.init_app(app)
    assert app.extensions["mpc"].extension is mpc
    assert not hasattr(mpc, "app")
    client = app.test_client()
    uuid = client.post("/echo", json={"value": 7}).get_json()["uuid"]
    assert client.get(f"/echo/{uuid}?wait=20").get_json()["status"] == "succeeded"
    health = client.get("/mpc/health")
    assert health.status_code == 200
    body = health.get_json()
    assert body["status"] == "ok"
    entry = body["controllers"][controller.name]
    assert entry == {"running": 0, "queued": 0, "paused": 0, "max_num_process": 1, "max_memory": None,
                     "store": f"sqlite:///{tmp_path}/t.sqlite3", "callbacks_dropped": 0}
    listed = client.get("/mpc/api/tasks").get_json()
    assert [t["uuid"] for t in listed["tasks"] if t["uuid"] == uuid] == [uuid]
    item = client.get(f"/mpc/api/tasks/{uuid}").get_json()
    assert item["result"] == 7 and item["controller"] == controller.name
    assert client.get(f"/mpc/api/tasks/{uuid_module.uuid4()}").status_code == 404
    assert client.delete(f"/mpc/api/tasks/{uuid}").status_code == 409


def test_a_second_init_app_on_one_app_is_refused():
    app = Flask(__name__)
    MultiprocessController(app)
    with pytest.raises(RuntimeError, match="already initialised"):
        MultiprocessController().init_app(app)


@pytest.mark.timeout(60)
def test_a_custom_prefix_and_delete_through_the_api(controllers, tmp_path):
    gate = tmp_path / "gate"
    controller = controllers(Echo, store="memory://", stop_grace=0.2)
    app = Flask(__name__)
    app.config["MPC_URL_PREFIX"] = "/ops/tasks-admin"
    mount(app, controller)
    MultiprocessController(app)
    client = app.test_client()
    assert client.get("/mpc/health").status_code == 404
    assert client.get("/ops/tasks-admin/health").status_code == 200
    running = client.post("/echo", json={"gate": str(gate)}).get_json()["uuid"]
    wait_until(lambda: client.get(f"/echo/{running}").get_json()["status"] == "running", timeout=20)
    queued = client.post("/echo", json={"gate": str(gate)}).get_json()["uuid"]
    stop_queued = client.delete(f"/ops/tasks-admin/api/tasks/{queued}")
    assert stop_queued.status_code == 200 and stop_queued.get_json()["status"] == "stopped"
    stop_running = client.delete(f"/ops/tasks-admin/api/tasks/{running}")
    assert stop_running.status_code == 202 and stop_running.get_json()["status"] == "stopping"
    assert client.get(f"/echo/{running}?wait=20").get_json()["status"] == "stopped"


@pytest.mark.timeout(60)
def test_health_answers_503_while_a_store_is_down(controllers, tmp_path):
    port = free_port()
    redis = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://:s3cret@127.0.0.1:{port}/0"
        import redis as redis_module

        wait_until(lambda: _pings(redis_module.Redis.from_url(f"redis://127.0.0.1:{port}/0")), timeout=10)
        subprocess.run(["redis-cli", "-p", str(port), "CONFIG", "SET", "requirepass", "s3cret"],
                       check=True, capture_output=True)
        controller = controllers(Echo, store=url)
        app = Flask(__name__)
        mount(app, controller)
        MultiprocessController(app)
        client = app.test_client()
        healthy = client.get("/mpc/health").get_json()
        assert healthy["controllers"][controller.name]["store"] == f"redis://:***@127.0.0.1:{port}/0"
        assert "s3cret" not in client.get("/mpc/health").get_data(as_text=True)
    finally:
        redis.terminate()
        redis.wait(10)
    down = client.get("/mpc/health")
    assert down.status_code == 503 and down.headers["Retry-After"] == "1"
    assert down.get_json()["status"] == "unavailable"
    assert down.get_json()["controllers"][controller.name]["status"] == "unavailable"


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # not up yet
        return False


@pytest.mark.timeout(60)
def test_the_extension_decorator_guards_every_extension_url(controllers):
    def token_required(view: Any) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if request.headers.get("X-Token") != "let-me-in":
                abort(401)
            return view(*args, **kwargs)
        guarded.__name__ = view.__name__
        return guarded

    controller = controllers(Echo, store="memory://")
    app = Flask(__name__)
    mount(app, controller)
    MultiprocessController(app, decorator=token_required)
    client = app.test_client()
    uuid = client.post("/echo", json={"value": 1}).get_json()["uuid"]
    # Share links are the exception: their token is their authority (see test_share.py).
    rules = [rule for rule in app.url_map.iter_rules()
             if rule.endpoint.startswith("mpc.") and not rule.endpoint.startswith("mpc.share")]
    assert len(rules) >= 3
    for rule in rules:
        url = rule.rule.replace("<uuid>", uuid)
        method = "GET" if "GET" in (rule.methods or ()) else "POST"  # a rerun is a POST only
        assert client.open(url, method=method).status_code == 401, url
        answered = client.open(url, method=method, headers={"X-Token": "let-me-in"}).status_code
        assert answered in ((200, 404) if method == "GET" else (202, 409)), url
    assert client.delete(f"/mpc/api/tasks/{uuid}").status_code == 401


# -- configuration ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_config_overrides_defaults_but_not_constructor_arguments(controllers, tmp_path, monkeypatch):
    monkeypatch.setenv("MPC_STORE_URL", f"sqlite:///{tmp_path}/from-env.sqlite3")
    defaulted = controllers(Echo)
    explicit = controllers(Echo, store=f"sqlite:///{tmp_path}/explicit.sqlite3", stop_grace=3.0, max_wait=2.0)
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(MPC_STORE_URL="sqlite:///from-config.sqlite3", MPC_STOP_GRACE=1.5, MPC_MAX_WAIT=7,
                      MPC_RETENTION=60, MPC_MAX_CONTENT_LENGTH=1000, MPC_EXPOSE_TRACEBACKS=True)
    mpc = MultiprocessController()  # before mounting: the controllers wait for init_app
    mount(app, defaulted, "/a")
    mount(app, explicit, "/b")
    mpc.init_app(app)
    assert defaulted.store.path == str(tmp_path / "instance" / "from-config.sqlite3")
    assert (defaulted.stop_grace, defaulted.max_wait, defaulted.retention) == (1.5, 7.0, 60.0)
    assert defaulted.max_content_length == 1000 and defaulted.expose_tracebacks is True
    assert explicit.store.path == str(tmp_path / "explicit.sqlite3")
    assert (explicit.stop_grace, explicit.max_wait) == (3.0, 2.0)
    assert explicit.retention == 60.0, "what the constructor left at its default, the config sets"
    assert app.test_client().post("/a", data=b"{" + b" " * 2000 + b"}",
                                  content_type="application/json").status_code == 413
    # Without config, the environment variable names the store.
    assert controllers(Echo, store=None).store.path == str(tmp_path / "from-env.sqlite3")


@pytest.mark.timeout(60)
def test_a_controller_made_before_init_app_runs_nothing_against_the_wrong_store(controllers, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MPC_STORE_URL", raising=False)
    module = tmp_path / "early_app.py"
    module.write_text(EARLY_APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    early = importlib.import_module("early_app")
    try:
        assert not (tmp_path / "mpc-tasks.sqlite3").exists(), "the default store was touched before the config"
        app = early.create_app(str(tmp_path / "instance"))
        client = app.test_client()
        uuid = client.post("/echo", json={"value": 3}).get_json()["uuid"]
        assert client.get(f"/echo/{uuid}?wait=20").get_json()["result"] == 3
        assert (tmp_path / "instance" / "configured.sqlite3").exists()
        assert not (tmp_path / "mpc-tasks.sqlite3").exists()
        assert resolve_store(f"sqlite:///{tmp_path}/instance/configured.sqlite3").get(uuid)["status"] == "succeeded"
    finally:
        early.controller.shutdown()
        sys.modules.pop("early_app", None)


EARLY_APP = '''
from flask import Flask
from flask_restful import Api
from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController


class Echo(MetaMPTask):
    def execute(self, value=None):
        return value


mpc = MultiprocessController()
controller = MetaMPController(Echo)  # at import time: no config exists yet


def create_app(instance_path):
    app = Flask(__name__, instance_path=instance_path)
    app.config["MPC_STORE_URL"] = "sqlite:///configured.sqlite3"
    Api(app).add_resource(MetaMPResource, "/echo", "/echo/<string:uuid>", resource_class_args=(controller,))
    mpc.init_app(app)
    return app
'''


# -- the task API's paging ---------------------------------------------------------------------------

def _rows(controller: str, n: int) -> list[dict]:
    now = time.time()
    return [{"uuid": str(uuid_module.uuid4()), "controller": controller, "status": "queued", "priority": 0,
             "args": {"value": i}, "created_at": now, "timeout": None, "attempt": 0, "stop_requested": False}
            for i in range(n)]


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_the_task_api_pages_through_ten_thousand_tasks(controllers, tmp_path, redis_url, kind):
    url = f"sqlite:///{tmp_path}/paging.sqlite3" if kind == "sqlite" else redis_url
    store = resolve_store(url)
    names = ("pager-a", "pager-b")
    written = []
    for name in names:
        for start in range(0, 5000, 1000):
            rows = _rows(name, 1000)
            store.enqueue(rows, -1)
            written += rows
    a = type("A", (MetaMPController,), {}, controller_name=names[0])(Echo, store=url, role="client")
    b = type("B", (MetaMPController,), {}, controller_name=names[1])(Echo, store=url, role="client")
    controllers_made = [a, b]
    app = Flask(__name__)
    MultiprocessController(app)
    client = app.test_client()
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = "limit=1000" + (f"&before={cursor}" if cursor else "")
        page = client.get(f"/mpc/api/tasks?{query}").get_json()
        seen += [t["uuid"] for t in page["tasks"] if t["controller"] in names]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
        assert pages < 20
    newest_first = [r["uuid"] for r in sorted(written, key=lambda r: r["seq"], reverse=True)]
    assert seen == newest_first
    only_b = client.get(f"/mpc/api/tasks?controller={names[1]}&status=queued&limit=5").get_json()["tasks"]
    written_b = {r["uuid"] for r in written if r["controller"] == names[1]}
    assert [t["uuid"] for t in only_b] == [u for u in newest_first if u in written_b][:5]
    assert client.get("/mpc/api/tasks?status=bogus").status_code == 400
    assert client.get("/mpc/api/tasks?limit=0").status_code == 400
    assert client.get("/mpc/api/tasks?controller=nobody").status_code == 400
    for controller in controllers_made:
        controller.shutdown()
    store.close()


# -- tenants ---------------------------------------------------------------------------------------------

def _auth(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{user}-secret".encode()).decode()}


@pytest.mark.timeout(90)
def test_tenants_cannot_see_or_stop_each_others_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("MPC_STORE_URL", f"sqlite:///{tmp_path}/tenants.sqlite3")
    monkeypatch.syspath_prepend(EXAMPLES)
    sys.modules.pop("tenants_app", None)
    example = importlib.import_module("tenants_app")
    try:
        client = example.app.test_client()
        assert client.get("/reports").status_code == 401
        assert client.get("/mpc/api/tasks").status_code == 401
        alice = client.post("/reports", json={"rows": 200, "pause": 0.05}, headers=_auth("alice")).get_json()["uuid"]
        bob = client.post("/reports", json={"rows": 1}, headers=_auth("bob")).get_json()["uuid"]
        assert client.get(f"/reports/{bob}?wait=20", headers=_auth("bob")).get_json()["status"] == "succeeded"
        for user, own, other in (("alice", alice, bob), ("bob", bob, alice)):
            headers = _auth(user)
            assert client.get(f"/reports/{other}", headers=headers).status_code == 404
            assert client.get(f"/reports?uuid={other}", headers=headers).status_code == 404
            assert client.get(f"/mpc/api/tasks/{other}", headers=headers).status_code == 404
            assert client.delete(f"/reports/{other}", headers=headers).status_code == 404
            assert client.delete(f"/mpc/api/tasks/{other}", headers=headers).status_code == 404
            assert [t["uuid"] for t in client.get("/reports", headers=headers).get_json()["tasks"]] == [own]
            assert [t["uuid"] for t in client.get("/mpc/api/tasks", headers=headers).get_json()["tasks"]] == [own]
            assert client.get(f"/reports/{own}", headers=headers).status_code == 200
        assert example.reports.status(alice)["status"] in ("queued", "running"), "bob's DELETEs did not stop it"
        assert client.delete(f"/mpc/api/tasks/{alice}", headers=_auth("alice")).status_code in (200, 202)
        assert example.reports.wait(alice, timeout=20)["status"] == "stopped"
        # The Python API (and the CLI) see every tenant's tasks.
        assert {t["uuid"] for t in example.reports.tasks()["tasks"]} == {alice, bob}
    finally:
        example.reports.shutdown()
        sys.modules.pop("tenants_app", None)


@pytest.mark.timeout(60)
def test_a_client_controller_runs_nothing_and_needs_a_shared_store(tmp_path, monkeypatch):
    client = MetaMPController(Echo, role="client", store="memory://")
    try:
        with pytest.raises(Exception, match="one process only"):
            client.submit(value=1)
    finally:
        client.shutdown()
    monkeypatch.setenv("MPC_ROLE", "client")
    url = f"sqlite:///{tmp_path}/shared.sqlite3"
    queued_by_client = MetaMPController(Echo, store=url)
    try:
        assert queued_by_client.role == "client" and queued_by_client.forkserver_pid is None
        before = {p.pid for p in psutil_children()}
        uuid = queued_by_client.submit(value=5)
        assert queued_by_client.status(uuid)["status"] == "queued"
        assert {p.pid for p in psutil_children()} == before, "a client starts no process"
        monkeypatch.delenv("MPC_ROLE")
        server = MetaMPController(Echo, store=url)
        try:
            server.tasks()  # a serving process starts and runs what the client queued
            done = queued_by_client.wait(uuid, timeout=20)
            assert done["status"] == "succeeded" and done["result"] == 5
        finally:
            server.shutdown()
    finally:
        queued_by_client.shutdown()
    monkeypatch.setenv("MPC_ROLE", "sometimes")
    with pytest.raises(ValueError, match="MPC_ROLE"):
        MetaMPController(Echo, store="memory://")


def psutil_children() -> list[Any]:
    import psutil

    return psutil.Process().children(recursive=True)
