#!/usr/bin/env python
"""Claim throughput on one PostgreSQL database, and what serialises the count of running tasks.

    python bench/pg_claims.py                         # 4 and 16 processes, three claim locks; about 2 minutes
    python bench/pg_claims.py --processes 2 --tasks 200 --repeats 1     # a quick check

N processes (each standing for a serving process with ``--slots`` task slots) share one controller on
one private PostgreSQL cluster (:mod:`bench.pgcluster`). ``--tasks`` tasks are queued first; at the
go signal each process claims one task per slot and then, slot after slot, ends its task and claims
the next in one transaction (``finish_and_claim``, what a serving process does when a reused worker
finishes), until the queue is empty. Tasks do no work, so the figures are the store's: claims+ends
per second over all the processes, the latency of one ``finish_and_claim``, the server's CPU per task,
and what the backends waited on (``pg_stat_activity`` sampled every 10 ms: backends waiting, by wait
event).

The limit (``max_running``) is the processes' slots in all, so no claim is refused by it, but every
claim must count the running tasks under a lock that makes the count and the claim one step. Three
ways of taking that lock are measured:

- ``advisory``: the store as it is: ``pg_advisory_xact_lock`` on the controller's name, then
  ``count(*)`` of its active tasks.
- ``row-lock``: a row per controller in a table of its own, locked with ``SELECT ... FOR UPDATE``,
  then the same ``count(*)``.
- ``counter``: that row holds the running count: the claim locks it and reads the count from it (no
  ``count(*)``), increments it when it claims, and every end decrements it (so ends take the row lock
  too, where the other two let ends run without waiting for claims).

The last two are bench-only subclasses of :class:`PostgresStore` (:class:`RowLockStore`,
:class:`CounterStore`) whose first step of a claim (``_claim_lock``: one round trip, a function like the
store's ``claim_lock``) takes their lock instead; the store is not changed.

Writes ``bench/results/pg_claims.json`` and ``pg_claims.md``; tears down everything it started.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid as uuid_module
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.pgcluster import PostgresCluster  # noqa: E402
from flask_multiprocess_controller.events import EventKind  # noqa: E402
from flask_multiprocess_controller.store.postgres import PostgresStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONTROLLER = "claims"
VARIANTS = ("advisory", "row-lock", "counter")
#: Seconds a worker may take to start, and one drain in all.
START_TIMEOUT = 60.0
DRAIN_TIMEOUT = 300.0
SAMPLE_EVERY = 0.01


#: The first step of a claim (see ``claim_lock`` in the store's schema) with another lock: ``{lock}`` is replaced by
#: the statement that takes it and sets ``running``.
_CLAIM_LOCK = """
CREATE OR REPLACE FUNCTION {s}.bench_{name}(p_controller text, OUT now double precision, OUT running bigint)
LANGUAGE plpgsql AS $$
BEGIN
    {lock}
    now := extract(epoch FROM clock_timestamp());
    UPDATE {s}.tasks SET retry_at = NULL
        WHERE controller = p_controller AND status = 'queued' AND retry_at IS NOT NULL AND retry_at <= now;
    {count}
END $$;
"""
_COUNT = ("SELECT count(*) INTO running FROM {s}.tasks "
          "WHERE controller = p_controller AND status IN ('paused', 'running', 'stopping');")


class _Variant(PostgresStore):
    """A store whose claims take another lock than the advisory one (bench only): its ``_claim_lock`` calls a
    function like the store's ``claim_lock``, one round trip too, with the variant's lock."""

    name = ""
    lock = ""
    count = _COUNT

    def setup(self, controller: str) -> None:
        """Create the lock table, the controller's row and the variant's function (once, before the processes
        start)."""
        s = self.schema
        with self._transaction() as tx:
            tx.execute(f"CREATE TABLE IF NOT EXISTS {s}.bench_claim_counts "
                       "(controller text PRIMARY KEY, running bigint NOT NULL)")
            tx.execute(f"INSERT INTO {s}.bench_claim_counts VALUES (%s, 0) ON CONFLICT DO NOTHING", (controller,))
            tx.execute(_CLAIM_LOCK.replace("{lock}", self.lock).replace("{count}", self.count)
                       .replace("{name}", self.name).replace("{s}", s))

    def _claim_lock(self, tx: Any, controller: str) -> tuple[float, int]:
        now, running = tx.execute(f"SELECT * FROM {self.schema}.bench_{self.name}(%s)", (controller,)).fetchone()
        return float(now), int(running)


class RowLockStore(_Variant):
    """Claims lock the controller's row with ``SELECT ... FOR UPDATE`` instead of an advisory lock."""

    name = "row_lock"
    lock = "PERFORM 1 FROM {s}.bench_claim_counts WHERE controller = p_controller FOR UPDATE;"


class CounterStore(_Variant):
    """Claims lock the controller's counter row, read the running count from it and increment it; ends
    decrement it."""

    name = "counter"
    lock = "SELECT c.running INTO running FROM {s}.bench_claim_counts c WHERE c.controller = p_controller FOR UPDATE;"
    count = ""

    def _claim_in(self, tx: Any, controller: str, owner: str, max_running: int, process: Any, rules: Any) -> Any:
        claimed = super()._claim_in(tx, controller, owner, max_running, process, rules)
        if claimed is not None:
            tx.execute(f"UPDATE {self.schema}.bench_claim_counts SET running = running + 1 "
                       "WHERE controller = %s", (controller,))
        return claimed

    def _update_active_in(self, tx: Any, kind: EventKind, uuid: str, owner: Optional[str], emitter: Optional[str],
                          assignments: dict) -> Any:
        event = super()._update_active_in(tx, kind, uuid, owner, emitter, assignments)
        if event is not None and kind is EventKind.ENDED:
            tx.execute(f"UPDATE {self.schema}.bench_claim_counts SET running = running - 1 WHERE controller = %s",
                       (CONTROLLER,))
        return event


STORES = {"advisory": PostgresStore, "row-lock": RowLockStore, "counter": CounterStore}


# -- one claiming process ----------------------------------------------------------------------------

def worker(variant: str, url: str, schema: str, max_running: int, slots: int, owner: str) -> int:
    """Claim and end tasks until the queue is empty, from the go line on stdin; answer JSON on stdout."""
    store = STORES[variant](url, schema)
    store.heartbeat(owner)  # connects: the go signal finds every process ready
    print("ready", flush=True)
    sys.stdin.readline()
    began = time.time()
    held: list[str] = []
    latencies: list[float] = []
    claims = ends = retries = 0
    while len(held) < slots:
        row = store.claim(CONTROLLER, owner, max_running)
        if row is None:
            break
        held.append(row["uuid"])
        claims += 1
    while held:
        uuid = held[0]
        t = time.perf_counter()
        try:
            _, row = store.finish_and_claim(uuid, "succeeded", owner, CONTROLLER, max_running)
        except Exception as exc:  # a deadlock or serialisation failure: counted, and the step is taken again
            retries += 1
            if retries > 100:
                raise RuntimeError(f"{retries} failed steps, the last: {exc}") from exc
            continue
        latencies.append(time.perf_counter() - t)
        held.pop(0)
        ends += 1
        if row is not None:
            held.append(row["uuid"])
            claims += 1
    ended = time.time()
    store.close()
    print(json.dumps({"began": began, "ended": ended, "claims": claims, "ends": ends, "retries": retries,
                      "latencies": latencies}), flush=True)
    return 0


# -- the driver --------------------------------------------------------------------------------------

class WaitSampler(threading.Thread):
    """Samples ``pg_stat_activity`` every 10 ms: how many of the database's backends wait, and on what."""

    def __init__(self, url: str) -> None:
        super().__init__(name="wait-sampler", daemon=True)
        import psycopg
        self.conn = psycopg.connect(url, autocommit=True)
        self.stop = threading.Event()
        self.samples = 0
        self.waiting: dict[str, int] = {}
        self.active = 0

    def run(self) -> None:
        sql = ("SELECT coalesce(wait_event_type || ':' || wait_event, 'on CPU'), count(*) FROM pg_stat_activity "
               "WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid() GROUP BY 1")
        while not self.stop.is_set():
            for event, count in self.conn.execute(sql).fetchall():
                self.waiting[event] = self.waiting.get(event, 0) + count
                self.active += count
            self.samples += 1
            time.sleep(SAMPLE_EVERY)

    def result(self) -> dict:
        self.stop.set()
        self.join(5)
        self.conn.close()
        n = max(1, self.samples)
        return {"samples": self.samples, "active_backends_mean": round(self.active / n, 2),
                "by_wait_event": {k: round(v / n, 2) for k, v in sorted(self.waiting.items(), key=lambda kv: -kv[1])}}


def _queue(url: str, schema: str, tasks: int) -> None:
    store = PostgresStore(url, schema)
    try:
        now = time.time()
        rows = [{"uuid": str(uuid_module.uuid4()), "controller": CONTROLLER, "status": "queued", "priority": 0,
                 "args": {}, "created_at": now, "attempt": 0, "stop_requested": False} for _ in range(tasks)]
        for i in range(0, tasks, 5000):
            store.enqueue(rows[i:i + 5000], -1)
    finally:
        store.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(cluster: PostgresCluster, variant: str, processes: int, args: argparse.Namespace, run: int) -> dict:
    url = cluster.url()
    schema = f"claims_{variant.replace('-', '_')}_{processes}_{run}"
    store = STORES[variant](url, schema)
    if isinstance(store, _Variant):
        store.setup(CONTROLLER)
    store.close()
    _queue(url, schema, args.tasks)
    max_running = processes * args.slots
    workers = [subprocess.Popen([sys.executable, __file__, "--worker", variant, url, schema, str(max_running),
                                 str(args.slots), f"claimer-{i}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, start_new_session=True) for i in range(processes)]
    try:
        for w in workers:
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a claiming process did not start (exit code {w.wait(START_TIMEOUT)})")
        sampler = WaitSampler(url)
        cpu_before = cluster.cpu_seconds()
        go = time.time()
        sampler.start()
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        answers = []
        for w in workers:
            out, _ = w.communicate(timeout=DRAIN_TIMEOUT)
            if w.returncode:
                raise RuntimeError(f"a claiming process exited with {w.returncode}")
            answers.append(json.loads(out.strip().splitlines()[-1]))
        waits = sampler.result()
        server_cpu = cluster.cpu_seconds() - cpu_before
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    ends = sum(a["ends"] for a in answers)
    if ends != args.tasks or sum(a["claims"] for a in answers) != args.tasks:
        raise RuntimeError(f"{variant}, {processes} processes: {ends} ends of {args.tasks} tasks")
    elapsed = max(a["ended"] for a in answers) - go
    latencies = [x for a in answers for x in a["latencies"]]
    return {"variant": variant, "processes": processes, "run": run, "tasks": args.tasks, "seconds": round(elapsed, 3),
            "tasks_per_s": round(args.tasks / elapsed, 1),
            "finish_and_claim_p50_ms": round(1000 * statistics.median(latencies), 3),
            "finish_and_claim_p99_ms": round(1000 * _percentile(latencies, 0.99), 3),
            "server_cpu_ms_per_task": round(1000 * server_cpu / args.tasks, 3),
            "retries": sum(a["retries"] for a in answers), "waits": waits}


def summarise(rows: list[dict]) -> list[dict]:
    """The median run of each (variant, processes) by throughput."""
    chosen = []
    for processes in sorted({r["processes"] for r in rows}):
        for variant in VARIANTS:
            runs = sorted((r for r in rows if r["variant"] == variant and r["processes"] == processes),
                          key=lambda r: r["tasks_per_s"])
            if runs:
                median = dict(runs[len(runs) // 2])
                median["tasks_per_s_runs"] = [r["tasks_per_s"] for r in runs]
                chosen.append(median)
    return chosen


def _waited(row: dict, prefix: str) -> float:
    return sum(v for k, v in row["waits"]["by_wait_event"].items() if k.startswith(prefix))


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Claims on one PostgreSQL database", "",
        f"{s['when']}, `{s['command']}`: {s['cpus']} CPUs shared with other work (the claiming processes, the "
        f"PostgreSQL server and this script all on them), PostgreSQL {s['postgres']} (fsync off, private cluster), "
        f"Python {s['python']}. {s['tasks']:,} queued tasks that do no work, drained by N processes with "
        f"{s['slots']} slots each (`max_running` = N × {s['slots']}); each step ends a task and claims the next in "
        f"one transaction. Median run of {s['repeats']} by throughput (all runs' tasks/s in brackets). Backends "
        "waiting: mean number of the database's active backends waiting on a lock per 10 ms sample "
        "(`pg_stat_activity`; advisory = `Lock:advisory`, row = `Lock:tuple` + `Lock:transactionid`).", "",
        "| processes | claim lock | tasks/s | × advisory | finish_and_claim p50 ms | p99 ms | server CPU ms/task | "
        "backends active | waiting: advisory | waiting: row | retries |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        base = next(b for b in result["summary"] if b["processes"] == r["processes"] and b["variant"] == "advisory")
        runs = ", ".join(f"{x:,.0f}" for x in r["tasks_per_s_runs"])
        lines.append(
            f"| {r['processes']} | {r['variant']} | {r['tasks_per_s']:,.0f} ({runs}) | "
            f"{r['tasks_per_s'] / base['tasks_per_s']:.2f}× | {r['finish_and_claim_p50_ms']:.2f} | "
            f"{r['finish_and_claim_p99_ms']:.2f} | {r['server_cpu_ms_per_task']:.2f} | "
            f"{r['waits']['active_backends_mean']:.2f} | {_waited(r, 'Lock:advisory'):.2f} | "
            f"{_waited(r, 'Lock:tuple') + _waited(r, 'Lock:transactionid'):.2f} | {r['retries']} |")
    lines += ["", "Wait events per sample, by variant and process count:", ""]
    for r in result["summary"]:
        events = ", ".join(f"{k} {v:.2f}" for k, v in r["waits"]["by_wait_event"].items())
        lines.append(f"- {r['processes']} processes, {r['variant']}: {events}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        variant, url, schema, max_running, slots, owner = argv[1:7]
        return worker(variant, url, schema, int(max_running), int(slots), owner)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="4,16", help="comma-separated process counts (default 4,16)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"claim locks (default {','.join(VARIANTS)})")
    parser.add_argument("--tasks", type=int, default=3000, help="tasks drained per run (default 3000)")
    parser.add_argument("--slots", type=int, default=2, help="task slots per process (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant and count (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for pg_claims.json and .md")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.processes.split(",") if n]
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown or not counts:
        parser.error(f"unknown variants {sorted(unknown)}" if unknown else "no process counts")

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cluster = PostgresCluster()
    rows = []
    try:
        for run in range(args.repeats):  # runs interleaved, so a slow spell of the shared machine hits all alike
            for processes in counts:
                for variant in variants:
                    row = measure(cluster, variant, processes, args, run)
                    rows.append(row)
                    print(f"{processes:3} processes, {variant:9}: {row['tasks_per_s']:8,.0f} tasks/s, "
                          f"p50 {row['finish_and_claim_p50_ms']:.2f} ms, waits {row['waits']['by_wait_event']}",
                          flush=True)
        version = cluster.version()
    finally:
        cluster.destroy()
    result = {
        "settings": {"processes": counts, "variants": variants, "tasks": args.tasks, "slots": args.slots,
                     "repeats": args.repeats, "cpus": os.cpu_count(), "python": platform.python_version(),
                     "postgres": version, "platform": platform.platform(),
                     "command": "python bench/pg_claims.py" + (f" {' '.join(argv)}" if argv else ""),
                     "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "summary": summarise(rows), "runs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pg_claims.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "pg_claims.md").write_text(markdown(result))
    print(f"\nwritten to {args.out / 'pg_claims.json'} and pg_claims.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
