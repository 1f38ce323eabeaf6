"""Lean events end to end: a real task with a large argument and many progress writes leaves small events
in the feed and the live stream, while its callbacks and waits still give the whole task object; a callback
that is never delivered is dropped after ``callback_max_age``, logged and counted in ``/mpc/health``."""
from __future__ import annotations

import json
import logging
import time
import uuid as uuid_module
from typing import Any

import pytest
from conftest import wait_until
from flask import Flask
from flask_restful import Api
from test_events import Feed
from test_lifecycle import Receiver

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController
from flask_multiprocess_controller.presenter import TASK_KEYS
from flask_multiprocess_controller.store import resolve_store

BLOB = "x" * 900_000


class Chatty(MetaMPTask):
    """Reports progress a few times a second (progress is written at most every 0.25 s), then answers."""

    def execute(self, blob: str = "", steps: int = 8) -> int:
        for n in range(steps):
            self.upload_status({"step": n})
            time.sleep(0.3)
        return len(blob)


def mount(app: Flask, controller: MetaMPController) -> None:
    Api(app).add_resource(type(f"R{uuid_module.uuid4().hex}", (MetaMPResource,), {}), "/chatty",
                          "/chatty/<string:uuid>", resource_class_args=(controller,))


def sse_messages(text: str) -> list[dict[str, Any]]:
    """The messages of an SSE body that have an event name, as {"id", "event", "data"}."""
    found = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            found.append({"id": fields.get("id"), "event": fields["event"], "data": json.loads(fields["data"])})
    return found


@pytest.mark.timeout(90)
def test_a_task_with_a_large_argument_writes_small_events_and_whole_callbacks(make_controller, sqlite_url):
    with Receiver() as receiver:
        controller = make_controller(Chatty, store=sqlite_url, callback_url=receiver.url)
        app = Flask(__name__)
        app.config["MPC_MAX_WAIT"] = 1.0  # the event stream below ends on its own
        mount(app, controller)
        MultiprocessController(app)
        feed = Feed(resolve_store(sqlite_url))
        since = feed.cursor
        uuid = controller.submit(blob=BLOB, steps=8)
        done = controller.wait(uuid, timeout=60)
        assert done["status"] == "succeeded" and done["result"] == len(BLOB)
        assert done["args"] == {"blob": BLOB, "steps": 8}  # a wait ends with the whole task object

        events = feed.of(uuid)
        kinds = [e["kind"] for e in events]
        assert kinds[:2] == ["queued", "started"] and kinds[-1] == "ended"
        assert kinds.count("progress") >= 3
        for event in events:  # what changed, never the argument
            assert "args" not in event["task"] and "x" * 1000 not in json.dumps(event), event["kind"]
        assert sum(len(json.dumps(e)) for e in events) < 64 * 1024
        progress = [e["task"] for e in events if e["kind"] == "progress"]
        assert all(t["progress"] in ({"step": n} for n in range(8)) and t["uuid"] == uuid for t in progress)

        # The callbacks are the whole task object, argument included, as they always were.
        bodies = wait_until(lambda: receiver.both_events(uuid), timeout=30)
        for kind in ("started", "ended"):
            task = bodies[kind]["task"]
            assert set(task) == set(TASK_KEYS), kind
            assert task["args"] == {"blob": BLOB, "steps": 8}, kind
        assert bodies["ended"]["task"]["result"] == len(BLOB)
        assert bodies["started"]["task"]["status"] == "running" and bodies["started"]["task"]["pid"] is not None

        # The live stream replays the task's events from the store: each shows what it carries.
        body = app.test_client().get(f"/mpc/events?controller={controller.name}",
                                     headers={"Last-Event-ID": since}).get_data(as_text=True)
        assert "x" * 1000 not in body
        shown = [m for m in sse_messages(body) if m["data"].get("uuid") == uuid]
        assert [m["event"] for m in shown] == kinds
        for message in shown:
            data = message["data"]
            assert "args" not in data and data["status"] and data["controller"] == controller.name
            if message["event"] == "progress":
                assert set(data) >= {"uuid", "status", "msg", "progress", "percent", "attempt"}
                assert "result" not in data and "created_at" not in data
        assert shown[-1]["data"]["result"] == len(BLOB) and shown[-1]["data"]["ended_at"]


class Quick(MetaMPTask):
    def execute(self) -> str:
        return "done"


@pytest.mark.timeout(90)
def test_a_callback_never_delivered_is_dropped_after_callback_max_age_logged_and_counted(make_controller, caplog):
    with Receiver(fail_first=10 ** 9) as receiver:  # answers 500 to everything
        controller = make_controller(Quick, store="memory://", callback_url=receiver.url, callback_max_age=0.05)
        app = Flask(__name__)
        mount(app, controller)
        MultiprocessController(app)
        client = app.test_client()
        assert client.get("/mpc/health").get_json()["controllers"][controller.name]["callbacks_dropped"] == 0
        uuid = controller.submit()
        assert controller.wait(uuid, timeout=30)["status"] == "succeeded"
        store = controller.store
        wait_until(lambda: len(store.unacked(controller.name)) == 2, timeout=10)
        newest = max(e["at"] for e in store.unacked(controller.name))
        wait_until(lambda: store.now() > newest + 0.06, timeout=10, interval=0.01)
        runtime = controller.local_runtime()
        assert runtime is not None
        with caplog.at_level(logging.WARNING):
            runtime.purge()  # what the keeper does every hour
        dropped = [r.getMessage() for r in caplog.records if "callback_max_age" in r.getMessage()]
        assert len(dropped) == 2 and all(uuid in m for m in dropped)
        assert {"started", "ended"} == {kind for kind in ("started", "ended") for m in dropped if f"The {kind} " in m}
        assert store.unacked(controller.name) == []
        health = client.get("/mpc/health").get_json()
        assert health["controllers"][controller.name]["callbacks_dropped"] == 2


@pytest.mark.timeout(60)
def test_callback_max_age_comes_from_the_app_config_and_must_be_positive(make_controller):
    controller = make_controller(Quick, store="memory://")
    assert controller.callback_max_age == 7 * 24 * 3600.0
    app = Flask(__name__)
    app.config["MPC_CALLBACK_MAX_AGE"] = 120
    extension = MultiprocessController()  # made before the resource is mounted, as the docs say: the controller
    mount(app, controller)  # then waits for the app's settings (whatever earlier tests of this process made)
    extension.init_app(app)
    assert controller.callback_max_age == 120.0
    for bad in (0, -1, "soon"):
        with pytest.raises((TypeError, ValueError), match="callback_max_age"):
            MetaMPController(None, callback_max_age=bad)


@pytest.mark.timeout(30)
def test_a_sqlite_feed_of_an_older_version_keeps_its_events_and_callbacks(tmp_path):
    """The feed and the outbox of a file made before events were bounded get their new columns: the
    events kept are counted and filterable by tenant, and the outbox entries keep their events."""
    import sqlite3

    from flask_multiprocess_controller import SQLiteStore

    path = tmp_path / "old-feed.sqlite3"
    task = {"uuid": "u-old", "controller": "c", "status": "running", "tenant": "t1", "attempt": 1}
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE mpc_events (cursor INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, uuid TEXT NOT NULL,
            controller TEXT NOT NULL, at REAL NOT NULL, emitter TEXT, task TEXT NOT NULL);
        CREATE TABLE mpc_outbox (cursor INTEGER PRIMARY KEY, controller TEXT NOT NULL);
    """)
    old.execute("INSERT INTO mpc_events (kind, uuid, controller, at, emitter, task) VALUES "
                "('started', 'u-old', 'c', 1.0, 'w', ?)", (json.dumps(task),))
    old.execute("INSERT INTO mpc_outbox (cursor, controller) VALUES (1, 'c')")
    old.commit()
    old.close()
    store = SQLiteStore(str(path))
    try:
        (pending,) = store.unacked("c")
        assert (pending["cursor"], pending["kind"], pending["task"]) == ("1", "started", task)
        assert store.changes("0", tenant="t1").events == [pending]
        assert store.changes("0", tenant="t2").events == []
        store.max_event_bytes = 1  # the old event is counted: the next write prunes it
        store.enqueue([{"uuid": "u-new", "controller": "c", "status": "queued", "priority": 0, "args": {},
                        "created_at": time.time(), "timeout": None, "attempt": 0, "stop_requested": False}], -1)
        assert store.changes("0").reset is True
        assert store.unacked("c") == [pending]  # the outbox keeps it
    finally:
        store.close()
