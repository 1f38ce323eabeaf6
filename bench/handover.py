#!/usr/bin/env python
"""Hand-over figures: how fast an adopter takes over, what reloads under load cost, what holding costs.

It serves ``tests/handover_app.py`` (tasks that count steps and report progress every ``step`` seconds) on a
SQLite store in a temporary folder, with the package's own variables only (``MPC_STORE_URL``,
``MPC_HANDOVER_WINDOW``, ``MPC_HANDOVER_DIR``).

1. *Time to the adopter's first progress.* Two dev servers on one store; one long task runs (progress every
   20 ms). The server that runs it is ended (SIGKILL, or SIGTERM every other time), a new one is started in
   its place, and the figures are the time from the signal to the ``adopted`` event, and to the first
   ``progress`` event the adopter wrote after it (the store's event times: same machine, same clock). Repeated ``--handovers`` times, alternating which server ends; p50, p90 and max per signal.
2. *Reloads under load.* gunicorn ``-w 2``, eight tasks of ``--reload-seconds`` each running, and a POST of a
   short task every 0.1 s; ``kill -HUP`` of the master ``--reloads`` times, 2 s apart. Figure: tasks that did not
   succeed on their first attempt (must be 0).
3. *Holding.* A dev server with eight tasks running is killed and nothing adopts them for ``--hold`` seconds:
   the fork server's CPU time over that window (% of one core) and its memory (USS and PSS).

Results go to ``bench/results/handover.json`` (``--out`` elsewhere) and are printed.

Usage: python bench/handover.py [--handovers 20] [--reloads 10] [--hold 10] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "handover_app.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Bench:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        shutil.copy(APP, folder / "app.py")
        (folder / "ho").mkdir(mode=0o700)
        self.db = folder / "tasks.sqlite3"
        self.procs: list[subprocess.Popen] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, MPC_STORE_URL=f"sqlite:///{self.db}", MPC_HANDOVER_WINDOW="60",
                   MPC_HANDOVER_DIR=str(self.folder / "ho"), **extra)
        env.pop("FLASK_RUN_FROM_CLI", None)
        return env

    def start(self, args: list[str], port: int, **extra: str) -> subprocess.Popen:
        log = open(self.folder / f"server-{len(self.procs)}.log", "ab")
        proc = subprocess.Popen(args, cwd=self.folder, env=self.env(PORT=str(port), **extra), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/tasks", timeout=2)
                return proc
            except requests.RequestException:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"server {args} did not start")
                time.sleep(0.05)

    def dev(self, port: int) -> subprocess.Popen:
        return self.start([sys.executable, "app.py"], port)

    def progress(self, uuid: str) -> Optional[int]:
        with sqlite3.connect(self.db, timeout=30) as db:
            row = db.execute("SELECT progress FROM mpc_tasks WHERE uuid = ?", (uuid,)).fetchone()
        return json.loads(row[0])["n"] if row and row[0] else None

    def adoptions(self, uuid: str) -> list[float]:
        """When (store clock) each ``adopted`` event of the task was written."""
        with sqlite3.connect(self.db, timeout=30) as db:
            return [at for (at,) in db.execute(
                "SELECT at FROM mpc_events WHERE uuid = ? AND kind = 'adopted' ORDER BY cursor", (uuid,))]

    def first_progress_after_adoption(self, uuid: str, earlier: int) -> Optional[tuple[float, float]]:
        """When (store clock) the task's adoption after its first ``earlier`` ones was written, and the first
        progress event after it; None until both exist."""
        adopted = self.adoptions(uuid)
        if len(adopted) <= earlier:
            return None
        with sqlite3.connect(self.db, timeout=30) as db:
            cursor = db.execute("SELECT cursor FROM mpc_events WHERE uuid = ? AND kind = 'adopted' ORDER BY cursor "
                                "LIMIT 1 OFFSET ?", (uuid, earlier)).fetchone()[0]
            found = db.execute("SELECT at FROM mpc_events WHERE uuid = ? AND kind = 'progress' AND cursor > ? "
                               "ORDER BY cursor LIMIT 1", (uuid, cursor)).fetchone()
        return None if found is None else (adopted[earlier], found[0])

    def status(self, uuid: str) -> dict[str, Any]:
        with sqlite3.connect(self.db, timeout=30) as db:
            row = db.execute("SELECT status, attempt, error FROM mpc_tasks WHERE uuid = ?", (uuid,)).fetchone()
        return {"status": row[0], "attempt": row[1], "error": row[2]}

    def close(self) -> None:
        for proc in self.procs:
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.Error:
                tree = []
            for member in tree:
                try:
                    member.kill()
                except psutil.Error:
                    pass
            proc.kill()
            proc.wait()


def serving_process(task_pid: int) -> int:
    return psutil.Process(task_pid).parent().parent().pid  # type: ignore[union-attr]


def handover_latency(bench: Bench, count: int) -> dict[str, Any]:
    ports = [free_port(), free_port()]
    servers = [bench.dev(ports[0]), bench.dev(ports[1])]
    uuid = requests.post(f"http://127.0.0.1:{ports[0]}/tasks", json={"seconds": 3600, "step": 0.02},
                         timeout=10).json()["uuid"]
    while bench.status(uuid)["status"] != "running" or bench.progress(uuid) is None:
        time.sleep(0.05)
    pid = requests.get(f"http://127.0.0.1:{ports[0]}/tasks/{uuid}", timeout=10).json()["pid"]
    samples: dict[str, list[float]] = {"SIGKILL": [], "SIGTERM": []}
    adoptions: dict[str, list[float]] = {"SIGKILL": [], "SIGTERM": []}
    index = next(k for k, s in enumerate(servers) if s.pid == serving_process(pid))
    for i in range(count):
        time.sleep(0.5)
        how = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
        adopted_before = len(bench.adoptions(uuid))
        killed = time.time()
        servers[index].send_signal(how)
        servers[index].wait()
        deadline = time.monotonic() + 30
        while True:  # the adoption, then the adopter's first relayed progress, as the store's events say
            first = bench.first_progress_after_adoption(uuid, adopted_before)
            if first is not None:
                adopted_at, progress_at = first
                adoptions[how.name].append(adopted_at - killed)
                samples[how.name].append(progress_at - killed)
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no adopter took the task within 30 s")
            time.sleep(0.01)
        servers[index] = bench.dev(ports[index])
        index = 1 - index  # the other server adopted it: it is the next to end
    last_adopter = index
    requests.delete(f"http://127.0.0.1:{ports[last_adopter]}/tasks/{uuid}", timeout=10)
    for server in servers:
        server.send_signal(signal.SIGINT)
        server.wait()
    return {"handovers": count, **{f"{kind}_{what}": figures(values)
                                      for what, table in (("to_progress", samples), ("to_adopted", adoptions))
                                      for kind, values in table.items()}}


def figures(values: list[float]) -> dict[str, float]:
    """p50, p90 and max of ``values`` seconds, in ms."""
    ordered = sorted(values)
    if not ordered:
        return {}
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 1), "max_ms": round(ordered[-1] * 1000, 1)}


def reloads_under_load(bench: Bench, reloads: int, seconds: float) -> dict[str, Any]:
    port = free_port()
    master = bench.start([sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "app:app"], port,
                         APP_CONFIG=json.dumps({"max_num_process": 12}))
    base = f"http://127.0.0.1:{port}/tasks"
    uuids = [requests.post(base, json={"seconds": seconds, "step": 0.1}, timeout=10).json()["uuid"] for _ in range(8)]
    next_reload = time.monotonic() + 2
    done = 0
    while done < reloads:
        try:
            uuids.append(requests.post(base, json={"seconds": 0.3, "step": 0.05}, timeout=10).json()["uuid"])
        except (requests.RequestException, ValueError):
            pass
        if time.monotonic() >= next_reload:
            master.send_signal(signal.SIGHUP)
            done += 1
            next_reload = time.monotonic() + 2
        time.sleep(0.1)
    deadline = time.monotonic() + seconds + 60
    while time.monotonic() < deadline:
        states = [bench.status(u) for u in uuids]
        if all(s["status"] not in ("queued", "running", "stopping", "paused") for s in states):
            break
        time.sleep(0.5)
    bad = [dict(s, uuid=u) for u, s in zip(uuids, states) if s["status"] != "succeeded" or s["attempt"] != 1]
    for one in bad:
        print("not once and succeeded:", one, file=sys.stderr)
    master.send_signal(signal.SIGTERM)
    master.wait()
    return {"reloads": reloads, "tasks": len(uuids), "long_tasks": 8, "not_once_and_succeeded": len(bad)}


def holding_cost(bench: Bench, hold: float) -> dict[str, Any]:
    port = free_port()
    server = bench.dev(port)
    base = f"http://127.0.0.1:{port}/tasks"
    uuids = [requests.post(base, json={"seconds": hold + 30, "step": 0.1}, timeout=10).json()["uuid"] for _ in range(8)]
    while any(bench.status(u)["status"] != "running" for u in uuids):
        time.sleep(0.05)
    pid = requests.get(f"{base}/{uuids[0]}", timeout=10).json()["pid"]
    holder = psutil.Process(pid).parent()
    assert holder is not None
    server.send_signal(signal.SIGKILL)
    server.wait()
    time.sleep(1.0)  # the holder has opened the store and begun to offer
    start_cpu = sum(holder.cpu_times()[:2])
    time.sleep(hold)
    cpu = sum(holder.cpu_times()[:2]) - start_cpu
    memory = holder.memory_full_info()
    adopter = bench.dev(port)
    for uuid in uuids:
        requests.delete(f"{base}/{uuid}", timeout=10)
    time.sleep(3)
    adopter.send_signal(signal.SIGINT)
    adopter.wait()
    return {"tasks_held": len(uuids), "seconds": hold, "cpu_percent_of_a_core": round(100 * cpu / hold, 2),
            "uss_mib": round(memory.uss / 2**20, 1), "pss_mib": round(memory.pss / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--handovers", type=int, default=20)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--reload-seconds", type=float, default=30.0)
    parser.add_argument("--hold", type=float, default=10.0)
    parser.add_argument("--only", choices=["handover", "reloads", "holding"], help="run one part only")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "handover.json"))
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    steps = (("handover", lambda b: handover_latency(b, args.handovers)),
             ("reloads", lambda b: reloads_under_load(b, args.reloads, args.reload_seconds)),
             ("holding", lambda b: holding_cost(b, args.hold)))
    for name, step in steps:
        if args.only and name != args.only:
            continue
        folder = Path(tempfile.mkdtemp(prefix="mpc-bench-ho-", dir="/tmp"))
        bench = Bench(folder)
        try:
            results[name] = step(bench)
        finally:
            bench.close()
            if os.environ.get("KEEP"):
                print("kept", folder, file=sys.stderr)
            else:
                shutil.rmtree(folder, ignore_errors=True)
        print(name, json.dumps(results[name]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
