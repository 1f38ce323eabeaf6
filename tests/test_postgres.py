"""What only the PostgreSQL store does: the transactional enqueue in the application's own transaction
(psycopg, SQLAlchemy, Flask-SQLAlchemy), its schema and its version, outages of the server, and a URL whose
password is shown nowhere. The store contract itself runs on it in ``tests/test_store_contract.py``.
"""
from __future__ import annotations

import os
import threading
import time
import uuid as uuid_module
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import (
    MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController, QueueFull,
)
from flask_multiprocess_controller.exceptions import StoreError, StoreUnavailable
from flask_multiprocess_controller.store import resolve_store
from flask_multiprocess_controller.store.claimrules import ClaimRules
from flask_multiprocess_controller.store.postgres import PostgresStore
from flask_multiprocess_controller.store.postgres_schema import SCHEMA_VERSION, SchemaTooNew

from conftest import wait_until
from pgserver import PASSWORD


class Report(MetaMPTask):
    """Writes a marker file named after the customer, so a test sees that (and how often) it ran."""

    def execute(self, customer: int, folder: str) -> dict:
        with open(os.path.join(folder, f"ran-{customer}"), "a") as f:
            f.write("x")
        return {"customer": customer}


def _controller(make_controller: Any, url: str, **kwargs: Any) -> MetaMPController:
    return make_controller(Report, store=url, max_num_process=2, **kwargs)


def _events_of(store: PostgresStore, uuid: str) -> list[dict]:
    return [e for e in store.changes("0", limit=100_000).events if e["uuid"] == uuid]


# -- the transactional enqueue -------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_task_submitted_in_a_transaction_is_invisible_until_commit_then_runs_once(postgres_url, make_controller,
                                                                                     tmp_path):
    controller = _controller(make_controller, postgres_url)
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, "/reports", "/reports/<string:uuid>", resource_class_args=(controller,))
    client = app.test_client()
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, customer int NOT NULL)")
        conn.commit()
        conn.execute("INSERT INTO orders (customer) VALUES (7)")
        uuid = controller.submit(customer=7, folder=str(tmp_path), connection=conn)
        time.sleep(1.0)  # room for a slot that could see it to start it
        assert client.get(f"/reports/{uuid}").status_code == 404, "visible to readers before the commit"
        assert controller.store.get(uuid) is None
        assert not (tmp_path / "ran-7").exists(), "started by a slot before the commit"
        conn.commit()
    ended = controller.wait(uuid, timeout=30)
    assert ended["status"] == "succeeded" and ended["result"] == {"customer": 7}
    assert (tmp_path / "ran-7").read_text() == "x"
    assert client.get(f"/reports/{uuid}").get_json()["status"] == "succeeded"
    kinds = [e["kind"] for e in _events_of(controller.store, uuid)]
    assert kinds[0] == "queued" and kinds.count("queued") == 1 and kinds[-1] == "ended"


@pytest.mark.timeout(60)
def test_a_rolled_back_transaction_leaves_no_task_no_event_and_no_callback(postgres_url, make_controller, tmp_path):
    controller = _controller(make_controller, postgres_url)
    store = controller.store
    since = store.latest_cursor()
    with psycopg.connect(postgres_url) as conn:
        uuid = controller.submit(customer=8, folder=str(tmp_path), connection=conn)
        batch = controller.submit_many([{"customer": 9, "folder": str(tmp_path)}], connection=conn)
        conn.rollback()
    marker = controller.submit(customer=10, folder=str(tmp_path))  # a task after it, to know the feed moved on
    assert controller.wait(marker, timeout=30)["status"] == "succeeded"
    for gone in (uuid, batch.tasks[0]["uuid"]):
        assert store.get(gone) is None
        assert [e for e in store.changes(since, limit=100_000).events if e["uuid"] == gone] == []
        assert all(e["uuid"] != gone for e in store.unacked(controller.name, limit=1000))
    assert not (tmp_path / "ran-8").exists() and not (tmp_path / "ran-9").exists()
    assert store._query(f"SELECT count(*) FROM {store.schema}.pending_events")[0][0] == 0


@pytest.mark.timeout(60)
def test_flask_sqlalchemy_session_writes_the_model_and_the_task_together(postgres_url, make_controller, tmp_path):
    from flask_sqlalchemy import SQLAlchemy

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = postgres_url.replace("postgresql://", "postgresql+psycopg://")
    db = SQLAlchemy(app)

    class Order(db.Model):  # type: ignore[name-defined]
        id = db.Column(db.Integer, primary_key=True)
        customer = db.Column(db.Integer, nullable=False)

    reports = _controller(make_controller, postgres_url)
    with app.app_context():
        db.create_all()
        db.session.add(Order(customer=11))
        kept = reports.submit(customer=11, folder=str(tmp_path), connection=db.session)
        db.session.commit()
        db.session.add(Order(customer=12))
        dropped = reports.submit(customer=12, folder=str(tmp_path), connection=db.session)
        db.session.rollback()
        assert [o.customer for o in Order.query.all()] == [11]
        db.session.remove()
        db.engine.dispose()
    assert reports.wait(kept, timeout=30)["status"] == "succeeded"
    assert reports.store.get(dropped) is None and not (tmp_path / "ran-12").exists()


@pytest.mark.timeout(60)
def test_sqlalchemy_connection_and_autocommit_psycopg_connection(postgres_url, make_controller, tmp_path):
    import sqlalchemy

    reports = _controller(make_controller, postgres_url)
    engine = sqlalchemy.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            in_core = reports.submit(customer=13, folder=str(tmp_path), connection=conn)
            assert reports.store.get(in_core) is None
            conn.commit()
    finally:
        engine.dispose()
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # no transaction open: one of its own
        alone = reports.submit(customer=14, folder=str(tmp_path), connection=conn)
        assert reports.store.get(alone)["status"] in ("queued", "running", "succeeded")
    for uuid in (in_core, alone):
        assert reports.wait(uuid, timeout=30)["status"] == "succeeded"


@pytest.mark.timeout(60)
def test_a_refused_submit_leaves_the_application_s_transaction_usable(postgres_url, make_controller, tmp_path):
    reports = _controller(make_controller, postgres_url, max_num_queue=0)
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE notes (body text)")
        conn.execute("INSERT INTO notes VALUES ('before')")
        with pytest.raises(QueueFull):
            reports.submit(customer=15, folder=str(tmp_path), connection=conn)
        conn.execute("INSERT INTO notes VALUES ('after')")  # the transaction was not aborted
        conn.commit()
        assert [r[0] for r in conn.execute("SELECT body FROM notes ORDER BY body")] == ["after", "before"]
    assert reports.store.list_tasks(reports.name) == []


@pytest.mark.timeout(60)
def test_a_connection_to_another_database_or_store_is_refused_clearly(postgres_server, postgres_url, make_controller,
                                                                       tmp_path):
    reports = _controller(make_controller, postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS elsewhere")
        admin.execute("CREATE DATABASE elsewhere")
    try:
        with psycopg.connect(postgres_server.url("elsewhere")) as conn:
            conn.execute("CREATE TABLE t (x int)")
            with pytest.raises(StoreError, match="not connected to the database of the store") as info:
                reports.submit(customer=16, folder=str(tmp_path), connection=conn)
            assert PASSWORD not in str(info.value)
            conn.execute("INSERT INTO t VALUES (1)")  # still usable
            conn.commit()
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("DROP DATABASE elsewhere WITH (FORCE)")
    with pytest.raises(StoreError, match="connection= got"):
        reports.submit(customer=17, folder=str(tmp_path), connection=object())


@pytest.mark.timeout(60)
def test_connection_needs_the_postgresql_store(make_controller, tmp_path):
    reports = make_controller(Report, store=f"sqlite:///{tmp_path / 'tasks.sqlite3'}")
    with pytest.raises(TypeError, match="PostgreSQL store"):
        reports.submit(customer=18, folder=str(tmp_path), connection=object())


# -- the schema ----------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_the_schema_is_made_on_first_use_with_its_version_and_a_newer_one_is_refused(postgres_url):
    store = PostgresStore(postgres_url)
    other = PostgresStore(postgres_url, schema="app_two")
    try:
        assert store.schema == "mpc"
        [(version,)] = store._query("SELECT value FROM mpc.meta WHERE key = 'schema_version'")
        assert version == SCHEMA_VERSION
        tables = {name for (name,) in store._query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'mpc'")}
        assert {"tasks", "events", "outbox", "meta", "schedules", "logs"} <= tables
        public = store._query("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
        assert public == [(0,)], "nothing is made outside the store's schema"
        row = {"uuid": str(uuid_module.uuid4()), "controller": "c", "status": "queued", "priority": 0, "args": {},
               "created_at": time.time(), "timeout": None, "attempt": 0, "stop_requested": False}
        store.enqueue([row], -1)
        assert other.get(row["uuid"]) is None, "two schemas are two stores"
        # A field added by a later release (here: one dropped) is added by the next store opened, data kept.
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("ALTER TABLE mpc.tasks DROP COLUMN state_saved_at")
        PostgresStore(postgres_url).close()
        assert store.get(row["uuid"])["state_saved_at"] is None
        store._query("UPDATE mpc.meta SET value = %s WHERE key = 'schema_version' RETURNING 1", (SCHEMA_VERSION + 1,))
        with pytest.raises(SchemaTooNew, match="newer") as info:
            PostgresStore(postgres_url)
        assert PASSWORD not in str(info.value)
        assert store.get(row["uuid"])["uuid"] == row["uuid"], "the newer data is left as it was"
    finally:
        store.close()
        other.close()


@pytest.mark.timeout(60)
def test_the_schema_comes_from_mpc_pg_schema_and_a_bad_name_is_refused(postgres_url, monkeypatch):
    monkeypatch.setenv("MPC_PG_SCHEMA", "from_env")
    store = resolve_store(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        assert isinstance(store, PostgresStore) and store.schema == "from_env"
    finally:
        store.close()
    monkeypatch.setenv("MPC_PG_SCHEMA", "Robert'); DROP TABLE x;--")
    with pytest.raises(StoreError, match="lower-case identifier"):
        resolve_store(postgres_url)


# -- outages and the password --------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_a_stopped_server_gives_store_unavailable_until_it_is_back(postgres_server, postgres_url):
    store = PostgresStore(postgres_url)
    try:
        row = {"uuid": str(uuid_module.uuid4()), "controller": "c", "status": "queued", "priority": 0,
               "args": {}, "created_at": time.time(), "timeout": None, "attempt": 0, "stop_requested": False}
        store.enqueue([row], -1)
        since = store.latest_cursor()
        postgres_server.stop()
        try:
            for call in (lambda: store.get(row["uuid"]), lambda: store.claim("c", "o", 5),
                         lambda: store.changes(since, timeout=0.5), lambda: store.heartbeat("o")):
                with pytest.raises(StoreUnavailable) as info:
                    call()
                assert isinstance(info.value.__cause__, psycopg.OperationalError)
                assert PASSWORD not in str(info.value) and "***" in str(info.value)
        finally:
            postgres_server.start()
        claimed = wait_until(lambda: _quietly(lambda: store.claim("c", "o", 5)), timeout=30)
        assert claimed["uuid"] == row["uuid"]
        assert store.counts("c") == {"running": 1}
    finally:
        store.close()


@pytest.mark.timeout(90)
def test_the_listener_reconnects_after_a_restart_and_wakes_waiters_again(postgres_server, postgres_url):
    """The listener sleeps on its connection's socket: a server that went away must still be noticed, the
    connection made again, and the stores woken by each later notification (a waiter would otherwise rely on
    its 5 s safety look)."""
    waiting, writer = PostgresStore(postgres_url), PostgresStore(postgres_url)
    try:
        waiting.changes(waiting.latest_cursor(), timeout=0.05)  # subscribed: the listener runs
        postgres_server.restart(down_for=1.0)
        wait_until(lambda: _quietly(writer.latest_cursor) is not None, timeout=30)
        wait_until(lambda: (_quietly(lambda: writer._query(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %%'")) or [(0,)])[0][0] == 1, timeout=30)
        for _ in range(2):  # twice: the second wake-up cannot be the one that follows the reconnection
            before = waiting._generation  # counts the listener's wake-ups of this store (the writer is another)
            row = {"uuid": str(uuid_module.uuid4()), "controller": "c", "status": "queued", "priority": 0,
                   "args": {}, "created_at": time.time(), "timeout": None, "attempt": 0, "stop_requested": False}
            writer.enqueue([row], -1)
            wait_until(lambda: waiting._generation > before, timeout=30)
        listeners = [t for t in threading.enumerate() if t.name.startswith("mpc-pg-listener")]
        assert len(listeners) == 1 and listeners[0].is_alive()
    finally:
        waiting.close()
        writer.close()


def _quietly(call: Any) -> Any:
    try:
        return call()
    except StoreUnavailable:
        return None


@pytest.mark.timeout(60)
def test_the_password_is_shown_nowhere(postgres_url, make_controller, tmp_path, caplog):
    reports = _controller(make_controller, postgres_url)
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, "/reports", "/reports/<string:uuid>", resource_class_args=(reports,))
    MultiprocessController(app)
    client = app.test_client()
    uuid = client.post("/reports", json={"customer": 19, "folder": str(tmp_path)}).get_json()["uuid"]
    assert client.get(f"/reports/{uuid}?wait=20").get_json()["status"] == "succeeded"
    health = client.get("/mpc/health")
    assert health.status_code == 200
    shown = health.get_json()["controllers"][reports.name]["store"]
    assert shown.startswith("postgresql://postgres:***@127.0.0.1:")
    pages = [health.get_data(as_text=True), client.get("/mpc/").get_data(as_text=True),
             client.get("/mpc/api/tasks").get_data(as_text=True), repr(reports.store)]
    for page in pages:
        assert PASSWORD not in page
    assert PASSWORD not in caplog.text
    port = postgres_url.rsplit(":", 1)[1].split("/")[0]
    with pytest.raises(StoreUnavailable) as info:  # nothing listens there
        PostgresStore(postgres_url.replace(f":{port}/", ":1/"))
    assert PASSWORD not in str(info.value)


@pytest.mark.timeout(60)
def test_the_stores_of_one_database_share_one_listening_connection_per_process(postgres_url):
    stores = [PostgresStore(postgres_url) for _ in range(3)]
    writer = PostgresStore(postgres_url)
    try:
        for store in stores:
            store.changes(store.latest_cursor(), timeout=0.05)  # each has waited: each is subscribed
        listeners = [t for t in threading.enumerate() if t.name.startswith("mpc-pg-listener")]
        assert len(listeners) == 1
        [(connections,)] = writer._query("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %%'")
        assert connections == 1
        since = [store.latest_cursor() for store in stores]
        found: list = []
        waiters = [threading.Thread(target=lambda s=s, c=c: found.append(s.changes(c, timeout=30).events))
                   for s, c in zip(stores, since)]
        for waiter in waiters:
            waiter.start()
        row = {"uuid": str(uuid_module.uuid4()), "controller": "c", "status": "queued", "priority": 0, "args": {},
               "created_at": time.time(), "timeout": None, "attempt": 0, "stop_requested": False}
        writer.enqueue([row], -1)  # another store object: only the notification wakes the three
        for waiter in waiters:
            waiter.join(30)
        assert [[e["uuid"] for e in events] for events in found] == [[row["uuid"]]] * 3
        for store in stores[:2]:
            store.close()
        assert listeners[0].is_alive(), "one subscriber is left"
    finally:
        for store in stores + [writer]:
            store.close()
    assert not listeners[0].is_alive()


@pytest.mark.timeout(60)
def test_claims_of_two_controllers_on_one_host_share_its_capacity(postgres_url):
    """Two controllers claim on one host at once (each controller has its own claim lock): the host's lock
    makes their capacity checks one step, so the host never runs more than fits."""
    store = PostgresStore(postgres_url)
    for controller in ("cap-one", "cap-two"):
        store.enqueue([{"uuid": str(uuid_module.uuid4()), "controller": controller, "status": "queued",
                        "priority": 0, "args": {}, "created_at": time.time(), "timeout": None, "attempt": 0,
                        "stop_requested": False, "resources": {"memory": 2}} for _ in range(25)], -1)
    rules = ClaimRules(host="host-a", capacity={"memory": 3})  # one task at a time fits
    seen: list[int] = []
    start = threading.Barrier(4)

    def claimer(controller: str, n: int) -> None:
        mine = PostgresStore(postgres_url)
        owner = f"host-a:{100 + n}:1700000000.0"
        try:
            start.wait()
            while mine.counts(controller).get("queued"):
                row = mine.claim(controller, owner, 10, rules)
                if row is not None:
                    seen.append(sum(mine.counts(c).get("running", 0) for c in ("cap-one", "cap-two")))
                    mine.finish(row["uuid"], "succeeded", owner=owner)
        finally:
            mine.close()

    threads = [threading.Thread(target=claimer, args=(controller, n))
               for n, controller in enumerate(("cap-one", "cap-two", "cap-one", "cap-two"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    assert len(seen) == 50 and max(seen) == 1
