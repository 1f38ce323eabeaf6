"""What a task writes to its descriptors 1 and 2 lands in its log, in both process kinds: a fresh
process per task (pipes from birth, read by the serving process) and a reused one (pipes from its
first task on, pumped from the task process and cut at each task's end)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from flask_multiprocess_controller import MetaMPTask

from flask_multiprocess_controller.engine import forkserver


class Writer(MetaMPTask):
    """Writes through print(), straight to descriptor 2, and from a process of its own."""

    def execute(self, tag: str = "") -> dict:
        print(f"printed {tag}")
        sys.stderr.write(f"to stderr {tag}\n")
        subprocess.run([sys.executable, "-c", f"print('from a child process {tag}')"], check=True)
        print(f"no newline at the end {tag}", end="")
        return {"threads": threading.active_count()}


class OtherWriter(Writer):
    """The same task under another controller."""


def _log(controller, uuid: str) -> list[str]:
    return [text for _, text in controller.store.logs.read(uuid)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_tasks_per_child", [1, 0], ids=["fresh", "reused"])
def test_everything_a_task_writes_is_in_its_log_and_on_the_console(make_controller, sqlite_url, capfd,
                                                                   max_tasks_per_child):
    controller = make_controller(Writer, store=sqlite_url, max_tasks_per_child=max_tasks_per_child)
    for tag in ("one", "two"):  # two in a row: a reused process keeps each task's lines apart
        task = controller.wait(controller.submit(tag=tag), timeout=30)
        assert task["status"] == "succeeded", task
        # Lines of one descriptor keep their order; stdout and stderr may interleave either way.
        lines = _log(controller, task["uuid"])
        assert sorted(lines) == sorted([f"printed {tag}", f"to stderr {tag}", f"from a child process {tag}",
                                        f"no newline at the end {tag}"]), lines
        out = [line for line in lines if "stderr" not in line]
        assert out == [f"printed {tag}", f"from a child process {tag}", f"no newline at the end {tag}"], lines
    if max_tasks_per_child == 1:
        assert task["result"]["threads"] == 1, "a fresh task process runs the task on its only thread"
    console = capfd.readouterr()
    assert "printed one" in console.out and "to stderr two" in console.err


@pytest.mark.timeout(60)
def test_a_controller_made_after_tasks_ran_starts_its_own(make_controller, sqlite_url):
    """The pipes read here are closed once their task ended; a fork server forked later must not
    take their numbers for descriptors of the serving process (its own control socket, say)."""
    first = make_controller(Writer, store=sqlite_url)
    for tag in ("a", "b"):
        assert first.wait(first.submit(tag=tag), timeout=30)["status"] == "succeeded"
    # Every descriptor a new fork server would close as the serving process's own is still open here.
    for fd in list(forkserver._PARENT_ONLY_FDS):
        os.fstat(fd)
    second = make_controller(OtherWriter, store=sqlite_url)
    assert second.wait(second.submit(tag="c"), timeout=30)["status"] == "succeeded"


class Redirector(MetaMPTask):
    """Points its descriptors 1 and 2 elsewhere when asked (and leaves them so), then prints."""

    def execute(self, tag: str = "", away: bool = False) -> int:
        if away:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.close(devnull)
        print(f"printed {tag}", flush=True)
        return os.getpid()


@pytest.mark.timeout(60)
def test_a_reused_process_captures_each_task_even_after_one_pointed_its_descriptors_elsewhere(
        make_controller, sqlite_url):
    controller = make_controller(Redirector, store=sqlite_url, max_num_process=1, max_tasks_per_child=0)
    tasks = [controller.wait(controller.submit(tag=tag, away=tag == "away"), timeout=30)
             for tag in ("before", "away", "after")]
    assert [t["status"] for t in tasks] == ["succeeded"] * 3, tasks
    assert len({t["result"] for t in tasks}) == 1, "the three ran in one process"
    logs = {tag: _log(controller, t["uuid"]) for tag, t in zip(("before", "away", "after"), tasks)}
    assert logs == {"before": ["printed before"], "away": [], "after": ["printed after"]}, logs
