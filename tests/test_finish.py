"""Finish now: ``DELETE <item>?finish=true`` (``stop(finish=True)``, ``flask mpc stop --finish``) asks a running
task to return its best answer so far. A task that catches ``FinishRequested`` ends ``stopped`` with that
result and ``stopped_with_result``; one that ignores it is stopped, then killed after ``stop_grace``, as
for a plain stop."""
from __future__ import annotations

import time

import pytest
from conftest import wait_until
from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import (
    FinishRequested, MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController,
)

#: The steps after which the solver's incumbent stops improving (half of its nominal 100).
PLATEAU = 50


class Solver(MetaMPTask):
    """A solver-like task: improves its incumbent each step (until PLATEAU), publishing it with the step and a
    percent out of 100 steps, and never ends on its own. Asked to finish, it returns the incumbent."""

    def execute(self) -> dict:
        best, step = None, 0
        try:
            while True:
                self.checkpoint()
                step += 1
                if step <= PLATEAU:
                    best = step * 10
                self.upload_status({"step": step, "best": best})
                self._channel.publish_percent(float(min(step, 99)))
                time.sleep(0.01)
        except FinishRequested:
            assert self.finishing
            return {"best": best, "step": step}


class Ignores(MetaMPTask):
    """Never looks at a stop request: it is killed after ``stop_grace``."""

    def execute(self) -> str:
        self.upload_status("started")
        while True:
            time.sleep(0.05)


class Uncaught(MetaMPTask):
    """Honours stops with ``checkpoint()`` but does not catch ``FinishRequested``: a plain stop, no result."""

    def execute(self) -> str:
        self.upload_status("started")
        while True:
            self.checkpoint()
            time.sleep(0.02)


class Finishing(MetaMPController, controller_name="finishing"):
    pass


@pytest.mark.timeout(60)
def test_a_solver_asked_to_finish_through_another_process_ends_stopped_with_its_incumbent(tmp_path):
    url = f"sqlite:///{tmp_path}/finish.sqlite3"
    runner = Finishing(Solver, store=url, stop_grace=20)
    # The requests reach the same controller in a client role (it runs nothing, as a serving process elsewhere
    # would not run this task): the finish travels through the store to the one that runs it.
    front = Finishing(Solver, store=url, role="client")
    try:
        app = Flask(__name__)
        Api(app).add_resource(MetaMPResource, "/solve", "/solve/<string:uuid>", resource_class_args=(front,))
        http = app.test_client()
        uuid = http.post("/solve").get_json()["uuid"]
        wait_until(lambda: (runner.status(uuid).get("progress") or {}).get("step", 0) >= PLATEAU, timeout=30)

        assert http.delete(f"/solve/{uuid}?finish=maybe").status_code == 400
        assert http.delete("/solve?all=true&finish=true").status_code == 400
        answer = http.delete(f"/solve/{uuid}?finish=true")
        assert answer.status_code == 202 and answer.get_json()["status"] == "stopping"
        ended = runner.wait(uuid, timeout=30)
        assert ended["status"] == "stopped" and ended["stopped_with_result"] is True, ended
        assert ended["result"]["best"] == PLATEAU * 10 and ended["result"]["step"] >= PLATEAU
        assert ended["error"] is None and ended["percent"] < 100
        assert "finish" in ended["msg"]
        assert http.get(f"/solve/{uuid}").get_json()["result"] == ended["result"]
    finally:
        front.shutdown()
        runner.shutdown()


@pytest.mark.timeout(60)
def test_tasks_that_do_not_return_when_asked_to_finish_stop_as_today(make_controller, tmp_path):
    ignores = make_controller(Ignores, stop_grace=0.3)
    uncaught = make_controller(Uncaught, stop_grace=30, max_num_process=1)
    a, b = ignores.submit(), uncaught.submit()
    queued = uncaught.submit()  # waits behind b
    wait_until(lambda: ignores.status(a)["progress"] == "started" and uncaught.status(b)["progress"] == "started",
               timeout=30)

    app = Flask(__name__)
    MultiprocessController(app)
    cli = app.test_cli_runner()
    said = cli.invoke(args=["mpc", "stop", "--finish", a])
    assert said.exit_code == 0, said.output
    assert uncaught.stop(queued, finish=True)["status"] == "stopped"  # queued: no answer yet, stopped at once
    assert uncaught.stop(b, finish=True)["status"] == "stopping"

    killed, stopped = ignores.wait(a, timeout=30), uncaught.wait(b, timeout=30)
    assert (killed["status"], killed["stopped_with_result"], killed["result"]) == ("stopped", False, None)
    assert killed["error"]["type"] == "Killed"  # escalated after stop_grace, as a stop is
    assert (stopped["status"], stopped["stopped_with_result"], stopped["result"]) == ("stopped", False, None)
    assert stopped["error"] is None
    assert uncaught.status(queued)["stopped_with_result"] is False
