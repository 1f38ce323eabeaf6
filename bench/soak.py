#!/usr/bin/env python
"""Soak: many tasks with progress through gunicorn ``-w 4`` on Redis, with workers and Redis itself killed.

It starts, in a temporary folder, a ``redis-server`` on 127.0.0.1 with ``appendonly yes`` and
``appendfsync always`` (no task is acknowledged that a restart could forget), and gunicorn ``-w 4`` serving
``bench/soak_app.py`` on it. Clients submit ``--tasks`` tasks (each reports progress ``--steps`` times and
records each run it makes in a file, see ``soak_app.py``), keeping about ``--backlog`` tasks queued; every
submit carries an ``Idempotency-Key`` header and a lost answer (connection reset, 5xx, 503, 429) is sent
again with the same key. During the run three gunicorn workers are SIGKILLed, one at a time, and
``redis-server`` is SIGKILLed and started again on the same port and folder (at 15 %, 35 %, 50 % and 70 %
of the submits).

Finished tasks are kept ``--retention`` seconds and purged every ``--purge-every`` seconds (in production
the serving processes purge hourly with a retention of days: the soak compresses that time, so that the
store reaches the steady state a year of uptime would have, within the run). For the same reason the store's
event feed cap (``--max-events``, 100,000 in production), the events' age (``--event-retention``, a day) and the
life of an ``Idempotency-Key`` (``--idempotency-ttl``, 24 h) are compressed: each bound is reached early in the
run, and the soak shows that what it bounds then stays flat. Before each purge the
soak reads every finished task's state, so that none is purged before it was counted.

At the end it checks and reports:

- *no task ran twice*: a uuid with two ``S`` run records ran twice (an adopted task is the same run, in the
  same process: one record); and *no duplicate submit*: two tasks with the same submit id (the server
  made a second task for a retried submit);
- *none lost that was accepted*: every uuid answered 202 (or 200) ended, counted by state; ``lost``,
  missing or still unfinished ones count as lost;
- *the limit held*: the most runs at one moment, from the run records, against ``max_num_process``;
- *resources level off*: Redis ``used_memory``, the AOF's size on disk, the event feed's length and key
  count, and the RSS of every process (gunicorn master, each worker, their fork servers and task
  processes, redis-server), sampled every ``--sample-every`` seconds; a series levels off when the most
  of its last quarter is at most 10 % (plus a small slack) above the most of its second quarter.

Results go to ``bench/results/soak.json`` (``--out`` elsewhere) and a table is printed; the exit status
is 1 when a check failed. ``--quick``: a few hundred tasks, a short retention, for a check of the harness.

Usage: python bench/soak.py [--tasks 10000] [--quick] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuid_module
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

import psutil
import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TERMINAL = ("succeeded", "failed", "stopped", "timed_out", "lost")
CONTROLLER = "soak"
#: When (fraction of the submits answered) each fault is made.
FAULTS = ((0.15, "worker"), (0.35, "worker"), (0.50, "redis"), (0.70, "worker"))
#: A series levels off when max(last quarter) <= max(second quarter) * (1 + LEVEL_RATIO) + its slack.
LEVEL_RATIO = 0.10
MIB = 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


# -- the services ----------------------------------------------------------------------------------


class Redis:
    """A redis-server on 127.0.0.1 with appendonly/appendfsync always in ``folder``, that can be killed and
    started again on the same port and folder."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.data = folder / "redis"
        self.data.mkdir()
        self.proc: Optional[subprocess.Popen] = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed")
        out = open(self.folder / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        client = self.client()
        deadline = time.monotonic() + 60
        while True:  # up, and done loading the AOF
            try:
                if client.info("persistence").get("loading") == 0:
                    break
            except redis.RedisError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=2)

    def aof_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.data.rglob("*") if p.is_file())

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Gunicorn:
    """gunicorn ``-w N`` serving ``soak_app:app``; every process ever seen in its tree is remembered and
    killed at the end (a killed worker's fork server, re-parented to init, included)."""

    def __init__(self, folder: Path, port: int, workers: int, env: dict[str, str]) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        out = open(folder / "gunicorn.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}",
             "--chdir", str(BENCH), "soak_app:app"],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.master = psutil.Process(self.proc.pid)
        self.seen: dict[int, psutil.Process] = {}
        self.roles: dict[int, str] = {}
        self.lock = threading.Lock()
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(self.base + "/mpc/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn did not start: see {folder / 'gunicorn.log'}")
            time.sleep(0.1)

    def workers(self) -> list[psutil.Process]:
        try:
            return [p for p in self.master.children() if p.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            return []

    def tree(self) -> dict[str, list[psutil.Process]]:
        """The live processes by role: master, workers, fork servers (a killed worker's, which then holds its
        tasks, included) and task processes. A process's role is its depth below the master when first
        seen."""
        roles: dict[str, list[psutil.Process]] = {
            "master": [self.master], "worker": self.workers(), "forkserver": [], "task": []}
        with self.lock:
            level = roles["worker"]
            for role in ("forkserver", "task", "task"):
                below = []
                for proc in level:
                    try:
                        below += proc.children()
                    except psutil.Error:
                        pass
                for proc in below:
                    self.seen.setdefault(proc.pid, proc)
                    self.roles.setdefault(proc.pid, role)
                level = below
            for pid, proc in list(self.seen.items()):
                try:
                    if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                        roles[self.roles[pid]].append(proc)
                except psutil.Error:
                    pass
        return roles

    def close(self) -> None:
        self.tree()
        with self.lock:
            procs = [*self.workers(), *self.seen.values()]
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        self.proc.kill()
        self.proc.wait()


def rss(procs: list[psutil.Process]) -> list[int]:
    found = []
    for proc in procs:
        try:
            found.append(proc.memory_info().rss)
        except psutil.Error:
            pass
    return found


# -- the run ---------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.records = folder / "runs.log"
        self.redis = Redis(folder, free_port())
        self.server: Optional[Gunicorn] = None
        self.lock = threading.Lock()
        self.next_submit = 0
        self.accepted: dict[str, dict[str, Any]] = {}  # uuid -> {"sid", "code"}
        self.rejected: list[dict[str, Any]] = []
        self.client: Counter[str] = Counter()
        self.final: dict[str, dict[str, Any]] = {}  # uuid -> the finished task's status, attempt, sid
        self.queued = 0
        self.samples: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.purged = 0
        self.done = threading.Event()
        self.started = time.monotonic()

    # the clients --------------------------------------------------------------------------------

    def submitter(self) -> None:
        session = requests.Session()
        body_pad = "x" * self.args.arg_bytes
        while not self.done.is_set():
            with self.lock:
                if self.next_submit >= self.args.tasks:
                    return
                number = self.next_submit
                self.next_submit += 1
            sid, key = f"s{number}", str(uuid_module.uuid4())
            body = {"sid": sid, "steps": self.args.steps, "step": self.args.step, "pad": body_pad}
            while self.queued >= self.args.backlog and not self.done.is_set():
                time.sleep(0.05)
            self.submit(session, sid, key, body)

    def submit(self, session: requests.Session, sid: str, key: str, body: dict[str, Any]) -> None:
        """POST until an answer says the task was taken (202/200) or refused (4xx but 429); the same key
        each time."""
        assert self.server is not None
        delay = 0.1
        first = True
        while not self.done.is_set():
            self.count("posts")
            if not first:
                self.count("retries")
            first = False
            try:
                response = session.post(self.server.base + "/tasks", json=body, headers={"Idempotency-Key": key},
                                        timeout=self.args.http_timeout)
            except requests.RequestException as exc:
                self.count(f"lost_answer_{type(exc).__name__}")
                session = requests.Session()
            else:
                code = response.status_code
                self.count(f"http_{code}")
                if code in (200, 202):
                    uuid = response.json()["uuid"]
                    with self.lock:
                        self.accepted[uuid] = {"sid": sid, "code": code}
                    return
                if 400 <= code < 500 and code != 429:
                    self.rejected.append({"sid": sid, "code": code, "body": response.text[:300]})
                    return
                retry_after = response.headers.get("Retry-After")
                if retry_after and retry_after.isdigit():
                    time.sleep(min(5.0, float(retry_after)))
            time.sleep(delay)
            delay = min(2.0, delay * 2)

    def count(self, what: str) -> None:
        with self.lock:
            self.client[what] += 1

    def progress(self) -> float:
        return len(self.accepted) / self.args.tasks

    # faults ---------------------------------------------------------------------------------------

    def chaos(self) -> None:
        assert self.server is not None
        for fraction, what in FAULTS:
            while self.progress() < fraction and not self.done.is_set():
                time.sleep(0.05)
            if self.done.is_set():
                return
            at = round(time.monotonic() - self.started, 1)
            if what == "worker":
                workers = self.server.workers()
                if not workers:
                    self.faults.append({"at_s": at, "what": "worker", "error": "no worker to kill"})
                    continue
                victim = random.choice(workers)
                victim.send_signal(signal.SIGKILL)
                self.faults.append({"at_s": at, "what": "SIGKILL gunicorn worker", "pid": victim.pid,
                                    "accepted": len(self.accepted)})
                log("killed worker", victim.pid)
            else:
                self.redis.kill()
                log("killed redis-server")
                time.sleep(self.args.redis_down)
                self.redis.start()
                self.faults.append({"at_s": at, "what": "SIGKILL redis-server, restarted",
                                    "down_s": self.args.redis_down, "accepted": len(self.accepted)})
                log("restarted redis-server")

    # watching -------------------------------------------------------------------------------------

    def health(self) -> None:
        """Keep ``self.queued`` (the clients' backlog) up to date from ``/mpc/health``."""
        assert self.server is not None
        while not self.done.is_set():
            try:
                body = requests.get(self.server.base + "/mpc/health", timeout=5).json()
                self.queued = int(body["controllers"][CONTROLLER]["queued"])
            except (requests.RequestException, ValueError, KeyError, TypeError):
                pass
            self.done.wait(0.25)

    def sampler(self) -> None:
        assert self.server is not None
        client = self.redis.client()
        while not self.done.is_set():
            sample: dict[str, Any] = {"t": round(time.monotonic() - self.started, 1),
                                      "accepted": len(self.accepted), "finished": len(self.final)}
            try:
                memory = client.info("memory")
                sample["redis_used_memory"] = memory["used_memory"]
                sample["redis_keys"] = client.dbsize()
                sample["event_feed_length"] = client.xlen("mpc:events")
            except redis.RedisError:
                sample["redis_down"] = True
            sample["aof_bytes"] = self.redis.aof_bytes()
            roles = self.server.tree()
            sample["rss_master"] = sum(rss(roles["master"]))
            workers = rss(roles["worker"])
            sample["rss_workers"] = workers
            sample["rss_worker_max"] = max(workers, default=0)
            forkservers = rss(roles["forkserver"])
            sample["forkservers"] = len(forkservers)
            sample["rss_forkserver_max"] = max(forkservers, default=0)
            tasks = rss(roles["task"])
            sample["task_processes"] = len(tasks)
            sample["rss_task_max"] = max(tasks, default=0)
            redis_proc = self.redis.proc
            sample["rss_redis"] = sum(rss([psutil.Process(redis_proc.pid)])) if redis_proc and \
                redis_proc.poll() is None else 0
            self.samples.append(sample)
            self.done.wait(self.args.sample_every)
        client.close()

    def collect(self) -> None:
        """Read the state of every finished task (pages of the task list) into ``self.final``."""
        assert self.server is not None
        before: Optional[int] = None
        while True:
            params: dict[str, Any] = {"controller": CONTROLLER, "status": ",".join(TERMINAL), "limit": 1000}
            if before is not None:
                params["before"] = before
            page = requests.get(self.server.base + "/mpc/api/tasks", params=params, timeout=60).json()
            for task in page["tasks"]:
                args = task.get("args") or {}
                self.final[task["uuid"]] = {"status": task["status"], "attempt": task.get("attempt"),
                                            "sid": args.get("sid")}
            before = page.get("next")
            if before is None:
                return

    def purger(self) -> None:
        """Every ``--purge-every`` s: count the finished tasks, then purge those past ``--retention``."""
        from flask_multiprocess_controller.exceptions import StoreError
        from flask_multiprocess_controller.store.redis import RedisStore

        store = RedisStore(self.redis.url)
        store.max_events, store.event_retention = self.args.max_events, self.args.event_retention
        while not self.done.wait(self.args.purge_every):
            try:
                self.collect()
                self.purged += store.purge(CONTROLLER, store.now() - self.args.retention)
                store.logs.drop_orphans()  # as a serving process's own purge does
            except (requests.RequestException, ValueError, KeyError, StoreError, redis.RedisError) as exc:
                log("purge skipped:", type(exc).__name__, exc)

    # the whole --------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        args = self.args
        self.redis.start()
        (self.folder / "handover").mkdir(mode=0o700)
        env = dict(os.environ, MPC_STORE_URL=self.redis.url, MPC_HANDOVER_DIR=str(self.folder / "handover"),
                   SOAK_RECORDS=str(self.records),
                   SOAK_CONFIG=json.dumps({"max_num_process": args.max_num_process,
                                           "retention": args.retention, "restartable": args.restartable,
                                           "max_events": args.max_events, "event_retention": args.event_retention,
                                           "idempotency_ttl": args.idempotency_ttl}))
        env.pop("FLASK_RUN_FROM_CLI", None)
        self.server = Gunicorn(self.folder, free_port(), args.workers, env)
        self.started = time.monotonic()
        threads = [threading.Thread(target=self.sampler, daemon=True),
                   threading.Thread(target=self.health, daemon=True),
                   threading.Thread(target=self.purger, daemon=True),
                   threading.Thread(target=self.chaos, daemon=True)]
        submitters = [threading.Thread(target=self.submitter, daemon=True) for _ in range(args.clients)]
        for thread in threads + submitters:
            thread.start()
        next_report = time.monotonic() + 10
        for thread in submitters:
            while thread.is_alive():
                thread.join(1)
                if time.monotonic() > next_report:
                    log(f"accepted {len(self.accepted)}/{args.tasks}, queued {self.queued}, "
                        f"finished (counted) {len(self.final)}")
                    next_report = time.monotonic() + 10
        submitted_s = time.monotonic() - self.started
        log("every submit answered; waiting for the tasks to end")
        deadline = time.monotonic() + args.drain_timeout
        unfinished: list[str] = []
        while time.monotonic() < deadline:
            try:
                self.collect()
            except (requests.RequestException, ValueError, KeyError) as exc:
                log("collect failed:", exc)
            unfinished = [u for u in self.accepted if u not in self.final]
            if not unfinished:
                break
            time.sleep(2)
        for uuid in unfinished:  # purged before it was counted, or not listed: ask for it
            try:
                response = requests.get(f"{self.server.base}/tasks/{uuid}", timeout=30)
                code = response.status_code
                task = response.json() if code == 200 else {"status": f"http_{code}"}
            except (requests.RequestException, ValueError) as exc:
                task = {"status": f"unreadable ({type(exc).__name__})"}
            self.final.setdefault(uuid, {"status": task["status"], "attempt": task.get("attempt"),
                                         "sid": (task.get("args") or {}).get("sid")})
        drained_s = time.monotonic() - self.started
        time.sleep(args.sample_every * 2)  # a few samples of the idle state
        self.done.set()
        for thread in threads:
            thread.join(30)
        return self.report(submitted_s, drained_s)

    def report(self, submitted_s: float, drained_s: float) -> dict[str, Any]:
        args = self.args
        runs: dict[str, list[tuple[str, int, float]]] = defaultdict(list)
        sids: dict[str, str] = {}
        for line in self.records.read_text().splitlines() if self.records.exists() else []:
            kind, uuid, sid, pid, at = line.split()
            runs[uuid].append((kind, int(pid), float(at)))
            sids[uuid] = sid
        ran_twice = {u: r for u, r in runs.items() if sum(1 for k, _, _ in r if k == "S") > 1}

        # the most runs at one moment: +1 at each start, -1 at each end (a run without an end lasts until the
        # last record)
        last = max((at for r in runs.values() for _, _, at in r), default=0.0)
        edges: list[tuple[float, int]] = []
        open_runs = 0
        for record in runs.values():
            starts = sorted(at for k, _, at in record if k == "S")
            ends = sorted(at for k, _, at in record if k == "E")
            for n, start in enumerate(starts):
                end = ends[n] if n < len(ends) else last
                open_runs += n >= len(ends)
                edges += [(start, 1), (end, -1)]
        most = running = 0
        for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
            running += step
            most = max(most, running)

        tasks_by_sid: dict[str, set[str]] = defaultdict(set)
        for uuid, task in self.final.items():
            sid = task.get("sid") or sids.get(uuid)
            if sid:
                tasks_by_sid[sid].add(uuid)
        for uuid, sid in sids.items():
            tasks_by_sid[sid].add(uuid)
        duplicates = {sid: sorted(u) for sid, u in tasks_by_sid.items() if len(u) > 1}

        states = Counter(self.final.get(u, {}).get("status", "missing") for u in self.accepted)
        not_ended = sum(n for state, n in states.items() if state not in TERMINAL or state == "lost")
        attempts = Counter(str(self.final[u].get("attempt")) for u in self.accepted if u in self.final)

        series = {"redis_used_memory": MIB, "aof_bytes": MIB, "redis_keys": 50, "event_feed_length": 50,
                  "rss_master": 4 * MIB, "rss_worker_max": 4 * MIB, "rss_forkserver_max": 4 * MIB,
                  "rss_redis": 4 * MIB}
        levels = {name: level_off([s.get(name) for s in self.samples], slack)
                  for name, slack in series.items()}

        checks = {
            "no_task_ran_twice": not ran_twice,
            "no_duplicate_submit": not duplicates,
            "none_lost_that_was_accepted": not_ended == 0 and not self.rejected,
            "limit_held": most <= args.max_num_process,
            "resources_level_off": all(v["levels_off"] for v in levels.values() if v["levels_off"] is not None),
        }
        return {
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "setup": {"tasks": args.tasks, "workers": args.workers, "max_num_process": args.max_num_process,
                      "steps": args.steps, "step_s": args.step, "arg_bytes": args.arg_bytes, "clients": args.clients,
                      "backlog": args.backlog, "retention_s": args.retention, "purge_every_s": args.purge_every,
                      "max_events": args.max_events, "event_retention_s": args.event_retention,
                      "idempotency_ttl_s": args.idempotency_ttl,
                      "restartable": args.restartable, "redis": "appendonly yes, appendfsync always"},
            "checks": checks,
            "passed": all(checks.values()),
            "seconds": {"submitting": round(submitted_s, 1), "until_all_ended": round(drained_s, 1)},
            "client": dict(sorted(self.client.items())),
            "accepted": len(self.accepted),
            "accepted_again_with_200": sum(1 for a in self.accepted.values() if a["code"] == 200),
            "rejected": self.rejected[:20],
            "states": dict(states),
            "attempts": dict(attempts),
            "ran_twice": {"count": len(ran_twice), "examples": dict(list(ran_twice.items())[:5])},
            "duplicate_submits": {"count": len(duplicates), "tasks": sum(len(u) for u in duplicates.values()),
                                  "examples": dict(list(duplicates.items())[:5])},
            "runs_recorded": sum(1 for r in runs.values() for k, _, _ in r if k == "S"),
            "runs_without_end": open_runs,
            "most_runs_at_once": most,
            "faults": self.faults,
            "purged": self.purged,
            "levels": levels,
            "samples": self.samples,
        }


def level_off(values: list[Optional[float]], slack: float) -> dict[str, Any]:
    """Whether a sampled series levels off: max(last quarter) <= max(second quarter) * 1.1 + slack."""
    known = [v for v in values if v is not None]
    if len(known) < 8:
        return {"levels_off": None, "why": "too few samples"}
    quarter = len(known) // 4
    second, last = max(known[quarter:2 * quarter]), max(known[-quarter:])
    return {"levels_off": last <= second * (1 + LEVEL_RATIO) + slack, "first": known[0],
            "second_quarter_max": second, "last_quarter_max": last, "max": max(known)}


def table(result: dict[str, Any]) -> str:
    def size(name: str, value: Any) -> str:
        if value is None:
            return "-"
        return f"{value / MIB:.1f} MiB" if name.startswith(("rss", "redis_used", "aof")) else str(value)

    lines = [f"{'check':32} result", *(f"{name:32} {'ok' if ok else 'FAILED'}" for name, ok in result["checks"].items()),
             "", f"accepted {result['accepted']} (again with 200: {result['accepted_again_with_200']}), "
                 f"states {result['states']}, attempts {result['attempts']}",
             f"ran twice {result['ran_twice']['count']}, duplicate submits {result['duplicate_submits']['count']}, "
             f"most runs at once {result['most_runs_at_once']} (limit {result['setup']['max_num_process']})",
             f"client {result['client']}", f"seconds {result['seconds']}, purged {result['purged']}", "",
             f"{'series':22} {'first':>10} {'2nd q max':>10} {'last q max':>10} {'max':>10}  levels off"]
    for name, level in result["levels"].items():
        lines.append(f"{name:22} {size(name, level.get('first')):>10} {size(name, level.get('second_quarter_max')):>10} "
                     f"{size(name, level.get('last_quarter_max')):>10} {size(name, level.get('max')):>10}  "
                     f"{level['levels_off']}")
    lines += ["", "faults:", *(f"  {json.dumps(f)}" for f in result["faults"])]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="a few hundred tasks, short retention and samples")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn -w")
    parser.add_argument("--max-num-process", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="progress reports per task")
    parser.add_argument("--step", type=float, default=0.1, help="seconds between two progress reports")
    parser.add_argument("--arg-bytes", type=int, default=1024, help="bytes of padding in each task's arguments")
    parser.add_argument("--clients", type=int, default=4, help="concurrent submitting clients")
    parser.add_argument("--backlog", type=int, default=16, help="clients wait while this many tasks are queued")
    parser.add_argument("--retention", type=float, default=120.0, help="seconds finished tasks are kept")
    parser.add_argument("--purge-every", type=float, default=30.0)
    parser.add_argument("--max-events", type=int, default=20_000,
                        help="the store's event feed cap (100,000 in production: compressed, as the retention is)")
    parser.add_argument("--event-retention", type=float, default=600.0,
                        help="seconds events are kept (a day in production)")
    parser.add_argument("--idempotency-ttl", type=float, default=300.0,
                        help="seconds an Idempotency-Key is kept (24 h in production)")
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--redis-down", type=float, default=3.0, help="seconds redis-server stays killed")
    parser.add_argument("--restartable", action="store_true", help="tasks are re-queued (not lost) without adopter")
    parser.add_argument("--http-timeout", type=float, default=30.0)
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(BENCH / "results" / "soak.json"))
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {"tasks": 300, "retention": 15.0, "purge_every": 5.0, "sample_every": 1.0, "drain_timeout": 180.0,
                    "max_events": 2000, "event_retention": 60.0, "idempotency_ttl": 30.0}
        for name, value in defaults.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    random.seed(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="mpc-soak-", dir="/tmp"))
    soak = Soak(args, folder)
    try:
        result = soak.run()
    finally:
        soak.done.set()
        if soak.server is not None:
            soak.server.close()
        soak.redis.close()
        if os.environ.get("KEEP"):
            log("kept", folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
