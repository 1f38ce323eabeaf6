#!/usr/bin/env python
"""Run every peer through every workload and write ``bench/results/latest.md`` and ``latest.png``.

    python bench/run.py            # full run: 5 runs of each workload after a warm-up
    python bench/run.py --quick    # 3 runs, shorter latency series: a few minutes

It first makes its own environment (Debian's redis-server if missing, the venv ``bench/.venv`` with
Celery, RQ, restful-functions and this project; the upstream 0.1.1 release in ``bench/.venv-upstream``)
and then runs itself in that venv. Each peer runs in a process of its own, one after the other, so
peers never compete for the two cores.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import environment  # noqa: E402

RESULTS = environment.BENCH_DIR / "results"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark flask-multiprocess-controller against its peers.")
    parser.add_argument("--quick", action="store_true", help="2 runs per workload and shorter series")
    parser.add_argument("--tiny", action="store_true", help="a tiny workload, to check the harness works")
    parser.add_argument("--peers", default="", help="comma-separated peer keys (default: all)")
    parser.add_argument("--workloads", default="", help="comma-separated workloads (default: all)")
    parser.add_argument("--repeats", type=int, help="runs per workload after the warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for latest.md/.png/.json")
    parser.add_argument("--no-setup", action="store_true", help="use this interpreter as it is")
    parser.add_argument("--peer-timeout", type=float, help="seconds one peer may take in all")
    parser.add_argument("--report-only", action="store_true",
                        help="only write latest.md and latest.png again from latest.json")
    return parser.parse_args(argv)


def _reexec_in_venv(argv: list[str]) -> None:
    environment.ensure_redis_server()
    python = environment.ensure_venv()
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *argv, "--no-setup"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if not args.no_setup and not environment.in_venv():
        _reexec_in_venv(argv)
    from bench import report, workloads
    from bench.peers import PEERS

    if args.report_only:
        run = json.loads((args.out / "latest.json").read_text())
        (args.out / "latest.md").write_text(report.markdown(run, report.long_tasks(args.out)))
        report.chart(run, args.out / "latest.png")
        return 0
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    repeats = args.repeats or {"tiny": 1, "quick": 2, "full": 5}[mode]
    peer_timeout = args.peer_timeout or {"tiny": 240, "quick": 120, "full": 900}[mode]
    sizes = {"tiny": workloads.TINY, "quick": workloads.QUICK, "full": workloads.FULL}[mode]
    keys = [k for k in args.peers.split(",") if k] or list(PEERS)
    unknown = [k for k in keys if k not in PEERS]
    if unknown:
        sys.exit(f"unknown peers: {', '.join(unknown)} (known: {', '.join(PEERS)})")

    began = time.monotonic()
    outcomes = []
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        for key in keys:
            out = Path(tmp) / f"{key}.json"
            command = [sys.executable, "-m", "bench.peer_main", key, "--sizes", mode, "--repeats", str(repeats),
                       "--out", str(out)]
            if args.workloads:
                command += ["--workloads", args.workloads]
            print(f"== {key}", flush=True)
            peer_began = time.monotonic()
            log = logs / f"{key}.log"
            problem = f"the peer did not finish within {peer_timeout:.0f} s"
            try:
                with open(log, "w") as errors:  # tracebacks of failed runs go here, not to the console
                    done = subprocess.run(command, cwd=environment.REPO_DIR, timeout=peer_timeout, check=False,
                                          start_new_session=True, stderr=errors)
                if done.returncode:
                    problem = f"the peer's process exited with code {done.returncode} (see {log.name})"
            except subprocess.TimeoutExpired:
                pass
            for line in log.read_text().splitlines():
                if line.startswith(f"[{key}]"):
                    print("  ", line, flush=True)
            if out.exists():
                outcome = json.loads(out.read_text())
            else:
                outcome = {"peer": key, "label": key, "figures": {}, "versions": {},
                           "errors": {"all": problem}}
            outcome["seconds"] = round(time.monotonic() - peer_began, 1)
            outcomes.append(outcome)
            print(f"   {outcome['seconds']} s in all; log: {log}", flush=True)

    run = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "python bench/run.py" + (" --quick" if args.quick else "") + (" --tiny" if args.tiny else ""),
        "mode": mode, "repeats": repeats, "sizes": asdict(sizes), "machine": environment.machine(),
        "seconds": round(time.monotonic() - began, 1), "outcomes": outcomes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(run, indent=1))
    (args.out / "latest.md").write_text(report.markdown(run, report.long_tasks(args.out)))
    charted = report.chart(run, args.out / "latest.png")
    print(f"Wrote {args.out / 'latest.md'}" + (" and latest.png" if charted else " (no chart: matplotlib is missing)")
          + f" in {run['seconds']:.0f} s.")
    failed = [o["peer"] for o in outcomes if o.get("errors") or o.get("unavailable")]
    if failed:
        print(f"Problems with: {', '.join(failed)} (see the report).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
