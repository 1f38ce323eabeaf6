"""The smallest end-to-end checks: a task runs in a child process and its result comes back."""
from __future__ import annotations

import os

import pytest

from flask_multiprocess_controller import MetaMPTask


class Add(MetaMPTask):
    def execute(self, x: int, y: int = 1) -> dict:
        return {"sum": x + y, "pid": os.getpid()}


@pytest.mark.timeout(30)
def test_result_comes_from_a_child_process(make_controller):
    controller = make_controller(Add, max_num_process=2)
    task = controller.wait(controller.submit(x=2, y=3), timeout=10)
    assert task["status"] == "succeeded"
    assert task["result"]["sum"] == 5
    assert task["result"]["pid"] != os.getpid()
    assert task["pid"] == task["result"]["pid"]
    assert task["exit_code"] == 0


@pytest.mark.timeout(30)
def test_http_post_then_wait(make_client):
    client, _ = make_client(Add)
    posted = client.post("/tasks", json={"x": 1})
    assert posted.status_code == 202
    assert posted.headers["Location"].endswith(posted.json["uuid"])
    got = client.get(posted.headers["Location"] + "?wait=10")
    assert got.status_code == 200
    assert got.json["status"] == "succeeded"
    assert got.json["result"]["sum"] == 2
