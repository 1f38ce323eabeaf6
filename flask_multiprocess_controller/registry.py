"""The controllers of this process, the app they are bound to, and the role of the process.

Controllers register themselves when they are created, so a Flask extension object finds the
controllers made before it and after it. A process is either a *server* (it runs tasks: a web
server, a gunicorn worker) or a *client* (it only submits, reads and stops them through the store:
``flask mpc``, a cron job, a script).
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .controller import MetaMPController

#: Environment variable that makes every controller of the process a client (``MPC_ROLE=client``).
ROLE_ENV = "MPC_ROLE"
SERVER = "server"
CLIENT = "client"

# Guards every module-level variable below.
_lock = threading.Lock()
_controllers: "weakref.WeakSet[MetaMPController]" = weakref.WeakSet()
_forced_role: Optional[str] = None
#: Controlling threads per controller for the controllers created from now on (None: max_num_process).
_slots: Optional[int] = None
#: True once an extension object was made in this process: mounting a resource then no longer
#: starts its controller; the extension's ``init_app`` (or the first use) does, with the app's settings.
_extension_made = False


def role() -> str:
    """``"client"`` or ``"server"``: the CLI's choice, else ``MPC_ROLE``, else server."""
    chosen = _forced_role or os.environ.get(ROLE_ENV) or SERVER
    if chosen not in (SERVER, CLIENT):
        raise ValueError(f"{ROLE_ENV} must be '{SERVER}' or '{CLIENT}', not {chosen!r}.")
    return chosen


def become_client() -> None:
    """Make every controller created from now on in this process a client (the CLI calls this first)."""
    global _forced_role
    with _lock:
        _forced_role = CLIENT


def become_server() -> None:
    """Make every controller created from now on in this process a server, whatever ``MPC_ROLE`` says
    (``flask mpc worker`` calls this before the app is imported)."""
    global _forced_role
    with _lock:
        _forced_role = SERVER


def set_slots(count: Optional[int]) -> None:
    """Give every controller created from now on in this process ``count`` controlling threads (None: its
    ``max_num_process``); ``flask mpc worker --slots`` calls this before the app is imported."""
    global _slots
    with _lock:
        _slots = count


def slots() -> Optional[int]:
    """The slot count of controllers created now (see :func:`set_slots`)."""
    with _lock:
        return _slots


def register(controller: "MetaMPController") -> None:
    """Add a controller to the process's registry (controllers do it themselves when created)."""
    with _lock:
        _controllers.add(controller)


def unregister(controller: "MetaMPController") -> None:
    with _lock:
        _controllers.discard(controller)


def controllers() -> list["MetaMPController"]:
    """The live controllers of this process, by name."""
    with _lock:
        found = list(_controllers)
    return sorted(found, key=lambda c: c.name)


def note_extension() -> None:
    """Record that an extension object exists in this process."""
    global _extension_made
    with _lock:
        _extension_made = True


def extension_made() -> bool:
    """Whether an extension object was made in this process."""
    with _lock:
        return _extension_made
