"""Task events: one ``ended`` event and one ``ended`` callback for every way a task can end, whatever
process or path ends it; ``started`` carries the real pid; the change feed wakes waiters across
processes; store outages answer 503 and are waited out by the background threads."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from collections import Counter
from datetime import datetime
from typing import Any, Optional

import pytest
from conftest import free_port, wait_until
from flask import Flask
from flask_restful import Api
from test_lifecycle import Receiver
from test_store_contract import make_row

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, SQLiteStore
from flask_multiprocess_controller.engine.owners import host_id
from flask_multiprocess_controller.store import resolve_store
from flask_multiprocess_controller.engine.supervisor import Supervisor

TERMINAL = {"succeeded", "failed", "stopped", "timed_out", "lost"}


class Ends(MetaMPTask):
    """Ends in the way it is told to."""

    def execute(self, how: str = "ok", gate: str = "") -> Any:
        if how == "ok":
            return {"pid": os.getpid()}
        if how == "raise":
            raise ValueError("told to fail")
        if how == "segfault":
            ctypes.string_at(0)
        if how == "memory":
            hog = []
            while True:
                hog.append(b"x" * (8 << 20))
                time.sleep(0.01)
        if how == "wait":  # until stopped, or until the gate file exists
            while not (gate and os.path.exists(gate)):
                self.checkpoint()
                time.sleep(0.01)
            return "gate"
        raise AssertionError(how)


class Feed:
    """Reads a store's change feed from the moment it is made."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.cursor = store.latest_cursor()
        self.events: list[dict] = []

    def read(self) -> list[dict]:
        while True:
            changes = self.store.changes(self.cursor, 0.0)
            assert not changes.reset
            self.cursor = changes.cursor
            if not changes.events:
                return self.events
            self.events += changes.events

    def of(self, uuid: str, kind: Optional[str] = None) -> list[dict]:
        return [e for e in self.read() if e["uuid"] == uuid and (kind is None or e["kind"] == kind)]


def ended_callbacks(receiver: Receiver, uuid: str) -> list[dict]:
    with receiver._lock:
        return [b for b in receiver.bodies if b.get("uuid") == uuid and b["event"] == "ended"]


def assert_one_end(feed: Feed, receiver: Receiver, uuid: str, status: str) -> dict:
    """Exactly one ``ended`` event and, once delivered, exactly one ``ended`` callback, both final."""
    ended = wait_until(lambda: feed.of(uuid, "ended"), timeout=20)
    assert len(ended) == 1, ended
    assert ended[0]["task"]["status"] == status
    bodies = wait_until(lambda: ended_callbacks(receiver, uuid), timeout=20)
    assert len(bodies) == 1
    assert bodies[0]["task"]["status"] == status
    assert bodies[0]["cursor"] == ended[0]["cursor"]
    # A later event of the store proves that no second 'ended' of this task is still on its way:
    # everything written before it has been read, and callbacks are delivered in order.
    marker = feed.store.enqueue([make_row("marker")], -1)[0]
    wait_until(lambda: feed.of(marker["uuid"]), timeout=10)
    assert len(feed.of(uuid, "ended")) == 1
    assert len(ended_callbacks(receiver, uuid)) == 1
    return bodies[0]["task"]


@pytest.fixture
def receiver():
    with Receiver() as made:
        yield made


@pytest.fixture
def ends(make_controller, sqlite_url, receiver):
    """A controller of Ends on SQLite with a callback receiver, and a feed reader of its store."""

    def make(**kwargs: Any) -> tuple[MetaMPController, Feed]:
        kwargs.setdefault("stop_grace", 0.3)
        controller = make_controller(Ends, store=sqlite_url, callback_url=receiver.url, **kwargs)
        return controller, Feed(resolve_store(sqlite_url))

    return make


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how, status, error", [
    ("ok", "succeeded", None), ("raise", "failed", "ValueError"), ("segfault", "failed", "ProcessDied"),
])
def test_a_task_that_ends_by_itself_has_one_end(ends, receiver, how, status, error):
    controller, feed = ends()
    uuid = controller.submit(how=how)
    task = assert_one_end(feed, receiver, uuid, status)
    assert (task["error"] or {}).get("type") == error
    started = feed.of(uuid, "started")
    assert len(started) == 1 and started[0]["task"]["pid"] == task["pid"] and task["pid"]
    if how == "ok":
        assert task["result"]["pid"] == task["pid"]
        assert started[0]["task"]["pid"] == task["result"]["pid"], "started must carry the task's real pid"


@pytest.mark.timeout(60)
def test_timeout_and_memory_limit_have_one_end(ends, receiver):
    controller, feed = ends(timeout=0.5)
    timed = controller.submit(how="wait")
    assert_one_end(feed, receiver, timed, "timed_out")
    hog_controller, hog_feed = ends(max_memory=64 << 20)
    hog = hog_controller.submit(how="memory")
    task = assert_one_end(hog_feed, receiver, hog, "failed")
    assert task["error"]["type"] == "MemoryLimitExceeded"


@pytest.mark.timeout(60)
def test_stopping_a_running_and_a_queued_task_has_one_end_each(ends, receiver):
    controller, feed = ends(max_num_process=1)
    running = controller.submit(how="wait")
    wait_until(lambda: feed.of(running, "started"), timeout=20)
    queued = controller.submit(how="ok")
    assert controller.stop(queued)["status"] == "stopped"
    assert controller.stop(running)["status"] == "stopping"
    assert len(feed.of(running, "stopping")) == 1
    assert_one_end(feed, receiver, running, "stopped")
    assert_one_end(feed, receiver, queued, "stopped")
    assert feed.of(queued, "started") == [], "a queued task that was stopped never starts"


@pytest.mark.timeout(60)
def test_shutdown_has_one_end(ends, receiver, sqlite_url):
    controller, feed = ends()
    uuid = controller.submit(how="wait")
    wait_until(lambda: feed.of(uuid, "started"), timeout=20)
    controller.shutdown()
    ended = wait_until(lambda: feed.of(uuid, "ended"), timeout=20)
    assert [e["task"]["error"]["type"] for e in ended] == ["Shutdown"]
    # The shutdown waited for the callback attempt under way, so it was delivered before it returned.
    assert [b["task"]["status"] for b in ended_callbacks(receiver, uuid)] == ["stopped"]


@pytest.mark.timeout(60)
def test_a_controller_error_has_one_end(ends, receiver, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the supervisor broke")

    monkeypatch.setattr(Supervisor, "_watch", broken)
    controller, feed = ends()
    uuid = controller.submit(how="wait")
    task = assert_one_end(feed, receiver, uuid, "failed")
    assert task["error"]["type"] == "ControllerError" and "the supervisor broke" in task["error"]["message"]
    assert len(feed.of(uuid, "started")) == 1


@pytest.mark.timeout(60)
def test_a_task_lost_with_its_server_has_one_end(ends, receiver, sqlite_url):
    store = resolve_store(sqlite_url)
    row = make_row("Ends")
    store.enqueue([row], -1)
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = f"{host_id()}:{dead.pid}:1.000"  # a serving process of this host that is gone
    assert store.claim("Ends", owner, 1) is not None
    feed = Feed(store)
    controller, _ = ends()
    controller.tasks()  # a new server starts using it, and settles what the dead one left
    assert_one_end(feed, receiver, row["uuid"], "lost")


@pytest.mark.timeout(60)
def test_callbacks_carry_the_event_cursor_as_idempotency_key(make_controller):
    seen: list[tuple[str, dict]] = []

    class Keyed(Receiver):
        def _app(self, environ, start_response):
            raw = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            with self._lock:
                seen.append((environ.get("HTTP_IDEMPOTENCY_KEY"), json.loads(raw)))
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b"{}"]

    with Keyed() as receiver:
        controller = make_controller(Ends, callback_url=receiver.url)
        uuid = controller.submit()
        assert controller.wait(uuid, timeout=20)["status"] == "succeeded"
        wait_until(lambda: len(seen) == 2, timeout=20)
        controller.shutdown()
    assert [body["event"] for _, body in seen] == ["started", "ended"]
    assert all(key == body["cursor"] and key for key, body in seen)
    assert seen[0][0] != seen[1][0]


# -- the outbox: callbacks of a process that died are delivered by the next start -------------------

@pytest.mark.timeout(60)
def test_an_undelivered_callback_of_a_dead_process_is_delivered_once_by_the_next_start(
        make_controller, sqlite_url, receiver):
    store = resolve_store(sqlite_url)
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = f"{host_id()}:{dead.pid}:1.000"
    row = make_row("Ends")
    store.enqueue([row], -1, emitter=owner)
    assert store.claim("Ends", owner, 1) is not None
    started = store.start(row["uuid"], owner, dead.pid, 1.0)
    ended = store.finish(row["uuid"], "succeeded", owner=owner, emitter=owner, result=1)
    assert {e["cursor"] for e in store.unacked("Ends")} >= {started["cursor"], ended["cursor"]}
    time.sleep(0.1)
    make_controller(Ends, store=sqlite_url, callback_url=receiver.url).tasks()  # the next start of a server
    bodies = wait_until(lambda: receiver.both_events(row["uuid"]), timeout=30)
    assert bodies["ended"]["cursor"] == ended["cursor"]
    wait_until(lambda: not store.unacked("Ends"), timeout=10)
    assert len(ended_callbacks(receiver, row["uuid"])) == 1


# -- the change feed wakes waiters of other processes ------------------------------------------------

@pytest.mark.timeout(60)
def test_a_wait_in_another_controller_wakes_on_the_end(make_controller, sqlite_url, tmp_path):
    gate = tmp_path / "gate"
    runner = make_controller(Ends, store=sqlite_url)
    uuid = runner.submit(how="wait", gate=str(gate))
    wait_until(lambda: runner.status(uuid)["status"] == "running", timeout=20)
    waiter = make_controller(Ends, store=sqlite_url, max_num_process=1)
    gate.touch()
    task = waiter.wait(uuid, timeout=30)
    assert task["status"] == "succeeded", task
    assert task["result"] == "gate"


# -- store outages -------------------------------------------------------------------------------

class _RedisProcess:
    """A redis-server of this test alone on 127.0.0.1, which the test may stop and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(self.port), "--bind",
                                      "127.0.0.1", "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(client), timeout=10)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def _pings(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def own_redis():
    server = _RedisProcess()
    server.start()
    yield server
    server.stop()


def _app(controller: MetaMPController) -> Any:
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))
    return app.test_client()


@pytest.mark.timeout(90)
def test_redis_down_answers_503_and_nothing_is_lost_when_it_is_back(make_controller, own_redis, tmp_path, caplog):
    gate = tmp_path / "gate"
    controller = make_controller(Ends, store=own_redis.url, max_num_process=1)
    client = _app(controller)
    running = client.post("/tasks", json={"how": "wait", "gate": str(gate)}).get_json()["uuid"]
    wait_until(lambda: client.get(f"/tasks/{running}").get_json()["pid"], timeout=20)
    own_redis.stop()
    for answer in (client.get(f"/tasks/{running}"), client.post("/tasks", json={}), client.get("/tasks"),
                   client.delete(f"/tasks/{running}")):
        assert answer.status_code == 503, answer.get_data(as_text=True)
        assert answer.headers["Retry-After"] == "1"
        assert "store" in answer.get_json()["message"].lower()
    gate.touch()  # the task ends while the store is down: its outcome waits in memory
    time.sleep(1.0)
    own_redis.start()  # an empty server again: the store's keys were in memory only
    # The end was recorded once the store came back, and the slots take new work again.
    wait_until(lambda: client.get(f"/tasks/{running}").status_code in (200, 404), timeout=30)
    after = client.post("/tasks", json={"how": "ok"})
    assert after.status_code == 202
    done = client.get(f"/tasks/{after.get_json()['uuid']}?wait=30").get_json()
    assert done["status"] == "succeeded"
    assert not [r for r in caplog.records if r.name.startswith("mpc-") or "Exception in thread" in r.getMessage()]


@pytest.mark.timeout(90)
def test_a_task_that_ends_during_a_redis_restart_is_recorded(make_controller, tmp_path, own_redis):
    """Redis restarted with its data kept (a save on shutdown): the outcome reached meanwhile is stored."""
    own_redis.stop()
    own_redis.proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(own_redis.port), "--bind",
                                       "127.0.0.1", "--dir", str(tmp_path), "--save", "3600 1",
                                       "--appendonly", "no"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis.from_url(own_redis.url)
    wait_until(lambda: _pings(client), timeout=10)
    gate = tmp_path / "gate"
    controller = make_controller(Ends, store=own_redis.url, max_num_process=1)
    uuid = controller.submit(how="wait", gate=str(gate))
    wait_until(lambda: controller.status(uuid)["pid"], timeout=20)
    client.shutdown(save=True)
    client.close()
    own_redis.proc.wait(10)
    gate.touch()
    time.sleep(1.0)
    own_redis.proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(own_redis.port), "--bind",
                                       "127.0.0.1", "--dir", str(tmp_path), "--save", "", "--appendonly", "no"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    task = wait_until(lambda: _status_or_none(controller, uuid), timeout=30)
    assert task["status"] == "succeeded" and task["result"] == "gate"


def _status_or_none(controller: MetaMPController, uuid: str) -> Optional[dict]:
    from flask_multiprocess_controller import StoreError

    try:
        task = controller.status(uuid)
    except StoreError:
        return None
    return task if task["status"] in TERMINAL else None


@pytest.mark.timeout(60)
def test_a_locked_sqlite_file_answers_503_and_recovers(make_controller, tmp_path):
    path = tmp_path / "locked.sqlite3"
    controller = make_controller(Ends, store=SQLiteStore(str(path), busy_timeout=0.2), max_num_process=1)
    client = _app(controller)
    locker = sqlite3.connect(str(path), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        answer = client.post("/tasks", json={"how": "ok"})
        assert answer.status_code == 503, answer.get_data(as_text=True)
        assert answer.headers["Retry-After"] == "1"
        assert "Traceback" not in answer.get_data(as_text=True)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    answer = client.post("/tasks?wait=30", json={"how": "ok"})
    assert answer.status_code == 200 and answer.get_json()["status"] == "succeeded"


# -- started_at is taken under the claim: never more running than slots ---------------------------

@pytest.mark.slow
@pytest.mark.timeout(180)
def test_under_gunicorn_no_more_tasks_overlap_than_slots(tmp_path, pool, sqlite_url):
    from serverproc import JobApi, gunicorn, write_job_app

    write_job_app(tmp_path)
    port = free_port()
    server = pool.start(gunicorn("-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "app:app"),
                        cwd=tmp_path, port=port, log_path=tmp_path / "gunicorn.log",
                        env={"MPC_STORE_URL": sqlite_url, "APP_CONFIG": json.dumps({"max_num_process": 2})},
                        ready_path="/tasks")
    api = JobApi(server.base, 30.0, log=server.log)
    uuids = [api.submit(n=i, sleep=0.02)["uuid"] for i in range(60)]
    tasks = [api.wait_ended(u, timeout=60) for u in uuids]
    assert Counter(t["status"] for t in tasks) == {"succeeded": 60}
    spans = [(datetime.fromisoformat(t["started_at"]), datetime.fromisoformat(t["ended_at"])) for t in tasks]
    for moment, _ in spans:
        overlapping = [s for s in spans if s[0] <= moment < s[1]]
        assert len(overlapping) <= 2, overlapping


@pytest.mark.timeout(60)
def test_a_wake_after_shutdown_writes_to_no_reused_descriptor(make_controller):
    """A controlling thread's wake pipe is closed when it ends; a late wake (a stop arriving during the
    shutdown, say) must not write into whatever file or socket got the same descriptor number."""
    controller = make_controller(Ends, max_num_process=2)
    slots = list(controller.runtime._slots)
    old_numbers = {slot._wake_w for slot in slots}
    controller.shutdown()
    # Sockets are writable at both ends, so a stray byte shows up whichever end got an old number.
    reused: list[tuple[socket.socket, socket.socket]] = []
    try:
        while not old_numbers <= {s.fileno() for pair in reused for s in pair} and len(reused) < 500:
            reused.append(socket.socketpair())  # the lowest free numbers: sooner or later the slots' old ones
        assert old_numbers <= {s.fileno() for pair in reused for s in pair}
        for slot in slots:
            slot.wake()
        for pair in reused:
            for end in pair:
                end.setblocking(False)
                with pytest.raises(BlockingIOError):
                    end.recv(16)
    finally:
        for pair in reused:
            for end in pair:
                end.close()
