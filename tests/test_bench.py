"""The benchmark harness runs end to end on a tiny workload and writes its report; so do the
cross-host benchmark, ``bench/cross_host.py``, and the long-task workload, ``bench/long_tasks.py``.

Only the floors and this project's own rows are run here, so the test install needs none of the
peers' packages (Celery, RQ, matplotlib and restful-functions come with the ``bench`` extra, the upstream
release needs Flask 1.1 in a venv of its own); figures are not judged, only that every workload
produced them and the report shows them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
PEERS = ["mp-fork", "mp-fork-fair", "pool", "http-floor-gunicorn", "http-floor-dev-wait", "mpc-api-fresh",
         "mpc-api-reused", "mpc-dev-reused", "mpc-gunicorn-reused", "mpc-dev-reused-wait", "mpc-dev-batch"]
#: Rows that run only the burst (one request per task, or the batch path) and the sequential workload.
BURST_ONLY = {"mpc-dev-batch"}
SEQUENTIAL_NO_DISPATCH = {"http-floor-dev-wait", "mpc-dev-reused-wait"}


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_the_benchmark_runs_every_workload_on_a_tiny_load_and_writes_its_report(tmp_path):
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "--tiny", "--no-setup", "--peers", ",".join(PEERS), "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=130,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    run = json.loads((tmp_path / "latest.json").read_text())
    by_peer = {o["peer"]: o for o in run["outcomes"]}
    assert list(by_peer) == PEERS
    batch = by_peer["mpc-dev-batch"]
    if batch.get("unavailable"):  # a server without the batch API: the row says so, the others run
        assert "no batch API" in batch["unavailable"], batch
        del by_peer["mpc-dev-batch"]
    for key, outcome in by_peer.items():
        assert not outcome.get("unavailable"), (key, outcome["unavailable"])
        assert not outcome.get("errors"), (key, outcome["errors"])
        figures = outcome["figures"]
        assert figures["burst_tasks_per_s"][0] > 0, key
        assert figures["cpu_burst_total_ms"][0] >= 0, key
        assert "cpu_burst_client_ms" in figures and "cpu_burst_serving_ms" in figures, key
        if key.startswith("mpc-"):
            assert figures["writes_burst_per_task"][0] > 0, key
            assert "cpu_burst_forkserver_ms" in figures and "cpu_burst_tasks_ms" in figures, key
        if key not in BURST_ONLY:
            assert figures["sequential_p50_ms"][0] > 0, key
        if key not in BURST_ONLY | SEQUENTIAL_NO_DISPATCH:
            assert figures["dispatch_p50_ms"][0] > 0, key
    for key in ("http-floor-gunicorn", "mpc-gunicorn-reused"):
        assert by_peer[key]["figures"]["post_p50_ms"][0] > 0, key
    ours = by_peer["mpc-gunicorn-reused"]["figures"]
    for metric in ("stop_checkpoint_p50_ms", "stop_ignoring_p50_ms", "pss_idle_mib", "pss_idle_serving_mib",
                   "pss_idle_forkserver_mib", "get_large_vs_small"):
        assert ours[metric][0] > 0, metric
    assert by_peer["http-floor-gunicorn"]["figures"]["pss_idle_mib"][0] > 0
    assert by_peer["mpc-api-reused"]["figures"]["progress_call_ns"], "the progress workload gave no figure"
    report = (tmp_path / "latest.md").read_text()
    for section in ("## Throughput and latency", "## Ratios to each peer", "## Against the floors",
                    "## Where the time goes", "## Targets", "## Versions"):
        assert section in report
    for outcome in run["outcomes"]:
        assert outcome["label"] in report
    assert "| met |" in report or "| missed |" in report
    assert "HTTP floor's POST p50 + 0.5 ms" in report and "≥ 2 × Celery" in report
    try:
        import matplotlib  # noqa: F401  (the bench extra's; the chart is skipped without it)
    except ImportError:
        return
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


CROSS_HOST_FIGURES = {"wait_on_other_host_ms", "stop_from_other_host_ms", "idle_waiters_dev_server_pct",
                      "idle_waiters_gunicorn_pct", "idle_streams_dev_server_pct", "wait_on_other_host_pg_ms",
                      "stop_from_other_host_pg_ms"}


def _processes_with(marker: str) -> list[str]:
    """Processes whose environment holds ``marker`` (everything the benchmark started inherits it)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.environ().get("MPC_BENCH_SMOKE") == marker:
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:120]}")
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_the_cross_host_benchmark_gives_every_figure_and_leaves_nothing(tmp_path):
    marker = uuid.uuid4().hex
    out = tmp_path / "cross_host.json"
    completed = subprocess.run(
        [sys.executable, "bench/cross_host.py", "--tasks", "3", "--waiters", "10", "--window", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=75, env={**os.environ, "MPC_BENCH_SMOKE": marker},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert _processes_with(marker) == [], "the benchmark left processes behind"
    run = json.loads(out.read_text())
    figures = run["figures"]
    assert set(figures) == CROSS_HOST_FIGURES
    for key in ("wait_on_other_host_ms", "stop_from_other_host_ms", "wait_on_other_host_pg_ms",
                "stop_from_other_host_pg_ms"):
        figure = figures[key]
        assert figure["samples"] == 3, (key, figure)
        assert 0 < figure["min"] <= figure["median"] <= figure["p90"] <= figure["max"], (key, figure)
        assert figure["met"] is (figure["median"] <= float(figure["target"].split()[2])), (key, figure)
    for key in ("idle_waiters_dev_server_pct", "idle_waiters_gunicorn_pct"):
        figure = figures[key]
        assert (figure["waiters"], figure["held_at_end"], figure["unanswered_after_stop"]) == (10, 10, 0), figure
        assert figure["value"] == pytest.approx(figure["with_waiters_pct"] - figure["idle_pct"], abs=0.02), figure
        assert figure["met"] is (figure["value"] < 5), (key, figure)
    streams = figures["idle_streams_dev_server_pct"]
    assert streams["clients"] == 10, streams
    assert streams["value"] == pytest.approx(streams["with_waiters_pct"] - streams["idle_pct"], abs=0.02), streams
    assert streams["met"] is (streams["value"] < 5), streams
    assert run["settings"]["tasks"] == 3 and run["settings"]["window_s"] == 1
    table = completed.stdout
    assert "GET ?wait= held on host B" in table and "DELETE sent to host B" in table
    assert "10 idle ?wait= on the dev server" in table and "10 idle ?wait= on gunicorn" in table
    assert "10 idle /mpc/events streams on the dev server" in table
    assert "PostgreSQL: GET ?wait= held on host B" in table and "PostgreSQL: DELETE sent to host B" in table
    assert table.count(" met") + table.count(" MISSED") == 7, table


LONG_TASK_FIGURES = {"cpu_all_web_tier_pct", "cpu_quiet_web_tier_pct", "cpu_reading_web_tier_pct",
                     "cpu_quiet_serving_pct", "cpu_quiet_fork_server_pct", "cpu_all_tasks_pct",
                     "progress_age_p50_ms", "progress_age_p99_ms", "rss_serving_mib", "rss_fork_server_mib"}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_the_long_task_benchmark_measures_the_web_tier_and_opens_the_report(tmp_path):
    marker = uuid.uuid4().hex
    (tmp_path / "latest.json").write_text((REPO / "bench" / "results" / "latest.json").read_text())
    completed = subprocess.run(
        [sys.executable, "bench/long_tasks.py", "--no-setup", "--rows", "sqlite", "--tasks", "3", "--seconds", "1.5",
         "--slots", "2", "--workers", "1", "--phase", "0.25", "--poll-rate", "20", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=75, env={**os.environ, "MPC_BENCH_SMOKE": marker},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert _processes_with(marker) == [], "the benchmark left processes behind"
    run = json.loads((tmp_path / "long_tasks.json").read_text())
    (row,) = run["rows"]
    assert not row.get("error"), row
    figures = row["figures"]
    assert LONG_TASK_FIGURES <= set(figures), sorted(figures)
    assert figures["ended_ok"] == 3 and figures["progress_samples"] > 0, figures
    assert 0 < figures["progress_age_p50_ms"] <= figures["progress_age_p99_ms"], figures
    assert figures["rss_serving_mib"] > 0 and figures["quiet_s"] > 0 and figures["reading_s"] > 0, figures
    # The long-task table comes first in the main report, written again from its latest.json.
    headings = [line for line in (tmp_path / "latest.md").read_text().splitlines() if line.startswith("## ")]
    assert headings[0] == "## Long tasks: what the web tier pays to babysit them", headings[:3]
    assert "| this project, SQLite store |" in (tmp_path / "long_tasks.md").read_text()


SCALE_OUT_FIGURES = {"tasks_per_s", "claim_p50_ms", "claim_p99_ms", "redis_cpu_ms_per_task", "redis_calls_per_task",
                     "redis_atomic_writes_per_task", "events_per_task", "idle_redis_cpu_ms_per_host_s",
                     "idle_redis_cpu_ms_per_heartbeat", "hosts_cpu_ms_per_task"}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_the_scale_out_benchmark_measures_each_host_count_projects_and_leaves_nothing(tmp_path):
    marker = uuid.uuid4().hex
    completed = subprocess.run(
        [sys.executable, "bench/scale_out.py", "--hosts", "1,2", "--tasks", "40", "--batch", "10",
         "--latency-tasks", "3", "--idle", "0.5", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=75, env={**os.environ, "MPC_BENCH_SMOKE": marker},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert _processes_with(marker) == [], "the benchmark left processes behind"
    run = json.loads((tmp_path / "scale_out.json").read_text())
    assert [row["hosts"] for row in run["measured"]] == [1, 2]
    for row in run["measured"]:
        assert SCALE_OUT_FIGURES <= set(row), row
        assert row["tasks_per_s"] > 0 and row["claim_samples"] == 3 and row["tasks"] == 40, row
        assert row["redis_atomic_writes_per_task"] > 0, row
    hosts = [row["hosts"] for row in run["projection"]["rows"]]
    assert hosts[:2] == [1, 2] and 256 in hosts
    report = (tmp_path / "scale_out.md").read_text()
    assert "# Scale-out on one Redis" in report and "## Projected ceiling of one Redis core" in report


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_the_postgres_claims_benchmark_drains_every_task_with_each_claim_lock_and_leaves_nothing(tmp_path):
    marker = uuid.uuid4().hex
    completed = subprocess.run(
        [sys.executable, "bench/pg_claims.py", "--processes", "2", "--tasks", "30", "--repeats", "1",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=75, env={**os.environ, "MPC_BENCH_SMOKE": marker},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert _processes_with(marker) == [], "the benchmark left processes behind"
    run = json.loads((tmp_path / "pg_claims.json").read_text())
    assert [(r["variant"], r["processes"]) for r in run["summary"]] == [
        ("advisory", 2), ("row-lock", 2), ("counter", 2)]
    for row in run["summary"]:
        assert row["tasks"] == 30 and row["tasks_per_s"] > 0, row
        assert 0 < row["finish_and_claim_p50_ms"] <= row["finish_and_claim_p99_ms"], row
        assert row["waits"]["samples"] > 0, row
    report = (tmp_path / "pg_claims.md").read_text()
    assert "# Claims on one PostgreSQL database" in report and "| 2 | counter |" in report


@pytest.mark.timeout(10)
def test_a_target_without_a_figure_says_which_peer_failed_or_was_not_run():
    sys.path.insert(0, str(REPO))
    try:
        from bench import report
    finally:
        sys.path.remove(str(REPO))
    ours = {"label": "ours", "figures": {"burst_tasks_per_s": [900.0]}, "errors": {}}
    stalled = {"label": "upstream", "figures": {"sequential_p50_ms": [6.8]},
               "errors": {"burst": "run: TimeoutError: not finished within 15 s"}}
    rows = {text: (figure, verdict) for text, figure, verdict, _ in
            report.evaluate({"mpc-dev-fresh": ours, "upstream": stalled})}
    figure, verdict = rows[next(t for t in rows if "5 × upstream" in t)]
    assert verdict == "not measured"
    assert figure == "every burst run of upstream failed; first error: run: TimeoutError: not finished within 15 s"

    absent = {"label": "upstream", "figures": {}, "errors": {}, "unavailable": "Flask 1.1 would not install"}
    rows = {text: figure for text, figure, _, _ in report.evaluate({"mpc-dev-fresh": ours, "upstream": absent})}
    assert rows[next(t for t in rows if "5 × upstream" in t)] == "upstream was not run: Flask 1.1 would not install"
