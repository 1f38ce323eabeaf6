"""Why a queued task waits, and when it may start: ``waiting_on`` and ``eta`` of the task object.

Neither is stored: both are computed when a task object is shown, from the task's row and place in
the queue and from a :class:`QueueState` of its controller (how many places are held, by paused tasks
among them, whether every serving host is drained, the median run time of recent successes). A
controller reads that state once for a whole answer and keeps it :data:`~.defaults.QUEUE_STATE_TTL`
seconds, so showing many queued tasks costs a few queries, not a few per task.

``waiting_on`` is the first of these that holds (the order goes from what no free place would cure
to the ordinary wait for one):

1. ``retry_at``: a failed attempt waits for its retry time; it is not in line before then.
2. ``schedule``: the task waits for a set start time. (Kept for such tasks; a schedule of this
   version queues its task at the firing, so no task waits on it yet.)
3. ``drained``: every host with a live serving process is drained: none claims a task.
4. ``quota``: the task's tenant used its CPU quota of the window (``tenant_quota``): its tasks are not
   claimed until enough of that usage leaves the window.
5. ``resources``: the task declares resources that no live serving host has room for now (its running
   tasks' declared resources plus the task's exceed the host's capacity); ``waiting_for`` names the
   resources short on every host (the usage counted is the controller's own running tasks).
6. ``key``: ``max_per_key`` tasks of the task's ``concurrency_key`` run already (``waiting_for``: the key).
7. ``tenant``: ``max_per_tenant`` tasks of the task's tenant run already.
8. ``paused``: every one of the ``max_num_process`` places is held by a paused task: the queue moves
   only once one is resumed or stopped (or ``max_pause`` ends a pause).
9. ``slot``: the places are taken, or tasks stand ahead in the queue; also a task at the head of the
   queue with a free place, for the moment before a serving process claims it.

``eta`` (UNIX time; ISO 8601 in the task object) estimates when the task starts: its ``retry_at``
while it waits for it; for ``slot``, now plus, per task that must end before this one finds a free
place, the controller's median run time of recent successes divided by ``max_num_process``; now when
a place is free for it already. It is None when nothing can tell: no success to measure yet, no
place in the queue, or a wait on an operator (``drained``, ``paused``).
"""
from __future__ import annotations

import enum
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from . import defaults
from .states import TaskStatus
from .store import TaskStore
from .store.base import Row, owner_host

__all__ = ["WaitReason", "QueueState", "WaitLimits", "read_queue_state", "waiting_for", "median_run_time", "all_hosts_drained",
           "waiting_on", "eta"]


class WaitReason(str, enum.Enum):
    """What a queued task waits for (its ``waiting_on``)."""

    SLOT = "slot"
    PAUSED = "paused"
    RETRY_AT = "retry_at"
    SCHEDULE = "schedule"
    DRAINED = "drained"
    QUOTA = "quota"
    RESOURCES = "resources"
    KEY = "key"
    TENANT = "tenant"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class QueueState:
    """What every queued task of one controller waits behind, read once for many task objects."""

    max_num_process: int
    #: Tasks holding a place: ``running``, ``stopping`` and ``paused`` (every tenant's).
    held: int
    #: Of those, the ``paused`` ones.
    paused: int
    #: Median seconds from start to end of the controller's recent successes; None when it has none.
    median: Optional[float]
    #: Whether every host with a live serving process is drained (False when no host is known).
    drained: bool
    #: When the state was read (UNIX time, this process's clock): what ``eta`` counts from.
    read_at: float
    #: Running tasks per ``concurrency_key`` and the bound (when ``max_per_key`` is set), per tenant and the
    #: bound (when ``max_per_tenant`` is).
    keys: Mapping[str, int] = field(default_factory=dict)
    max_per_key: Optional[int] = None
    tenants: Mapping[Optional[str], int] = field(default_factory=dict)
    max_per_tenant: Optional[int] = None
    #: Tenants over their quota.
    held_tenants: frozenset[Optional[str]] = frozenset()
    #: Each live host's capacity and the declared resources of the controller's tasks running there (None:
    #: the controller's tasks declare nothing).
    hosts: Optional[tuple[tuple[Mapping[str, float], Mapping[str, float]], ...]] = None


@dataclass(frozen=True)
class WaitLimits:
    """A controller's limits beyond ``max_num_process`` that :func:`read_queue_state` reads the state of."""

    max_per_key: Optional[int] = None
    max_per_tenant: Optional[int] = None
    #: The live hosts' capacities (None: the controller's tasks declare no resources).
    capacities: Optional[Mapping[str, Mapping[str, float]]] = None
    #: Tenants over their quota.
    held_tenants: frozenset[Optional[str]] = frozenset()


def median_run_time(store: TaskStore, controller: str, sample: int = defaults.ETA_SAMPLE) -> Optional[float]:
    """The median run time (seconds, start to end) of the controller's newest ``sample`` successes, or None.

    One read of the store's list (newest first, status ``succeeded``).
    """
    rows = store.list_tasks(controller, [TaskStatus.SUCCEEDED.value], sample)
    runs = [ended - started for ended, started in ((row.get("ended_at"), row.get("started_at")) for row in rows)
            if ended is not None and started is not None]
    return max(0.0, statistics.median(runs)) if runs else None


def all_hosts_drained(store: TaskStore, lease: float = defaults.LEASE) -> bool:
    """Whether every host with a serving process that heartbeat within ``lease`` seconds is drained.

    False when no such host is known (then nothing says the queue cannot move: a server may start).
    """
    drained = store.drained_hosts()
    if not drained:
        return False
    beats = store.known_hosts()
    if not beats:
        return False
    now = store.now()
    live = [host for host, beat in beats.items() if beat >= now - lease]
    return bool(live) and all(host in drained for host in live)


def read_queue_state(store: TaskStore, controller: str, max_num_process: int,
                     counts: Optional[Mapping[str, int]] = None, limits: Optional[WaitLimits] = None) -> QueueState:
    """Read the :class:`QueueState` of ``controller``.

    :param counts: the controller's counts per status (every tenant's) if the caller read them already.
    :param limits: the controller's limits beyond ``max_num_process`` (one more read of its running tasks).
    """
    if counts is None:
        counts = store.counts(controller)
    held = sum(counts.get(status, 0) for status in ("running", "stopping", "paused"))
    extra: dict[str, Any] = {}
    if limits is not None:
        active = store.active(controller) if (limits.max_per_key or limits.max_per_tenant
                                               or limits.capacities) else []
        keys: dict[str, int] = {}
        tenants: dict[Optional[str], int] = {}
        used: dict[str, dict[str, float]] = {}
        for row in active:
            key = row.get("concurrency_key")
            if key is not None:
                keys[key] = keys.get(key, 0) + 1
            tenants[row.get("tenant")] = tenants.get(row.get("tenant"), 0) + 1
            host = owner_host(row.get("owner") or "")
            if host is not None:
                host_used = used.setdefault(host, {})
                for name, amount in (row.get("resources") or {}).items():
                    host_used[name] = host_used.get(name, 0.0) + float(amount)
        extra = {"keys": keys, "max_per_key": limits.max_per_key, "tenants": tenants,
                 "max_per_tenant": limits.max_per_tenant, "held_tenants": limits.held_tenants,
                 "hosts": None if limits.capacities is None else tuple(
                     (capacity, used.get(host, {})) for host, capacity in limits.capacities.items())}
    return QueueState(max_num_process=max_num_process, held=held, paused=counts.get("paused", 0),
                      median=median_run_time(store, controller), drained=all_hosts_drained(store),
                      read_at=time.time(), **extra)


def _short_resources(row: Row, state: QueueState) -> Optional[list[str]]:
    """The resources the task lacks on every live host (empty: some host has room), or None when it declares
    none or no host is known."""
    needed = row.get("resources")
    if not needed or not state.hosts:
        return None
    short: set[str] = set()
    for capacity, used in state.hosts:
        lacking = {name for name, amount in needed.items()
                   if used.get(name, 0.0) + float(amount) > float(capacity.get(name, 0.0)) + 1e-9}
        if not lacking:
            return []
        short |= lacking
    return sorted(short)


def _limited(row: Row, state: QueueState) -> Optional[tuple[WaitReason, Optional[str]]]:
    """The limit the task waits on (quota, resources, key, tenant) with its detail, or None."""
    tenant = row.get("tenant")
    if tenant in state.held_tenants:
        return WaitReason.QUOTA, tenant
    short = _short_resources(row, state)
    if short:
        return WaitReason.RESOURCES, ", ".join(short)
    key = row.get("concurrency_key")
    if state.max_per_key is not None and key is not None and state.keys.get(str(key), 0) >= state.max_per_key:
        return WaitReason.KEY, key
    if state.max_per_tenant is not None and tenant is not None and \
            state.tenants.get(tenant, 0) >= state.max_per_tenant:
        return WaitReason.TENANT, tenant
    return None


def waiting_on(row: Row, position: Optional[int], state: Optional[QueueState]) -> Optional[str]:
    """Why the task waits (see the module's text for the order), or None when it is not queued or the
    state is unknown."""
    if row["status"] != TaskStatus.QUEUED or state is None:
        return None
    if row.get("retry_at") is not None:
        return WaitReason.RETRY_AT.value
    if state.drained:
        return WaitReason.DRAINED.value
    limited = _limited(row, state)
    if limited is not None:
        return limited[0].value
    if state.held >= state.max_num_process and state.paused >= state.max_num_process:
        return WaitReason.PAUSED.value
    return WaitReason.SLOT.value


def eta(row: Row, position: Optional[int], state: Optional[QueueState]) -> Optional[float]:
    """When the task may start (UNIX time), estimated as the module's text says; None when unknown."""
    reason = waiting_on(row, position, state)
    if reason is None or state is None:
        return None
    if reason == WaitReason.RETRY_AT:
        return float(row["retry_at"])  # type: ignore[arg-type]
    if reason != WaitReason.SLOT or position is None:
        return None
    free = max(0, state.max_num_process - state.held)
    ahead = max(0, position - free)  # tasks that must end before a place is this one's
    if ahead == 0:
        return state.read_at
    if state.median is None or state.max_num_process <= 0:
        return None
    return state.read_at + ahead * state.median / state.max_num_process


def waiting_for(row: Row, position: Optional[int], state: Optional[QueueState]) -> Optional[str]:
    """The detail of a wait on a limit: the resources short (``"memory"``, ``"cpus, gpu"``) for ``resources``,
    the key for ``key``, the tenant for ``tenant`` and ``quota``; else None."""
    reason = waiting_on(row, position, state)
    if state is None or reason not in (WaitReason.QUOTA, WaitReason.RESOURCES, WaitReason.KEY, WaitReason.TENANT):
        return None
    limited = _limited(row, state)
    return None if limited is None else limited[1]


def shown(row: Row, position: Optional[int], state: Optional[QueueState]) -> dict[str, Any]:
    """``waiting_on``, ``waiting_for`` and ``eta`` (UNIX time) of a row, as :func:`~.presenter.present` adds them."""
    return {"waiting_on": waiting_on(row, position, state), "waiting_for": waiting_for(row, position, state),
            "eta": eta(row, position, state)}
