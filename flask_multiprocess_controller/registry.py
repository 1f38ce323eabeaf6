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
from typing import TYPE_CHECKING, Any, Optional

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
#: Extension objects not initialised with an app yet: while there is one, mounting a resource does
#: not start its controller; the extension's ``init_app`` does, with the app's configuration.
_pending_extensions: "weakref.WeakSet[Any]" = weakref.WeakSet()
#: The app whose extension was initialised last, and its settings, for controllers made afterwards.
_bound: Optional[tuple["weakref.ref[Any]", dict[str, Any], Optional[str]]] = None


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


def extension_pending(extension: Any, pending: bool) -> None:
    """Record that ``extension`` waits for its first ``init_app`` (or no longer does)."""
    with _lock:
        if pending:
            _pending_extensions.add(extension)
        else:
            _pending_extensions.discard(extension)


def extension_pending_somewhere() -> bool:
    """Whether an extension object of this process still waits for its app."""
    with _lock:
        return len(_pending_extensions) > 0


def note_bound_app(app: Any, config: dict[str, Any], instance_path: Optional[str]) -> None:
    """Remember the app an extension was initialised with, for controllers created later."""
    global _bound
    with _lock:
        _bound = (weakref.ref(app), config, instance_path)


def bound_app() -> Optional[tuple[Any, dict[str, Any], Optional[str]]]:
    """The last app an extension was initialised with (if it still exists), its MPC_* settings and instance folder."""
    with _lock:
        bound = _bound
    if bound is None:
        return None
    app = bound[0]()
    return None if app is None else (app, bound[1], bound[2])
