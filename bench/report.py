"""Turn the figures of one run into ``latest.md`` (tables, ratios, targets) and ``latest.png``."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

#: (metric, column title, format, higher is better)
COLUMNS = [
    ("burst_tasks_per_s", "burst tasks/s", "{:,.0f}", True),
    ("sequential_p50_ms", "sequential p50 ms", "{:.2f}", False),
    ("sequential_p95_ms", "sequential p95 ms", "{:.2f}", False),
    ("dispatch_p50_ms", "dispatch p50 ms", "{:.2f}", False),
    ("dispatch_p95_ms", "dispatch p95 ms", "{:.2f}", False),
    ("post_p50_ms", "POST alone p50 ms", "{:.2f}", False),
    ("stop_checkpoint_p50_ms", "stop (checkpoints) p50 ms", "{:.1f}", False),
    ("stop_ignoring_p50_ms", "stop (ignores) p50 ms", "{:.1f}", False),
]
MEMORY_COLUMNS = [
    ("pss_idle_mib", "PSS idle MiB", "{:.1f}", False),
    ("pss_queued_mib", "PSS, tasks queued MiB", "{:.1f}", False),
    ("pss_after_mib", "PSS after they ran MiB", "{:.1f}", False),
    ("pss_idle_serving_mib", "idle: serving processes MiB", "{:.1f}", False),
    ("pss_idle_forkserver_mib", "idle: fork servers MiB", "{:.1f}", False),
    ("pss_idle_tasks_mib", "idle: task processes MiB", "{:.1f}", False),
]
#: Where the time goes: (role as figures name it, column title).
CPU_ROLES = [("serving", "serving"), ("forkserver", "fork server"), ("tasks", "task processes"),
             ("client", "client"), ("redis", "Redis"), ("postgres", "PostgreSQL"), ("total", "total")]
CPU_WORKLOADS = ["burst", "sequential", "dispatch"]
PROGRESS_COLUMNS = [
    ("progress_slowdown_pct", "loop slowdown %", "{:.1f}", False),
    ("progress_call_ns", "cost per call ns", "{:,.0f}", False),
    ("progress_store_writes", "store writes", "{:.0f}", False),
]
STORED_COLUMNS = [
    ("get_small_per_s", "GET/s, small store", "{:,.0f}", True),
    ("get_large_per_s", "GET/s, large store", "{:,.0f}", True),
    ("get_large_vs_small", "GET slowdown ×", "{:.2f}", False),
    ("post_small_per_s", "POST/s, small store", "{:,.0f}", True),
    ("post_large_per_s", "POST/s, large store", "{:,.0f}", True),
    ("post_large_vs_small", "POST slowdown ×", "{:.2f}", False),
]
OURS_PREFIX = "mpc-"
FLOOR_PREFIX = "http-floor-"


def median(outcome: dict, metric: str) -> Optional[float]:
    values = outcome.get("figures", {}).get(metric)
    return statistics.median(values) if values else None


def _cell(outcome: dict, metric: str, fmt: str) -> str:
    values = outcome.get("figures", {}).get(metric)
    if not values:
        return "n/a"
    text = fmt.format(statistics.median(values))
    if len(values) > 1:
        text += f" ({fmt.format(min(values))}–{fmt.format(max(values))})"
    return text


def _table(outcomes: list[dict], columns: list[tuple]) -> list[str]:
    rows = [o for o in outcomes if any(o.get("figures", {}).get(c[0]) for c in columns)]
    if not rows:
        return []
    lines = ["| peer | " + " | ".join(c[1] for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for o in rows:
        lines.append(f"| {o['label']} | " + " | ".join(_cell(o, c[0], c[2]) for c in columns) + " |")
    return lines


@dataclass
class Target:
    """One target of the project, checked against the medians of this run.

    ``also`` names a second reference reported beside the judged one (its ratio is shown, not
    judged); ``bound`` says what the figure is made of and what would move it."""

    text: str
    ours: str
    metric: str
    peer: Optional[str]
    peer_metric: Optional[str]
    check: Callable[[float, Optional[float]], bool]
    describe: Callable[[float, Optional[float]], str]
    also: Optional[str] = None
    bound: str = ""


def _ratio(a: float, b: Optional[float]) -> str:
    return f"{a / b:.2f}×" if b else "n/a"


def _plus(a: float, b: Optional[float]) -> str:
    return f"{a - b:+.2f} ms over the floor's POST" if b is not None else "n/a"


_FORK_BOUND = ("a fresh task process costs one fork of the fork server plus the task process's own start and "
               "exit; compare the fork server and task-process columns of \"Where the time goes\" with the "
               "floor's task processes; the serving column is the controller's bookkeeping (store writes)")
_HTTP_BOUND = ("both rows pay Flask, the server and the client per request (the floor's own CPU per task); "
               "what ours costs beyond it is the serving column's excess (controller and store), the fork server "
               "and the task process: cutting store writes per task or serving CPU moves it")
TARGETS = [
    Target("Python API, fresh process per task: burst ≥ 0.8 × fork-per-task (judged against the Flask-sized "
           "parent; the bare parent's ratio beside)", "mpc-api-fresh", "burst_tasks_per_s", "mp-fork-fair",
           "burst_tasks_per_s", lambda a, b: a >= 0.8 * b, _ratio, also="mp-fork", bound=_FORK_BOUND),
    Target("Python API, reused workers: burst ≥ 0.5 × ProcessPoolExecutor", "mpc-api-reused",
           "burst_tasks_per_s", "pool", "burst_tasks_per_s", lambda a, b: a >= 0.5 * b, _ratio,
           bound="the pool hands a pickled call over a pipe and stores nothing; ours writes each task's claim, "
                 "start and end to the store (write transactions per task) from the serving process"),
    Target("HTTP gunicorn, reused workers: burst ≥ 0.9 × HTTP floor (gunicorn, no-op handler, POST + GET)",
           "mpc-gunicorn-reused", "burst_tasks_per_s", "http-floor-gunicorn", "burst_tasks_per_s",
           lambda a, b: a >= 0.9 * b, _ratio, bound=_HTTP_BOUND),
    Target("HTTP dev server, reused workers: burst ≥ 0.9 × HTTP floor (dev server, no-op handler, POST + GET)",
           "mpc-dev-reused", "burst_tasks_per_s", "http-floor-dev", "burst_tasks_per_s",
           lambda a, b: a >= 0.9 * b, _ratio, bound=_HTTP_BOUND),
    Target("HTTP gunicorn, reused workers: dispatch p50 ≤ HTTP floor's POST p50 + 0.5 ms", "mpc-gunicorn-reused",
           "dispatch_p50_ms", "http-floor-gunicorn", "post_p50_ms", lambda a, b: a <= b + 0.5, _plus,
           bound="the POST's own round trip is the floor; beyond it: the store write of the new task, the wake-up "
                 "of the controlling thread and the hand-over to an idle reused worker"),
    Target("HTTP dev server, reused workers: dispatch p50 ≤ HTTP floor's POST p50 + 0.5 ms", "mpc-dev-reused",
           "dispatch_p50_ms", "http-floor-dev", "post_p50_ms", lambda a, b: a <= b + 0.5, _plus,
           bound="as for gunicorn, on the dev server's thread per request"),
    Target("Batch path (gunicorn, reused workers; one bulk POST + a wait on the batch): burst ≥ 2 × Celery+Redis",
           "mpc-gunicorn-batch", "burst_tasks_per_s", "celery", "burst_tasks_per_s", lambda a, b: a >= 2 * b,
           _ratio, bound="two requests for the whole burst, so the engine sets the pace: the serving, fork server "
                         "and task-process columns per task, and the store writes per task"),
    Target("HTTP gunicorn, reused workers: sequential POST + `?wait=` p50 ≤ Celery's `delay().get()`",
           "mpc-gunicorn-reused", "sequential_p50_ms", "celery", "sequential_p50_ms", lambda a, b: a <= b, _ratio,
           bound="two HTTP round trips per task against Celery's Redis round trips; the one-request row "
                 "(POST ?wait=) shows what one round trip gives"),
    Target("HTTP dev server, fresh process per task: burst ≥ 0.7 × fork-per-task (Flask-sized parent; bare beside)",
           "mpc-dev-fresh", "burst_tasks_per_s", "mp-fork-fair", "burst_tasks_per_s", lambda a, b: a >= 0.7 * b,
           _ratio, also="mp-fork", bound="the HTTP floor's cost per request plus a fresh process per task: " + _FORK_BOUND),
    Target("HTTP gunicorn, fresh process per task: burst ≥ 0.7 × fork-per-task (Flask-sized parent; bare beside)",
           "mpc-gunicorn-fresh", "burst_tasks_per_s", "mp-fork-fair", "burst_tasks_per_s",
           lambda a, b: a >= 0.7 * b, _ratio, also="mp-fork",
           bound="the HTTP floor's cost per request plus a fresh process per task: " + _FORK_BOUND),
    Target("HTTP dev server, fresh process per task: burst ≥ 5 × upstream 0.1.1 (also on the dev server)",
           "mpc-dev-fresh", "burst_tasks_per_s", "upstream", "burst_tasks_per_s", lambda a, b: a >= 5 * b, _ratio,
           bound="both pay the dev server per request; upstream forks from the serving process and polls; when "
                 "upstream's burst stalls (its controlling threads die on a race under load, see "
                 "bench/peers/upstream_peer.py) there is no rate of its to compare"),
    Target("HTTP gunicorn: stop p50 ≤ 10 ms from DELETE to `stopped`, task checkpointing every 10 ms",
           "mpc-gunicorn-reused", "stop_checkpoint_p50_ms", None, None, lambda a, b: a <= 10,
           lambda a, b: f"{a:.1f} ms", bound="half a checkpoint period (5 ms) on average, plus the DELETE's round "
                                             "trip and the store write of the end"),
    Target("HTTP dev server: stop p50 ≤ 10 ms from DELETE to `stopped`, task checkpointing every 10 ms",
           "mpc-dev-reused", "stop_checkpoint_p50_ms", None, None, lambda a, b: a <= 10, lambda a, b: f"{a:.1f} ms",
           bound="as for gunicorn"),
    Target("HTTP gunicorn: stop of a task that ignores it (`stop_grace=0`) ≤ Celery's terminate",
           "mpc-gunicorn-reused", "stop_ignoring_p50_ms", "celery", "stop_ignoring_p50_ms", lambda a, b: a <= b,
           _ratio, bound="Celery reports REVOKED once it sent the signal; ours once the process was reaped and its "
                         "end stored"),
    Target("Memory: dev server + two idle reused children ≤ 0.5 × Celery worker PSS (idle); the HTTP floor's "
           "(a bare Flask + flask-restful app) beside", "mpc-dev-reused", "pss_idle_mib", "celery", "pss_idle_mib",
           lambda a, b: a <= 0.5 * b, _ratio, also="http-floor-dev",
           bound="a bare Flask + flask-restful dev server is the floor of the serving process; the split by role "
                 "is in the memory table"),
    Target("GET at 100k stored tasks within 1.2 × of 1k (gunicorn -w 2)", "mpc-gunicorn-reused",
           "get_large_vs_small", None, None, lambda a, b: a <= 1.2, lambda a, b: f"{a:.2f}×",
           bound="one indexed lookup per GET"),
    Target("POST at 100k stored tasks within 1.2 × of 1k (gunicorn -w 2)", "mpc-gunicorn-reused",
           "post_large_vs_small", None, None, lambda a, b: a <= 1.2, lambda a, b: f"{a:.2f}×",
           bound="the insert and the queue bound's count, both indexed"),
    Target("`upload_status` 100k times in a tight loop slows the task < 10 % (fresh process)", "mpc-api-fresh",
           "progress_slowdown_pct", None, None, lambda a, b: a < 10, lambda a, b: f"{a:.1f} %",
           bound="an attribute store per call; the value is sent at most every 50 ms"),
    Target("`upload_status` 100k times in a tight loop slows the task < 10 % (reused worker)", "mpc-api-reused",
           "progress_slowdown_pct", None, None, lambda a, b: a < 10, lambda a, b: f"{a:.1f} %",
           bound="as for a fresh process"),
]

#: Rows reported beside the floor they are measured against (ours, the floor, what is compared).
FLOOR_PAIRS = [
    ("mpc-gunicorn-reused", "http-floor-gunicorn"),
    ("mpc-gunicorn-reused-wait", "http-floor-gunicorn-wait"),
    ("mpc-gunicorn-fresh", "http-floor-gunicorn"),
    ("mpc-gunicorn-batch", "http-floor-gunicorn"),
    ("mpc-dev-reused", "http-floor-dev"),
    ("mpc-dev-reused-wait", "http-floor-dev-wait"),
    ("mpc-dev-fresh", "http-floor-dev"),
    ("mpc-dev-batch", "http-floor-dev"),
    ("mpc-api-fresh", "mp-fork-fair"),
    ("mpc-api-fresh", "mp-fork"),
]


def _cpu_total(outcome: dict, metric: str) -> Optional[float]:
    workload = metric.split("_")[0]
    return median(outcome, f"cpu_{workload}_total_ms") if workload in CPU_WORKLOADS else None


def _why(target: Target, outcomes: dict[str, dict], cores: int) -> str:
    """The target's bound, with this run's CPU per task of both sides where it was measured."""
    parts = [target.bound] if target.bound else []
    ours = outcomes.get(target.ours, {})
    workload = target.metric.split("_")[0]
    mine = _cpu_total(ours, target.metric)
    if mine:
        roles = ", ".join(f"{title} {median(ours, f'cpu_{workload}_{role}_ms'):.2f}" for role, title in CPU_ROLES[:-1]
                          if median(ours, f"cpu_{workload}_{role}_ms"))
        text = f"ours: {mine:.2f} CPU ms/task ({roles})"
        if workload == "burst" and cores:
            ceiling = cores * 1000 / mine
            text += f", a CPU-bound ceiling of {ceiling:,.0f} tasks/s on {cores} cores"
            rate = median(ours, "burst_tasks_per_s")
            if rate:
                text += (f" (the run reached {100 * rate / ceiling:.0f} % of it: " +
                         ("CPU bounds it" if rate >= 0.7 * ceiling else
                          "waits bound it, hand-overs and wake-ups between processes, more than CPU") + ")")
        theirs = _cpu_total(outcomes.get(target.peer or "", {}), target.peer_metric or "")
        if theirs:
            text += f"; the reference: {theirs:.2f} CPU ms/task"
        writes = median(ours, f"writes_{workload}_per_task")
        if writes is not None:
            text += f"; {writes:.1f} store write transactions/task"
        parts.append(text)
    return "; ".join(parts)


def _unmeasured(target: Target, outcomes: dict[str, dict]) -> str:
    """Why a target has no figure: the peer that was not run, or whose runs of the workload all failed."""
    for key, metric in ((target.ours, target.metric), (target.peer, target.peer_metric)):
        outcome = outcomes.get(key or "", {})
        if key is None or metric is None or median(outcome, metric) is not None:
            continue
        if outcome.get("unavailable"):
            return f"{outcome['label']} was not run: {outcome['unavailable']}"
        failed = [(name, error) for name, error in outcome.get("errors", {}).items() if metric.startswith(name)]
        if failed:
            name, error = failed[0]
            return f"every {name} run of {outcome['label']} failed; first error: {error}"
    return "n/a"


def evaluate(outcomes: dict[str, dict], cores: int = 0) -> list[tuple[str, str, str, str]]:
    """(target, this run's figure, "met" / "missed" / "not measured", what bounds it) for every target."""
    rows = []
    for target in TARGETS:
        ours = median(outcomes.get(target.ours, {}), target.metric)
        theirs = median(outcomes.get(target.peer, {}), target.peer_metric) if target.peer else None
        if ours is None or (target.peer and theirs is None):
            rows.append((target.text, _unmeasured(target, outcomes), "not measured", target.bound))
            continue
        detail = target.describe(ours, theirs)
        if target.peer:
            detail += f" ({ours:,.2f} vs {theirs:,.2f})"
        if target.also:
            other = median(outcomes.get(target.also, {}), target.peer_metric)
            if other:
                detail += f"; vs {outcomes[target.also]['label']}: {_ratio(ours, other)} ({other:,.2f})"
        rows.append((target.text, detail, "met" if target.check(ours, theirs) else "missed",
                     _why(target, outcomes, cores)))
    return rows


def _where_time_goes(outcomes: dict[str, dict]) -> list[str]:
    rows = []
    for o in outcomes.values():
        for workload in CPU_WORKLOADS:
            if median(o, f"cpu_{workload}_total_ms") is None:
                continue
            cells = [_cell(o, f"cpu_{workload}_{role}_ms", "{:.2f}") for role, _ in CPU_ROLES]
            cells.append(_cell(o, f"writes_{workload}_per_task", "{:.1f}"))
            rows.append(f"| {o['label']} | {workload} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["| peer | workload | " + " | ".join(f"{t} ms" for _, t in CPU_ROLES) + " | store write tx |",
            "|---|---|" + "---|" * (len(CPU_ROLES) + 1), *rows]


def _against_floors(outcomes: dict[str, dict]) -> list[str]:
    lines = []
    for ours, floor in FLOOR_PAIRS:
        a, b = outcomes.get(ours), outcomes.get(floor)
        if not a or not b or not a.get("figures") or not b.get("figures"):
            continue
        cells = []
        for metric in ("burst_tasks_per_s", "sequential_p50_ms", "dispatch_p50_ms", "cpu_burst_total_ms"):
            x, y = median(a, metric), median(b, metric)
            cells.append(f"{x / y:.2f}×" if x is not None and y else "n/a")
        x, y = median(a, "dispatch_p50_ms"), median(b, "post_p50_ms")
        cells.append(f"{x - y:+.2f} ms" if x is not None and y is not None else "n/a")
        lines.append(f"| {a['label']} | {b['label']} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return ["| this project | its floor | burst | sequential p50 | dispatch p50 | CPU/task (burst) | "
            "dispatch p50 − floor's POST p50 |", "|---|---|---|---|---|---|---|", *lines]


def _ratios(outcomes: dict[str, dict]) -> list[str]:
    ours = [k for k in outcomes if k.startswith(OURS_PREFIX) and outcomes[k].get("figures")]
    # The HTTP floors have a table of their own ("Against the floors").
    peers = [k for k in outcomes if not k.startswith((OURS_PREFIX, FLOOR_PREFIX)) and outcomes[k].get("figures")]
    if not ours or not peers:
        return []
    lines = ["Each cell: this project's median over the peer's (burst: higher is better; dispatch and sequential "
             "latency: lower is better).", "",
             "| this project | " + " | ".join(f"{outcomes[p]['label']}" for p in peers) + " |",
             "|---|" + "---|" * len(peers)]
    for key in ours:
        cells = []
        for peer in peers:
            parts = []
            for metric, short in (("burst_tasks_per_s", "burst"), ("dispatch_p50_ms", "dispatch"),
                                  ("sequential_p50_ms", "seq")):
                a, b = median(outcomes[key], metric), median(outcomes[peer], metric)
                if a is not None and b:
                    parts.append(f"{short} {a / b:.2f}×")
            cells.append(", ".join(parts) or "n/a")
        lines.append(f"| {outcomes[key]['label']} | " + " | ".join(cells) + " |")
    return lines


def long_tasks(out: Path) -> Optional[dict]:
    """The long-task workload's figures (``bench/long_tasks.py``) in the results folder ``out``, if it ran."""
    path = out / "long_tasks.json"
    if not path.exists():
        return None
    import json
    return json.loads(path.read_text())


def markdown(run: dict, long_tasks: Optional[dict] = None) -> str:
    """The report of one run; the long-task workload's table first when its figures are given (it is the
    workload this project is for)."""
    from bench.long_tasks import table as long_tasks_table
    outcomes = {o["peer"]: o for o in run["outcomes"]}
    listed = list(outcomes.values())
    m = run["machine"]
    lines = [
        "# Benchmark results", "",
        f"Measured {run['date']} with `{run['command']}` ({run['mode']} mode: {run['repeats']} run(s) of each "
        f"workload after a warm-up run; memory and stored-task figures are single runs). "
        f"Every figure is the median, with the lowest and highest run in brackets.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, Linux {m['kernel']}, Python {m['python']}.", "",
        *([*long_tasks_table(long_tasks), "", "## Short tasks", ""] if long_tasks else []),
        "Every peer runs the same trivial task (`return x + y`) with a concurrency of 2. "
        "Workloads: burst = {burst_tasks} tasks submitted by {burst_threads} client threads, each then fetching "
        "its results; sequential = submit one task and wait for its result, {sequential} times; dispatch = submit → "
        "the task's first line; stop = stop request → reported stopped, for a task that checks for a stop every "
        "10 ms and one that never checks.".format(**run["sizes"]), "",
        "## Throughput and latency", "",
        *_table(listed, COLUMNS), "",
        "## Ratios to each peer", "",
        *_ratios(outcomes), "",
        "## Against the floors", "",
        "The HTTP floor rows run the same server stack and client as this project's HTTP rows, with a handler "
        "that does no work (`bench/peers/http_floor_app.py`: Flask + flask-restful, a dict as the queue) and the "
        "same requests per task (POST then GET `?wait=`, or one POST `?wait=`). The fork floors fork a "
        "`multiprocessing.Process` per task from a bare parent (standard library only) and from a parent with the "
        "example app's imports (Flask, flask-restful, psutil, this package). Ratios of medians; latency and CPU: "
        "lower is better.", "",
        *_against_floors(outcomes), "",
        "## Where the time goes", "",
        "CPU milliseconds per task by process role, over each measured run of the workload (median and spread): "
        "serving = the dev server, gunicorn's master and workers, Celery's or RQ's worker main process, or for "
        "peers served inside the benchmark's process (the floors, the Python API) that process less its client "
        "threads; fork server = this project's fork servers; task processes = the processes that ran tasks, "
        "alive or reaped; client = the benchmark's client threads (`time.thread_time()`); Redis = "
        "`redis-server`; PostgreSQL = the private cluster's server processes (the rows on that store). "
        "Read with psutil (user + system, 10 ms clock ticks summed over a run). Store write tx = "
        "this project's SQLite write transactions per task, counted in one extra run of the workload (after "
        "the measured ones, on a server started again with a trace callback on the store's connections in every "
        "process: one byte appended to a file per committed write transaction; read-only transactions not "
        "counted); the measured runs go without the callback. The rows on Redis and PostgreSQL count on the "
        "server, in every run: Redis's atomic writes (scripts and `MULTI`/`EXEC`, `INFO commandstats`) and "
        "PostgreSQL's transaction ids assigned (only a transaction that writes is given one).", "",
        *_where_time_goes(outcomes), "",
        "## Memory (PSS of the peer's own processes, Redis excluded)", "",
        f"Idle after a warm-up; with {run['sizes']['memory_queued']:,} tasks queued behind two running ones; after "
        "they all ran.", "",
        *_table(listed, MEMORY_COLUMNS), "",
        "## Progress reports in a tight loop", "",
        f"{run['sizes']['progress_iterations']:,} steps of a few microseconds of work, with and without a progress "
        "call after each step.", "",
        *_table(listed, PROGRESS_COLUMNS), "",
        "## Reads and writes with many stored tasks (gunicorn -w 2)", "",
        f"One task by uuid (GET) and new tasks (POST), 8 client threads, with {run['sizes']['stored_small']:,} "
        f"and then {run['sizes']['stored_large']:,} tasks in the store.", "",
        *_table(listed, STORED_COLUMNS), "",
        "## Targets", "",
        "| target | this run | | what bounds it, what would move it |", "|---|---|---|---|",
        *[f"| {t} | {d} | {v} | {w} |" for t, d, v, w in evaluate(outcomes, int(m.get("cores") or 0))], "",
        "## Versions", "",
    ]
    for o in listed:
        versions = ", ".join(f"{k} {v}" for k, v in o.get("versions", {}).items()) or "—"
        lines.append(f"- {o['label']}: {versions}")
    problems = [(o, name, error) for o in listed for name, error in o.get("errors", {}).items()]
    unavailable = [o for o in listed if o.get("unavailable")]
    if problems or unavailable:
        lines += ["", "## Problems seen in this run", ""]
        lines += [f"- {o['label']}: not run: {o['unavailable']}" for o in unavailable]
        for o, name, error in problems:
            failed = o.get("failures", {}).get(name)
            runs = 1 if name in ("memory", "stored") else run["repeats"] + 1
            count = f" (failed {failed} of {runs} runs, warm-up included)" if failed else ""
            lines.append(f"- {o['label']}, {name}{count}; first error: {error}")
    return "\n".join(lines) + "\n"


def chart(run: dict, path: Path) -> bool:
    """Burst throughput and dispatch latency of every peer, side by side; False (and no chart) when
    matplotlib is not installed (it comes with the ``bench`` extra and in ``bench/.venv``)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outcomes = [o for o in run["outcomes"] if o.get("figures")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(outcomes) + 2), sharey=True)
    # One row per peer in both panels, top to bottom in report order; a peer without the figure
    # keeps its row, empty, so the two panels line up.
    labels = [o["label"] for o in outcomes]
    rows = list(range(len(outcomes)))[::-1]
    for ax, metric, title in ((axes[0], "burst_tasks_per_s", "Burst throughput, tasks/s (log scale)"),
                              (axes[1], "dispatch_p50_ms", "Dispatch latency p50, ms (log scale)")):
        for y, o in zip(rows, outcomes):
            value = median(o, metric)
            if value is None or value <= 0 or math.isnan(value):
                continue
            ax.barh(y, value, color="#1f77b4" if o["peer"].startswith(OURS_PREFIX) else "#999999")
            ax.text(value, y, f" {value:,.3g}", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_title(title)
    axes[0].set_yticks(rows)
    axes[0].set_yticklabels(labels)
    fig.suptitle(f"flask-multiprocess-controller vs peers ({run['date']}, {run['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
