"""The benchmark tasks served by the upstream Flask-Multiprocess-Controller 0.1.1 release.

Built the way the release's README builds an app: a ``MetaMPTask`` subclass, a ``MetaMPController``
subclass with ``max_num_process=2``, the ``MetaMPResource`` mounted on a Flask app through
Flask-RESTful, served by ``app.run`` (Flask 1.1's development server, threaded). Default logging.

Run by the upstream virtual environment's Python, never with this repository on ``sys.path``:

    .venv-upstream/bin/python -I -u upstream_app.py --port P --results DIR --checkpoint-every S

The one addition to 0.1.1's API: the release drops the value ``execute`` returns (its exception
catcher returns ``None``) and its GET only says "running" (with ``progressNum``) or "no process
linked" (queued, or ended). So each task writes its value to ``DIR/<ticket>.json``, ``ticket`` being
a key the client chooses and POSTs with the task's arguments, and the controller's GET, when
given that ticket, answers with ``result`` once the file exists (else with upstream's answer).

This file imports nothing from the benchmark (it runs in another environment), so it repeats
:func:`bench.peers.base.busy_step`; the checkpoint interval comes on the command line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import flask
import flask_multiprocess_controller
import werkzeug
from flask import Flask
from flask_restful import Api
from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask

#: Set from the command line before the controller forks any task.
RESULTS_DIR = Path(".")
CHECKPOINT_EVERY = 0.01


def busy_step() -> int:
    """The fixed unit of work of the progress loop (same as ``bench.peers.base.busy_step``)."""
    total = 0
    for i in range(40):
        total += i * i
    return total


def _store(ticket: str, value: Any) -> None:
    """Write ``value`` for ``ticket`` atomically (the reader never sees half a file)."""
    path = RESULTS_DIR / f"{ticket}.json"
    partial = path.with_suffix(".part")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def _load(ticket: str) -> Optional[list]:
    """``[value]`` if the task with ``ticket`` stored one, else ``None``."""
    try:
        return [json.loads((RESULTS_DIR / f"{ticket}.json").read_text())]
    except FileNotFoundError:
        return None


class BenchTask(MetaMPTask):
    """Every benchmark task, chosen by ``op``; the POSTed JSON body arrives as keyword arguments."""

    def execute(self, op: str, ticket: str, **kwargs: Any) -> None:
        started = time.time()  # the stamp task's value: the first line of the task
        if op == "add":
            value = kwargs["x"] + kwargs["y"]
        elif op == "stamp":
            value = started
        elif op == "checkpointing":
            while True:  # stopped by DELETE: set_checkpoint raises AbortException
                time.sleep(CHECKPOINT_EVERY)
                self.set_checkpoint()
        elif op == "progress":
            report = kwargs["report"]
            began = time.perf_counter()
            for step in range(kwargs["iterations"]):
                busy_step()
                if report:
                    self.upload_status(step + 1)
            value = time.perf_counter() - began
        else:
            raise ValueError(f"unknown op {op!r}")
        _store(ticket, value)


class BenchController(MetaMPController):
    """Upstream's controller; GET with a ticket answers with the stored value once there is one.

    The value is looked up before upstream's own GET and again after it, so a task that ends
    between the two is never reported as "no process linked" without its value, and a GET that
    0.1.1's bookkeeping fails (a ``KeyError``, HTTP 500) still finds a value that was stored.
    """

    def get(self, *args: Any, **kwargs: Any) -> dict:
        ticket = kwargs.get("ticket")
        if not ticket:
            return super().get(*args, **kwargs)
        stored = _load(ticket)
        if stored is None:
            answer = super().get(*args, **kwargs)
            stored = _load(ticket)
            if stored is None:
                return answer
        return {"msg": "Task with uuid {} returned.".format(kwargs.get("uuid")), "result": stored[0]}


def main() -> None:
    global RESULTS_DIR, CHECKPOINT_EVERY
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--checkpoint-every", type=float, default=CHECKPOINT_EVERY)
    args = parser.parse_args()
    RESULTS_DIR = args.results
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    CHECKPOINT_EVERY = args.checkpoint_every
    print(f"upstream-module: {flask_multiprocess_controller.__file__}", flush=True)
    print("upstream-versions: " + json.dumps({
        "flask-multiprocess-controller": flask_multiprocess_controller.__version__,
        "flask": flask.__version__, "werkzeug": werkzeug.__version__,
        "python": sys.version.split()[0]}), flush=True)

    controller = BenchController(target_task=BenchTask, max_num_process=2)
    api = Api()
    api.add_resource(MetaMPResource, "/tasks", resource_class_args=(controller,))
    app = Flask("bench-upstream")
    api.init_app(app)
    app.run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
