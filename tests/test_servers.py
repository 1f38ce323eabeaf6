"""The examples served by real server processes on 127.0.0.1, as a user would run them.

- the seed's two examples with ``python examples/seed_exampleN.py`` (Flask's dev server on port 5000,
  the default SQLite file in the working directory), stopped with Ctrl-C;
- the same unmodified scripts under gunicorn with two workers (``FLASK_RUN_FROM_CLI=true`` turns
  their unguarded ``app.run()`` into a no-op), stopped with SIGTERM;
- ``examples/app.py`` under gunicorn.

After each stop, the server and every process it ever had (workers, fork servers, task processes)
must be gone within a deadline.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid as uuid_module
from pathlib import Path

import psutil
import pytest
import requests

from flask_multiprocess_controller import SQLiteStore

from serverproc import free_port, gunicorn, poll_until, port_is_free, python

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SEEDS = ["seed_example1", "seed_example2"]
TERMINAL = {"succeeded", "failed", "stopped", "timed_out", "lost"}
#: Seconds a stopped server's whole process tree gets to disappear.
STOP_DEADLINE = 30.0
#: Seconds a request may take (the server runs on this machine).
HTTP_TIMEOUT = 15


def _seed_get(url: str, uuid: str) -> dict:
    """GET the seed way: the uuid in a JSON body."""
    response = requests.get(url, json={"uuid": uuid}, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_terminal(url: str, uuid: str, timeout: float = 30.0) -> dict:
    return poll_until(lambda: _seed_get(url, uuid), lambda t: t["status"] in TERMINAL, timeout)


def _post(url: str, body: dict) -> dict:
    response = requests.post(url, json=body, timeout=HTTP_TIMEOUT)
    assert response.status_code == 202, response.text
    task = response.json()
    uuid_module.UUID(task["uuid"])
    assert task["status"] in ("queued", "running")
    return task


def _run_seed_session(url: str) -> None:
    """What the seed README does: POST, GET until done, DELETE a long task."""
    task = _post(url, {"steps": 2, "delay": 0.1})
    assert task["args"] == {"steps": 2, "delay": 0.1}
    done = _wait_terminal(url, task["uuid"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"step": 2, "of": 2}  # the last upload_status value
    assert done["result"] is None and done["error"] is None
    assert done["exit_code"] == 0

    long_task = _post(url, {"steps": 100, "delay": 0.1})
    running = poll_until(lambda: _seed_get(url, long_task["uuid"]),
                         lambda t: t["status"] == "running" and isinstance(t["progress"], dict), 20)
    assert running["pid"] is not None
    stop = requests.delete(url, json={"uuid": long_task["uuid"]}, timeout=HTTP_TIMEOUT)
    assert stop.status_code == 202, stop.text
    assert stop.json()["status"] == "stopping"
    stopped = _wait_terminal(url, long_task["uuid"], timeout=20)
    assert stopped["status"] == "stopped", stopped
    assert stopped["progress"]["step"] < 100
    again = requests.delete(url, json={"uuid": long_task["uuid"]}, timeout=HTTP_TIMEOUT)
    assert again.status_code == 409, again.text
    assert "message" in again.json()


# -- the seed examples on Flask's dev server ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", SEEDS)
def test_seed_example_on_the_dev_server(seed, tmp_path, pool):
    if not port_is_free(5000):
        pytest.fail("127.0.0.1:5000 is in use by another process: the seed examples bind Flask's default "
                    "port 5000, so this test needs it free.")
    server = pool.start(python(str(EXAMPLES / f"{seed}.py")), cwd=tmp_path, port=5000,
                        log_path=tmp_path / "server.log")
    url = server.base + "/sample"
    _run_seed_session(url)
    # The default store is a SQLite file in the working directory.
    db = tmp_path / "mpc-tasks.sqlite3"
    assert db.exists()

    # Ctrl-C while a task runs: the server, its fork server and the task process all go away.
    busy = _post(url, {"steps": 1000, "delay": 0.05})
    poll_until(lambda: _seed_get(url, busy["uuid"]), lambda t: t["status"] == "running" and t["pid"], 20)
    server.remember()
    assert len(server.alive()) >= 3, "expected the server, its fork server and a task process"
    survivors = server.stop(signal.SIGINT, timeout=STOP_DEADLINE, group=True)
    assert survivors == [], f"processes left {STOP_DEADLINE} s after Ctrl-C: {survivors}\n{server.log()}"
    assert server.proc.returncode == 0, server.log()
    assert "Traceback" not in server.log(), server.log()

    # The task cut off by the shutdown was recorded as stopped (the seed task is not restartable).
    _assert_stopped_by_shutdown(db, busy["uuid"], server)


# -- the same seed scripts, unmodified, under gunicorn -------------------------------------------


def _workers(server) -> list[psutil.Process]:
    return [p for p in server.root.children() if p.status() != psutil.STATUS_ZOMBIE]


def _task_processes(server) -> int:
    """Task processes of every worker: master -> worker -> fork server -> task."""
    count = 0
    for worker in server.root.children():
        try:
            for fork_server in worker.children():
                count += len(fork_server.children())
        except psutil.Error:
            continue
    return count


def _get_from_each_worker(server, url: str, uuids: list[str]) -> None:
    """Freeze one worker at a time (SIGSTOP), so that the other one must answer every GET (each task
    has succeeded)."""
    workers = _workers(server)
    assert len(workers) == 2, workers
    for frozen in workers:
        frozen.suspend()
        try:
            for uuid in uuids:
                task = _seed_get(url, uuid)
                assert task["uuid"] == uuid and task["status"] == "succeeded", task
        finally:
            frozen.resume()


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("seed", SEEDS)
def test_seed_example_under_gunicorn_with_two_workers(seed, tmp_path, pool):
    port = free_port()
    db = tmp_path / "tasks.sqlite3"
    server = pool.start(
        gunicorn("-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(EXAMPLES), f"{seed}:app"),
        cwd=tmp_path, port=port, log_path=tmp_path / "gunicorn.log",
        env={"FLASK_RUN_FROM_CLI": "true", "MPC_STORE_URL": f"sqlite:///{db}"},
    )
    poll_until(lambda: len(_workers(server)), lambda n: n == 2, 30)
    url = server.base + "/sample"
    _run_seed_session(url)
    assert db.exists()

    # Six tasks over fresh connections; the seed's max_num_process=2 holds across both workers.
    uuids = [_post(url, {"steps": 3, "delay": 0.15})["uuid"] for _ in range(6)]
    most = 0
    deadline = time.monotonic() + 60
    while True:
        most = max(most, _task_processes(server))
        listing = requests.get(url, timeout=HTTP_TIMEOUT).json()
        assert listing["running"] <= 2, listing
        if all(t["status"] in TERMINAL for t in listing["tasks"]):
            break
        assert time.monotonic() < deadline, listing
        time.sleep(0.02)
    assert 1 <= most <= 2, most
    for uuid in uuids:
        task = _seed_get(url, uuid)
        assert task["status"] == "succeeded", task
        assert task["progress"] == {"step": 3, "of": 3}
    server.remember()
    assert len(server.seen) >= 5, "expected gunicorn's master, two workers and their fork servers"
    _get_from_each_worker(server, url, uuids)

    # SIGTERM while a task runs: the worker running it shuts its controller down on the way out.
    busy = _post(url, {"steps": 1000, "delay": 0.05})
    poll_until(lambda: _seed_get(url, busy["uuid"]), lambda t: t["status"] == "running" and t["pid"], 20)
    server.remember()
    survivors = server.stop(signal.SIGTERM, timeout=STOP_DEADLINE)
    assert survivors == [], f"left {STOP_DEADLINE} s after SIGTERM to gunicorn: {survivors}\n{server.log()}"
    assert "Traceback" not in server.log(), server.log()
    _assert_stopped_by_shutdown(db, busy["uuid"], server)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_app_example_under_gunicorn_counts_primes(tmp_path, pool):
    port = free_port()
    server = pool.start(
        gunicorn("-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(EXAMPLES), "app:app"),
        cwd=tmp_path, port=port, log_path=tmp_path / "gunicorn.log",
        env={"MPC_STORE_URL": f"sqlite:///{tmp_path}/tasks.sqlite3"},
    )
    url = server.base + "/primes"
    try:
        posted = requests.post(url, json={"limit": 20000}, timeout=HTTP_TIMEOUT)
    except requests.ConnectionError as exc:  # seen once (a reset): keep what gunicorn said with it
        raise AssertionError(f"{exc}\n{server.log()}") from exc
    assert posted.status_code == 202, posted.text
    uuid = posted.json()["uuid"]
    assert posted.headers["Location"].endswith(f"/primes/{uuid}")
    got = requests.get(f"{url}/{uuid}", params={"wait": 20}, timeout=40)
    assert got.status_code == 200, got.text
    task = got.json()
    assert task["status"] == "succeeded", task
    assert task["result"] == {"limit": 20000, "primes": 2262}
    assert task["progress"] == {"checked_below": 20000, "found": 2262}
    assert task["percent"] == 100.0
    # A typed argument is checked before anything is queued.
    bad = requests.post(url, json={"limit": "many"}, timeout=HTTP_TIMEOUT)
    assert bad.status_code == 400 and "limit" in bad.json()["message"]
    assert requests.get(url, timeout=HTTP_TIMEOUT).json()["queued"] == 0

    # Both workers booted (a request may have been served before the second one was up).
    poll_until(lambda: len(server.remember()), lambda n: n >= 5, 30)  # master, 2 workers, 2 fork servers
    # The worker that serves the controller names itself for ps (gunicorn's master keeps its name).
    names = [p.name() for p in psutil.Process(server.proc.pid).children()]
    assert "mpc-serve:app" in names, names
    survivors = server.stop(signal.SIGTERM, timeout=STOP_DEADLINE)
    assert survivors == [], f"left {STOP_DEADLINE} s after SIGTERM to gunicorn: {survivors}\n{server.log()}"


def _assert_stopped_by_shutdown(db, uuid: str, server) -> None:
    """The task cut off by a shutdown is recorded ``stopped``/``Shutdown``, and its process was watched."""
    store = SQLiteStore(str(db))
    try:
        row = store.get(uuid)
    finally:
        store.close()
    assert row is not None and row["status"] == "stopped", row
    assert row["error"]["type"] == "Shutdown"
    assert row["pid"] in server.seen  # so the tree check above covered the task process


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_app_example_takes_its_port_from_port_and_names_its_process(tmp_path, pool):
    port = free_port()
    store_url = f"sqlite:///{tmp_path}/tasks.sqlite3"
    server = pool.start(python(str(EXAMPLES / "app.py")), cwd=tmp_path, port=port,
                        log_path=tmp_path / "server.log", ready_path="/mpc/health",
                        env={"PORT": str(port), "MPC_STORE_URL": store_url})
    # The server runs what `flask mpc submit` queued, though no request of its resource came yet: its
    # controllers started with the app (after a deploy, queued and handed-over tasks do not wait for traffic).
    submitted = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "mpc", "submit", "primes", "limit=50"],
                               cwd=EXAMPLES, capture_output=True, text=True, timeout=60,
                               env={**os.environ, "MPC_STORE_URL": store_url})
    assert submitted.returncode == 0, submitted.stderr
    queued = submitted.stdout.split()[0]
    store = SQLiteStore(f"{tmp_path}/tasks.sqlite3")
    try:
        ran = poll_until(lambda: store.get(queued), lambda row: row is not None and row["status"] == "succeeded", 30)
    finally:
        store.close()
    assert ran["result"] == {"limit": 50, "primes": 15}, ran
    assert ran["owner"].rsplit(":", 2)[1] == str(server.proc.pid), ran  # the server ran it, not the command
    posted = requests.post(server.base + "/primes", json={"limit": 100}, timeout=HTTP_TIMEOUT)
    assert posted.status_code == 202, posted.text
    task = requests.get(f"{server.base}/primes/{posted.json()['uuid']}", params={"wait": 20}, timeout=40).json()
    assert task["result"] == {"limit": 100, "primes": 25}, task
    assert psutil.Process(server.proc.pid).name() == "mpc-serve:app"  # what ps -o comm, top and pgrep show
    assert server.stop(signal.SIGINT, timeout=STOP_DEADLINE) == [], server.log()
