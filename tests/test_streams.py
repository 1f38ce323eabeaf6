"""Streams cannot hold a worker: the event stream and log follows end at ``MPC_MAX_WAIT`` whether or not
their client reads, each write to a client has a timeout, a client's waiting events are bounded in bytes,
a replay is filtered by tenant in the store and read in bounded pieces, and a process serves
``MPC_MAX_STREAMS`` streams at once (503 beyond)."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid as uuids
from pathlib import Path
from typing import Any, Iterator, Optional

import psutil
import pytest
import requests
from conftest import free_port, wait_until
from flask import Flask
from flask import request as flask_request

from flask_multiprocess_controller import MetaMPTask, MultiprocessController
from flask_multiprocess_controller.http import sse
from flask_multiprocess_controller.store import resolve_store

OWNER = "test-host:1:1.0"


class Idle(MetaMPTask):
    """Never run here: the tests write its tasks' events through the store."""

    def execute(self) -> None:
        return None


class Talker(MetaMPTask):
    """Logs a line of about 1 KiB every few milliseconds until ``gate`` exists."""

    def execute(self, gate: str = "") -> str:
        filler = "t" * 1000
        n = 0
        while not os.path.exists(gate):
            self.logger.warning("line %d %s", n, filler)
            n += 1
            time.sleep(0.002)
        return "done"


def _blocks(text: str) -> list[dict[str, str]]:
    """The SSE blocks of a stream's text, each as its fields."""
    found = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value
        if fields:
            found.append(fields)
    return found


def request_headers() -> Any:
    """The headers of the request being served (a tenant hook reads them)."""
    return flask_request.headers


def _running_task(store: Any, controller: str, tenant: Optional[str] = None) -> str:
    """A task of ``controller`` queued and claimed through the store by :data:`OWNER`; its uuid."""
    uuid = str(uuids.uuid4())
    store.enqueue([{"uuid": uuid, "controller": controller, "status": "queued", "priority": 0, "args": {},
                    "created_at": time.time(), "timeout": None, "attempt": 0, "stop_requested": False,
                    "tenant": tenant}], -1)
    assert store.claim(controller, OWNER, 10)["uuid"] == uuid
    return uuid


def _drain(chunks: Iterator[Any], limit: float, pause: float = 0.0) -> tuple[str, bool]:
    """Read a streamed body until it ends or ``limit`` seconds passed; return the text and whether it ended.

    :param pause: seconds to wait after each piece (a slow reader).
    """
    text = []
    deadline = time.monotonic() + limit
    for chunk in chunks:
        text.append(chunk.decode() if isinstance(chunk, bytes) else chunk)
        if time.monotonic() > deadline:
            return "".join(text), False
        time.sleep(pause)
    return "".join(text), True


# -- with Flask's test client ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_client_that_falls_behind_by_more_than_its_buffer_has_its_stream_ended(make_controller, sqlite_url):
    controller = make_controller(Idle, role="client", store=sqlite_url)
    app = Flask(__name__)
    app.config.update(MPC_MAX_WAIT=30, MPC_STREAM_BUFFER=64 * 1024)
    MultiprocessController(app)
    response = app.test_client().get("/mpc/events")
    chunks = iter(response.response)
    try:
        assert next(chunks).startswith(b"retry:")  # subscribed: live events are queued for this client
        uuid = _running_task(controller.store, controller.name)
        for i in range(40):  # 40 events of 10 KB while the client reads nothing
            controller.store.progress(uuid, OWNER, {"step": i, "filler": "p" * 10_000}, i)
        hub = sse.broadcaster_for(controller.store)
        # Every event was handed to the client's queue.
        wait_until(lambda: hub.cursor == controller.store.latest_cursor(), timeout=10)
        text, ended = _drain(chunks, limit=15)
        assert ended, "the stream went on after its client fell behind"
        # It ends without sending what was dropped: the client resumes from the store with Last-Event-ID.
        assert not [b for b in _blocks(text) if b.get("event") == "progress"]
    finally:
        response.close()
    assert sse.stream_slots(app).taken == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_replay_is_filtered_by_tenant_in_the_store_and_read_in_pieces_of_the_buffer(make_controller, kind,
                                                                                      request: Any):
    budget = 8 * 1024
    url = request.getfixturevalue(f"{kind}_url")
    controller = make_controller(Idle, role="client", store=url,
                                 tenant=lambda: request_headers().get("X-Tenant"))
    app = Flask(__name__)
    app.config.update(MPC_MAX_WAIT=1, MPC_STREAM_BUFFER=budget)
    MultiprocessController(app)
    store = controller.store
    since = store.latest_cursor()
    mine, theirs = _running_task(store, controller.name, "a"), _running_task(store, controller.name, "b")
    for i in range(20):
        store.progress(mine, OWNER, {"step": i, "filler": "a" * 2000}, i)
        store.progress(theirs, OWNER, {"step": i, "filler": "b" * 2000}, i)
    last = store.latest_cursor()  # the newest event is one of tenant b's
    reads: list[tuple[dict[str, Any], int]] = []
    real_changes = store.changes

    def changes(*args: Any, **kwargs: Any) -> Any:
        found = real_changes(*args, **kwargs)
        reads.append((kwargs, sum(len(json.dumps(e, default=str)) for e in found.events)))
        return found

    store.changes = changes
    try:
        response = app.test_client().get("/mpc/events", headers={"Last-Event-ID": since, "X-Tenant": "a"})
        text = response.get_data(as_text=True)
        response.close()
    finally:
        del store.changes
    blocks = _blocks(text)
    events = [b for b in blocks if "event" in b]
    assert {json.loads(b["data"])["uuid"] for b in events} == {mine}
    steps = [json.loads(b["data"])["progress"]["step"] for b in events if b["event"] == "progress"]
    assert steps == list(range(20))
    replays = [(kwargs, size) for kwargs, size in reads if kwargs.get("max_bytes") == budget]
    assert replays and all(kwargs.get("tenant") == "a" for kwargs, _ in replays), reads
    assert len(replays) > 1, "the replay was read in one piece, past its byte bound"
    assert all(size <= 2 * budget for _, size in replays), replays
    # The last piece went past tenant b's last events: the client resumes after them.
    assert [b["id"] for b in blocks if "id" in b][-1] == last


def test_a_replay_that_meets_the_live_events_hands_over_to_them_without_a_gap_or_a_repeat():
    store = resolve_store("memory://")
    since = store.latest_cursor()
    uuid = _running_task(store, "C")
    for i in range(6):
        store.progress(uuid, OWNER, i, None)
    events = store.changes(since, limit=100).events
    progress = [e for e in events if e["kind"] == "progress"]
    mine = sse.ClientQueue(budget=10_000)
    for event in progress[3:]:  # the feed reader queued the newest ones already
        mine.put(event, 100)
    replayed: set[str] = set()

    def view(controller: Any, event: Any) -> dict:
        return {"kind": event["kind"], "progress": event["task"]["progress"]}

    deadline = time.monotonic() + 30
    sent = list(sse._replay(store, mine, since, deadline, sse.ANY_TENANT, replayed, {"C": object()}, view))
    live = []
    while (item := mine.get(0)) is not sse.EMPTY:
        if item["cursor"] not in replayed:  # as the stream's live loop does: it leaves out what the replay sent
            live.append(item["task"]["progress"])
    shown = [json.loads(b["data"]) for b in _blocks("".join(sent)) if "data" in b]
    assert [d["progress"] for d in shown if d["kind"] == "progress"] + live == list(range(6))
    store.close()


@pytest.mark.timeout(60)
def test_streams_beyond_max_streams_are_refused_with_503(make_controller, sqlite_url):
    controller = make_controller(Idle, role="client", store=sqlite_url)
    app = Flask(__name__)
    app.config.update(MPC_MAX_WAIT=30, MPC_MAX_STREAMS=2)
    MultiprocessController(app)
    client = app.test_client()
    uuid = _running_task(controller.store, controller.name)
    first = client.get("/mpc/events")
    second = client.get(f"/mpc/api/tasks/{uuid}/logs?follow=1")  # a log follow counts as a stream too
    try:
        assert first.status_code == second.status_code == 200
        refused = client.get("/mpc/events")
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert "MPC_MAX_STREAMS" in refused.get_json()["message"]
        assert client.get(f"/mpc/api/tasks/{uuid}/logs?follow=1").status_code == 503
        assert client.get(f"/mpc/api/tasks/{uuid}/logs").status_code == 200  # a plain read is no stream
    finally:
        second.close()
    again = client.get("/mpc/events")
    assert again.status_code == 200
    again.close()
    first.close()
    assert sse.stream_slots(app).taken == 0
    bad = Flask(__name__)
    bad.config["MPC_MAX_STREAMS"] = 0
    with pytest.raises(ValueError, match="MPC_MAX_STREAMS"):
        MultiprocessController(bad)


@pytest.mark.timeout(60)
def test_max_streams_may_come_from_the_environment(make_controller, sqlite_url, monkeypatch):
    make_controller(Idle, role="client", store=sqlite_url)
    monkeypatch.setenv("MPC_MAX_STREAMS", "1")
    app = Flask(__name__)
    app.config["MPC_MAX_WAIT"] = 30
    MultiprocessController(app)
    client = app.test_client()
    first = client.get("/mpc/events")
    try:
        assert first.status_code == 200
        assert client.get("/mpc/events").status_code == 503
    finally:
        first.close()


@pytest.mark.timeout(60)
def test_a_log_follow_ends_at_max_wait_while_the_task_keeps_logging(make_controller, tmp_path):
    controller = make_controller(Talker)
    app = Flask(__name__)
    app.config["MPC_MAX_WAIT"] = 1
    MultiprocessController(app)
    gate = tmp_path / "gate"
    uuid = controller.submit(gate=str(gate))
    try:
        wait_until(lambda: len(controller.store.logs.read(uuid)) > 10, timeout=20)
        response = app.test_client().get(f"/mpc/api/tasks/{uuid}/logs?follow=1")
        # A reader slower than the task's logging: every read of the log finds new lines.
        text, ended = _drain(iter(response.response), limit=15, pause=0.02)
        response.close()
        assert ended, "the log follow went on past MPC_MAX_WAIT"
        blocks = _blocks(text)
        assert [b for b in blocks if b.get("event") == "line"], "lines were followed"
        assert not [b for b in blocks if b.get("event") == "end"]
        assert controller.status(uuid)["status"] == "running"
    finally:
        gate.touch()
    assert controller.wait(uuid, timeout=20)["status"] == "succeeded"


# -- with real servers ----------------------------------------------------------------------------------

STREAMS_APP = '''
import os
import time

from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController


class Bulky(MetaMPTask):
    """Waits for ``gate``, then returns ``size`` bytes."""

    def execute(self, size: int = 0, gate: str = "") -> str:
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.01)
        return "r" * size


class Talker(MetaMPTask):
    """Logs a line of about 1 KiB every few milliseconds until ``gate`` exists."""

    def execute(self, gate: str = "") -> str:
        filler = "t" * 1000
        n = 0
        while not os.path.exists(gate):
            self.logger.warning("line %d %s", n, filler)
            n += 1
            time.sleep(0.002)
        return "done"


mpc = MultiprocessController()
bulky = MetaMPController(Bulky, max_num_process=2, max_num_queue=-1, stop_grace=0.5)
talker = MetaMPController(Talker, max_num_process=1, max_num_queue=-1, stop_grace=0.5)
app = Flask(__name__)
app.config["MPC_MAX_WAIT"] = float(os.environ["MAX_WAIT"])
app.config["MPC_MAX_STREAMS"] = int(os.environ.get("MAX_STREAMS", "32"))
api = Api(app)
api.add_resource(MetaMPResource, "/bulky", "/bulky/<string:uuid>", resource_class_args=(bulky,),
                 endpoint="bulky")
api.add_resource(MetaMPResource, "/talker", "/talker/<string:uuid>", resource_class_args=(talker,),
                 endpoint="talker")
mpc.init_app(app)


@app.after_request
def name_the_worker(response):
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
'''


def _silent_client(port: int, path: str) -> socket.socket:
    """A connection that asks for ``path`` and then reads nothing (its receive buffer kept small)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    sock.settimeout(20)
    assert sock.recv(1, socket.MSG_PEEK), "the server answered nothing"  # the stream began (nothing is read)
    return sock


def _serves(proc: psutil.Process, client: socket.socket) -> bool:
    """Whether ``proc`` still holds its end of the connection of ``client``."""
    port = client.getsockname()[1]
    try:
        return any(c.raddr and c.raddr.port == port for c in proc.net_connections(kind="tcp"))
    except psutil.Error:
        return False


class PeakRss(threading.Thread):
    """The highest RSS of a process, sampled every few milliseconds until stopped."""

    def __init__(self, proc: psutil.Process) -> None:
        super().__init__(name="peak-rss", daemon=True)
        self.proc = proc
        self.first = proc.memory_info().rss
        self.peak = self.first
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.02):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def _start(pool: Any, tmp_path: Path, command: list[str], port: int, env: dict[str, str]) -> Any:
    (tmp_path / "streams_app.py").write_text(STREAMS_APP)
    return pool.start(command, cwd=tmp_path, port=port, log_path=tmp_path / "server.log",
                      env={**env, "PORT": str(port)}, ready_path="/mpc/health")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_an_event_stream_client_that_never_reads_does_not_hold_a_gunicorn_worker(tmp_path, pool, sqlite_url,
                                                                                 worker_class):
    from serverproc import gunicorn, gunicorn_workers

    port = free_port()
    threads = ["--threads", "2"] if worker_class == "gthread" else []  # (sync with threads would be gthread)
    server = _start(pool, tmp_path, gunicorn("-w", "1", "-k", worker_class, *threads, "--timeout", "8",
                                             "-b", f"127.0.0.1:{port}", "streams_app:app"),
                    port, {"MPC_STORE_URL": sqlite_url, "MAX_WAIT": "3"})
    worker = gunicorn_workers(server)[0]
    gate = tmp_path / "gate"
    tasks = [requests.post(f"{server.base}/bulky", json={"size": 500_000, "gate": str(gate)}, timeout=30)
             for _ in range(120)]
    assert {t.status_code for t in tasks} == {202}
    store = resolve_store(sqlite_url)
    silent = _silent_client(port, "/mpc/events")
    sampler = PeakRss(worker)
    sampler.start()
    try:
        try:
            gate.touch()  # 60 MB of task ends go out on the stream nobody reads
            wait_until(lambda: store.counts("Bulky").get("succeeded", 0) == 120, timeout=90, interval=0.2)
            health = requests.get(f"{server.base}/mpc/health", timeout=30)
        finally:
            sampler.stop()
        assert health.status_code == 200
        assert health.headers["X-Worker-Pid"] == str(worker.pid), "the worker was replaced"
        assert "WORKER TIMEOUT" not in server.log()
        # The stream ends (its connection dropped by the server) although its client never read a byte.
        wait_until(lambda: not _serves(worker, silent), timeout=15, interval=0.1)
        # Without a stream, the worker grows by about 12 to 27 MiB in this run (the tasks' results pass through
        # it, two at a time, whatever their number); a stream that queued every event for its silent client
        # grew it by about 40 MiB for half as many tasks, so by some 70 for these.
        grown = (sampler.peak - sampler.first) / 2**20
        assert grown < 45, f"the worker's RSS grew by {grown:.0f} MiB for a client that reads nothing"
    finally:
        silent.close()
        store.close()


@pytest.mark.timeout(120)
def test_a_log_follow_that_is_not_read_ends_and_frees_its_stream_place_on_the_dev_server(
        tmp_path, pool, sqlite_url):
    from serverproc import python

    port = free_port()
    server = _start(pool, tmp_path, python(str(tmp_path / "streams_app.py")), port,
                    {"MPC_STORE_URL": sqlite_url, "MAX_WAIT": "2", "MAX_STREAMS": "1"})
    gate = tmp_path / "gate"
    uuid = requests.post(f"{server.base}/talker", json={"gate": str(gate)}, timeout=30).json()["uuid"]
    follow = f"/mpc/api/tasks/{uuid}/logs?follow=1"
    try:
        logs = f"{server.base}/mpc/api/tasks/{uuid}/logs"
        wait_until(lambda: requests.get(logs, timeout=30).json()["lines"], timeout=20)
        with _silent_client(port, follow) as silent:
            # The silent client holds the one stream place: a second stream is refused.
            refused = requests.get(f"{server.base}{follow}", timeout=30)
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "1" and "MPC_MAX_STREAMS" in refused.json()["message"]
            # It ends by itself although its client reads nothing, and gives its place back.
            wait_until(lambda: not _serves(server.root, silent), timeout=30, interval=0.1)
        reader = wait_until(lambda: (lambda r: r if r.status_code == 200 else r.close())(
            requests.get(f"{server.base}{follow}", stream=True, timeout=30)), timeout=10)
        text, ended = _drain(reader.iter_content(chunk_size=None), limit=20)
        reader.close()
        assert ended, "the log follow went on past MPC_MAX_WAIT"
        assert [b for b in _blocks(text) if b.get("event") == "line"]
        assert not [b for b in _blocks(text) if b.get("event") == "end"]
        assert requests.get(f"{server.base}/talker/{uuid}", timeout=30).json()["status"] == "running"
    finally:
        gate.touch()
