"""Limits above the global ``max_num_process``: concurrency keys, declared resources, host capacity, quotas.

- **Concurrency key**: a controller's ``concurrency_key=`` (an argument name of ``execute``, or a callable of
  ``(args, tenant)``) gives each task a key, stored in its ``concurrency_key``; ``max_per_key`` bounds the
  running tasks sharing one (the store enforces it in its claim, see :mod:`.store.claimrules`).
- **Resources**: a task class declares ``resources = {"memory": "6GiB", "cpus": 2, "gpu": 1}``, parsed once
  when the class is made (:func:`parse_resources`); every task of the class stores them.
- **Host capacity**: what a serving process's host offers (:func:`host_capacity`): memory and CPUs from the
  cgroup limits where set (v2, else v1), else the machine's; ``MPC_RESOURCES`` overrides or adds names
  (:func:`parse_capacity`). A serving process whose controller's tasks declare resources publishes it in
  the store, so that a submit of a task that fits no live host is refused (:func:`check_fits_some_host`).
- **Quota**: ``tenant_quota=(cpu_seconds, window)`` bounds the CPU time a tenant's tasks may use per
  ``window`` seconds, measured from the tasks' ``cpu_time`` (ended within the window, plus running):
  a tenant over it may not submit (429) and its queued tasks are not claimed (:func:`quota_usage`).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import psutil

from . import defaults
from .exceptions import InvalidArguments, QuotaExceeded, ResourcesUnavailable
from .store.base import SYSTEM_TENANT, Row
from .store.claimrules import fits

__all__ = ["parse_amount", "parse_resources", "parse_capacity", "host_capacity", "detect_capacity",
           "KeyFunction", "key_function", "QuotaSpec", "quota_spec", "quota_usage", "TenantUsage",
           "check_fits_some_host", "live_capacities", "describe_amounts"]

_AMOUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*$")
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_amount(value: Any, name: str = "amount") -> float:
    """An amount as a number: an int or float as is, or a string with an optional unit ``k``, ``M``, ``G``,
    ``T`` (powers of 1000), or ``Ki``, ``Mi``, ``Gi``, ``Ti`` (powers of 1024), and an optional ``B``:
    ``"6GiB"``, ``"512M"``, ``"1.5G"``, ``"2"``.

    :raises ValueError: not a finite, non-negative amount (the message names ``name``).
    :raises TypeError: neither a number nor a string.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{name} must be a number or a string such as '6GiB', not {value!r}.")
    amount: float
    if isinstance(value, str):
        match = _AMOUNT.match(value)
        if match is None:
            raise ValueError(f"{name} {value!r} is not an amount: write a number with an optional unit "
                             f"k, M, G, T (powers of 1000) or Ki, Mi, Gi, Ti (powers of 1024), such as '6GiB'.")
        number, unit, binary = match.groups()
        base = 1024 if binary else 1000
        if binary and not unit:
            raise ValueError(f"{name} {value!r}: 'i' needs a unit before it (Ki, Mi, Gi, Ti).")
        amount = float(number) * base ** _POWERS[unit.lower()]
    else:
        amount = float(value)
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"{name} must be a finite amount, not negative, not {value!r}.")
    return amount


def parse_resources(declared: Any, where: str = "resources") -> Optional[dict[str, float]]:
    """A task class's ``resources`` as numbers: resource name -> amount (``memory`` in bytes, ``cpus``, custom
    names). None or an empty mapping declares nothing (None).

    :raises TypeError, ValueError: not a mapping of names to amounts (the message says which entry).
    """
    if declared is None:
        return None
    if not isinstance(declared, Mapping):
        raise TypeError(f"{where} must be a dict of resource name -> amount, such as "
                        f"{{'memory': '6GiB', 'cpus': 2}}, not {declared!r}.")
    parsed: dict[str, float] = {}
    for name, value in declared.items():
        if not isinstance(name, str) or not name or len(name) > 64:
            raise TypeError(f"{where}: a resource name is a non-empty string of at most 64 characters, "
                            f"not {name!r}.")
        parsed[name] = parse_amount(value, f"{where}[{name!r}]")
    return {name: amount for name, amount in parsed.items() if amount > 0} or None


def parse_capacity(text: str) -> dict[str, float]:
    """The ``MPC_RESOURCES`` format: comma-separated ``name=amount`` pairs, such as ``memory=16GiB,cpus=4,gpu=1``
    (amounts as :func:`parse_amount` reads them).

    :raises ValueError: a pair is not ``name=amount``.
    """
    capacity: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"MPC_RESOURCES: {part.strip()!r} is not name=amount (such as memory=16GiB,cpus=4).")
        capacity[name.strip()] = parse_amount(value.strip(), f"MPC_RESOURCES {name.strip()}")
    return capacity


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _cgroup_paths(proc_cgroup: str) -> tuple[Optional[str], dict[str, str]]:
    """This process's cgroup v2 path, and its v1 paths per controller, from ``/proc/self/cgroup``."""
    v2: Optional[str] = None
    v1: dict[str, str] = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        for controller in parts[1].split(","):
            if controller:
                v1[controller] = parts[2]
    return v2, v1


def _ancestors(root: str, path: str) -> list[str]:
    """``root/path`` and each of its parents up to ``root`` (a limit anywhere above applies too)."""
    found = []
    parts = [p for p in path.split("/") if p and p != ".."]
    while True:
        found.append(os.path.join(root, *parts))
        if not parts:
            return found
        parts.pop()


def cgroup_limits(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> dict[str, float]:
    """The memory (bytes) and CPU limits of this process's cgroup (v2, else v1), those that are set."""
    limits: dict[str, float] = {}
    v2, v1 = _cgroup_paths(proc_cgroup)
    if v2 is not None and os.path.exists(os.path.join(root, "cgroup.controllers")):
        for directory in _ancestors(root, v2):
            memory = _read(os.path.join(directory, "memory.max"))
            if memory and memory != "max" and memory.isdigit():
                limits["memory"] = min(limits.get("memory", math.inf), float(memory))
            cpu = (_read(os.path.join(directory, "cpu.max")) or "").split()
            if len(cpu) == 2 and cpu[0] != "max" and cpu[0].isdigit() and cpu[1].isdigit() and int(cpu[1]) > 0:
                limits["cpus"] = min(limits.get("cpus", math.inf), int(cpu[0]) / int(cpu[1]))
        return limits
    memory_dir = os.path.join(root, "memory", v1.get("memory", "/").lstrip("/"))
    memory = _read(os.path.join(memory_dir, "memory.limit_in_bytes"))
    if memory and memory.isdigit() and int(memory) < 2 ** 60:  # "no limit" reads as a huge number
        limits["memory"] = float(memory)
    cpu_dir = os.path.join(root, "cpu", v1.get("cpu", "/").lstrip("/"))
    quota, period = _read(os.path.join(cpu_dir, "cpu.cfs_quota_us")), _read(os.path.join(cpu_dir, "cpu.cfs_period_us"))
    if quota and period and quota.isdigit() and period.isdigit() and int(period) > 0:
        limits["cpus"] = int(quota) / int(period)
    return limits


def detect_capacity() -> dict[str, float]:
    """This host's memory (bytes) and CPUs: the cgroup's limits where set, else the machine's (the CPUs this
    process may run on)."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = float(os.cpu_count() or 1)
    capacity = {"memory": float(psutil.virtual_memory().total), "cpus": cpus}
    for name, limit in cgroup_limits().items():
        capacity[name] = min(capacity[name], limit)
    return capacity


def host_capacity(environ: Mapping[str, str] = os.environ) -> dict[str, float]:
    """This host's capacity: :func:`detect_capacity`, with the names ``MPC_RESOURCES`` lists replacing or
    adding to it (see :func:`parse_capacity`)."""
    capacity = detect_capacity()
    override = environ.get(defaults.RESOURCES_ENV)
    if override:
        capacity.update(parse_capacity(override))
    return capacity


def describe_amounts(amounts: Mapping[str, float]) -> str:
    """``memory 6 GiB, cpus 2`` (memory in binary units), for messages."""
    def shown(name: str, amount: float) -> str:
        if name == "memory":
            for unit, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
                if amount >= 1024 ** power:
                    return f"{amount / 1024 ** power:.4g} {unit}"
            return f"{amount:.0f} B"
        return f"{amount:g}"
    return ", ".join(f"{name} {shown(name, amount)}" for name, amount in sorted(amounts.items()))


def live_capacities(capacities: Mapping[str, Mapping[str, float]], beats: Mapping[str, float], now: float,
                    lease: float) -> dict[str, Mapping[str, float]]:
    """The published capacities of the hosts that have a serving process with a heartbeat within ``lease``."""
    return {host: capacity for host, capacity in capacities.items()
            if beats.get(host, -math.inf) >= now - lease}


def check_fits_some_host(resources: Optional[Mapping[str, float]], capacities: Mapping[str, Mapping[str, float]],
                         task: str) -> None:
    """Refuse a task whose ``resources`` fit no host of ``capacities`` even when idle.

    No capacity known (no live serving host published one) refuses nothing: a server may start.

    :raises ResourcesUnavailable: with the largest capacity seen of each resource the task needs.
    """
    if not resources or not capacities:
        return
    if any(fits(resources, {}, capacity) for capacity in capacities.values()):
        return
    largest = {name: max(float(capacity.get(name, 0.0)) for capacity in capacities.values()) for name in resources}
    raise ResourcesUnavailable(
        f"A {task} task needs {describe_amounts(resources)}, more than any serving host offers: the largest "
        f"capacity seen is {describe_amounts(largest)} (of {len(capacities)} host(s); set MPC_RESOURCES on a host "
        f"to declare more).", dict(resources), largest)


#: What a controller's ``concurrency_key=`` becomes: args, tenant -> the task's key (None: no key).
KeyFunction = Callable[[Mapping[str, Any], Optional[str]], Optional[str]]


def key_function(concurrency_key: Union[None, str, Callable[..., Any]], names: Iterable[str] = (),
                 open_signature: bool = False,
                 defaults_of: Optional[Mapping[str, Any]] = None) -> Optional[KeyFunction]:
    """The function that gives a task its ``concurrency_key`` (None when the controller has none).

    :param concurrency_key: an argument name of ``execute`` (its value is the key; a value that is not a
        string is keyed by its JSON; a missing argument by its default), or a callable of ``(args, tenant)``
        answering a string, or None for no key.
    :raises ValueError: a name that is not a parameter of ``execute``.
    :raises TypeError: neither a string nor a callable.
    """
    if concurrency_key is None:
        return None
    if isinstance(concurrency_key, str):
        name = concurrency_key
        if name not in set(names) and not open_signature:
            raise ValueError(f"concurrency_key={name!r} is not a parameter of the task's execute().")
        fallback = dict(defaults_of or {})

        def by_argument(args: Mapping[str, Any], tenant: Optional[str]) -> Optional[str]:
            if name in args:
                value = args[name]
            elif name in fallback:
                value = fallback[name]
            else:
                return None
            if value is None:
                return None
            return value if isinstance(value, str) else json.dumps(value, sort_keys=True)

        return by_argument
    if not callable(concurrency_key):
        raise TypeError(f"concurrency_key must be an argument name or a callable of (args, tenant), "
                        f"not {concurrency_key!r}.")
    computed = concurrency_key

    def by_callable(args: Mapping[str, Any], tenant: Optional[str]) -> Optional[str]:
        try:
            value = computed(dict(args), None if tenant == SYSTEM_TENANT else tenant)
        except Exception as exc:
            raise InvalidArguments(f"The task's concurrency key could not be computed from its arguments: "
                                   f"{type(exc).__name__}: {exc}") from None
        return None if value is None else str(value)

    return by_callable


def stamp(rows: Iterable[Row], key: Optional[KeyFunction], resources: Optional[Mapping[str, float]]) -> None:
    """Give each new row its ``concurrency_key`` and ``resources`` (what the store's claim reads).

    :raises InvalidRequest: a key longer than :data:`~.defaults.MAX_CONCURRENCY_KEY` characters.
    """
    for row in rows:
        if key is not None:
            value = key(row.get("args") or {}, row.get("tenant"))
            if value is not None and len(value) > defaults.MAX_CONCURRENCY_KEY:
                raise InvalidArguments(f"The task's concurrency key is {len(value)} characters long; at most "
                                       f"{defaults.MAX_CONCURRENCY_KEY}.")
            row["concurrency_key"] = value
        if resources is not None:
            row["resources"] = dict(resources)


@dataclass(frozen=True)
class QuotaSpec:
    """``tenant_quota=(cpu_seconds, window)``: CPU seconds a tenant's tasks may use per ``window`` seconds."""

    cpu_seconds: float
    window: float


def quota_spec(value: Any) -> Optional[QuotaSpec]:
    """Check a controller's ``tenant_quota``: None, or ``(cpu_seconds, window_seconds)``, both positive.

    :raises ValueError, TypeError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, QuotaSpec):
        return value
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"tenant_quota must be (cpu_seconds, window_seconds), such as (3600, 86400), not {value!r}.")
    seconds, window = value
    for name, number in (("cpu_seconds", seconds), ("window", window)):
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                or number <= 0:
            raise ValueError(f"tenant_quota's {name} must be a positive number of seconds, not {number!r}.")
    return QuotaSpec(float(seconds), float(window))


@dataclass(frozen=True)
class TenantUsage:
    """The CPU seconds of one tenant's tasks in the quota window, and when it is under its quota again."""

    tenant: Optional[str]
    used: float
    quota: float
    window: float
    #: Store-clock time at which enough of the window's ended tasks leave it for the tenant to be under its
    #: quota again (the window's end when its running tasks alone are over it); None when under it now.
    free_at: Optional[float]

    @property
    def over(self) -> bool:
        return self.used >= self.quota

    def to_json(self, now: float) -> dict[str, Any]:
        return {"tenant": self.tenant, "cpu_seconds": round(self.used, 3), "quota": self.quota,
                "window": self.window, "over": self.over,
                "retry_after": None if self.free_at is None else max(1, math.ceil(self.free_at - now))}


def quota_usage(ended: Iterable[tuple[Optional[str], float, float]], running: Iterable[Row], quota: QuotaSpec,
                now: float) -> dict[Optional[str], TenantUsage]:
    """Each tenant's usage against ``quota`` from the tasks ended in the window (``(tenant, ended_at, cpu_time)``)
    and the running ones (their ``cpu_time`` so far). The system's tasks (:data:`SYSTEM_TENANT`) are bounded
    by no quota and left out."""
    per_tenant: dict[Optional[str], list[tuple[float, float]]] = {}
    running_cpu: dict[Optional[str], float] = {}
    for tenant, ended_at, cpu in ended:
        if tenant != SYSTEM_TENANT and cpu:
            per_tenant.setdefault(tenant, []).append((ended_at, float(cpu)))
    for row in running:
        tenant = row.get("tenant")
        if tenant != SYSTEM_TENANT:
            running_cpu[tenant] = running_cpu.get(tenant, 0.0) + float(row.get("cpu_time") or 0.0)
            per_tenant.setdefault(tenant, [])
    usage: dict[Optional[str], TenantUsage] = {}
    for tenant, entries in per_tenant.items():
        used = sum(cpu for _, cpu in entries) + running_cpu.get(tenant, 0.0)
        free_at: Optional[float] = None
        if used >= quota.cpu_seconds:
            left = used
            free_at = now + quota.window  # the running tasks alone are over it: a whole window at most
            for ended_at, cpu in sorted(entries):
                left -= cpu
                if left < quota.cpu_seconds:
                    free_at = ended_at + quota.window
                    break
        usage[tenant] = TenantUsage(tenant, used, quota.cpu_seconds, quota.window, free_at)
    return usage


def refuse_over_quota(usage: Mapping[Optional[str], TenantUsage], tenant: Optional[str], now: float) -> None:
    """:raises QuotaExceeded: ``tenant`` is over its quota (with the seconds until it is not)."""
    found = usage.get(tenant)
    if tenant == SYSTEM_TENANT or found is None or not found.over:
        return
    retry_after = max(1, math.ceil((found.free_at or now + found.window) - now))
    raise QuotaExceeded(f"This tenant's tasks used {found.used:.1f} CPU seconds of their quota of "
                        f"{found.quota:g} per {found.window:g} s; retry in {retry_after} s.", retry_after)
