"""Batches: a bulk POST names its tasks with one id, and ``GET ?batch=<id>&wait=S`` waits for all of them."""
from __future__ import annotations

import threading
import time
import uuid as uuid_module
from pathlib import Path

import pytest
import requests

from flask_multiprocess_controller import MetaMPTask
from flask_multiprocess_controller.batches import Batch
from flask_multiprocess_controller.exceptions import BatchNotFound, InvalidRequest

from serverproc import free_port, python

TESTS = Path(__file__).resolve().parent
TERMINAL = {"succeeded", "failed", "stopped", "timed_out", "lost"}


class Sleep(MetaMPTask):
    def execute(self, seconds: float = 0.0, tag: str = "") -> dict:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.checkpoint()
            time.sleep(0.02)
        return {"tag": tag}


class Other(MetaMPTask):
    def execute(self) -> None:
        pass


@pytest.mark.timeout(30)
def test_bulk_post_answers_a_batch_id_stored_with_every_task(make_client):
    client, controller = make_client(Sleep, max_num_process=2)
    response = client.post("/tasks", json=[{"tag": "a"}, {"tag": "b"}, {"tag": "c"}])
    assert response.status_code == 202, response.data
    batch = response.json["batch"]
    assert isinstance(batch, str) and len(batch) == 32
    assert [t["batch"] for t in response.json["tasks"]] == [batch] * 3
    single = client.post("/tasks", json={"tag": "alone"}).json
    assert single["batch"] is None
    again = client.post("/tasks", json=[{"tag": "d"}]).json
    assert again["batch"] not in (None, batch)  # a new id per bulk, even of one task
    assert controller.status(response.json["tasks"][0]["uuid"])["batch"] == batch


@pytest.mark.timeout(30)
def test_get_batch_wait_answers_200_in_input_order_once_all_ended(make_client):
    client, _ = make_client(Sleep, max_num_process=2)
    posted = client.post("/tasks", json=[{"tag": t, "seconds": 0.1} for t in "abcd"]).json
    response = client.get(f"/tasks?batch={posted['batch']}&wait=20")
    assert response.status_code == 200, response.data
    body = response.json
    assert body["batch"] == posted["batch"] and body["total"] == 4 and body["ended"] == 4
    assert [t["uuid"] for t in body["tasks"]] == [t["uuid"] for t in posted["tasks"]]
    assert [t["result"] for t in body["tasks"]] == [{"tag": t} for t in "abcd"]
    # Already ended: at once, with or without a wait.
    assert client.get(f"/tasks?batch={posted['batch']}").status_code == 200
    assert client.get(f"/tasks?batch={posted['batch']}&wait=5").json["ended"] == 4


@pytest.mark.timeout(30)
def test_get_batch_answers_202_while_tasks_run(make_client):
    client, _ = make_client(Sleep, max_num_process=1, stop_grace=0.5)
    posted = client.post("/tasks", json=[{"seconds": 60}, {"seconds": 0}]).json
    now = client.get(f"/tasks?batch={posted['batch']}")
    assert now.status_code == 202, now.data
    assert now.json["total"] == 2 and now.json["ended"] == 0
    began = time.monotonic()
    later = client.get(f"/tasks?batch={posted['batch']}&wait=0.3")
    assert time.monotonic() - began >= 0.3, "the GET did not wait"
    assert later.status_code == 202 and later.json["ended"] < 2
    assert client.delete("/tasks?all=true").status_code == 202
    done = client.get(f"/tasks?batch={posted['batch']}&wait=20")
    assert done.status_code == 200 and {t["status"] for t in done.json["tasks"]} <= TERMINAL


@pytest.mark.timeout(30)
def test_bulk_post_wait_waits_for_the_whole_batch(make_client):
    client, _ = make_client(Sleep, max_num_process=2)
    response = client.post("/tasks?wait=20", json=[{"tag": "a"}, {"tag": "b", "seconds": 0.2}, {"tag": "c"}])
    assert response.status_code == 200, response.data
    assert response.json["batch"]
    assert [t["status"] for t in response.json["tasks"]] == ["succeeded"] * 3


@pytest.mark.timeout(30)
@pytest.mark.parametrize("query, status", [
    (f"batch={uuid_module.uuid4().hex}", 404),
    ("batch=nothex", 400),
    ("batch=", 400),
    (f"batch={uuid_module.uuid4().hex}&wait=soon", 400),
    (f"batch={uuid_module.uuid4().hex}&uuid={uuid_module.uuid4()}", 400),
], ids=["unknown", "not-hex", "empty", "bad-wait", "with-uuid"])  # fixed ids: every worker collects the same tests
def test_bad_or_unknown_batch(make_client, query, status):
    client, _ = make_client(Sleep)
    response = client.get(f"/tasks?{query}")
    assert response.status_code == status, response.data
    assert isinstance(response.json["message"], str) and "Traceback" not in response.json["message"]


@pytest.mark.timeout(30)
def test_a_batch_of_another_controller_is_404(make_client, make_controller):
    client, controller = make_client(Sleep)
    other_client, _ = make_client(Other, store=controller.store)
    batch = client.post("/tasks", json=[{}, {}]).json["batch"]
    assert other_client.get(f"/tasks?batch={batch}").status_code == 404
    assert client.get(f"/tasks?batch={batch}&wait=20").status_code == 200


@pytest.mark.timeout(30)
def test_python_submit_many_and_wait_batch(make_controller):
    controller = make_controller(Sleep, max_num_process=2)
    batch = controller.submit_many([{"tag": "x"}, {"tag": "y", "seconds": 0.1}])
    assert isinstance(batch, Batch) and len(batch.uuids) == 2
    view = controller.wait_batch(batch.id, timeout=20)
    assert view["total"] == view["ended"] == 2
    assert [t["result"]["tag"] for t in view["tasks"]] == ["x", "y"]
    assert controller.wait_batch(batch.id.upper(), 0)["ended"] == 2  # the id's case does not matter
    with pytest.raises(BatchNotFound):
        controller.wait_batch(uuid_module.uuid4().hex, 0)
    with pytest.raises(InvalidRequest):
        controller.wait_batch("x", 0)
    with pytest.raises(InvalidRequest):
        controller.submit_many([])


@pytest.mark.timeout(60)
def test_wait_batch_is_woken_by_the_last_ending(make_controller, sqlite_url):
    """Many waiters of one batch all answer once its last task ends, on a store shared by processes."""
    controller = make_controller(Sleep, max_num_process=3, store=sqlite_url)
    batch = controller.submit_many([{"seconds": 0.2}, {"seconds": 0.4}, {"seconds": 0.1}])
    views: list = []
    waiters = [threading.Thread(target=lambda: views.append(controller.wait_batch(batch.id, 30)))
               for _ in range(5)]
    for thread in waiters:
        thread.start()
    for thread in waiters:
        thread.join(40)
    assert len(views) == 5 and all(v["ended"] == 3 for v in views)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_batch_over_the_dev_server(tmp_path, pool):
    port = free_port()
    server = pool.start(python(str(TESTS / "tutorial_app.py")), cwd=tmp_path, port=port,
                        log_path=tmp_path / "server.log",
                        env={"PORT": str(port), "MPC_STORE_URL": f"sqlite:///{tmp_path}/tasks.sqlite3"})
    url = server.base + "/main"
    posted = requests.post(url, json=[{"steps": 2, "delay": 0.02}] * 5, timeout=10)
    assert posted.status_code == 202, posted.text
    batch = posted.json()["batch"]
    done = requests.get(url, params={"batch": batch, "wait": 30}, timeout=40)
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["total"] == body["ended"] == 5
    assert [t["uuid"] for t in body["tasks"]] == [t["uuid"] for t in posted.json()["tasks"]]
    assert {t["status"] for t in body["tasks"]} == {"succeeded"}
    assert requests.get(url, params={"batch": uuid_module.uuid4().hex}, timeout=10).status_code == 404
