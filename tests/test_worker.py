"""The worker tier: web processes with ``MPC_ROLE=client`` submit and read, ``flask mpc worker`` processes on
the same shared store run the tasks, and restarting the web tier stops nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import psutil
import pytest

from serverproc import (JobApi, Server, ServerPool, free_port, poll_until, process_gone, python, statuses,
                        write_job_app)

pytestmark = pytest.mark.slow

HTTP_TIMEOUT = 30.0
STOP_DEADLINE = 30.0


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store/tasks.sqlite3"
    return request.getfixturevalue(f"{request.param}_url")


class Tiers:
    """The job app as a web tier (client-only) and as workers, on one store."""

    def __init__(self, tmp_path: Path, pool: ServerPool, store_url: str, **config: object) -> None:
        write_job_app(tmp_path)
        self.tmp_path = tmp_path
        self.pool = pool
        self.config = {"stop_grace": 0.5, "lease": 3, **config}
        self.env = {"MPC_STORE_URL": store_url, "APP_CONFIG": json.dumps(self.config),
                    "MPC_HANDOVER_WINDOW": "0"}
        self.started = 0

    def _log(self, name: str) -> Path:
        self.started += 1
        return self.tmp_path / f"{self.started}-{name}.log"

    def web(self) -> tuple[Server, JobApi]:
        port = free_port()
        server = self.pool.start(python("app.py"), cwd=self.tmp_path, port=port, log_path=self._log("web"),
                                 env={**self.env, "PORT": str(port), "MPC_ROLE": "client"},
                                 ready_path="/tasks")
        return server, JobApi(server.base, HTTP_TIMEOUT, log=server.log)

    def worker(self, *args: str, role: Optional[str] = "client") -> Server:
        """``flask mpc worker ARGS`` (serving no port), once it logged the controller it serves.

        ``MPC_ROLE=client`` in its environment, as a web tier's environment file would have it: the
        command makes the process a server all the same.
        """
        env = {**os.environ, **self.env}
        env.pop("FLASK_RUN_FROM_CLI", None)
        if role:
            env["MPC_ROLE"] = role
        worker = Server(python("-m", "flask", "--app", "app", "mpc", "worker", *args), cwd=self.tmp_path,
                        env=env, port=0, log_path=self._log("worker"))
        self.pool.servers.append(worker)

        def serving() -> bool:
            if worker.proc.poll() is not None:
                raise AssertionError(f"the worker exited with {worker.proc.returncode}:\n{worker.log()}")
            return "serves controller jobs" in worker.log()

        poll_until(serving, bool, 30, interval=0.1)
        worker.remember()
        return worker


def _stop(server: Server) -> None:
    survivors = server.stop(signal.SIGTERM, timeout=STOP_DEADLINE)
    assert survivors == [], f"left {STOP_DEADLINE} s after SIGTERM: {survivors}\n{server.log()}"
    assert "Traceback" not in server.log(), server.log()


def _started(listing: dict) -> int:
    """How many tasks of a list view run in a task process whose pid is known."""
    return sum(1 for t in listing["tasks"] if t["status"] == "running" and t["pid"])


def _serving_process(task_pid: int) -> int:
    """The serving process of a task process: the parent of its fork server."""
    fork_server = psutil.Process(task_pid).parent()
    assert fork_server is not None
    serving = fork_server.parent()
    assert serving is not None
    return serving.pid


@pytest.mark.timeout(180)
def test_the_web_tier_submits_the_worker_runs_and_a_web_restart_stops_nothing(store_url, tmp_path, pool):
    tiers = Tiers(tmp_path, pool, store_url, max_num_process=2)
    web, api = tiers.web()
    worker = tiers.worker()
    assert "2 slot(s)" in worker.log(), worker.log()
    gate = tmp_path / "gate"
    ran = tmp_path / "ran.txt"

    first = api.submit(n=0, gate=str(gate), append=str(ran))["uuid"]
    task = api.wait_running(first)
    assert _serving_process(task["pid"]) == worker.proc.pid, "the worker, not the web process, runs it"
    web.remember()
    assert task["pid"] not in web.seen
    posted = [first] + [api.submit(n=n, gate=str(gate), append=str(ran))["uuid"] for n in (1, 2, 3)]
    listing = poll_until(api.listing, lambda v: _started(v) == 2, 20)
    assert listing["queued"] == 2, listing
    running = [t for t in listing["tasks"] if t["status"] == "running"]
    procs = [psutil.Process(t["pid"]) for t in running]

    _stop(web)  # the web tier restarts while tasks run
    web, api = tiers.web()
    again = api.listing()
    assert (again["running"], again["queued"]) == (2, 2), again
    assert all(not process_gone(p) for p in procs)
    assert {t["uuid"]: (t["pid"], t["attempt"]) for t in again["tasks"] if t["status"] == "running"} == {
        t["uuid"]: (t["pid"], 1) for t in running}

    gate.touch()
    for n, uuid in enumerate(posted):
        ended = api.wait_ended(uuid)
        assert ended["status"] == "succeeded" and ended["attempt"] == 1 and ended["result"]["n"] == n, ended
        assert _worker_ran(ended, worker)
    assert sorted(int(line) for line in ran.read_text().split()) == [0, 1, 2, 3], "each task ran once"
    assert statuses(api.listing()["tasks"]) == {"succeeded": 4}
    assert "started in process" not in web.log(), "the web tier ran nothing"
    _stop(worker)
    _stop(web)


def _worker_ran(task: dict, worker: Server) -> bool:
    return f"Task {task['uuid']} started in process {task['result']['pid']}" in worker.log()


@pytest.mark.timeout(180)
def test_slots_bound_what_one_worker_runs_while_max_num_process_stays_global(tmp_path, pool):
    tiers = Tiers(tmp_path, pool, f"sqlite:///{tmp_path}/tasks.sqlite3", max_num_process=4)
    web, api = tiers.web()
    first = tiers.worker("--slots", "2", "--controller", "jobs")
    assert "2 slot(s), at most 4 task(s)" in first.log(), first.log()
    gate = tmp_path / "gate"
    posted = [api.submit(n=n, gate=str(gate))["uuid"] for n in range(6)]
    listing = poll_until(api.listing, lambda v: v["running"] == 2, 20)
    assert listing["queued"] == 4, listing

    # Positive control: the queued tasks could run; a second worker takes two more, and the global
    # limit (4) leaves the last two queued.
    second = tiers.worker("--slots", "3")
    listing = poll_until(api.listing, lambda v: _started(v) == 4, 20)
    assert listing["queued"] == 2, listing
    by_worker: dict[int, int] = {}
    for task in listing["tasks"]:
        if task["status"] == "running":
            serving = _serving_process(task["pid"])
            by_worker[serving] = by_worker.get(serving, 0) + 1
    assert by_worker == {first.proc.pid: 2, second.proc.pid: 2}, by_worker

    gate.touch()
    for uuid in posted:
        assert api.wait_ended(uuid)["status"] == "succeeded"
    _stop(first)
    _stop(second)
    _stop(web)


def _flask(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flask", "--app", "app", "mpc", *args], cwd=tmp_path,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(120)
def test_a_worker_refuses_a_store_of_one_process_and_an_unknown_controller(tmp_path):
    write_job_app(tmp_path)
    refused = _flask(tmp_path, {"MPC_STORE_URL": "memory://"}, "worker")
    assert refused.returncode != 0
    assert "only serve a shared store" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    shared = {"MPC_STORE_URL": f"sqlite:///{tmp_path}/t.sqlite3"}
    unknown = _flask(tmp_path, shared, "worker", "--controller", "x")
    assert unknown.returncode != 0
    assert "No controller is called 'x'" in unknown.stderr, unknown.stderr
    assert "Traceback" not in unknown.stderr, unknown.stderr
    bad = _flask(tmp_path, shared, "worker", "--slots", "0")
    assert bad.returncode != 0 and "--slots" in bad.stderr, bad.stderr


@pytest.mark.timeout(120)
def test_a_worker_leaves_through_the_normal_exit_and_honours_the_shutdown_wait(tmp_path, pool):
    tiers = Tiers(tmp_path, pool, f"sqlite:///{tmp_path}/tasks.sqlite3", max_num_process=1)
    tiers.env["MPC_SHUTDOWN_WAIT"] = "10"
    web, api = tiers.web()
    worker = tiers.worker()
    finishing = api.submit(n=1, sleep=2)["uuid"]
    api.wait_running(finishing)
    waiting = api.submit(n=2)["uuid"]
    _stop(worker)  # SIGTERM: the controllers' exit path, which waits for the running task
    assert api.get(finishing)["status"] == "succeeded"
    assert api.get(waiting)["status"] == "queued", "a worker that is going away claims nothing"
    replacement = tiers.worker()
    ended = api.wait_ended(waiting)
    assert ended["status"] == "succeeded" and _worker_ran(ended, replacement), ended
    _stop(replacement)
    _stop(web)
