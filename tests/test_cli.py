"""``flask mpc``: every command through Flask's test runner, and as real ``flask`` subprocesses against a
live server's store that leave no fork server or task process behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import free_port, wait_until
from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController


class Steps(MetaMPTask):
    def execute(self, steps: int = 3, pause: float = 0.01, gate: str = "", fail: bool = False) -> int:
        for _ in self.track(range(steps)):
            time.sleep(pause)
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.01)
        if fail:
            raise ValueError("told to fail")
        return steps


class StepController(MetaMPController, controller_name="steps"):
    pass


@pytest.fixture
def cli_app(tmp_path):
    controller = StepController(Steps, store=f"sqlite:///{tmp_path}/cli.sqlite3", stop_grace=0.2)
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, "/steps", "/steps/<string:uuid>", resource_class_args=(controller,))
    MultiprocessController(app)
    yield app, controller
    controller.shutdown()


@pytest.mark.timeout(60)
def test_every_command_through_the_test_runner(cli_app, tmp_path):
    app, controller = cli_app
    runner = app.test_cli_runner()
    submitted = runner.invoke(args=["mpc", "submit", "steps", "steps=4", "pause=0.01"])
    assert submitted.exit_code == 0, submitted.output
    uuid = submitted.output.strip()
    waited = runner.invoke(args=["mpc", "wait", uuid])
    assert waited.exit_code == 0, waited.output
    assert "succeeded" in waited.output
    status = runner.invoke(args=["mpc", "status", uuid, "--json"])
    assert json.loads(status.output)["result"] == 4
    human = runner.invoke(args=["mpc", "status", uuid])
    assert "succeeded" in human.output and uuid in human.output
    table = runner.invoke(args=["mpc", "list"])
    assert table.exit_code == 0 and uuid in table.output and "STATUS" in table.output
    listed = json.loads(runner.invoke(args=["mpc", "list", "--json", "--status", "succeeded",
                                            "--controller", "steps", "--limit", "5"]).output)
    assert [t["uuid"] for t in listed] == [uuid]
    failing = runner.invoke(args=["mpc", "submit", "steps", "fail=true"]).output.strip()
    assert runner.invoke(args=["mpc", "wait", failing]).exit_code == 1
    gate = tmp_path / "gate"
    blocked = runner.invoke(args=["mpc", "submit", "steps", f"gate={gate}"]).output.strip()
    wait_until(lambda: controller.status(blocked)["status"] == "running", timeout=20)
    stopped = runner.invoke(args=["mpc", "stop", blocked])
    assert stopped.exit_code == 0 and "stopping" in stopped.output
    assert controller.wait(blocked, timeout=20)["status"] == "stopped"
    purged = runner.invoke(args=["mpc", "purge", "--older-than", "0"])
    assert purged.exit_code == 0 and "Purged 3 task(s)." in purged.output
    assert runner.invoke(args=["mpc", "list", "--json"]).output.strip() == "[]"


@pytest.mark.timeout(60)
def test_user_errors_print_one_line_and_exit_non_zero(cli_app):
    app, _ = cli_app
    runner = app.test_cli_runner()
    for args, words in (
        (["mpc", "status", "00000000-0000-4000-8000-000000000000"], "No task with uuid"),
        (["mpc", "status", "not-a-uuid"], "not a valid task uuid"),
        (["mpc", "stop", "00000000-0000-4000-8000-000000000000"], "No task with uuid"),
        (["mpc", "submit", "nobody"], "No controller is called 'nobody'"),
        (["mpc", "submit", "steps", "steps=many"], "must be an integer"),
        (["mpc", "submit", "steps", "unknown=1"], "Unknown argument 'unknown'"),
        (["mpc", "submit", "steps", "noequals"], "KEY=VALUE"),
    ):
        result = runner.invoke(args=args)
        assert result.exit_code != 0, args
        assert words in result.output, (args, result.output)
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.timeout(60)
def test_rerun_queues_an_ended_task_again_and_refuses_one_that_runs(cli_app, tmp_path):
    app, controller = cli_app
    runner = app.test_cli_runner()
    failed = controller.submit(steps=1, fail=True)
    assert controller.wait(failed, timeout=20)["status"] == "failed"
    rerun = runner.invoke(args=["mpc", "rerun", failed])
    assert rerun.exit_code == 0, rerun.output
    task = controller.wait(rerun.output.strip(), timeout=20)
    assert (task["status"], task["args"], task["rerun_of"]) == ("failed", {"steps": 1, "fail": True}, failed)
    assert controller.status(failed)["reruns"] == [task["uuid"]]
    blocked = controller.submit(gate=str(tmp_path / "never"))
    for uuid, words in ((blocked, "only an ended task"), ("00000000-0000-4000-8000-000000000000", "No task")):
        refused = runner.invoke(args=["mpc", "rerun", uuid])
        assert refused.exit_code != 0 and words in refused.output, refused.output
    controller.stop(blocked)
    assert controller.wait(blocked, timeout=20)["status"] == "stopped"


# -- as a real `flask` command against a live server's store --------------------------------------------

CLI_APP = '''
import os
import time

from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController


class Steps(MetaMPTask):
    def execute(self, steps: int = 3, pause: float = 0.01, gate: str = ""):
        for _ in self.track(range(steps)):
            time.sleep(pause)
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.01)
        return steps


class StepController(MetaMPController, controller_name="steps"):
    pass


mpc = MultiprocessController()
steps = StepController(Steps, stop_grace=0.2)


def create_app():
    app = Flask(__name__, instance_path=os.environ["APP_INSTANCE"])
    Api(app).add_resource(MetaMPResource, "/steps", "/steps/<string:uuid>", resource_class_args=(steps,))
    mpc.init_app(app)
    return app


app = create_app()

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]))
'''


def _flask(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flask", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_flask_mpc_as_a_subprocess_from_another_directory(tmp_path, pool):
    from serverproc import python

    project = tmp_path / "project"
    project.mkdir()
    (project / "cli_app.py").write_text(CLI_APP)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    instance = project / "instance"
    env = {**os.environ, "APP_INSTANCE": str(instance), "PYTHONPATH": str(project)}
    env.pop("MPC_STORE_URL", None)
    port = free_port()
    server = pool.start(python(str(project / "cli_app.py")), cwd=project, port=port, log_path=tmp_path / "server.log",
                        env={"APP_INSTANCE": str(instance), "PORT": str(port)}, ready_path="/steps")
    base = f"http://127.0.0.1:{port}"
    import requests

    queued = requests.post(f"{base}/steps", json={"steps": 5}, timeout=30).json()["uuid"]
    assert requests.get(f"{base}/steps/{queued}?wait=20", timeout=30).json()["status"] == "succeeded"
    before = {p.pid for p in psutil.Process().children(recursive=True)}

    app_arg = ["--app", "cli_app"]
    listed = _flask(app_arg + ["mpc", "list", "--json"], elsewhere, env)
    assert listed.returncode == 0, listed.stderr
    assert [t["uuid"] for t in json.loads(listed.stdout)] == [queued], "the same SQLite file from another directory"
    submitted = _flask(app_arg + ["mpc", "submit", "steps", "steps=10", "pause=0.02"], elsewhere, env)
    assert submitted.returncode == 0, submitted.stderr
    uuid = submitted.stdout.strip()
    waited = _flask(app_arg + ["mpc", "wait", uuid], elsewhere, env)
    assert waited.returncode == 0, waited.stderr + waited.stdout
    task = requests.get(f"{base}/steps/{uuid}", timeout=30).json()
    assert task["status"] == "succeeded" and task["result"] == 10
    assert f"{uuid} started in process {task['pid']}" in server.log(), "the server, not the CLI, ran it"
    gate = tmp_path / "gate"
    blocked = _flask(app_arg + ["mpc", "submit", "steps", f"gate={gate}"], elsewhere, env).stdout.strip()
    wait_until(lambda: requests.get(f"{base}/steps/{blocked}", timeout=30).json()["status"] == "running", timeout=20)
    assert _flask(app_arg + ["mpc", "stop", blocked], elsewhere, env).returncode == 0
    assert requests.get(f"{base}/steps/{blocked}?wait=20", timeout=30).json()["status"] == "stopped"
    status = _flask(app_arg + ["mpc", "status", blocked, "--json"], elsewhere, env)
    assert json.loads(status.stdout)["status"] == "stopped"
    purged = _flask(app_arg + ["mpc", "purge", "--older-than", "0"], elsewhere, env)
    assert purged.returncode == 0 and "Purged 3 task(s)." in purged.stdout
    # The CLI processes left nothing: no fork server, no task process of theirs.
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after - before == set()
    assert not (elsewhere / "instance").exists() and not (elsewhere / "mpc-tasks.sqlite3").exists()
    assert (instance / "mpc-tasks.sqlite3").exists()


@pytest.mark.timeout(60)
def test_drain_and_undrain_through_the_test_runner(cli_app, tmp_path):
    app, controller = cli_app
    runtime = controller.runtime  # this process serves: its host heartbeats in the store
    runner = app.test_cli_runner()
    drained = runner.invoke(args=["mpc", "drain"])  # this host by default
    assert drained.exit_code == 0, drained.output
    assert f"Host {runtime.host} is drained" in drained.output
    assert runtime.host_drained, "the process that drains takes the flag at once"
    listed = json.loads(runner.invoke(args=["mpc", "hosts", "--json"]).output)
    assert [(h["host"], h["drained"], bool(h["since"]), bool(h["heartbeat"])) for h in listed] == [
        (runtime.host, True, True, True)]
    table = runner.invoke(args=["mpc", "hosts"]).output
    assert "HOST" in table and runtime.host in table and "since" in table, table
    waiting = controller.submit(steps=1)
    assert controller.status(waiting)["status"] == "queued"
    undrained = runner.invoke(args=["mpc", "undrain", "--host", runtime.host])
    assert undrained.exit_code == 0 and "is not drained" in undrained.output, undrained.output
    assert controller.wait(waiting, timeout=20)["status"] == "succeeded"
    for args in (["mpc", "drain", "--host", "nowhere"], ["mpc", "undrain", "--host", ""]):
        refused = runner.invoke(args=args)
        assert refused.exit_code != 0 and "Traceback" not in refused.output, refused.output
        assert len(refused.output.strip().splitlines()) == 1, refused.output
