#!/usr/bin/env python
"""What the web tier pays to babysit busy long tasks: CPU of the serving processes while tasks report progress.

16 tasks (``--tasks``) run at once, each calling ``upload_status`` 10 times a second (``--every``), in
``bench/peers/web_tier_app.py``. Once they have run ``SETTLE`` seconds (past their start-up), over a window
of ``--window`` seconds (20; 8 with ``--quick``) the script
reads the CPU time (user + system, psutil) of the *web tier*: the serving process(es) (the dev server's
process; gunicorn's arbiter and workers) and each controller's fork server, not the task processes
themselves. Figure: CPU seconds per wall second, in % of one core. The store's own CPU (redis-server)
is shown apart; SQLite runs inside the serving processes.

After the window a poller GETs the running tasks one after the other for a few seconds and compares the
moment each answer arrived with the moment (``t``) the task made the progress value it shows:
``age`` p50/p99. A task makes a value every ``--every`` seconds, so an age counts up to that much of
waiting for the next call on top of what the web tier adds.

Configurations: the dev server (threaded Werkzeug) and gunicorn ``-w 2`` (gthread), each on SQLite and
on Redis (a private ``redis-server`` at a free port). Target: <= 2 % of one core, with progress ages
p99 <= 0.5 s.

Usage: python bench/web_tier.py [--quick] [--window S] [--tasks N] [--every S]
                                [--configs dev-sqlite,gunicorn-sqlite,dev-redis,gunicorn-redis] [--out DIR]

Results: ``bench/results/web_tier.json`` and ``web_tier.md`` (``--out`` elsewhere). Everything it
starts (servers with their process trees, the Redis server, a temporary directory) it tears down,
also when a step fails.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.peers.base import RedisServer, poll_until  # noqa: E402
from bench.serving import Server, cpu_seconds, cpu_spent  # noqa: E402
from flask_multiprocess_controller.defaults import SAMPLE_WARMUP  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
APP = Path(__file__).resolve().parent / "peers" / "web_tier_app.py"
APP_MODULE = "bench.peers.web_tier_app:app"
CONFIGS = ("dev-sqlite", "gunicorn-sqlite", "dev-redis", "gunicorn-redis")

#: Target: % of one core the web tier spends on the busy tasks; seconds a GET may lag a progress call.
TARGET_PCT = 2.0
TARGET_AGE_S = 0.5
GUNICORN_WORKERS = 2
#: Seconds for one step (a server starting, the tasks starting) and one HTTP call.
STEP_TIMEOUT = 90.0
HTTP_TIMEOUT = 30.0
#: Seconds the tasks run before the CPU window opens: their start-up work is not the figure, and that includes
#: their first ``SAMPLE_WARMUP`` seconds, when each task's process tree is sampled every 0.5 s rather than every
#: 2 s (a cost of each task's start, like its fork: ``bench/long_tasks.py`` counts it, over whole runs).
SETTLE = SAMPLE_WARMUP + 1.0
#: Seconds the age poller reads for.
AGE_WINDOW = 4.0


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def measure(config: str, args: argparse.Namespace, workdir: Path, redis: Optional[RedisServer]) -> dict:
    """One configuration: start its server, run the busy tasks, read the web tier's CPU and the ages."""
    kind, store = config.split("-")
    if store == "redis":
        assert redis is not None
        import redis as redis_client
        redis_client.Redis.from_url(redis.url).flushdb()
        url = redis.url
    else:
        url = f"sqlite:///{workdir / (config + '.sqlite3')}"
    env = {"MPC_STORE_URL": url, "BENCH_MAX_NUM_PROCESS": str(args.tasks), **dict(args.env)}
    if kind == "dev":
        server = Server.dev(config, APP, env, workdir)
    else:
        server = Server.gunicorn(config, APP_MODULE, env, workdir, GUNICORN_WORKERS, threads=32)
    try:
        server.wait_ready(STEP_TIMEOUT)
        seconds = SETTLE + args.window + AGE_WINDOW + 30
        with requests.Session() as session:
            uuids = []
            for _ in range(args.tasks):
                answer = session.post(server.base, json={"seconds": seconds, "every": args.every},
                                      timeout=HTTP_TIMEOUT)
                answer.raise_for_status()
                uuids.append(answer.json()["uuid"])

            def running() -> int:
                count = 0
                for uuid in uuids:
                    body = session.get(f"{server.base}/{uuid}", timeout=HTTP_TIMEOUT).json()
                    if body.get("status") not in ("queued", "running"):
                        raise RuntimeError(f"task {uuid} is {body.get('status')}: {body}\n{server.tail()}")
                    count += body.get("status") == "running" and body.get("progress") is not None
                return count
            poll_until(running, lambda n: n == len(uuids), STEP_TIMEOUT, f"{args.tasks} tasks running", interval=0.2)
            time.sleep(SETTLE)
            tier = server.web_tier()
            store_proc = psutil.Process(redis.proc.pid) if redis is not None and store == "redis" else None
            before, began = cpu_seconds(tier), time.monotonic()
            store_before = cpu_seconds([store_proc]) if store_proc else {}
            time.sleep(args.window)
            after, elapsed = cpu_seconds(tier), time.monotonic() - began
            store_after = cpu_seconds([store_proc]) if store_proc else {}
            used = cpu_spent(before, after, count_new=False)
            store_used = cpu_spent(store_before, store_after, count_new=False)
            ages: list[float] = []
            stop_at = time.monotonic() + AGE_WINDOW
            while time.monotonic() < stop_at:
                for uuid in uuids:
                    body = session.get(f"{server.base}/{uuid}", timeout=HTTP_TIMEOUT).json()
                    progress = body.get("progress") or {}
                    if isinstance(progress, dict) and "t" in progress:
                        ages.append(time.time() - float(progress["t"]))
            still = running()
            for uuid in uuids:
                session.delete(f"{server.base}/{uuid}", timeout=HTTP_TIMEOUT)
        calls = args.tasks / args.every * elapsed
        pct = used / elapsed * 100
        return {
            "config": config, "pct": round(pct, 2), "ms_per_call": round(used * 1000 / calls, 3),
            "store_pct": round(store_used / elapsed * 100, 2) if store_proc else None,
            "age_p50_s": round(percentile(ages, 50) or 0, 3), "age_p99_s": round(percentile(ages, 99) or 0, 3),
            "ages": len(ages), "running_at_end": still, "processes": len(tier), "window_s": round(elapsed, 2),
            "met": pct <= TARGET_PCT and (percentile(ages, 99) or 0) <= TARGET_AGE_S,
        }
    finally:
        server.stop()


def table(result: dict) -> str:
    lines = [
        f"# Web tier under busy long tasks ({result['tasks']} tasks, upload_status every {result['every']:g} s)",
        "",
        f"{result['when']} on {result['machine']}, load average {result['load_before']} before / "
        f"{result['load_after']} after; window {result['window']:g} s, opened once the tasks had run {SETTLE:g} s "
        f"(past their start-up). Target: web tier <= {TARGET_PCT:g} % of "
        f"one core, progress age p99 <= {TARGET_AGE_S:g} s.",
        "",
        "| configuration | web tier, % of a core | ms per progress call | store, % of a core "
        "| progress age p50 / p99 | target |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['config']} | failed: {row['error'][:120]} | | | | |")
            continue
        store = "in process" if row["store_pct"] is None else f"{row['store_pct']:.2f}"
        lines.append(f"| {row['config']} | {row['pct']:.2f} | {row['ms_per_call']:.3f} | {store} "
                     f"| {row['age_p50_s'] * 1000:.0f} / {row['age_p99_s'] * 1000:.0f} ms "
                     f"| {'met' if row['met'] else 'missed'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="an 8 s window (under ~2 minutes in all)")
    parser.add_argument("--window", type=float, help="seconds of the CPU window (default 20; 8 with --quick)")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--every", type=float, default=0.1, help="seconds between two upload_status calls")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--env", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                        help="NAME=VALUE for the servers' environment (repeatable), e.g. MPC_PROGRESS_FLUSH=0.2")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="web_tier", help="file name of the results, without suffix")
    args = parser.parse_args(argv)
    args.window = args.window or (8.0 if args.quick else 20.0)
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)} (known: {', '.join(CONFIGS)})")
    result: dict[str, Any] = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"), "machine": f"{platform.node()} "
        f"({os.cpu_count()} cores)", "load_before": [round(x, 2) for x in os.getloadavg()], "tasks": args.tasks,
        "every": args.every, "window": args.window, "env": dict(args.env), "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-web-tier-") as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir).start() if any(c.endswith("redis") for c in configs) else None
        try:
            for config in configs:
                try:
                    row = measure(config, args, workdir, redis)
                except Exception as exc:  # one configuration's failure is reported, the others still run
                    row = {"config": config, "error": f"{type(exc).__name__}: {exc}"}
                print(json.dumps(row), flush=True)
                result["rows"].append(row)
        finally:
            if redis is not None:
                redis.stop()
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(table(result))
    print(table(result))
    return 0 if all("error" not in row for row in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
