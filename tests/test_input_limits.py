"""Input limits: every body read by one reader (size, depth, no NaN, never echoed), every number option
bounded, NaN refused by every way in, argument errors that name the argument, exception messages clipped
where they are recorded, ``expose_errors``, and progress nested too deep refused in the task."""
from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
from conftest import wait_until
from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController
from flask_multiprocess_controller.exceptions import InvalidArguments, InvalidRequest


class Quick(MetaMPTask):
    def execute(self, n: int = 0, x: float = 0.0, anything: Any = None, token: str = "hunter2-default") -> int:
        return n


class Needs(MetaMPTask):
    def execute(self, count: int, token: str = "hunter2-default") -> int:
        return count


class Loud(MetaMPTask):
    """Raises an exception whose message is ``size`` characters long (a secret, then padding)."""

    max_retries = 1
    retry_backoff = 0.01
    retry_backoff_max = 0.01

    def execute(self, size: int = 5_000_000) -> None:
        raise KeyError("secret path /srv/app/config.py " + "y" * size)


class Deep(MetaMPTask):
    """Publishes progress nested 900 levels deep, then (after the refusal) progress that must still arrive."""

    def execute(self, gate: str) -> str:
        value: Any = []
        for _ in range(900):
            value = [value]
        try:
            self.upload_status(value)
            outcome = "accepted"
        except ValueError as exc:
            outcome = str(exc)
        self.upload_status({"after": outcome})
        while not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.01)
        return outcome


def _app(controller: MetaMPController, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    extension = MultiprocessController()
    Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))
    extension.init_app(app)
    return app


# -- one body reader ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_the_operator_patch_reads_its_body_with_the_limits_and_never_echoes_it(make_controller):
    controller = make_controller(Quick)
    client = _app(controller).test_client()
    uuid = client.post("/tasks", json={}).get_json()["uuid"]
    url = f"/mpc/api/tasks/{uuid}"
    huge = json.dumps({"status": "x" * (30 * 1024 * 1024)})
    answer = client.patch(url, data=huge, content_type="application/json")
    assert answer.status_code == 413, answer.status_code
    assert len(answer.get_data()) < 1024 and "xxxx" not in answer.get_data(as_text=True)
    for body in ("[" * 100_000 + "]" * 100_000, '{"priority": ' + "[" * 200 + "]" * 200 + "}",
                 '{"priority": NaN}', '{"priority": Infinity}', "{not json"):
        answer = client.patch(url, data=body, content_type="application/json")
        assert answer.status_code == 400, (body[:30], answer.status_code)
        assert answer.get_json()["message"] and "[[[" not in answer.get_json()["message"]
    answer = client.patch(url, data=json.dumps({"status": "p" * 100_000}), content_type="application/json")
    assert answer.status_code == 400 and len(answer.get_data()) < 1024, "a bad value is quoted, not echoed"
    answer = client.patch(url, data=json.dumps({"priority": "p" * 100_000}), content_type="application/json")
    assert answer.status_code == 400 and len(answer.get_data()) < 1024
    answer = client.patch(url, data=json.dumps({"k" * 100_000: 1}), content_type="application/json")
    assert answer.status_code == 400 and len(answer.get_data()) < 1024


@pytest.mark.timeout(60)
def test_every_number_option_is_bounded(make_controller, sqlite_url):
    controller = make_controller(Quick, store=sqlite_url)
    client = _app(controller).test_client()
    uuid = client.post("/tasks", json={}).get_json()["uuid"]
    for url in (f"/mpc/api/tasks?before={2 ** 63}", f"/mpc/api/tasks?before={2 ** 64}",
                f"/mpc/api/tasks/{uuid}/logs?after={2 ** 64}", f"/mpc/api/tasks?limit={10 ** 30}",
                f"/tasks?limit={10 ** 30}", "/tasks?limit=" + "9" * 5000):
        answer = client.get(url)
        assert answer.status_code == 400, (url[:60], answer.status_code, answer.get_data(as_text=True)[:200])
        assert "must be" in answer.get_json()["message"]
    for option in (f"priority={2 ** 64}", "timeout=1e300", f"timeout={10 ** 12}", "wait=1e999"):
        answer = client.post(f"/tasks?{option}", json={})
        assert answer.status_code == 400, option
    assert client.get(f"/mpc/api/tasks?before={2 ** 63 - 1}").status_code == 200
    assert client.get(f"/tasks?wait=1e300&uuid={uuid}").status_code == 200, "a long wait is clamped, not refused"


# -- arguments --------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_bad_argument_is_named_without_executes_signature(make_client):
    client, _ = make_client(Needs)
    for body, named in (({"count": 1, "colour": "blue"}, "'colour'"), ({}, "'count'"),
                        ({"count": "many"}, "'count'")):
        answer = client.post("/tasks", json=body)
        message = answer.get_json()["message"]
        assert answer.status_code == 400 and named in message, message
        assert "hunter2" not in message and "execute(count" not in message, message
    assert "an integer" in client.post("/tasks", json={}).get_json()["message"], "the expected type is named"
    answer = client.post("/tasks", json={"count": 1, "k" * 100_000: 1})
    assert answer.status_code == 400 and len(answer.get_data()) < 1024, "an unknown name is quoted, not echoed"


@pytest.mark.timeout(60)
def test_nan_and_infinity_are_refused_by_every_way_in(make_controller):
    controller = make_controller(Quick)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(InvalidArguments, match="'x'"):
            controller.submit(x=bad)
        with pytest.raises(InvalidArguments, match="'anything'"):
            controller.submit(anything={"deep": [1, [bad]]})
        with pytest.raises(InvalidArguments):
            controller.submit_many([{"x": 1.0}, {"x": bad}])
        with pytest.raises(InvalidArguments):
            controller.schedule("nightly", every=3600, kwargs={"x": bad})
        with pytest.raises(InvalidRequest):
            controller.enqueue([{}], timeout=bad)
    with pytest.raises(InvalidArguments, match="not a JSON value"):
        controller.submit(anything={1, 2})
    with pytest.raises(ValueError):
        MetaMPController(Quick, store="memory://", timeout=float("nan"))
    app = _app(controller)
    runner = app.test_cli_runner()
    for raw in ("NaN", "Infinity", "[1, -Infinity]"):
        result = runner.invoke(args=["mpc", "submit", "Quick", f"anything={raw}"])
        assert result.exit_code != 0 and "NaN or Infinity" in result.output, (raw, result.output)
    assert controller.tasks()["tasks"] == [], "nothing was queued"
    assert controller.schedules() == []


# -- exception messages -------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_exception_messages_are_clipped_where_they_are_recorded(make_controller):
    controller = make_controller(Loud)
    uuid = controller.submit()
    assert controller.wait(uuid, timeout=30)["status"] == "failed"
    row = controller.store.get(uuid)
    assert row is not None and len(row["errors"]) == 2, "both attempts failed"
    for error in [row["error"], *row["errors"]]:
        assert len(error["message"].encode()) <= 4096 and error["message"].startswith("'secret path")
        assert "clipped" in error["message"]
        assert len(error["traceback"]) <= 64 * 1024 and "KeyError" in error["traceback"]
    task = controller.status(uuid)
    assert len(task["msg"]) < 4096 + 100


@pytest.mark.timeout(60)
def test_max_message_size_is_a_keyword_and_an_app_setting(make_controller):
    small = make_controller(Loud, max_message_size=100)
    uuid = small.submit(size=10_000)
    assert len(small.wait(uuid, timeout=30)["error"]["message"].encode()) <= 100
    configured = make_controller(Loud, store="memory://")
    client = _app(configured, MPC_MAX_MESSAGE_SIZE=200).test_client()
    uuid = client.post("/tasks", json={"size": 10_000}).get_json()["uuid"]
    task = client.get(f"/tasks/{uuid}?wait=25").get_json()
    assert task["status"] == "failed" and len(task["error"]["message"].encode()) <= 200


@pytest.mark.timeout(60)
def test_expose_errors_off_hides_exception_text_from_clients_and_callbacks(make_controller):
    from test_lifecycle import Receiver

    with Receiver() as receiver:
        controller = make_controller(Loud, expose_errors=False, expose_tracebacks=True, callback_url=receiver.url)
        client = _app(controller).test_client()
        uuid = client.post("/tasks", json={"size": 10}).get_json()["uuid"]
        task = client.get(f"/tasks/{uuid}?wait=25").get_json()
        assert task["status"] == "failed" and task["error"]["type"] == "KeyError"
        assert task["error"]["traceback"] is None and "KeyError" in task["msg"]
        for url in (f"/tasks/{uuid}", "/tasks", f"/mpc/api/tasks/{uuid}", "/mpc/api/tasks"):
            assert "secret" not in client.get(url).get_data(as_text=True), url
        ended = wait_until(lambda: receiver.events(uuid).get("ended"), timeout=20)
        assert "secret" not in json.dumps(ended) and ended["task"]["error"]["type"] == "KeyError"
        assert "secret" in controller.status(uuid)["error"]["message"], "the Python API keeps the text"
        assert "secret" in controller.store.get(uuid)["error"]["message"], "and so does the store"
        controller.shutdown()


@pytest.mark.timeout(60)
def test_expose_errors_is_an_app_setting_read_as_a_flag(make_controller):
    controller = make_controller(Loud)
    client = _app(controller, MPC_EXPOSE_ERRORS="false", MPC_EXPOSE_TRACEBACKS="false").test_client()
    uuid = client.post("/tasks", json={"size": 10}).get_json()["uuid"]
    task = client.get(f"/tasks/{uuid}?wait=25").get_json()
    assert task["status"] == "failed" and "secret" not in json.dumps(task)
    assert task["error"]["type"] == "KeyError"


# -- progress -------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_progress_nested_too_deep_raises_in_the_task_and_later_progress_still_arrives(make_controller, tmp_path):
    controller = make_controller(Deep)
    gate = str(tmp_path / "gate")
    uuid = controller.submit(gate=gate)
    progress = wait_until(lambda: (controller.status(uuid)["progress"] or None), timeout=20)
    assert "nested at most 100 levels" in progress["after"], progress
    open(gate, "w").close()
    task = controller.wait(uuid, timeout=20)
    assert task["status"] == "succeeded" and task["result"] == progress["after"]


class DeepResult(MetaMPTask):
    def execute(self, depth: int = 900) -> Any:
        value: Any = []
        for _ in range(depth):
            value = [value]
        return value


@pytest.mark.timeout(60)
def test_a_result_nested_too_deep_fails_the_task_with_a_clear_error(make_controller):
    controller = make_controller(DeepResult)
    task = controller.wait(controller.submit(), timeout=20)
    assert task["status"] == "failed" and task["error"]["type"] == "ResultNotSerializable", task["error"]
    assert "nested more than 100 levels" in task["error"]["message"]
    assert controller.wait(controller.submit(depth=99), timeout=20)["status"] == "succeeded"
