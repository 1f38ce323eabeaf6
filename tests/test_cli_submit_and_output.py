"""``flask mpc submit`` queues at most once per idempotency key, and asks the store again with the key when
a write's answer is lost; ``status``, ``wait`` and ``logs`` print task text with its control characters
escaped, so that a task cannot drive the operator's terminal."""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import pytest
from flask import Flask

from flask_multiprocess_controller import MemoryStore, MetaMPController, MetaMPTask, MultiprocessController
from flask_multiprocess_controller.exceptions import StoreUnavailable
from flask_multiprocess_controller.ops.cli import escape_controls
from flask_multiprocess_controller.store.base import Row

#: What a hostile task writes: a screen clear, a title change, a carriage return, a bell, a C1 CSI.
HOSTILE = "\x1b[2J\x1b]0;owned\x07\rEVIL\x9b31m"


class Echo(MetaMPTask):
    def execute(self, n: int = 0) -> int:
        return n


class Noisy(MetaMPTask):
    def execute(self) -> None:
        print(f"line one {HOSTILE}\tafter a tab", flush=True)
        raise ValueError(f"failed {HOSTILE}")


class LosesFirstAnswer(MemoryStore):
    """A store whose first enqueue is written, but whose answer never arrives (the connection broke)."""

    def __init__(self) -> None:
        super().__init__()
        self.enqueues = 0

    def enqueue(self, rows: Sequence[Row], max_queued: int, emitter: Optional[str] = None,
                **kwargs: Any) -> list:
        self.enqueues += 1
        events = super().enqueue(rows, max_queued, emitter, **kwargs)
        if self.enqueues == 1:
            raise StoreUnavailable("The store went away before it answered.")
        return events


def _app(controller: MetaMPController) -> Flask:
    app = Flask(__name__)
    MultiprocessController(app)
    return app


@pytest.mark.timeout(60)
def test_submit_with_a_key_twice_queues_once(make_controller):
    controller = make_controller(Echo, max_num_process=1)
    runner = _app(controller).test_cli_runner()
    first = runner.invoke(args=["mpc", "submit", controller.name, "n=1", "--idempotency-key", "nightly-1"])
    again = runner.invoke(args=["mpc", "submit", controller.name, "n=1", "--idempotency-key", "nightly-1"])
    assert first.exit_code == 0 and again.exit_code == 0, (first.output, again.output)
    assert again.stdout.strip() == first.stdout.strip()
    assert "Already submitted" in again.stderr
    assert [t["uuid"] for t in controller.tasks()["tasks"]] == [first.stdout.strip()]
    other = runner.invoke(args=["mpc", "submit", controller.name, "n=2", "--idempotency-key", "nightly-1"])
    assert other.exit_code != 0 and "Idempotency-Key" in other.output


@pytest.mark.timeout(60)
def test_submit_whose_store_answer_was_lost_queues_once(make_controller):
    store = LosesFirstAnswer()
    controller = make_controller(Echo, store=store, max_num_process=1)
    runner = _app(controller).test_cli_runner()
    submitted = runner.invoke(args=["mpc", "submit", controller.name, "n=5"])
    assert submitted.exit_code == 0, submitted.output
    assert store.enqueues == 2  # asked again, with the same key
    uuid = submitted.stdout.strip()
    assert [t["uuid"] for t in controller.tasks()["tasks"]] == [uuid]
    assert controller.wait(uuid, 20)["result"] == 5


def test_escape_controls():
    assert escape_controls("a\x1b[1mb\rc\x07d\x9be\x7ff\tg\nh") == "a\\x1b[1mb\\x0dc\\x07d\\x9be\\x7ff\tg\nh"
    assert escape_controls("a\tb\nc", keep="") == "a\\x09b\\x0ac"
    assert escape_controls("caf\u00e9 \u2603") == "caf\u00e9 \u2603"  # printable text is left alone


def _terminal_safe(text: str) -> None:
    for char in "\x1b\x07\r\x9b":
        assert char not in text, (char, text)


@pytest.mark.timeout(60)
def test_status_wait_and_logs_escape_control_characters(make_controller):
    controller = make_controller(Noisy, max_num_process=1)
    runner = _app(controller).test_cli_runner()
    uuid = controller.submit()
    assert controller.wait(uuid, 30)["status"] == "failed"
    waited = runner.invoke(args=["mpc", "wait", uuid])
    status = runner.invoke(args=["mpc", "status", uuid])
    deadline = time.monotonic() + 20
    while True:  # the log lines are kept by the serving process as they come
        logs = runner.invoke(args=["mpc", "logs", uuid])
        if "line one" in logs.output or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for result in (waited, status, logs):
        _terminal_safe(result.output)
        assert "\\x1b[2J" in result.output, result.output
    assert "\tafter a tab" in logs.output  # a tab in a log line is content
    assert "EVIL" in status.output and "\\x0dEVIL" in status.output
