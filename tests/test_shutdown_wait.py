"""``MPC_SHUTDOWN_WAIT``: a serving process that shuts down first lets its running tasks finish on their own
(claiming nothing meanwhile), and stops only what is still running when the wait is over."""
from __future__ import annotations

import json
import signal

import pytest
from flask import Flask

from flask_multiprocess_controller import MetaMPController, MetaMPTask, MultiprocessController
from flask_multiprocess_controller.store import resolve_store

from serverproc import JobApi, free_port, python, write_job_app


class Noop(MetaMPTask):
    def execute(self) -> None:
        return None


def test_shutdown_wait_comes_from_the_keyword_the_app_or_the_environment(monkeypatch):
    monkeypatch.delenv("MPC_SHUTDOWN_WAIT", raising=False)
    made = []
    try:
        made.append(MetaMPController(Noop, store="memory://"))
        assert made[-1].shutdown_wait == 0
        monkeypatch.setenv("MPC_SHUTDOWN_WAIT", "7.5")
        made.append(MetaMPController(Noop, store="memory://"))
        assert made[-1].shutdown_wait == 7.5
        made.append(MetaMPController(Noop, store="memory://", shutdown_wait=3))
        app = Flask(__name__)
        app.config["MPC_SHUTDOWN_WAIT"] = 12
        MultiprocessController(app)
        assert [c.shutdown_wait for c in made] == [12.0, 12.0, 3.0], "the keyword wins, then the app's config"
        assert made[-1].runtime.config.shutdown_wait == 3.0
        monkeypatch.setenv("MPC_SHUTDOWN_WAIT", "soon")
        with pytest.raises(ValueError, match="MPC_SHUTDOWN_WAIT"):
            MetaMPController(Noop, store="memory://")
        with pytest.raises(ValueError, match="MPC_SHUTDOWN_WAIT"):
            MetaMPController(Noop, store="memory://", shutdown_wait=-1)
    finally:
        for controller in made:
            controller.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("wait, ended", [("10", "succeeded"), ("0", "stopped")], ids=["wait-10", "no-wait"])
def test_sigterm_lets_a_running_task_finish_within_the_wait(wait, ended, tmp_path, pool):
    write_job_app(tmp_path)
    store_url = f"sqlite:///{tmp_path}/tasks.sqlite3"
    port = free_port()
    server = pool.start(python("app.py"), cwd=tmp_path, port=port, log_path=tmp_path / "server.log",
                        env={"PORT": str(port), "MPC_STORE_URL": store_url, "MPC_SHUTDOWN_WAIT": wait,
                             "MPC_HANDOVER_WINDOW": "0",
                             "APP_CONFIG": json.dumps({"max_num_process": 1, "stop_grace": 0.5})},
                        ready_path="/tasks")
    api = JobApi(server.base, log=server.log)
    running = api.submit(n=1, sleep=2)["uuid"]
    api.wait_running(running)
    queued = api.submit(n=2)["uuid"]

    survivors = server.stop(signal.SIGTERM, timeout=30)
    assert survivors == [], f"left after SIGTERM: {survivors}\n{server.log()}"
    assert "Traceback" not in server.log(), server.log()
    store = resolve_store(store_url)
    try:
        row, waiting = store.get(running), store.get(queued)
    finally:
        store.close()
    assert row is not None and waiting is not None
    assert row["status"] == ended, (row, server.log())
    if ended == "succeeded":
        assert row["result"]["n"] == 1 and row["error"] is None, row
    else:
        assert row["error"]["type"] == "Shutdown", row
    assert waiting["status"] == "queued", "nothing is claimed while the server shuts down"
