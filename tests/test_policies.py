"""Task policies with real task processes and real stores: retries, stop-all, pause and resume, re-prioritising.

Most tests go through the Flask test client on a SQLite (or Redis) store; the retry across a restart
runs a real ``python app.py`` twice on one SQLite file, and a PATCH through another worker runs the
app under ``gunicorn -w 2``. Tasks mark what they do in files, so the tests see when each attempt
started and whether a queued task ever ran.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid as uuid_module
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import requests

from conftest import wait_until
from flask_multiprocess_controller import MetaMPTask, ProcessDied
from flask_multiprocess_controller.store import TaskStore, resolve_store
from flask_multiprocess_controller.store.redis import RedisStore

from serverproc import (ServerPool, fork_servers, free_port, gunicorn, gunicorn_workers, poll_until, process_gone,
                        python, suspended, worker_of)
from serverproc import unexpected_tracebacks

TERMINAL = {"succeeded", "failed", "stopped", "timed_out", "lost"}
HTTP_TIMEOUT = 30.0
#: Seconds the processes of a stopped task get to disappear.
GONE_DEADLINE = 10.0


# -- helpers that run in task processes ---------------------------------------------------------------------

def mark(path: str, **fields: object) -> None:
    """Append one JSON line to ``path`` (one O_APPEND write, so concurrent tasks do not interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(fields) + "\n").encode())
    finally:
        os.close(fd)


def marks(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def count_into(task: MetaMPTask, path: str, seconds: float) -> int:
    """Count in a loop for ``seconds`` of running time, writing each count to ``path`` (checkpointing).

    Each count is also appended to ``path.times`` with when it was written (``time.monotonic()``, one
    clock for every process of the host): see :func:`counted_at`.
    """
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        count += 1
        with open(path + ".tmp", "w") as out:
            out.write(str(count))
        os.replace(path + ".tmp", path)
        with open(path + ".times", "a") as times:
            times.write(f"{count} {time.monotonic()}\n")
        task.checkpoint()
        time.sleep(0.01)
    return count


# -- task classes ---------------------------------------------------------------------------------------------

class Flaky(MetaMPTask):
    """Fails with ValueError until its third attempt, marking each attempt's start (time.time())."""

    max_retries = 2
    retry_backoff = 0.4
    retry_backoff_max = 0.6

    def execute(self, log: str) -> dict:
        attempt = len(marks(Path(log))) + 1
        mark(log, attempt=attempt, at=time.time(), pid=os.getpid())
        if attempt < 3:
            raise ValueError(f"attempt {attempt} fails")
        return {"attempts": attempt}


class Picky(MetaMPTask):
    """Retries ValueError only; raises the exception named by ``kind`` on every attempt."""

    max_retries = 3
    retry_backoff = 0.1
    retry_on = (ValueError,)

    def execute(self, log: str, kind: str) -> None:
        mark(log, at=time.time())
        raise {"KeyError": KeyError, "ValueError": ValueError}[kind]("no good")


class Crashes(MetaMPTask):
    """Dies without a word (``os._exit``) on its first attempt; succeeds on the next."""

    max_retries = 1
    retry_backoff = 0.1

    def execute(self, log: str) -> str:
        first = not marks(Path(log))
        mark(log, at=time.time())
        if first:
            os._exit(3)
        return "second time lucky"


class CrashesRetried(Crashes):
    retry_on = (ProcessDied,)


class Stoppable(MetaMPTask):
    """Marks its start, then loops until stopped; ``stubborn`` ignores the stop and SIGTERM, with a child."""

    def execute(self, log: str, tag: str, stubborn: bool = False, gate: str = "") -> str:
        mark(log, tag=tag, pid=os.getpid())
        if stubborn:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                      "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
            mark(log, tag=f"{tag}-child", pid=child.pid)
            while True:
                time.sleep(0.05)
        while not (gate and os.path.exists(gate)):
            self.checkpoint()
            time.sleep(0.01)
        return tag


class Counter(MetaMPTask):
    """Counts in a loop (see :func:`count_into`), with a child process beside it: a tree of two."""

    def execute(self, path: str, seconds: float = 60.0) -> int:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        try:
            return count_into(self, path, seconds)
        finally:
            child.kill()
            child.wait()


# -- helpers ----------------------------------------------------------------------------------------------------

def all_events(store: TaskStore) -> list[dict]:
    """Every event the store still keeps, oldest first."""
    return store.changes("0-0" if isinstance(store, RedisStore) else "0", limit=10_000).events


def feed(store_url: str) -> list[dict]:
    """Every event the store at ``store_url`` still keeps, read through a store object of its own."""
    store = resolve_store(store_url)
    try:
        return all_events(store)
    finally:
        store.close()


def assert_retried_in_time(events: list[dict], uuid: str, attempts: int) -> None:
    """Each attempt after the first started no earlier than the ``retry_at`` its ``requeued`` event set."""
    mine = [e for e in events if e["uuid"] == uuid]
    requeued = [e["task"] for e in mine if e["kind"] == "requeued"]
    started = [e["task"] for e in mine if e["kind"] == "started"]
    assert [t["attempt"] for t in started] == list(range(1, attempts + 1)), [e["kind"] for e in mine]
    assert [t["attempt"] for t in requeued] == list(range(1, attempts)), "one requeue per failed attempt"
    assert [e["kind"] for e in mine].count("ended") == 1, "only the final attempt ends the task"
    for before, after in zip(requeued, started[1:]):
        assert before["status"] == "queued" and before["retry_at"] is not None
        assert after["started_at"] >= before["retry_at"], (after["started_at"], before["retry_at"])


def tree(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and its live descendants."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def all_stopped(procs: list[psutil.Process]) -> bool:
    """Whether every one of ``procs`` is suspended (SIGSTOP): the state psutil calls stopped."""
    try:
        return all(p.status() == psutil.STATUS_STOPPED for p in procs)
    except psutil.Error:
        return False


def read_count(path: Path) -> int:
    return int(path.read_text()) if path.exists() else 0


def counted_at(path: Path, count: int) -> float:
    """When (``time.monotonic()``) the counter writing to ``path`` wrote ``count`` (see :func:`count_into`)."""
    for line in Path(str(path) + ".times").read_text().splitlines():
        written, at = line.split()
        if int(written) == count:
            return float(at)
    raise AssertionError(f"{count} was never counted into {path}")


def patch(client, uuid: str, body: dict, status: int = 200) -> dict:
    response = client.patch(f"/tasks/{uuid}", json=body)
    assert response.status_code == status, (response.status_code, response.data[:300])
    assert b"Traceback" not in response.data
    return response.json


def wait_task(client, uuid: str, timeout: float = 20.0) -> dict:
    response = client.get(f"/tasks/{uuid}?wait={timeout}")
    assert response.status_code == 200 and response.json["status"] in TERMINAL, response.json
    return response.json


def wait_status(client, uuid: str, status: str, timeout: float = 15.0) -> dict:
    def reached():
        task = client.get(f"/tasks/{uuid}").json
        return task if task["status"] == status and (status != "running" or task["pid"]) else None

    return wait_until(reached, timeout)


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/tasks.sqlite3"
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return request.getfixturevalue("redis_url")


# -- retries ----------------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_task_failing_twice_succeeds_on_its_third_attempt_with_both_errors_kept(make_client, store_url, tmp_path):
    client, controller = make_client(Flaky, store=store_url)
    log = tmp_path / "attempts.jsonl"
    response = client.post("/tasks?wait=20", json={"log": str(log)})
    assert response.status_code == 200, response.json  # ?wait= answers at the final end, not at a retry
    task = response.json
    assert (task["status"], task["attempt"], task["result"]) == ("succeeded", 3, {"attempts": 3}), task
    assert [(e["type"], e["message"]) for e in task["errors"]] == [("ValueError", "attempt 1 fails"),
                                                                   ("ValueError", "attempt 2 fails")]
    assert all(e["traceback"] is None for e in task["errors"]), "tracebacks are not shown over HTTP"
    assert "Traceback" in controller.status(task["uuid"])["errors"][0]["traceback"], "the store keeps them"
    assert task["error"] is None and task["retry_at"] is None
    events = all_events(controller.store)
    assert_retried_in_time(events, task["uuid"], 3)
    # The task's own clock agrees (the stores' clocks are this machine's, or Redis's on this machine).
    starts = [m["at"] for m in marks(log)]
    retry_ats = [e["task"]["retry_at"] for e in events if e["uuid"] == task["uuid"] and e["kind"] == "requeued"]
    assert len(starts) == 3 and all(start >= retry_at - 0.01 for start, retry_at in zip(starts[1:], retry_ats))


@pytest.mark.timeout(60)
def test_retry_on_value_error_fails_a_key_error_at_once(make_client, sqlite_url, tmp_path):
    client, controller = make_client(Picky, store=sqlite_url)
    key_log, value_log = tmp_path / "key.jsonl", tmp_path / "value.jsonl"
    failed = client.post("/tasks?wait=20", json={"log": str(key_log), "kind": "KeyError"}).json
    assert (failed["status"], failed["attempt"], failed["error"]["type"]) == ("failed", 1, "KeyError"), failed
    assert [e["type"] for e in failed["errors"]] == ["KeyError"]
    assert len(marks(key_log)) == 1
    kinds = [e["kind"] for e in all_events(controller.store) if e["uuid"] == failed["uuid"]]
    assert "requeued" not in kinds and kinds.count("ended") == 1, kinds
    # The same class retries what retry_on names, up to max_retries.
    retried = client.post("/tasks?wait=20", json={"log": str(value_log), "kind": "ValueError"}).json
    assert (retried["status"], retried["attempt"], len(retried["errors"])) == ("failed", 4, 4), retried
    assert len(marks(value_log)) == 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("task_cls, status, attempts", [(Crashes, "failed", 1), (CrashesRetried, "succeeded", 2)],
                         ids=["by-default", "when-named"])
def test_a_crash_is_retried_only_when_retry_on_names_process_died(make_controller, tmp_path, task_cls, status,
                                                                  attempts):
    controller = make_controller(task_cls)
    log = tmp_path / "crash.jsonl"
    task = controller.wait(controller.submit(log=str(log)), timeout=20)
    assert (task["status"], task["attempt"]) == (status, attempts), task
    assert task["errors"][0]["type"] == "ProcessDied" and "exited with code 3" in task["errors"][0]["message"]
    assert len(marks(log)) == attempts


class Persistent(MetaMPTask):
    """Retries anything, five times; loops until stopped."""

    max_retries = 5

    def execute(self, log: str) -> None:
        mark(log, at=time.time())
        while True:
            self.checkpoint()
            time.sleep(0.01)


@pytest.mark.timeout(60)
def test_a_stopped_attempt_is_never_retried(make_client, sqlite_url, tmp_path):
    client, controller = make_client(Persistent, store=sqlite_url)
    log = tmp_path / "stop.jsonl"
    uuid = client.post("/tasks", json={"log": str(log)}).json["uuid"]
    wait_status(client, uuid, "running")
    assert client.delete(f"/tasks/{uuid}").status_code == 202
    task = wait_task(client, uuid)
    assert (task["status"], task["attempt"], task["errors"]) == ("stopped", 1, []), task
    assert len(marks(log)) == 1


FLAKY_APP = '''
import json
import os
import time

from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask


class Flaky(MetaMPTask):
    """Fails until its third attempt; each attempt marks its start in ``log``."""

    max_retries = 2
    retry_backoff = 3.0
    retry_backoff_max = 3.0

    def execute(self, log: str) -> dict:
        with open(log) if os.path.exists(log) else open(os.devnull) as done:
            attempt = len(done.readlines()) + 1
        with open(log, "a") as out:
            out.write(json.dumps({"attempt": attempt, "at": time.time(), "pid": os.getpid()}) + "\\n")
        if attempt < 3:
            raise ValueError(f"attempt {attempt} fails")
        return {"attempts": attempt}


controller = MetaMPController(Flaky, max_num_process=1, stop_grace=0.5)
app = Flask(__name__)
Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]))
'''


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_retries_survive_a_server_restart_between_attempts(tmp_path, pool: ServerPool):
    (tmp_path / "flaky_app.py").write_text(FLAKY_APP)
    store_url = f"sqlite:///{tmp_path}/store/tasks.sqlite3"
    log = tmp_path / "attempts.jsonl"

    def start(n: int):
        port = free_port()
        return pool.start(python(str(tmp_path / "flaky_app.py")), cwd=tmp_path, port=port,
                          env={"PORT": str(port), "MPC_STORE_URL": store_url},
                          log_path=tmp_path / f"server-{n}.log", ready_path="/tasks")

    first = start(1)
    posted = requests.post(first.base + "/tasks", json={"log": str(log)}, timeout=HTTP_TIMEOUT).json()
    waiting = poll_until(lambda: requests.get(f"{first.base}/tasks/{posted['uuid']}", timeout=HTTP_TIMEOUT).json(),
                         lambda t: t["status"] == "queued" and t["retry_at"] is not None, 20)
    assert waiting["attempt"] == 1 and [e["message"] for e in waiting["errors"]] == ["attempt 1 fails"], waiting
    assert waiting["position"] is None and "runs again from" in waiting["msg"], waiting
    survivors = first.stop(signal.SIGTERM, timeout=30)
    assert survivors == [] and not unexpected_tracebacks(first.log()), (survivors, first.log())

    restarted_at = time.time()
    second = start(2)
    task = requests.get(f"{second.base}/tasks/{posted['uuid']}?wait=20", timeout=HTTP_TIMEOUT + 20).json()
    assert (task["status"], task["attempt"], task["result"]) == ("succeeded", 3, {"attempts": 3}), task
    assert [e["message"] for e in task["errors"]] == ["attempt 1 fails", "attempt 2 fails"]
    assert second.stop(signal.SIGTERM, timeout=30) == []
    attempts = marks(log)
    assert [m["attempt"] for m in attempts] == [1, 2, 3]
    assert attempts[0]["at"] < restarted_at < attempts[1]["at"], "the restart did not come between the attempts"
    assert_retried_in_time(feed(store_url), posted["uuid"], 3)


# -- stop all ------------------------------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_stop_all_stops_running_and_queued_tasks_and_leaves_no_process(make_client, store_url, tmp_path):
    client, controller = make_client(Stoppable, store=store_url, max_num_process=3, stop_grace=0.5)
    log = tmp_path / "starts.jsonl"
    running = [client.post("/tasks", json={"log": str(log), "tag": f"r{i}", "stubborn": i == 2}).json["uuid"]
               for i in range(3)]
    for uuid in running:
        wait_status(client, uuid, "running")
    wait_until(lambda: {m["tag"] for m in marks(log)} >= {"r0", "r1", "r2", "r2-child"})
    queued = [client.post("/tasks", json={"log": str(log), "tag": f"q{i}"}).json["uuid"] for i in range(20)]
    assert client.get("/tasks").json["queued"] == 20
    procs = [psutil.Process(m["pid"]) for m in marks(log)]

    response = client.delete("/tasks?all=true")
    assert response.status_code == 202, response.json
    assert response.json == {"stopped": 20, "stopping": 3}

    ended = {uuid: wait_task(client, uuid, timeout=20) for uuid in running + queued}
    assert {t["status"] for t in ended.values()} == {"stopped"}, {u: t["status"] for u, t in ended.items()}
    assert ended[running[2]]["error"]["type"] == "Killed", ended[running[2]]
    assert all(ended[u]["started_at"] is None for u in queued), "a queued task started"
    assert {m["tag"] for m in marks(log)} == {"r0", "r1", "r2", "r2-child"}, "a queued task ran"
    wait_until(lambda: all(process_gone(p) for p in procs), GONE_DEADLINE)
    # Nothing is left to stop; a DELETE with neither a uuid nor all=true stays a 400.
    assert client.delete("/tasks?all=true").json == {"stopped": 0, "stopping": 0}
    for url in ("/tasks", "/tasks?all=false", "/tasks?all=maybe"):
        refused = client.delete(url)
        assert refused.status_code == 400 and refused.json["message"], (url, refused.json)
    both = client.delete(f"/tasks/{running[0]}?all=true")
    assert both.status_code == 400 and both.json["message"]


# -- pause and resume ----------------------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_pause_suspends_the_whole_tree_and_resume_counts_on(make_client, sqlite_url, tmp_path):
    client, controller = make_client(Counter, store=sqlite_url, max_num_process=1, stop_grace=0.5)
    counts = tmp_path / "count"
    uuid = client.post("/tasks", json={"path": str(counts)}).json["uuid"]
    pid = wait_status(client, uuid, "running")["pid"]
    wait_until(lambda: read_count(counts) > 5 and len(tree(pid)) == 2)
    procs = tree(pid)

    assert len(procs) == 2, procs
    paused = patch(client, uuid, {"status": "paused"})
    assert paused["status"] == "paused" and paused["uuid"] == uuid, paused
    wait_until(lambda: all_stopped(procs), 10)
    frozen = read_count(counts)
    listing = client.get("/tasks?status=paused").json
    assert [t["uuid"] for t in listing["tasks"]] == [uuid] and listing["running"] == 1, listing
    assert patch(client, uuid, {"status": "paused"})["status"] == "paused", "pausing again changes nothing"
    assert read_count(counts) == frozen, "a paused task counted on"
    assert all_stopped(procs)

    resumed_at = time.monotonic()
    assert patch(client, uuid, {"status": "running"})["status"] == "running"
    wait_until(lambda: read_count(counts) > frozen + 10, 10)
    # The count went on from the frozen value only after the resume: nothing was counted while paused.
    assert counted_at(counts, frozen + 1) >= resumed_at, "a paused task counted on"
    assert not any(p.status() == psutil.STATUS_STOPPED for p in procs)

    # A paused task can be stopped: it is resumed so that it reaches a checkpoint.
    patch(client, uuid, {"status": "paused"})
    wait_until(lambda: all_stopped(procs), 10)
    stopping = client.delete(f"/tasks/{uuid}")
    assert stopping.status_code == 202 and stopping.json["status"] == "stopping"
    task = wait_task(client, uuid)
    assert task["status"] == "stopped" and task["error"] is None, task
    wait_until(lambda: all(process_gone(p) for p in procs), GONE_DEADLINE)


@pytest.mark.timeout(60)
def test_pause_and_re_prioritise_refuse_what_does_not_apply(make_client, sqlite_url, tmp_path):
    client, controller = make_client(Stoppable, store=sqlite_url, max_num_process=1, stop_grace=0.5)
    log, gate = tmp_path / "starts.jsonl", tmp_path / "gate"
    first = client.post("/tasks", json={"log": str(log), "tag": "a", "gate": str(gate)}).json["uuid"]
    wait_status(client, first, "running")
    queued = client.post("/tasks", json={"log": str(log), "tag": "b", "gate": str(gate)}).json["uuid"]
    for body in ({"status": "paused"}, {"status": "running"}):
        conflict = patch(client, queued, body, 409)
        assert "queued" in conflict["message"]
    assert "running" in patch(client, first, {"priority": 3}, 409)["message"]
    assert patch(client, first, {"status": "running"})["status"] == "running", "resuming a running task: no-op"
    for body in ({}, {"status": "stopped"}, {"priority": "high"}, {"status": "paused", "priority": 1},
                 {"colour": "red"}):
        assert patch(client, first, body, 400)["message"]
    assert client.patch("/tasks", json={"status": "paused"}).status_code == 400, "PATCH needs a uuid"
    assert client.patch(f"/tasks/{first}", json=[{"status": "paused"}]).status_code == 400
    patch(client, str(uuid_module.uuid4()), {"status": "paused"}, 404)
    gate.touch()
    for uuid in (first, queued):
        assert wait_task(client, uuid)["status"] == "succeeded"
        assert "succeeded" in patch(client, uuid, {"status": "paused"}, 409)["message"]
        patch(client, uuid, {"priority": 1}, 409)


@pytest.mark.timeout(60)
def test_a_paused_task_s_timeout_clock_does_not_run_when_told_so(make_controller, tmp_path):
    controller = make_controller(Counter, timeout=2.0, stop_grace=0.5, timeout_while_paused=False)
    counts = tmp_path / "count"
    uuid = controller.submit(path=str(counts))
    wait_until(lambda: read_count(counts) > 0, 10)
    controller.pause(uuid)
    paused_at = controller.store.now()
    # Longer than the whole timeout: this process's heartbeat is recorded 3 s after the pause.
    wait_until(lambda: max(controller.store.heartbeats().values(), default=0.0) >= paused_at + 3.0, 10)
    assert controller.status(uuid)["status"] == "paused"
    controller.resume(uuid)
    task = controller.wait(uuid, timeout=20)
    assert task["status"] == "timed_out" and task["error"]["type"] == "TaskTimeout", task
    ran = datetime.fromisoformat(task["ended_at"]) - datetime.fromisoformat(task["started_at"])
    assert ran.total_seconds() >= 4.5, "the time paused was counted against the timeout"


POLICY_APP = '''
import os
import time

from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask


class Counter(MetaMPTask):
    """Counts in a loop, writing the count to ``path`` (checkpointing)."""

    def execute(self, path: str, seconds: float = 60.0) -> int:
        count = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            count += 1
            with open(path + ".tmp", "w") as out:
                out.write(str(count))
            os.replace(path + ".tmp", path)
            with open(path + ".times", "a") as times:
                times.write(f"{count} {time.monotonic()}\\n")
            self.checkpoint()
            time.sleep(0.01)
        return count


controller = MetaMPController(Counter, max_num_process=1, stop_grace=0.5, lease=3)
app = Flask(__name__)
Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))


@app.after_request
def name_the_worker(response):
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response
'''


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_pause_and_resume_through_another_gunicorn_worker(tmp_path, pool: ServerPool, store_url):
    (tmp_path / "policy_app.py").write_text(POLICY_APP)
    port = free_port()
    server = pool.start(gunicorn("-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "policy_app:app"),
                        cwd=tmp_path, port=port, log_path=tmp_path / "gunicorn.log", env={"MPC_STORE_URL": store_url},
                        ready_path="/tasks")
    poll_until(lambda: len(fork_servers(server)), lambda n: n == 2, 60, interval=0.1)
    url = server.base + "/tasks"
    counts = tmp_path / "count"
    uuid = requests.post(url, json={"path": str(counts)}, timeout=HTTP_TIMEOUT).json()["uuid"]
    task = poll_until(lambda: requests.get(f"{url}/{uuid}", timeout=HTTP_TIMEOUT).json(),
                      lambda t: t["status"] == "running" and t["pid"], 20)
    owner = worker_of(server, task["pid"])
    wait_until(lambda: read_count(counts) > 5)
    process = psutil.Process(task["pid"])

    def through_the_other_worker(body: dict) -> dict:
        with suspended([owner]):  # the worker running the task cannot answer: another one must
            response = requests.patch(f"{url}/{uuid}", json=body, timeout=HTTP_TIMEOUT)
        assert response.status_code == 200, response.text
        assert int(response.headers["X-Worker-Pid"]) != owner.pid
        return response.json()

    assert through_the_other_worker({"status": "paused"})["status"] == "paused"
    wait_until(lambda: all_stopped(tree(process.pid)), 10)
    frozen = read_count(counts)
    assert read_count(counts) == frozen
    resumed_at = time.monotonic()
    assert through_the_other_worker({"status": "running"})["status"] == "running"
    wait_until(lambda: read_count(counts) > frozen + 10, 10)
    # The count went on from the frozen value only after the resume: nothing was counted while paused.
    assert counted_at(counts, frozen + 1) >= resumed_at, "a paused task counted on"
    with suspended([owner]):
        stopping = requests.delete(f"{url}/{uuid}", timeout=HTTP_TIMEOUT)
    assert stopping.status_code == 202
    ended = poll_until(lambda: requests.get(f"{url}/{uuid}", timeout=HTTP_TIMEOUT).json(),
                       lambda t: t["status"] in TERMINAL, 20)
    assert ended["status"] == "stopped", ended
    assert len(gunicorn_workers(server)) == 2
    survivors = server.stop(signal.SIGTERM, timeout=30)
    assert survivors == [] and not unexpected_tracebacks(server.log()), (survivors, server.log())


# -- re-prioritise -----------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_raised_task_starts_before_the_others(make_client, store_url, tmp_path):
    client, controller = make_client(Stoppable, store=store_url, max_num_process=1)
    log, gate = tmp_path / "starts.jsonl", tmp_path / "gate"
    busy = client.post("/tasks", json={"log": str(log), "tag": "busy", "gate": str(gate)}).json["uuid"]
    wait_status(client, busy, "running")
    waiting = {tag: client.post("/tasks", json={"log": str(log), "tag": tag, "gate": str(gate)}).json["uuid"]
               for tag in ("a", "b", "c")}
    raised = patch(client, waiting["c"], {"priority": -1})
    assert (raised["priority"], raised["position"], raised["status"]) == (-1, 1, "queued"), raised
    assert [client.get(f"/tasks/{waiting[t]}").json["position"] for t in ("a", "b")] == [2, 3]
    lowered = patch(client, waiting["a"], {"priority": 5})
    assert lowered["position"] == 3
    gate.touch()
    for uuid in (busy, *waiting.values()):
        assert wait_task(client, uuid)["status"] == "succeeded"
    assert [m["tag"] for m in marks(log)] == ["busy", "c", "b", "a"]
