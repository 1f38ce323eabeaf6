"""Shared fixtures: controllers that are always shut down, and a detector of leaked processes and threads."""
from __future__ import annotations

import faulthandler
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

import psutil
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so that child processes and tests can import helpers

from flask import Flask  # noqa: E402
from flask_restful import Api  # noqa: E402

from flask_multiprocess_controller import MetaMPController, MetaMPResource  # noqa: E402

if TYPE_CHECKING:
    from pgserver import PostgresCluster

#: Seconds a test's leftovers get to go away before they count as leaked.
LEAK_GRACE = 5.0

#: Pids of session-wide services (a Redis server) that outlive single tests on purpose.
SERVICE_PIDS: set[int] = set()


def _children() -> set[int]:
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.pid not in SERVICE_PIDS:
                found.add(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (see :func:`serverproc.free_port`)."""
    from serverproc import free_port as below_the_ephemeral_range

    return below_the_ephemeral_range()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A real redis-server on 127.0.0.1 for the whole session; yields its URL (database 0)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run the README's test command, which installs it.")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--protected-mode", "yes"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    SERVICE_PIDS.add(proc.pid)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    client.close()
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)
    SERVICE_PIDS.discard(proc.pid)


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The session's Redis, emptied before the test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    yield redis_server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator["PostgresCluster"]:
    """A private PostgreSQL cluster on 127.0.0.1 for the whole session (see :mod:`pgserver`)."""
    from pgserver import PostgresCluster, bin_dir

    if bin_dir() is None:
        pytest.fail("PostgreSQL is not installed: run the README's test command, which installs it.")
    cluster = PostgresCluster(free_port())
    yield cluster
    cluster.destroy()


def reset_postgres(url: str) -> None:
    """Drop every schema the tests' stores made in the database at ``url`` (connections to it are ended)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        for (schema,) in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
                                      "AND nspname NOT IN ('public', 'information_schema')").fetchall():
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.fixture
def postgres_url(postgres_server: "PostgresCluster") -> Iterator[str]:
    """The session's PostgreSQL database (with a password in its URL), emptied before the test."""
    url = postgres_server.url()
    reset_postgres(url)
    yield url


@pytest.fixture(autouse=True)
def leak_detector() -> Iterator[None]:
    """Fail any test that leaves a child process or a thread behind."""
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        children = _children() - children_before
        if (not threads and not children) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if threads or children:
        faulthandler.dump_traceback(all_threads=True)
        for pid in children:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        pytest.fail(f"test leaked threads {[t.name for t in threads]} and child processes {sorted(children)}")


@pytest.fixture
def make_controller() -> Iterator[Callable[..., MetaMPController]]:
    """Build controllers (on a memory store unless told otherwise) that are shut down after the test."""
    made: list[MetaMPController] = []

    def make(task_cls: type, **kwargs: object) -> MetaMPController:
        kwargs.setdefault("store", "memory://")
        controller = MetaMPController(task_cls, **kwargs)
        made.append(controller)
        return controller

    yield make
    for controller in made:
        controller.shutdown()


@pytest.fixture
def make_client(make_controller: Callable[..., MetaMPController]) -> Callable[..., object]:
    """Mount a controller for ``task_cls`` at /tasks and /tasks/<uuid>; return (test client, controller)."""

    def make(task_cls: type, **kwargs: object) -> tuple:
        controller = make_controller(task_cls, **kwargs)
        app = Flask(__name__)
        Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))
        return app.test_client(), controller

    return make


@pytest.fixture
def pool() -> Iterator[object]:
    """Server processes started by a test; each one's whole tree is killed at the end."""
    from serverproc import ServerPool

    servers = ServerPool()
    yield servers
    servers.close()


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    """A SQLite store URL in the test's own temporary directory."""
    return f"sqlite:///{tmp_path}/tasks.sqlite3"


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
