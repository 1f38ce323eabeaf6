"""The HTTP contract of DESIGN.md section 3, through the Flask test client and real task processes."""
from __future__ import annotations

import functools
import io
import json
import time
import uuid as uuid_module
from typing import Optional
from urllib.parse import parse_qs, urlsplit

import pytest
from flask import Flask
from flask_restful import Api

from conftest import wait_until
from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, defaults

TERMINAL = {"succeeded", "failed", "stopped", "timed_out", "lost"}
TASK_KEYS = {"uuid", "status", "progress", "percent", "result", "error", "args", "priority", "created_at",
             "started_at", "ended_at", "pid", "exit_code", "position", "controller", "msg"}


# -- task classes (children are forked: defining them here is enough) -----------------------------------

class Work(MetaMPTask):
    """Runs for ``seconds`` (checking for stops), then returns its tag and when it ended."""

    def execute(self, seconds: float = 0.0, tag: str = "") -> dict:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.checkpoint()
            time.sleep(0.02)
        return {"tag": tag, "t": time.time()}


class NoArgs(MetaMPTask):
    def execute(self) -> str:
        return "ok"


class Typed(MetaMPTask):
    def execute(self, n: int, f: float = 0.0, o: Optional[int] = 0) -> dict:
        return {"n": n, "f": f, "o": o}


class Echo(MetaMPTask):
    """Has no ``priority`` parameter: a body ``priority`` is a control option."""

    def execute(self, tag: str = "") -> dict:
        return {"tag": tag}


class PriorityParam(MetaMPTask):
    """Declares ``priority``: a body ``priority`` is an argument of execute."""

    def execute(self, priority: int = 0) -> dict:
        return {"priority": priority}


# -- helpers ------------------------------------------------------------------------------------------

def assert_error(response, status: int) -> dict:
    """The response has ``status``, a JSON object body with a human ``message``, and no traceback."""
    assert response.status_code == status, (response.status_code, response.data[:500])
    assert b"Traceback" not in response.data
    body = response.get_json(silent=True)
    assert isinstance(body, dict), response.data[:500]
    assert isinstance(body.get("message"), str) and body["message"].strip()
    return body


def get_task(client, uuid: str) -> dict:
    response = client.get(f"/tasks/{uuid}")
    assert response.status_code == 200, response.data
    return response.json


def wait_task(client, uuid: str, timeout: float = 15.0) -> dict:
    """Long-poll until the task has finished; fail if it has not within ``timeout``."""
    response = client.get(f"/tasks/{uuid}?wait={timeout}")
    assert response.status_code == 200, response.data
    assert response.json["status"] in TERMINAL, response.json
    return response.json


def wait_status(client, uuid: str, status: str, timeout: float = 10.0) -> dict:
    def reached():
        task = get_task(client, uuid)
        return task if task["status"] == status else None

    return wait_until(reached, timeout)


def start_blocker(client, seconds: float = 60.0) -> str:
    """Post a long task and return its uuid once it runs."""
    response = client.post("/tasks", json={"seconds": seconds, "tag": "blocker"})
    assert response.status_code == 202, response.data
    uuid = response.json["uuid"]
    wait_status(client, uuid, "running")
    return uuid


def list_uuids(client, query: str = "") -> list:
    response = client.get(f"/tasks{query}")
    assert response.status_code == 200, response.data
    return [t["uuid"] for t in response.json["tasks"]]


@pytest.fixture
def own_controllers():
    """Controllers of custom classes, shut down after the test."""
    made: list = []
    yield made
    for controller in made:
        controller.shutdown()


def mount(controller, *urls: str):
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, *urls, resource_class_args=(controller,))
    return app.test_client()


# -- POST ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_post_returns_202_task_object_and_location_of_item_url(make_client):
    client, _ = make_client(Work)
    response = client.post("/tasks", json={"tag": "a"})
    assert response.status_code == 202
    task = response.json
    assert TASK_KEYS <= set(task)
    assert task["status"] in {"queued", "running", "succeeded"}
    assert task["args"] == {"tag": "a"}
    uuid_module.UUID(task["uuid"])
    location = urlsplit(response.headers["Location"])
    assert location.path == f"/tasks/{task['uuid']}"
    assert location.query == ""
    followed = client.get(response.headers["Location"])
    assert followed.status_code == 200
    assert followed.json["uuid"] == task["uuid"]
    done = wait_task(client, task["uuid"])
    assert done["status"] == "succeeded"
    assert done["result"]["tag"] == "a"


@pytest.mark.timeout(30)
def test_seed_style_mount_location_uses_query_uuid(make_controller):
    controller = make_controller(Work)
    client = mount(controller, "/sample")
    response = client.post("/sample", json={"tag": "seed"})
    assert response.status_code == 202
    uuid = response.json["uuid"]
    location = urlsplit(response.headers["Location"])
    assert location.path == "/sample"
    assert parse_qs(location.query) == {"uuid": [uuid]}
    followed = client.get(response.headers["Location"])
    assert followed.status_code == 200
    assert followed.json["uuid"] == uuid
    finished = client.get(f"/sample?uuid={uuid}&wait=15")
    assert finished.status_code == 200
    assert finished.json["status"] == "succeeded"
    # The list view is still there without a uuid.
    listed = client.get("/sample")
    assert listed.status_code == 200
    assert [t["uuid"] for t in listed.json["tasks"]] == [uuid]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kwargs", [{}, {"data": b"", "content_type": "application/json"},
                                    {"data": b"  \n", "content_type": "application/json"}],
                         ids=["no-body", "empty-json-body", "blank-json-body"])
def test_empty_body_means_no_arguments(make_client, kwargs):
    client, _ = make_client(NoArgs)
    response = client.post("/tasks", **kwargs)
    assert response.status_code == 202, response.data
    assert response.json["args"] == {}
    done = wait_task(client, response.json["uuid"])
    assert done["status"] == "succeeded"
    assert done["result"] == "ok"


@pytest.mark.timeout(30)
def test_bulk_post_returns_tasks_in_input_order(make_client):
    client, _ = make_client(Work, max_num_process=2)
    tags = ["first", "second", "third", "fourth"]
    response = client.post("/tasks", json=[{"tag": t} for t in tags])
    assert response.status_code == 202, response.data
    tasks = response.json["tasks"]
    assert [t["args"] for t in tasks] == [{"tag": t} for t in tags]
    assert len({t["uuid"] for t in tasks}) == 4
    for tag, task in zip(tags, tasks):
        done = wait_task(client, task["uuid"])
        assert done["status"] == "succeeded"
        assert done["result"]["tag"] == tag


@pytest.mark.timeout(30)
@pytest.mark.parametrize("body", [
    [{"tag": "ok"}, {"tag": 5}],
    [{"tag": "ok"}, {"bogus": 1}],
    [{"tag": "ok"}, 7],
    [{"tag": "ok"}, {"tag": "x", "priority": "high"}],
], ids=["wrong-type", "unknown-arg", "not-an-object", "bad-body-priority"])
def test_bulk_post_is_all_or_nothing(make_client, body):
    client, controller = make_client(Work)
    assert_error(client.post("/tasks", json=body), 400)
    assert list_uuids(client) == []
    assert controller.tasks()["tasks"] == []


@pytest.mark.timeout(30)
def test_bulk_post_empty_array_is_400(make_client):
    client, _ = make_client(Work)
    assert_error(client.post("/tasks", json=[]), 400)
    assert list_uuids(client) == []


@pytest.mark.timeout(30)
def test_post_wait_returns_200_when_finished_in_time(make_client):
    client, _ = make_client(Work)
    response = client.post("/tasks?wait=15", json={"tag": "quick"})
    assert response.status_code == 200, response.data
    assert response.json["status"] == "succeeded"
    assert response.json["result"]["tag"] == "quick"


@pytest.mark.timeout(30)
def test_post_wait_returns_202_when_not_finished(make_client):
    client, _ = make_client(Work, stop_grace=0.5)
    began = time.monotonic()
    response = client.post("/tasks?wait=0.3", json={"seconds": 60})
    assert time.monotonic() - began >= 0.3, "the POST did not wait"
    assert response.status_code == 202, response.data
    assert response.json["status"] in {"queued", "running"}
    assert "Location" in response.headers
    assert client.delete(f"/tasks/{response.json['uuid']}").status_code in (200, 202)


@pytest.mark.timeout(30)
def test_bulk_post_wait(make_client):
    client, _ = make_client(Work, max_num_process=2)
    response = client.post("/tasks?wait=15", json=[{"tag": "a"}, {"tag": "b"}])
    assert response.status_code == 200, response.data
    assert [t["status"] for t in response.json["tasks"]] == ["succeeded", "succeeded"]
    assert [t["result"]["tag"] for t in response.json["tasks"]] == ["a", "b"]


# -- GET ----------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_get_by_path_query_and_body(make_client):
    client, _ = make_client(Work)
    uuid = client.post("/tasks", json={"tag": "g"}).json["uuid"]
    wait_task(client, uuid)
    by_path = client.get(f"/tasks/{uuid}")
    by_query = client.get(f"/tasks?uuid={uuid}")
    by_body = client.get("/tasks", json={"uuid": uuid})
    for response in (by_path, by_query, by_body):
        assert response.status_code == 200, response.data
        assert response.json["uuid"] == uuid
        assert response.json["status"] == "succeeded"
        assert response.json["result"]["tag"] == "g"
    # An upper-case uuid names the same task.
    assert client.get(f"/tasks/{uuid.upper()}").json["uuid"] == uuid


@pytest.mark.timeout(30)
def test_get_long_polls(make_client):
    client, _ = make_client(Work, stop_grace=0.5)
    uuid = client.post("/tasks", json={"seconds": 0.5, "tag": "lp"}).json["uuid"]
    response = client.get(f"/tasks/{uuid}?wait=15")
    assert response.status_code == 200
    assert response.json["status"] == "succeeded"
    # A task that outlives the wait is returned, unfinished, once the wait is over.
    blocker = start_blocker(client)
    began = time.monotonic()
    response = client.get(f"/tasks/{blocker}?wait=0.3")
    assert time.monotonic() - began >= 0.3, "the GET did not wait"
    assert response.status_code == 200
    assert response.json["status"] == "running"
    assert client.delete(f"/tasks/{blocker}").status_code == 202


@pytest.mark.timeout(30)
@pytest.mark.parametrize("url", ["/tasks/{u}", "/tasks?uuid={u}", "/tasks/{u}?wait=0.2"])
def test_get_unknown_uuid_is_404(make_client, url):
    client, _ = make_client(Work)
    assert_error(client.get(url.format(u=uuid_module.uuid4())), 404)


@pytest.mark.timeout(30)
def test_get_unknown_uuid_in_body_is_404(make_client):
    client, _ = make_client(Work)
    assert_error(client.get("/tasks", json={"uuid": str(uuid_module.uuid4())}), 404)


@pytest.mark.timeout(30)
def test_task_of_another_controller_is_404(make_controller):
    store_holder = make_controller(Work)
    other = make_controller(Echo, store=store_holder.store)
    uuid = store_holder.submit(tag="mine")
    client = mount(other, "/tasks", "/tasks/<string:uuid>")
    assert_error(client.get(f"/tasks/{uuid}"), 404)
    assert_error(client.delete(f"/tasks/{uuid}"), 404)
    assert store_holder.wait(uuid, timeout=15)["status"] == "succeeded"


# -- list view ----------------------------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_list_view_counts_order_filter_and_limit(make_client):
    client, _ = make_client(Work, max_num_process=1, stop_grace=0.5)
    done = client.post("/tasks", json={"tag": "done"}).json["uuid"]
    wait_task(client, done)
    blocker = start_blocker(client)
    queued = [client.post("/tasks", json={"tag": f"q{i}"}).json["uuid"] for i in range(2)]

    response = client.get("/tasks")
    assert response.status_code == 200
    view = response.json
    assert set(view) >= {"tasks", "running", "queued", "max_num_process"}
    assert view["running"] == 1
    assert view["queued"] == 2
    assert view["max_num_process"] == 1
    assert [t["uuid"] for t in view["tasks"]] == [queued[1], queued[0], blocker, done]  # newest first
    assert [t["position"] for t in view["tasks"][:2]] == [2, 1]

    assert list_uuids(client, "?status=queued") == [queued[1], queued[0]]
    assert list_uuids(client, "?status=succeeded") == [done]
    assert list_uuids(client, "?status=running,succeeded") == [blocker, done]
    assert list_uuids(client, "?status=failed") == []
    assert list_uuids(client, "?limit=2") == [queued[1], queued[0]]
    assert list_uuids(client, "?limit=1&status=running,succeeded") == [blocker]
    assert list_uuids(client, "?limit=1000") == [queued[1], queued[0], blocker, done]

    for uuid in queued:
        assert client.delete(f"/tasks/{uuid}").status_code == 200
    assert client.delete(f"/tasks/{blocker}").status_code == 202
    assert wait_task(client, blocker)["status"] == "stopped"
    view = client.get("/tasks").json
    assert view["running"] == 0 and view["queued"] == 0
    assert list_uuids(client, "?status=stopped") == [queued[1], queued[0], blocker]


@pytest.mark.timeout(30)
def test_list_view_default_limit_is_100(make_client):
    client, _ = make_client(Work, max_num_process=1, stop_grace=0.5)
    blocker = start_blocker(client)
    response = client.post("/tasks", json=[{"tag": str(i)} for i in range(105)])
    assert response.status_code == 202
    uuids = [t["uuid"] for t in response.json["tasks"]]
    listed = list_uuids(client)
    assert len(listed) == 100
    assert listed == list(reversed(uuids))[:100]
    assert len(list_uuids(client, "?limit=1000")) == 106
    view = client.get("/tasks?limit=1").json
    assert view["queued"] == 105 and view["running"] == 1
    assert client.delete(f"/tasks/{blocker}").status_code == 202


@pytest.mark.timeout(30)
@pytest.mark.parametrize("query", ["?status=bogus", "?status=queued,bogus", "?limit=0",
                                   "?limit=-1", "?limit=x", "?limit=5000", "?limit=1.5"])
def test_list_view_bad_filter_is_400(make_client, query):
    client, _ = make_client(Work)
    assert_error(client.get(f"/tasks{query}"), 400)


# -- DELETE -------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_delete_running_task_is_202_stopping_then_stopped(make_client):
    client, _ = make_client(Work, stop_grace=0.5)
    blocker = start_blocker(client)
    response = client.delete(f"/tasks/{blocker}")
    assert response.status_code == 202, response.data
    assert response.json["uuid"] == blocker
    assert response.json["status"] == "stopping"
    done = wait_task(client, blocker)
    assert done["status"] == "stopped"
    assert done["result"] is None
    assert done["ended_at"] is not None


@pytest.mark.timeout(30)
def test_delete_queued_task_is_200_stopped_and_never_starts(make_client):
    client, _ = make_client(Work, max_num_process=1, stop_grace=0.5)
    blocker = start_blocker(client)
    queued = client.post("/tasks", json={"tag": "never"}).json["uuid"]
    assert get_task(client, queued)["status"] == "queued"
    response = client.delete(f"/tasks/{queued}")
    assert response.status_code == 200, response.data
    assert response.json["status"] == "stopped"
    assert response.json["started_at"] is None
    # Once the slot frees up, later work runs but the stopped task does not.
    assert client.delete(f"/tasks/{blocker}").status_code == 202
    later = client.post("/tasks?wait=15", json={"tag": "later"})
    assert later.status_code == 200 and later.json["status"] == "succeeded"
    task = get_task(client, queued)
    assert task["status"] == "stopped"
    assert task["started_at"] is None
    assert task["pid"] is None
    assert task["result"] is None


@pytest.mark.timeout(30)
def test_delete_finished_task_is_409(make_client):
    client, _ = make_client(Work)
    uuid = client.post("/tasks?wait=15", json={"tag": "fin"}).json["uuid"]
    assert get_task(client, uuid)["status"] == "succeeded"
    assert_error(client.delete(f"/tasks/{uuid}"), 409)
    assert get_task(client, uuid)["status"] == "succeeded"


@pytest.mark.timeout(30)
def test_delete_stopped_task_again_is_409(make_client):
    client, _ = make_client(Work, max_num_process=1, stop_grace=0.5)
    blocker = start_blocker(client)
    queued = client.post("/tasks", json={"tag": "q"}).json["uuid"]
    assert client.delete(f"/tasks/{queued}").status_code == 200
    assert_error(client.delete(f"/tasks/{queued}"), 409)
    assert client.delete(f"/tasks/{blocker}").status_code == 202


@pytest.mark.timeout(30)
def test_delete_unknown_is_404_and_without_uuid_is_400(make_client):
    client, _ = make_client(Work)
    assert_error(client.delete(f"/tasks/{uuid_module.uuid4()}"), 404)
    assert_error(client.delete(f"/tasks?uuid={uuid_module.uuid4()}"), 404)
    assert_error(client.delete("/tasks", json={"uuid": str(uuid_module.uuid4())}), 404)
    assert_error(client.delete("/tasks"), 400)
    assert_error(client.delete("/tasks", json={}), 400)


@pytest.mark.timeout(30)
def test_delete_by_query_and_by_body(make_client):
    client, _ = make_client(Work, max_num_process=2, stop_grace=0.5)
    first, second = start_blocker(client), start_blocker(client)
    by_query = client.delete(f"/tasks?uuid={first}")
    by_body = client.delete("/tasks", json={"uuid": second})
    for response, uuid in ((by_query, first), (by_body, second)):
        assert response.status_code == 202, response.data
        assert response.json["uuid"] == uuid
        assert response.json["status"] == "stopping"
    assert wait_task(client, first)["status"] == "stopped"
    assert wait_task(client, second)["status"] == "stopped"


# -- 429 ----------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_queue_full_is_429_with_retry_after(make_client):
    client, controller = make_client(Work, max_num_process=1, max_num_queue=2, stop_grace=0.5)
    blocker = start_blocker(client)  # running tasks do not count against max_num_queue
    accepted = [client.post("/tasks", json={"tag": f"q{i}"}) for i in range(2)]
    assert [r.status_code for r in accepted] == [202, 202]
    response = client.post("/tasks", json={"tag": "overflow"})
    body = assert_error(response, 429)
    assert response.headers["Retry-After"] == str(defaults.RETRY_AFTER)
    assert defaults.RETRY_AFTER >= 1  # 0 would invite clients to hammer a full queue
    assert f"retry in {defaults.RETRY_AFTER} s" in body["message"]
    assert controller.tasks()["queued"] == 2
    assert len(list_uuids(client)) == 3
    # Freeing a queue place makes room again.
    assert client.delete(f"/tasks/{accepted[0].json['uuid']}").status_code == 200
    assert client.post("/tasks", json={"tag": "fits"}).status_code == 202
    assert client.delete(f"/tasks/{blocker}").status_code == 202


@pytest.mark.timeout(30)
def test_bulk_post_that_overflows_queue_is_rejected_whole(make_client):
    client, controller = make_client(Work, max_num_process=1, max_num_queue=2, stop_grace=0.5)
    blocker = start_blocker(client)
    assert client.post("/tasks", json={"tag": "q0"}).status_code == 202
    before = list_uuids(client)
    response = client.post("/tasks", json=[{"tag": "b0"}, {"tag": "b1"}])
    assert_error(response, 429)
    assert response.headers["Retry-After"] == str(defaults.RETRY_AFTER)
    assert list_uuids(client) == before
    assert controller.tasks()["queued"] == 1
    # A bulk that fits exactly is accepted.
    assert client.post("/tasks", json=[{"tag": "b2"}]).status_code == 202
    assert controller.tasks()["queued"] == 2
    assert client.delete(f"/tasks/{blocker}").status_code == 202


# -- 413 ----------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_body_over_default_limit_is_413(make_client):
    client, controller = make_client(Work)
    body = json.dumps({"tag": "x" * (2 * 1024 * 1024)}).encode()
    assert_error(client.post("/tasks", data=body, content_type="application/json"), 413)
    assert controller.tasks()["tasks"] == []
    # Just under the default limit is accepted.
    body = json.dumps({"tag": "x" * (1024 * 1024 - 100)}).encode()
    assert len(body) <= 1024 * 1024
    response = client.post("/tasks", data=body, content_type="application/json")
    assert response.status_code == 202, response.data[:300]
    assert wait_task(client, response.json["uuid"])["status"] == "succeeded"


@pytest.mark.timeout(30)
def test_max_content_length_lowers_the_limit(make_client):
    client, controller = make_client(Work, max_content_length=1000)
    assert_error(client.post("/tasks", json={"tag": "x" * 2000}), 413)
    assert_error(client.post("/tasks", json=[{"tag": "x" * 600}, {"tag": "y" * 600}]), 413)
    assert controller.tasks()["tasks"] == []
    response = client.post("/tasks", json={"tag": "x" * 500})
    assert response.status_code == 202
    uuid = response.json["uuid"]
    # GET and DELETE bodies have the same limit.
    assert_error(client.get("/tasks", json={"uuid": uuid, "pad": "x" * 2000}), 413)
    assert wait_task(client, uuid)["status"] == "succeeded"


@pytest.mark.timeout(30)
def test_body_over_limit_without_content_length_is_413(make_client):
    """A chunked body (no Content-Length) is cut off at the limit too."""
    client, controller = make_client(Work, max_content_length=1000)
    payload = json.dumps({"tag": "x" * 5000}).encode()
    response = client.post("/tasks", input_stream=io.BytesIO(payload), content_type="application/json",
                           environ_overrides={"wsgi.input_terminated": True})
    assert_error(response, 413)
    assert controller.tasks()["tasks"] == []


# -- 400 and no 500 -----------------------------------------------------------------------------------

_UNKNOWN = "4f6c1a3e-0b7d-4c1e-9a57-3f2d8e6b1c90"

#: (name, method, url, keyword arguments of the test client call)
BAD_POSTS = [
    ("invalid-json", "/tasks", {"data": b'{"n": 1', "content_type": "application/json"}),
    ("invalid-utf8", "/tasks", {"data": b'{"n": "\xff\xfe"}', "content_type": "application/json"}),
    ("json-string", "/tasks", {"json": "hello"}),
    ("json-number", "/tasks", {"json": 42}),
    ("json-true", "/tasks", {"json": True}),
    ("json-null", "/tasks", {"data": b"null", "content_type": "application/json"}),
    ("form-encoded", "/tasks", {"data": {"n": "1"}}),
    ("text-plain", "/tasks", {"data": b'{"n": 1}', "content_type": "text/plain"}),
    ("no-content-type", "/tasks", {"data": b'{"n": 1}'}),
    ("unknown-argument", "/tasks", {"json": {"n": 1, "bogus": 2}}),
    ("missing-required", "/tasks", {"json": {"f": 1.0}}),
    ("str-for-int", "/tasks", {"json": {"n": "1"}}),
    ("bool-for-int", "/tasks", {"json": {"n": True}}),
    ("float-for-int", "/tasks", {"json": {"n": 1.5}}),
    ("null-for-int", "/tasks", {"json": {"n": None}}),
    ("str-for-float", "/tasks", {"json": {"n": 1, "f": "2.0"}}),
    ("bool-for-float", "/tasks", {"json": {"n": 1, "f": False}}),
    ("str-for-optional-int", "/tasks", {"json": {"n": 1, "o": "3"}}),
    ("bad-body-priority", "/tasks", {"json": {"n": 1, "priority": "high"}}),
    ("float-body-priority", "/tasks", {"json": {"n": 1, "priority": 1.5}}),
    ("wait-not-a-number", "/tasks?wait=abc", {"json": {"n": 1}}),
    ("wait-negative", "/tasks?wait=-1", {"json": {"n": 1}}),
    ("wait-nan", "/tasks?wait=nan", {"json": {"n": 1}}),
    ("timeout-not-a-number", "/tasks?timeout=abc", {"json": {"n": 1}}),
    ("timeout-zero", "/tasks?timeout=0", {"json": {"n": 1}}),
    ("timeout-negative", "/tasks?timeout=-2", {"json": {"n": 1}}),
    ("timeout-nan", "/tasks?timeout=nan", {"json": {"n": 1}}),
    ("priority-not-a-number", "/tasks?priority=abc", {"json": {"n": 1}}),
    ("priority-float", "/tasks?priority=1.5", {"json": {"n": 1}}),
    ("post-to-item-url", f"/tasks/{_UNKNOWN}", {"json": {"n": 1}}),
    ("bulk-non-object", "/tasks", {"json": [{"n": 1}, "x"]}),
    ("bulk-nested-array", "/tasks", {"json": [[{"n": 1}]]}),
    ("bulk-empty", "/tasks", {"json": []}),
]

BAD_READS = [
    ("get-malformed-path-uuid", "get", "/tasks/not-a-uuid", {}),
    ("get-malformed-query-uuid", "get", "/tasks?uuid=xyz", {}),
    ("get-malformed-body-uuid", "get", "/tasks", {"json": {"uuid": "nope"}}),
    ("get-non-string-body-uuid", "get", "/tasks", {"json": {"uuid": 12}}),
    ("get-body-not-an-object", "get", "/tasks", {"json": [1]}),
    ("get-invalid-json-body", "get", "/tasks", {"data": b"{", "content_type": "application/json"}),
    ("get-bad-wait", "get", f"/tasks/{_UNKNOWN}?wait=abc", {}),
    ("get-negative-wait", "get", f"/tasks/{_UNKNOWN}?wait=-5", {}),
    ("delete-malformed-path-uuid", "delete", "/tasks/not-a-uuid", {}),
    ("delete-malformed-query-uuid", "delete", "/tasks?uuid=123", {}),
    ("delete-non-string-body-uuid", "delete", "/tasks", {"json": {"uuid": ["x"]}}),
    ("delete-no-uuid", "delete", "/tasks", {}),
    ("delete-body-not-an-object", "delete", "/tasks", {"json": "abc"}),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("url,kwargs", [c[1:] for c in BAD_POSTS], ids=[c[0] for c in BAD_POSTS])
def test_bad_post_is_400_and_queues_nothing(make_client, url, kwargs):
    client, controller = make_client(Typed)
    assert_error(client.post(url, **kwargs), 400)
    assert controller.tasks()["tasks"] == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method,url,kwargs", [c[1:] for c in BAD_READS], ids=[c[0] for c in BAD_READS])
def test_bad_get_or_delete_is_400(make_client, method, url, kwargs):
    client, _ = make_client(Typed)
    assert_error(getattr(client, method)(url, **kwargs), 400)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("raw", [b"null", b"0", b'""', b"false", b"[null]"])
def test_non_object_body_is_400_even_when_no_arguments_are_needed(make_client, raw):
    """Only an empty body means "no arguments": JSON that is not an object (or array of them) is 400."""
    client, controller = make_client(NoArgs)
    assert_error(client.post("/tasks", data=raw, content_type="application/json"), 400)
    assert controller.tasks()["tasks"] == []


#: Odd requests beyond the table: (name, method, url, keyword arguments of the test client call).
ODD_REQUESTS = [
    ("binary-body", "post", "/tasks", {"data": b"\x00\x01\x02", "content_type": "application/json"}),
    ("deeply-nested-json", "post", "/tasks",
     {"data": b"[" * 100000 + b"]" * 100000, "content_type": "application/json"}),
    ("deeply-nested-json-arg", "post", "/tasks",
     {"data": b'{"n": 1, "x": ' + b"[" * 100000 + b"]" * 100000 + b"}", "content_type": "application/json"}),
    ("huge-int-arg", "post", "/tasks", {"json": {"n": 10 ** 400}}),
    ("infinite-float-arg", "post", "/tasks", {"data": b'{"n": 1, "f": Infinity}',
                                              "content_type": "application/json"}),
    ("duplicate-key", "post", "/tasks", {"data": b'{"n": 1, "n": "x"}', "content_type": "application/json"}),
    ("nan-for-int", "post", "/tasks", {"data": b'{"n": NaN}', "content_type": "application/json"}),
    ("huge-query-priority", "post", "/tasks?priority=99999999999999999999999", {"json": {"n": 1}}),
    ("huge-negative-query-priority", "post", "/tasks?priority=-99999999999999999999999", {"json": {"n": 1}}),
    ("huge-body-priority", "post", "/tasks", {"json": {"n": 1, "priority": 10 ** 30}}),
    ("infinite-wait-and-timeout", "post", "/tasks?wait=inf&timeout=inf", {"json": {"n": "bad"}}),
    ("uuid-in-post-body", "post", "/tasks", {"json": {"n": 1, "uuid": _UNKNOWN}}),
    ("xml-content-type", "post", "/tasks", {"data": b'{"n": 1}', "content_type": "application/xml"}),
    ("null-uuid-in-body", "get", "/tasks", {"json": {"uuid": None, "x": 1}}),
    ("huge-limit", "get", "/tasks?limit=99999999999999999999", {}),
    ("long-path-uuid", "get", f"/tasks/{'a' * 5000}", {}),
    ("empty-query-uuid", "get", "/tasks?uuid=", {}),
    ("delete-empty-query-uuid", "delete", "/tasks?uuid=", {}),
    ("delete-invalid-json", "delete", "/tasks", {"data": b"not json", "content_type": "application/json"}),
    ("put", "put", "/tasks", {"json": {"n": 1}}),
    ("patch", "patch", f"/tasks/{_UNKNOWN}", {"json": {"status": "paused"}}),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("store", ["memory", "sqlite"])
@pytest.mark.parametrize("method,url,kwargs", [c[1:] for c in ODD_REQUESTS], ids=[c[0] for c in ODD_REQUESTS])
def test_no_bad_input_gives_500_or_traceback(make_client, request, store, method, url, kwargs):
    """Whatever an odd request gets, it is never a 500 nor a traceback; a 4xx has a JSON message."""
    store_url = "memory://" if store == "memory" else request.getfixturevalue("sqlite_url")
    client, controller = make_client(Typed, store=store_url)
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code < 500, (response.status_code, response.data[:300])
    assert b"Traceback" not in response.data
    if 400 <= response.status_code < 500:
        body = response.get_json(silent=True)
        assert isinstance(body, dict) and isinstance(body.get("message"), str), response.data[:300]
    # Whatever the request did, the controller still works, and an accepted task ends.
    done = client.post("/tasks?wait=15", json={"n": 3})
    assert done.status_code == 200 and done.json["result"]["n"] == 3
    for task in controller.tasks()["tasks"]:
        assert controller.wait(task["uuid"], timeout=15)["status"] in TERMINAL


@pytest.mark.timeout(30)
def test_accepted_argument_types(make_client):
    client, _ = make_client(Typed, max_num_process=2)
    as_float = client.post("/tasks?wait=15", json={"n": 1, "f": 2})
    assert as_float.status_code == 200, as_float.data
    assert as_float.json["status"] == "succeeded"
    assert as_float.json["result"] == {"n": 1, "f": 2, "o": 0}
    nullable = client.post("/tasks?wait=15", json={"n": -4, "f": 0.5, "o": None})
    assert nullable.status_code == 200, nullable.data
    assert nullable.json["result"] == {"n": -4, "f": 0.5, "o": None}
    assert nullable.json["args"] == {"n": -4, "f": 0.5, "o": None}


# -- control options ----------------------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_priority_orders_queued_tasks(make_client):
    client, _ = make_client(Work, max_num_process=1, stop_grace=0.5)
    blocker = start_blocker(client)
    posted = {
        "q5": client.post("/tasks?priority=5", json={"tag": "q5"}),
        "b2": client.post("/tasks", json={"tag": "b2", "priority": 2}),  # seed style
        "q1": client.post("/tasks?priority=1", json={"tag": "q1"}),
        "d0": client.post("/tasks", json={"tag": "d0"}),
        "n1": client.post("/tasks?priority=-1", json={"tag": "n1"}),
    }
    assert all(r.status_code == 202 for r in posted.values())
    priorities = {k: r.json["priority"] for k, r in posted.items()}
    assert priorities == {"q5": 5, "b2": 2, "q1": 1, "d0": 0, "n1": -1}
    assert posted["b2"].json["args"] == {"tag": "b2"}
    positions = {k: get_task(client, r.json["uuid"])["position"] for k, r in posted.items()}
    assert positions == {"n1": 1, "d0": 2, "q1": 3, "b2": 4, "q5": 5}
    assert client.delete(f"/tasks/{blocker}").status_code == 202
    finished = {k: wait_task(client, r.json["uuid"]) for k, r in posted.items()}
    assert all(t["status"] == "succeeded" for t in finished.values()), finished
    order = sorted(finished, key=lambda k: finished[k]["result"]["t"])
    assert order == ["n1", "d0", "q1", "b2", "q5"]


@pytest.mark.timeout(30)
def test_body_priority_is_not_passed_to_execute(make_client):
    client, _ = make_client(Echo)
    response = client.post("/tasks?wait=15", json={"tag": "e", "priority": 3})
    assert response.status_code == 200, response.data
    task = response.json
    assert task["status"] == "succeeded", task
    assert task["priority"] == 3
    assert task["args"] == {"tag": "e"}
    assert task["result"] == {"tag": "e"}


@pytest.mark.timeout(30)
def test_body_priority_is_an_argument_when_execute_declares_it(make_client):
    client, _ = make_client(PriorityParam)
    response = client.post("/tasks?wait=15", json={"priority": 4})
    assert response.status_code == 200, response.data
    task = response.json
    assert task["status"] == "succeeded", task
    assert task["args"] == {"priority": 4}
    assert task["result"] == {"priority": 4}
    assert task["priority"] == 0
    # The query option still sets the queue priority, separately from the argument.
    response = client.post("/tasks?wait=15&priority=7", json={"priority": 9})
    assert response.json["priority"] == 7
    assert response.json["result"] == {"priority": 9}


@pytest.mark.timeout(30)
def test_query_options_are_not_task_arguments(make_client):
    client, _ = make_client(Typed)
    response = client.post("/tasks?wait=15&priority=2&timeout=30", json={"n": 5})
    assert response.status_code == 200, response.data
    assert response.json["args"] == {"n": 5}
    assert response.json["priority"] == 2
    assert response.json["result"] == {"n": 5, "f": 0.0, "o": 0}


@pytest.mark.timeout(30)
def test_query_timeout_ends_long_task_timed_out(make_client):
    client, _ = make_client(Work, stop_grace=0.5)
    response = client.post("/tasks?timeout=0.5", json={"seconds": 60, "tag": "slow"})
    assert response.status_code == 202
    task = wait_task(client, response.json["uuid"], timeout=20)
    assert task["status"] == "timed_out", task
    assert task["result"] is None
    assert task["error"]["type"] == "TaskTimeout", task
    assert "timeout of 0.5 s" in task["error"]["message"], task
    assert task["timeout"] == 0.5


@pytest.mark.timeout(30)
def test_query_timeout_cannot_raise_controller_timeout(make_client):
    client, _ = make_client(Work, stop_grace=0.5, timeout=0.5)
    response = client.post("/tasks?timeout=3000", json={"seconds": 60})
    assert response.status_code == 202
    assert response.json["timeout"] == 0.5
    task = wait_task(client, response.json["uuid"], timeout=20)
    assert task["status"] == "timed_out", task
    assert "timeout of 0.5 s" in task["error"]["message"], task


# -- the subclass decorator= keyword and overridden methods ----------------------------------------

CALLS: list = []


def record_calls(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        CALLS.append(method.__name__)
        return method(self, *args, **kwargs)

    return wrapper


class RecordingController(MetaMPController, controller_name="recording", decorator=record_calls):
    pass


class OverridingController(MetaMPController, controller_name="overriding"):
    def post(self, *args, **kwargs):
        reply = super().post(*args, **kwargs)  # a dict that carries its status and headers
        reply.headers["X-Overridden"] = "yes"
        if "uuid" in reply:
            reply["overridden"] = True
        return reply

    def get(self, **kwargs):
        reply = super().get(**kwargs)
        reply["seen_by"] = "override"
        return reply


@pytest.mark.timeout(30)
def test_decorator_keyword_wraps_post_get_delete(own_controllers):
    CALLS.clear()
    controller = RecordingController(Work, store="memory://", stop_grace=0.5)
    own_controllers.append(controller)
    client = mount(controller, "/tasks", "/tasks/<string:uuid>")
    posted = client.post("/tasks", json={"seconds": 60})
    assert posted.status_code == 202, posted.data
    uuid = posted.json["uuid"]
    assert client.get(f"/tasks/{uuid}").status_code == 200
    assert client.get("/tasks").status_code == 200
    assert client.delete(f"/tasks/{uuid}").status_code in (200, 202)
    assert CALLS == ["post", "get", "get", "delete"]
    # A rejected request still goes through the decorated method.
    assert_error(client.post("/tasks", json={"bogus": 1}), 400)
    assert CALLS[-1] == "post"


@pytest.mark.timeout(30)
def test_overridden_post_and_get_are_used_by_the_resource(own_controllers):
    controller = OverridingController(Work, store="memory://")
    own_controllers.append(controller)
    client = mount(controller, "/tasks", "/tasks/<string:uuid>")
    response = client.post("/tasks", json={"tag": "o"})
    assert response.status_code == 202, response.data
    assert response.headers["X-Overridden"] == "yes"
    assert response.json["overridden"] is True
    assert "Location" in response.headers
    uuid = response.json["uuid"]
    got = client.get(f"/tasks/{uuid}?wait=15")
    assert got.status_code == 200
    assert got.json["seen_by"] == "override"
    assert got.json["status"] == "succeeded"


@pytest.mark.timeout(30)
def test_template_factory_resources_can_share_one_app(make_controller):
    """Two unnamed factory resources mount side by side (each gets its own endpoint)."""
    from flask import Flask
    from flask_restful import Api

    from flask_multiprocess_controller import TemplateFactory

    class Echo(MetaMPTask):
        def execute(self, word: str = "hi") -> str:
            return word

    first = make_controller(Echo, store="memory://")
    second = make_controller(Echo, store="memory://")
    app = Flask(__name__)
    api = Api(app)
    api.add_resource(TemplateFactory.MPResource(), "/one", resource_class_args=(first,))
    api.add_resource(TemplateFactory.MPResource(), "/two", resource_class_args=(second,))
    client = app.test_client()
    for url in ("/one", "/two"):
        posted = client.post(f"{url}?wait=10", json={"word": url})
        assert posted.status_code == 200, posted.json
        assert posted.json["result"] == url
        assert posted.headers["Location"].startswith(f"{url}?uuid=")
