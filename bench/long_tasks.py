#!/usr/bin/env python
"""The long-task workload: what the web tier pays to babysit tasks that run for a while and report progress.

    python bench/long_tasks.py            # 64 tasks of 30 s on 16 slots: ~2 minutes per row
    python bench/long_tasks.py --quick    # 16 tasks of 6 s: under 2 minutes in all
    python bench/long_tasks.py --rows sqlite,celery

Each row serves the same workload through gunicorn (``-w 4``, gthread workers): ``--tasks`` tasks of
``--seconds`` seconds each, every one reporting its progress ``--rate`` times a second, on ``--slots``
slots (``max_num_process`` across the four serving processes; Celery: one worker with
``--concurrency`` of as many pool processes). The rows:

- ``sqlite``, ``redis``, ``postgresql``: this project (``bench/peers/long_mpc_app.py``) on each store
  (Redis: a private ``redis-server``; PostgreSQL: a private cluster, :mod:`bench.pgcluster`, when installed);
- ``celery``: Celery on Redis (``bench/peers/long_celery.py``), the task calling ``update_state`` and a
  Flask endpoint reading ``AsyncResult`` (``state``, then ``info``).

Every task is POSTed first; the measured window starts once the last POST is answered and ends when the
last task is seen ended. During it a poller GETs the tasks that run (a task seen queued is asked again
3 s later), ``--poll-rate`` GETs a second, in phases of ``--phase`` seconds that come in pairs, one of
each kind in a random order (``--seed``): in a *reading* phase it polls, in a *quiet* phase it sends
nothing. So the CPU of the quiet phases is what babysitting the tasks costs alone, and that of the reading
phases adds a steady, equal read load in every row; the random order keeps the bursts of work when a wave
of tasks starts or ends from falling always in one kind.

Figures, per row:

- CPU in % of one core (user + system from psutil, 10 ms clock ticks, read at every phase boundary) by
  role: *web tier* = gunicorn's master and workers plus, for this project, the fork servers they start
  (the processes a deployment sizes for serving requests); Celery's *worker main* process (its
  supervisor, outside the web tier); the *task processes*; the *store* server (``redis-server``, the
  PostgreSQL cluster's processes; SQLite has no process of its own: its work is done inside the others);
- progress age at GET: for every GET of a running task whose progress is known, the answer's arrival
  time minus the time embedded in the progress value (same machine, same clock), p50 and p99. A value is
  reported every ``1 / rate`` s, so even a store with no delay answers ages spread over 0 to one period
  (p50 half a period) plus the GET's own round trip;
- the peak RSS of the serving processes (gunicorn master + workers), and of this project's fork servers
  and Celery's worker main process beside them (summed RSS counts shared pages once per process).

Results: ``bench/results/long_tasks.json`` and ``long_tasks.md`` (``--out`` elsewhere); when
``bench/results/latest.json`` exists, ``latest.md`` is written again with this table first.
Like ``bench/run.py`` it first makes its environment (``bench/.venv``) and runs itself in it.
"""
from __future__ import annotations

import argparse
import datetime
import heapq
import json
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import environment  # noqa: E402

if TYPE_CHECKING:  # imported where used: the script first runs itself in its environment (psutil, requests)
    from bench.serving import Server

RESULTS = environment.BENCH_DIR / "results"
#: Row keys in report order, and their labels.
ROWS = {
    "sqlite": "this project, SQLite store",
    "redis": "this project, Redis store",
    "postgresql": "this project, PostgreSQL store",
    "celery": "Celery + Redis, Flask endpoint reading AsyncResult",
}
#: Statuses after which a task is no longer polled (this project's and Celery's).
TERMINAL = frozenset({"succeeded", "failed", "stopped", "timed_out", "lost", "SUCCESS", "FAILURE", "REVOKED"})
QUEUED = frozenset({"queued", "PENDING"})
SUCCEEDED = frozenset({"succeeded", "SUCCESS"})
#: Seconds before a task seen queued is asked again (so that most GETs go to running tasks).
QUEUED_RECHECK = 3.0
HTTP_TIMEOUT = 30.0
STEP_TIMEOUT = 60.0
#: Seconds the servers get to become quiet after they start, before the tasks are posted.
SETTLE = 1.0
#: Pollers reading side by side (each over a connection of its own).
POLLERS = 8
#: Roles whose CPU makes the web tier.
WEB_TIER = ("serving", "fork server")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The long-task workload: web-tier cost of tasks reporting progress.")
    parser.add_argument("--quick", action="store_true", help="16 tasks of 6 s (phases of 0.5 s)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default: {','.join(ROWS)})")
    parser.add_argument("--tasks", type=int, help="tasks in all (default 64; quick 16)")
    parser.add_argument("--seconds", type=float, help="seconds each task runs (default 30; quick 6)")
    parser.add_argument("--rate", type=float, default=10.0, help="progress reports a second per task")
    parser.add_argument("--slots", type=int, default=16, help="tasks running at once")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers")
    parser.add_argument("--poll-rate", type=float, default=32.0, help="GETs a second in reading phases")
    parser.add_argument("--phase", type=float, help="seconds of each quiet or reading phase (default 1; quick 0.5)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the order of the phases in each pair")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for long_tasks.json/.md")
    parser.add_argument("--no-setup", action="store_true", help="use this interpreter as it is")
    return parser.parse_args(argv)


# -- the rows ----------------------------------------------------------------------------------------------


class Row:
    """One system serving the workload through gunicorn; :meth:`start` brings it up, :meth:`close` tears
    it all down. :meth:`cpu` and :meth:`rss` read its processes by role."""

    key = ""
    app = ""
    #: Whether each gunicorn worker starts a controller's fork server (awaited before the row is ready).
    fork_servers = False

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.args = args
        self.server: Optional["Server"] = None
        self.store_label = ""

    @property
    def label(self) -> str:
        return ROWS[self.key]

    def env(self) -> dict:
        return {}

    def start(self) -> None:
        """gunicorn on the row's app (its log ``gunicorn.log``), once every worker is up."""
        from bench.serving import Server
        self.server = Server.gunicorn("gunicorn", self.app, self.env(), self.workdir, self.args.workers, threads=8)
        self.base_url = self.server.base
        self.server.wait_ready(STEP_TIMEOUT, http=False, fork_servers=self.fork_servers)

    def _tail(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def serving(self) -> list:
        """gunicorn's master and its workers."""
        return [*self.server.arbiter(), *self.server.serving()] if self.server is not None else []

    def cpu(self) -> dict[str, float]:
        raise NotImplementedError

    def rss(self) -> dict[str, int]:
        raise NotImplementedError

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server = None

    def versions(self) -> dict:
        from importlib.metadata import version
        return {"flask": version("flask"), "gunicorn": version("gunicorn")}


def _rss(procs: list) -> int:
    import psutil
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


class MpcRow(Row):
    """This project on one store."""

    app = "bench.peers.long_mpc_app:app"
    fork_servers = True

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        super().__init__(workdir, args)
        self.redis = None
        self.pg = None
        self.store_url = ""

    def start(self) -> None:
        from bench.peers import base
        if self.key == "sqlite":
            self.store_url = f"sqlite:///{self.workdir / 'tasks.sqlite3'}"
            self.store_label = "SQLite (no process of its own)"
        elif self.key == "redis":
            self.redis = base.RedisServer(self.workdir).start()
            self.store_url = self.redis.url
            self.store_label = "redis-server"
        else:
            from bench import pgcluster
            if pgcluster.bin_dir() is None:
                raise base.PeerUnavailable("PostgreSQL is not installed (Debian: apt-get install postgresql)")
            self.pg = pgcluster.PostgresCluster()
            self.store_url = self.pg.url()
            self.store_label = f"PostgreSQL {self.pg.version()}"
        super().start()

    def env(self) -> dict:
        return {"MPC_STORE_URL": self.store_url, "BENCH_SLOTS": str(self.args.slots)}

    def cpu(self) -> dict[str, float]:
        from bench.peers import accounting
        roles = accounting.mpc_roles(self.serving())
        if self.redis is not None:
            roles["store"] = sum(map(accounting.own, accounting.processes([self.redis.proc.pid])))
        elif self.pg is not None:
            roles["store"] = self.pg.cpu_seconds()
        return roles

    def rss(self) -> dict[str, int]:
        from bench.peers import accounting
        serving = self.serving()
        pids = {p.pid for p in serving}
        forkservers = [c for p in serving for c in accounting.children(p) if c.pid not in pids]
        return {"serving": _rss(serving), "fork server": _rss(forkservers)}

    def close(self) -> None:
        super().close()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self.pg is not None:
            self.pg.destroy()
            self.pg = None

    def versions(self) -> dict:
        found = super().versions()
        if self.redis is not None:
            import redis
            found["redis-server"] = redis.Redis.from_url(self.redis.url).info("server").get("redis_version", "?")
        if self.pg is not None:
            import psycopg
            found.update({"postgresql": self.pg.version(), "psycopg": psycopg.__version__})
        return found


class CeleryRow(Row):
    """Celery on Redis: one worker of ``slots`` pool processes; the web tier reads ``AsyncResult``."""

    key = "celery"
    app = "bench.peers.long_celery:web"

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        super().__init__(workdir, args)
        self.redis = None
        self.worker = None
        self.store_label = "redis-server"

    def env(self) -> dict:
        from bench.peers import long_celery
        return {long_celery.URL_ENV: self.redis.url}

    def start(self) -> None:
        from bench.peers import base, long_celery
        self.redis = base.RedisServer(self.workdir).start()
        log = self.workdir / "celery.log"
        self.worker = base.spawn([sys.executable, "-m", "celery", "-A", "bench.peers.long_celery", "worker",
                                  "--pool", "prefork", "--concurrency", str(self.args.slots), "--loglevel",
                                  "WARNING"], log, env=self.env())
        long_celery.celery.conf.update(broker_url=self.redis.url, result_backend=self.redis.url)

        def pinged() -> bool:
            if self.worker.poll() is not None:
                raise RuntimeError(f"celery worker exited with {self.worker.returncode}:\n{self._tail('celery.log')}")
            return bool(long_celery.celery.control.ping(timeout=0.5))
        base.poll_until(pinged, bool, STEP_TIMEOUT, "celery worker answering a ping", 0.1)
        super().start()

    def _worker_parts(self) -> tuple[list, list]:
        from bench.peers import accounting
        main = accounting.processes([self.worker.pid]) if self.worker is not None else []
        return main, [c for m in main for c in accounting.children(m, recursive=True)]

    def cpu(self) -> dict[str, float]:
        from bench.peers import accounting
        main, pool = self._worker_parts()
        return {"serving": sum(map(accounting.own, self.serving())),
                "worker main": sum(map(accounting.own, main)),
                "tasks": sum(map(accounting.own, pool)) + sum(map(accounting.reaped, [*main, *pool])),
                "store": sum(map(accounting.own, accounting.processes([self.redis.proc.pid])))}

    def rss(self) -> dict[str, int]:
        main, _ = self._worker_parts()
        return {"serving": _rss(self.serving()), "worker main": _rss(main)}

    def close(self) -> None:
        from bench.peers import base
        super().close()
        base.stop_tree(self.worker, timeout=10.0)
        self.worker = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def versions(self) -> dict:
        import celery
        import redis
        info = redis.Redis.from_url(self.redis.url).info("server") if self.redis else {}
        return {**super().versions(), "celery": celery.__version__, "redis-py": redis.__version__,
                "redis-server": info.get("redis_version", "?")}


def make_row(key: str, workdir: Path, args: argparse.Namespace) -> Row:
    if key == "celery":
        return CeleryRow(workdir, args)
    row = MpcRow(workdir, args)
    row.key = key
    return row


# -- the measurement ---------------------------------------------------------------------------------------


def _session() -> Any:
    """A requests session whose GETs are sent again when the server closed an idle keep-alive connection
    just as the request went out (gunicorn closes them after 2 s; a GET is safe to repeat)."""
    import requests
    from urllib3.util.retry import Retry
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(max_retries=Retry(total=3, status=0, backoff_factor=0,
                                                               allowed_methods=frozenset({"GET"})))
    session.mount("http://", adapter)
    return session


class Pollers:
    """``count`` threads GETting the tasks, each over a connection of its own, ``rate`` GETs a second in
    all while ``reading`` is set: the running tasks round robin (a task seen queued is asked again
    :data:`QUEUED_RECHECK` s later); each running task's progress age is recorded.

    The GETs are due at fixed times (``1 / rate`` apart from the start of each reading phase) and the next
    free thread sends the next one, so a slow answer does not lower the rate; and since a keep-alive
    connection stays with one gunicorn worker, several connections spread the reads over the workers as
    many clients would."""

    def __init__(self, base_url: str, uuids: list[str], rate: float, count: int) -> None:
        self.base_url = base_url
        self.period = 1.0 / rate
        self.reading = threading.Event()
        self.halt = threading.Event()
        self.done = threading.Event()
        self.ages: list[float] = []
        #: GETs sent (in reading phases only).
        self.gets = 0
        self.ended = 0
        self.error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._due = [(0.0, n, uuid) for n, uuid in enumerate(uuids)]
        self._seq = len(uuids)
        self._left = len(uuids)
        self._next: Optional[float] = None
        self._threads = [threading.Thread(target=self._thread, name=f"long-tasks-poller-{n}", daemon=True)
                         for n in range(max(1, count))]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finished(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every task to be seen ended (or a GET to have failed)."""
        return self.done.wait(timeout)

    def pause(self) -> None:
        """End a reading phase: the next one starts its schedule afresh."""
        self.reading.clear()
        with self._lock:
            self._next = None

    def stop(self) -> None:
        self.halt.set()
        self.reading.set()
        for thread in self._threads:
            thread.join(HTTP_TIMEOUT)

    def _take(self) -> Optional[tuple[float, str]]:
        """The next GET's due time and task, or None when there is none to send yet."""
        with self._lock:
            if not self._due:
                return None
            now = time.monotonic()
            if self._next is None:
                self._next = now
            if self._due[0][0] > now:
                return None
            at = self._next
            self._next = max(self._next + self.period, now - self.period)
            self.gets += 1  # counted when sent: the rate asked of the server
            return at, heapq.heappop(self._due)[2]

    def _thread(self) -> None:
        session = _session()
        try:
            while not self.halt.is_set() and not self.done.is_set():
                if not self.reading.wait(0.1):
                    continue
                taken = self._take()
                if taken is None:
                    self.halt.wait(0.01)
                    continue
                at, uuid = taken
                if at > time.monotonic():
                    self.halt.wait(at - time.monotonic())
                self._get(session, uuid)
        except BaseException as exc:  # reported by the measurement
            self.error = exc
            self.done.set()

    def _get(self, session: Any, uuid: str) -> None:
        response = session.get(f"{self.base_url}/{uuid}", timeout=HTTP_TIMEOUT)
        arrived = time.time()
        if response.status_code != 200:
            raise RuntimeError(f"GET {uuid} answered {response.status_code}: {response.text[:300]}")
        task = response.json()
        status = task.get("status")
        progress = task.get("progress")
        with self._lock:
            if status in TERMINAL:
                self.ended += 1
                self._left -= 1
                if self._left == 0:
                    self.done.set()
                return
            if isinstance(progress, dict) and "t" in progress:
                self.ages.append(arrived - progress["t"])
            self._seq += 1
            later = QUEUED_RECHECK if status in QUEUED else 0.0
            heapq.heappush(self._due, (time.monotonic() + later, self._seq, uuid))


def _percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def measure(row: Row, args: argparse.Namespace) -> dict:
    """Post the tasks, alternate quiet and reading phases until every task is seen ended; the figures."""
    import requests
    session = requests.Session()
    time.sleep(SETTLE)
    uuids = []
    for _ in range(args.tasks):
        response = session.post(row.base_url, json={"seconds": args.seconds, "rate": args.rate}, timeout=HTTP_TIMEOUT)
        if response.status_code != 202:
            raise RuntimeError(f"POST answered {response.status_code}: {response.text[:300]}")
        uuids.append(response.json()["uuid"])
    # One connection per poller: a keep-alive connection stays with one gunicorn worker, so several spread
    # the reads over the workers as many clients would.
    poller = Pollers(row.base_url, uuids, args.poll_rate, POLLERS)
    poller.start()
    spent = {"quiet": {}, "reading": {}}
    wall = {"quiet": 0.0, "reading": 0.0}
    peak: dict[str, int] = {}
    waves = math.ceil(args.tasks / args.slots)
    deadline = time.monotonic() + waves * args.seconds * 3 + STEP_TIMEOUT
    began = time.monotonic()
    before, at = row.cpu(), time.monotonic()
    # Phases come in pairs, one of each kind in a random order, so that the bursts of work when a wave of
    # tasks starts or ends fall in either kind alike (in a fixed alternation they would fall in one kind
    # whenever the tasks' length is an even number of phases).
    rng = random.Random(args.seed)
    kinds: list[str] = []
    timeline: list[list] = []
    try:
        done = False
        while not done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{poller.ended} of {args.tasks} tasks seen ended by the deadline")
            if not kinds:
                kinds = rng.sample(["quiet", "reading"], 2)
            kind = kinds.pop()
            if kind == "reading":
                poller.reading.set()
            done = poller.finished(args.phase)
            poller.pause()
            after, now = row.cpu(), time.monotonic()
            for role, seconds in after.items():
                spent[kind][role] = spent[kind].get(role, 0.0) + seconds - before.get(role, 0.0)
            wall[kind] += now - at
            web = sum(after.get(r, 0.0) - before.get(r, 0.0) for r in WEB_TIER)
            timeline.append([kind, round(now - began, 2), round(100 * web / (now - at), 1)])
            for role, size in row.rss().items():
                peak[role] = max(peak.get(role, 0), size)
            before, at = after, now
    finally:
        poller.stop()
    if poller.error is not None:
        raise poller.error
    window = time.monotonic() - began
    reader = _session()
    ended = {uuid: reader.get(f"{row.base_url}/{uuid}", timeout=HTTP_TIMEOUT).json().get("status")
             for uuid in uuids}
    figures: dict[str, Any] = {"window_s": round(window, 2), "gets": poller.gets,
                               "gets_per_s": round(poller.gets / wall["reading"], 1) if wall["reading"] else None,
                               "ended_ok": sum(status in SUCCEEDED for status in ended.values()),
                               "ended_other": sorted({s for s in ended.values() if s not in SUCCEEDED})}
    for kind in ("quiet", "reading"):
        seconds = wall[kind]
        figures[f"{kind}_s"] = round(seconds, 2)
        for role, cpu in spent[kind].items():
            figures[f"cpu_{kind}_{role.replace(' ', '_')}_pct"] = round(100 * cpu / seconds, 2) if seconds else None
        figures[f"cpu_{kind}_web_tier_pct"] = round(
            100 * sum(spent[kind].get(r, 0.0) for r in WEB_TIER) / seconds, 2) if seconds else None
    total = sum(wall.values())
    for role in {r for kind in spent.values() for r in kind}:
        cpu = sum(spent[kind].get(role, 0.0) for kind in spent)
        figures[f"cpu_all_{role.replace(' ', '_')}_pct"] = round(100 * cpu / total, 2)
    figures["progress_age_p50_ms"] = _ms(_percentile(poller.ages, 0.5))
    figures["progress_age_p99_ms"] = _ms(_percentile(poller.ages, 0.99))
    figures["progress_age_max_ms"] = _ms(max(poller.ages) if poller.ages else None)
    figures["progress_samples"] = len(poller.ages)
    figures["cpu_all_web_tier_pct"] = round(
        100 * sum(spent[k].get(r, 0.0) for k in spent for r in WEB_TIER) / total, 2) if total else None
    #: Per phase: its kind, its end (s into the window) and the web tier's % of a core in it.
    figures["timeline"] = timeline
    for role, size in peak.items():
        figures[f"rss_{role.replace(' ', '_')}_mib"] = round(size / 2 ** 20, 1)
    return figures


def _ms(seconds: Optional[float]) -> Optional[float]:
    return round(1000 * seconds, 1) if seconds is not None else None


def run_row(key: str, args: argparse.Namespace) -> dict:
    from bench.peers.base import PeerUnavailable
    outcome: dict[str, Any] = {"row": key, "label": ROWS[key], "figures": {}, "versions": {}}
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-long-{key}-"))
    row = make_row(key, workdir, args)
    began = time.monotonic()
    try:
        row.start()
        outcome["store"] = row.store_label
        outcome["versions"] = row.versions()
        outcome["figures"] = measure(row, args)
    except PeerUnavailable as exc:
        outcome["unavailable"] = str(exc)
    except Exception as exc:  # reported, and the other rows still run
        outcome["error"] = f"{type(exc).__name__}: {exc}"
        logs = [p for p in workdir.glob("*.log")]
        outcome["log_tail"] = {p.name: p.read_text(errors="replace")[-1500:] for p in logs}
    finally:
        row.close()
        shutil.rmtree(workdir, ignore_errors=True)
    outcome["seconds"] = round(time.monotonic() - began, 1)
    return outcome


# -- the report --------------------------------------------------------------------------------------------

#: (figure, column title, format)
COLUMNS = [
    ("cpu_all_web_tier_pct", "web tier % of a core", "{:.2f}"),
    ("cpu_quiet_web_tier_pct", "web tier %, no reads", "{:.2f}"),
    ("cpu_reading_web_tier_pct", "web tier %, reading", "{:.2f}"),
    ("cpu_quiet_fork_server_pct", "of it fork servers %, no reads", "{:.2f}"),
    ("cpu_all_worker_main_pct", "worker main %", "{:.2f}"),
    ("cpu_all_tasks_pct", "task processes %", "{:.1f}"),
    ("cpu_all_store_pct", "store %", "{:.2f}"),
    ("gets_per_s", "GETs/s, reading", "{:.1f}"),
    ("progress_age_p50_ms", "progress age at GET p50 ms", "{:.0f}"),
    ("progress_age_p99_ms", "p99 ms", "{:.0f}"),
    ("rss_serving_mib", "serving RSS MiB", "{:.0f}"),
    ("rss_fork_server_mib", "fork servers RSS MiB", "{:.0f}"),
    ("rss_worker_main_mib", "worker main RSS MiB", "{:.0f}"),
]


def _cell(figures: dict, metric: str, fmt: str) -> str:
    value = figures.get(metric)
    return fmt.format(value) if isinstance(value, (int, float)) else "—"


def table(data: dict) -> list[str]:
    """The markdown lines of the long-task section (heading included): the table, what it measured, problems."""
    p = data["params"]
    period_ms = 1000 / p["rate"]
    lines = [
        "## Long tasks: what the web tier pays to babysit them", "",
        f"{p['tasks']} tasks of {p['seconds']:g} s, each reporting progress {p['rate']:g} times a second, "
        f"on {p['slots']} slots, through gunicorn `-w {p['workers']}` (gthread); measured {data['date']} with "
        f"`{data['command']}` ({data['mode']} mode), load average {data['load_average']} at the start. "
        f"CPU in % of one core over the run (every task posted, then until the last one ended), in phases "
        f"of {p['phase']:g} s that come in pairs, one of each kind in a random order: *no reads*, nobody asks "
        f"about the tasks; *reading*, pollers GET the running ones, {p['poll_rate']:g} GETs a second asked (the rate achieved is in "
        f"the table); "
        f"the first column is over both kinds. Web tier = gunicorn's master and workers, plus this "
        f"project's fork servers; Celery's worker main process is its supervisor, outside the web tier. "
        f"Store = the store's server (SQLite has none: its work is inside the other columns). "
        f"Progress age = a GET's arrival minus the time inside the progress value it returned: with a value "
        f"every {period_ms:.0f} ms, a store with no delay at all answers ages from 0 to {period_ms:.0f} ms "
        f"(p50 ≈ {period_ms / 2:.0f} ms). RSS: the peak over the run, summed over the processes." + (
            " Quick mode runs one wave of short tasks, so their start and end weigh more than in a full run."
            if data["mode"] == "quick" else ""), "",
        "| row | " + " | ".join(c[1] for c in COLUMNS) + " | tasks ended ok |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    problems = []
    for o in data["rows"]:
        f = o.get("figures") or {}
        if o.get("unavailable") or o.get("error"):
            problems.append(f"- {o['label']}: {o.get('unavailable') or o.get('error')}")
            lines.append(f"| {o['label']} | " + " | ".join("n/a" for _ in COLUMNS) + " | n/a |")
            continue
        other = f" ({', '.join(f['ended_other'])})" if f.get("ended_other") else ""
        lines.append(f"| {o['label']} | " + " | ".join(_cell(f, m, fmt) for m, _, fmt in COLUMNS)
                     + f" | {f.get('ended_ok', 0)} of {p['tasks']}{other} |")
    if problems:
        lines += ["", *problems]
    return lines


def markdown(data: dict) -> str:
    lines = ["# Long tasks", "", *table(data)[2:], "", "## Versions", ""]
    for o in data["rows"]:
        versions = ", ".join(f"{k} {v}" for k, v in o.get("versions", {}).items()) or "—"
        lines.append(f"- {o['label']}: {versions}")
    lines += ["", f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, "
              f"{data['machine']['memory']}, Python {data['machine']['python']}; {data['seconds']:.0f} s in all."]
    return "\n".join(lines) + "\n"


def refresh_latest(out: Path) -> bool:
    """Write ``latest.md`` again from ``latest.json`` (when there is one), so that it shows this table first."""
    latest = out / "latest.json"
    if not latest.exists():
        return False
    from bench import report
    (out / "latest.md").write_text(report.markdown(json.loads(latest.read_text()), report.long_tasks(out)))
    return True


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if not args.no_setup and not environment.in_venv():
        environment.ensure_redis_server()
        python = environment.ensure_venv()
        os.execv(str(python), [str(python), str(Path(__file__).resolve()), *argv, "--no-setup"])
    args.tasks = args.tasks or (16 if args.quick else 64)
    args.seconds = args.seconds or (6.0 if args.quick else 30.0)
    args.phase = args.phase or (0.5 if args.quick else 1.0)
    keys = [k for k in args.rows.split(",") if k]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        sys.exit(f"unknown rows: {', '.join(unknown)} (known: {', '.join(ROWS)})")
    began = time.monotonic()
    data: dict[str, Any] = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "python bench/long_tasks.py" + (" --quick" if args.quick else ""),
        "mode": "quick" if args.quick else "full", "machine": environment.machine(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "params": {"tasks": args.tasks, "seconds": args.seconds, "rate": args.rate, "slots": args.slots,
                   "workers": args.workers, "poll_rate": args.poll_rate, "phase": args.phase},
        "rows": [],
    }
    for key in keys:
        print(f"== {key}", flush=True)
        outcome = run_row(key, args)
        data["rows"].append(outcome)
        f = outcome["figures"]
        print(f"   {outcome['seconds']} s; " + (outcome.get("unavailable") or outcome.get("error") or
              f"web tier {f.get('cpu_quiet_web_tier_pct')} % no reads, {f.get('cpu_reading_web_tier_pct')} % "
              f"reading; age p50 {f.get('progress_age_p50_ms')} ms, p99 {f.get('progress_age_p99_ms')} ms; "
              f"{f.get('ended_ok')} ended ok"), flush=True)
    data["seconds"] = round(time.monotonic() - began, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_tasks.json").write_text(json.dumps(data, indent=1))
    (args.out / "long_tasks.md").write_text(markdown(data))
    refreshed = refresh_latest(args.out)
    print(f"Wrote {args.out / 'long_tasks.md'}" + (" and latest.md" if refreshed else "")
          + f" in {data['seconds']:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
