"""A task's life through the Python API: results, progress, queueing, stopping, timeouts,
worker reuse, nested pools, logging, callbacks, retention and the SQLite store."""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import uuid as uuid_module
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta

import psutil
import pytest
from conftest import wait_until
from werkzeug.serving import make_server

from flask_multiprocess_controller import (
    MetaMPTask, MPCError, TaskAlreadyFinished, TaskNotFound, set_checkpoint, upload_status,
)
from flask_multiprocess_controller.exceptions import NotInTask
from flask_multiprocess_controller.store import resolve_store

#: Keys of the task object named in DESIGN.md, plus the resource figures the package records.
DESIGN_KEYS = {
    "uuid", "status", "progress", "percent", "result", "error", "args", "priority", "created_at",
    "started_at", "ended_at", "pid", "exit_code", "position", "controller", "msg",
}
TERMINAL = {"succeeded", "failed", "stopped", "timed_out", "lost"}


# -- helpers that run inside task processes --------------------------------------------------------

def wait_for_file(task: MetaMPTask, path: str, limit: float = 30.0) -> None:
    """Block (checkpointing) until ``path`` exists; give up after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        task.checkpoint()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def append_line(path: str, line: str) -> None:
    with open(path, "a") as fh:
        fh.write(line + "\n")
        fh.flush()


def square(x: int) -> tuple:
    return x * x, os.getpid()


def helper_step(n: int) -> int:
    """A plain function called by execute: uses the module-level helpers."""
    upload_status({"from": "helper", "n": n})
    set_checkpoint()
    return n * 2


# -- task classes ----------------------------------------------------------------------------------

class Rich(MetaMPTask):
    """Allocates memory and burns CPU, then returns a value."""

    def execute(self, value: int = 42) -> dict:
        hold = [b"\x01" * (1 << 20) for _ in range(40)]  # 40 MiB really touched
        end = time.process_time() + 0.3
        spins = 0
        while time.process_time() < end:
            spins += 1
        return {"value": value, "pid": os.getpid(), "held": len(hold), "spins": spins > 0}


class Gate(MetaMPTask):
    """Records its start in ``log``, then blocks until ``gate`` exists (when given)."""

    def execute(self, tag: str = "", gate: str = "", log: str = "") -> dict:
        if log:
            append_line(log, tag)
        if gate:
            wait_for_file(self, gate)
        return {"tag": tag, "pid": os.getpid()}


class Progress(MetaMPTask):
    def execute(self, gate: str) -> str:
        self.upload_status({"step": 1})
        self.upload_status({"step": 2, "note": "almost"})
        wait_for_file(self, gate)
        return "done"


class Tracked(MetaMPTask):
    def execute(self, gate: str, n: int = 10) -> int:
        total = 0
        for i in self.track(range(n)):
            if i == n // 2:
                wait_for_file(self, gate)
            total += i
        return total


class TrackedPastTotal(MetaMPTask):
    """Tracks 20 items with a stated total of 10, then waits for the gate."""

    def execute(self, gate: str) -> str:
        for i in self.track(range(20), total=10):
            if i == 15:
                wait_for_file(self, gate)
        return "done"


class UsesHelpers(MetaMPTask):
    def execute(self, n: int) -> int:
        return helper_step(n)


class HelperLoop(MetaMPTask):
    """Stops only through the module-level set_checkpoint()."""

    def execute(self) -> str:
        upload_status("looping")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            set_checkpoint()
            time.sleep(0.01)
        return "never stopped"


class Spinner(MetaMPTask):
    """Checkpoints in a loop until stopped (or 30 s pass)."""

    def execute(self) -> str:
        self.upload_status("spinning")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.checkpoint()
            time.sleep(0.01)
        return "never stopped"


class Sleeper(MetaMPTask):
    """Runs ``seconds``; with ``check`` it checkpoints, else it ignores stop requests."""

    def execute(self, seconds: float = 30.0, check: bool = True) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if check:
                self.checkpoint()
            time.sleep(0.01)
        return "slept"


class Contextual(MetaMPTask):
    def execute(self) -> dict:
        return {"context": self.context, "task_id": self.task_id}


class Pid(MetaMPTask):
    def execute(self, i: int = 0) -> dict:
        time.sleep(0.05)
        return {"i": i, "pid": os.getpid()}


class Pooled(MetaMPTask):
    """Starts its own process pool, like the seed's heavy example."""

    def execute(self, n: int = 8) -> dict:
        with ProcessPoolExecutor(2) as pool:
            out = list(pool.map(square, range(n)))
        return {"squares": [s for s, _ in out], "workers": sorted({p for _, p in out}), "pid": os.getpid()}


class Chatty(MetaMPTask):
    def execute(self, word: str) -> int:
        self.logger.info("hello %s from %d", word, os.getpid())
        return os.getpid()


class Quick(MetaMPTask):
    def execute(self, x: int = 1) -> int:
        return x + 1


class Persisted(MetaMPTask):
    """Same class (so same controller name) for both controller instances of the SQLite tests."""

    def execute(self, tag: str = "", gate: str = "", log: str = "") -> dict:
        if log:
            append_line(log, tag)
        if gate:
            wait_for_file(self, gate)
        return {"tag": tag}


class Retained(MetaMPTask):
    def execute(self) -> str:
        return "kept?"


# -- test helpers ----------------------------------------------------------------------------------

def utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0), text
    return moment


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def live_children(pid: int, recursive: bool = False) -> list:
    try:
        procs = psutil.Process(pid).children(recursive=recursive)
    except psutil.NoSuchProcess:
        return []
    alive = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def status_is(controller, uuid: str, status: str):
    def check():
        task = controller.status(uuid)
        return task if task["status"] == status else None
    return check


def read_lines(path) -> list:
    return path.read_text().split() if path.exists() else []


# -- results and the task object -------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_succeeded_task_object_has_every_key(make_controller):
    controller = make_controller(Rich)
    uuid = controller.submit(value=7)
    task = controller.wait(uuid, timeout=30)
    assert task["status"] == "succeeded", task
    assert task["result"]["value"] == 7
    assert task["result"]["held"] == 40
    missing = (DESIGN_KEYS | {"memory_peak", "cpu_time"}) - set(task)
    assert not missing, f"task object lacks {missing}"
    assert task["uuid"] == uuid
    assert task["error"] is None
    assert task["args"] == {"value": 7}
    assert task["priority"] == 0
    assert task["position"] is None
    assert task["controller"] == controller.name
    assert isinstance(task["msg"], str) and task["msg"]
    assert task["pid"] == task["result"]["pid"] != os.getpid()
    assert task["exit_code"] == 0
    created, started, ended = utc(task["created_at"]), utc(task["started_at"]), utc(task["ended_at"])
    assert created <= started <= ended
    assert task["memory_peak"] >= 40 * (1 << 20), task["memory_peak"]
    assert task["cpu_time"] > 0.1, task["cpu_time"]
    # The task object is plain JSON.
    assert json.loads(json.dumps(task)) == task


# -- progress --------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_last_upload_status_is_visible_while_running_and_after(make_controller, tmp_path):
    controller = make_controller(Progress)
    gate = tmp_path / "gate"
    uuid = controller.submit(gate=str(gate))
    expected = {"step": 2, "note": "almost"}
    wait_until(lambda: controller.status(uuid)["progress"] == expected, timeout=20)
    assert controller.status(uuid)["status"] == "running"
    gate.touch()
    task = controller.wait(uuid, timeout=20)
    assert task["status"] == "succeeded"
    assert task["result"] == "done"
    assert task["progress"] == expected


@pytest.mark.timeout(60)
def test_track_publishes_percent(make_controller, tmp_path):
    controller = make_controller(Tracked)
    gate = tmp_path / "gate"
    uuid = controller.submit(gate=str(gate), n=10)
    running = wait_until(lambda: (lambda t: t if t["percent"] == 50.0 else None)(controller.status(uuid)),
                         timeout=20)
    assert running["status"] == "running"
    gate.touch()
    task = controller.wait(uuid, timeout=20)
    assert task["status"] == "succeeded", task
    assert task["result"] == sum(range(10))
    assert task["percent"] == 100.0


@pytest.mark.timeout(60)
def test_track_holds_percent_below_100_when_total_is_understated(make_controller, tmp_path):
    controller = make_controller(TrackedPastTotal)
    gate = tmp_path / "gate"
    uuid = controller.submit(gate=str(gate))
    running = wait_until(lambda: (lambda t: t if t["percent"] == 99.0 else None)(controller.status(uuid)),
                         timeout=20)
    assert running["status"] == "running"
    gate.touch()
    task = controller.wait(uuid, timeout=20)
    assert task["status"] == "succeeded", task
    assert task["percent"] == 100.0


@pytest.mark.timeout(60)
def test_module_level_helpers_work_from_a_called_function(make_controller):
    controller = make_controller(UsesHelpers)
    task = controller.wait(controller.submit(n=21), timeout=20)
    assert task["status"] == "succeeded", task
    assert task["result"] == 42
    assert task["progress"] == {"from": "helper", "n": 21}


@pytest.mark.timeout(60)
def test_module_level_set_checkpoint_stops_the_task(make_controller):
    # A long grace: only a working set_checkpoint() can stop the task within the wait below.
    controller = make_controller(HelperLoop, stop_grace=30)
    uuid = controller.submit()
    wait_until(lambda: controller.status(uuid)["progress"] == "looping", timeout=20)
    assert controller.stop(uuid)["status"] == "stopping"
    task = controller.wait(uuid, timeout=10)
    assert task["status"] == "stopped", task
    assert task["error"] is None


def test_module_level_helpers_outside_a_task_raise_not_in_task():
    assert issubclass(NotInTask, MPCError)
    with pytest.raises(NotInTask, match="task"):
        upload_status({"x": 1})
    with pytest.raises(NotInTask, match="task"):
        set_checkpoint()


# -- queue: positions, priorities ------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_positions_while_queued(make_controller, tmp_path):
    controller = make_controller(Gate, max_num_process=1)
    gate = tmp_path / "gate"
    blocker = controller.submit(tag="blocker", gate=str(gate))
    wait_until(status_is(controller, blocker, "running"), timeout=20)
    queued = [controller.submit(tag=f"q{i}") for i in range(3)]
    assert [controller.status(u)["position"] for u in queued] == [1, 2, 3]
    assert [controller.status(u)["status"] for u in queued] == ["queued"] * 3
    assert "position 2" in controller.status(queued[1])["msg"]
    assert controller.status(blocker)["position"] is None
    listing = controller.tasks()
    assert listing["running"] == 1 and listing["queued"] == 3 and listing["max_num_process"] == 1
    # Stopping the head of the queue moves the others up.
    controller.stop(queued[0])
    assert [controller.status(u)["position"] for u in queued[1:]] == [1, 2]
    gate.touch()
    for u in [blocker, *queued[1:]]:
        assert controller.wait(u, timeout=20)["status"] == "succeeded"
    assert all(controller.status(u)["position"] is None for u in queued)


@pytest.mark.timeout(60)
def test_priority_order_and_fifo_within_a_priority(make_controller, tmp_path):
    controller = make_controller(Gate, max_num_process=1)
    gate, log = tmp_path / "gate", tmp_path / "started.log"
    blocker = controller.submit(tag="blocker", gate=str(gate), log=str(log))
    wait_until(lambda: read_lines(log) == ["blocker"], timeout=20)
    uuids = [blocker]
    for tag, priority in [("p5a", 5), ("p0a", 0), ("pm1", -1), ("p5b", 5), ("p0b", 0)]:
        uuids += [t["uuid"] for t in controller.enqueue([{"tag": tag, "log": str(log)}], priority=priority)]
    # A "priority" key in the arguments is honoured (seed compatibility) and not passed to execute.
    seeded = controller.enqueue([{"tag": "m2", "log": str(log), "priority": -2},
                                 {"tag": "p0c", "log": str(log)}])
    assert seeded[0]["priority"] == -2 and "priority" not in seeded[0]["args"]
    uuids += [t["uuid"] for t in seeded]
    expected = ["m2", "pm1", "p0a", "p0b", "p0c", "p5a", "p5b"]
    positions = {controller.status(u)["args"]["tag"]: controller.status(u)["position"] for u in uuids[1:]}
    assert positions == {tag: i + 1 for i, tag in enumerate(expected)}
    gate.touch()
    for u in uuids:
        assert controller.wait(u, timeout=30)["status"] == "succeeded"
    assert read_lines(log) == ["blocker", *expected]
    started = sorted(uuids[1:], key=lambda u: controller.status(u)["started_at"])
    assert [controller.status(u)["args"]["tag"] for u in started] == expected


# -- stop ------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_stop_queued_task_never_starts(make_controller, tmp_path):
    controller = make_controller(Gate, max_num_process=1)
    gate, log = tmp_path / "gate", tmp_path / "started.log"
    blocker = controller.submit(tag="blocker", gate=str(gate), log=str(log))
    wait_until(status_is(controller, blocker, "running"), timeout=20)
    queued = controller.submit(tag="queued", log=str(log))
    stopped = controller.stop(queued)
    assert stopped["status"] == "stopped"
    assert stopped["started_at"] is None
    assert controller.status(queued)["status"] == "stopped"
    gate.touch()
    assert controller.wait(blocker, timeout=20)["status"] == "succeeded"
    # Give the slot every chance to (wrongly) pick the stopped task up.
    follower = controller.submit(tag="follower", log=str(log))
    assert controller.wait(follower, timeout=20)["status"] == "succeeded"
    task = controller.status(queued)
    assert task["status"] == "stopped"
    assert task["started_at"] is None and task["pid"] is None and task["result"] is None
    assert task["ended_at"] is not None
    assert read_lines(log) == ["blocker", "follower"]
    with pytest.raises(TaskAlreadyFinished):
        controller.stop(queued)


@pytest.mark.timeout(60)
def test_stop_running_checkpointing_task(make_controller):
    # A long grace: "stopped" within the wait below can only come from checkpoint().
    controller = make_controller(Spinner, stop_grace=30)
    uuid = controller.submit()
    wait_until(lambda: controller.status(uuid)["progress"] == "spinning", timeout=20)
    answer = controller.stop(uuid)
    assert answer["status"] == "stopping"
    task = controller.wait(uuid, timeout=10)
    assert task["status"] == "stopped", task
    assert task["error"] is None
    assert task["started_at"] is not None and task["ended_at"] is not None
    assert task["result"] is None


@pytest.mark.timeout(60)
def test_stop_finished_and_unknown_tasks(make_controller):
    controller = make_controller(Quick)
    uuid = controller.submit(x=1)
    assert controller.wait(uuid, timeout=20)["status"] == "succeeded"
    with pytest.raises(TaskAlreadyFinished):
        controller.stop(uuid)
    assert controller.status(uuid)["status"] == "succeeded"
    unknown = str(uuid_module.uuid4())
    with pytest.raises(TaskNotFound):
        controller.stop(unknown)
    with pytest.raises(TaskNotFound):
        controller.status(unknown)


# -- context and task id ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_context_and_task_id_reach_the_task(make_controller):
    controller = make_controller(Contextual, context={"secret": "s3cr3t", "n": 3})
    uuid = controller.submit()
    task = controller.wait(uuid, timeout=20)
    assert task["status"] == "succeeded", task
    assert task["result"] == {"context": {"secret": "s3cr3t", "n": 3}, "task_id": uuid}
    shown = dict(task, result=None)
    assert "s3cr3t" not in json.dumps(shown)


# -- timeouts --------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_controller_timeout_ends_task_that_ignores_stop(make_controller):
    controller = make_controller(Sleeper, timeout=1.0, stop_grace=0.5)
    uuid = controller.submit(seconds=30.0, check=False)
    task = controller.wait(uuid, timeout=20)
    assert task["status"] == "timed_out", task
    assert task["error"]["type"] == "TaskTimeout"
    assert "timeout of 1 s" in task["error"]["message"], task
    assert "did not stop within 0.5 s" in task["error"]["message"], task  # it ignored the stop: killed
    assert task["result"] is None


@pytest.mark.timeout(60)
def test_per_task_timeout(make_controller):
    controller = make_controller(Sleeper, stop_grace=0.5)
    [queued] = controller.enqueue([{}], timeout=0.5)
    assert queued["timeout"] == 0.5
    task = controller.wait(queued["uuid"], timeout=20)
    assert task["status"] == "timed_out", task
    assert task["error"]["type"] == "TaskTimeout"
    # Without a timeout the same task runs on, three times as long, to its own end: it checkpoints all
    # along, so a timeout firing at any moment of its run would have ended it timed_out instead.
    free = controller.submit(seconds=1.5)
    assert controller.status(free)["timeout"] is None
    task = controller.wait(free, timeout=20)
    assert task["status"] == "succeeded" and task["result"] == "slept", task
    assert utc(task["ended_at"]) - utc(task["started_at"]) >= timedelta(seconds=1.5), task


@pytest.mark.timeout(60)
def test_per_task_timeout_is_capped_by_the_controller(make_controller):
    controller = make_controller(Sleeper, timeout=1.0, stop_grace=0.5)
    [queued] = controller.enqueue([{}], timeout=600)
    assert queued["timeout"] == 1.0
    task = controller.wait(queued["uuid"], timeout=20)
    assert task["status"] == "timed_out", task
    assert task["error"]["type"] == "TaskTimeout"
    assert "1 s" in task["error"]["message"]
    # A lower per-task timeout is kept.
    [lower] = controller.enqueue([{}], timeout=0.5)
    assert lower["timeout"] == 0.5
    assert controller.wait(lower["uuid"], timeout=20)["status"] == "timed_out"


# -- reused workers --------------------------------------------------------------------------------

def _run_and_watch(controller, uuids: list, limit: float = 30.0) -> int:
    """Wait for every task while sampling the fork server's live children; return the most seen."""
    most = 0
    deadline = time.monotonic() + limit
    while True:
        most = max(most, len(live_children(controller.forkserver_pid)))
        if all(controller.status(u)["status"] in TERMINAL for u in uuids):
            return most
        assert time.monotonic() < deadline, "tasks did not finish"
        time.sleep(0.01)


@pytest.mark.timeout(60)
def test_unlimited_worker_reuse(make_controller):
    controller = make_controller(Pid, max_num_process=2, max_tasks_per_child=0)
    uuids = [controller.submit(i=i) for i in range(8)]
    most = _run_and_watch(controller, uuids)
    assert most <= 2
    tasks = [controller.status(u) for u in uuids]
    assert all(t["status"] == "succeeded" for t in tasks), tasks
    pids = [t["result"]["pid"] for t in tasks]
    assert all(t["pid"] == t["result"]["pid"] for t in tasks)
    assert len(set(pids)) <= 2, pids
    # The workers stay up between tasks.
    assert {p.pid for p in live_children(controller.forkserver_pid)} == set(pids)


@pytest.mark.timeout(60)
def test_worker_replaced_after_max_tasks_per_child(make_controller):
    controller = make_controller(Pid, max_num_process=1, max_tasks_per_child=3)
    uuids = [controller.submit(i=i) for i in range(6)]
    most = _run_and_watch(controller, uuids)
    assert most <= 1
    tasks = [controller.status(u) for u in uuids]
    assert all(t["status"] == "succeeded" for t in tasks), tasks
    pids = [t["result"]["pid"] for t in tasks]
    assert sorted(collections.Counter(pids).values()) == [3, 3], pids
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5]
    wait_until(lambda: gone(pids[0]), timeout=10)


# -- a task with its own process pool --------------------------------------------------------------

@pytest.mark.timeout(60)
def test_task_with_its_own_process_pool(make_controller):
    controller = make_controller(Pooled)
    task = controller.wait(controller.submit(n=8), timeout=40)
    assert task["status"] == "succeeded", task
    result = task["result"]
    assert result["squares"] == [i * i for i in range(8)]
    assert 1 <= len(result["workers"]) <= 2
    assert result["pid"] not in result["workers"]
    tree = [result["pid"], *result["workers"]]
    wait_until(lambda: all(gone(p) for p in tree), timeout=10)
    wait_until(lambda: not psutil.Process(controller.forkserver_pid).children(recursive=True), timeout=10)


# -- logging ---------------------------------------------------------------------------------------

class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.timeout(60)
def test_child_log_records_reach_the_parent_logger(make_controller):
    logger = Chatty.logger
    handler = _ListHandler()
    old_level = logger.level
    # Set before the controller forks its fork server, so the children inherit the level.
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        controller = make_controller(Chatty)
        task = controller.wait(controller.submit(word="otter"), timeout=20)
        assert task["status"] == "succeeded", task
        child_pid = task["result"]
        assert child_pid == task["pid"] != os.getpid()
        expected = f"hello otter from {child_pid}"
        found = wait_until(lambda: [r for r in handler.records if r.getMessage() == expected], timeout=10)
        assert found[0].process == child_pid
        assert found[0].levelno == logging.INFO
        assert found[0].name == logger.name
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# -- callbacks -------------------------------------------------------------------------------------

class Receiver:
    """A tiny HTTP server on 127.0.0.1 recording JSON bodies; the first ``fail_first`` requests get a 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.bodies: list = []
        self.attempts = 0
        self._lock = threading.Lock()
        self.server = make_server("127.0.0.1", 0, self._app)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-receiver", daemon=True)

    def _app(self, environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length)
        with self._lock:
            self.attempts += 1
            fail = self.attempts <= self.fail_first
            if not fail:
                self.bodies.append(json.loads(raw))
        if fail:
            start_response("500 INTERNAL SERVER ERROR", [("Content-Type", "text/plain")])
            return [b"try again"]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    def events(self, uuid: str) -> dict:
        with self._lock:
            return {b["event"]: b for b in self.bodies if b.get("uuid") == uuid}

    def event_names(self, uuid: str) -> list:
        """The events delivered for ``uuid``, repeats included, sorted by name."""
        with self._lock:
            return sorted(b["event"] for b in self.bodies if b.get("uuid") == uuid)

    def both_events(self, uuid: str):
        """The task's events once both ``started`` and ``ended`` arrived, else None."""
        events = self.events(uuid)
        return events if {"started", "ended"} <= set(events) else None

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join(10)
        self.server.server_close()


@pytest.mark.timeout(60)
def test_callbacks_started_and_ended(make_controller):
    with Receiver() as receiver:
        controller = make_controller(Quick, callback_url=receiver.url)
        uuid = controller.submit(x=41)
        assert controller.wait(uuid, timeout=20)["status"] == "succeeded"
        events = wait_until(lambda: receiver.both_events(uuid), timeout=15)
        for name, body in events.items():
            assert body["event"] == name and body["uuid"] == uuid
            assert body["task"]["uuid"] == uuid
        assert events["started"]["task"]["status"] == "running"
        assert events["ended"]["task"]["status"] == "succeeded"
        assert events["ended"]["task"]["result"] == 42
        # Shutting down finishes the deliveries under way: what arrived by then is all there is.
        controller.shutdown()
        assert receiver.event_names(uuid) == ["ended", "started"], "one callback per event"
        assert receiver.attempts == 2


@pytest.mark.timeout(60)
def test_callback_is_retried_after_a_500(make_controller):
    with Receiver(fail_first=1) as receiver:
        controller = make_controller(Quick, callback_url=receiver.url)
        uuid = controller.submit(x=1)
        assert controller.wait(uuid, timeout=20)["status"] == "succeeded"
        events = wait_until(lambda: receiver.both_events(uuid), timeout=20)
        assert events["ended"]["task"]["status"] == "succeeded"
        # Shutting down finishes the deliveries under way: what arrived by then is all there is.
        controller.shutdown()
        assert receiver.attempts == 3  # one refused, then each event delivered once
        assert receiver.event_names(uuid) == ["ended", "started"], "one callback per event"


# -- retention and the SQLite store ----------------------------------------------------------------

@pytest.mark.timeout(60)
def test_retention_purges_finished_tasks(make_controller, sqlite_url):
    first = make_controller(Retained, store=sqlite_url, retention=0.5)
    uuid = first.submit()
    assert first.wait(uuid, timeout=20)["status"] == "succeeded"
    first.shutdown()
    # By the store's own clock (the one its purge compares ended_at with), the task is now older than
    # twice the short retention: a purge with that retention would remove it.
    store = resolve_store(sqlite_url)
    try:
        ended_at = store.get(uuid)["ended_at"]
        wait_until(lambda: store.now() - ended_at > 2 * 0.5, timeout=10)
    finally:
        store.close()
    # With the default retention, a new controller still sees it.
    keeper = make_controller(Retained, store=sqlite_url)
    assert keeper.status(uuid)["status"] == "succeeded"
    keeper.shutdown()
    purger = make_controller(Retained, store=sqlite_url, retention=0.5)

    def purged() -> bool:
        try:
            purger.status(uuid)
        except TaskNotFound:
            return True
        return False

    wait_until(purged, timeout=10)


@pytest.mark.timeout(90)
def test_sqlite_store_keeps_finished_and_queued_tasks_across_restarts(make_controller, sqlite_url, tmp_path):
    gate, log = tmp_path / "gate", tmp_path / "started.log"
    first = make_controller(Persisted, store=sqlite_url, max_num_process=1, stop_grace=5)
    done = first.submit(tag="done", log=str(log))
    assert first.wait(done, timeout=20)["status"] == "succeeded"
    blocker = first.submit(tag="blocker", gate=str(gate), log=str(log))
    wait_until(lambda: "blocker" in read_lines(log), timeout=20)
    left = [first.submit(tag=f"left{i}", log=str(log)) for i in range(3)]
    assert [first.status(u)["position"] for u in left] == [1, 2, 3]
    first.shutdown()
    assert read_lines(log) == ["done", "blocker"]

    second = make_controller(Persisted, store=sqlite_url, max_num_process=1)
    finished = second.status(done)
    assert finished["status"] == "succeeded"
    assert finished["result"] == {"tag": "done"}
    assert finished["ended_at"] is not None
    # The running task was stopped by the shutdown; it is not run again.
    cut = second.wait(blocker, timeout=20)
    assert cut["status"] == "stopped" and cut["error"]["type"] == "Shutdown", cut
    assert cut["result"] is None
    for u in left:
        task = second.wait(u, timeout=20)
        assert task["status"] == "succeeded", task
    assert read_lines(log) == ["done", "blocker", "left0", "left1", "left2"]
    listing = second.tasks()
    assert {t["uuid"] for t in listing["tasks"]} == {done, blocker, *left}


@pytest.mark.timeout(30)
def test_fork_server_is_named_for_ps(make_controller):
    from flask_multiprocess_controller.engine.forkserver import FORK_SERVER_NAME

    controller = make_controller(UsesHelpers)
    assert controller.wait(controller.submit(n=1), timeout=20)["status"] == "succeeded"
    assert psutil.Process(controller.forkserver_pid).name() == FORK_SERVER_NAME == "mpc-forkserver"


@pytest.mark.timeout(30)
def test_the_serving_process_is_named_for_ps(make_controller, monkeypatch):
    from flask import Flask

    from flask_multiprocess_controller.engine import proctree

    before = proctree.process_name(os.getpid())
    monkeypatch.setattr(proctree, "_serving_name", None)
    try:
        controller = make_controller(UsesHelpers)
        with Flask("reports-app").app_context():
            assert controller.runtime is not None  # the first controller that starts serving names the process
        assert proctree.process_name(os.getpid()) == "mpc-serve:repor"  # the kernel keeps 15 bytes
        proctree.name_serving_process("reports", worker=True)
        assert proctree.process_name(os.getpid()) == "mpc-worker:repo"
        proctree.name_serving_process("reports")  # a controller started later in a worker keeps its name
        assert proctree.process_name(os.getpid()) == "mpc-worker:repo"
    finally:
        with open("/proc/self/comm", "w") as comm:
            comm.write(before or "python")
