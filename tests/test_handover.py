"""Running tasks survive the end of their serving process: a live serving process of the app on the same
host adopts them (gunicorn reloads, recycled and killed workers, dev-server restarts); with nobody to adopt
them in ``handover_window`` seconds they end as a shutdown ends them, or are queued again.

Tasks are those of ``tests/handover_app.py``: they count steps for a while, reporting progress every
``step`` seconds, logging and printing as they go. Each test keeps its hand-over sockets in a folder of
its own, and its servers' whole process trees (fork servers that held tasks included) must be gone at
its end.
"""
from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import requests

from flask_multiprocess_controller.store import resolve_store

from serverproc import (JobApi, Server, ServerPool, free_port, gunicorn, gunicorn_workers, poll_until, python,
                        worker_of)
from serverproc import unexpected_tracebacks

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parent / "handover_app.py"
HTTP_TIMEOUT = 30.0
STOP_DEADLINE = 30.0


@pytest.fixture
def handover_dir() -> Iterator[str]:
    """A private folder for the hand-over sockets of this test's servers (short: socket paths are limited)."""
    folder = tempfile.mkdtemp(prefix="mpc-ho-", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


class App:
    """The hand-over app on one store, served by gunicorn or the dev server, started as often as needed."""

    def __init__(self, tmp_path: Path, pool: ServerPool, store_url: str, handover_dir: str, window: float,
                 **config: object) -> None:
        shutil.copy(APP, tmp_path / "app.py")
        self.tmp_path = tmp_path
        self.pool = pool
        self.store_url = store_url
        self.env = {"MPC_STORE_URL": store_url, "MPC_HANDOVER_WINDOW": str(window),
                    "MPC_HANDOVER_DIR": handover_dir, "APP_CONFIG": json.dumps(config)}
        self.starts = 0

    def gunicorn(self, *options: str, host: str = "") -> Server:
        self.starts += 1
        port = free_port()
        env = dict(self.env, **({"MPC_HOST_ID": host} if host else {}))
        return self.pool.start(
            gunicorn(*options, "-b", f"127.0.0.1:{port}", "--chdir", str(self.tmp_path), "app:app"),
            cwd=self.tmp_path, port=port, log_path=self.tmp_path / f"server-{self.starts}.log", env=env,
            ready_path="/tasks")

    def dev_server(self, port: int = 0, host: str = "") -> Server:
        self.starts += 1
        port = port or free_port()
        env = dict(self.env, PORT=str(port), **({"MPC_HOST_ID": host} if host else {}))
        return self.pool.start(python(str(self.tmp_path / "app.py")), cwd=self.tmp_path, port=port,
                               log_path=self.tmp_path / f"server-{self.starts}.log", env=env, ready_path="/tasks")

    def events(self) -> dict[str, list[str]]:
        """The kinds of every task's events in the store, oldest first, by uuid."""
        store = resolve_store(self.store_url)
        try:
            kinds: dict[str, list[str]] = {}
            for event in store.changes("0", limit=100_000).events:
                kinds.setdefault(event["uuid"], []).append(event["kind"])
            return kinds
        finally:
            store.close()

    def log_lines(self, uuid: str) -> list[str]:
        store = resolve_store(self.store_url)
        try:
            return [line["line"] if isinstance(line, dict) else line[1] for line in store.logs.read(uuid)]
        finally:
            store.close()


def stop(server: Server) -> None:
    """SIGTERM a server with no task left: its whole tree must end."""
    survivors = server.stop(signal.SIGTERM, timeout=STOP_DEADLINE)
    assert survivors == [], f"left after SIGTERM: {survivors}\n{server.log()}"


def assert_ran_once(task: dict, events: list[str]) -> None:
    assert task["status"] == "succeeded", task
    assert (task["attempt"], task["exit_code"]) == (1, 0), task
    assert task["result"]["pid"] == task["pid"], task
    assert events.count("started") == 1 and events.count("ended") == 1, events
    # (a claim given back unstarted, by a worker that was going away, shows as 'requeued' before 'started')
    assert "requeued" not in events[events.index("started"):], events


class ProgressWatch(threading.Thread):
    """Reads one task's progress every 0.1 s; remembers when each new value was first seen."""

    def __init__(self, api: JobApi, uuid: str) -> None:
        super().__init__(daemon=True)
        self.api, self.uuid = api, uuid
        self.seen: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        last = None
        while not self.halt.wait(0.1):
            try:
                task = requests.get(f"{self.api.url}/{self.uuid}", timeout=5).json()
            except (requests.RequestException, ValueError):
                continue
            n = (task.get("progress") or {}).get("n")
            if n is not None and n != last:
                self.seen.append((time.monotonic(), n))
                last = n
            if task.get("status") not in ("running", "queued", "paused", "stopping"):
                return


# -- gunicorn ------------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_a_gunicorn_reload_hands_every_running_task_over(store, tmp_path, pool, handover_dir, request):
    """``kill -HUP`` of the master mid-run: the new workers adopt every task; nothing stops or runs twice."""
    url = f"sqlite:///{tmp_path}/tasks.sqlite3" if store == "sqlite" else request.getfixturevalue("postgres_url")
    app = App(tmp_path, pool, url, handover_dir, window=30, stop_grace=1.0)
    server = app.gunicorn("-w", "2")
    api = JobApi(server.base, HTTP_TIMEOUT, log=server.log)
    # Long enough to be running still once adopted, however long the reload takes on a busy machine.
    long = [api.submit(seconds=25, step=0.2, tag=f"t{i}")["uuid"] for i in range(4)]
    timed = requests.post(api.url + "?timeout=8", json={"seconds": 30}, timeout=HTTP_TIMEOUT).json()["uuid"]
    doomed = api.submit(seconds=60)["uuid"]
    paused = api.submit(seconds=25, step=0.1)["uuid"]
    every = [*long, timed, doomed, paused]
    before = {uuid: api.wait_running(uuid) for uuid in every}
    old_workers = {w.pid for w in gunicorn_workers(server)}
    watch = ProgressWatch(api, long[0])
    watch.start()
    request.addfinalizer(lambda: (watch.halt.set(), watch.join(10)))  # ended whatever the test's outcome
    time.sleep(5)  # the tasks run a while before the reload
    reloaded_at = time.monotonic()
    server.send(signal.SIGHUP)

    # Every task gets a new owner among the new workers, with its process unchanged.
    poll_until(app.events, lambda kinds: all("adopted" in kinds.get(u, []) for u in every), 30, interval=0.2)
    poll_until(lambda: {w.pid for w in gunicorn_workers(server)}, lambda pids: not pids & old_workers, 30)
    for uuid in every:
        task = api.get(uuid)
        assert task["pid"] == before[uuid]["pid"], task
        # (the task with an 8 s timeout may have reached it by now, on a busy machine: its end is checked below)
        assert task["status"] == "running" or uuid == timed, task

    # An adopted task is stopped, paused and resumed in the usual steps.
    response = api.delete(doomed)
    assert response.status_code == 202 and response.json()["status"] == "stopping", response.text
    patched = requests.patch(f"{api.url}/{paused}", json={"status": "paused"}, timeout=HTTP_TIMEOUT)
    assert patched.status_code == 200 and patched.json()["status"] == "paused", patched.text
    proc = psutil.Process(before[paused]["pid"])
    poll_until(proc.status, lambda status: status == psutil.STATUS_STOPPED, 10)
    patched = requests.patch(f"{api.url}/{paused}", json={"status": "running"}, timeout=HTTP_TIMEOUT)
    assert patched.status_code == 200 and patched.json()["status"] == "running", patched.text
    poll_until(proc.status, lambda status: status != psutil.STATUS_STOPPED, 10)

    stopped = api.wait_ended(doomed)
    assert stopped["status"] == "stopped" and stopped["exit_code"] is not None, stopped
    timed_out = api.wait_ended(timed, timeout=30)
    assert timed_out["status"] == "timed_out", timed_out
    assert timed_out["error"]["type"] == "TaskTimeout", timed_out
    ended = {uuid: api.wait_ended(uuid, timeout=60) for uuid in [*long, paused]}
    watch.halt.set()
    watch.join(10)
    kinds = app.events()
    for uuid, task in ended.items():
        assert_ran_once(task, kinds[uuid])
        assert kinds[uuid].count("adopted") == 1, kinds[uuid]
    for uuid in long:
        assert ended[uuid]["result"]["n"] >= 90, ended[uuid]  # it counted on through the reload
    # Progress kept coming across the reload, from the same process: values above any seen before it soon after.
    # (Two workers answer the reads; the one supervising the task may show a progress write a moment before
    # the store has it, so the values read are not strictly monotonic.)
    before_reload = [n for at, n in watch.seen if at < reloaded_at]
    after_reload = [n for at, n in watch.seen if reloaded_at < at <= reloaded_at + 8]
    assert before_reload and after_reload and max(after_reload) > max(before_reload), \
        f"reloaded at {reloaded_at}: {watch.seen}"
    # The task's log holds lines (logged and printed) from before and after the reload.
    lines = app.log_lines(long[0])
    assert any("step 5 of t0" in line for line in lines), lines[:5]
    assert any("step 95 of t0" in line or "step 90 of t0" in line for line in lines), lines[-5:]
    assert any("printed step 95" in line or "printed step 90" in line for line in lines), lines[-5:]
    stop(server)
    assert not unexpected_tracebacks(server.log()), server.log()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("store", ["sqlite", "redis", "postgres"])
def test_a_worker_killed_while_a_sibling_lives_has_its_task_adopted(store, tmp_path, pool, handover_dir, request):
    url = f"sqlite:///{tmp_path}/tasks.sqlite3" if store == "sqlite" else request.getfixturevalue(f"{store}_url")
    app = App(tmp_path, pool, url, handover_dir, window=30)
    server = app.gunicorn("-w", "2")
    api = JobApi(server.base, HTTP_TIMEOUT, log=server.log)
    uuid = api.submit(seconds=4, step=0.1)["uuid"]
    running = api.wait_running(uuid)
    worker = worker_of(server, running["pid"])
    time.sleep(1)
    worker.kill()
    task = api.wait_ended(uuid, timeout=30)
    assert task["status"] == "succeeded", task
    assert (task["attempt"], task["exit_code"], task["pid"]) == (1, 0, running["pid"]), task
    assert task["result"]["pid"] == running["pid"] and task["result"]["n"] >= 30, task
    if store == "sqlite":
        kinds = app.events()[uuid]
        assert kinds.count("adopted") == 1 and kinds.count("ended") == 1, kinds
    stop(server)


@pytest.mark.timeout(150)
def test_workers_recycled_by_max_requests_lose_nothing(tmp_path, pool, handover_dir):
    """``--max-requests 5`` under a stream of POSTs while long tasks run: workers come and go, tasks stay."""
    app = App(tmp_path, pool, f"sqlite:///{tmp_path}/tasks.sqlite3", handover_dir, window=30, max_num_process=6)
    server = app.gunicorn("-w", "2", "--max-requests", "5")
    api = JobApi(server.base, HTTP_TIMEOUT, log=server.log)
    long = [api.submit(seconds=8, step=0.1)["uuid"] for _ in range(3)]
    for uuid in long:
        api.wait_running(uuid)
    workers_seen = {w.pid for w in gunicorn_workers(server)}
    short = []
    for _ in range(40):
        response = api.post(seconds=0.2, step=0.05)
        assert response.status_code == 202, response.text
        short.append(response.json()["uuid"])
        workers_seen |= {w.pid for w in gunicorn_workers(server)}
        time.sleep(0.1)
    every = [*long, *short]
    ended = {uuid: api.wait_ended(uuid, timeout=60) for uuid in every}
    assert len(workers_seen) > 4, workers_seen  # workers were recycled while the tasks ran
    kinds = app.events()
    for uuid, task in ended.items():
        assert_ran_once(task, kinds[uuid])
    assert sum("adopted" in kinds[uuid] for uuid in long) >= 1, {u: kinds[u] for u in long}
    stop(server)


# -- the dev server --------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_dev_server_restarted_within_the_window_adopts_its_task(tmp_path, pool, handover_dir):
    app = App(tmp_path, pool, f"sqlite:///{tmp_path}/tasks.sqlite3", handover_dir, window=30)
    first = app.dev_server()
    api = JobApi(first.base, HTTP_TIMEOUT, log=first.log)
    uuid = api.submit(seconds=5, step=0.1)["uuid"]
    running = api.wait_running(uuid)
    first.send(signal.SIGTERM)
    assert first.proc.wait(30) is not None
    assert psutil.pid_exists(running["pid"]), "the task ended with its server"
    second = app.dev_server()
    api = JobApi(second.base, HTTP_TIMEOUT, log=second.log)
    task = api.wait_ended(uuid, timeout=30)
    assert_ran_once(task, app.events()[uuid])
    assert task["pid"] == running["pid"] and "adopted" in app.events()[uuid], task
    assert "will run again" not in first.log() and "stopping" not in first.log().lower(), first.log()
    stop(second)
    assert first.wait_gone(10) == []  # the fork server that held the task is gone too


@pytest.mark.timeout(120)
@pytest.mark.parametrize("restartable", [False, True], ids=["not-restartable", "restartable"])
def test_a_dev_server_not_restarted_ends_its_task_as_a_shutdown_after_the_window(restartable, tmp_path, pool,
                                                                                 handover_dir):
    app = App(tmp_path, pool, f"sqlite:///{tmp_path}/tasks.sqlite3", handover_dir, window=3,
              restartable=restartable, stop_grace=1.0)
    server = app.dev_server()
    api = JobApi(server.base, HTTP_TIMEOUT, log=server.log)
    uuid = api.submit(seconds=60, step=0.1)["uuid"]
    running = api.wait_running(uuid)
    server.send(signal.SIGTERM)
    assert server.proc.wait(30) is not None
    assert psutil.pid_exists(running["pid"]), "the task ended with its server, before the window"
    store = resolve_store(app.store_url)
    try:
        row = poll_until(lambda: store.get(uuid), lambda r: r["status"] not in ("running", "stopping"), 30)
    finally:
        store.close()
    if restartable:
        assert row["status"] == "queued" and row["owner"] is None, row
    else:
        assert row["status"] == "stopped" and row["error"]["type"] == "Shutdown", row
        assert row["exit_code"] is not None, row
    assert server.wait_gone(15) == []  # the holder stopped the task process and went away
    assert "requeued" in app.events()[uuid] if restartable else "ended" in app.events()[uuid]


@pytest.mark.timeout(120)
def test_ctrl_c_still_stops_the_tasks_of_a_dev_server(tmp_path, pool, handover_dir):
    app = App(tmp_path, pool, f"sqlite:///{tmp_path}/tasks.sqlite3", handover_dir, window=30, stop_grace=1.0)
    server = app.dev_server()
    api = JobApi(server.base, HTTP_TIMEOUT, log=server.log)
    uuid = api.submit(seconds=60, step=0.1)["uuid"]
    api.wait_running(uuid)
    server.send(signal.SIGINT)
    assert server.wait_gone(30) == [], "the task outlived a Ctrl-C of its dev server"
    store = resolve_store(app.store_url)
    try:
        row = store.get(uuid)
    finally:
        store.close()
    assert row is not None and row["status"] == "stopped" and row["error"]["type"] == "Shutdown", row


@pytest.mark.timeout(120)
def test_a_task_with_saved_state_resumes_on_another_host_when_its_host_is_gone(tmp_path, pool, handover_dir):
    """Its server killed with no successor on its host: the holder queues it again after the window, and a
    server of another host resumes it from the state it saved."""
    app = App(tmp_path, pool, f"sqlite:///{tmp_path}/tasks.sqlite3", handover_dir, window=2, stop_grace=1.0)
    first = app.dev_server(host="host-a")
    api = JobApi(first.base, HTTP_TIMEOUT, log=first.log)
    uuid = api.submit(seconds=3, step=0.05, resume=True)["uuid"]
    api.wait_running(uuid)
    poll_until(lambda: api.get(uuid), lambda t: t["state_saved_at"] is not None and t["progress"]["n"] >= 30, 20)
    first.root.kill()
    first.proc.wait(10)
    other = app.dev_server(host="host-b")
    api = JobApi(other.base, HTTP_TIMEOUT, log=other.log)
    task = api.wait_ended(uuid, timeout=45)
    assert task["status"] == "succeeded" and task["attempt"] == 2, task
    assert task["result"]["resumed_from"] >= 30, task  # it went on from its saved count, not from 0
    assert task["result"]["n"] > task["result"]["resumed_from"], task
    assert first.wait_gone(15) == []
    stop(other)


@pytest.mark.timeout(150)
def test_a_worker_restarted_while_another_runs_hands_its_tasks_over(tmp_path, pool, handover_dir):
    """The worker tier: web (``MPC_ROLE=client``) and two ``flask mpc worker`` processes; one worker is
    restarted while tasks run on both: the other adopts its tasks, nothing stops, nothing runs twice."""
    from test_worker import Tiers, _serving_process

    tiers = Tiers(tmp_path, pool, f"sqlite:///{tmp_path}/tasks.sqlite3", max_num_process=4)
    tiers.env.update(MPC_HANDOVER_WINDOW="30", MPC_HANDOVER_DIR=handover_dir)
    web, api = tiers.web()
    first, second = tiers.worker("--slots", "2"), tiers.worker("--slots", "2")
    gate, ran = tmp_path / "gate", tmp_path / "ran.txt"
    posted = [api.submit(n=n, gate=str(gate), append=str(ran))["uuid"] for n in range(4)]
    running = {uuid: api.wait_running(uuid) for uuid in posted}
    on_first = [u for u, t in running.items() if _serving_process(t["pid"]) == first.proc.pid]
    assert len(on_first) == 2, running

    first.send(signal.SIGTERM)
    assert first.proc.wait(30) is not None
    store = resolve_store(f"sqlite:///{tmp_path}/tasks.sqlite3")
    try:  # the other worker takes its tasks over, processes unchanged
        def adopted() -> set:
            return {e["uuid"] for e in store.changes("0", limit=10_000).events if e["kind"] == "adopted"}

        poll_until(adopted, lambda uuids: set(on_first) <= uuids, 30)
    finally:
        store.close()
    for uuid in on_first:
        task = api.get(uuid)
        assert task["status"] == "running" and task["pid"] == running[uuid]["pid"], task
        assert _serving_process(task["pid"]) != second.proc.pid  # still the child of the first's fork server
    third = tiers.worker("--slots", "2")  # the restarted worker
    gate.touch()
    ended = {uuid: api.wait_ended(uuid, timeout=60) for uuid in posted}
    assert {t["status"] for t in ended.values()} == {"succeeded"}, ended
    assert all(t["attempt"] == 1 and t["pid"] == running[u]["pid"] for u, t in ended.items()), ended
    assert sorted(ran.read_text().split()) == ["0", "1", "2", "3"]  # each ran once
    for server in (second, third, web):
        _stop_quietly(server)
    assert first.wait_gone(15) == []


def _stop_quietly(server: Server) -> None:
    survivors = server.stop(signal.SIGTERM, timeout=STOP_DEADLINE)
    assert survivors == [], f"left after SIGTERM: {survivors}\n{server.log()}"
