"""What a claim must respect beyond a controller's global limit: keys, tenants, fair share, a host's capacity.

``max_num_process`` bounds a controller's running tasks across every process and host. A claim also honours
these rules, checked in the same atomic step as that limit on every store, so that they hold across gunicorn
workers and hosts as the global limit does:

- **drained host**: a serving process of a drained host claims nothing (the store's flag, read in the claim
  itself, so a task queued right after ``flask mpc drain`` returns is never taken by that host);
- **per key**: at most ``max_per_key`` running tasks of the controller share a ``concurrency_key``;
- **per tenant**: at most ``max_per_tenant`` running tasks of the controller share a tenant (tasks of no tenant
  are not bounded by it);
- **held tenants**: tasks of a tenant over its quota are not claimed;
- **capacity**: a task that declares ``resources`` starts only when the declared resources of the active tasks
  of every controller on the claiming host, plus its own, fit in the host's ``capacity`` (a resource the host
  does not list has capacity 0);
- **fair share**: among the eligible tasks of the lowest priority value, the tenant with the fewest active
  tasks of the controller goes first; ties go to the tenant claimed least recently for the controller (one
  never claimed first), then to the tenant whose oldest eligible task is oldest. So a tenant with a thousand
  queued tasks does not starve one with a single task, and tenants take turns even when none runs any task
  (one slot, or claims right after ends). Each fair claim records its tenant's last claim in its atomic step
  (skipped when that tenant is already the one claimed last: a lone tenant's claims write nothing more).
  Without fair share, the oldest goes first.

A task that a rule holds back does not hold up the tasks behind it: a claim takes the first eligible task in
that order, whatever stands before it (no head-of-line blocking).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

__all__ = ["ClaimRules", "NO_RULES", "claim_tag", "fits", "host_usage"]


@dataclass(frozen=True)
class ClaimRules:
    """The rules one claim honours (see the module's text); the default honours none but fair share."""

    #: The claiming process's host (as :func:`~.base.owner_host` reads it from an owner id); None: the claim
    #: checks no drain flag and no capacity.
    host: Optional[str] = None
    #: Running (or stopping) tasks of the controller per ``concurrency_key`` at most; None: no bound.
    max_per_key: Optional[int] = None
    #: Running (or stopping) tasks of the controller per tenant at most; None: no bound.
    max_per_tenant: Optional[int] = None
    #: Whether claims share out between tenants (else strictly oldest first within a priority).
    fair: bool = True
    #: The host's capacity, resource name -> amount (``memory`` in bytes, ``cpus``, custom names); None: tasks
    #: are claimed whatever they declare.
    capacity: Optional[Mapping[str, float]] = None
    #: Tenants whose tasks are not claimed now (over their quota).
    held_tenants: frozenset[Optional[str]] = field(default_factory=frozenset)

    @property
    def plain(self) -> bool:
        """Whether the claim may take the oldest ready task of the lowest priority value, as before any rule:
        no bound, no held tenant, no capacity (fair share still orders by tenant when several wait)."""
        return (self.max_per_key is None and self.max_per_tenant is None and self.capacity is None
                and not self.held_tenants)


#: The rules of a claim that names no host and bounds nothing.
NO_RULES = ClaimRules()


def host_usage(active: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The sum of the declared ``resources`` of ``active`` rows (those of one host)."""
    used: dict[str, float] = {}
    for row in active:
        for name, amount in (row.get("resources") or {}).items():
            used[name] = used.get(name, 0.0) + float(amount)
    return used


def fits(resources: Optional[Mapping[str, Any]], used: Mapping[str, float],
         capacity: Optional[Mapping[str, float]]) -> bool:
    """Whether a task declaring ``resources`` fits beside ``used`` in ``capacity`` (None: anything fits)."""
    if capacity is None or not resources:
        return True
    return all(used.get(name, 0.0) + float(amount) <= float(capacity.get(name, 0.0)) + 1e-9
               for name, amount in resources.items())


def claim_tag(tenant: Optional[str]) -> str:
    """How the stores key a tenant's last claim: ``=`` and the tenant, or ``~`` for tasks of no tenant (a key
    never NULL, so that tasks of no tenant have a last claim of their own)."""
    return "~" if tenant is None else "=" + tenant
