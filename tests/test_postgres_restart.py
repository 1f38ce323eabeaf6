"""PostgreSQL restarted while a real server runs tasks on it (gunicorn -w 2, the job app with the extension).

A client thread posts tasks one after the other, before, during and after the outage; each task appends
its ``n`` to a file when it starts. A POST answered 503 while the database is down was not accepted: it
does not count (its task may or may not exist, and runs at most once if it does). Every accepted task
must end and succeed, none may run twice, every task the store holds ends, the serving processes are
the same ones (gunicorn replaces a worker that dies), each of them heartbeats again, health answers 200
and no thread died with an exception in a log.

The session's cluster is shared with the other tests: it is restarted, never left stopped.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Optional

import psycopg
import pytest
import requests

from flask_multiprocess_controller.store import resolve_store

from serverproc import (JOB_APP, JobApi, Server, TERMINAL_STATUSES, fork_servers, free_port, gunicorn,
                        gunicorn_workers, poll_until)
from serverproc import unexpected_tracebacks

if TYPE_CHECKING:
    from pgserver import PostgresCluster

pytestmark = pytest.mark.slow

WORKERS = 2
HTTP_TIMEOUT = 30.0
#: Seconds the database stays down.
DOWN_FOR = 1.0
#: Seconds between two POSTs of the client thread; seconds each task runs.
POST_EVERY = 0.05
TASK_SECONDS = 0.2
#: Seconds every accepted task gets to end once the database is back.
SETTLE = 60.0

_MOUNTED = "resource_class_args=(controller,))\n"
#: The job app of serverproc with the extension, so that it serves /mpc/health.
APP = JOB_APP.replace(
    "from flask_multiprocess_controller import MetaMPController,",
    "from flask_multiprocess_controller import MultiprocessController, MetaMPController,",
).replace(_MOUNTED, _MOUNTED + "MultiprocessController(app)\n", 1)
assert APP.count("MultiprocessController") == 2


class Poster(threading.Thread):
    """Posts task ``n = 0, 1, ...`` every :data:`POST_EVERY` s until stopped; keeps every answer."""

    def __init__(self, api: JobApi, ran: str) -> None:
        super().__init__(name="poster", daemon=True)
        self.api = api
        self.ran = ran
        #: n -> uuid of the tasks accepted (202), in the order posted.
        self.accepted: dict[int, str] = {}
        #: n -> (HTTP status or exception name, time.monotonic()) of the others.
        self.refused: dict[int, tuple[object, float]] = {}
        self.error: Optional[BaseException] = None
        self._halt = threading.Event()

    def run(self) -> None:
        n = 0
        try:
            with requests.Session() as session:
                while not self._halt.is_set():
                    try:
                        response = self.api.post(session, n=n, sleep=TASK_SECONDS, append=self.ran)
                    except requests.RequestException as exc:
                        self.refused[n] = (type(exc).__name__, time.monotonic())
                    else:
                        if response.status_code == 202:
                            self.accepted[n] = response.json()["uuid"]
                        else:
                            self.refused[n] = (response.status_code, time.monotonic())
                    n += 1
                    self._halt.wait(POST_EVERY)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(HTTP_TIMEOUT + 10)


def _database_up(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def _tasks_if_answered(api: JobApi) -> Optional[list[dict]]:
    """Every task of the controller, or None while the list cannot be read."""
    try:
        response = requests.get(api.url, params={"limit": 1000}, timeout=HTTP_TIMEOUT)
    except requests.RequestException:
        return None
    return response.json()["tasks"] if response.status_code == 200 else None


def _any_running(tasks: list[dict]) -> bool:
    return any(t["status"] == "running" for t in tasks)


def _owner_pids(beats: dict[str, float], after: float) -> set[int]:
    """The pids of the serving processes that heartbeat after ``after`` (an owner is ``host:pid:created``)."""
    return {int(owner.split(":")[-2]) for owner, beat in beats.items() if beat > after}


@pytest.mark.timeout(150)
def test_a_postgresql_restart_loses_no_accepted_task_runs_none_twice_and_kills_no_serving_thread(
        postgres_server: "PostgresCluster", postgres_url: str, tmp_path, pool):
    (tmp_path / "app.py").write_text(APP)
    ran = tmp_path / "ran.txt"
    port = free_port()
    config = {"max_num_process": 2, "stop_grace": 0.5, "lease": 3}
    server: Server = pool.start(
        gunicorn("-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "app:app"),
        cwd=tmp_path, port=port, log_path=tmp_path / "gunicorn.log",
        env={"MPC_STORE_URL": postgres_url, "APP_CONFIG": json.dumps(config)}, ready_path="/mpc/health")
    poll_until(lambda: len(fork_servers(server)), lambda n: n == WORKERS, 60, interval=0.1)
    workers = {w.pid for w in gunicorn_workers(server)}
    assert len(workers) == WORKERS
    api = JobApi(server.base, HTTP_TIMEOUT, log=server.log)

    poster = Poster(api, str(ran))
    poster.start()
    try:
        # Tasks are queued and running when the database goes away.
        poll_until(lambda: len(poster.accepted), lambda n: n >= 10, 30)
        poll_until(lambda: _tasks_if_answered(api) or [], _any_running, 20)
        before = len(poster.accepted)
        down_at = time.monotonic()
        try:
            postgres_server.restart(down_for=DOWN_FOR)
        finally:
            if not _database_up(postgres_url):  # the session's other tests need it
                postgres_server.start()
        up_at = time.monotonic()
        # POSTs go on until some are accepted again after the restart.
        poll_until(lambda: len(poster.accepted), lambda n: n >= before + 10, 30)
    finally:
        poster.stop()
    assert poster.error is None, poster.error
    assert not poster.is_alive()
    accepted = poster.accepted

    # Every accepted task ends, and so does every task the store holds (a refused POST's too, if it was
    # written after all).
    def ended(tasks: Optional[list[dict]]) -> bool:
        return tasks is not None and all(t["status"] in TERMINAL_STATUSES for t in tasks)

    tasks = poll_until(lambda: _tasks_if_answered(api), ended, SETTLE)
    by_uuid = {t["uuid"]: t for t in tasks}
    missing = sorted(n for n, uuid in accepted.items() if uuid not in by_uuid)
    assert missing == [], f"accepted tasks lost: {missing}"
    failed = {n: (by_uuid[uuid]["status"], by_uuid[uuid]["error"]) for n, uuid in accepted.items()
              if by_uuid[uuid]["status"] != "succeeded"}
    assert failed == {}, f"accepted tasks that did not succeed: {failed}"
    assert all(by_uuid[uuid]["result"]["n"] == n for n, uuid in accepted.items())

    # None ran twice; every accepted one ran.
    runs = Counter(int(line) for line in ran.read_text().split())
    twice = {n: count for n, count in runs.items() if count > 1}
    assert twice == {}, f"tasks run more than once: {twice}"
    assert set(accepted) <= set(runs), sorted(set(accepted) - set(runs))
    during = {n: code for n, (code, at) in poster.refused.items()}
    assert set(during.values()) <= {503}, f"POSTs answered other than 202 or 503: {during}"
    assert all(at >= down_at for _, at in poster.refused.values()), "a POST refused before the outage"

    # The same serving processes answer, heartbeat after the restart and claim: no thread of theirs died.
    assert {w.pid for w in gunicorn_workers(server)} == workers, "gunicorn replaced a worker"
    store = resolve_store(postgres_url)
    try:
        back = store.now()
        poll_until(store.heartbeats, lambda beats: _owner_pids(beats, back) >= workers, 20)
    finally:
        store.close()
    for _ in range(2 * WORKERS):
        response = requests.get(server.base + "/mpc/health", timeout=HTTP_TIMEOUT)
        assert response.status_code == 200 and response.json()["status"] == "ok", response.text
    after = [api.submit(n=n)["uuid"] for n in range(10_000, 10_004)]
    for uuid in after:
        assert api.wait_ended(uuid)["status"] == "succeeded"
    log = server.log()
    assert "Exception in thread" not in log and not unexpected_tracebacks(log), log[-12000:]

    print(f"\n[postgres restart] {len(accepted)} tasks accepted ({len(accepted) - before} from the outage), "
          f"{len(poster.refused)} POSTs refused with 503 while the database was down "
          f"({up_at - down_at:.1f} s), none lost, none run twice")
    survivors = server.stop(signal.SIGTERM, timeout=30)
    assert survivors == [], survivors
