"""The benchmark harness runs end to end on a tiny workload and writes its report.

Only the peers that need no environment of their own are run here (the upstream release needs
Flask 1.1 in a venv of its own, restful-functions its own aiohttp server); figures are not judged,
only that every workload produced them and the report shows them.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PEERS = ["mp-fork", "pool", "celery", "rq", "mpc-api-fresh", "mpc-api-reused", "mpc-dev-reused",
         "mpc-gunicorn-reused"]


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_the_benchmark_runs_every_workload_on_a_tiny_load_and_writes_its_report(tmp_path):
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "--tiny", "--no-setup", "--peers", ",".join(PEERS), "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=450,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    run = json.loads((tmp_path / "latest.json").read_text())
    by_peer = {o["peer"]: o for o in run["outcomes"]}
    assert list(by_peer) == PEERS
    for key, outcome in by_peer.items():
        assert not outcome.get("unavailable"), (key, outcome["unavailable"])
        assert not outcome.get("errors"), (key, outcome["errors"])
        figures = outcome["figures"]
        assert figures["burst_tasks_per_s"][0] > 0, key
        assert figures["sequential_p50_ms"][0] > 0, key
        assert figures["dispatch_p50_ms"][0] > 0, key
    ours = by_peer["mpc-gunicorn-reused"]["figures"]
    for metric in ("stop_checkpoint_p50_ms", "stop_ignoring_p50_ms", "pss_idle_mib", "get_large_vs_small"):
        assert ours[metric][0] > 0, metric
    assert by_peer["mpc-api-reused"]["figures"]["progress_call_ns"], "the progress workload gave no figure"
    assert by_peer["celery"]["figures"]["stop_checkpoint_p50_ms"][0] > 0
    report = (tmp_path / "latest.md").read_text()
    for section in ("## Throughput and latency", "## Ratios to each peer", "## Targets", "## Versions"):
        assert section in report
    for outcome in by_peer.values():
        assert outcome["label"] in report
    assert "| met |" in report or "| missed |" in report
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
