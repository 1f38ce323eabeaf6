"""``flask mpc`` has every task action of the HTTP API (pause, resume, reprioritise, stop --all), takes the
short ids the dashboard shows, exits with a code that tells what happened, and warns when nothing serves
the controller a task was submitted to."""
from __future__ import annotations

import json
import os
import time

import pytest
from conftest import wait_until
from flask import Flask

from flask_multiprocess_controller import MetaMPController, MetaMPTask, MultiprocessController
from flask_multiprocess_controller.ops import cli


class Gated(MetaMPTask):
    def execute(self, gate: str = "") -> str:
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.01)
        return "done"


class Parity(MetaMPController, controller_name="parity"):
    pass


class Unserved(MetaMPController, controller_name="unserved"):
    pass


def _row(uuid: str, controller: str) -> dict:
    return {"uuid": uuid, "controller": controller, "status": "queued", "priority": 0, "args": {},
            "created_at": time.time(), "timeout": None, "attempt": 0, "stop_requested": False}


@pytest.fixture
def parity(tmp_path):
    controller = Parity(Gated, store=f"sqlite:///{tmp_path}/parity.sqlite3", max_num_process=1, stop_grace=0.2)
    app = Flask(__name__)
    MultiprocessController(app)
    yield app.test_cli_runner(), controller
    controller.shutdown()


@pytest.mark.timeout(60)
def test_pause_resume_reprioritise_stop_all_by_short_id_and_exit_codes(parity, tmp_path):
    runner, controller = parity

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(args=["mpc", *args])
        assert "Traceback" not in result.output, result.output
        return result.exit_code, result.output

    gate = tmp_path / "gate"
    code, out = run("submit", "parity", f"gate={gate}")
    assert code == 0 and "Warning" not in out, out  # this process serves the controller
    running = out.strip()
    short = running[:8]
    wait_until(lambda: controller.status(running)["status"] == "running", timeout=20)
    queued = controller.submit(gate=str(gate))
    assert run("pause", short)[0] == 0 and controller.status(running)["status"] == "paused"
    assert run("list", "--status", "paused,queued", "--json")[1].count('"uuid"') == 2
    assert run("resume", running.replace("-", "")[:12].upper())[0] == 0
    assert controller.status(running)["status"] == "running"
    code, out = run("reprioritise", queued[:10], "-5")
    assert code == 0 and "priority -5" in out, out
    assert controller.status(queued)["priority"] == -5
    code, out = run("wait", short, "--timeout", "0.2")
    assert code == cli.EXIT_TIMEOUT == 4 and "Gave up waiting" in out, out
    code, out = run("stop", "--all", "--controller", "parity")
    assert code == 0 and "Stopped 1 queued task(s); 1 running task(s) are stopping." in out, out
    assert controller.wait(running, timeout=20)["status"] == "stopped"
    assert run("wait", short)[0] == cli.EXIT_TASK_FAILED == 1  # it ended, but did not succeed
    assert run("reprioritise", short, "1")[0] == cli.EXIT_REFUSED == 6  # it has ended
    assert run("resume", short)[0] == cli.EXIT_REFUSED

    twins = ["abcd1234-0000-4000-8000-00000000000a", "abcd1234-1111-4000-8000-00000000000b"]
    controller.store.enqueue([_row(uuid, "parity") for uuid in twins], -1)
    code, out = run("status", "abcd1234")
    assert code == cli.EXIT_USAGE == 2 and all(uuid in out for uuid in twins), out
    assert "Give more of the uuid" in out and len(out.strip().splitlines()) == 1, out
    code, out = run("status", "abcd1234-1", "--json")
    assert code == 0 and json.loads(out)["uuid"] == twins[1], out
    for reference in ("abcd1235", "00000000-0000-4000-8000-000000000000"):
        code, out = run("status", reference)
        assert code == cli.EXIT_NOT_FOUND == 3 and "No task" in out, (reference, out)
    assert run("status", "abcd123")[0] == cli.EXIT_USAGE  # too short to name a task
    assert run("list", "--status", "queued,sleeping")[0] == cli.EXIT_USAGE
    assert run("submit", "nobody")[0] == cli.EXIT_USAGE


@pytest.mark.timeout(60)
def test_exit_code_when_the_store_is_unavailable(tmp_path):
    from flask_multiprocess_controller.exceptions import StoreUnavailable
    from flask_multiprocess_controller.store import MemoryStore

    class Down(MemoryStore):
        def list_tasks(self, *args, **kwargs):
            raise StoreUnavailable("The store does not answer.")

    controller = Parity(Gated, store=Down())
    try:
        app = Flask(__name__)
        MultiprocessController(app)
        result = app.test_cli_runner().invoke(args=["mpc", "list"])
        assert result.exit_code == cli.EXIT_STORE_UNAVAILABLE == 5, result.output
        assert "The store does not answer." in result.output
    finally:
        controller.shutdown()


@pytest.mark.timeout(60)
def test_submit_warns_when_no_live_server_serves_the_controller(tmp_path):
    url = f"sqlite:///{tmp_path}/unserved.sqlite3"
    client = Unserved(Gated, store=url, role="client")  # as `flask mpc` makes it: it runs nothing
    server = None
    try:
        app = Flask(__name__)
        MultiprocessController(app)
        runner = app.test_cli_runner()
        submitted = runner.invoke(args=["mpc", "submit", "unserved"])
        assert submitted.exit_code == 0, submitted.output
        assert client.status(submitted.stdout.strip())["status"] == "queued"
        assert "Warning: no live server heartbeats in the store" in submitted.stderr, submitted.stderr
        server = Parity(Gated, store=url)
        runtime = server.runtime  # a serving process of the store: it heartbeats
        again = runner.invoke(args=["mpc", "submit", "unserved"])
        assert again.exit_code == 0 and again.stderr == "", again.stderr
        server.store.set_drained(runtime.host, True)
        drained = runner.invoke(args=["mpc", "submit", "unserved"])
        assert "Warning: every host with a live server of the store is drained" in drained.stderr, drained.stderr
    finally:
        client.shutdown()
        if server is not None:
            server.shutdown()
