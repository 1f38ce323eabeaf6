"""Run the workloads against one peer in this process and print the figures as JSON.

``python -m bench.peer_main <peer key> --sizes quick --repeats 3 [--workloads a,b] [--out f.json]``

Each peer runs in a process of its own (the driver, :mod:`bench.run`, starts one per peer), so
one peer's threads, children and imports never disturb another's figures. Every workload runs
once as a warm-up, then ``repeats`` times; every value is kept.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

from . import workloads
from .peers import PeerUnavailable, load

SIZES = {"full": workloads.FULL, "quick": workloads.QUICK, "tiny": workloads.TINY}


def _failed(outcome: dict, peer, name: str, which: str, exc: Exception) -> None:
    """Count a failed run of a workload, keep its first error, and let the peer recover."""
    traceback.print_exc(file=sys.stderr)
    failures = outcome.setdefault("failures", {})
    failures[name] = failures.get(name, 0) + 1
    outcome["errors"].setdefault(name, f"{which}: {type(exc).__name__}: {exc}")
    peer.recover()


def _count_writes(peer, outcome: dict, sizes: workloads.Sizes, only: Optional[set]) -> None:
    """One more run of each accounted workload with the store's write transactions counted, for
    peers that can count them; only the write counts are kept from it (counting costs a little, so
    the measured runs go without)."""
    enable = getattr(peer, "enable_write_count", None)
    if enable is None:
        return
    names = [n for n in workloads.ACCOUNTED if n in peer.supports and not (only and n not in only)]
    if not names:
        return
    began = time.monotonic()
    try:
        enable()
        for name in names:
            peer.prepare(name)
            workloads.WORKLOADS[name](peer, workloads.warmup(sizes))
            for metric, value in workloads.accounted(name, peer, sizes).items():
                if metric.startswith("writes_"):
                    outcome["figures"].setdefault(metric, []).append(value)
    except Exception as exc:
        _failed(outcome, peer, "store writes", "run", exc)
    print(f"[{peer.key}] store writes: {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)


def measure(key: str, sizes: workloads.Sizes, repeats: int, only: Optional[set] = None) -> dict:
    """Start the peer, run its workloads, close it; return versions, runs and errors."""
    outcome: dict = {"peer": key, "figures": {}, "errors": {}, "versions": {}}
    with tempfile.TemporaryDirectory(prefix=f"bench-{key}-") as tmp:
        peer = load(key)(Path(tmp))
        outcome["label"] = peer.label
        try:
            peer.start()
            outcome["versions"] = peer.versions()
            for name, workload in workloads.WORKLOADS.items():
                if name not in peer.supports or (only and name not in only):
                    continue
                runs = 1 if name in workloads.RUN_ONCE else repeats
                began = time.monotonic()
                try:
                    peer.prepare(name)
                    if name not in workloads.RUN_ONCE:
                        workload(peer, workloads.warmup(sizes))  # warm-up, not kept
                except PeerUnavailable:
                    raise
                except Exception as exc:
                    _failed(outcome, peer, name, "warm-up", exc)
                for _ in range(runs):
                    try:
                        for metric, value in workloads.accounted(name, peer, sizes).items():
                            outcome["figures"].setdefault(metric, []).append(value)
                    except PeerUnavailable:
                        raise
                    except Exception as exc:  # a stalled run must not hide the others
                        _failed(outcome, peer, name, "run", exc)
                print(f"[{key}] {name}: {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
            _count_writes(peer, outcome, sizes, only)
        except PeerUnavailable as exc:
            outcome["unavailable"] = str(exc)
        finally:
            peer.close()
    return outcome


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer")
    parser.add_argument("--sizes", choices=SIZES, default="full")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workloads", default="", help="comma-separated subset (default: all the peer supports)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    only = set(filter(None, args.workloads.split(","))) or None
    outcome = measure(args.peer, SIZES[args.sizes], args.repeats, only)
    text = json.dumps(outcome, indent=1)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
