"""The Python client against a real server on 127.0.0.1 (tests/client_app.py, one per module):
submitting, reading, waiting (with a progress bar), stopping, listing, every error class, 429 and
503 retries after ``Retry-After``, and credentials from ``auth=``, ``headers=`` and a session.
"""
from __future__ import annotations

import subprocess
import sys
import time
import uuid as uuid_module
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from flask_multiprocess_controller.client import (
    AmbiguousPrefix, BadRequest, Client, ClientError, Conflict, NotFound, PayloadTooLarge, QueueFull,
    RedirectRefused, ServerUnavailable, TransportError, Unauthorized, parse_retry_after,
)

from serverproc import Server, ServerPool, free_port, python

TESTS = Path(__file__).resolve().parent
TOKEN = "Bearer s3cret"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("client-server")
    port = free_port()
    servers = ServerPool()
    try:
        started = servers.start(python(str(TESTS / "client_app.py")), cwd=directory, port=port,
                                log_path=directory / "server.log", ready_path="/ready",
                                env={"PORT": str(port), "MPC_STORE_URL": f"sqlite:///{directory}/tasks.sqlite3"})
        yield started
        assert started.stop(timeout=30) == [], started.log()
    finally:
        servers.close()


@pytest.fixture
def jobs(server: Server) -> Iterator[Client]:
    with Client(server.base, "/jobs") as client:
        yield client


def _counting_session() -> tuple[requests.Session, list[int]]:
    """A session that records the status of every answer it receives."""
    session = requests.Session()
    seen: list[int] = []
    session.hooks["response"].append(lambda response, *args, **kwargs: seen.append(response.status_code))
    return session, seen


@pytest.mark.timeout(60)
def test_submit_status_wait_and_list(jobs):
    uuid = jobs.submit(n=7)
    assert uuid_module.UUID(uuid)
    assert jobs.status(uuid)["uuid"] == uuid
    done = jobs.wait(uuid, timeout=20)
    assert done["status"] == "succeeded" and done["result"] == {"n": 7}
    listing = jobs.list(status="succeeded", limit=50)
    assert uuid in [t["uuid"] for t in listing["tasks"]]
    assert {"running", "queued", "max_num_process"} <= set(listing)
    assert len(jobs.list(status=["succeeded", "failed"], limit=1)["tasks"]) == 1


@pytest.mark.timeout(60)
def test_submit_many_and_query_options(jobs):
    tasks = jobs.submit_many([{"n": 1}, {"n": 2}], priority=-3, timeout=30)
    assert [t["args"] for t in tasks] == [{"n": 1}, {"n": 2}]
    assert all(t["priority"] == -3 and t["timeout"] == 30 for t in tasks)
    assert jobs.submit_many([]) == []
    for task in tasks:
        assert jobs.wait(task["uuid"], timeout=20)["status"] == "succeeded"
    failed = jobs.wait(jobs.submit(fail=True), timeout=20)
    assert failed["status"] == "failed" and failed["error"]["type"] == "ValueError"


@pytest.mark.timeout(60)
def test_wait_with_a_timeout_returns_the_running_task_and_stop_stops_it(jobs):
    uuid = jobs.submit(steps=200, delay=0.05)
    started = time.monotonic()
    task = jobs.wait(uuid, timeout=0.5)
    assert 0.4 < time.monotonic() - started < 5
    assert task["status"] in ("queued", "running")
    assert jobs.stop(uuid)["status"] in ("stopping", "stopped")
    assert jobs.wait(uuid, timeout=20)["status"] == "stopped"
    for again in (jobs.stop, jobs.finish):
        with pytest.raises(Conflict) as caught:
            again(uuid)
        assert caught.value.status == 409 and "already finished" in caught.value.message


@pytest.mark.timeout(60)
def test_wait_draws_a_progress_bar(jobs, capsys):
    uuid = jobs.submit(steps=20, delay=0.1)
    task = jobs.wait(uuid, timeout=30, progress=True)
    assert task["status"] == "succeeded" and task["percent"] == 100.0
    bar = capsys.readouterr().err
    assert f"task {uuid[:8]}" in bar
    assert "100%" in bar and "succeeded" in bar
    assert any(f"{p:3d}%" in bar for p in range(5, 100)), bar  # a step between 0 and 100 was drawn


@pytest.mark.timeout(60)
def test_error_classes(server, jobs):
    with pytest.raises(BadRequest, match="'n' must be an integer"):
        jobs.submit(n="seven")
    with pytest.raises(BadRequest, match="Unknown argument 'colour'"):
        jobs.submit(colour="blue")
    with pytest.raises(BadRequest, match="not a valid task uuid"):
        jobs.status("not-a-uuid")
    missing = str(uuid_module.uuid4())
    with pytest.raises(NotFound) as caught:
        jobs.status(missing)
    assert caught.value.status == 404 and missing in caught.value.message
    with pytest.raises(NotFound):
        jobs.stop(missing)
    with pytest.raises(PayloadTooLarge):
        jobs.submit(n=1, padding="x" * (1024 * 1024 + 1))
    assert issubclass(PayloadTooLarge, ClientError)
    with Client(f"http://127.0.0.1:{free_port()}", "/jobs", timeout=2) as nobody:
        with pytest.raises(TransportError):
            nobody.status(missing)


@pytest.mark.timeout(60)
def test_queue_full_is_retried_after_retry_after(server):
    session, seen = _counting_session()
    with Client(server.base, "/tight", session=session, max_retries=8) as tight, \
            Client(server.base, "/tight", max_retries=0) as impatient:
        running = tight.submit(steps=15, delay=0.1)   # about 1.5 s in the only process
        queued = tight.submit(steps=5, delay=0.1)      # the only place in the queue
        with pytest.raises(QueueFull) as caught:
            impatient.submit()
        assert caught.value.status == 429 and caught.value.retry_after == 1.0
        started = time.monotonic()
        third = tight.submit()  # refused until the first task ends and the second one runs
        assert time.monotonic() - started >= 1.0
        assert seen.count(429) >= 1 and seen[-1] == 202
        for uuid in (running, queued, third):
            assert tight.wait(uuid, timeout=30)["status"] == "succeeded"


@pytest.mark.timeout(60)
def test_retries_end_with_the_error(server):
    session, seen = _counting_session()
    with Client(server.base, "/flaky", session=session, max_retries=1) as once:
        with pytest.raises(ServerUnavailable) as caught:
            once.status(str(uuid_module.uuid4()))
    assert caught.value.retry_after == 1.0 and seen == [503, 503]
    with Client(server.base, "/flaky", max_retries=2) as twice:
        started = time.monotonic()
        assert twice.status(str(uuid_module.uuid4()))["reads"] == 3
        assert time.monotonic() - started >= 2.0
    with Client(server.base, "/flaky", max_retries=5, max_retry_delay=0.5) as hasty:
        with pytest.raises(ServerUnavailable):  # Retry-After 1 s is longer than it will wait
            hasty.status(str(uuid_module.uuid4()))


@pytest.mark.timeout(60)
def test_credentials_from_headers_auth_and_session(server):
    with Client(server.base, "/secure") as anonymous:
        with pytest.raises(Unauthorized) as caught:
            anonymous.submit()
    assert caught.value.status == 401 and "Authorization" in caught.value.message

    with Client(server.base, "/secure", headers={"Authorization": TOKEN}) as by_header:
        uuid = by_header.submit(n=1)
        assert by_header.wait(uuid, timeout=20)["status"] == "succeeded"

    def bearer(request: Any) -> Any:
        request.headers["Authorization"] = TOKEN
        return request

    with Client(server.base, "/secure", auth=bearer) as by_auth:
        assert by_auth.status(uuid)["uuid"] == uuid

    session = requests.Session()
    session.headers["Authorization"] = TOKEN
    with Client(server.base, "/secure", session=session) as by_session:
        assert by_session.list(limit=1)["tasks"]
    assert session.get(server.base + "/ready", timeout=5).ok  # a session the client was given stays open
    session.close()


def _wait_for(read: Any, status: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        task = read()
        if task["status"] == status or time.monotonic() > deadline:
            return task
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_pause_resume_reprioritise_and_stop_all_by_short_id(server):
    with Client(server.base, "/tight") as tight:
        running = tight.submit(steps=400, delay=0.05)
        short = running[:8]
        assert _wait_for(lambda: tight.status(short), "running")["uuid"] == running
        queued = tight.submit(n=2)
        assert tight.pause(short)["status"] == "paused"
        assert tight.resume(running.replace("-", "")[:12].upper())["status"] == "running"
        moved = tight.reprioritise(queued[:9], -3)
        assert (moved["uuid"], moved["priority"]) == (queued, -3)
        assert tight.stop_all() == {"stopped": 1, "stopping": 1}
        assert tight.wait(short, timeout=20)["status"] == "stopped"
        with pytest.raises(Conflict):
            tight.pause(short)


@pytest.mark.timeout(60)
def test_short_ids_that_name_several_tasks_or_none_and_a_wrong_resource_path(server, jobs):
    from flask_multiprocess_controller.store import SQLiteStore

    twins = ["abcd1234-0000-4000-8000-00000000000a", "abcd1234-1111-4000-8000-00000000000b"]
    store = SQLiteStore(str(server.log_path.parent / "tasks.sqlite3"))
    try:
        store.enqueue([{"uuid": uuid, "controller": "jobs", "status": "queued", "priority": 0, "args": {},
                        "created_at": time.time(), "timeout": None, "attempt": 0, "stop_requested": False}
                       for uuid in twins], -1)
    finally:
        store.close()
    with pytest.raises(AmbiguousPrefix) as caught:
        jobs.status("abcd1234")
    assert sorted(t["uuid"] for t in caught.value.candidates) == twins
    assert all(uuid in caught.value.message for uuid in twins) and "Give more" in caught.value.message
    assert jobs.status("abcd1234-1")["uuid"] == twins[1]  # one more digit tells them apart
    assert jobs.wait("ABCD12340000", timeout=20)["uuid"] == twins[0]
    with pytest.raises(NotFound, match="No task's uuid begins with abcd1235"):
        jobs.status("abcd1235")
    with pytest.raises(BadRequest, match="not a valid task uuid"):
        jobs.status("abcd123")  # too short to be a prefix: the server's answer
    with Client(server.base, "/job") as typo:
        with pytest.raises(NotFound) as wrong:
            typo.status(twins[0])
    assert f"GET {server.base}/job answered 404" in str(wrong.value), str(wrong.value)
    assert "resource path" in str(wrong.value) and wrong.value.url == f"{server.base}/job"


@pytest.mark.timeout(30)
def test_logs_url_and_not_found(server):
    uuid = str(uuid_module.uuid4())
    for prefix, path in (("/mpc", "/mpc"), ("ops/", "/ops"), ("", "")):
        with Client(server.base, "/jobs", prefix=prefix) as client:
            with pytest.raises(NotFound) as caught:
                client.logs(uuid)
        assert caught.value.response.url == f"{server.base}{path}/api/tasks/{uuid}/logs"


@pytest.mark.timeout(60)
def test_rerun_queues_an_ended_task_again(jobs):
    failed = jobs.submit(n=3, fail=True)
    assert jobs.wait(failed, timeout=20)["status"] == "failed"
    again = jobs.rerun(failed)
    assert (again["rerun_of"], again["args"]) == (failed, {"n": 3, "fail": True})
    assert jobs.wait(again["uuid"], timeout=20)["status"] == "failed"
    assert jobs.status(failed)["reruns"] == [again["uuid"]]
    running = jobs.submit(steps=200, delay=0.05)
    with pytest.raises(Conflict, match="only an ended task"):
        jobs.rerun(running)
    jobs.stop(running)
    with pytest.raises(NotFound):
        jobs.rerun(str(uuid_module.uuid4()))
    assert jobs.wait(running, timeout=20)["status"] == "stopped"


class _Canned(requests.adapters.BaseAdapter):
    """A transport that answers every request with one canned JSON body."""

    def __init__(self, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.body, self.status, self.headers = body, status, headers or {}

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        response = requests.Response()
        response.status_code, response._content, response.url = self.status, self.body, request.url
        response.headers.update({"Content-Type": "application/json", **self.headers})
        response.request = request
        return response

    def close(self) -> None:
        pass


@pytest.mark.timeout(30)
@pytest.mark.parametrize("body, lines", [(b'["a", "b"]', ["a", "b"]), (b'{"lines": ["c"]}', ["c"])])
def test_logs_answers(body, lines):
    session = requests.Session()
    session.mount("http://", _Canned(body))
    assert Client("http://logs.invalid", "/jobs", session=session).logs("x") == lines


@pytest.mark.timeout(30)
def test_error_answers_without_json_and_other_codes():
    session = requests.Session()
    session.mount("http://", _Canned(b"<html>teapot</html>", status=418))
    with pytest.raises(ClientError) as caught:
        Client("http://x.invalid", "/jobs", session=session).status("u")
    assert type(caught.value) is ClientError and caught.value.status == 418


@pytest.mark.timeout(30)
def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert 50 < parse_retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))) <= 60


@pytest.mark.timeout(60)
def test_imports_in_a_process_without_an_app_and_names_the_extra_when_requests_is_missing():
    probe = (
        "import sys, threading\n"
        "import flask_multiprocess_controller.client as c\n"
        "assert 'requests' not in sys.modules and 'tqdm' not in sys.modules, 'imported eagerly'\n"
        "assert threading.active_count() == 1\n"
        "sys.modules['requests'] = None\n"
        "try:\n"
        "    c.Client('http://127.0.0.1:1', '/jobs')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    assert "pip install 'flask-multiprocess-controller[client]'" in done.stdout


@pytest.mark.timeout(60)
def test_wait_batch_over_a_real_server(jobs):
    tasks = jobs.submit_many([{"n": 1}, {"n": 2}, {"n": 3}])
    batch = tasks[0]["batch"]
    assert batch and all(t["batch"] == batch for t in tasks)
    view = jobs.wait_batch(batch, timeout=30)
    assert view["batch"] == batch and view["total"] == view["ended"] == 3
    assert [t["uuid"] for t in view["tasks"]] == [t["uuid"] for t in tasks]
    assert {t["status"] for t in view["tasks"]} == {"succeeded"}


# -- submissions safe to send again, and redirects --------------------------------------------------------


def _tasks_with(client: Client, n: int) -> list[str]:
    return [t["uuid"] for t in client.list(limit=1000)["tasks"] if t["args"].get("n") == n]


@pytest.mark.timeout(60)
def test_a_submission_whose_answer_was_lost_is_sent_again_and_makes_one_task(server, jobs):
    from test_lost_answers import AnswerCutter

    # The proxy forwards the POST to the server, which queues the task, then breaks the connection
    # instead of passing the answer on.
    cutter = AnswerCutter(("127.0.0.1", server.port), b"Idempotency-Key")
    try:
        n = 900_000 + free_port()
        cutter.armed.set()
        with Client(f"http://127.0.0.1:{cutter.port}", "/jobs") as through_proxy:
            uuid = through_proxy.submit(n=n)
        assert cutter.cut.is_set(), "the answer was not cut: the test did not test anything"
    finally:
        cutter.close()
    assert _tasks_with(jobs, n) == [uuid]
    assert jobs.wait(uuid, timeout=30)["result"] == {"n": n}


class _Sequence(requests.adapters.BaseAdapter):
    """A transport that answers with the given statuses in turn, and records the requests it gets."""

    def __init__(self, *answers: tuple[int, bytes]) -> None:
        super().__init__()
        self.answers = list(answers)
        self.seen: list[requests.PreparedRequest] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.seen.append(request)
        status, body = self.answers.pop(0)
        response = requests.Response()
        response.status_code, response._content, response.url = status, body, request.url
        response.headers["Content-Type"] = "application/json"
        response.request = request
        return response

    def close(self) -> None:
        pass


@pytest.mark.timeout(30)
def test_a_gateway_error_is_retried_with_the_same_key_and_a_given_key_is_sent():
    transport = _Sequence((502, b"{}"), (504, b"{}"), (202, b'{"uuid": "u1"}'), (202, b'{"uuid": "u2"}'))
    session = requests.Session()
    session.mount("http://", transport)
    client = Client("http://gateway.invalid", "/jobs", session=session)
    assert client.submit(n=1) == "u1"
    keys = [request.headers["Idempotency-Key"] for request in transport.seen]
    assert len(keys) == 3 and len(set(keys)) == 1 and uuid_module.UUID(keys[0])
    assert client.submit(n=1, idempotency_key="nightly-7") == "u2"
    assert transport.seen[-1].headers["Idempotency-Key"] == "nightly-7"
    assert b'"idempotency_key"' not in transport.seen[-1].body  # a header, not a task argument


@pytest.mark.timeout(60)
def test_a_redirect_to_another_origin_is_not_followed(server):
    headers = {"X-Api-Key": "k3y"}
    with Client(server.base, "/elsewhere", headers=headers, auth=("user", "pass")) as client:
        with pytest.raises(RedirectRefused) as caught:
            client.submit(n=1)
        assert caught.value.status == 307 and "another origin" in caught.value.message
        with pytest.raises(RedirectRefused):
            client.status(str(uuid_module.uuid4()))
    assert requests.get(f"{server.base}/recorded", timeout=10).json()["requests"] == []


@pytest.mark.timeout(60)
def test_a_redirect_within_the_origin_is_followed_with_the_body_and_key(server, jobs):
    n = 800_000 + free_port()
    with Client(server.base, "/moved") as moved:
        uuid = moved.submit(n=n)
    assert _tasks_with(jobs, n) == [uuid]
