"""Who a serving process is in the store, and whether one still runs.

Each serving process heartbeats under an owner id ``host:pid:create_time``; the tasks it runs carry it.
Whether an owner is alive is decided by the process table on its own host (pids are only comparable
within one pid namespace of one boot) and by its heartbeat's age elsewhere; a fork server that holds
the tasks of an ended owner for adoption keeps a heartbeat of its own for them (see :mod:`.handover`).
"""
from __future__ import annotations

import os
import socket
from typing import Optional

import psutil

from .. import defaults
from .forkserver import FORK_SERVER_NAME
from .handover import held_prefix
from .proctree import process_alive


def host_id() -> str:
    """This host's name in the store: ``MPC_HOST_ID``, else the host name qualified by its pid namespace and boot.

    Pids are only comparable within one pid namespace of one boot: two containers on one
    host network share a host name but not their process tables, and each would take the
    other's live processes for dead ones. The default identity therefore names the pid
    namespace (the inode of ``/proc/self/ns/pid``) and the boot (``boot_id``) too.
    """
    configured = os.environ.get(defaults.HOST_ID_ENV)
    if configured:
        return configured
    return "/".join([socket.gethostname(), *_namespace_marks()])


def _namespace_marks() -> list[str]:
    marks = []
    try:
        marks.append("pidns-" + str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            marks.append("boot-" + boot.read().strip()[:8])
    except OSError:
        pass
    return marks


def owner_id(host: str) -> str:
    """Name this serving process uniquely, even across pid reuse: ``host:pid:create_time``."""
    return f"{host}:{os.getpid()}:{psutil.Process().create_time():.3f}"


def _parse_owner(owner: str) -> tuple[str, int, float]:
    rest, _, created = owner.rpartition(":")
    host, _, pid = rest.rpartition(":")
    return host, int(pid), float(created)


def owner_host(owner: Optional[str]) -> Optional[str]:
    try:
        return _parse_owner(owner)[0] if owner else None
    except ValueError:
        return None


def owner_alive(owner: Optional[str], host: str, heartbeats: dict[str, float], now: float, lease: float) -> bool:
    """Whether the serving process ``owner`` still runs.

    On this host the process table decides at once; elsewhere a heartbeat younger
    than ``lease`` seconds (on the store's clock) does.
    """
    if not owner:
        return False
    prefix = held_prefix(owner)  # its tasks are held for adoption (see .handover)
    if any(now - beat <= lease for key, beat in heartbeats.items() if key.startswith(prefix)):
        return True
    try:
        where, pid, created = _parse_owner(owner)
    except ValueError:
        return False
    if where == host:
        return process_alive(pid, created)
    beat = heartbeats.get(owner)
    return beat is not None and now - beat <= lease


def held_for_adoption(proc: psutil.Process) -> bool:
    """Whether task process ``proc`` is still its fork server's: held for adoption, as its serving process ended."""
    try:
        parent = proc.parent()
        return parent is not None and parent.name() == FORK_SERVER_NAME
    except psutil.Error:
        return False
