"""Many serving processes on one store: the job app under ``gunicorn -w 4``, on SQLite and on Redis (and on
PostgreSQL the tests marked :data:`ON_POSTGRES_TOO`).

Any worker answers for any task; the controller's limits are global across the workers; a DELETE
reaching a worker that does not run the task still stops it; a worker killed with SIGKILL has its
tasks settled (``lost``, or run again when restartable) and leaves no task process behind; a whole
server killed with SIGKILL loses no queued task; SIGTERM records the running tasks and keeps the queue.

The tree under gunicorn is master -> worker -> fork server -> task process. A task is placed on a
chosen worker by freezing (SIGSTOP) the other, idle, workers while it is posted and claimed.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from flask_multiprocess_controller import defaults
from flask_multiprocess_controller.store import resolve_store

from serverproc import (JobApi, Server, ServerPool, TaskProcessSampler, fork_servers, free_port, gunicorn,
                        gunicorn_workers, poll_until, process_gone, statuses, suspended, worker_of,
                        write_job_app)
from serverproc import unexpected_tracebacks

pytestmark = pytest.mark.slow

WORKERS = 4
HTTP_TIMEOUT = 30.0
#: Seconds a server's whole tree gets to end after SIGTERM.
STOP_DEADLINE = 30.0
#: Seconds the task processes of a killed serving process get to disappear.
ORPHAN_DEADLINE = 10.0
#: The app's lease, and the deadline for settling a dead worker's tasks: lease + reconcile + margin.
LEASE = 3.0
SETTLE_DEADLINE = LEASE + defaults.RECONCILE_INTERVAL + 5.0


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path) -> str:
    """The store every worker shares, handed to the server in MPC_STORE_URL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store/tasks.sqlite3"
    return request.getfixturevalue(f"{request.param}_url")


#: The tests that run on PostgreSQL too (the others' time is spared: what they check there is the store's
#: own, which the store contract covers, or is checked on PostgreSQL by test_hosts.py).
ON_POSTGRES_TOO = pytest.mark.parametrize("store_url", ["sqlite", "redis", "postgres"], indirect=True)


class Cluster:
    """The job app under gunicorn -w 4 on one store; it can be started again on the same store."""

    def __init__(self, tmp_path: Path, pool: ServerPool, store_url: str, **config: object) -> None:
        write_job_app(tmp_path)
        self.tmp_path = tmp_path
        self.pool = pool
        self.store_url = store_url
        self.config = {"stop_grace": 0.5, "lease": LEASE, **config}
        self.gates = tmp_path / "gates"
        self.gates.mkdir(exist_ok=True)
        self.starts = 0
        self.server: Server
        self.api: JobApi

    def start(self) -> Server:
        self.starts += 1
        port = free_port()
        self.server = self.pool.start(
            gunicorn("-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "--chdir", str(self.tmp_path), "app:app"),
            cwd=self.tmp_path, port=port, log_path=self.tmp_path / f"gunicorn-{self.starts}.log",
            env={"MPC_STORE_URL": self.store_url, "APP_CONFIG": json.dumps(self.config)}, ready_path="/tasks")
        self.api = JobApi(self.server.base, HTTP_TIMEOUT, log=self.server.log)
        # Every worker has imported the app, so its controller has forked its fork server.
        poll_until(lambda: len(fork_servers(self.server)), lambda n: n == WORKERS, 60, interval=0.1)
        self.server.remember()
        return self.server

    def workers(self) -> list[psutil.Process]:
        workers = gunicorn_workers(self.server)
        assert len(workers) == WORKERS, workers
        return workers

    def only_awake(self, worker: psutil.Process):
        """Freeze every other worker (they must be idle), so that ``worker`` answers and claims."""
        return suspended([w for w in self.workers() if w.pid != worker.pid])

    def gate(self, name: str) -> str:
        return str(self.gates / name)

    def open_gate(self, name: str) -> None:
        (self.gates / name).touch()

    def read_store(self, uuids: list[str]) -> dict[str, dict]:
        """Rows read straight from the store (while no server runs)."""
        store = resolve_store(self.store_url)
        try:
            return {uuid: store.get(uuid) for uuid in uuids}
        finally:
            store.close()

    def stop(self) -> None:
        survivors = self.server.stop(signal.SIGTERM, timeout=STOP_DEADLINE)
        assert survivors == [], f"left {STOP_DEADLINE} s after SIGTERM to gunicorn: {survivors}\n{self.server.log()}"
        assert not unexpected_tracebacks(self.server.log()), self.server.log()


def _assert_succeeded(task: dict, n: int, attempt: int = 1) -> None:
    assert task["status"] == "succeeded", task
    assert task["result"]["n"] == n and task["args"]["n"] == n, task
    assert task["attempt"] == attempt, task


# -- load: a thousand tasks (300 on PostgreSQL) from eight client threads over four workers ---------

TASKS = 1000
#: Tasks on PostgreSQL: the same checks in a third of the time.
POSTGRES_TASKS = 300
THREADS = 8
MAX_PROCESSES = 2


@pytest.mark.timeout(300)
@ON_POSTGRES_TOO
def test_many_tasks_over_four_workers_run_once_each_within_the_global_limit(store_url, tmp_path, pool):
    tasks = POSTGRES_TASKS if store_url.startswith("postgresql:") else TASKS
    cluster = Cluster(tmp_path, pool, store_url, max_num_process=MAX_PROCESSES)
    server = cluster.start()
    api = cluster.api
    ran = tmp_path / "ran.txt"
    posted: dict[int, tuple[str, str]] = {}  # n -> (uuid, pid of the worker that answered)
    got: dict[int, tuple[int, dict, str]] = {}  # n -> (HTTP status, task, worker pid)
    failures: list = []
    lock = threading.Lock()

    def submit(numbers: range) -> None:
        try:
            with requests.Session() as session:
                for n in numbers:
                    response = api.post(session, n=n, append=str(ran))
                    if response.status_code != 202:
                        failures.append((n, response.status_code, response.text))
                        continue
                    with lock:
                        posted[n] = (response.json()["uuid"], response.headers["X-Worker-Pid"])
        except BaseException as exc:  # reported by the test
            failures.append((None, "exception", repr(exc)))

    def fetch(numbers: list[int]) -> None:
        try:
            with requests.Session() as session:
                for n in numbers:
                    response = session.get(f"{api.url}/{posted[n][0]}", timeout=HTTP_TIMEOUT)
                    with lock:
                        got[n] = (response.status_code, response.json(), response.headers["X-Worker-Pid"])
        except BaseException as exc:  # reported by the test
            failures.append((None, "exception", repr(exc)))

    def run_threads(target, chunks) -> None:
        threads = [threading.Thread(target=target, args=(chunk,), name=f"client-{i}") for i, chunk in enumerate(chunks)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(150)
        assert not any(t.is_alive() for t in threads), "client threads did not finish within 150 s"

    with TaskProcessSampler([server]) as sampler:
        started = time.monotonic()
        run_threads(submit, [range(i, tasks, THREADS) for i in range(THREADS)])
        submitted = time.monotonic()
        assert failures == []
        api.wait_idle(240)
        finished = time.monotonic()

    assert sampler.error is None, sampler.error
    assert sampler.samples > 10
    assert 1 <= sampler.most <= MAX_PROCESSES, \
        f"{sampler.most} task processes alive at once across {WORKERS} workers (limit {MAX_PROCESSES})"
    assert sorted(posted) == list(range(tasks))
    assert len({uuid for uuid, _ in posted.values()}) == tasks
    post_workers = {worker for _, worker in posted.values()}
    assert len(post_workers) >= 2, f"every POST was answered by one worker: {post_workers}"

    # Every task is readable from whichever worker answers.
    run_threads(fetch, [list(range(i, tasks, THREADS)) for i in range(THREADS)])
    assert failures == []
    bad = {n: (code, task.get("status")) for n, (code, task, _) in got.items() if code != 200}
    assert bad == {}
    for n in range(tasks):
        _assert_succeeded(got[n][1], n)
        assert got[n][1]["uuid"] == posted[n][0]
    get_workers = {worker for _, _, worker in got.values()}
    assert len(get_workers) >= 2, f"every GET was answered by one worker: {get_workers}"

    # Each task ran exactly once (one line per run), in a process of its own.
    lines = ran.read_text().split()
    assert len(lines) == tasks, f"{len(lines)} runs recorded for {tasks} tasks"
    assert sorted(int(line) for line in lines) == list(range(tasks))
    assert len({got[n][1]["result"]["pid"] for n in range(tasks)}) > MAX_PROCESSES
    listing = api.listing(limit=1000)
    assert (listing["running"], listing["queued"]) == (0, 0)
    assert len(listing["tasks"]) == tasks and statuses(listing["tasks"]) == {"succeeded": tasks}

    print(f"\n[multiworker {store_url.split(':')[0]}] {tasks} tasks from {THREADS} threads over {WORKERS} workers "
          f"(max_num_process={MAX_PROCESSES}, a fresh process each): posted in {submitted - started:.1f} s, "
          f"all done in {finished - started:.1f} s = {tasks / (finished - started):.0f} tasks/s; "
          f"POSTs answered by {len(post_workers)} workers, GETs by {len(get_workers)}; at most {sampler.most} "
          f"task processes in {sampler.samples} samples")
    cluster.stop()


# -- the queue bound ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_the_queue_bound_holds_across_workers(store_url, tmp_path, pool):
    cluster = Cluster(tmp_path, pool, store_url, max_num_process=1, max_num_queue=5)
    cluster.start()
    api = cluster.api
    gate = cluster.gate("g")
    blocker = api.submit(n=0, gate=gate)["uuid"]
    api.wait_running(blocker)

    # Twenty POSTs at once, each on a connection of its own, so that the workers answer them together.
    # Each holds its worker 0.2 s before it is handled: a gunicorn worker accepts again at once after a
    # quick answer, and alone could drain all twenty before the others wake.
    responses: list = [None] * 20
    barrier = threading.Barrier(len(responses))

    def post(i: int) -> None:
        try:
            barrier.wait(10)
            responses[i] = api.post(n=i + 1, gate=gate, hold=0.2)
        except BaseException as exc:  # reported below
            responses[i] = exc

    threads = [threading.Thread(target=post, args=(i,), name=f"poster-{i}") for i in range(len(responses))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    assert all(isinstance(r, requests.Response) for r in responses), responses
    codes = sorted(r.status_code for r in responses)
    assert codes == [202] * 5 + [429] * 15, codes
    for response in responses:
        if response.status_code == 429:
            assert response.headers.get("Retry-After") == str(defaults.RETRY_AFTER), response.headers
            assert response.json()["message"], response.text
    answered_by = {r.headers["X-Worker-Pid"] for r in responses}
    assert len(answered_by) >= 2, f"all 20 POSTs were answered by one worker: {answered_by}"

    listing = api.listing()
    assert (listing["running"], listing["queued"]) == (1, 5), listing
    assert len(listing["tasks"]) == 6  # a rejected POST leaves nothing behind
    accepted = [r.json()["uuid"] for r in responses if r.status_code == 202]
    cluster.open_gate("g")
    for uuid in [blocker, *accepted]:
        assert api.wait_ended(uuid)["status"] == "succeeded"
    cluster.stop()


# -- DELETE through a worker that does not run the task --------------------------------------------

ROUNDS = 20


@pytest.mark.timeout(180)
def test_delete_through_another_worker_stops_the_task_where_it_runs(store_url, tmp_path, pool):
    cluster = Cluster(tmp_path, pool, store_url, max_num_process=2)
    server = cluster.start()
    api = cluster.api
    never = cluster.gate("never")
    uuids = [api.submit(n=n, gate=never)["uuid"] for n in range(ROUNDS)]
    stopped: list[str] = []
    owners: set[int] = set()
    for _ in range(ROUNDS):
        running = poll_until(lambda: [t for t in api.listing(status="running")["tasks"] if t["pid"]], bool, 20)
        task = running[-1]  # the oldest running
        process = psutil.Process(task["pid"])
        owner = worker_of(server, task["pid"])
        owners.add(owner.pid)
        # The owner is frozen, so another worker must answer the DELETE.
        with suspended([owner]):
            response = api.delete(task["uuid"])
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "stopping", response.text
        assert int(response.headers["X-Worker-Pid"]) != owner.pid
        ended = api.wait_ended(task["uuid"], timeout=15)
        assert ended["status"] == "stopped", ended
        assert ended["result"] is None
        poll_until(lambda: process_gone(process), bool, ORPHAN_DEADLINE)
        stopped.append(task["uuid"])

    assert sorted(stopped) == sorted(uuids)
    listing = api.listing()
    assert (listing["running"], listing["queued"]) == (0, 0), listing
    assert statuses(listing["tasks"]) == {"stopped": ROUNDS}
    print(f"\n[multiworker {store_url.split(':')[0]}] {ROUNDS} tasks on {len(owners)} workers stopped "
          "through other workers")
    cluster.stop()


# -- a worker killed with SIGKILL -------------------------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("restartable", [False, True], ids=["not-restartable", "restartable"])
def test_a_worker_killed_while_it_runs_tasks(restartable, store_url, tmp_path, pool):
    cluster = Cluster(tmp_path, pool, store_url, max_num_process=3, restartable=restartable)
    server = cluster.start()
    api = cluster.api
    gate = cluster.gate("g")
    doomed_worker, other_worker = cluster.workers()[:2]
    with cluster.only_awake(doomed_worker):
        doomed = [api.submit(n=n, gate=gate)["uuid"] for n in (1, 2)]
        doomed_tasks = [api.wait_running(uuid) for uuid in doomed]
    with cluster.only_awake(other_worker):
        spared = api.submit(n=3, gate=gate)["uuid"]
        spared_task = api.wait_running(spared)
    for task in doomed_tasks:
        assert worker_of(server, task["pid"]).pid == doomed_worker.pid
    assert worker_of(server, spared_task["pid"]).pid == other_worker.pid
    queued = {n: api.submit(n=n, gate=gate)["uuid"] for n in (4, 5)}  # the limit (3) is reached
    assert {api.get(uuid)["status"] for uuid in queued.values()} == {"queued"}
    doomed_procs = [psutil.Process(task["pid"]) for task in doomed_tasks]
    doomed_fork_server = doomed_procs[0].parent()
    spared_proc = psutil.Process(spared_task["pid"])
    server.remember()

    doomed_worker.kill()
    # Its fork server sees the worker's end of the socket close and kills its task processes.
    poll_until(lambda: [p.pid for p in (*doomed_procs, doomed_fork_server) if not process_gone(p)],
               lambda left: left == [], ORPHAN_DEADLINE)

    # The surviving workers (or the replacement gunicorn starts) settle its tasks within the lease.
    if restartable:
        def settled(task: dict) -> bool:  # queued again, and claimed again by a live worker
            return task["status"] == "running" and task["attempt"] == 2 and task["pid"]
    else:
        def settled(task: dict) -> bool:
            return task["status"] == "lost"
    tasks = poll_until(lambda: [api.get(uuid) for uuid in doomed], lambda ts: all(settled(t) for t in ts),
                       SETTLE_DEADLINE)
    for task, old in zip(tasks, doomed_tasks):
        if restartable:
            assert task["pid"] != old["pid"] and task["error"] is None, task
        else:
            assert task["error"]["type"] == "Lost" and "died" in task["error"]["message"], task
            assert task["result"] is None

    # The task on the other worker was not touched.
    still = api.get(spared)
    assert (still["status"], still["pid"], still["attempt"]) == ("running", spared_task["pid"], 1), still
    assert not process_gone(spared_proc)

    cluster.open_gate("g")
    finished = api.wait_ended(spared)
    _assert_succeeded(finished, 3)
    assert finished["result"]["pid"] == spared_task["pid"]
    for n, uuid in queued.items():
        _assert_succeeded(api.wait_ended(uuid), n)
    for n, uuid in zip((1, 2), doomed):
        task = api.wait_ended(uuid)
        if restartable:
            _assert_succeeded(task, n, attempt=2)
        else:
            assert task["status"] == "lost", task
    cluster.stop()


# -- the whole server killed with SIGKILL, then started again ----------------------------------------


@pytest.mark.timeout(150)
@ON_POSTGRES_TOO
def test_the_whole_server_killed_loses_no_queued_task(store_url, tmp_path, pool):
    cluster = Cluster(tmp_path, pool, store_url, max_num_process=2)
    server = cluster.start()
    api = cluster.api
    gate = cluster.gate("g")
    cut = {n: api.submit(n=n, gate=gate)["uuid"] for n in (100, 101)}
    cut_tasks = [api.wait_running(uuid) for uuid in cut.values()]
    queued = {n: api.submit(n=n)["uuid"] for n in range(20)}
    listing = api.listing()
    assert (listing["running"], listing["queued"]) == (2, 20), listing
    server.remember()
    assert all(task["pid"] in server.seen for task in cut_tasks)

    server.send(signal.SIGKILL, group=True)  # master and workers; no cleanup code runs in them
    orphans = server.wait_gone(ORPHAN_DEADLINE)
    assert orphans == [], f"orphans {ORPHAN_DEADLINE} s after the server was killed: {orphans}"

    cluster.start()
    api = cluster.api
    api.wait_idle(60)
    for n, uuid in queued.items():
        _assert_succeeded(api.get(uuid), n)
    for n, uuid in cut.items():
        task = api.get(uuid)
        assert task["status"] == "lost" and task["error"]["type"] == "Lost", task
    assert statuses(api.listing()["tasks"]) == {"succeeded": 20, "lost": 2}
    cluster.stop()


# -- SIGTERM: graceful shutdown of every worker ----------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("restartable", [False, True], ids=["not-restartable", "restartable"])
def test_sigterm_records_running_tasks_on_every_worker_and_keeps_the_queue(restartable, store_url, tmp_path,
                                                                           pool):
    cluster = Cluster(tmp_path, pool, store_url, max_num_process=2, restartable=restartable)
    server = cluster.start()
    api = cluster.api
    gate = cluster.gate("g")
    first, second = cluster.workers()[:2]
    cut: dict[int, str] = {}
    for n, worker in ((1, first), (2, second)):
        with cluster.only_awake(worker):
            cut[n] = api.submit(n=n, gate=gate)["uuid"]
            assert worker_of(server, api.wait_running(cut[n])["pid"]).pid == worker.pid
    queued = {n: api.submit(n=n, gate=gate)["uuid"] for n in (3, 4, 5)}

    cluster.stop()  # SIGTERM to the master; the whole tree must be gone, with no traceback
    rows = cluster.read_store([*cut.values(), *queued.values()])
    for uuid in cut.values():
        row = rows[uuid]
        if restartable:
            assert row["status"] == "queued" and row["error"] is None, row
        else:
            assert row["status"] == "stopped" and row["error"]["type"] == "Shutdown", row
    for uuid in queued.values():
        assert rows[uuid]["status"] == "queued", rows[uuid]

    cluster.open_gate("g")
    cluster.start()
    api = cluster.api
    api.wait_idle(60)
    for n, uuid in queued.items():
        _assert_succeeded(api.get(uuid), n)
    for n, uuid in cut.items():
        task = api.get(uuid)
        if restartable:
            # Run again from the beginning (a worker still shutting down may have claimed it once more
            # before it, too, closed: then it was queued again, and counted one more attempt).
            assert task["attempt"] >= 2, task
            _assert_succeeded(task, n, attempt=task["attempt"])
        else:
            assert task["status"] == "stopped", task
    cluster.stop()
