"""Two "hosts" sharing one store (Redis, PostgreSQL): two servers (gunicorn -w 1 each) with
``MPC_HOST_ID=host-a`` and ``host-b``, the same controller (max_num_process=2, global), lease 3 s.

A task posted to one host is read and stopped through the other (the stop reaches the host that runs
it); the process limit holds across both hosts; when a host dies (SIGKILL to its process group) the
other host settles its tasks after the lease, since a pid on another host cannot be checked, and runs
the tasks that were queued through the dead host.

A task is placed on a chosen host by freezing (SIGSTOP) the other host's worker, which must be idle,
while the task is posted and claimed.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest

from flask_multiprocess_controller import defaults
from flask_multiprocess_controller.store import resolve_store

from serverproc import (JobApi, Server, ServerPool, TaskProcessSampler, fork_servers, free_port, gunicorn,
                        gunicorn_workers, poll_until, process_gone, statuses, suspended, task_processes,
                        write_job_app)
from serverproc import unexpected_tracebacks

pytestmark = pytest.mark.slow

HTTP_TIMEOUT = 30.0
STOP_DEADLINE = 30.0
ORPHAN_DEADLINE = 10.0
LEASE = 3.0
#: Seconds the live host gets to settle a dead host's tasks: lease + reconcile interval + margin.
SETTLE_DEADLINE = 15.0
assert SETTLE_DEADLINE >= LEASE + defaults.RECONCILE_INTERVAL + defaults.HEARTBEAT_INTERVAL + 5


@pytest.fixture(params=["redis"])
def store_url(request) -> str:
    """The store both hosts share."""
    return request.getfixturevalue(f"{request.param}_url")


#: The tests that run on PostgreSQL too (a frozen host's stale copy is given up when its writes are refused:
#: the store contract checks that PostgreSQL fences writes by owner).
ON_POSTGRES_TOO = pytest.mark.parametrize("store_url", ["redis", "postgres"], indirect=True)


class Hosts:
    """The job app served as two hosts on one store."""

    def __init__(self, tmp_path: Path, pool: ServerPool, store_url: str, **config: object) -> None:
        write_job_app(tmp_path)
        self.tmp_path = tmp_path
        self.pool = pool
        self.store_url = store_url
        self.config = {"max_num_process": 2, "stop_grace": 0.5, "lease": LEASE, **config}
        self.gates = tmp_path / "gates"
        self.gates.mkdir(exist_ok=True)

    def start(self, host_id: str) -> tuple[Server, JobApi]:
        port = free_port()
        server = self.pool.start(
            gunicorn("-w", "1", "-b", f"127.0.0.1:{port}", "--chdir", str(self.tmp_path), "app:app"),
            cwd=self.tmp_path, port=port, log_path=self.tmp_path / f"{host_id}.log",
            env={"MPC_STORE_URL": self.store_url, "MPC_HOST_ID": host_id, "APP_CONFIG": json.dumps(self.config)},
            ready_path="/tasks")
        poll_until(lambda: len(fork_servers(server)), lambda n: n == 1, 60, interval=0.1)
        server.remember()
        return server, JobApi(server.base, HTTP_TIMEOUT, log=server.log)

    def gate(self, name: str) -> str:
        return str(self.gates / name)

    def open_gate(self, name: str) -> None:
        (self.gates / name).touch()


def _stop(server: Server) -> None:
    survivors = server.stop(signal.SIGTERM, timeout=STOP_DEADLINE)
    assert survivors == [], f"left {STOP_DEADLINE} s after SIGTERM: {survivors}\n{server.log()}"
    assert not unexpected_tracebacks(server.log()), server.log()


def _wait_for_beats_after(store_url: str, seconds: float, hosts: tuple[str, ...]) -> None:
    """Wait until a serving process of each of ``hosts`` has heartbeaten ``seconds`` after now (store time)."""
    store = resolve_store(store_url)
    try:
        after = store.now() + seconds

        def beaten(beats: dict[str, float]) -> bool:
            return {owner.split(":")[0] for owner, beat in beats.items() if beat >= after} >= set(hosts)

        poll_until(store.heartbeats, beaten, seconds + 10 * defaults.HEARTBEAT_INTERVAL)
    finally:
        store.close()


def _worker_pid(server: Server) -> int:
    (worker,) = gunicorn_workers(server)
    return worker.pid


@pytest.mark.timeout(120)
@ON_POSTGRES_TOO
def test_tasks_are_read_and_stopped_through_the_other_host_and_the_limit_is_global(store_url, tmp_path, pool):
    hosts = Hosts(tmp_path, pool, store_url)
    a, api_a = hosts.start("host-a")
    b, api_b = hosts.start("host-b")
    never = hosts.gate("never")

    # A task that runs on one host is read and stopped through the other, both ways round.
    for runner, api_run, other, api_other, n in ((a, api_a, b, api_b, 1), (b, api_b, a, api_a, 2)):
        with suspended(gunicorn_workers(other)):  # the other host is idle: only the runner can claim
            uuid = api_run.submit(n=n, gate=never)["uuid"]
            task = api_run.wait_running(uuid)
        assert task["pid"] in task_processes(runner), "the task does not run on the host it was posted to"
        process = psutil.Process(task["pid"])
        seen = api_other.get(uuid)
        assert (seen["status"], seen["pid"], seen["args"]["n"]) == ("running", task["pid"], n), seen
        response = api_other.delete(uuid)
        assert response.status_code == 202 and response.json()["status"] == "stopping", response.text
        assert int(response.headers["X-Worker-Pid"]) == _worker_pid(other)
        ended = api_run.wait_ended(uuid, timeout=15)
        assert ended["status"] == "stopped" and ended["result"] is None, ended
        poll_until(lambda: process_gone(process), bool, ORPHAN_DEADLINE)
        assert api_other.get(uuid)["status"] == "stopped"

    # Six tasks posted through both hosts: two run (each host alone could run two), four wait.
    gate = hosts.gate("g")
    with TaskProcessSampler([a, b]) as sampler:
        posted = {n: (api_a if n % 2 else api_b).submit(n=n, gate=gate)["uuid"] for n in range(10, 16)}
        for api in (api_a, api_b):
            listing = poll_until(lambda: api.listing(), lambda v: v["running"] == 2, 20)
            assert listing["queued"] == 4, listing
        # Both hosts' idle slots look at the store twice a second: the listings are read again only
        # once both hosts have heartbeaten after a few looks' time (a later beat of each, in the store).
        _wait_for_beats_after(store_url, 4 * defaults.STORE_POLL_INTERVAL, ("host-a", "host-b"))
        for api in (api_a, api_b):
            listing = api.listing()
            assert (listing["running"], listing["queued"]) == (2, 4), listing
        assert len(task_processes(a)) + len(task_processes(b)) == 2
        hosts.open_gate("g")
        results = {}
        for n, uuid in posted.items():
            results[n] = (api_b if n % 2 else api_a).wait_ended(uuid)  # read through the other host
    assert sampler.error is None, sampler.error
    assert sampler.samples > 10
    assert sampler.most == 2, f"{sampler.most} task processes alive at once on two hosts (limit 2)"
    for n, task in results.items():
        assert task["status"] == "succeeded" and task["result"]["n"] == n and task["attempt"] == 1, task
        assert task["result"]["host"] in ("host-a", "host-b"), task
    print(f"\n[hosts] ran on: {sorted(t['result']['host'] for t in results.values())}; "
          f"at most {sampler.most} task processes in {sampler.samples} samples")
    assert statuses(api_a.listing()["tasks"]) == {"succeeded": 6, "stopped": 2}

    _stop(a)
    _stop(b)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("restartable", [False, True], ids=["not-restartable", "restartable"])
@ON_POSTGRES_TOO
def test_a_dead_host_s_tasks_are_settled_by_the_other_host(restartable, store_url, tmp_path, pool):
    hosts = Hosts(tmp_path, pool, store_url, restartable=restartable)
    a, api_a = hosts.start("host-a")
    b, api_b = hosts.start("host-b")
    gate = hosts.gate("g")
    with suspended(gunicorn_workers(b)):  # B is idle: A claims what is posted to it
        cut = {n: api_a.submit(n=n, gate=gate)["uuid"] for n in (1, 2)}
        cut_tasks = [api_a.wait_running(uuid) for uuid in cut.values()]
        queued = {n: api_a.submit(n=n)["uuid"] for n in (3, 4, 5)}
    on_a = task_processes(a)
    assert all(task["pid"] in on_a for task in cut_tasks), (cut_tasks, on_a)
    assert {api_b.get(uuid)["status"] for uuid in queued.values()} == {"queued"}
    cut_procs = [psutil.Process(task["pid"]) for task in cut_tasks]
    a.remember()

    a.send(signal.SIGKILL, group=True)  # host A's master and worker; its fork server then kills its tasks
    killed_at = time.monotonic()
    orphans = a.wait_gone(ORPHAN_DEADLINE)
    assert orphans == [], f"orphans {ORPHAN_DEADLINE} s after host A was killed: {orphans}"
    assert all(process_gone(p) for p in cut_procs)

    # Host B cannot see host A's processes: it settles A's tasks once A's heartbeat is older than the lease.
    if restartable:
        def settled(task: dict) -> bool:  # queued again and claimed by host B
            return task["status"] == "running" and task["attempt"] == 2 and task["pid"]
    else:
        def settled(task: dict) -> bool:
            return task["status"] == "lost"
    remaining = SETTLE_DEADLINE - (time.monotonic() - killed_at)
    tasks = poll_until(lambda: [api_b.get(uuid) for uuid in cut.values()], lambda ts: all(settled(t) for t in ts),
                       remaining)
    print(f"\n[hosts] host A's tasks settled by host B {time.monotonic() - killed_at:.1f} s after the kill "
          f"(lease {LEASE:g} s)")
    on_b = task_processes(b)
    for task in tasks:
        if restartable:
            assert task["pid"] in on_b and task["error"] is None, (task, on_b)
        else:
            assert task["error"]["type"] == "Lost" and "host-a" in task["error"]["message"], task
            assert task["result"] is None

    hosts.open_gate("g")
    for n, uuid in queued.items():
        task = api_b.wait_ended(uuid)
        assert task["status"] == "succeeded" and task["result"] == {**task["result"], "n": n, "host": "host-b"}, task
    for n, uuid in cut.items():
        task = api_b.wait_ended(uuid)
        if restartable:
            assert task["status"] == "succeeded" and task["attempt"] == 2, task
            assert task["result"]["host"] == "host-b" and task["result"]["n"] == n, task
        else:
            assert task["status"] == "lost", task
    _stop(b)


#: Seconds a host that wakes up after its tasks were settled elsewhere gets to give up its copies.
FENCE_DEADLINE = defaults.HEARTBEAT_INTERVAL + defaults.RECONCILE_INTERVAL + 5.0


@pytest.mark.timeout(120)
def test_a_host_frozen_past_the_lease_gives_up_the_tasks_settled_elsewhere(store_url, tmp_path, pool):
    """Host A's serving process freezes (SIGSTOP; a long GC pause or a partition looks the same from B)
    longer than the lease while its task process keeps running. B cannot tell it from a dead host: it
    queues the restartable task again and runs it. Once A wakes up, its stale copy must go, or the
    task runs twice at once (and more task processes run than max_num_process)."""
    hosts = Hosts(tmp_path, pool, store_url, restartable=True)
    a, api_a = hosts.start("host-a")
    b, api_b = hosts.start("host-b")
    gate = hosts.gate("g")
    with suspended(gunicorn_workers(b)):
        uuid = api_a.submit(n=1, gate=gate)["uuid"]
        first = api_a.wait_running(uuid)
    assert first["pid"] in task_processes(a)
    stale = psutil.Process(first["pid"])

    with suspended(gunicorn_workers(a)):  # only the serving process: its task process keeps running
        rerun = poll_until(lambda: api_b.get(uuid), lambda t: t["status"] == "running" and t["attempt"] == 2
                           and t["pid"], SETTLE_DEADLINE)
        assert rerun["pid"] in task_processes(b)
        assert not process_gone(stale)
    woke = time.monotonic()
    try:
        poll_until(lambda: process_gone(stale), bool, FENCE_DEADLINE)
    except AssertionError:
        raise AssertionError(
            f"host A's copy of task {uuid} (pid {stale.pid}) still runs {time.monotonic() - woke:.0f} s after A woke "
            f"up, although the store gave the task to host B (pid {rerun['pid']}): the task runs twice at once") from None

    hosts.open_gate("g")
    task = api_a.wait_ended(uuid)
    assert task["status"] == "succeeded" and task["attempt"] == 2, task
    assert task["result"]["host"] == "host-b" and task["result"]["pid"] == rerun["pid"], task
    _stop(a)
    _stop(b)
