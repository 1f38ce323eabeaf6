"""``<prefix>/metrics``: the Prometheus text format, read from the store whichever worker answers; 404 without
prometheus-client; behind the extension's ``decorator=``."""
from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask, abort, request
from flask_restful import Api
from prometheus_client.parser import text_string_to_metric_families

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController
from flask_multiprocess_controller.store import resolve_store

from conftest import free_port, wait_until
from serverproc import JOB_APP, JobApi, gunicorn, poll_until


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def of(found: dict, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_gunicorn_worker_answers_the_stores_figures(tmp_path, pool, sqlite_url):
    (tmp_path / "app.py").write_text(JOB_APP + "\nfrom flask_multiprocess_controller import MultiprocessController\n"
                                               "MultiprocessController(app)\n")
    port = free_port()
    server = pool.start(gunicorn("-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "app:app"),
                        cwd=tmp_path, port=port, log_path=tmp_path / "gunicorn.log", ready_path="/tasks",
                        env={"MPC_STORE_URL": sqlite_url, "APP_CONFIG": json.dumps({"max_num_process": 1})})
    api = JobApi(server.base, 30.0, log=server.log)
    for n in range(3):
        assert api.wait_ended(api.submit(n=n)["uuid"])["status"] == "succeeded"
    gate = tmp_path / "gate"
    held = [api.submit(n=n, gate=str(gate))["uuid"] for n in range(3, 6)]  # one runs, two wait behind it
    store = resolve_store(sqlite_url)
    try:
        wait_until(lambda: store.counts("jobs").get("running") == 1)
        expected = store.counts("jobs")
        assert expected == {"succeeded": 3, "running": 1, "queued": 2}

        scrapes: dict[str, dict] = {}  # worker pid -> what it answered

        def scrape() -> None:
            with requests.Session() as session:  # a connection of its own: either worker may take it
                answer = session.get(f"{server.base}/mpc/metrics", headers={"X-Hold-Worker": "0.2"}, timeout=30)
            assert answer.status_code == 200, answer.text
            assert answer.headers["Content-Type"].startswith("text/plain")
            scrapes[answer.headers["X-Worker-Pid"]] = samples(answer.text)

        def both_workers() -> int:
            pair = [threading.Thread(target=scrape) for _ in range(2)]
            for thread in pair:
                thread.start()
            for thread in pair:
                thread.join()
            return len(scrapes)

        poll_until(both_workers, lambda seen: seen == 2, timeout=30)
        for pid, found in scrapes.items():
            for status in ("queued", "running", "paused", "succeeded", "failed", "lost"):
                assert of(found, "mpc_tasks", controller="jobs", status=status) == expected.get(status, 0), pid
            assert of(found, "mpc_queue_depth", controller="jobs") == 2
            assert of(found, "mpc_tasks_running", controller="jobs") == 1
            assert of(found, "mpc_tasks_ended_recent", controller="jobs", status="succeeded") == 3
            assert of(found, "mpc_task_wait_seconds_gcount", controller="jobs") == 3
            assert of(found, "mpc_task_run_seconds_bucket", controller="jobs", le="+Inf") == 3
            assert of(found, "mpc_serving_processes", host=next(iter(store.known_hosts()))) == 2
            assert of(found, "mpc_store_up", controller="jobs") == 1
            # The per-process figures are the answering worker's own, and say so.
            assert {dict(labels)["pid"] for name, labels in found if name == "mpc_store_errors_total"} == {pid}
    finally:
        gate.touch()
        for uuid in held:
            api.wait_ended(uuid)
        store.close()
    assert server.stop() == []


class Echo(MetaMPTask):
    def execute(self, value: Any = None) -> Any:
        return value


def _app(make_controller: Any, **options: Any) -> tuple[Flask, MetaMPController]:
    controller = make_controller(Echo)
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, "/echo", "/echo/<string:uuid>", resource_class_args=(controller,))
    MultiprocessController(app, **options)
    return app, controller


@pytest.mark.timeout(60)
def test_without_prometheus_client_the_url_answers_404_saying_how_to_install_it(make_controller, monkeypatch):
    app, _ = _app(make_controller)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # its import now fails
    answer = app.test_client().get("/mpc/metrics")
    assert answer.status_code == 404
    assert "pip install 'flask-multiprocess-controller[metrics]'" in answer.get_json()["message"]


@pytest.mark.timeout(60)
def test_the_metrics_are_behind_the_decorator(make_controller):
    def token_required(view: Any) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if request.headers.get("X-Token") != "let-me-in":
                abort(401)
            return view(*args, **kwargs)
        guarded.__name__ = view.__name__
        return guarded

    app, controller = _app(make_controller, decorator=token_required)
    client = app.test_client()
    assert client.post("/echo?wait=30", json={"value": 1}).get_json()["status"] == "succeeded"
    assert client.get("/mpc/metrics").status_code == 401
    answer = client.get("/mpc/metrics", headers={"X-Token": "let-me-in"})
    assert answer.status_code == 200
    text = answer.get_data(as_text=True)
    assert of(samples(text), "mpc_tasks", controller=controller.name, status="succeeded") == 1
    # The Grafana dashboard of the docs queries only metrics the URL exposes.
    dashboard = (Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json").read_text()
    queried = set(re.findall(r"\bmpc_[a-z_]+", dashboard))
    assert queried and {name for name in queried if f"# TYPE {name}" not in text and f"\n{name}{{" not in text} == set()
