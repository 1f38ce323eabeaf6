"""Resumable tasks: ``save_state()`` inside a task, ``self.state`` in its later attempts.

The channel's side of a save is tested over a real pipe (the answers it must wait for, and the
commands it must keep, are written into the pipe first). The rest runs real task processes on real
stores: a retry, the size and JSON checks, and a real server killed (or shut down) while a task that
saved state runs, with a new server on the same SQLite file resuming it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import uuid as uuid_module
from datetime import datetime
import multiprocessing
import signal

import pytest
import requests

from flask_multiprocess_controller import MetaMPTask, StateTooLarge
from flask_multiprocess_controller.engine.child import _Channel
from flask_multiprocess_controller.engine.owners import host_id
from flask_multiprocess_controller.engine.protocol import Limits, RunTask, SaveState, StateSaved, StopTask
from flask_multiprocess_controller.store import resolve_store

from serverproc import EXAMPLE_APP, ServerPool, free_port, poll_until, python

HTTP_TIMEOUT = 15
ORPHAN_DEADLINE = 10.0
STOP_DEADLINE = 30.0


# -- the channel's side of a save ---------------------------------------------------------------------------

@pytest.fixture
def channel_pair():
    ours, theirs = multiprocessing.Pipe()
    channel = _Channel(theirs)
    channel.begin(RunTask("t-1", {}, {}, {}, Limits(1000, 1000, 1000)), logging.getLogger("test-state"))
    yield channel, ours
    ours.close()
    theirs.close()


@pytest.mark.timeout(30)
def test_a_save_waits_for_its_answer_and_keeps_a_stop_that_came_meanwhile(channel_pair):
    channel, server = channel_pair
    later = RunTask("t-2", {}, {}, {}, Limits(1, 1, 1))
    for message in (StopTask("t-1"), later, StateSaved("t-1", 0, True), StateSaved("t-1", 1, True)):
        server.send(message)  # a stop, the next task, a stale answer, then the answer
    assert channel.save_state({"done": 3}) is True
    sent = server.recv()
    assert sent == SaveState("t-1", 1, '{"done": 3}')
    assert channel.stop_requested() is True  # the stop read while waiting is not lost
    channel.begin(RunTask("t-2", {}, {}, {}, Limits(1, 1, 1)), logging.getLogger("test-state"))
    assert channel.next_command() == later  # nor is the command for the next task


@pytest.mark.timeout(30)
def test_a_refused_or_unanswered_save_returns_false_and_the_task_goes_on(channel_pair, caplog):
    channel, server = channel_pair
    server.send(StateSaved("t-1", 1, False))
    with caplog.at_level(logging.WARNING, logger="test-state"):
        assert channel.save_state([1, 2]) is False
        channel.ack_timeout = 0.2
        assert channel.save_state([3]) is False  # nobody answers: a warning, and on
    assert [server.recv().number for _ in range(2)] == [1, 2]
    assert "not stored" in caplog.text and "no answer" in caplog.text
    server.send(StateSaved("t-1", 2, True))  # the late answer to the save that gave up is dropped
    server.send(StateSaved("t-1", 3, True))
    channel.ack_timeout = 10.0
    assert channel.save_state("x") is True
    assert channel.stop_requested() is False


@pytest.mark.timeout(30)
@pytest.mark.parametrize("value, error", [(math.nan, ValueError), ({"x": [math.inf]}, ValueError),
                                          ({"x": object()}, TypeError), ("y" * 1000, StateTooLarge)])
def test_values_not_json_or_too_large_are_refused_before_anything_is_sent(channel_pair, value, error):
    channel, server = channel_pair
    with pytest.raises(error):
        channel.save_state(value)
    assert not server.poll()


# -- tasks in real processes --------------------------------------------------------------------------------

class SavesThenFails(MetaMPTask):
    """Saves twice and fails on its first attempt; returns what it resumed from on the next."""

    max_retries = 1
    retry_backoff = 0.05
    retry_backoff_max = 0.05

    def execute(self, upto: int) -> dict:
        if self.state is None:
            first = self.save_state({"reached": upto // 2})
            self.save_state({"reached": upto // 2 + 1, "first_save_returned": first})
            raise RuntimeError("cut off after saving")
        return {"resumed_from": self.state}


class ChecksItsState(MetaMPTask):
    """Tries values save_state must refuse, catching each refusal; then saves a good one."""

    def execute(self) -> dict:
        seen: dict = {}
        try:
            self.save_state("z" * 5000)
        except StateTooLarge as exc:
            seen["too_large"] = [exc.size, exc.limit]
        try:
            self.save_state({"bad": math.nan})
        except ValueError as exc:
            seen["nan"] = str(exc)
        seen["state_before"] = self.state
        seen["stored"] = self.save_state({"good": 1})
        seen["state_after"] = self.state
        return seen


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def store_url(request, tmp_path):
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.sqlite3'}"
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return request.getfixturevalue("redis_url")


@pytest.mark.timeout(60)
def test_the_next_attempt_after_a_failure_resumes_from_the_saved_state(make_controller, store_url):
    controller = make_controller(SavesThenFails, store=store_url)
    uuid = controller.submit(upto=10)
    task = controller.wait(uuid, timeout=30)
    assert task["status"] == "succeeded", task
    assert task["attempt"] == 2 and len(task["errors"]) == 1
    assert task["result"] == {"resumed_from": {"reached": 6, "first_save_returned": True}}
    assert datetime.fromisoformat(task["state_saved_at"]) >= datetime.fromisoformat(task["created_at"])
    assert "state" not in task
    row = controller.store.get(uuid)
    assert row["state"] == {"reached": 6, "first_save_returned": True}


@pytest.mark.timeout(60)
def test_too_large_and_nan_states_are_refused_inside_the_task(make_controller):
    controller = make_controller(ChecksItsState, store="memory://", max_state_size=1000)
    uuid = controller.submit()
    task = controller.wait(uuid, timeout=30)
    assert task["status"] == "succeeded", task
    result = task["result"]
    assert result["too_large"] == [5002, 1000]
    assert "NaN and Infinity" in result["nan"]
    assert (result["state_before"], result["stored"], result["state_after"]) == (None, True, {"good": 1})
    assert controller.store.get(uuid)["state"] == {"good": 1}


class ReturnsItsState(MetaMPTask):
    def execute(self) -> dict:
        return {"resumed_from": self.state}


@pytest.mark.timeout(60)
def test_a_dead_servers_task_that_saved_state_is_queued_again_unless_a_stop_was_asked(
        make_controller, tmp_path):
    store = resolve_store(f"sqlite:///{tmp_path / 'orphans.sqlite3'}")
    dead = f"{host_id()}:{os.getpid()}:1.0"  # this pid, another start time: a serving process that is gone
    rows = [{"uuid": str(uuid_module.uuid4()), "controller": "ReturnsItsState", "status": "queued",
             "priority": 0, "args": {}, "created_at": time.time(), "timeout": None, "attempt": 0,
             "stop_requested": False} for _ in range(3)]
    store.enqueue(rows, -1)
    resumable, stopped, plain = (row["uuid"] for row in rows)
    for uuid in (resumable, stopped, plain):
        assert store.claim("ReturnsItsState", dead, 10)["uuid"] == uuid
    assert store.save_state(resumable, dead, {"reached": 5})
    assert store.save_state(stopped, dead, {"reached": 6})
    store.request_stop(stopped)
    controller = make_controller(ReturnsItsState, store=store)  # its start settles the dead server's tasks
    done = controller.wait(resumable, timeout=30)
    assert (done["status"], done["attempt"]) == ("succeeded", 2)
    assert done["result"] == {"resumed_from": {"reached": 5}}
    for uuid in (stopped, plain):  # a stop was asked / nothing saved, and the class is not restartable
        task = controller.wait(uuid, timeout=30)
        assert (task["status"], task["error"]["type"]) == ("lost", "Lost"), task


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", [0, -1, "1", True])
def test_max_state_size_must_be_a_positive_number(make_controller, bad):
    with pytest.raises(ValueError, match="max_state_size"):
        make_controller(ChecksItsState, max_state_size=bad)


@pytest.mark.timeout(60)
def test_the_task_object_shows_when_state_was_saved_but_never_the_state(make_client):
    client, controller = make_client(SavesThenFails)
    uuid = client.post("/tasks", json={"upto": 4}).get_json()["uuid"]
    controller.wait(uuid, timeout=30)
    item = client.get(f"/tasks/{uuid}").get_json()
    listing = client.get("/tasks").get_json()["tasks"]
    assert item["state_saved_at"] is not None and "state" not in item
    assert [t["state_saved_at"] for t in listing] == [item["state_saved_at"]]
    assert all("state" not in t for t in listing)
    fresh = controller.store.get(uuid)
    assert fresh["state"] is not None  # kept in the store, shown nowhere
    assert '"state":' not in client.get(f"/tasks/{uuid}").get_data(as_text=True)
    assert '"state":' not in client.get("/tasks").get_data(as_text=True)


# -- the example app's task --------------------------------------------------------------------------------

EXAMPLE_RUN = """
import importlib.util, json, sys

spec = importlib.util.spec_from_file_location("app", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["app"] = module
spec.loader.exec_module(module)


class Channel:
    def __init__(self):
        self.saved = []

    def publish(self, value):
        pass

    def publish_percent(self, percent):
        pass

    def stop_requested(self):
        return False

    def save_state(self, value):
        self.saved.append(value)
        return True


class Artifacts:
    def save(self, name, data, content_type):
        return {"name": name}


module.PrimeCount.SAVE_EVERY = 0.0  # save after every chunk
answers = []
for state in (None, {"checked_below": 10000, "found": 0}):
    channel = Channel()
    task = module.PrimeCount("t", channel, {}, state=state)
    task._artifacts = Artifacts()  # the summary it saves at the end
    result = task.execute(limit=20000, chunks=4)
    answers.append({"result": result, "saved": channel.saved})
print(json.dumps(answers))
"""


@pytest.mark.timeout(60)
def test_the_example_saves_how_far_it_got_and_resumes_from_there(tmp_path):
    env = {**os.environ, "MPC_ROLE": "client", "MPC_STORE_URL": "memory://"}  # no task process, no file
    done = subprocess.run([sys.executable, "-c", EXAMPLE_RUN, str(EXAMPLE_APP)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    fresh, resumed = json.loads(done.stdout)
    assert fresh["result"] == {"limit": 20000, "primes": 2262}
    assert [s["checked_below"] for s in fresh["saved"]] == [5000, 10000, 15000, 20000]
    assert fresh["saved"][-1]["found"] == 2262
    # Resumed from a state saying 0 primes were below 10000: only the primes above it were counted.
    assert resumed["result"] == {"limit": 20000, "primes": 2262 - 1229}
    assert [s["checked_below"] for s in resumed["saved"]] == [15000, 20000]


# -- a real server lost or shut down while a task that saved state runs --------------------------------------

APP = '''
import os
import time

from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask

GATES = os.environ["GATES_DIR"]


class Resumable(MetaMPTask):
    """Not restartable: saves where it got to on its first attempt, then waits for its gate."""

    def execute(self, gate: str) -> dict:
        resumed = self.state
        if resumed is None:
            self.save_state({"reached": 42, "pid": os.getpid()})
        while not os.path.exists(os.path.join(GATES, gate)):
            self.checkpoint()
            time.sleep(0.05)
        return {"resumed_from": resumed}


controller = MetaMPController(Resumable, max_num_process=1, stop_grace=2)
app = Flask(__name__)
Api(app).add_resource(MetaMPResource, "/jobs", "/jobs/<string:uuid>", resource_class_args=(controller,))

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]))
'''


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_a_task_that_saved_state_is_queued_again_when_its_server_goes_and_resumes(
        how, tmp_path, pool: ServerPool):
    script = tmp_path / "resumable_app.py"
    script.write_text(APP)
    gates = tmp_path / "gates"
    gates.mkdir()
    db = tmp_path / "tasks.sqlite3"
    env = {"GATES_DIR": str(gates), "MPC_STORE_URL": f"sqlite:///{db}", "MPC_HANDOVER_WINDOW": "0"}

    def start(n: int):
        port = free_port()
        return pool.start(python(str(script)), cwd=tmp_path, port=port, env={**env, "PORT": str(port)},
                          log_path=tmp_path / f"server-{n}.log")

    def get(server, uuid: str) -> dict:
        response = requests.get(f"{server.base}/jobs/{uuid}", timeout=HTTP_TIMEOUT)
        assert response.status_code == 200, response.text
        return response.json()

    first = start(1)
    posted = requests.post(first.base + "/jobs", json={"gate": "g"}, timeout=HTTP_TIMEOUT)
    assert posted.status_code == 202, posted.text
    uuid = posted.json()["uuid"]
    saved = poll_until(lambda: get(first, uuid), lambda t: t["status"] == "running" and t["state_saved_at"],
                       20)
    assert saved["attempt"] == 1
    first.remember()
    if how == "sigkill":
        first.proc.kill()  # no cleanup code runs in the server
        first.proc.wait(10)
        survivors = first.wait_gone(ORPHAN_DEADLINE)
    else:  # a clean shutdown with no server to take over
        survivors = first.stop(signal.SIGTERM, timeout=STOP_DEADLINE)
    assert survivors == [], survivors

    store = resolve_store(f"sqlite:///{db}")
    try:
        row = store.get(uuid)
        if how == "sigterm":  # queued again by the shutdown itself, not stopped
            assert (row["status"], row["error"]) == ("queued", None), row
        else:  # settled by the next server
            assert row["status"] == "running" and row["attempt"] == 1, row
        assert row["state"]["reached"] == 42
    finally:
        store.close()

    (gates / "g").touch()
    second = start(2)
    done = poll_until(lambda: get(second, uuid), lambda t: t["status"] not in ("queued", "running"), 30)
    assert done["status"] == "succeeded", (done, second.log())
    assert done["attempt"] == 2
    assert done["result"]["resumed_from"]["reached"] == 42  # the second attempt started from the saved state
    assert done["state_saved_at"] == saved["state_saved_at"]
    assert second.stop(signal.SIGTERM, timeout=STOP_DEADLINE) == []
