"""This project as a peer: through its Python API, and over HTTP on the dev server and gunicorn,
each in its fresh-process mode (``max_tasks_per_child=1``, the default) and its reused-worker mode
(``max_tasks_per_child=0``).

Every variant uses the default embedded store, a SQLite file (here in the peer's work directory), but
the ``-redis`` and ``-pg`` rows: the same gunicorn server on a private ``redis-server`` or a private
PostgreSQL cluster (:mod:`bench.pgcluster`) that the peer starts and stops itself. Their store write
transactions are counted by the server: Redis's atomic writes (``INFO commandstats``: the scripts and
``MULTI``/``EXEC`` transactions), PostgreSQL's transaction ids assigned (only a transaction that writes
gets one), so the measured runs are the counted ones too.
The ignoring-task stop workload runs against a controller with ``stop_grace=0`` (a task that never
checks should be stopped at once); every other workload uses the default grace of 10 s.
"""
from __future__ import annotations

import threading
import time
import uuid as uuid_module
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import requests

import flask_multiprocess_controller
from flask_multiprocess_controller.states import TERMINAL
from flask_multiprocess_controller.store.sqlite import SQLiteStore

from . import accounting, base
from .base import Peer, PeerUnavailable
from .mpc_tasks import BenchController, make_controller

#: Grace of the controller that serves the ignoring-task stop workload.
RIGID_GRACE = 0.0
DEFAULT_GRACE = 10.0


class TaskFailed(RuntimeError):
    """A benchmark task ended other than ``succeeded``."""


def _value(task: dict) -> Any:
    if task["status"] != "succeeded":
        raise TaskFailed(f"task {task['uuid']} ended {task['status']}: {task.get('error') or task.get('msg')}")
    return task["result"]


class CountingSQLiteStore(SQLiteStore):
    """The default store, counting the progress writes each task caused."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.progress_writes: Counter = Counter()

    def update(self, uuid: str, owner: Optional[str] = None, **fields: Any) -> bool:
        if "progress" in fields or "percent" in fields:
            self.progress_writes[uuid] += 1
        return super().update(uuid, owner, **fields)


class _Mpc(Peer):
    reused = False

    def _store_url(self) -> str:
        return f"sqlite:///{self.workdir / 'tasks.sqlite3'}"

    @property
    def write_log(self) -> Path:
        """The file :func:`bench.peers.accounting.install_write_counter` counts write transactions in."""
        return self.workdir / "store-writes.count"

    def store_writes(self) -> Optional[int]:
        return accounting.writes(self.write_log) if self.count_writes else None

    #: Whether the store's write transactions are counted (a trace callback on every statement, which
    #: costs a little): off for the measured runs, on for the extra run that counts them.
    count_writes = False

    def enable_write_count(self) -> None:
        """Start again with the store's write transactions counted."""
        self.count_writes = True
        self.close()
        self._launch(self.grace)

    def versions(self) -> dict:
        import flask
        import psutil
        return {"flask-multiprocess-controller": flask_multiprocess_controller.__version__ if hasattr(
            flask_multiprocess_controller, "__version__") else "this checkout",
            "flask": flask.__version__, "psutil": psutil.__version__}

    def prepare(self, workload: str) -> None:
        grace = RIGID_GRACE if workload == base.STOP_IGNORING else DEFAULT_GRACE
        if grace != self.grace:
            self.close()
            self._launch(grace)

    def start(self) -> None:
        self._launch(DEFAULT_GRACE)

    def _launch(self, grace: float) -> None:
        raise NotImplementedError


class _Api(_Mpc):
    """The Python API in this process: ``submit`` and ``wait``."""

    supports = frozenset({base.BURST, base.SEQUENTIAL, base.DISPATCH, base.STOP_CHECKPOINT, base.STOP_IGNORING,
                          base.PROGRESS})

    def __init__(self, workdir: Path, python: Optional[str] = None) -> None:
        super().__init__(workdir, python)
        self.controller: Optional[BenchController] = None
        self.store: Optional[CountingSQLiteStore] = None
        self.grace = DEFAULT_GRACE

    in_process = True

    def cpu_roles(self) -> dict:
        import psutil
        return accounting.mpc_roles([psutil.Process()], include_serving=False)

    def _launch(self, grace: float) -> None:
        self.grace = grace
        if self.count_writes:
            accounting.install_write_counter(str(self.write_log))
        self.store = CountingSQLiteStore(str(self.workdir / "tasks.sqlite3"))
        self.controller = make_controller(self.store, self.reused, grace)

    def close(self) -> None:
        if self.controller is not None:
            self.controller.shutdown()
            self.controller = None

    def submit_add(self, x: int, y: int) -> str:
        return self.controller.submit(op="add", x=x, y=y)

    def submit_stamp(self) -> str:
        return self.controller.submit(op="stamp")

    def submit_checkpointing(self) -> str:
        return self.controller.submit(op="checkpointing")

    def submit_ignoring(self) -> str:
        return self.controller.submit(op="ignoring")

    def submit_progress(self, iterations: int, report: bool) -> str:
        return self.controller.submit(op="progress", iterations=iterations, report=report)

    def progress_writes(self, handle: str) -> int:
        return self.store.progress_writes[handle]

    def result(self, handle: str, timeout: float = base.WAIT_TIMEOUT) -> Any:
        task = self.controller.wait(handle, timeout)
        if task["status"] not in TERMINAL:
            raise TimeoutError(f"task {handle} still {task['status']} after {timeout} s")
        return _value(task)

    def wait_running(self, handle: str, timeout: float = base.WAIT_TIMEOUT) -> None:
        base.poll_until(lambda: self.controller.status(handle)["status"], "running".__eq__, timeout,
                        f"task {handle} running")

    def stop(self, handle: str) -> None:
        self.controller.stop(handle)

    def wait_stopped(self, handle: str, timeout: float = base.WAIT_TIMEOUT) -> None:
        task = self.controller.wait(handle, timeout)
        if task["status"] not in TERMINAL:
            raise TimeoutError(f"task {handle} still {task['status']} {timeout} s after its stop")


class ApiFresh(_Api):
    key, label = "mpc-api-fresh", "this project, Python API, fresh process per task"


class ApiReused(_Api):
    key, label = "mpc-api-reused", "this project, Python API, reused workers"
    reused = True


class _Http(_Mpc):
    """Over HTTP: POST, then GET ``?wait=`` for the result; DELETE to stop."""

    supports = frozenset({base.BURST, base.SEQUENTIAL, base.DISPATCH, base.POST, base.STOP_CHECKPOINT,
                          base.STOP_IGNORING, base.MEMORY})
    #: One request per task: ``POST ?wait=`` answers the finished task (else it is waited on by GET).
    one_request = False
    #: Seconds a ``POST ?wait=`` may hold (below the server's ``max_wait``, 25 s).
    POST_WAIT = 20.0

    def __init__(self, workdir: Path, python: Optional[str] = None) -> None:
        super().__init__(workdir, python)
        self.server = None
        self.port = 0
        self.grace = DEFAULT_GRACE
        self._local = threading.local()

    def command(self) -> list[str]:
        raise NotImplementedError

    def _launch(self, grace: float) -> None:
        self.grace = grace
        self.port = base.free_port()
        log = self.workdir / "server.log"
        env = {"BENCH_STORE": self._store_url(), "BENCH_REUSED": "1" if self.reused else "0",
               "BENCH_STOP_GRACE": str(grace), "PORT": str(self.port), "PYTHONUNBUFFERED": "1",
               accounting.WRITE_LOG_ENV: str(self.write_log) if self.count_writes else ""}
        self.server = base.spawn(self.command(), log, env=env)
        base.wait_port(self.port, self.server, log=log)
        self.base_url = f"http://127.0.0.1:{self.port}/tasks"

    def close(self) -> None:
        base.stop_tree(self.server)
        self.server = None

    def server_pids(self) -> list[int]:
        return [self.server.pid] if self.server is not None else []

    def serving_processes(self) -> list:
        """The processes that serve requests (the dev server; gunicorn's master and workers)."""
        return accounting.processes(self.server_pids())

    def cpu_roles(self) -> dict:
        return accounting.mpc_roles(self.serving_processes())

    @property
    def http(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _post(self, **args: Any) -> Any:
        if self.one_request:
            response = self.http.post(self.base_url, json=args, params={"wait": f"{self.POST_WAIT:g}"},
                                      timeout=self.POST_WAIT + 10)
            if response.status_code == 200:
                return response.json()  # the finished task: its handle is the task itself
        else:
            response = self.http.post(self.base_url, json=args, timeout=base.WAIT_TIMEOUT)
        if response.status_code != 202:
            raise TaskFailed(f"POST answered {response.status_code}: {response.text[:300]}")
        return response.json()["uuid"]

    def _get(self, handle: str, wait: Optional[float] = None) -> dict:
        params = {"wait": f"{wait:g}"} if wait is not None else None
        response = self.http.get(f"{self.base_url}/{handle}", params=params, timeout=base.WAIT_TIMEOUT + 10)
        if response.status_code != 200:
            raise TaskFailed(f"GET answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def submit_add(self, x: int, y: int) -> str:
        return self._post(op="add", x=x, y=y)

    def submit_stamp(self) -> str:
        return self._post(op="stamp")

    def submit_checkpointing(self) -> str:
        return self._post(op="checkpointing")

    def submit_ignoring(self) -> str:
        return self._post(op="ignoring")

    def get_status(self, handle: str) -> dict:
        return self._get(handle)

    def result(self, handle: Any, timeout: float = base.WAIT_TIMEOUT) -> Any:
        if isinstance(handle, dict):  # one_request: the POST answered the finished task
            return _value(handle)
        return _value(self._wait(handle, timeout))

    def _wait(self, handle: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            task = self._get(handle, wait=max(0.0, deadline - time.monotonic()))
            if task["status"] in TERMINAL:
                return task
            if time.monotonic() >= deadline:
                raise TimeoutError(f"task {handle} still {task['status']} after {timeout} s")

    def wait_running(self, handle: str, timeout: float = base.WAIT_TIMEOUT) -> None:
        base.poll_until(lambda: self._get(handle)["status"], "running".__eq__, timeout, f"task {handle} running")

    def stop(self, handle: str) -> None:
        response = self.http.delete(f"{self.base_url}/{handle}", timeout=base.WAIT_TIMEOUT)
        if response.status_code not in (200, 202):
            raise TaskFailed(f"DELETE answered {response.status_code}: {response.text[:300]}")

    def wait_stopped(self, handle: str, timeout: float = base.WAIT_TIMEOUT) -> None:
        self._wait(handle, timeout)

    def populate(self, count: int) -> list[str]:
        """Store finished tasks until ``count`` are stored (written straight into the store)."""
        store = SQLiteStore(str(self.workdir / "tasks.sqlite3"))
        try:
            have = getattr(self, "_populated", [])
            now = time.time()
            while len(have) < count:
                rows = [{"uuid": str(uuid_module.uuid4()), "controller": "bench", "status": "succeeded",
                         "priority": 0, "args": {"op": "add", "x": 1, "y": 1}, "result": 2, "created_at": now,
                         "started_at": now, "ended_at": now, "attempt": 1, "stop_requested": False}
                        for _ in range(min(5000, count - len(have)))]
                store.enqueue(rows, -1)
                have += [row["uuid"] for row in rows]
            self._populated = have
            return list(have)
        finally:
            store.close()


class _DevServer(_Http):
    def command(self) -> list[str]:
        return [self.python, str(base.BENCH_DIR / "peers" / "mpc_app.py")]


class _Gunicorn(_Http):
    supports = _Http.supports | {base.STORED}

    app = "bench.peers.mpc_app:app"

    def command(self) -> list[str]:
        return [self.python, "-m", "gunicorn", "--workers", "2", "--worker-class", "gthread", "--threads", "8",
                "--bind", f"127.0.0.1:{self.port}", "--timeout", "120", "--graceful-timeout", "15", self.app]

    def serving_processes(self) -> list:
        masters = accounting.processes(self.server_pids())
        return masters + [w for m in masters for w in accounting.children(m)]

    def versions(self) -> dict:
        import gunicorn
        return {**super().versions(), "gunicorn": gunicorn.__version__}


class DevServerFresh(_DevServer):
    key, label = "mpc-dev-fresh", "this project, HTTP (dev server), fresh process per task"


class DevServerReused(_DevServer):
    key, label = "mpc-dev-reused", "this project, HTTP (dev server), reused workers"
    reused = True


class GunicornFresh(_Gunicorn):
    key, label = "mpc-gunicorn-fresh", "this project, HTTP (gunicorn -w 2), fresh process per task"


class GunicornReused(_Gunicorn):
    key, label = "mpc-gunicorn-reused", "this project, HTTP (gunicorn -w 2), reused workers"
    reused = True


class _ServerStore:
    """A gunicorn row on a store server the peer starts (Redis or PostgreSQL) instead of the SQLite file."""

    supports = frozenset({base.BURST, base.SEQUENTIAL, base.DISPATCH, base.POST, base.STOP_CHECKPOINT})
    store_server: Any = None

    def _start_store(self) -> str:
        raise NotImplementedError

    def _store_url(self) -> str:
        if self.store_server is None:
            self.store_url = self._start_store()
        return self.store_url

    def close(self) -> None:
        super().close()
        if self.store_server is not None:
            self._stop_store()
            self.store_server = None

    def enable_write_count(self) -> None:
        """The server counts the writes: nothing to install, nothing to start again."""
        self.count_writes = True

    def store_writes(self) -> Optional[int]:
        return self._server_writes() if self.count_writes and self.store_server is not None else None

    def cpu_roles(self) -> dict:
        roles = super().cpu_roles()
        if self.store_server is not None:
            roles[self.store_role] = self._server_cpu()
        return roles


class GunicornReusedRedis(_ServerStore, GunicornReused):
    key, label = "mpc-gunicorn-reused-redis", "this project, HTTP (gunicorn -w 2), reused workers, Redis store"
    store_role = "redis"

    def _start_store(self) -> str:
        self.store_server = base.RedisServer(self.workdir).start()
        return self.store_server.url

    def _stop_store(self) -> None:
        self.store_server.stop()

    def _server_writes(self) -> int:
        import redis
        stats = redis.Redis.from_url(self.store_server.url).info("commandstats")
        return sum(v["calls"] for k, v in stats.items()
                   if k.removeprefix("cmdstat_") in ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "exec"))

    def _server_cpu(self) -> float:
        return sum(map(accounting.own, accounting.processes([self.store_server.proc.pid])))

    def versions(self) -> dict:
        import redis
        info = redis.Redis.from_url(self.store_server.url).info("server") if self.store_server else {}
        return {**super().versions(), "redis-py": redis.__version__, "redis-server": info.get("redis_version", "?")}


class GunicornReusedPostgres(_ServerStore, GunicornReused):
    key, label = "mpc-gunicorn-reused-pg", "this project, HTTP (gunicorn -w 2), reused workers, PostgreSQL store"
    store_role = "postgres"

    def _start_store(self) -> str:
        from bench import pgcluster
        if pgcluster.bin_dir() is None:
            raise PeerUnavailable("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.store_server = pgcluster.PostgresCluster()
        return self.store_server.url()

    def _stop_store(self) -> None:
        self.store_server.destroy()

    def _server_writes(self) -> int:
        import psycopg
        with psycopg.connect(self.store_server.url(), autocommit=True) as conn:
            # The next transaction id: only a transaction that writes is given one (reading it takes none).
            return int(conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()[0])

    def _server_cpu(self) -> float:
        return self.store_server.cpu_seconds()

    def versions(self) -> dict:
        import psycopg
        return {**super().versions(), "psycopg": psycopg.__version__,
                "postgresql": self.store_server.version() if self.store_server else "?"}


class DevServerReusedWait(DevServerReused):
    key, label = "mpc-dev-reused-wait", "this project, HTTP (dev server), reused workers, one POST ?wait= per task"
    one_request = True
    supports = frozenset({base.BURST, base.SEQUENTIAL})


class GunicornReusedWait(GunicornReused):
    key, label = "mpc-gunicorn-reused-wait", "this project, HTTP (gunicorn -w 2), reused workers, one POST ?wait= per task"
    one_request = True
    supports = frozenset({base.BURST, base.SEQUENTIAL})


class NoBatchApi(PeerUnavailable):
    """The server answered a bulk POST without a ``batch`` id."""


class _Batch:
    """The batch path: the whole burst in one bulk POST (a JSON array of the tasks' arguments), then
    ``GET /tasks?batch=<id>&wait=S`` until every task of the batch has ended (one request, unless a
    wait runs out first)."""

    supports = frozenset({base.BURST})

    def run_batch(self, items: list[dict], timeout: float = base.WAIT_TIMEOUT) -> list[Any]:
        response = self.http.post(self.base_url, json=items, timeout=base.WAIT_TIMEOUT)
        if response.status_code != 202:
            raise TaskFailed(f"bulk POST answered {response.status_code}: {response.text[:300]}")
        body = response.json()
        if not isinstance(body, dict) or "batch" not in body:
            raise NoBatchApi("n/a (no batch API): the bulk POST answered no batch id")
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0.0, min(self.POST_WAIT, deadline - time.monotonic()))
            answer = self.http.get(self.base_url, params={"batch": body["batch"], "wait": f"{wait:g}"},
                                   timeout=wait + 10)
            if answer.status_code not in (200, 202):
                raise TaskFailed(f"GET ?batch= answered {answer.status_code}: {answer.text[:300]}")
            state = answer.json()
            if answer.status_code == 200 and state.get("ended") == state.get("total"):
                break
            if time.monotonic() >= deadline:
                raise TimeoutError(f"batch {body['batch']}: {state.get('ended')} of {state.get('total')} "
                                   f"ended after {timeout} s")
        tasks = state.get("tasks") or []
        by_uuid = {t["uuid"]: t for t in tasks if isinstance(t, dict)}
        order = [t["uuid"] if isinstance(t, dict) else t for t in body["tasks"]]
        # The answer is expected to carry each task; should it list only uuids, each is read once.
        return [_value(by_uuid[u] if u in by_uuid else self._get(u)) for u in order]


class DevServerBatch(_Batch, DevServerReused):
    key, label = "mpc-dev-batch", "this project, HTTP (dev server), reused workers, one bulk POST + batch wait"


class GunicornBatch(_Batch, GunicornReused):
    key, label = "mpc-gunicorn-batch", "this project, HTTP (gunicorn -w 2), reused workers, one bulk POST + batch wait"


class _Floor:
    """The HTTP floor: this stack and client with a handler that does no work
    (:mod:`bench.peers.http_floor_app`); the same requests per task as the row it is the floor of."""

    supports = frozenset({base.BURST, base.SEQUENTIAL, base.DISPATCH, base.POST, base.MEMORY})

    def prepare(self, workload: str) -> None:
        pass

    #: Nothing to count: the floor has no store (so no extra run either).
    enable_write_count = None

    def cpu_roles(self) -> dict:
        return {"serving": sum(map(accounting.own, self.serving_processes()))}


class DevServerFloor(_Floor, DevServerReused):
    key, label = "http-floor-dev", "HTTP floor: Flask + flask-restful, no-op handler (dev server), POST + GET"

    def command(self) -> list[str]:
        return [self.python, str(base.BENCH_DIR / "peers" / "http_floor_app.py")]

    def versions(self) -> dict:
        from importlib.metadata import version
        return {"flask": version("flask"), "flask-restful": version("flask-restful")}


class DevServerFloorWait(DevServerFloor):
    key, label = "http-floor-dev-wait", "HTTP floor: no-op handler (dev server), one POST ?wait= per task"
    one_request = True
    supports = frozenset({base.BURST, base.SEQUENTIAL})


class GunicornFloor(_Floor, GunicornReused):
    key, label = "http-floor-gunicorn", "HTTP floor: Flask + flask-restful, no-op handler (gunicorn -w 2), POST + GET"
    app = "bench.peers.http_floor_app:app"

    def versions(self) -> dict:
        from importlib.metadata import version
        return {"flask": version("flask"), "flask-restful": version("flask-restful"), "gunicorn": version("gunicorn")}


class GunicornFloorWait(GunicornFloor):
    key, label = "http-floor-gunicorn-wait", "HTTP floor: no-op handler (gunicorn -w 2), one POST ?wait= per task"
    one_request = True
    supports = frozenset({base.BURST, base.SEQUENTIAL})


__all__ = ["ApiFresh", "ApiReused", "DevServerFresh", "DevServerReused", "GunicornFresh", "GunicornReused",
           "PeerUnavailable"]
