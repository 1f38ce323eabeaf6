#!/usr/bin/env python
"""What one request costs: POST alone and GET of a running task, against the HTTP floor, in one run.

    python bench/request_cost.py            # 12 rounds of 60 requests of each kind per server
    python bench/request_cost.py --quick    # 6 rounds of 40: about a minute
    python bench/request_cost.py --stores sqlite --profile   # and a py-spy profile of each phase

Two servers answer side by side under ``gunicorn -w 2 --worker-class gthread --threads 8``, as in
:mod:`bench.run`'s rows: the HTTP floor (:mod:`bench.peers.http_floor_app`, Flask + flask-restful with
a handler that does no work) and this project (:mod:`bench.peers.mpc_app`, reused workers) on each
store asked for. One client sends one request at a time over a kept-alive connection:

* **POST alone**: ``POST /tasks {"op": "add", ...}``, timed to its answer; the task's result is then
  fetched (``GET ?wait=``, untimed) before the next POST, as :func:`bench.workloads.post` does.
* **GET running**: ``GET /tasks/<uuid>`` of a task that is running (a task that checks for a stop
  every 10 ms; on the floor, a stored task), timed.

The servers take turns round by round (the order swapped every round), so a change in the machine's
load during the run weighs on both alike; the ratio of the pooled medians is the figure, and the
spread of the per-round ratios says how far to trust it. Results go to
``bench/results/request_cost.{json,md}``; the load average is recorded with them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import environment  # noqa: E402
from bench.workloads import percentile  # noqa: E402

RESULTS = environment.BENCH_DIR / "results"
#: The targets: this project's p50 over the floor's, under gunicorn.
TARGETS = {"post": 1.3, "get": 1.2}
KINDS = {"post": "POST alone", "get": "GET running"}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="POST and GET cost against the HTTP floor under gunicorn.")
    parser.add_argument("--quick", action="store_true", help="6 rounds of 40 requests: about a minute")
    parser.add_argument("--rounds", type=int, help="rounds (each server once per round)")
    parser.add_argument("--requests", type=int, help="requests of each kind per server and round")
    parser.add_argument("--stores", default="sqlite,redis", help="comma-separated: sqlite, redis")
    parser.add_argument("--profile", action="store_true",
                        help="also record a py-spy profile of each server's workers in an extra round "
                             "(bench/results/profiles/*.txt)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for request_cost.json/.md")
    return parser.parse_args(argv)


class Server:
    """One server under test and its task to GET: a peer of :mod:`bench.peers.mpc`, started and closed here."""

    def __init__(self, key: str, peer: Any) -> None:
        self.key = key
        self.peer = peer
        self.running: Optional[str] = None
        self.samples: dict[str, list[float]] = {"post": [], "get": []}
        self.rounds: dict[str, list[float]] = {"post": [], "get": []}
        #: Server CPU milliseconds per request, summed over the rounds (divided by the rounds when reported).
        self.cpu_ms: dict[str, float] = {"post": 0.0, "get": 0.0}

    @property
    def is_floor(self) -> bool:
        return self.key == "floor"

    def start(self) -> None:
        self.peer.start()
        for n in range(30):  # warm: both workers have served, the task processes are up
            self.peer.result(self.peer.submit_add(n, 1))
        if self.is_floor:
            self.running = self.peer.submit_add(1, 1)
        else:
            self.running = self.peer.submit_checkpointing()
            self.peer.wait_running(self.running)
        for _ in range(30):
            self.peer.get_status(self.running)

    def close(self) -> None:
        try:
            if self.running is not None and not self.is_floor:
                self.peer.stop(self.running)
                self.peer.wait_stopped(self.running)
        finally:
            self.peer.close()

    def round(self, requests: int) -> None:
        """``requests`` timed POSTs (each task's result fetched untimed), then ``requests`` timed GETs."""
        peer = self.peer
        cpu = self.cpu()
        posts = []
        for n in range(requests):
            began = time.perf_counter()
            handle = peer.submit_add(n, 1)
            posts.append(time.perf_counter() - began)
            peer.result(handle)
        now = self.cpu()
        self.cpu_ms["post"] += 1000 * (now - cpu) / requests
        cpu = now
        gets = []
        for _ in range(requests):
            began = time.perf_counter()
            task = peer.get_status(self.running)
            gets.append(time.perf_counter() - began)
            if not self.is_floor and task["status"] != "running":
                raise RuntimeError(f"the task to GET is {task['status']}, not running")
        self.cpu_ms["get"] += 1000 * (self.cpu() - cpu) / requests
        for kind, values in (("post", posts), ("get", gets)):
            self.samples[kind] += values
            self.rounds[kind].append(statistics.median(values))

    def cpu(self) -> float:
        """CPU seconds so far of the serving processes (gunicorn's master and workers) and everything below
        them (this project's fork server and task processes)."""
        from bench.peers import accounting
        serving = self.peer.serving_processes()
        return sum(accounting.mpc_roles(serving).values()) if not self.is_floor else sum(map(accounting.own, serving))

    def pids(self) -> list[int]:
        """The gunicorn workers' pids (the processes that serve requests)."""
        return [p.pid for p in self.peer.serving_processes()[1:]]


def _servers(stores: list[str], root: Path) -> dict[str, Server]:
    from bench.peers.mpc import GunicornFloor, GunicornReused, GunicornReusedRedis
    classes = {"floor": GunicornFloor, "sqlite": GunicornReused, "redis": GunicornReusedRedis}
    servers = {}
    for key in ["floor", *stores]:
        workdir = root / key
        workdir.mkdir()
        servers[key] = Server(key, classes[key](workdir, sys.executable))
    return servers


def _profile(server: Server, requests: int, out: Path) -> list[str]:
    """py-spy profiles of ``server``'s workers while it serves one more round (one file per worker)."""
    spy = shutil.which("py-spy")
    if spy is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    recorders = []
    for pid in server.pids():
        path = out / f"{server.key}-{pid}.txt"
        recorders.append((path, subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--rate", "500", "--format", "raw", "--nonblocking",
             "--output", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    time.sleep(1.0)  # py-spy attached
    keep = server.samples, server.rounds
    server.samples, server.rounds = {"post": [], "get": []}, {"post": [], "get": []}
    try:
        server.round(requests)
    finally:
        server.samples, server.rounds = keep
        for _, recorder in recorders:
            recorder.send_signal(2)  # SIGINT: py-spy writes what it recorded
        for _, recorder in recorders:
            try:
                recorder.wait(30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()
    return [str(path) for path, _ in recorders if path.exists()]


def _figures(servers: dict[str, Server]) -> dict:
    floor = servers["floor"]
    figures: dict = {}
    for key, server in servers.items():
        row: dict = {}
        for kind in KINDS:
            ms = [s * 1000 for s in server.samples[kind]]
            row[f"{kind}_p50_ms"] = percentile(ms, 50)
            row[f"{kind}_p95_ms"] = percentile(ms, 95)
            row[f"{kind}_cpu_ms"] = server.cpu_ms[kind] / max(1, len(server.rounds[kind]))
            if key != "floor":
                row[f"{kind}_ratio"] = row[f"{kind}_p50_ms"] / percentile([s * 1000 for s in floor.samples[kind]], 50)
                per_round = [a / b for a, b in zip(server.rounds[kind], floor.rounds[kind])]
                row[f"{kind}_ratio_low"], row[f"{kind}_ratio_high"] = min(per_round), max(per_round)
        figures[key] = row
    return figures


def markdown(run: dict) -> str:
    """The report of one run: a table per server and the targets met or missed."""
    lines = ["# Request cost: POST alone and GET of a running task, against the HTTP floor", "",
             f"Measured {run['date']} with `{run['command']}`: {run['rounds']} rounds of {run['requests']} "
             f"requests of each kind per server, one at a time, servers taking turns (order swapped every round). "
             f"gunicorn -w 2, gthread, 8 threads; this project with reused workers. Load average at the start "
             f"{run['load_before']}, at the end {run['load_after']} (2 cores).", "",
             "| server | POST alone p50 ms | POST p95 ms | GET running p50 ms | GET p95 ms | POST / floor | GET / floor "
             "| server CPU ms per POST (+ its result) | server CPU ms per GET |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, row in run["figures"].items():
        ratios = ["n/a", "n/a"] if key == "floor" else [
            f"{row[f'{k}_ratio']:.2f}× ({row[f'{k}_ratio_low']:.2f}–{row[f'{k}_ratio_high']:.2f})" for k in KINDS]
        lines.append(f"| {run['labels'][key]} | {row['post_p50_ms']:.2f} | {row['post_p95_ms']:.2f} | "
                     f"{row['get_p50_ms']:.2f} | {row['get_p95_ms']:.2f} | {ratios[0]} | {ratios[1]} | "
                     f"{row['post_cpu_ms']:.2f} | {row['get_cpu_ms']:.2f} |")
    lines += ["", "Ratios: the pooled p50 over the floor's pooled p50 (in brackets, the lowest and highest of the "
              "per-round ratios of medians). Server CPU: user + system time of the serving processes and everything "
              "below them (fork server, task processes; psutil, 10 ms ticks) over each phase, per request: less "
              "moved by other load on the machine than the latencies. A POST's includes running its task and "
              "answering the GET `?wait=` of its result.", "", "## Targets", ""]
    for key, row in run["figures"].items():
        if key == "floor":
            continue
        for kind, bound in TARGETS.items():
            ratio = row[f"{kind}_ratio"]
            verdict = "met" if ratio <= bound else "missed"
            lines.append(f"- {run['labels'][key]}: {KINDS[kind]} ≤ {bound}× the floor: **{verdict}** ({ratio:.2f}×)")
    if run.get("profiles"):
        lines += ["", "Profiles (py-spy, raw collapsed stacks): " + ", ".join(
            f"`{Path(p).name}`" for p in run["profiles"]) + "."]
    return "\n".join(lines) + "\n"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    rounds = args.rounds or (6 if args.quick else 12)
    requests = args.requests or (40 if args.quick else 60)
    stores = [s for s in args.stores.split(",") if s]
    unknown = set(stores) - {"sqlite", "redis"}
    if unknown:
        sys.exit(f"unknown stores: {', '.join(sorted(unknown))} (known: sqlite, redis)")
    if "redis" in stores and shutil.which("redis-server") is None:
        print("redis-server is not on PATH: measuring SQLite only", flush=True)
        stores.remove("redis")
    load_before = _load()
    profiles: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-request-") as tmp:
        servers = _servers(stores, Path(tmp))
        try:
            for server in servers.values():
                print(f"starting {server.key} ...", flush=True)
                server.start()
            order = list(servers.values())
            for number in range(rounds):
                for server in order if number % 2 == 0 else reversed(order):
                    server.round(requests)
                print(f"round {number + 1}/{rounds}: " + ", ".join(
                    f"{s.key} POST {1000 * s.rounds['post'][-1]:.2f} GET {1000 * s.rounds['get'][-1]:.2f} ms"
                    for s in order), flush=True)
            if args.profile:
                for server in order:
                    profiles += _profile(server, requests, args.out / "profiles")
        finally:
            for server in servers.values():
                server.close()
    run = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "command": "python bench/request_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rounds": rounds, "requests": requests, "machine": environment.machine(),
           "load_before": load_before, "load_after": _load(),
           "labels": {"floor": "HTTP floor (no-op handler)", "sqlite": "this project, SQLite",
                      "redis": "this project, Redis"},
           "figures": _figures(servers), "profiles": profiles}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "request_cost.json").write_text(json.dumps(run, indent=1))
    (args.out / "request_cost.md").write_text(markdown(run))
    print(markdown(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
