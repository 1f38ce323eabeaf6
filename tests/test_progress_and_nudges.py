"""Progress reported in a tight loop is coalesced in the task process, yet the last value always
arrives; serving processes of one host nudge each other when a task ends or must stop."""
from __future__ import annotations

import threading
import time
import uuid as uuid_module

import pytest

from conftest import wait_until
from flask_multiprocess_controller import MetaMPTask
from flask_multiprocess_controller.notify import HostBus


class Chatty(MetaMPTask):
    """Reports progress many times in a burst, then stays quiet until stopped."""

    def execute(self, calls: int = 50_000, then_wait: bool = True) -> int:
        for i in range(calls):
            self.upload_status({"i": i} if i % 1000 == 0 else i)
        while then_wait:
            time.sleep(0.01)
            self.checkpoint()
        return calls


@pytest.mark.timeout(60)
def test_last_value_of_a_burst_arrives_while_the_task_is_quiet(make_controller):
    controller = make_controller(Chatty, store="memory://")
    uuid = controller.submit(calls=50_000)
    # No further call follows the burst: only the task process's own flushing can publish 49,999.
    task = wait_until(lambda: (lambda t: t if t["progress"] == 49_999 else None)(controller.status(uuid)),
                      timeout=20)
    assert task["status"] == "running"
    controller.stop(uuid)
    assert controller.wait(uuid, timeout=20)["status"] == "stopped"


@pytest.mark.timeout(60)
def test_the_final_progress_is_recorded_with_the_end(make_controller):
    controller = make_controller(Chatty, store="memory://")
    task = controller.wait(controller.submit(calls=20_002, then_wait=False), timeout=30)
    assert task["status"] == "succeeded", task
    assert task["progress"] == 20_001
    assert task["result"] == 20_002


class BadProgress(MetaMPTask):
    def execute(self) -> str:
        for i in range(100):
            self.upload_status(i)
        self.upload_status({"at": object()})
        return "unreachable"


@pytest.mark.timeout(60)
def test_unserialisable_progress_still_fails_at_the_call(make_controller):
    controller = make_controller(BadProgress, store="memory://")
    task = controller.wait(controller.submit(), timeout=30)
    assert task["status"] == "failed", task
    assert task["error"]["type"] == "TypeError"
    assert "JSON-serialisable" in task["error"]["message"]
    assert task["progress"] == 99


# -- nudges between serving processes ----------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.event = threading.Event()

    def handler(self, verb: str):
        def record(uuid: str) -> None:
            self.seen.append((verb, uuid))
            self.event.set()
        return record

    def wait_for(self, entry: tuple[str, str], timeout: float = 10.0) -> list[tuple[str, str]]:
        """Wait until ``entry`` was handled; return everything handled up to then."""
        wait_until(lambda: entry in self.seen, timeout=timeout)
        return list(self.seen)


def _bus(controller: str, owner: str, recorder: _Recorder) -> HostBus:
    import logging
    bus = HostBus(controller, owner, on_ended=recorder.handler("ended"), on_stop=recorder.handler("stop"),
                  logger=logging.getLogger("test-bus"))
    bus.start()
    return bus


@pytest.mark.timeout(30)
def test_a_host_bus_delivers_ended_and_stop_to_the_right_runtime():
    name = f"bus-{uuid_module.uuid4().hex[:8]}"
    a_seen, b_seen, other_seen, probe_seen = _Recorder(), _Recorder(), _Recorder(), _Recorder()
    a = _bus(name, "host:1:1.000", a_seen)
    b = _bus(name, "host:2:2.000", b_seen)
    other = _bus(name + "-other", "host:2:2.000", other_seen)  # same process, another controller
    probe = _bus(name + "-other", "host:1:1.000", probe_seen)  # a peer of ``other`` only
    try:
        a.set_peers(["host:1:1.000", "host:2:2.000", "host:3:3.000"])  # itself and a dead one are harmless
        task = str(uuid_module.uuid4())
        a.ended(task)
        assert b_seen.event.wait(10)
        assert b_seen.seen == [("ended", task)]
        b.stop("host:1:1.000", task)
        assert a_seen.event.wait(10)
        assert a_seen.seen == [("stop", task)]
        # A datagram is in its receiver's queue once sendto returns, and each bus handles its queue in
        # order: once a marker sent now has been handled, so has any stray nudge sent before it.
        marker = str(uuid_module.uuid4())
        b.stop("host:1:1.000", marker)
        a.stop("host:2:2.000", marker)
        probe.stop("host:2:2.000", marker)
        assert a_seen.wait_for(("stop", marker)) == [("stop", task), ("stop", marker)], "a runtime nudged itself"
        assert b_seen.wait_for(("stop", marker)) == [("ended", task), ("stop", marker)], "a runtime nudged itself"
        assert other_seen.wait_for(("stop", marker)) == [("stop", marker)], \
            "a nudge reached another controller's runtime"
        assert probe_seen.seen == []
    finally:
        for bus in (a, b, other, probe):
            bus.close()
