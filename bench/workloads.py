"""The workloads: each drives one :class:`~bench.peers.base.Peer` and returns its figures.

Every workload returns a flat ``{metric: value}`` dict for one run; :mod:`bench.runner` repeats
runs after a warm-up and keeps every value, so the report can show medians and spread.
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

from .peers import base
from .peers.base import Peer


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; ``--quick`` and ``--tiny`` shrink the counts, not the shape."""

    burst_tasks: int = 300
    burst_threads: int = 8
    sequential: int = 60
    dispatch: int = 60
    stops: int = 15
    memory_queued: int = 10_000
    progress_iterations: int = 100_000
    stored_small: int = 1_000
    stored_large: int = 100_000
    stored_requests: int = 2_000


FULL = Sizes()
QUICK = Sizes(sequential=20, dispatch=20, stops=5, memory_queued=1_000, progress_iterations=20_000,
              stored_requests=500)
TINY = Sizes(burst_tasks=24, burst_threads=4, sequential=5, dispatch=5, stops=2, memory_queued=40,
             progress_iterations=2_000, stored_small=100, stored_large=1_000, stored_requests=100)


def warmup(sizes: Sizes) -> Sizes:
    """The sizes of the warm-up run: the same shape, a fifth of the work."""
    return replace(sizes, burst_tasks=max(sizes.burst_threads * 3, sizes.burst_tasks // 5),
                   sequential=max(3, sizes.sequential // 5), dispatch=max(3, sizes.dispatch // 5),
                   stops=1, progress_iterations=max(1_000, sizes.progress_iterations // 10))


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _latencies(name: str, samples: list[float]) -> dict:
    ms = [s * 1000 for s in samples]
    return {f"{name}_p50_ms": percentile(ms, 50), f"{name}_p95_ms": percentile(ms, 95)}


#: Figures whose name starts with this are for :func:`accounted`, not kept.
PRIVATE = "_"


def burst(peer: Peer, sizes: Sizes) -> dict:
    """``burst_tasks`` add tasks submitted by ``burst_threads`` client threads; each thread then
    collects its own results. Throughput runs from the first submit to the last result.

    A peer with a batch path (``run_batch``) gets the whole burst in one call from one client
    thread instead: one bulk submit and one wait on the batch."""
    if hasattr(peer, "run_batch"):
        return _batch_burst(peer, sizes)
    per_thread = [list(range(i, sizes.burst_tasks, sizes.burst_threads)) for i in range(sizes.burst_threads)]
    gate = threading.Barrier(sizes.burst_threads + 1)

    def client(numbers: list[int]) -> tuple[int, float]:
        gate.wait()
        cpu = time.thread_time()
        handles = [(n, peer.submit_add(n, 1)) for n in numbers]
        wrong = 0
        for n, handle in handles:
            if peer.result(handle) != n + 1:
                wrong += 1
        return wrong, time.thread_time() - cpu

    with ThreadPoolExecutor(sizes.burst_threads) as pool:
        futures = [pool.submit(client, numbers) for numbers in per_thread]
        gate.wait()
        began = time.perf_counter()
        outcomes = [f.result() for f in futures]
        elapsed = time.perf_counter() - began
    wrong = sum(w for w, _ in outcomes)
    if wrong:
        raise AssertionError(f"{wrong} burst tasks returned a wrong result")
    return {"burst_tasks_per_s": sizes.burst_tasks / elapsed, "_client_cpu_s": sum(c for _, c in outcomes)}


def _batch_burst(peer: Peer, sizes: Sizes) -> dict:
    items = [{"op": "add", "x": n, "y": 1} for n in range(sizes.burst_tasks)]
    cpu = time.thread_time()
    began = time.perf_counter()
    values = peer.run_batch(items)
    elapsed = time.perf_counter() - began
    wrong = sum(1 for n, value in enumerate(values) if value != n + 1) + abs(len(values) - len(items))
    if wrong:
        raise AssertionError(f"{wrong} batch tasks returned a wrong result")
    return {"burst_tasks_per_s": sizes.burst_tasks / elapsed, "_client_cpu_s": time.thread_time() - cpu}


def sequential(peer: Peer, sizes: Sizes) -> dict:
    """One client submits an add task and waits for its result, ``sequential`` times."""
    samples = []
    cpu = time.thread_time()
    for n in range(sizes.sequential):
        began = time.perf_counter()
        value = peer.result(peer.submit_add(n, 1))
        samples.append(time.perf_counter() - began)
        if value != n + 1:
            raise AssertionError(f"sequential task returned {value!r}, not {n + 1}")
    return {**_latencies("sequential", samples), "_client_cpu_s": time.thread_time() - cpu}


def dispatch(peer: Peer, sizes: Sizes) -> dict:
    """Submit → first line of the task (the task returns its own ``time.time()``), one at a time."""
    samples = []
    cpu = time.thread_time()
    for _ in range(sizes.dispatch):
        began = time.time()
        started = peer.result(peer.submit_stamp())
        samples.append(float(started) - began)
    return {**_latencies("dispatch", samples), "_client_cpu_s": time.thread_time() - cpu}


def post(peer: Peer, sizes: Sizes) -> dict:
    """The submit alone (for HTTP peers, one POST's round trip), one at a time, ``dispatch`` times;
    each task's result is fetched after the timed submit."""
    samples = []
    for n in range(sizes.dispatch):
        began = time.perf_counter()
        handle = peer.submit_add(n, 1)
        samples.append(time.perf_counter() - began)
        peer.result(handle)
    return _latencies("post", samples)


#: Workloads whose CPU by role and store writes :func:`accounted` records, and their task counts.
ACCOUNTED: dict[str, Callable[[Sizes], int]] = {
    base.BURST: lambda sizes: sizes.burst_tasks,
    base.SEQUENTIAL: lambda sizes: sizes.sequential,
    base.DISPATCH: lambda sizes: sizes.dispatch,
}
#: The roles CPU is split by, as figures name them (``cpu_<workload>_<role>_ms``).
ROLES = {"serving": "serving", "fork server": "forkserver", "tasks": "tasks", "client": "client", "redis": "redis",
         "postgres": "postgres"}


def accounted(name: str, peer: Peer, sizes: Sizes) -> dict:
    """One run of workload ``name``; for the workloads in :data:`ACCOUNTED`, the run's CPU milliseconds
    per task by process role and the store write transactions per task besides.

    The client is the benchmark's own client threads (their ``time.thread_time()``). For a peer
    served from outside this process, each role's processes are read by :meth:`Peer.cpu_roles`;
    for one served from inside it (the floors, the Python API), the serving figure is this
    process's CPU less the client threads'."""
    if name not in ACCOUNTED:
        return {k: v for k, v in WORKLOADS[name](peer, sizes).items() if not k.startswith(PRIVATE)}
    import psutil

    from .peers import accounting
    me = psutil.Process()
    roles_before, me_before, writes_before = peer.cpu_roles(), accounting.own(me), peer.store_writes()
    figures = WORKLOADS[name](peer, sizes)
    roles_after, me_after, writes_after = peer.cpu_roles(), accounting.own(me), peer.store_writes()
    tasks = ACCOUNTED[name](sizes)
    client = figures.pop("_client_cpu_s", 0.0)
    cpu = {role: roles_after.get(role, 0.0) - roles_before.get(role, 0.0) for role in roles_after}
    cpu["client"] = client
    if peer.in_process:
        cpu["serving"] = max(0.0, (me_after - me_before) - client)
    for role, value in cpu.items():
        figures[f"cpu_{name}_{ROLES[role]}_ms"] = 1000 * value / tasks
    figures[f"cpu_{name}_total_ms"] = 1000 * sum(cpu.values()) / tasks
    if writes_before is not None and writes_after is not None:
        figures[f"writes_{name}_per_task"] = (writes_after - writes_before) / tasks
    return figures


def _stop(peer: Peer, sizes: Sizes, submit: Callable[[], object], name: str) -> dict:
    samples = []
    for _ in range(sizes.stops):
        handle = submit()
        peer.wait_running(handle)
        # Well inside the loop, at a random point of its 10 ms cycle: a fixed pause would land every
        # stop at the same phase of a task that started on time, right after a check or right before.
        time.sleep(0.05 + random.uniform(0, base.CHECKPOINT_EVERY))
        began = time.perf_counter()
        peer.stop(handle)
        peer.wait_stopped(handle)
        samples.append(time.perf_counter() - began)
    return _latencies(name, samples)


def stop_checkpoint(peer: Peer, sizes: Sizes) -> dict:
    """Stop request → reported stopped, for a task that checks every 10 ms."""
    return _stop(peer, sizes, peer.submit_checkpointing, "stop_checkpoint")


def stop_ignoring(peer: Peer, sizes: Sizes) -> dict:
    """Stop request → reported stopped, for a task that never checks."""
    return _stop(peer, sizes, peer.submit_ignoring, "stop_ignoring")


def memory(peer: Peer, sizes: Sizes) -> dict:
    """PSS of the peer's own processes: idle (after a warm-up), with ``memory_queued`` tasks
    queued behind two running blockers, and after all of them finished."""
    for n in range(20):
        peer.result(peer.submit_add(n, 1))
    time.sleep(0.5)
    idle = base.tree_pss(peer.server_pids())
    mib = 1024 * 1024
    split = {f"pss_idle_{role}_mib": value / mib for role, value in _pss_roles(peer).items()}
    if base.STOP_CHECKPOINT not in peer.supports:  # a floor: nothing runs, nothing queues
        return {"pss_idle_mib": idle / mib, **split}
    blockers = [peer.submit_checkpointing() for _ in range(base.CONCURRENCY)]
    for handle in blockers:
        peer.wait_running(handle)
    handles = _submit_many(peer, sizes.memory_queued)
    queued = base.tree_pss(peer.server_pids())
    for handle in blockers:
        peer.stop(handle)
    for handle in blockers:
        peer.wait_stopped(handle)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda h: peer.result(h, timeout=600), handles))
    time.sleep(0.5)
    after = base.tree_pss(peer.server_pids())
    return {"pss_idle_mib": idle / mib, "pss_queued_mib": queued / mib, "pss_after_mib": after / mib, **split}


def _pss_roles(peer: Peer) -> dict:
    """PSS by role for this project's servers (and the HTTP floor): the serving processes, the fork
    servers (their children) and the task processes (below the fork servers)."""
    serving_of = getattr(peer, "serving_processes", None)
    if serving_of is None:
        return {}
    import psutil

    from .peers import accounting

    def pss(procs: list) -> int:
        total = 0
        for proc in procs:
            try:
                total += proc.memory_full_info().pss
            except psutil.Error:
                continue
        return total
    serving = serving_of()
    pids = {p.pid for p in serving}
    forkservers = [c for p in serving for c in accounting.children(p) if c.pid not in pids]
    tasks = [t for f in forkservers for t in accounting.children(f, recursive=True)]
    return {"serving": pss(serving), "forkserver": pss(forkservers), "tasks": pss(tasks)}


def _submit_many(peer: Peer, count: int) -> list:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda n: peer.submit_add(n, 1), range(count)))


#: Seconds one progress loop may take: with a store write per call, some peers need minutes.
PROGRESS_TIMEOUT = 600.0


def progress(peer: Peer, sizes: Sizes) -> dict:
    """The tight loop with and without a progress call per step: how much slower, and how many
    store writes the calls caused (where the peer can count them)."""
    plain = reporting = float("inf")
    for _ in range(2):  # the faster of two of each: a loop this short feels any other load
        handle = peer.submit_progress(sizes.progress_iterations, report=False)
        plain = min(plain, float(peer.result(handle, timeout=PROGRESS_TIMEOUT)))
        handle = peer.submit_progress(sizes.progress_iterations, report=True)
        reporting = min(reporting, float(peer.result(handle, timeout=PROGRESS_TIMEOUT)))
        if reporting > 5.0:  # a loop this slow is not moved by noise; spare the second one
            break
    figures = {"progress_slowdown_pct": 100 * (reporting / plain - 1),
               "progress_call_ns": 1e9 * (reporting - plain) / sizes.progress_iterations}
    writes = getattr(peer, "progress_writes", None)
    if writes is not None:
        figures["progress_store_writes"] = float(writes(handle))
    return figures


def stored(peer: Peer, sizes: Sizes) -> dict:
    """GET (one task by uuid) and POST rates, 8 client threads, with ``stored_small`` and then
    ``stored_large`` tasks in the store; the peer provides ``populate``, ``get_status`` and
    ``submit_add``."""
    figures = {}
    for label, count in (("small", sizes.stored_small), ("large", sizes.stored_large)):
        uuids = peer.populate(count)
        picks = [random.choice(uuids) for _ in range(sizes.stored_requests)]
        with ThreadPoolExecutor(8) as pool:
            began = time.perf_counter()
            list(pool.map(peer.get_status, picks))
            figures[f"get_{label}_per_s"] = sizes.stored_requests / (time.perf_counter() - began)
            began = time.perf_counter()
            handles = list(pool.map(lambda n: peer.submit_add(n, 1), range(sizes.stored_requests // 4)))
            figures[f"post_{label}_per_s"] = len(handles) / (time.perf_counter() - began)
            list(pool.map(peer.result, handles))
    figures["get_large_vs_small"] = figures["get_small_per_s"] / figures["get_large_per_s"]
    figures["post_large_vs_small"] = figures["post_small_per_s"] / figures["post_large_per_s"]
    return figures


WORKLOADS: dict[str, Callable[[Peer, Sizes], dict]] = {
    base.BURST: burst,
    base.SEQUENTIAL: sequential,
    base.DISPATCH: dispatch,
    base.POST: post,
    base.STOP_CHECKPOINT: stop_checkpoint,
    base.STOP_IGNORING: stop_ignoring,
    base.MEMORY: memory,
    base.PROGRESS: progress,
    base.STORED: stored,
}
#: Workloads that run once per peer (they are slow, or they change the peer's state for good).
RUN_ONCE = {base.MEMORY, base.STORED}

__all__ = ["accounted", "Sizes", "FULL", "QUICK", "TINY", "WORKLOADS", "RUN_ONCE", "percentile", "warmup"]
