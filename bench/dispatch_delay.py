#!/usr/bin/env python
"""Dispatch delay: how long a queued task waits after a slot frees, under ``gunicorn -w 4``.

For each store (a SQLite file, and a Redis server this script starts on 127.0.0.1 at a free port,
``redis-server`` from PATH), it serves a small app with ``gunicorn -w 4`` and a controller with
``max_num_process=2``, queues N short tasks (each sleeps 20 ms) in one bulk POST, waits until all
have ended, and reads the stored task objects back.

With the queue non-empty from the start, the k-th start (k >= max_num_process, in time order) is
made possible by the (k - max_num_process)-th end (the k-th slot freeing), so

    delay_k = start_k - end_(k - max_num_process)

with starts and ends each sorted. Two starts are reported: ``started_at`` (the claim, recorded in the
store) and the moment ``execute`` began in the fresh task process (the task returns its own clock),
which adds the fork. ``ended_at`` is recorded by the controlling thread once the task process has
exited. Everything runs on this machine, so the clocks are the same.

Usage: python bench/dispatch_delay.py [--tasks N]

It cleans up what it starts (the servers' whole process trees, the Redis server, its temporary
directory), also when interrupted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.peers.base import RedisServer, free_port  # noqa: E402

WORKERS = 4
MAX_NUM_PROCESS = 2
TASK_SLEEP = 0.02
HTTP_TIMEOUT = 30

APP = r'''
import os
import time

from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask


class Nap(MetaMPTask):
    def execute(self, n: int, sleep: float = 0.02) -> dict:
        began = time.time()
        time.sleep(sleep)
        return {"n": n, "began": began, "fork_server": os.getppid()}


class NapController(MetaMPController, controller_name="nap"):
    pass


controller = NapController(Nap, max_num_process=int(os.environ["BENCH_MAX_NUM_PROCESS"]), stop_grace=0.5)
app = Flask(__name__)
Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]))
'''


class Gunicorn:
    """gunicorn -w 4 in its own session; :meth:`stop` ends its whole tree (workers, fork servers, tasks)."""

    def __init__(self, workdir: Path, store_url: str, log: Path) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-b", f"127.0.0.1:{self.port}",
                     "--chdir", str(workdir), "app:app"]
        self.env_shown = f"MPC_STORE_URL={store_url} BENCH_MAX_NUM_PROCESS={MAX_NUM_PROCESS}"
        env = {**os.environ, "MPC_STORE_URL": store_url, "BENCH_MAX_NUM_PROCESS": str(MAX_NUM_PROCESS)}
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(self.args, cwd=str(workdir), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.root = psutil.Process(self.proc.pid)
        self.seen: dict[int, psutil.Process] = {self.root.pid: self.root}
        self.url = f"http://127.0.0.1:{self.port}/tasks"

    def command(self) -> str:
        return f"{self.env_shown} {' '.join(self.args)}"

    def remember(self) -> None:
        try:
            for proc in self.root.children(recursive=True):
                self.seen.setdefault(proc.pid, proc)
        except psutil.Error:
            pass

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until it answers and every worker has imported the app (each has its fork server)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}; see {self._log.name}")
            try:
                requests.get(self.url, timeout=5)
                workers = self.root.children()
                if len(workers) == WORKERS and all(len(w.children()) == 1 for w in workers):
                    break
            except (requests.RequestException, psutil.Error):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn was not ready within {timeout} s; see {self._log.name}")
            time.sleep(0.1)
        self.remember()

    def stop(self, timeout: float = 30) -> None:
        self.remember()
        try:
            self.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.proc.poll()
            if self.proc.returncode is not None and not self._alive():
                break
            time.sleep(0.05)
        for proc in self._alive():
            try:
                proc.kill()
            except psutil.Error:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def _alive(self) -> list[psutil.Process]:
        alive = []
        for proc in list(self.seen.values()):
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
                    for child in proc.children(recursive=True):
                        self.seen.setdefault(child.pid, child)
            except psutil.Error:
                pass
        return alive


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _delays(starts: list[float], ends: list[float]) -> list[float]:
    starts, ends = sorted(starts), sorted(ends)
    return [starts[k] - ends[k - MAX_NUM_PROCESS] for k in range(MAX_NUM_PROCESS, len(starts))]


def _summary(delays: list[float]) -> str:
    ms = sorted(d * 1000 for d in delays)
    median = ms[len(ms) // 2] if len(ms) % 2 else (ms[len(ms) // 2 - 1] + ms[len(ms) // 2]) / 2
    p95 = ms[max(0, -(-95 * len(ms) // 100) - 1)]  # nearest rank
    return f"median {median:6.1f}  p95 {p95:6.1f}  max {ms[-1]:6.1f}"


def measure(name: str, store_url: str, workdir: Path, tasks: int) -> dict:
    server = Gunicorn(workdir, store_url, workdir / f"gunicorn-{name}.log")
    try:
        server.wait_ready()
        began = time.monotonic()
        body = [{"n": n, "sleep": TASK_SLEEP} for n in range(tasks)]
        response = requests.post(server.url, json=body, timeout=HTTP_TIMEOUT)
        if response.status_code != 202:
            raise RuntimeError(f"bulk POST answered {response.status_code}: {response.text[:500]}")
        uuids = [t["uuid"] for t in response.json()["tasks"]]
        deadline = time.monotonic() + max(120, tasks * 0.5)
        while True:
            listing = requests.get(server.url, timeout=HTTP_TIMEOUT).json()
            if listing["running"] == 0 and listing["queued"] == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"tasks not done in time: {listing['running']} running, {listing['queued']} queued")
            time.sleep(0.1)
        wall = time.monotonic() - began
        with requests.Session() as session:
            rows = [session.get(f"{server.url}/{uuid}", timeout=HTTP_TIMEOUT).json() for uuid in uuids]
        command = server.command()
    finally:
        server.stop()
    failed = [r for r in rows if r["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} tasks did not succeed, e.g. {failed[0]}")
    ends = [_ts(r["ended_at"]) for r in rows]
    claim = _delays([_ts(r["started_at"]) for r in rows], ends)
    execute = _delays([r["result"]["began"] for r in rows], ends)
    workers = len({r["result"]["fork_server"] for r in rows})  # one fork server per worker
    return {"name": name, "wall": wall, "claim": claim, "execute": execute, "command": command, "tasks": tasks,
            "workers": workers}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200, help="tasks to queue per store (default 200)")
    args = parser.parse_args(argv)
    if args.tasks <= MAX_NUM_PROCESS:
        parser.error(f"--tasks must be more than {MAX_NUM_PROCESS}")

    # SIGTERM unwinds like Ctrl-C, so that the finally clauses below clean up.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = Path(tempfile.mkdtemp(prefix="mpc-dispatch-"))
    redis_server = RedisServer(workdir)
    results = []
    try:
        (workdir / "app.py").write_text(APP)
        redis_server.start()
        stores = [("sqlite", f"sqlite:///{workdir}/tasks.sqlite3"), ("redis", redis_server.url)]
        for name, url in stores:
            results.append(measure(name, url, workdir, args.tasks))
    finally:
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"Dispatch delay under gunicorn -w {WORKERS}, max_num_process={MAX_NUM_PROCESS}, "
          f"{args.tasks} tasks of {TASK_SLEEP * 1000:.0f} ms queued in one bulk POST, a fresh process per task; "
          f"{os.cpu_count()} CPUs.")
    print("delay_k = start_k - end_(k-max_num_process) over sorted starts and ends, in ms:")
    print("  claim   = the task's started_at (claimed from the store)")
    print("  execute = execute() began in the new task process (claim + fork + start)")
    for r in results:
        print(f"\n[{r['name']}] {r['command']}")
        print(f"  {r['tasks']} tasks in {r['wall']:.2f} s = {r['tasks'] / r['wall']:.0f} tasks/s "
              f"({len(r['claim'])} delays; tasks ran under {r['workers']} of the {WORKERS} workers)")
        print(f"  claim   delay ms: {_summary(r['claim'])}")
        print(f"  execute delay ms: {_summary(r['execute'])}")


if __name__ == "__main__":
    main()
