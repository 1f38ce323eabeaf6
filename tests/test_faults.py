"""Faults in tasks: each ends in the right state with the right error, the controller keeps
working afterwards, and no process of the task's tree is left behind."""
from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import subprocess
import time

import psutil
import pytest
from conftest import wait_until

from flask_multiprocess_controller import MetaMPTask

TERMINAL = {"succeeded", "failed", "stopped", "timed_out", "lost"}
MIB = 1 << 20


class Faulty(MetaMPTask):
    """One task class whose ``mode`` picks the fault."""

    def execute(self, mode: str = "ok", code: int = 0) -> object:
        if mode == "ok":
            return {"ok": True, "pid": os.getpid()}
        if mode == "raise":
            raise ValueError(f"bad value {code} on purpose")  # the raising line
        if mode == "segfault":
            faulthandler.disable()  # no traceback dump on the test's stderr
            ctypes.string_at(0)
        if mode == "exit":
            os._exit(code)
        if mode == "wait_for_kill":
            self.upload_status({"pid": os.getpid()})
            time.sleep(60)
        if mode == "ignore_stop":
            sleeper = subprocess.Popen(["sleep", "60"])
            self.upload_status({"pid": os.getpid(), "grandchild": sleeper.pid})
            time.sleep(60)  # never checkpoints
        if mode == "checkpoint":
            self.upload_status({"pid": os.getpid()})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                self.checkpoint()
                time.sleep(0.01)
        if mode == "hog":
            hold = []
            while len(hold) < 1024 // 16:  # up to 1 GiB, 16 MiB at a time, each page touched
                hold.append(b"\x01" * (16 * MIB))
                time.sleep(0.02)
            return {"survived": len(hold) * 16}
        if mode == "unserialisable":
            return object()
        if mode == "bad_status":
            self.upload_status(object())
            return "published"
        return {"finished": mode}


# -- helpers -------------------------------------------------------------------------------------------

def gone(pid: int) -> bool:
    """True when ``pid`` does not run any more (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def no_leftovers(controller) -> None:
    """Poll until the fork server has no descendant left."""
    server = psutil.Process(controller.forkserver_pid)
    wait_until(lambda: not server.children(recursive=True), timeout=10)


def still_works(controller) -> None:
    """A normal task after a fault succeeds."""
    task = controller.wait(controller.submit(mode="ok"), timeout=20)
    assert task["status"] == "succeeded", task
    assert task["result"]["ok"] is True
    assert task["error"] is None


def run_fault(controller, **args) -> dict:
    task = controller.wait(controller.submit(**args), timeout=30)
    assert task["status"] in TERMINAL, task
    return task


# -- tests ------------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_exception_in_execute(make_controller):
    controller = make_controller(Faulty)
    task = run_fault(controller, mode="raise", code=17)
    assert task["status"] == "failed", task
    error = task["error"]
    assert error["type"] == "ValueError"
    assert error["message"] == "bad value 17 on purpose"
    assert "Traceback" in error["traceback"]
    assert 'raise ValueError(f"bad value {code} on purpose")' in error["traceback"]
    assert "test_faults.py" in error["traceback"]
    assert task["result"] is None
    still_works(controller)
    no_leftovers(controller)


@pytest.mark.timeout(60)
def test_segfault(make_controller):
    controller = make_controller(Faulty)
    task = run_fault(controller, mode="segfault")
    assert task["status"] == "failed", task
    assert task["exit_code"] == -signal.SIGSEGV
    assert "SIGSEGV" in task["error"]["message"]
    assert task["error"]["type"]
    still_works(controller)
    no_leftovers(controller)


@pytest.mark.timeout(60)
def test_os_exit(make_controller):
    controller = make_controller(Faulty)
    task = run_fault(controller, mode="exit", code=3)
    assert task["status"] == "failed", task
    assert task["exit_code"] == 3
    assert "exited with code 3" in task["error"]["message"]
    still_works(controller)
    no_leftovers(controller)


@pytest.mark.timeout(60)
def test_sigkill_from_outside(make_controller):
    controller = make_controller(Faulty)
    uuid = controller.submit(mode="wait_for_kill")
    progress = wait_until(lambda: controller.status(uuid)["progress"], timeout=20)
    pid = progress["pid"]
    assert pid == controller.status(uuid)["pid"]
    os.kill(pid, signal.SIGKILL)
    task = controller.wait(uuid, timeout=20)
    assert task["status"] == "failed", task
    assert task["exit_code"] == -signal.SIGKILL
    assert "SIGKILL" in task["error"]["message"]
    still_works(controller)
    no_leftovers(controller)


@pytest.mark.timeout(60)
def test_stop_of_task_ignoring_it_kills_the_whole_tree(make_controller):
    controller = make_controller(Faulty, stop_grace=0.5)
    uuid = controller.submit(mode="ignore_stop")
    progress = wait_until(lambda: controller.status(uuid)["progress"], timeout=20)
    child, grandchild = progress["pid"], progress["grandchild"]
    assert psutil.Process(grandchild).ppid() == child
    answer = controller.stop(uuid)
    assert answer["status"] == "stopping"
    task = controller.wait(uuid, timeout=20)
    assert task["status"] == "stopped", task
    assert task["error"] is not None
    assert "kill" in task["error"]["message"].lower()
    assert "0.5 s" in task["error"]["message"]
    wait_until(lambda: gone(child) and gone(grandchild), timeout=10)
    still_works(controller)
    no_leftovers(controller)


@pytest.mark.timeout(60)
def test_stop_of_checkpointing_task(make_controller):
    # A long grace: "stopped" within the wait below can only come from checkpoint().
    controller = make_controller(Faulty, stop_grace=30)
    uuid = controller.submit(mode="checkpoint")
    progress = wait_until(lambda: controller.status(uuid)["progress"], timeout=20)
    assert controller.stop(uuid)["status"] == "stopping"
    task = controller.wait(uuid, timeout=10)
    assert task["status"] == "stopped", task
    assert task["error"] is None or "kill" not in task["error"]["message"].lower()
    wait_until(lambda: gone(progress["pid"]), timeout=10)
    still_works(controller)
    no_leftovers(controller)


@pytest.mark.timeout(60)
def test_memory_hog_is_killed(make_controller):
    controller = make_controller(Faulty, max_memory=200 * MIB)
    task = run_fault(controller, mode="hog")
    assert task["status"] == "failed", task
    assert task["error"]["type"] == "MemoryLimitExceeded"
    assert str(200 * MIB) in task["error"]["message"]
    assert task["result"] is None
    still_works(controller)
    no_leftovers(controller)


@pytest.mark.timeout(60)
def test_unserialisable_result(make_controller):
    controller = make_controller(Faulty)
    task = run_fault(controller, mode="unserialisable")
    assert task["status"] == "failed", task
    assert task["error"]["type"] == "ResultNotSerializable"
    assert "not JSON-serialisable" in task["error"]["message"]
    assert task["result"] is None
    still_works(controller)
    no_leftovers(controller)


@pytest.mark.timeout(60)
def test_unserialisable_progress(make_controller):
    controller = make_controller(Faulty)
    task = run_fault(controller, mode="bad_status")
    assert task["status"] == "failed", task
    assert task["error"]["type"] == "TypeError"
    assert "JSON-serialisable" in task["error"]["message"]
    assert task["progress"] is None
    still_works(controller)
    no_leftovers(controller)


@pytest.mark.timeout(90)
def test_faults_one_after_another_leave_nothing(make_controller):
    """Every fault on one controller with two slots; it keeps working and nothing is left."""
    controller = make_controller(Faulty, max_num_process=2, stop_grace=0.5, max_memory=200 * MIB)
    expected = [
        ({"mode": "raise", "code": 1}, "failed"),
        ({"mode": "segfault"}, "failed"),
        ({"mode": "exit", "code": 3}, "failed"),
        ({"mode": "hog"}, "failed"),
        ({"mode": "unserialisable"}, "failed"),
        ({"mode": "bad_status"}, "failed"),
        ({"mode": "ok"}, "succeeded"),
    ]
    uuids = [controller.submit(**args) for args, _ in expected]
    stoppable = controller.submit(mode="ignore_stop")
    progress = wait_until(lambda: controller.status(stoppable)["progress"], timeout=30)
    controller.stop(stoppable)
    for uuid, (args, status) in zip(uuids, expected):
        task = controller.wait(uuid, timeout=30)
        assert task["status"] == status, (args, task)
    assert controller.wait(stoppable, timeout=20)["status"] == "stopped"
    wait_until(lambda: gone(progress["pid"]) and gone(progress["grandchild"]), timeout=10)
    still_works(controller)
    no_leftovers(controller)


@pytest.mark.timeout(60)
def test_faults_in_a_reused_worker(make_controller):
    """With reuse, an exception keeps the worker; a crash replaces it; the tree is clean afterwards."""
    controller = make_controller(Faulty, max_tasks_per_child=0)
    first = controller.wait(controller.submit(mode="ok"), timeout=20)["result"]["pid"]
    raised = run_fault(controller, mode="raise", code=2)
    assert raised["status"] == "failed" and raised["pid"] == first
    again = controller.wait(controller.submit(mode="ok"), timeout=20)
    assert again["status"] == "succeeded" and again["result"]["pid"] == first
    crashed = run_fault(controller, mode="exit", code=3)
    assert crashed["status"] == "failed" and crashed["exit_code"] == 3
    assert crashed["pid"] == first
    after = controller.wait(controller.submit(mode="ok"), timeout=20)
    assert after["status"] == "succeeded"
    assert after["result"]["pid"] != first
    assert gone(first)
    server = psutil.Process(controller.forkserver_pid)
    worker = after["result"]["pid"]
    wait_until(lambda: [p.pid for p in server.children(recursive=True)] == [worker], timeout=10)
