"""Why a queued task waits (``waiting_on``), when it may start (``eta``), and what a running task uses so far
(``memory_peak`` and ``cpu_time`` written while it runs), with real task processes and stores."""
from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import wait_until
from flask_multiprocess_controller import MetaMPTask, defaults
from flask_multiprocess_controller.store.base import Row
from flask_multiprocess_controller.waiting import QueueState, eta, waiting_on

MIB = 1 << 20


class Gated(MetaMPTask):
    """Waits until the file ``gate`` exists (none: returns at once); fails first if ``fail``."""

    max_retries = 1
    retry_backoff = 60.0
    retry_backoff_max = 60.0

    def execute(self, gate: str = "", fail: bool = False) -> str:
        if fail:
            raise ConnectionError("the network is down")
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.02)
        return "done"


class Grows(MetaMPTask):
    """Holds ``first`` MiB, works 0.1 s of CPU (the kernel counts CPU in ticks of 10 ms: less might read 0) and
    says so (a progress write), waits for ``gate1``; then holds ``second`` MiB more without a word, and waits for
    ``gate2``."""

    def execute(self, first: int, second: int, gate1: str, gate2: str) -> int:
        held = [bytearray(b"x") * (first * MIB)]
        busy_until = time.process_time() + 0.1
        while time.process_time() < busy_until:
            pass
        self.upload_status("first")
        while not os.path.exists(gate1):
            self.checkpoint()
            time.sleep(0.02)
        held.append(bytearray(b"y") * (second * MIB))
        while not os.path.exists(gate2):
            self.checkpoint()
            time.sleep(0.02)
        return sum(len(block) for block in held)


class Fails(MetaMPTask):
    """Raises at once (no retries)."""

    def execute(self) -> None:
        raise ConnectionError("the network is down")


def _at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# -- the rules, without processes ------------------------------------------------------------------------------

def _state(**changes: object) -> QueueState:
    values = dict(max_num_process=2, held=2, paused=0, median=10.0, drained=False, read_at=1000.0)
    values.update(changes)
    return QueueState(**values)  # type: ignore[arg-type]


def test_waiting_on_takes_the_first_reason_that_holds_and_eta_follows_it() -> None:
    queued: Row = {"uuid": "u", "status": "queued", "retry_at": None}  # type: ignore[typeddict-item]
    retrying: Row = {**queued, "retry_at": 1234.5}  # type: ignore[typeddict-item]
    # A retry time comes first, even on a drained host: the task is not in line before it.
    assert waiting_on(retrying, None, _state(drained=True)) == "retry_at"
    assert eta(retrying, None, _state(drained=True)) == 1234.5
    assert (waiting_on(queued, 3, _state(drained=True, paused=2)), eta(queued, 3, _state(drained=True))) == \
        ("drained", None)
    assert (waiting_on(queued, 3, _state(paused=2)), eta(queued, 3, _state(paused=2))) == ("paused", None)
    # One place paused, one running: the queue moves as the running one ends.
    assert waiting_on(queued, 3, _state(paused=1)) == "slot"
    # Both places held: the third in line starts after three ends, each median / places apart.
    assert eta(queued, 3, _state()) == 1000.0 + 3 * 10.0 / 2
    # A free place and nobody ahead: it starts now, median or not.
    assert (waiting_on(queued, 1, _state(held=1, median=None)), eta(queued, 1, _state(held=1, median=None))) == \
        ("slot", 1000.0)
    assert eta(queued, 2, _state(held=1, median=None)) is None, "no success to measure: unknown"
    running: Row = {**queued, "status": "running"}  # type: ignore[typeddict-item]
    assert (waiting_on(running, None, _state()), eta(running, None, _state())) == (None, None)


# -- over HTTP, with real task processes -------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_queued_tasks_say_what_they_wait_for_and_when_they_should_start(make_client, sqlite_url, tmp_path: Path,
                                                                         monkeypatch) -> None:
    monkeypatch.setattr(defaults, "QUEUE_STATE_TTL", 0.0)  # each answer reads the queue afresh
    client, controller = make_client(Gated, store=sqlite_url, max_num_process=1)
    quick = client.post("/tasks", json={}).get_json()["uuid"]
    assert controller.wait(quick, timeout=30)["status"] == "succeeded"
    gate = tmp_path / "gate"
    running = client.post("/tasks", json={"gate": str(gate)}).get_json()["uuid"]
    wait_until(lambda: controller.status(running)["status"] == "running")
    second = client.post("/tasks", json={"gate": str(gate)}).get_json()
    third = client.get(f"/tasks/{client.post('/tasks', json={'gate': str(gate)}).get_json()['uuid']}").get_json()
    assert (second["waiting_on"], second["position"]) == ("slot", 1), second
    assert (third["waiting_on"], third["position"]) == ("slot", 2), third
    assert second["eta"] is not None and _at(second["eta"]) < _at(third["eta"]), (second, third)
    listed = {task["uuid"]: task for task in client.get("/tasks").get_json()["tasks"]}
    assert listed[third["uuid"]]["waiting_on"] == "slot" and listed[third["uuid"]]["eta"] is not None
    assert (listed[running]["waiting_on"], listed[running]["eta"]) == (None, None), "not queued"

    controller.pause(running)  # the only place is held by a paused task: the queue waits for a resume
    paused = client.get(f"/tasks/{second['uuid']}").get_json()
    assert (paused["waiting_on"], paused["eta"]) == ("paused", None), paused
    controller.resume(running)

    host = controller.runtime.host
    controller.store.set_drained(host, True)
    try:
        drained = client.get(f"/tasks/{second['uuid']}").get_json()
        assert (drained["waiting_on"], drained["eta"]) == ("drained", None), drained
    finally:
        controller.store.set_drained(host, False)
    assert client.get(f"/tasks/{second['uuid']}").get_json()["waiting_on"] == "slot"
    gate.touch()
    for uuid in (running, second["uuid"], third["uuid"]):
        assert controller.wait(uuid, timeout=30)["status"] == "succeeded"

    failing = client.post("/tasks", json={"fail": True}).get_json()["uuid"]
    retrying = wait_until(lambda: (lambda t: t if t["retry_at"] else None)(client.get(f"/tasks/{failing}").get_json()))
    assert (retrying["status"], retrying["waiting_on"], retrying["eta"]) == \
        ("queued", "retry_at", retrying["retry_at"]), retrying
    assert controller.stop(failing)["status"] == "stopped"


# -- live usage ------------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_running_task_shows_its_memory_and_cpu_while_it_runs(make_client, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(defaults, "USAGE_WRITE_INTERVAL", 0.3)  # the write of a task that writes no progress
    client, controller = make_client(Grows)
    gate1, gate2 = tmp_path / "gate1", tmp_path / "gate2"
    uuid = client.post("/tasks", json={"first": 40, "second": 60, "gate1": str(gate1),
                                       "gate2": str(gate2)}).get_json()["uuid"]

    def stored_peak(at_least: int) -> object:
        row = controller.store.get(uuid)
        assert row is not None and row["status"] in ("queued", "running"), row
        return row if (row["status"] == "running" and (row["memory_peak"] or 0) >= at_least
                       and (row["cpu_time"] or 0) > 0) else None

    # Written with its progress, and every few seconds: the store (what every serving process reads) has the
    # tree's figures while it runs (a sample taken between the allocation and the CPU work may read 0 s of CPU,
    # a later one does not).
    first = wait_until(lambda: stored_peak(40 * MIB), timeout=20)
    shown = client.get(f"/tasks/{uuid}").get_json()
    assert shown["status"] == "running" and shown["memory_peak"] >= 40 * MIB, shown
    gate1.touch()
    # No progress now: the figures are written on their own every few seconds, and they grew.
    second = wait_until(lambda: stored_peak(first["memory_peak"] + 50 * MIB), timeout=20)
    assert second["cpu_time"] >= first["cpu_time"], (first, second)
    gate2.touch()
    ended = controller.wait(uuid, timeout=30)
    assert ended["status"] == "succeeded" and ended["memory_peak"] >= 100 * MIB, ended


@pytest.mark.timeout(60)
def test_a_failed_task_traceback_is_in_its_log_and_the_server_log(make_controller, caplog) -> None:
    controller = make_controller(Fails)
    with caplog.at_level(logging.WARNING):
        uuid = controller.submit()
        assert controller.wait(uuid, timeout=30)["status"] == "failed"
        # The end's log line is written by another subscriber of the same event than the one waking wait():
        # it may come a moment later.
        wait_until(lambda: any(f"Task {uuid} ended failed" in r.getMessage() for r in caplog.records), 10)
    lines = [line for _, line in controller.store.logs.read(uuid, 0)]
    assert any("The task raised ConnectionError: the network is down" in line for line in lines), lines
    assert "Traceback (most recent call last):" in lines and any('raise ConnectionError("the network is down")'
                                                                 in line for line in lines), lines
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and uuid in r.getMessage()]
    assert any(f"Task {uuid} ended failed: ConnectionError" in message and "Traceback (most recent call last):"
               in message and "raise ConnectionError" in message for message in logged), logged
