"""Restarting a real server process on the same SQLite file.

The app (written into the test's directory, guarded by ``if __name__ == "__main__"``) runs one task at
a time; its tasks wait until a "gate" file exists, so the test decides when they may finish. Task
arguments (``n``) tell the tasks apart.
"""
from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest
import requests

from serverproc import ServerPool, free_port, poll_until, python

TERMINAL = {"succeeded", "failed", "stopped", "timed_out", "lost"}
HTTP_TIMEOUT = 15
STOP_DEADLINE = 30.0
#: Seconds task processes orphaned by a killed server get to disappear.
ORPHAN_DEADLINE = 10.0

APP = '''
import os
import time

from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask

GATES = os.environ["GATES_DIR"]


class GatedJob(MetaMPTask):
    """Waits until the file named ``gate`` exists in GATES (no gate: returns at once)."""

    restartable = os.environ.get("JOB_RESTARTABLE") == "1"

    def execute(self, n: int, gate: str = "") -> dict:
        self.upload_status({"n": n, "waiting_for": gate})
        while gate and not os.path.exists(os.path.join(GATES, gate)):
            time.sleep(0.05)
        return {"n": n, "pid": os.getpid()}


class GatedController(MetaMPController, controller_name="gated"):
    pass


controller = GatedController(GatedJob, max_num_process=1, stop_grace=0.5)
app = Flask(__name__)
Api(app).add_resource(MetaMPResource, "/jobs", "/jobs/<string:uuid>", resource_class_args=(controller,))

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]))
'''


class GatedApp:
    """Starts the app on a fresh port each time, always on the same working directory and store."""

    def __init__(self, tmp_path: Path, pool: ServerPool, cwd: Path, env: dict) -> None:
        self.script = tmp_path / "gated_app.py"
        self.script.write_text(APP)
        self.gates = tmp_path / "gates"
        self.gates.mkdir()
        self.tmp_path = tmp_path
        self.pool = pool
        self.cwd = cwd
        self.env = {"GATES_DIR": str(self.gates), **env}
        self.starts = 0
        self.server = None

    def start(self):
        self.starts += 1
        port = free_port()
        self.server = self.pool.start(python(str(self.script)), cwd=self.cwd, port=port,
                                      env={**self.env, "PORT": str(port)},
                                      log_path=self.tmp_path / f"server-{self.starts}.log")
        self.url = self.server.base + "/jobs"
        return self.server

    def open_gate(self, name: str) -> None:
        (self.gates / name).touch()

    def post(self, n: int, gate: str = "") -> str:
        response = requests.post(self.url, json={"n": n, "gate": gate}, timeout=HTTP_TIMEOUT)
        assert response.status_code == 202, response.text
        return response.json()["uuid"]

    def get(self, uuid: str, wait: float = 0) -> dict:
        params = {"wait": wait} if wait else None
        response = requests.get(f"{self.url}/{uuid}", params=params, timeout=HTTP_TIMEOUT + wait)
        assert response.status_code == 200, response.text
        return response.json()

    def listing(self) -> dict:
        return requests.get(self.url, params={"limit": 1000}, timeout=HTTP_TIMEOUT).json()


def _assert_succeeded(app: GatedApp, uuid: str, n: int, attempt: int = 1) -> None:
    task = app.get(uuid, wait=20)
    assert task["status"] == "succeeded", task
    assert task["result"]["n"] == n and task["args"]["n"] == n, task
    assert task["attempt"] == attempt, task


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_queued_tasks_and_results_survive_a_restart(how, tmp_path, pool):
    db = tmp_path / "store" / "tasks.sqlite3"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    app = GatedApp(tmp_path, pool, cwd, {"MPC_STORE_URL": f"sqlite:///{db}"})
    server = app.start()
    finished = {n: app.post(n) for n in (0, 1)}
    for n, uuid in finished.items():
        _assert_succeeded(app, uuid, n)
    blocker = app.post(100, gate="g")
    running = poll_until(lambda: app.get(blocker), lambda t: t["status"] == "running" and t["pid"], 20)
    queued = {n: app.post(n, gate="g") for n in range(2, 12)}
    listing = app.listing()
    assert (listing["running"], listing["queued"]) == (1, 10), listing
    assert app.get(queued[2])["position"] == 1 and app.get(queued[11])["position"] == 10

    server.remember()
    if how == "ctrl-c":
        survivors = server.stop(signal.SIGINT, timeout=STOP_DEADLINE, group=True)
    else:  # as a process manager stops it: the package makes SIGTERM unwind like Ctrl-C
        survivors = server.stop(signal.SIGTERM, timeout=STOP_DEADLINE)
    assert survivors == [], f"processes left after {how}: {survivors}\n{server.log()}"
    assert "Traceback" not in server.log(), server.log()
    assert running["pid"] in server.seen  # so the check above covered the task process too
    assert db.exists() and not (cwd / "mpc-tasks.sqlite3").exists()

    app.start()
    # Finished tasks are still readable with their results.
    for n, uuid in finished.items():
        _assert_succeeded(app, uuid, n)
    # The task that ran at the stop was not restartable: stopped by the clean shutdown.
    cut = app.get(blocker)
    assert cut["status"] == "stopped" and cut["error"]["type"] == "Shutdown", cut
    assert cut["result"] is None
    # Nothing queued was lost, and nothing ran while the gate was shut: the restarted server takes the
    # head of the queue, and the others wait in their order.
    poll_until(lambda: app.get(queued[2]), lambda t: t["status"] == "running" and t["attempt"] == 1, 20)
    assert [app.get(queued[n])["position"] for n in range(3, 12)] == list(range(1, 10))
    app.open_gate("g")
    for n, uuid in queued.items():
        _assert_succeeded(app, uuid, n)
    listing = app.listing()
    counts = {}
    for task in listing["tasks"]:
        counts[task["status"]] = counts.get(task["status"], 0) + 1
    assert counts == {"succeeded": 12, "stopped": 1}, counts

    survivors = app.server.stop(signal.SIGINT, timeout=STOP_DEADLINE, group=True)
    assert survivors == [], survivors


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("restartable", [False, True], ids=["not-restartable", "restartable"])
def test_server_killed_while_a_task_runs(restartable, tmp_path, pool):
    # The default store: mpc-tasks.sqlite3 in the working directory.
    app = GatedApp(tmp_path, pool, tmp_path, {"JOB_RESTARTABLE": "1" if restartable else "0"})
    server = app.start()
    done = app.post(0)
    _assert_succeeded(app, done, 0)
    blocker = app.post(100, gate="g")
    running = poll_until(lambda: app.get(blocker), lambda t: t["status"] == "running" and t["pid"], 20)
    queued = {n: app.post(n, gate="g") for n in range(1, 4)}
    task_proc = psutil.Process(running["pid"])
    assert task_proc.is_running()
    tree = server.remember()
    assert task_proc.pid in {p.pid for p in tree}

    server.proc.kill()  # SIGKILL: no cleanup code runs in the server
    server.proc.wait(10)
    # Its fork server sees the socket close and kills the task processes: no orphan must remain.
    orphans = server.wait_gone(ORPHAN_DEADLINE)
    assert orphans == [], f"orphans {ORPHAN_DEADLINE} s after the server was killed: {orphans}"
    assert (tmp_path / "mpc-tasks.sqlite3").exists()

    app.start()
    cut = app.get(blocker)
    if restartable:
        assert cut["status"] in ("queued", "running"), cut
        assert cut["error"] is None
    else:
        assert cut["status"] == "lost", cut
        assert cut["error"]["type"] == "Lost" and "died" in cut["error"]["message"], cut
        assert cut["result"] is None
    app.open_gate("g")
    if restartable:
        _assert_succeeded(app, blocker, 100, attempt=2)  # run again from the beginning
    for n, uuid in queued.items():
        _assert_succeeded(app, uuid, n)
    _assert_succeeded(app, done, 0)
    assert app.get(blocker)["status"] == ("succeeded" if restartable else "lost")

    survivors = app.server.stop(signal.SIGINT, timeout=STOP_DEADLINE, group=True)
    assert survivors == [], survivors
