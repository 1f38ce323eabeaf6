"""``Idempotency-Key`` on POST: a submission sent again (its answer was lost) returns the tasks the first
one made, with 200, and never makes others; the same key with another body is 422.

The stores record the key with the tasks in the same atomic step as the insert (memory, SQLite and
Redis, two store objects racing on one key), the resource answers single and bulk POSTs (and ``?wait=``)
from the record, keys are scoped per controller and tenant, and two gunicorn workers racing on one key
make one task.
"""
from __future__ import annotations

import json
import threading
import time
import uuid as uuid_module
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import requests
from flask import Flask, request
from flask_restful import Api

from flask_multiprocess_controller import (
    MemoryStore, MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController, QueueFull, SQLiteStore,
)
from flask_multiprocess_controller.exceptions import IdempotentReplay
from flask_multiprocess_controller.store.base import Idempotency, TaskStore
from flask_multiprocess_controller.store.postgres import PostgresStore
from flask_multiprocess_controller.store.redis import RedisStore

from serverproc import gunicorn, free_port, write_job_app


class Echo(MetaMPTask):
    def execute(self, n: int = 0) -> dict:
        return {"n": n}


# -- the stores --------------------------------------------------------------------------------------------

BACKENDS = {
    "memory": lambda env: MemoryStore(),
    "sqlite": lambda env: SQLiteStore(str(env.tmp_path / "idem.sqlite3")),
    "redis": lambda env: RedisStore(env.redis_url, prefix=f"idem-{uuid_module.uuid4().hex}:"),
    "postgres": lambda env: PostgresStore(env.postgres_url, schema=f"idem_{uuid_module.uuid4().hex[:12]}"),
}


@pytest.fixture(params=list(BACKENDS))
def store(request, tmp_path, redis_server) -> Iterator[TaskStore]:
    postgres_url = request.getfixturevalue("postgres_server").url() if request.param == "postgres" else None
    made = BACKENDS[request.param](SimpleNamespace(tmp_path=tmp_path, redis_url=redis_server,
                                                   postgres_url=postgres_url))
    yield made
    made.close()


def _rows(n: int = 1, controller: str = "idem") -> list[dict]:
    return [{"uuid": str(uuid_module.uuid4()), "controller": controller, "status": "queued", "priority": 0,
             "args": {"n": i}, "created_at": time.time(), "timeout": None, "attempt": 0, "stop_requested": False}
            for i in range(n)]


def _reopen(store: TaskStore) -> TaskStore:
    if isinstance(store, SQLiteStore):
        return SQLiteStore(store.path)
    if isinstance(store, RedisStore):
        return RedisStore(store.url, prefix=store.prefix)
    return store  # one process: the same object


@pytest.mark.timeout(30)
def test_the_store_records_a_key_with_its_tasks_and_a_repeat_inserts_nothing(store):
    first = _rows(2)
    store.enqueue(first, -1, idempotency=Idempotency("k1", "fp", 60.0))
    with pytest.raises(IdempotentReplay) as replay:
        store.enqueue(_rows(2), -1, idempotency=Idempotency("k1", "other", 60.0))
    assert replay.value.uuids == [row["uuid"] for row in first]
    assert replay.value.fingerprint == "fp"  # the first submission's: the caller compares
    # A full queue does not hide the repeat: the key is looked at first.
    with pytest.raises(IdempotentReplay):
        store.enqueue(_rows(1), 0, idempotency=Idempotency("k1", "fp", 60.0))
    with pytest.raises(QueueFull):
        store.enqueue(_rows(1), 2, idempotency=Idempotency("k2", "fp", 60.0))
    store.enqueue(_rows(1), -1, idempotency=Idempotency("k2", "fp", 60.0))  # a refused key was not recorded
    assert store.counts("idem")["queued"] == 3


@pytest.mark.timeout(30)
def test_an_expired_key_is_forgotten_and_purged(store):
    store.enqueue(_rows(1), -1, idempotency=Idempotency("short", "fp", 0.05))
    store.enqueue(_rows(1), -1, idempotency=Idempotency("long", "fp", 3600.0))
    time.sleep(0.2)
    store.enqueue(_rows(1), -1, idempotency=Idempotency("short", "fp", 0.05))  # expired: a new submission
    assert store.counts("idem")["queued"] == 3
    time.sleep(0.2)
    store.purge("idem", 0.0)
    if isinstance(store, SQLiteStore):
        import sqlite3

        with sqlite3.connect(store.path) as db:
            kept = [key for (key,) in db.execute("SELECT key FROM mpc_idempotency")]
        assert kept == ["long"]
    elif isinstance(store, MemoryStore):
        assert list(store._idempotency) == ["long"]
    elif isinstance(store, PostgresStore):
        assert store._query(f"SELECT key FROM {store.schema}.idempotency") == [("long",)]
    else:
        import redis

        client = redis.Redis.from_url(store.url)
        assert sorted(k.decode() for k in client.keys(store.prefix + "idem:*")) == [store.prefix + "idem:long"]
        client.close()
    with pytest.raises(IdempotentReplay):
        store.enqueue(_rows(1), -1, idempotency=Idempotency("long", "fp", 3600.0))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("store", ["sqlite", "redis"], indirect=True)
def test_store_objects_racing_on_one_key_insert_once(store):
    stores = [_reopen(store) for _ in range(6)]
    start = threading.Barrier(len(stores))
    outcomes: list[str] = []

    def submit(each: TaskStore) -> None:
        start.wait()
        try:
            each.enqueue(_rows(1), -1, idempotency=Idempotency("raced", "fp", 60.0))
            outcomes.append("inserted")
        except IdempotentReplay:
            outcomes.append("replayed")

    threads = [threading.Thread(target=submit, args=(each,)) for each in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for each in stores:
        each.close()
    assert sorted(outcomes) == ["inserted"] + ["replayed"] * 5
    assert store.counts("idem")["queued"] == 1


# -- the resource ------------------------------------------------------------------------------------------


def _key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid_module.uuid4())}


@pytest.mark.timeout(30)
def test_a_repeated_post_answers_200_with_the_task_it_made(make_client):
    client, controller = make_client(Echo, max_num_process=1)
    key = _key()
    first = client.post("/tasks", json={"n": 1}, headers=key)
    again = client.post("/tasks", json={"n": 1}, headers=key)
    assert first.status_code == 202, first.json
    assert again.status_code == 200, again.json
    assert again.json["uuid"] == first.json["uuid"]
    assert again.headers["Location"] == first.headers["Location"]
    assert [t["uuid"] for t in client.get("/tasks").json["tasks"]] == [first.json["uuid"]]


@pytest.mark.timeout(30)
def test_a_repeated_bulk_post_answers_200_with_its_tasks_and_batch(make_client):
    client, controller = make_client(Echo, max_num_process=1)
    key = _key()
    first = client.post("/tasks", json=[{"n": 1}, {"n": 2}], headers=key)
    again = client.post("/tasks", json=[{"n": 1}, {"n": 2}], headers=key)
    assert (first.status_code, again.status_code) == (202, 200), (first.json, again.json)
    assert [t["uuid"] for t in again.json["tasks"]] == [t["uuid"] for t in first.json["tasks"]]
    assert again.json["batch"] == first.json["batch"]
    assert len(client.get("/tasks").json["tasks"]) == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("second", [
    pytest.param(("/tasks", {"n": 2}), id="other-body"),
    pytest.param(("/tasks?priority=5", {"n": 1}), id="other-priority"),
    pytest.param(("/tasks", [{"n": 1}]), id="bulk-instead"),
])
def test_the_same_key_with_another_body_or_options_is_422(make_client, second):
    client, controller = make_client(Echo, max_num_process=1)
    key = _key()
    assert client.post("/tasks", json={"n": 1}, headers=key).status_code == 202
    url, body = second
    answer = client.post(url, json=body, headers=key)
    assert answer.status_code == 422, answer.json
    assert "Idempotency-Key" in answer.json["message"]
    assert len(client.get("/tasks").json["tasks"]) == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("key", ["", "k" * 256, "caf\u00e9", "tab\there"])
def test_a_bad_key_is_400_and_queues_nothing(make_client, key):
    client, controller = make_client(Echo, max_num_process=1)
    answer = client.post("/tasks", json={"n": 1}, headers={"Idempotency-Key": key})
    assert answer.status_code == 400, answer.json
    assert "Idempotency-Key" in answer.json["message"]
    assert client.get("/tasks").json["tasks"] == []


@pytest.mark.timeout(30)
def test_a_repeat_with_wait_answers_like_a_get_wait(make_client):
    client, controller = make_client(Echo, max_num_process=1)
    key = _key()
    first = client.post("/tasks", json={"n": 3}, headers=key)
    assert first.status_code == 202
    again = client.post("/tasks?wait=20", json={"n": 3}, headers=key)
    assert again.status_code == 200, again.json
    assert again.json["uuid"] == first.json["uuid"]
    assert again.json["status"] == "succeeded" and again.json["result"] == {"n": 3}, again.json


@pytest.mark.timeout(30)
def test_keys_are_scoped_per_controller_and_tenant(make_controller):
    tenant = make_controller(Echo, max_num_process=1, tenant=lambda: request.headers.get("X-Tenant"))
    other = make_controller(Echo, max_num_process=1)
    app = Flask(__name__)
    api = Api(app)
    api.add_resource(MetaMPResource, "/a", endpoint="a", resource_class_args=(tenant,))
    api.add_resource(MetaMPResource, "/b", endpoint="b", resource_class_args=(other,))
    client = app.test_client()
    key = _key()
    alice = client.post("/a", json={"n": 1}, headers={**key, "X-Tenant": "alice"})
    bob = client.post("/a", json={"n": 1}, headers={**key, "X-Tenant": "bob"})
    elsewhere = client.post("/b", json={"n": 1}, headers=key)
    assert [alice.status_code, bob.status_code, elsewhere.status_code] == [202, 202, 202]
    assert len({alice.json["uuid"], bob.json["uuid"], elsewhere.json["uuid"]}) == 3
    assert client.post("/a", json={"n": 1}, headers={**key, "X-Tenant": "bob"}).json["uuid"] == bob.json["uuid"]


@pytest.mark.timeout(30)
def test_a_repeat_is_answered_even_when_the_queue_is_full(make_controller, sqlite_url):
    # A client-only controller runs nothing: its task stays queued and the queue stays full.
    controller = make_controller(Echo, store=sqlite_url, role="client", max_num_queue=1)
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, "/tasks", resource_class_args=(controller,))
    client = app.test_client()
    key = _key()
    assert client.post("/tasks", json={"n": 1}, headers=key).status_code == 202
    assert client.post("/tasks", json={"n": 1}, headers=key).status_code == 200
    assert client.post("/tasks", json={"n": 1}, headers=_key()).status_code == 429


@pytest.mark.timeout(30)
def test_a_key_whose_tasks_were_purged_is_409(make_client):
    client, controller = make_client(Echo, max_num_process=1)
    key = _key()
    uuid = client.post("/tasks?wait=20", json={"n": 1}, headers=key).json["uuid"]
    assert controller.wait(uuid, 20)["status"] == "succeeded"
    assert controller.store.purge(controller.name, time.time() + 60) == 1
    answer = client.post("/tasks", json={"n": 1}, headers=key)
    assert answer.status_code == 409, answer.json
    assert "purged" in answer.json["message"]


@pytest.mark.timeout(30)
def test_idempotency_ttl_from_the_controller_and_the_app(make_controller):
    with pytest.raises(ValueError, match="idempotency_ttl"):
        MetaMPController(Echo, store="memory://", idempotency_ttl=0)
    short = make_controller(Echo, max_num_process=1, idempotency_ttl=0.1)
    first = short.enqueue_once("k", [{"n": 1}])
    time.sleep(0.3)
    later = short.enqueue_once("k", [{"n": 1}])
    assert not first.replayed and not later.replayed  # the key had expired
    assert later.rows[0]["uuid"] != first.rows[0]["uuid"]
    configured = make_controller(Echo, max_num_process=1)
    app = Flask(__name__)
    app.config["MPC_IDEMPOTENCY_TTL"] = 120
    MultiprocessController(app)
    configured.bind(app.config)
    assert configured.idempotency_ttl == 120.0


# -- two gunicorn workers ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_gunicorn_workers_racing_on_one_key_make_one_task(tmp_path, pool):
    write_job_app(tmp_path)
    port = free_port()
    server = pool.start(gunicorn("-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "app:app"),
                        cwd=tmp_path, port=port, log_path=tmp_path / "gunicorn.log", ready_path="/tasks",
                        env={"MPC_STORE_URL": f"sqlite:///{tmp_path}/tasks.sqlite3",
                             "APP_CONFIG": json.dumps({"max_num_process": 1})})
    key = _key()
    start = threading.Barrier(12)
    answers: list[tuple[int, Any]] = []

    def post() -> None:
        start.wait()
        with requests.Session() as session:  # a connection of its own: either worker may take it
            answer = session.post(f"{server.base}/tasks", json={"n": 7}, headers=key, timeout=30)
        answers.append((answer.status_code, answer.json()))

    threads = [threading.Thread(target=post) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(status for status, _ in answers) == [200] * 11 + [202], (answers, server.log())
    assert len({body["uuid"] for _, body in answers}) == 1
    listed = requests.get(f"{server.base}/tasks", timeout=30).json()["tasks"]
    assert [task["uuid"] for task in listed] == [answers[0][1]["uuid"]]
    assert server.stop(timeout=30) == [], server.log()
