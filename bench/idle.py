#!/usr/bin/env python
"""What an idle serving process costs: CPU and wake-ups of servers with nothing to do, on every store.

For each store (SQLite, Redis, PostgreSQL when installed) and each server (the dev server, gunicorn
``-w 4`` gthread), it serves ``bench/peers/cross_host_app.py``, runs a burst of tasks that end at
once (so every lazy start-up path has run), waits for them to end and for the server to settle, then
measures over one window (``--window``, 30 s; 10 s with ``--quick``):

- the CPU seconds per wall second (% of one core) of the serving processes with their fork servers,
  in total and per serving process (the figure the target bounds), and of gunicorn's arbiter apart
  (summed over their threads' scheduler times, to the nanosecond: an idle process uses few clock ticks);
- their wake-ups per second (context switches of all their threads), which say the same as the CPU
  figure with far less noise on a busy machine;
- for Redis and PostgreSQL, the store server's own CPU over the window.

Target: at most 0.1 % of one core per serving process.

Usage: python bench/idle.py [--quick] [--window 30] [--stores sqlite,redis,postgresql] [--servers dev,gunicorn]
                            [--burst 32] [--out FILE]

It writes ``bench/results/idle.json`` and ``bench/results/idle.md`` and tears down what it starts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import pgcluster  # noqa: E402
from bench.cross_host import APP, APP_MODULE, HTTP_TIMEOUT, STEP_TIMEOUT, TERMINAL  # noqa: E402
from bench.peers.base import RedisServer, poll_until  # noqa: E402
from bench.serving import PostgresStore, Server, torn_down, tree_cpu_seconds  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: % of one core an idle serving process (with its fork server) may take.
TARGET_PCT = 0.1
GUNICORN_WORKERS = 4
#: Seconds the servers get after the burst before the window (callbacks, the last events, GC).
SETTLE = 3.0


def _wakeups(proc: psutil.Process) -> int:
    """Context switches so far of every thread of ``proc`` (/proc/<pid>/task/*/status)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{proc.pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{proc.pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def _cpu(proc: psutil.Process) -> float:
    """CPU seconds so far of the live threads of ``proc``, to the nanosecond (/proc/<pid>/task/*/schedstat):
    the clock-tick figures of ``cpu_times()`` are too coarse for an idle process over one window."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{proc.pid}/task")
    except OSError:
        times = proc.cpu_times()
        return times.user + times.system
    for tid in tasks:
        try:
            with open(f"/proc/{proc.pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def _sample(procs: Sequence[psutil.Process]) -> tuple[float, int]:
    cpu, switches = 0.0, 0
    for proc in procs:
        try:
            cpu += _cpu(proc)
            switches += _wakeups(proc)
        except psutil.Error:
            continue
    return cpu, switches


def _burst(server: Server, gate: Path, tasks: int) -> None:
    """Queue ``tasks`` tasks that end at once (their gate exists) and wait until all have ended."""
    with requests.Session() as session:
        uuids = []
        for _ in range(tasks):
            response = session.post(server.base, json={"gate": str(gate)}, timeout=HTTP_TIMEOUT)
            response.raise_for_status()
            uuids.append(response.json()["uuid"])
        for uuid in uuids:
            poll_until(lambda: session.get(server.url(uuid), timeout=HTTP_TIMEOUT).json()["status"],
                       lambda status: status in TERMINAL, STEP_TIMEOUT, f"task {uuid} ended", interval=0.05)


def measure(server: Server, store_proc: Optional[psutil.Process], window: float) -> dict:
    """CPU (% of one core) and wake-ups per second of ``server``'s roles over ``window``, and the CPU of the
    store's server (``store_proc`` with its children) over the same window."""
    roles = {"serving": server.serving_with_children(), "arbiter": server.arbiter()}
    before = {role: _sample(procs) for role, procs in roles.items()}
    store_before = tree_cpu_seconds(store_proc) if store_proc else 0.0
    began = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - began
    after = {role: _sample(procs) for role, procs in roles.items()}
    serving = max(1, server.workers)
    cpu = (after["serving"][0] - before["serving"][0]) / elapsed * 100
    wakeups = (after["serving"][1] - before["serving"][1]) / elapsed
    figure = {"serving_processes": serving, "total_pct": round(cpu, 3), "per_process_pct": round(cpu / serving, 3),
              "wakeups_per_s": round(wakeups, 1), "wakeups_per_process_per_s": round(wakeups / serving, 1),
              "window_s": round(elapsed, 1), "target": f"<= {TARGET_PCT:g} % per serving process",
              "met": cpu / serving <= TARGET_PCT}
    if roles["arbiter"]:
        figure["arbiter_pct"] = round((after["arbiter"][0] - before["arbiter"][0]) / elapsed * 100, 3)
        figure["arbiter_wakeups_per_s"] = round((after["arbiter"][1] - before["arbiter"][1]) / elapsed, 1)
    if store_proc is not None:
        figure["store_server_pct"] = round((tree_cpu_seconds(store_proc) - store_before) / elapsed * 100, 3)
    return figure


def _server(kind: str, name: str, workdir: Path, store: str) -> Server:
    env = {"MPC_STORE_URL": store, "MPC_HOST_ID": "idle-host"}
    if kind == "dev":
        return Server.dev(name, APP, env, workdir)
    return Server.gunicorn(name, APP_MODULE, env, workdir, GUNICORN_WORKERS, threads=8)


def _postmaster(cluster: pgcluster.PostgresCluster) -> Optional[psutil.Process]:
    """The cluster's postmaster (its backends are its children: measured with it)."""
    for proc in psutil.process_iter(["cmdline"]):
        if any(cluster.data in part for part in (proc.info["cmdline"] or [])):
            return proc
    return None


def run(args: argparse.Namespace, workdir: Path, started: list) -> dict:
    figures: dict = {}
    commands: dict = {}
    gate = workdir / "gate"
    gate.touch()
    for store in args.stores:
        store_proc = None
        if store == "sqlite":
            urls = {kind: f"sqlite:///{workdir}/{kind}.sqlite3" for kind in args.servers}
        elif store == "redis":
            redis_server = RedisServer(workdir)
            started.append(redis_server)
            redis_server.start()
            base = redis_server.url.rsplit("/", 1)[0]
            urls = {kind: f"{base}/{i}" for i, kind in enumerate(args.servers)}
            store_proc = psutil.Process(redis_server.proc.pid)
        else:
            cluster = PostgresStore()
            started.append(cluster)
            urls = {kind: cluster.cluster.url() for kind in args.servers}
            store_proc = _postmaster(cluster.cluster)
        for kind in args.servers:
            server = _server(kind, f"{store}-{kind}", workdir, urls[kind])
            started.append(server)
            server.wait_ready()
            commands[f"{store}_{kind}"] = server.command
            print(f"{store}, {kind}: a burst of {args.burst} tasks, then a {args.window:g} s idle window ...", flush=True)
            _burst(server, gate, args.burst)
            time.sleep(SETTLE)
            figure = measure(server, store_proc, args.window)
            figures[f"{store}_{kind}"] = figure
            print(f"  {figure}", flush=True)
            server.stop()
            started.remove(server)
    return {"figures": figures, "commands": commands}


def _table(result: dict) -> str:
    s = result["settings"]
    verdict = {True: "met", False: "MISSED"}
    lines = [f"Idle serving processes: {s['cpus']} CPUs, Python {s['python']}, load average {s['load_average']}; "
             f"a burst of {s['burst']} tasks, then a {s['window_s']:g} s window",
             "",
             f"{'store, server':24} {'% core':>8} {'per proc':>9} {'wakeups/s':>10} {'per proc':>9} "
             f"{'arbiter %':>10} {'store %':>8}  {'target':30} result"]
    for key, fig in result["figures"].items():
        arbiter = f"{fig['arbiter_pct']:10.3f}" if "arbiter_pct" in fig else f"{'-':>10}"
        store = f"{fig['store_server_pct']:8.3f}" if "store_server_pct" in fig else f"{'-':>8}"
        lines.append(f"{key.replace('_', ', '):24} {fig['total_pct']:8.3f} {fig['per_process_pct']:9.3f} "
                     f"{fig['wakeups_per_s']:10.1f} {fig['wakeups_per_process_per_s']:9.1f} {arbiter} {store}  "
                     f"{fig['target']:30} {verdict[fig['met']]}")
    lines += ["", "% core: the serving processes with their fork servers (gunicorn's arbiter apart); per proc: "
              "divided by the serving processes; wakeups/s: context switches of all their threads."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 s windows (unless --window is given)")
    parser.add_argument("--window", type=float, default=None, help="seconds of each idle window (default 30)")
    parser.add_argument("--burst", type=int, default=32, help="tasks of the burst before each window (default 32)")
    parser.add_argument("--stores", default="sqlite,redis,postgresql",
                        help="stores to measure (default sqlite,redis,postgresql; postgresql when installed)")
    parser.add_argument("--servers", default="dev,gunicorn", help="servers to measure (default dev,gunicorn)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "idle.json",
                        help="JSON file to write (the markdown table beside it, .md)")
    args = parser.parse_args(argv)
    args.window = args.window if args.window is not None else (10.0 if args.quick else 30.0)
    args.stores = [x for x in args.stores.split(",") if x]
    args.servers = [x for x in args.servers.split(",") if x]
    if set(args.stores) - {"sqlite", "redis", "postgresql"} or set(args.servers) - {"dev", "gunicorn"} \
            or args.window <= 0 or args.burst < 0:
        parser.error("--stores: sqlite, redis, postgresql; --servers: dev, gunicorn; --window positive")
    if "postgresql" in args.stores and pgcluster.bin_dir() is None:
        print("PostgreSQL is not installed: left out.", flush=True)
        args.stores.remove("postgresql")

    result = torn_down("mpc-idle-", lambda workdir, started: run(args, workdir, started))

    result["settings"] = {"stores": args.stores, "servers": args.servers, "window_s": args.window,
                          "burst": args.burst, "cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(),
                          "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                          "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    table = _table(result)
    print()
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table + "\n")
    print(f"\nwritten to {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
