"""Faults in tasks: each ends in the right state with the right error, the controller keeps
working afterwards, and no process of the task's tree is left behind."""
from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

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
        if mode == "sys_exit":
            sys.exit(code)  # the sys.exit line
        if mode == "sys_exit_bare":
            sys.exit()  # the bare sys.exit line
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


# -- faults that end the task "failed" -----------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    """A fault a task runs into, and the ``failed`` task object it must end with."""

    #: Arguments of ``Faulty.execute``.
    args: dict
    #: ``error["type"]``.
    error_type: str
    #: Text ``error["message"]`` contains (the whole message when ``exact``).
    message: str
    #: ``exit_code`` of the task's (fresh) process: 0 when execute's failure was caught in the process.
    exit_code: int
    exact: bool = False
    #: Lines ``error["traceback"]`` contains; empty: the error has no traceback (the process said nothing).
    traceback: tuple = ()
    #: Controller keywords the fault needs.
    controller: dict = field(default_factory=dict)


FAULTS = {
    "exception": Fault({"mode": "raise", "code": 17}, "ValueError", "bad value 17 on purpose", 0, exact=True,
                       traceback=("Traceback", 'raise ValueError(f"bad value {code} on purpose")', "test_faults.py")),
    # SystemExit is an exception of execute like any other: caught in the task process, which stays sane.
    "sys-exit-3": Fault({"mode": "sys_exit", "code": 3}, "SystemExit", "3", 0, exact=True,
                        traceback=("Traceback", "sys.exit(code)  # the sys.exit line", "test_faults.py")),
    "sys-exit": Fault({"mode": "sys_exit_bare"}, "SystemExit", "", 0,
                      traceback=("Traceback", "sys.exit()  # the bare sys.exit line")),
    "segfault": Fault({"mode": "segfault"}, "ProcessDied", "SIGSEGV", -signal.SIGSEGV),
    "os-exit": Fault({"mode": "exit", "code": 3}, "ProcessDied", "exited with code 3", 3),
    "memory-hog": Fault({"mode": "hog"}, "MemoryLimitExceeded", str(200 * MIB), -signal.SIGKILL,
                        controller={"max_memory": 200 * MIB}),
    "unserialisable-result": Fault({"mode": "unserialisable"}, "ResultNotSerializable", "not JSON-serialisable", 0),
    "unserialisable-progress": Fault({"mode": "bad_status"}, "TypeError", "JSON-serialisable", 0,
                                     traceback=("Traceback", "self.upload_status(object())")),
}


def assert_failed_with(task: dict, fault: Fault) -> None:
    """``task`` ended ``failed`` with the error, exit code and empty result ``fault`` calls for."""
    assert task["status"] == "failed", task
    error = task["error"]
    assert error["type"] == fault.error_type, error
    if fault.exact:
        assert error["message"] == fault.message, error
    else:
        assert fault.message in error["message"], error
    if fault.traceback:
        for line in fault.traceback:
            assert line in error["traceback"], error["traceback"]
    else:
        assert error["traceback"] is None, error
    assert task["exit_code"] == fault.exit_code, task
    assert task["result"] is None
    assert task["progress"] is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_fault_fails_the_task_and_the_controller_goes_on(make_controller, fault):
    controller = make_controller(Faulty, **fault.controller)
    task = run_fault(controller, **fault.args)
    assert_failed_with(task, fault)
    assert task["pid"] != os.getpid()
    still_works(controller)
    no_leftovers(controller)


# -- faults from outside, and stops ------------------------------------------------------------------------

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
    assert task["error"]["type"] == "ProcessDied", task
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
    assert task["error"]["type"] == "Killed", task
    assert "kill" in task["error"]["message"].lower()
    assert "0.5 s" in task["error"]["message"]
    assert task["exit_code"] in (-signal.SIGTERM, -signal.SIGKILL), task
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
    assert task["error"] is None, task  # stopped at a checkpoint: no error
    assert task["exit_code"] == 0, task
    wait_until(lambda: gone(progress["pid"]), timeout=10)
    still_works(controller)
    no_leftovers(controller)


@pytest.mark.timeout(90)
def test_faults_one_after_another_leave_nothing(make_controller):
    """Every fault on one controller with two slots; it keeps working and nothing is left."""
    controller = make_controller(Faulty, max_num_process=2, stop_grace=0.5, max_memory=200 * MIB)
    uuids = {name: controller.submit(**fault.args) for name, fault in FAULTS.items()}
    ok = controller.submit(mode="ok")
    stoppable = controller.submit(mode="ignore_stop")
    progress = wait_until(lambda: controller.status(stoppable)["progress"], timeout=30)
    controller.stop(stoppable)
    for name, uuid in uuids.items():
        task = controller.wait(uuid, timeout=30)
        assert task["status"] == "failed", (name, task)
        assert task["error"]["type"] == FAULTS[name].error_type, (name, task)
    assert controller.wait(ok, timeout=30)["status"] == "succeeded"
    stopped = controller.wait(stoppable, timeout=20)
    assert stopped["status"] == "stopped" and stopped["error"]["type"] == "Killed", stopped
    wait_until(lambda: gone(progress["pid"]) and gone(progress["grandchild"]), timeout=10)
    still_works(controller)
    no_leftovers(controller)


@pytest.mark.timeout(60)
def test_faults_in_a_reused_worker(make_controller):
    """With reuse, an exception (SystemExit too) keeps the worker; a crash replaces it; the tree is clean
    afterwards."""
    controller = make_controller(Faulty, max_tasks_per_child=0)
    first = controller.wait(controller.submit(mode="ok"), timeout=20)["result"]["pid"]
    for name in ("exception", "sys-exit-3", "sys-exit"):
        fault = FAULTS[name]
        failed = run_fault(controller, **fault.args)
        assert failed["status"] == "failed" and failed["error"]["type"] == fault.error_type, (name, failed)
        assert failed["pid"] == first, (name, failed)
        assert failed["exit_code"] is None, (name, failed)  # the worker lives on
        again = controller.wait(controller.submit(mode="ok"), timeout=20)
        assert again["status"] == "succeeded" and again["result"]["pid"] == first, (name, again)
    crashed = run_fault(controller, mode="exit", code=3)
    assert crashed["status"] == "failed" and crashed["exit_code"] == 3
    assert crashed["error"]["type"] == "ProcessDied", crashed
    assert crashed["pid"] == first
    after = controller.wait(controller.submit(mode="ok"), timeout=20)
    assert after["status"] == "succeeded"
    assert after["result"]["pid"] != first
    assert gone(first)
    server = psutil.Process(controller.forkserver_pid)
    worker = after["result"]["pid"]
    wait_until(lambda: [p.pid for p in server.children(recursive=True)] == [worker], timeout=10)
