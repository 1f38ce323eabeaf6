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
    ("stop_checkpoint_p50_ms", "stop (checkpoints) p50 ms", "{:.1f}", False),
    ("stop_ignoring_p50_ms", "stop (ignores) p50 ms", "{:.1f}", False),
]
MEMORY_COLUMNS = [
    ("pss_idle_mib", "PSS idle MiB", "{:.1f}", False),
    ("pss_queued_mib", "PSS, tasks queued MiB", "{:.1f}", False),
    ("pss_after_mib", "PSS after they ran MiB", "{:.1f}", False),
]
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
    """One target of the project, checked against the medians of this run."""

    text: str
    ours: str
    metric: str
    peer: Optional[str]
    peer_metric: Optional[str]
    check: Callable[[float, Optional[float]], bool]
    describe: Callable[[float, Optional[float]], str]


def _ratio(a: float, b: Optional[float]) -> str:
    return f"{a / b:.2f}×" if b else "n/a"


TARGETS = [
    Target("Python API, fresh process per task: burst ≥ 0.8 × raw fork-per-task", "mpc-api-fresh",
           "burst_tasks_per_s", "mp-fork", "burst_tasks_per_s", lambda a, b: a >= 0.8 * b, _ratio),
    Target("Python API, reused workers: burst ≥ 0.5 × ProcessPoolExecutor", "mpc-api-reused",
           "burst_tasks_per_s", "pool", "burst_tasks_per_s", lambda a, b: a >= 0.5 * b, _ratio),
    Target("HTTP gunicorn, reused workers: burst ≥ 2 × Celery+Redis", "mpc-gunicorn-reused",
           "burst_tasks_per_s", "celery", "burst_tasks_per_s", lambda a, b: a >= 2 * b, _ratio),
    Target("HTTP gunicorn, reused workers: dispatch p50 ≤ 0.5 × Celery's", "mpc-gunicorn-reused",
           "dispatch_p50_ms", "celery", "dispatch_p50_ms", lambda a, b: a <= 0.5 * b, _ratio),
    Target("HTTP gunicorn, reused workers: sequential POST + `?wait=` p50 ≤ Celery's `delay().get()`",
           "mpc-gunicorn-reused", "sequential_p50_ms", "celery", "sequential_p50_ms", lambda a, b: a <= b, _ratio),
    Target("HTTP dev server, fresh process per task: burst ≥ 0.7 × raw fork-per-task", "mpc-dev-fresh",
           "burst_tasks_per_s", "mp-fork", "burst_tasks_per_s", lambda a, b: a >= 0.7 * b, _ratio),
    Target("HTTP gunicorn, fresh process per task: burst ≥ 0.7 × raw fork-per-task", "mpc-gunicorn-fresh",
           "burst_tasks_per_s", "mp-fork", "burst_tasks_per_s", lambda a, b: a >= 0.7 * b, _ratio),
    Target("HTTP dev server, fresh process per task: burst ≥ 5 × upstream 0.1.1 (also on the dev server)",
           "mpc-dev-fresh", "burst_tasks_per_s", "upstream", "burst_tasks_per_s", lambda a, b: a >= 5 * b, _ratio),
    Target("HTTP gunicorn: stop p50 ≤ 10 ms from DELETE to `stopped`, task checkpointing every 10 ms",
           "mpc-gunicorn-reused", "stop_checkpoint_p50_ms", None, None, lambda a, b: a <= 10,
           lambda a, b: f"{a:.1f} ms"),
    Target("HTTP dev server: stop p50 ≤ 10 ms from DELETE to `stopped`, task checkpointing every 10 ms",
           "mpc-dev-reused", "stop_checkpoint_p50_ms", None, None, lambda a, b: a <= 10, lambda a, b: f"{a:.1f} ms"),
    Target("HTTP gunicorn: stop of a task that ignores it (`stop_grace=0`) ≤ Celery's terminate",
           "mpc-gunicorn-reused", "stop_ignoring_p50_ms", "celery", "stop_ignoring_p50_ms", lambda a, b: a <= b,
           _ratio),
    Target("Memory: dev server + two idle reused children ≤ 0.5 × Celery worker PSS (idle)", "mpc-dev-reused",
           "pss_idle_mib", "celery", "pss_idle_mib", lambda a, b: a <= 0.5 * b, _ratio),
    Target("GET at 100k stored tasks within 1.2 × of 1k (gunicorn -w 2)", "mpc-gunicorn-reused",
           "get_large_vs_small", None, None, lambda a, b: a <= 1.2, lambda a, b: f"{a:.2f}×"),
    Target("POST at 100k stored tasks within 1.2 × of 1k (gunicorn -w 2)", "mpc-gunicorn-reused",
           "post_large_vs_small", None, None, lambda a, b: a <= 1.2, lambda a, b: f"{a:.2f}×"),
    Target("`upload_status` 100k times in a tight loop slows the task < 10 % (fresh process)", "mpc-api-fresh",
           "progress_slowdown_pct", None, None, lambda a, b: a < 10, lambda a, b: f"{a:.1f} %"),
    Target("`upload_status` 100k times in a tight loop slows the task < 10 % (reused worker)", "mpc-api-reused",
           "progress_slowdown_pct", None, None, lambda a, b: a < 10, lambda a, b: f"{a:.1f} %"),
]


def evaluate(outcomes: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(target, this run's figure, "met" / "missed" / "not measured") for every target."""
    rows = []
    for target in TARGETS:
        ours = median(outcomes.get(target.ours, {}), target.metric)
        theirs = median(outcomes.get(target.peer, {}), target.peer_metric) if target.peer else None
        if ours is None or (target.peer and theirs is None):
            rows.append((target.text, "n/a", "not measured"))
            continue
        detail = target.describe(ours, theirs)
        if target.peer:
            detail += f" ({ours:,.2f} vs {theirs:,.2f})"
        rows.append((target.text, detail, "met" if target.check(ours, theirs) else "missed"))
    return rows


def _ratios(outcomes: dict[str, dict]) -> list[str]:
    ours = [k for k in outcomes if k.startswith(OURS_PREFIX) and outcomes[k].get("figures")]
    peers = [k for k in outcomes if not k.startswith(OURS_PREFIX) and outcomes[k].get("figures")]
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


def markdown(run: dict) -> str:
    """The report of one run."""
    outcomes = {o["peer"]: o for o in run["outcomes"]}
    listed = list(outcomes.values())
    m = run["machine"]
    lines = [
        "# Benchmark results", "",
        f"Measured {run['date']} with `{run['command']}` ({run['mode']} mode: {run['repeats']} run(s) of each "
        f"workload after a warm-up run; memory and stored-task figures are single runs). "
        f"Every figure is the median, with the lowest and highest run in brackets.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, Linux {m['kernel']}, Python {m['python']}.", "",
        "Every peer runs the same trivial task (`return x + y`) with a concurrency of 2. "
        "Workloads: burst = {burst_tasks} tasks submitted by {burst_threads} client threads, each then fetching "
        "its results; sequential = submit one task and wait for its result, {sequential} times; dispatch = submit → "
        "the task's first line; stop = stop request → reported stopped, for a task that checks for a stop every "
        "10 ms and one that never checks.".format(**run["sizes"]), "",
        "## Throughput and latency", "",
        *_table(listed, COLUMNS), "",
        "## Ratios to each peer", "",
        *_ratios(outcomes), "",
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
        "| target | this run | |", "|---|---|---|",
        *[f"| {t} | {d} | {v} |" for t, d, v in evaluate(outcomes)], "",
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


def chart(run: dict, path: Path) -> None:
    """Burst throughput and dispatch latency of every peer, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outcomes = [o for o in run["outcomes"] if o.get("figures")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(outcomes) + 2))
    for ax, metric, title in ((axes[0], "burst_tasks_per_s", "Burst throughput, tasks/s (log scale)"),
                              (axes[1], "dispatch_p50_ms", "Dispatch latency p50, ms (log scale)")):
        labels, values, colors = [], [], []
        for o in outcomes:
            value = median(o, metric)
            if value is None or value <= 0 or math.isnan(value):
                continue
            labels.append(o["label"])
            values.append(value)
            colors.append("#1f77b4" if o["peer"].startswith(OURS_PREFIX) else "#999999")
        ax.barh(labels[::-1], values[::-1], color=colors[::-1])
        ax.set_xscale("log")
        ax.set_title(title)
        for y, v in enumerate(values[::-1]):
            ax.text(v, y, f" {v:,.3g}", va="center", fontsize=8)
    axes[1].set_yticklabels([])
    fig.suptitle(f"flask-multiprocess-controller vs peers ({run['date']}, {run['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
