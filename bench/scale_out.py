#!/usr/bin/env python
"""How this project scales past one machine, on one Redis: measured with simulated hosts, and projected.

    python bench/scale_out.py                     # 1, 2, 4, 8 and 16 serving processes; about 3 minutes
    python bench/scale_out.py --hosts 1,2 --tasks 100 --latency-tasks 10 --idle 1   # a quick check

For each count N, N dev servers of ``bench/peers/scale_app.py`` are started, each with its own
``MPC_HOST_ID`` (``host-1`` ... ``host-N``: N simulated hosts) and ``BENCH_SLOTS`` reused workers, on
one private ``redis-server`` (flushed between counts). Three phases:

1. *Idle*: nothing queued for ``--idle`` seconds. Redis's CPU is then the hosts' standing cost:
   heartbeats (one per serving process every ``HEARTBEAT_INTERVAL``), and the change-feed readers'
   blocking reads. Reported per host-second and per heartbeat (all idle traffic counted against the
   heartbeats, so an upper bound).
2. *Drain*: ``--tasks`` tiny tasks posted in bulk (``--batch`` per POST, round-robin over the hosts),
   drained by all the hosts together: tasks/s (first POST to the last task ended), and Redis's cost per
   task: its process CPU (``INFO cpu``), its own per-command accounting (``INFO commandstats``: calls and
   microseconds), the script/transaction calls (``EVALSHA``, ``EVAL``, ``FCALL``, ``EXEC``: the store's
   atomic writes), and the change-feed events (``XINFO STREAM``'s ``entries-added``), with Redis CPU per
   event. The script's own completion poll (one ``HGETALL`` every 0.1 s) is subtracted.
3. *Claim latency*: ``--latency-tasks`` tasks one at a time (``POST ?wait=`` to host i mod N): from
   the task's ``created_at`` to its ``started_at`` (both stored by the serving processes), p50 and p99,
   with every other host idle and competing to claim.

On a small machine the drain soon measures the CPUs (every serving process and worker shares them),
not Redis, so the ceiling is projected from Redis's own cost: with c(N) its CPU seconds per task
(a straight line fitted over the measured N, since each event wakes every host's reader) and r(N)
its share of a core at rest (a line too: its own timers, plus each host's heartbeats and blocking
feed reads), one Redis core carries H hosts at up to (1 − r(H)) / c(H) tasks/s; with S slots per host
that keeps every slot busy while the mean task lasts at least H·S / that rate.

Writes ``bench/results/scale_out.json`` and ``scale_out.md``; tears down everything it started.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import redis
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.cross_host import _ts  # noqa: E402
from bench.peers.base import RedisServer  # noqa: E402
from bench.serving import Server, torn_down  # noqa: E402
from bench.workloads import percentile  # noqa: E402
from flask_multiprocess_controller import defaults  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
APP = Path(__file__).resolve().parent / "peers" / "scale_app.py"
CONTROLLER = "scale-out"
#: Commands that are one atomic write of the store (a Lua script, or a MULTI/EXEC transaction).
ATOMIC = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "exec")
#: Seconds between two completion polls of the drain, and the wait of one POST ?wait=.
POLL = 0.1
WAIT = 20
#: Seconds allowed for one drain, and for one start of all servers.
DRAIN_TIMEOUT = 300.0
#: Hosts the projection is given for.
PROJECTED_HOSTS = (16, 32, 64, 128, 256)


class RedisMeter:
    """Snapshots of Redis's process CPU (``INFO cpu``), its command statistics and the change feed's
    entries. Each snapshot is itself a few commands; they fall outside the windows they bound but for
    the last one (a few calls against thousands)."""

    def __init__(self, server: RedisServer) -> None:
        self.client = redis.Redis.from_url(server.url)

    def snapshot(self) -> dict:
        cpu = self.client.info("cpu")  # getrusage of redis-server: microseconds, unlike psutil's clock ticks
        stats = self.client.info("commandstats")
        commands = {name.removeprefix("cmdstat_"): (int(v["calls"]), float(v["usec"])) for name, v in stats.items()}
        return {"cpu": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), "commands": commands, "events": self.events(),
                "at": time.monotonic()}

    def events(self) -> int:
        """Entries ever added to the change feed (its stream is trimmed, so not its length)."""
        total = 0
        for key in self.client.scan_iter(match="*events*", count=1000):
            try:
                if self.client.type(key) != b"stream":
                    continue
                info = self.client.xinfo_stream(key)
            except redis.ResponseError:
                continue
            total += int(info.get("entries-added", info.get("length", 0)))
        return total

    @staticmethod
    def delta(before: dict, after: dict, polls: int = 0) -> dict:
        commands = {}
        for name, (calls, usec) in after["commands"].items():
            calls0, usec0 = before["commands"].get(name, (0, 0.0))
            if calls - calls0:
                commands[name] = [calls - calls0, usec - usec0]
        if polls and "hgetall" in commands:  # the completion poll of this script is not the hosts' cost
            calls, usec = commands["hgetall"]
            per_call = usec / calls if calls else 0.0
            commands["hgetall"] = [max(0, calls - polls), max(0.0, usec - polls * per_call)]
        return {"cpu_s": after["cpu"] - before["cpu"], "seconds": after["at"] - before["at"],
                "events": after["events"] - before["events"], "commands": commands,
                "calls": sum(c for c, _ in commands.values()),
                "atomic": sum(commands.get(name, [0, 0])[0] for name in ATOMIC)}


def _hosts_cpu(servers: list[Server]) -> float:
    """CPU seconds so far of every host's process tree (serving process, fork server, workers)."""
    return sum(sum(server.cpu_seconds().values()) for server in servers)


def start_hosts(count: int, workdir: Path, store: str, slots: int) -> list[Server]:
    servers = []
    for n in range(1, count + 1):
        env = {"MPC_STORE_URL": store, "MPC_HOST_ID": f"host-{n}", "BENCH_SLOTS": str(slots)}
        servers.append(Server.dev(f"host-{n}", APP, env, workdir))
    return servers


def post_bulk(session: requests.Session, server: Server, items: list[dict]) -> list[str]:
    response = session.post(server.base, json=items, timeout=60)
    if response.status_code != 202:
        raise RuntimeError(f"{server.name}: bulk POST answered {response.status_code}: {response.text[:300]}")
    return [t["uuid"] if isinstance(t, dict) else t for t in response.json()["tasks"]]


def ended(store: Any) -> int:
    counts = store.counts(CONTROLLER)
    return sum(v for k, v in counts.items() if k in ("succeeded", "failed", "stopped", "timed_out", "lost"))


def drain(servers: list[Server], store: Any, tasks: int, batch: int, already: int) -> tuple[float, int]:
    """Post ``tasks`` tiny tasks in bulk over the hosts and wait until all ended; (seconds, polls)."""
    chunks = [[{"x": n} for n in range(i, min(tasks, i + batch))] for i in range(0, tasks, batch)]
    local = threading.local()

    def post(args: tuple[int, list[dict]]) -> int:
        index, items = args
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        return len(post_bulk(session, servers[index % len(servers)], items))

    began = time.perf_counter()
    with ThreadPoolExecutor(min(4, len(chunks))) as pool:
        posted = sum(pool.map(post, enumerate(chunks)))
    assert posted == tasks, (posted, tasks)
    polls = 0
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while ended(store) < already + tasks:
        polls += 1
        if time.monotonic() > deadline:
            raise TimeoutError(f"{tasks} tasks not drained within {DRAIN_TIMEOUT:.0f} s")
        time.sleep(POLL)
    return time.perf_counter() - began, polls + 1


def claim_latencies(servers: list[Server], count: int) -> list[float]:
    session = requests.Session()
    samples = []
    for n in range(count):
        server = servers[n % len(servers)]
        response = session.post(server.base, json={"x": n}, params={"wait": WAIT}, timeout=WAIT + 10)
        if response.status_code != 200:
            raise RuntimeError(f"{server.name}: POST ?wait= answered {response.status_code}: {response.text[:300]}")
        task = response.json()
        if task.get("status") != "succeeded":
            raise RuntimeError(f"{server.name}: a tiny task ended {task.get('status')}: {task}")
        samples.append(_seconds(task["started_at"]) - _seconds(task["created_at"]))
        time.sleep(0.02)  # let the hosts settle between two claims
    return samples


def _seconds(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else _ts(value)


def measure(count: int, args: argparse.Namespace, workdir: Path, redis_server: RedisServer,
            started: list) -> dict:
    from flask_multiprocess_controller.store.redis import RedisStore

    meter = RedisMeter(redis_server)
    meter.client.flushall()
    servers = start_hosts(count, workdir, redis_server.url, args.slots)
    started.extend(servers)
    for server in servers:
        server.wait_ready()
    store = RedisStore(redis_server.url)
    try:
        warm = max(4 * count * args.slots, 20)
        drain(servers, store, warm, args.batch, 0)
        done = warm
        time.sleep(1.0)

        before = meter.snapshot()
        time.sleep(args.idle)
        idle = RedisMeter.delta(before, meter.snapshot())
        heartbeats = count * idle["seconds"] / defaults.HEARTBEAT_INTERVAL

        hosts_before = _hosts_cpu(servers)
        before = meter.snapshot()
        seconds, polls = drain(servers, store, args.tasks, args.batch, done)
        busy = RedisMeter.delta(before, meter.snapshot(), polls)
        hosts_cpu = _hosts_cpu(servers) - hosts_before
        done += args.tasks

        latencies = [1000 * s for s in claim_latencies(servers, args.latency_tasks)]
    finally:
        store.close()
        for server in servers:
            server.stop()
            started.remove(server)
    tasks = args.tasks
    return {
        "hosts": count, "slots": args.slots, "tasks": tasks,
        "tasks_per_s": tasks / seconds,
        "claim_p50_ms": percentile(latencies, 50), "claim_p99_ms": percentile(latencies, 99),
        "claim_samples": len(latencies),
        "redis_cpu_ms_per_task": 1000 * busy["cpu_s"] / tasks,
        "redis_calls_per_task": busy["calls"] / tasks,
        "redis_atomic_writes_per_task": busy["atomic"] / tasks,
        "events_per_task": busy["events"] / tasks,
        "redis_cpu_ms_per_event": 1000 * busy["cpu_s"] / busy["events"] if busy["events"] else None,
        "redis_busy_pct": 100 * busy["cpu_s"] / busy["seconds"],
        "hosts_cpu_ms_per_task": 1000 * hosts_cpu / tasks,
        "idle_redis_cpu_pct": 100 * idle["cpu_s"] / idle["seconds"],
        "idle_redis_cpu_ms_per_host_s": 1000 * idle["cpu_s"] / idle["seconds"] / count,
        "idle_redis_cpu_ms_per_heartbeat": 1000 * idle["cpu_s"] / heartbeats,
        "idle_redis_calls_per_host_s": idle["calls"] / idle["seconds"] / count,
        "busy_commands": busy["commands"], "idle_commands": idle["commands"],
    }


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope ≥ 0) of a least-squares line; the median and no slope for fewer than two counts."""
    if len(set(xs)) >= 2:
        slope, intercept = statistics.linear_regression(xs, ys)
        if slope >= 0:
            return intercept, slope
    return statistics.median(ys), 0.0


def project(rows: list[dict], slots: int) -> dict:
    """One Redis core's ceiling, from Redis's own CPU per task and at rest, each a line in the host count:
    per task, each host adds its feed reads and claim attempts; at rest, Redis has a cost of its own
    (its timers) and each host adds its heartbeats and blocking feed reads."""
    xs = [float(r["hosts"]) for r in rows]
    task_base, task_per_host = _line(xs, [r["redis_cpu_ms_per_task"] / 1000 for r in rows])
    idle_base, idle_per_host = _line(xs, [r["idle_redis_cpu_pct"] / 100 for r in rows])
    idle_base = max(0.0, idle_base)
    projected = []
    for hosts in sorted({*[r["hosts"] for r in rows], *PROJECTED_HOSTS}):
        per_task = task_base + task_per_host * hosts
        idle = idle_base + hosts * idle_per_host
        rate = (1.0 - idle) / per_task if idle < 1 and per_task > 0 else 0.0
        projected.append({"hosts": hosts, "redis_cpu_ms_per_task": 1000 * per_task, "idle_core_pct": 100 * idle,
                          "max_tasks_per_s": rate, "shortest_mean_task_s": hosts * slots / rate if rate else None})
    return {"per_task_ms": {"intercept": 1000 * task_base, "per_host": 1000 * task_per_host},
            "idle": {"base_core_pct": 100 * idle_base, "ms_per_host_s": 1000 * idle_per_host,
                     "ms_per_heartbeat": 1000 * idle_per_host * defaults.HEARTBEAT_INTERVAL},
            "slots": slots, "rows": projected}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Scale-out on one Redis", "",
        f"Measured {s['when']} with `{s['command']}` on {s['cpus']} CPUs, Python {s['python']}, "
        f"redis-server {s['redis_version']}. Each serving process is a dev server with its own `MPC_HOST_ID` (a "
        f"simulated host) and {s['slots']} reused workers; tiny tasks ({s['tasks']} per drain, posted "
        f"{s['batch']} per bulk POST); claim latency over {s['latency_tasks']} tasks posted one at a time; "
        f"idle window {s['idle_s']:g} s." + (f" {s['note']}" if s.get("note") else ""), "",
        "Redis calls/task counts the commands a script runs as well as the script's own call; atomic writes are "
        "the scripts and transactions (`EVALSHA`, `EVAL`, `FCALL`, `EXEC`). Redis CPU is `INFO cpu` "
        "(user + system), which also holds its network and event-loop work.", "",
        "| hosts | tasks/s | claim p50 ms | claim p99 ms | Redis CPU ms/task | "
        "Redis calls/task | atomic writes/task | feed events/task | Redis CPU ms/event | Redis busy % | "
        "hosts' CPU ms/task | idle Redis CPU ms per host·s | per heartbeat ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["measured"]:
        per_event = f"{r['redis_cpu_ms_per_event']:.3f}" if r["redis_cpu_ms_per_event"] is not None else "n/a"
        lines.append(
            f"| {r['hosts']} | {r['tasks_per_s']:,.0f} | {r['claim_p50_ms']:.2f} | {r['claim_p99_ms']:.2f} | "
            f"{r['redis_cpu_ms_per_task']:.3f} | {r['redis_calls_per_task']:.1f} | "
            f"{r['redis_atomic_writes_per_task']:.1f} | {r['events_per_task']:.1f} | {per_event} | "
            f"{r['redis_busy_pct']:.0f} | {r['hosts_cpu_ms_per_task']:.2f} | "
            f"{r['idle_redis_cpu_ms_per_host_s']:.3f} | {r['idle_redis_cpu_ms_per_heartbeat']:.3f} |")
    last = result["measured"][-1]
    top = sorted(last["busy_commands"].items(), key=lambda item: -item[1][1])[:10]
    lines += ["", f"Commands per task during the drain with {last['hosts']} hosts (Redis's own accounting, the ten "
              "costliest):", "", "| command | calls/task | µs/task | µs/call |", "|---|---|---|---|"]
    lines += [f"| {name} | {calls / last['tasks']:.2f} | {usec / last['tasks']:.1f} | {usec / calls:.2f} |"
              for name, (calls, usec) in top if calls]
    p = result["projection"]
    lines += [
        "", "## Projected ceiling of one Redis core", "",
        f"Lines fitted over the measured counts: Redis CPU per task = {p['per_task_ms']['intercept']:.3f} ms + "
        f"{p['per_task_ms']['per_host']:.4f} ms × hosts; Redis CPU at rest = {p['idle']['base_core_pct']:.2f} % of a "
        f"core + {p['idle']['ms_per_host_s']:.3f} ms per host per second (all of a host's idle traffic counted "
        f"against its heartbeats: {p['idle']['ms_per_heartbeat']:.3f} ms per heartbeat at most). With one Redis core "
        f"(Redis runs commands on one thread), H hosts carry at most (1 s − rest(H)) / per-task(H) tasks/s; with "
        f"{p['slots']} slots per host, every slot stays busy while the mean task lasts at least H × "
        f"{p['slots']} / that rate.", "",
        "| hosts | hosts × slots | Redis CPU ms/task | idle share of the core % | max tasks/s | shortest mean task s |",
        "|---|---|---|---|---|---|",
    ]
    for r in p["rows"]:
        shortest = f"{r['shortest_mean_task_s']:.3f}" if r["shortest_mean_task_s"] else "n/a"
        lines.append(f"| {r['hosts']} | {r['hosts'] * p['slots']} | {r['redis_cpu_ms_per_task']:.3f} | "
                     f"{r['idle_core_pct']:.1f} | {r['max_tasks_per_s']:,.0f} | {shortest} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, workdir: Path, started: list) -> dict:
    redis_server = RedisServer(workdir).start()
    started.append(redis_server)
    version = redis.Redis.from_url(redis_server.url).info("server").get("redis_version", "?")
    rows = []
    for count in args.hosts:
        began = time.monotonic()
        row = measure(count, args, workdir, redis_server, started)
        rows.append(row)
        print(f"{count:>3} hosts: {row['tasks_per_s']:,.0f} tasks/s, claim p50 {row['claim_p50_ms']:.2f} ms "
              f"p99 {row['claim_p99_ms']:.2f} ms, Redis {row['redis_cpu_ms_per_task']:.3f} CPU ms/task "
              f"({time.monotonic() - began:.0f} s)", flush=True)
    return {"measured": rows, "projection": project(rows, args.slots), "redis_version": version}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", default="1,2,4,8,16", help="serving process counts (default 1,2,4,8,16)")
    parser.add_argument("--slots", type=int, default=2, help="reused workers per serving process (default 2)")
    parser.add_argument("--tasks", type=int, default=1000, help="tiny tasks per drain (default 1000)")
    parser.add_argument("--batch", type=int, default=50, help="tasks per bulk POST (default 50)")
    parser.add_argument("--latency-tasks", type=int, default=60, help="tasks of the claim latency (default 60)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the idle window (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"directory of scale_out.json/.md (default {RESULTS})")
    parser.add_argument("--note", default="", help="a sentence for the report (say, what else ran on the machine)")
    args = parser.parse_args(argv)
    args.hosts = [int(h) for h in args.hosts.split(",") if h]
    if not args.hosts or min(args.hosts) < 1 or args.tasks < 1 or args.latency_tasks < 1 or args.idle <= 0:
        parser.error("--hosts, --tasks and --latency-tasks must be at least 1, --idle positive")

    result = torn_down("mpc-scale-out-", lambda workdir, started: run(args, workdir, started))
    result["settings"] = {
        "hosts": args.hosts, "slots": args.slots, "tasks": args.tasks, "batch": args.batch,
        "latency_tasks": args.latency_tasks, "idle_s": args.idle, "cpus": os.cpu_count(),
        "python": platform.python_version(), "platform": platform.platform(),
        "redis_version": result.pop("redis_version"),
        "heartbeat_interval_s": defaults.HEARTBEAT_INTERVAL, "note": args.note,
        "command": "python bench/scale_out.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
            argv if argv is not None else sys.argv[1:])),
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_out.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / "scale_out.md").write_text(text)
    print()
    print(text)
    print(f"written to {args.out / 'scale_out.json'} and scale_out.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
