"""Draining a host: its serving processes claim no new task while their running tasks go on; undraining
lets them claim again at once.

In one process through the extension's URLs, then with real servers on a shared store (SQLite, Redis):
two "hosts" (``MPC_HOST_ID``) where the host that is not drained runs what the drained one leaves queued,
drained through HTTP and through ``flask mpc drain``/``undrain``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import wait_until
from flask import Flask, abort, request
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController

from serverproc import JOB_APP, JobApi, Server, ServerPool, free_port, poll_until, python
from serverproc import task_processes, unexpected_tracebacks

HTTP_TIMEOUT = 30.0


class Gated(MetaMPTask):
    def execute(self, value: int = 0, gate: str = "") -> int:
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.01)
        return value


def _authorised() -> None:
    if request.headers.get("X-Token") != "let-me-in":
        abort(401)


def guarded(view: Any) -> Any:
    """The extension's ``decorator=``: an operator token."""
    import functools

    @functools.wraps(view)
    def checked(*args: Any, **kwargs: Any) -> Any:
        _authorised()
        return view(*args, **kwargs)

    return checked


TOKEN = {"X-Token": "let-me-in"}


@pytest.fixture
def served(tmp_path):
    controller = MetaMPController(Gated, store=f"sqlite:///{tmp_path}/drain.sqlite3", max_num_process=2,
                                  stop_grace=0.2)
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, "/gated", "/gated/<string:uuid>", resource_class_args=(controller,))
    MultiprocessController(app, decorator=guarded)
    yield app.test_client(), controller
    controller.shutdown()


@pytest.mark.timeout(60)
def test_drain_and_undrain_this_host_through_the_extension(served, tmp_path):
    client, controller = served
    runtime = controller.runtime
    host = runtime.host
    assert "/" in host  # the default host id: the path converter takes it whole
    url = f"/mpc/api/hosts/{host}/drain"
    running = controller.submit(value=1, gate=str(tmp_path / "gate"))
    wait_until(lambda: controller.status(running)["status"] == "running", timeout=20)

    assert client.post(url).status_code == 401  # behind the decorator like every /mpc URL
    drained = client.post(url, headers=TOKEN)
    assert drained.status_code == 200, drained.get_data(as_text=True)
    body = drained.get_json()
    assert body["host"] == host and body["drained"] is True and body["since"], body
    assert runtime.host_drained, "the process that drains takes the flag at once"
    assert client.post(url, headers=TOKEN).get_json() == body, "draining again keeps the first since"
    assert client.get(url, headers=TOKEN).get_json() == body
    health = client.get("/mpc/health", headers=TOKEN).get_json()
    assert health["drained_hosts"] == [body]
    assert health["this_process"] == {"host": host, "host_drained": True}

    waiting = controller.submit(value=2)
    assert controller.status(waiting)["status"] == "queued"
    (tmp_path / "gate").touch()
    assert controller.wait(running, timeout=20)["status"] == "succeeded", "a running task goes on"
    assert controller.status(waiting)["status"] == "queued", "its end freed a place, which the drain keeps"

    undrained = client.delete(url, headers=TOKEN)
    assert undrained.status_code == 200
    assert undrained.get_json() == {"host": host, "drained": False, "since": None}
    assert client.get(url, headers=TOKEN).get_json() == undrained.get_json()
    assert controller.wait(waiting, timeout=20)["status"] == "succeeded", "claims resume at once"
    health = client.get("/mpc/health", headers=TOKEN).get_json()
    assert health["drained_hosts"] == [] and health["this_process"]["host_drained"] is False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path, status, words", [
    ("/mpc/api/hosts/nowhere/drain", 404, "No serving process of host 'nowhere'"),
    ("/mpc/api/hosts/a/b/c/drain", 404, "No serving process of host 'a/b/c'"),
    ("/mpc/api/hosts/bad%01name/drain", 400, "printable"),
    (f"/mpc/api/hosts/{'x' * 300}/drain", 400, "at most 255"),
    ("/mpc/api/hosts/%20/drain", 400, "non-empty"),
])
def test_unknown_hosts_and_bad_names_get_a_json_message(served, path, status, words):
    client, controller = served
    controller.runtime  # this host heartbeats: the store knows one host
    for method in (client.post, client.delete, client.get):
        response = method(path, headers=TOKEN)
        assert response.status_code == status, response.get_data(as_text=True)
        assert words in response.get_json()["message"]
    assert client.get("/mpc/health", headers=TOKEN).get_json()["drained_hosts"] == []


# -- real servers on a shared store ---------------------------------------------------------------------

#: The job app of serverproc with the extension, so that it serves /mpc/health and the drain URL.
_MOUNTED = "resource_class_args=(controller,))\n"
DRAIN_APP = JOB_APP.replace(
    "from flask_multiprocess_controller import MetaMPController,",
    "from flask_multiprocess_controller import MultiprocessController, MetaMPController,",
).replace(_MOUNTED, _MOUNTED + "MultiprocessController(app)\n", 1)
assert DRAIN_APP.count("MultiprocessController") == 2


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store/tasks.sqlite3"
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return request.getfixturevalue("redis_url")


class Hosts:
    """The drain app served by single-process servers, one per "host", on one store."""

    def __init__(self, tmp_path: Path, pool: ServerPool, store_url: str) -> None:
        (tmp_path / "app.py").write_text(DRAIN_APP)
        self.tmp_path = tmp_path
        self.pool = pool
        self.store_url = store_url
        self.config = {"max_num_process": 2, "stop_grace": 0.5, "lease": 3}

    def env(self, host: str) -> dict[str, str]:
        return {"MPC_STORE_URL": self.store_url, "MPC_HOST_ID": host, "APP_CONFIG": json.dumps(self.config),
                "MPC_HANDOVER_WINDOW": "0"}

    def start(self, host: str) -> tuple[Server, JobApi]:
        port = free_port()
        server = self.pool.start(python("app.py"), cwd=self.tmp_path, port=port,
                                 log_path=self.tmp_path / f"{host}.log",
                                 env={**self.env(host), "PORT": str(port)}, ready_path="/mpc/health")
        api = JobApi(server.base, HTTP_TIMEOUT, log=server.log)
        api.listing()  # the controller starts on its first use
        return server, api

    def flask(self, host: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``flask mpc ...`` from this directory, as a process of ``host``."""
        env = {**os.environ, **self.env(host)}
        return subprocess.run([sys.executable, "-m", "flask", "--app", "app", "mpc", *args],
                              cwd=self.tmp_path, env=env, capture_output=True, text=True, timeout=60)


def _health(server: Server) -> dict:
    response = requests.get(server.base + "/mpc/health", timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def _stop(server: Server) -> None:
    survivors = server.stop(signal.SIGTERM, timeout=30)
    assert survivors == [], f"left after SIGTERM: {survivors}\n{server.log()}"
    assert not unexpected_tracebacks(server.log()), server.log()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_host_drained_over_http_leaves_new_tasks_to_the_other_host(store_url, tmp_path, pool):
    hosts = Hosts(tmp_path, pool, store_url)
    a, api_a = hosts.start("host-a")
    gate = tmp_path / "gate"
    first = api_a.submit(n=1, gate=str(gate))["uuid"]
    assert api_a.wait_running(first)["pid"] in task_processes(a, depth=2)

    url = a.base + "/mpc/api/hosts/host-a/drain"
    response = requests.post(url, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    drained = response.json()
    assert drained["host"] == "host-a" and drained["drained"] is True and drained["since"], drained
    health = _health(a)
    assert health["drained_hosts"] == [drained]
    assert health["this_process"] == {"host": "host-a", "host_drained": True}
    unknown = requests.post(a.base + "/mpc/api/hosts/host-z/drain", timeout=HTTP_TIMEOUT)
    assert unknown.status_code == 404 and "host-z" in unknown.json()["message"]

    # Host A has a free place (1 of 2 runs) but is drained: the task waits for host B.
    second = api_a.submit(n=2)["uuid"]
    assert api_a.get(second)["status"] == "queued"
    b, api_b = hosts.start("host-b")
    assert _health(b)["this_process"] == {"host": "host-b", "host_drained": False}
    ran = api_b.wait_ended(second)
    assert ran["status"] == "succeeded" and ran["result"]["host"] == "host-b", ran

    gate.touch()
    went_on = api_a.wait_ended(first)
    assert went_on["status"] == "succeeded" and went_on["result"]["host"] == "host-a", went_on
    assert went_on["attempt"] == 1
    _stop(b)

    third = api_a.submit(n=3)["uuid"]
    assert api_a.get(third)["status"] == "queued"
    response = requests.delete(url, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    assert response.json() == {"host": "host-a", "drained": False, "since": None}
    ran = api_a.wait_ended(third)
    assert ran["status"] == "succeeded" and ran["result"]["host"] == "host-a", ran
    assert _health(a)["drained_hosts"] == []
    _stop(a)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_flask_mpc_drain_and_undrain_reach_the_host_s_servers(store_url, tmp_path, pool):
    hosts = Hosts(tmp_path, pool, store_url)
    a, api_a = hosts.start("host-a")
    gate = tmp_path / "gate"
    first = api_a.submit(n=1, gate=str(gate))["uuid"]
    api_a.wait_running(first)

    drained = hosts.flask("elsewhere", "drain", "--host", "host-a")
    assert drained.returncode == 0, drained.stderr
    assert "Host host-a is drained" in drained.stdout, drained.stdout
    # The server reads the flag with its next heartbeat.
    poll_until(lambda: _health(a)["this_process"]["host_drained"], bool, 10)
    assert [h["host"] for h in _health(a)["drained_hosts"]] == ["host-a"]
    second = api_a.submit(n=2)["uuid"]
    assert api_a.get(second)["status"] == "queued"
    gate.touch()
    assert api_a.wait_ended(first)["status"] == "succeeded", "a running task goes on"

    undrained = hosts.flask("host-a", "undrain")  # this host by default: MPC_HOST_ID
    assert undrained.returncode == 0, undrained.stderr
    assert "Host host-a is not drained" in undrained.stdout, undrained.stdout
    ran = api_a.wait_ended(second)
    assert ran["status"] == "succeeded" and ran["result"]["host"] == "host-a", ran
    assert _health(a)["drained_hosts"] == []

    unknown = hosts.flask("host-a", "drain", "--host", "host-z")
    assert unknown.returncode != 0
    assert "No serving process of host 'host-z'" in unknown.stderr and "Traceback" not in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
    _stop(a)
