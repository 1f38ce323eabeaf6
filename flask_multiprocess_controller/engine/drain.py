"""Draining a host: its serving processes claim no new task, for every controller, while running tasks go on.

The flag lives in the store (:meth:`~.store.base.TaskStore.set_drained`), so a drain made from
anywhere (``flask mpc drain``, ``POST <prefix>/api/hosts/<host>/drain``, a script) reaches every
serving process of the host: each reads it with its heartbeat, once a second, and the process
that made the change at once. Undraining wakes the idle slots, which claim again straight away.

A host is named as serving processes name themselves (:func:`~.runtime.host_id`); one the store
has never seen (no heartbeat of a serving process of it, not drained) is refused with
:class:`~.exceptions.HostNotFound`, so that a typo does not drain nothing silently.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional, TypedDict

from ..exceptions import HostNotFound, InvalidRequest
from ..presenter import iso

if TYPE_CHECKING:
    from ..controller import MetaMPController
    from ..store import TaskStore

#: Characters a host name may have at most.
MAX_HOST_LENGTH = 255


class HostDrain(TypedDict):
    """Whether a host is drained, and since when (ISO 8601, UTC; None when it is not)."""

    host: str
    drained: bool
    since: Optional[str]


def check_host(host: Any) -> str:
    """``host`` when it can name a host, else :class:`InvalidRequest`."""
    if not isinstance(host, str) or not host.strip():
        raise InvalidRequest("Name the host to drain: a non-empty string, such as its servers' MPC_HOST_ID.")
    if len(host) > MAX_HOST_LENGTH or not host.isprintable():
        raise InvalidRequest(f"A host name has at most {MAX_HOST_LENGTH} printable characters; "
                             f"{host[:40]!r}... does not name one.")
    return host


def distinct_stores(controllers: Iterable["MetaMPController"]) -> list["TaskStore"]:
    """The stores of ``controllers``, each shared one once (each controller has a store object of its own)."""
    found: dict[Any, "TaskStore"] = {}
    for controller in controllers:
        store = controller.store
        where = (type(store).__name__, getattr(store, "url", None), getattr(store, "path", None),
                 getattr(store, "prefix", None))
        found.setdefault(where if store.shared else id(store), store)
    return list(found.values())


def set_host_drained(controllers: list["MetaMPController"], host: str, drained: bool) -> HostDrain:
    """Drain (or undrain) ``host`` in the stores of ``controllers``; return its state afterwards.

    The runtimes of this process that serve on ``host`` take the change at once.

    :raises HostNotFound: no store of the controllers has seen the host.
    :raises InvalidRequest: ``host`` cannot name a host, or there is no controller.
    """
    host, stores = _known(controllers, host)
    for store in stores:
        store.set_drained(host, drained)
    for controller in controllers:
        runtime = controller.local_runtime()
        if runtime is not None and runtime.host == host:
            runtime.refresh_host_drained()
    return host_state(stores, host)


def drain_state(controllers: list["MetaMPController"], host: str) -> HostDrain:
    """Whether ``host`` is drained in the stores of ``controllers``.

    :raises HostNotFound, InvalidRequest: as :func:`set_host_drained`.
    """
    host, stores = _known(controllers, host)
    return host_state(stores, host)


def _known(controllers: list["MetaMPController"], host: Any) -> tuple[str, list["TaskStore"]]:
    """The checked host name and the controllers' stores, once one of them has seen the host."""
    host = check_host(host)
    stores = distinct_stores(controllers)
    if not stores:
        raise InvalidRequest("There is no controller, so no store that knows hosts.")
    if not any(host in store.known_hosts() or host in store.drained_hosts() for store in stores):
        raise HostNotFound(host)
    return host, stores


def host_state(stores: list["TaskStore"], host: str) -> HostDrain:
    """Whether ``host`` is drained in any of ``stores``, since the earliest of them."""
    since = [found[host] for found in (store.drained_hosts() for store in stores) if host in found]
    return {"host": host, "drained": bool(since), "since": iso(min(since)) if since else None}


class HostInfo(HostDrain):
    """A host the stores know: its drain state and its newest heartbeat (ISO 8601; None when none is left)."""

    heartbeat: Optional[str]


def known_hosts(controllers: list["MetaMPController"]) -> list[HostInfo]:
    """Every host with a serving process that heartbeats in the stores of ``controllers``, or drained there,
    by name: what an operator drains (host ids are long: ``web-1/pidns-4026531836/boot-5673eb4c``)."""
    beats: dict[str, float] = {}
    drained = {entry["host"]: entry["since"] for entry in drained_hosts(controllers)}
    for store in distinct_stores(controllers):
        for host, beat in store.known_hosts().items():
            beats[host] = max(beat, beats.get(host, beat))
    return [{"host": host, "drained": host in drained, "since": drained.get(host),
             "heartbeat": iso(beats.get(host))} for host in sorted(set(beats) | set(drained))]


def drained_hosts(controllers: list["MetaMPController"]) -> list[HostDrain]:
    """Every host drained in the stores of ``controllers``, by name."""
    since: dict[str, float] = {}
    for store in distinct_stores(controllers):
        for host, at in store.drained_hosts().items():
            since[host] = min(at, since.get(host, at))
    return [{"host": host, "drained": True, "since": iso(at)} for host, at in sorted(since.items())]
