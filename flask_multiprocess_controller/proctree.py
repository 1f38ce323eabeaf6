"""A task's process tree: sampling its resources and killing all of it (psutil)."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Optional

import psutil


@dataclass
class TreeUsage:
    """What a process tree has used so far."""

    #: Highest summed RSS of the tree seen in any sample, in bytes.
    memory_peak: int = 0
    #: RSS of the tree in the last sample, in bytes.
    memory_now: int = 0
    #: CPU seconds (user + system) of the tree in the last sample.
    cpu_time: float = 0.0
    #: Every process of the tree seen so far, so that even re-parented ones can be killed.
    seen: dict[int, psutil.Process] = field(default_factory=dict)


def sample(pid: int, usage: TreeUsage) -> None:
    """Add one sample of the tree rooted at ``pid`` to ``usage``."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    rss = 0
    cpu = 0.0
    for proc in procs:
        try:
            with proc.oneshot():
                rss += proc.memory_info().rss
                times = proc.cpu_times()
                cpu += times.user + times.system
        except psutil.Error:
            continue
        usage.seen.setdefault(proc.pid, proc)
    usage.memory_now = rss
    usage.memory_peak = max(usage.memory_peak, rss)
    usage.cpu_time = max(usage.cpu_time, cpu)


def signal_tree(pid: int, signum: int, usage: Optional[TreeUsage] = None) -> None:
    """Send ``signum`` to the task's process group, its live descendants, and every member seen before.

    "Already dead" counts as success; processes whose pid was recycled are never
    hit (psutil checks the create time of the processes it remembers).
    """
    try:
        os.killpg(pid, signum)
    except OSError:
        pass
    targets: dict[int, psutil.Process] = dict(usage.seen) if usage else {}
    try:
        root = psutil.Process(pid)
        targets.setdefault(root.pid, root)
        for child in root.children(recursive=True):
            targets.setdefault(child.pid, child)
    except psutil.Error:
        pass
    for proc in targets.values():
        try:
            if proc.is_running():
                proc.send_signal(signum)
        except psutil.Error:
            pass


def kill_tree(pid: int, usage: Optional[TreeUsage] = None) -> None:
    """SIGKILL the whole tree of a task process."""
    signal_tree(pid, signal.SIGKILL, usage)


def process_alive(pid: Optional[int], create_time: Optional[float]) -> bool:
    """True when ``pid`` runs and, if given, was created at ``create_time`` (not a recycled pid)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe_exit(code: Optional[int]) -> str:
    """Say in words how a process ended, from its exit code (negative = killed by a signal)."""
    if code is None:
        return "ended in an unknown way (its exit status was lost)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"
