"""Code written for upstream 0.1 runs unchanged: its tutorial's patterns, its overrides, its clients.

Through Flask's test client with real task processes, and served for real (``python`` and
gunicorn, on 127.0.0.1) for the tutorial's app-factory layout, callbacks into a controller
without a task, 0.1-style clients and the console output of an app that set no logging.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid as uuid_module
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
import requests
from flask import Flask
from flask_restful import Api

from conftest import wait_until
from flask_multiprocess_controller import (
    DefaultMPLoggerConfigurator, MetaMPController, MetaMPLoggerConfigurator, MetaMPResource, MetaMPTask,
    MethodNotServed, NoTargetTask, Reply, TemplateFactory, TemplateMPController, TemplateMPResource,
)
from flask_multiprocess_controller.ops.console import ConsoleFallbackLogger

from serverproc import free_port, gunicorn, poll_until, python, unexpected_tracebacks

TESTS = Path(__file__).resolve().parent
EXAMPLES = TESTS.parent / "examples" / "migrating_from_0_1"
TERMINAL = {"succeeded", "failed", "stopped", "timed_out", "lost"}
HTTP_TIMEOUT = 15
STOP_DEADLINE = 30.0


# -- task classes (children are forked: defining them here is enough) -----------------------------------

class Steps(MetaMPTask):
    """0.1-style: ``*args, **kwargs``; counts ``steps`` steps of ``delay`` s, uploading each number."""

    def execute(self, *args, **kwargs):
        steps = int(kwargs.get("steps", 3))
        for step in range(1, steps + 1):
            time.sleep(float(kwargs.get("delay", 0.02)))
            self.upload_status(step)
            self.set_checkpoint()
        return {"steps": steps}


class Attributes(MetaMPTask, task_name="attrs"):
    """Returns what 0.1 tasks read from themselves."""

    def execute(self):
        self.logger.info("running")
        return {"task_name": self.task_name, "counter": self.counter, "logger": self.logger.name,
                "class_counter": type(self).counter}


# -- helpers --------------------------------------------------------------------------------------------

@pytest.fixture
def own():
    """Controllers made by the test, shut down after it."""
    made: list = []
    yield made
    for controller in made:
        controller.shutdown()


def mount(*controllers_and_urls):
    """An app with ``(controller, url, ...)`` groups mounted, through ``Api()`` and a later ``init_app``."""
    api = Api()
    for controller, *urls in controllers_and_urls:
        api.add_resource(TemplateFactory.MPResource(), *urls, resource_class_args=(controller,))
    app = Flask(__name__)
    api.init_app(app)
    return app.test_client()


def allow(response) -> set:
    return {m.strip() for m in response.headers.get("Allow", "").split(",") if m.strip()}


def assert_405(response, allowed: set) -> None:
    assert response.status_code == 405, (response.status_code, response.data[:300])
    assert isinstance(response.json, dict) and response.json["message"], response.data[:300]
    assert allow(response) == allowed


def live_threads() -> set:
    return {t for t in threading.enumerate() if t.is_alive()}


# -- the constructor: upstream's positional order --------------------------------------------------------

class Quiet(MetaMPLoggerConfigurator):
    """Counts its calls and leaves the test process's logging alone."""

    calls = 0

    @staticmethod
    def listener_log_setup():
        Quiet.calls += 1


class PidRecorder(MetaMPLoggerConfigurator):
    """Overrides ``worker_log_setup`` (keeping the default's work) and notes each process it runs in."""

    path = ""

    @staticmethod
    def listener_log_setup():
        pass

    @staticmethod
    def worker_log_setup(queue):
        MetaMPLoggerConfigurator.worker_log_setup(queue)
        with open(PidRecorder.path, "a") as notes:
            notes.write(f"{os.getpid()}\n")


class LogsItsPid(MetaMPTask, task_name="logs-its-pid"):
    """Logs a line naming its process and returns its pid."""

    def execute(self):
        logging.getLogger("logs-its-pid").warning("task process %d", os.getpid())
        return os.getpid()


def run_logging_tasks(controller, count: int, caplog) -> tuple[set, set]:
    """Run ``count`` tasks one after the other: the pids they returned, and the pids their log lines named."""
    with caplog.at_level(logging.WARNING, logger="logs-its-pid"):
        results = {controller.wait(controller.submit(), 20)["result"] for _ in range(count)}
    logged = {record.process for record in caplog.records if record.name == "logs-its-pid"}
    return results, logged


@pytest.mark.timeout(60)
def test_an_overridden_worker_log_setup_runs_in_each_task_process(own, tmp_path, caplog):
    PidRecorder.path = str(tmp_path / "pids")
    controller = MetaMPController(LogsItsPid, log_configurator=PidRecorder, store="memory://")
    own.append(controller)
    pids, logged = run_logging_tasks(controller, 3, caplog)
    assert len(pids) == 3  # a fresh process per task
    assert {int(pid) for pid in Path(PidRecorder.path).read_text().split()} == pids
    assert logged == pids


@pytest.mark.timeout(60)
def test_the_default_worker_log_setup_reaches_the_server_from_every_task_process(own, caplog):
    controller = MetaMPController(LogsItsPid, store="memory://")
    own.append(controller)
    pids, logged = run_logging_tasks(controller, 3, caplog)
    assert len(pids) == 3
    assert logged == pids


@pytest.mark.timeout(30)
def test_positional_order_is_upstreams(own):
    Quiet.calls = 0
    controller = MetaMPController(Steps, "http://127.0.0.1:9/cb", 2, 5, Quiet, store="memory://")
    own.append(controller)
    assert controller.callback_url == "http://127.0.0.1:9/cb"
    assert controller.max_num_process == 2
    assert controller.max_num_queue == 5
    assert Quiet.calls == 1


@pytest.mark.timeout(30)
def test_a_non_string_callback_url_is_a_type_error_naming_the_order():
    with pytest.raises(TypeError) as caught:
        MetaMPController(Steps, 2)  # 0.2's order: (target_task, max_num_process)
    assert "callback_url" in str(caught.value) and "max_num_process=" in str(caught.value)
    with pytest.raises(TypeError):
        MetaMPController(Steps, callback_url=b"http://127.0.0.1:9/cb")
    with pytest.raises(ValueError):
        MetaMPController(Steps, "127.0.0.1:9/cb")  # not an http(s) URL


@pytest.mark.timeout(30)
def test_both_names_of_the_log_configurator_are_accepted(own):
    Quiet.calls = 0
    own.append(MetaMPController(Steps, logger_configurator_cls=Quiet, store="memory://"))
    own.append(MetaMPController(Steps, log_configurator=Quiet, store="memory://"))
    own.append(MetaMPController(Steps, logger_configurator_cls=Quiet, log_configurator=Quiet, store="memory://"))
    assert Quiet.calls == 3
    with pytest.raises(TypeError):
        MetaMPController(Steps, logger_configurator_cls=Quiet, log_configurator=DefaultMPLoggerConfigurator)
    with pytest.raises(TypeError):
        MetaMPController(Steps, logger_configurator_cls=logging.Formatter)


@pytest.mark.timeout(30)
def test_keyword_construction_of_the_tutorial_and_of_0_2_still_works(own):
    controller = TemplateFactory.MPController(name="Main")(target_task=Steps, max_num_process=2,
                                                           callback_url="http://127.0.0.1:9/cb", store="memory://")
    own.append(controller)
    assert (controller.name, controller.max_num_process, controller.callback_url) == \
        ("Main", 2, "http://127.0.0.1:9/cb")
    other = MetaMPController(Steps, max_num_process=3, max_num_queue=7, store="memory://")
    own.append(other)
    assert (other.max_num_process, other.max_num_queue, other.callback_url) == (3, 7, None)


# -- a controller without a task -----------------------------------------------------------------------

class LocalCallback(MetaMPController):
    """Upstream's local-callback pattern: no task, ``post`` answers locally."""

    received: list = []

    def post(self, **kwarg):
        LocalCallback.received.append(kwarg)
        return kwarg


@pytest.mark.timeout(30)
def test_a_controller_without_a_task_starts_nothing_and_serves_only_its_overrides():
    children = set(psutil.Process().children(recursive=True))
    threads = live_threads()
    controller = LocalCallback(target_task=None, max_num_process=1)
    try:
        assert controller.forkserver_pid is None
        assert set(psutil.Process().children(recursive=True)) == children
        assert live_threads() == threads
        client = mount((controller, "/local_callback"))
        answered = client.post("/local_callback", json={"msg": "hello", "uuid": "u"})
        assert answered.status_code == 200 and answered.json == {"msg": "hello", "uuid": "u"}
        for method in ("get", "delete", "put", "patch", "trace"):
            assert_405(getattr(client, method)("/local_callback"), {"POST", "OPTIONS"})
        options = client.options("/local_callback")
        assert options.status_code == 200 and allow(options) == {"POST", "OPTIONS"}
        with pytest.raises(NoTargetTask):
            controller.get(uuid=str(uuid_module.uuid4()))
        assert live_threads() == threads
    finally:
        controller.shutdown()


@pytest.mark.timeout(60)
def test_a_controller_without_a_task_receives_another_controller_s_callbacks(own):
    """The tutorial's pair, the receiver served by a real HTTP server in a thread: callbacks arrive."""
    from werkzeug.serving import make_server

    LocalCallback.received = []
    receiver = LocalCallback(target_task=None)
    own.append(receiver)
    api = Api()
    api.add_resource(TemplateFactory.MPResource(), "/local_callback", resource_class_args=(receiver,))
    app = Flask(__name__)
    api.init_app(app)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    serving = threading.Thread(target=server.serve_forever, name="callback-receiver", daemon=True)
    serving.start()
    try:
        sender = TemplateFactory.MPController(name="Main")(
            target_task=Steps, callback_url=f"http://127.0.0.1:{server.server_port}/local_callback",
            store="memory://")
        try:
            uuid = sender.submit(steps=1)
            assert sender.wait(uuid, timeout=20)["status"] == "succeeded"
            bodies = wait_until(lambda: [b for b in LocalCallback.received if b.get("uuid") == uuid][1:] and
                                [b for b in LocalCallback.received if b.get("uuid") == uuid], timeout=20)
        finally:
            sender.shutdown()
    finally:
        server.shutdown()
        serving.join(10)
    assert [b["event"] for b in bodies] == ["started", "ended"]
    assert bodies[-1]["task"]["status"] == "succeeded"


# -- every HTTP method ----------------------------------------------------------------------------------

SEEN: list = []


class EveryMethod(MetaMPController, controller_name="every-method"):
    """Overrides every HTTP method; each records what it received and answers it back."""

    def _answer(self, method, args, kwargs):
        SEEN.append((method, list(args), kwargs))
        return {"method": method, "args": list(args), "kwargs": kwargs}

    def get(self, *args, **kwargs):
        return self._answer("get", args, kwargs)

    def post(self, *args, **kwargs):
        return self._answer("post", args, kwargs)

    def put(self, *args, **kwargs):
        return self._answer("put", args, kwargs)

    def patch(self, *args, **kwargs):
        return self._answer("patch", args, kwargs)

    def delete(self, *args, **kwargs):
        return self._answer("delete", args, kwargs)

    def trace(self, *args, **kwargs):
        return self._answer("trace", args, kwargs)

    def head(self, *args, **kwargs):
        SEEN.append(("head", list(args), kwargs))
        return Reply({}, 200, {"X-Head": "overridden"})

    def options(self, *args, **kwargs):
        SEEN.append(("options", list(args), kwargs))
        return Reply({"methods": ["anything"]}, 200, {"Allow": "GET, POST, X-CUSTOM"})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("target", [Steps, None], ids=["with-task", "without-task"])
def test_overrides_of_every_http_method_are_reached_with_the_body_as_keywords(own, target):
    controller = EveryMethod(target, store="memory://")
    own.append(controller)
    client = mount((controller, "/every", "/every/<string:uuid>"))
    for method in ("get", "post", "put", "patch", "delete", "trace"):
        SEEN.clear()
        response = getattr(client, method)("/every/abc", json={"x": 1, "y": [2]})
        assert response.status_code == 200, (method, response.data)
        assert response.json == {"method": method, "args": [], "kwargs": {"x": 1, "y": [2], "uuid": "abc"}}
        assert SEEN == [(method, [], {"x": 1, "y": [2], "uuid": "abc"})]
    head = client.head("/every?uuid=q")
    assert head.status_code == 200 and head.headers["X-Head"] == "overridden" and head.data == b""
    assert SEEN[-1] == ("head", [], {"uuid": "q"})
    options = client.options("/every", json={"z": 0})
    assert options.headers["Allow"] == "GET, POST, X-CUSTOM" and options.json == {"methods": ["anything"]}
    assert SEEN[-1] == ("options", [], {"z": 0})
    # A JSON array is passed positionally to POST, PUT and PATCH; the query's uuid goes to all but POST.
    for method in ("post", "put", "patch"):
        answered = getattr(client, method)("/every?uuid=q", json=[{"a": 1}, {"b": 2}])
        expected = {} if method == "post" else {"uuid": "q"}
        assert answered.json == {"method": method, "args": [{"a": 1}, {"b": 2}], "kwargs": expected}


@pytest.mark.timeout(30)
def test_unoverridden_methods_answer_as_flask_does(own):
    controller = MetaMPController(Steps, store="memory://")
    own.append(controller)
    client = mount((controller, "/steps", "/steps/<string:uuid>"))
    served = {"GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS"}  # PATCH pauses and re-prioritises tasks
    assert set(controller.served_methods()) == served
    for method in ("put", "trace"):
        assert_405(getattr(client, method)("/steps", json={"x": 1}), served)
        assert_405(getattr(client, method)(f"/steps/{uuid_module.uuid4()}"), served)
    options = client.options("/steps")
    assert options.status_code == 200 and options.data == b"" and allow(options) == served
    posted = client.post("/steps", json={"steps": 1})
    uuid = posted.json["uuid"]
    got = client.get(f"/steps/{uuid}")
    head = client.head(f"/steps/{uuid}")
    assert head.status_code == 200 and head.data == b""
    assert head.headers["Content-Type"] == got.headers["Content-Type"] == "application/json"
    assert client.get(f"/steps/{uuid}?wait=15").json["status"] == "succeeded"
    # Called directly, an unserved handler says why and what is served.
    with pytest.raises(MethodNotServed) as caught:
        controller.put(x=1)
    assert set(caught.value.allowed) == served and "override put()" in caught.value.message


# -- super() overrides ----------------------------------------------------------------------------------

DECORATED: list = []


def remember_results(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        DECORATED.append((method.__name__, result))
        return result

    return wrapper


class Extending(MetaMPController, controller_name="extending", decorator=remember_results):
    """0.1's idiom: call the default, add keys, return it."""

    def post(self, **kwargs):
        res = super().post(**kwargs)
        res["extra"] = "added by post"
        return res

    def get(self, **kwargs):
        res = super().get(**kwargs)
        res["extra"] = "added by get"
        return res

    def delete(self, **kwargs):
        res = super().delete(**kwargs)
        res["extra"] = "added by delete"
        res.headers["X-Stopped-By"] = "override"
        return res


class Flattening(MetaMPController, controller_name="flattening"):
    """An override that returns a plain dict: it answers 200, as any flask-restful resource."""

    def post(self, **kwargs):
        return dict(super().post(**kwargs), extra=True)


@pytest.mark.timeout(30)
def test_super_overrides_add_keys_and_keep_status_and_headers(own):
    DECORATED.clear()
    controller = Extending(Steps, store="memory://", stop_grace=0.5)
    own.append(controller)
    client = mount((controller, "/ext", "/ext/<string:uuid>"))
    posted = client.post("/ext", json={"steps": 500, "delay": 0.02})
    assert posted.status_code == 202, posted.data
    assert posted.json["extra"] == "added by post" and posted.json["status"] in ("queued", "running")
    uuid = posted.json["uuid"]
    assert urlsplit(posted.headers["Location"]).path == f"/ext/{uuid}"
    got = client.get(posted.headers["Location"])
    assert got.status_code == 200 and got.json["extra"] == "added by get" and got.json["uuid"] == uuid
    wait_until(lambda: client.get(f"/ext/{uuid}").json["status"] == "running", timeout=15)
    stopped = client.delete(f"/ext/{uuid}")
    assert stopped.status_code == 202 and stopped.json["status"] == "stopping"
    assert stopped.json["extra"] == "added by delete" and stopped.headers["X-Stopped-By"] == "override"
    assert client.get(f"/ext/{uuid}?wait=15").json["status"] == "stopped"
    # The decorator saw the dicts the client got, with their status.
    name, result = DECORATED[0]
    assert name == "post" and isinstance(result, Reply) and result.status == 202 and result["extra"]
    # An error raised by super() is still the usual JSON error.
    bad = client.post("/ext", data=b"{", content_type="application/json")
    assert bad.status_code == 400 and bad.json["message"]


@pytest.mark.timeout(30)
def test_a_plain_dict_from_an_override_answers_200(own):
    controller = Flattening(Steps, store="memory://")
    own.append(controller)
    client = mount((controller, "/flat"))
    posted = client.post("/flat", json={"steps": 1})
    assert posted.status_code == 200 and posted.json["extra"] is True
    assert "Location" not in posted.headers
    assert controller.wait(posted.json["uuid"], timeout=15)["status"] == "succeeded"


# -- compat="0.1" ---------------------------------------------------------------------------------------

def _compat_pair(own):
    legacy = TemplateFactory.MPController(name="Legacy")(target_task=Steps, max_num_process=2, compat="0.1",
                                                         store="memory://", stop_grace=0.5)
    strict = TemplateFactory.MPController(name="Strict")(target_task=Steps, store="memory://")
    own.extend([legacy, strict])
    return legacy, strict, mount((legacy, "/legacy"), (strict, "/strict"))


@pytest.mark.timeout(60)
def test_compat_takes_any_content_type_and_answers_in_upstream_shapes(own):
    legacy, _, client = _compat_pair(own)
    params = {"steps": 400, "delay": 0.02}
    first = client.post("/legacy", data=json.dumps(params))  # no content type, as requests' data= sends
    assert first.status_code == 200, first.data
    body = first.json
    assert set(body) == {"msg", "uuid", "requestParams", "taskCounter"}
    uuid = body["uuid"]
    uuid_module.UUID(uuid)
    assert body["msg"] == f"Internal UUID {uuid} for Legacy task put in the queue."
    assert body["requestParams"] == str(params) and body["taskCounter"] == "1"
    second = client.post("/legacy", data=json.dumps({"steps": 1}), content_type="text/plain")
    assert second.status_code == 200 and second.json["taskCounter"] == "2"

    def progress():
        answer = client.get("/legacy", data=json.dumps({"uuid": uuid}))
        assert answer.status_code == 200, answer.data
        return answer.json

    running = poll_until(progress, lambda a: a.get("progressNum") not in (None, "0"), 20)
    assert running["msg"] == f"Process is running with uuid {uuid}."
    assert isinstance(running["progressNum"], str) and int(running["progressNum"]) >= 1
    assert running["status"] == "running"

    stop = client.delete("/legacy", data=json.dumps({"uuid": uuid}))
    assert stop.status_code == 200 and stop.json == {"msg": f"Stop signal sent to this uuid {uuid}.",
                                                     "status": "stopping"}
    ended = poll_until(progress, lambda a: "progressNum" not in a, 20)
    assert ended == {"msg": f"No process linked to this uuid {uuid}.", "status": "stopped"}
    again = client.delete("/legacy", data=json.dumps({"uuid": uuid}))
    assert again.status_code == 200 and again.json["msg"] == f"No process linked to this uuid {uuid}."

    unknown = str(uuid_module.uuid4())
    for method in ("get", "delete"):
        answer = getattr(client, method)("/legacy", data=json.dumps({"uuid": unknown}))
        assert answer.status_code == 200 and answer.json == {"msg": f"No process linked to this uuid {unknown}."}
        invalid = getattr(client, method)("/legacy", data=json.dumps({"foo": 1}))
        assert invalid.status_code == 200 and invalid.json == {"msg": "Invalid request: {'foo': 1}"}
    # The Python API keeps this version's task objects.
    assert legacy.status(uuid)["status"] == "stopped"


@pytest.mark.timeout(30)
def test_compat_errors_keep_their_codes_and_add_msg(own):
    _, _, client = _compat_pair(own)
    bad = client.post("/legacy", data=b"{not json")
    assert bad.status_code == 400 and bad.json["msg"] == bad.json["message"]
    unknown_arg = client.post("/legacy", data=b"[1]")
    assert unknown_arg.status_code == 400 and unknown_arg.json["msg"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_the_default_still_refuses_bodies_that_are_not_sent_as_json(own, content_type):
    _, strict, client = _compat_pair(own)
    kwargs = {"data": json.dumps({"steps": 1})}
    if content_type:
        kwargs["content_type"] = content_type
    refused = client.post("/strict", **kwargs)
    assert refused.status_code == 400 and "Content-Type: application/json" in refused.json["message"]
    assert strict.tasks()["tasks"] == []


# -- names and module paths of 0.1 ------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_upstream_module_paths_and_names_import():
    from flask_multiprocess_controller import logger, utils
    from flask_multiprocess_controller.logger import DefaultMPLoggerConfigurator as D, MetaMPLoggerConfigurator as M
    from flask_multiprocess_controller.utils import AbortException, set_checkpoint, upload_status

    import flask_multiprocess_controller as package

    assert (M, D) == (MetaMPLoggerConfigurator, DefaultMPLoggerConfigurator)
    assert (upload_status, set_checkpoint, AbortException) == \
        (package.upload_status, package.set_checkpoint, package.AbortException)
    assert logger.__name__.endswith(".logger") and utils.__name__.endswith(".utils")
    star: dict = {}
    exec("from flask_multiprocess_controller import *", star)
    for name in ("MetaMPTask", "MetaMPController", "MetaMPResource", "upload_status", "set_checkpoint",
                 "AbortException", "MetaMPLoggerConfigurator", "TemplateFactory"):
        assert name in star, name  # upstream 0.1.1's __all__


@pytest.mark.timeout(30)
def test_template_classes_of_the_0_1_description(own):
    controller = TemplateMPController(target_task=Steps, max_num_process=2, store="memory://")
    own.append(controller)
    assert controller.name == "Steps" and isinstance(controller, MetaMPController)
    assert issubclass(TemplateMPResource, MetaMPResource)
    api = Api()
    api.add_resource(TemplateMPResource, "/main", resource_class_args=(controller,))
    app = Flask(__name__)
    api.init_app(app)
    answer = app.test_client().post("/main?wait=15", json={"steps": 1})
    assert answer.status_code == 200 and answer.json["status"] == "succeeded"


@pytest.mark.timeout(30)
def test_tasks_have_the_attributes_upstream_tasks_read(own):
    controller = MetaMPController(Attributes, store="memory://", max_tasks_per_child=0)
    own.append(controller)
    first = controller.wait(controller.submit(), timeout=15)
    second = controller.wait(controller.submit(), timeout=15)
    assert first["result"]["task_name"] == "attrs" and first["result"]["logger"] == "Attributes"
    assert (first["result"]["counter"], second["result"]["counter"]) == (1, 2)  # one reused task process
    assert second["result"]["class_counter"] == 2 and Attributes.counter == 0  # counted in the task process


# -- the console fallback, in this process ------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_console_fallback_is_decided_per_record(capsys):
    """A logger no handler serves prints INFO+ on stderr; once one serves it, nothing is printed."""
    isolated = logging.getLogger(f"mpc-test-isolated-{uuid_module.uuid4().hex}")
    isolated.propagate = False  # pytest's own capture handler sits on the root logger
    isolated.setLevel(logging.WARNING)  # Python's default, whatever other tests did to the root logger
    log = ConsoleFallbackLogger(isolated)
    log.debug("never printed")
    log.info("printed %d", 1)  # below the logger's level, but nobody would print it otherwise
    log.warning("printed %d", 2)
    err = capsys.readouterr().err
    assert "never printed" not in err and "INFO" in err and "printed 1" in err and "printed 2" in err
    assert f"in {isolated.name}" in err

    caught: list = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = caught.append
    log.addHandler(handler)  # set on the wrapped logger
    try:
        assert isolated.handlers == [handler]
        log.warning("to the app's handler")
        log.info("below the app's level: dropped")
        assert [r.getMessage() for r in caught] == ["to the app's handler"]
        assert caught[0].name == isolated.name and caught[0].funcName == sys._getframe().f_code.co_name
        assert capsys.readouterr().err == ""
    finally:
        isolated.removeHandler(handler)


# -- served for real: the tutorial's layout ---------------------------------------------------------------

def _callback_events(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_tutorial_session(base: str, callback_log: Path) -> dict:
    """What a 0.1 user does with the tutorial's app; returns the uuids it used."""
    posted = requests.post(base + "/main", json={"steps": 3, "delay": 0.05}, timeout=HTTP_TIMEOUT)
    assert posted.status_code == 202, posted.text
    done_uuid = posted.json()["uuid"]
    done = requests.get(f"{base}/main?uuid={done_uuid}&wait=20", timeout=40).json()
    assert done["status"] == "succeeded" and done["progress"] == 3, done
    events = poll_until(lambda: [e["event"] for e in _callback_events(callback_log) if e["uuid"] == done_uuid],
                        lambda found: found == ["started", "ended"], 20)
    assert events == ["started", "ended"]

    # A 0.1 client: data= bodies without a JSON content type, upstream's answers.
    legacy = requests.post(base + "/legacy", data=json.dumps({"steps": 1000, "delay": 0.02}), timeout=HTTP_TIMEOUT)
    assert legacy.status_code == 200, legacy.text
    assert set(legacy.json()) == {"msg", "uuid", "requestParams", "taskCounter"}
    legacy_uuid = legacy.json()["uuid"]
    progress = poll_until(
        lambda: requests.get(base + "/legacy", data=json.dumps({"uuid": legacy_uuid}), timeout=HTTP_TIMEOUT).json(),
        lambda a: a.get("progressNum", "0") != "0", 20)
    assert progress["msg"] == f"Process is running with uuid {legacy_uuid}."
    stop = requests.delete(base + "/legacy", data=json.dumps({"uuid": legacy_uuid}), timeout=HTTP_TIMEOUT)
    assert stop.status_code == 200 and stop.json()["msg"] == f"Stop signal sent to this uuid {legacy_uuid}."
    poll_until(lambda: requests.get(base + "/legacy", data=json.dumps({"uuid": legacy_uuid}),
                                    timeout=HTTP_TIMEOUT).json(), lambda a: "progressNum" not in a, 20)
    # The strict resource refuses the same client.
    refused = requests.post(base + "/main", data=json.dumps({"steps": 1}), timeout=HTTP_TIMEOUT)
    assert refused.status_code == 400 and refused.json()["message"]
    # The controller without a task serves POST only.
    not_served = requests.get(base + "/local_callback", timeout=HTTP_TIMEOUT)
    assert not_served.status_code == 405 and "POST" in not_served.headers["Allow"]
    return {"done": done_uuid, "done_pid": done["pid"], "stopped": legacy_uuid}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_tutorial_app_served_by_python_prints_task_logs_when_the_app_set_no_logging(tmp_path, pool):
    port = free_port()
    callback_log = tmp_path / "callbacks.jsonl"
    server = pool.start(python(str(TESTS / "tutorial_app.py")), cwd=tmp_path, port=port,
                        log_path=tmp_path / "server.log",
                        env={"PORT": str(port), "CALLBACK_LOG": str(callback_log),
                             "MPC_STORE_URL": f"sqlite:///{tmp_path}/tasks.sqlite3"})
    used = _run_tutorial_session(server.base, callback_log)
    done, stopped = used["done"], used["stopped"]

    def console_has_everything(log: str) -> bool:
        return all(line in log for line in (
            f"Task {done} started in process {used['done_pid']}.",
            f"Task {done} ended succeeded.",
            f"Task {stopped} aborted by signal",
            f"callback received: ended {done}",
            "MainTask MainTask-1 finished 3 steps",  # a fresh task process per task: its counter is 1
        ))

    log = poll_until(server.log, console_has_everything, 20)
    assert f"in Main-{used['done_pid']} [" in log and "MainTask starts in process" in log  # the task's own logger
    assert "a DEBUG line" not in log  # INFO and above only
    survivors = server.stop(signal.SIGINT, timeout=STOP_DEADLINE, group=True)
    assert survivors == [], f"left after Ctrl-C: {survivors}\n{server.log()}"
    assert not unexpected_tracebacks(server.log()), server.log()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_tutorial_app_factory_under_gunicorn(tmp_path, pool):
    port = free_port()
    callback_log = tmp_path / "callbacks.jsonl"
    server = pool.start(
        gunicorn("-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(TESTS), "tutorial_app:create_app()"),
        cwd=tmp_path, port=port, log_path=tmp_path / "gunicorn.log",
        env={"PORT": str(port), "CALLBACK_LOG": str(callback_log),
             "MPC_STORE_URL": f"sqlite:///{tmp_path}/tasks.sqlite3"})
    used = _run_tutorial_session(server.base, callback_log)
    poll_until(server.log, lambda log: f"Task {used['done']} ended succeeded." in log, 20)
    survivors = server.stop(signal.SIGTERM, timeout=STOP_DEADLINE)
    assert survivors == [], f"left after SIGTERM to gunicorn: {survivors}\n{server.log()}"
    assert not unexpected_tracebacks(server.log()), server.log()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_migration_example_serves_under_gunicorn(tmp_path, pool):
    """The example of the README's migration section, as its docstring says to serve it."""
    port = free_port()
    server = pool.start(
        gunicorn("-b", f"127.0.0.1:{port}", "--chdir", str(EXAMPLES), "example_server:create_app()"),
        cwd=tmp_path, port=port, log_path=tmp_path / "gunicorn.log",
        env={"PORT": str(port), "MPC_STORE_URL": f"sqlite:///{tmp_path}/tasks.sqlite3"})
    posted = requests.post(server.base + "/main", json={"steps": 2}, timeout=HTTP_TIMEOUT)
    assert posted.status_code == 202, posted.text
    uuid = posted.json()["uuid"]
    done = requests.get(f"{server.base}/main?uuid={uuid}&wait=20", timeout=40).json()
    assert done["status"] == "succeeded", done
    poll_until(server.log, lambda log: f"callback received: ended {uuid}" in log, 20)
    survivors = server.stop(signal.SIGTERM, timeout=STOP_DEADLINE)
    assert survivors == [], f"left after SIGTERM to gunicorn: {survivors}\n{server.log()}"
