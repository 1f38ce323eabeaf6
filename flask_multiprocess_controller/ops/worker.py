"""The worker tier: a process that runs the app's tasks and serves no HTTP (``flask mpc worker``).

With the web tier's processes made clients (``MPC_ROLE=client``: they submit, read and stop tasks
but run none) and one or more workers on the same shared store (a SQLite file on one machine, Redis
across hosts), tasks run only in the workers: restarting the web tier never stops one. A worker runs
``slots`` controlling threads per controller (by default ``max_num_process``); ``max_num_process``
stays the limit across every process, enforced by the store.

The worker blocks until SIGTERM or SIGINT and then leaves through the normal exit path: the
controllers' SIGTERM handler raises :class:`SystemExit` and their ``atexit`` hook shuts them down,
as in a web server, so a worker's shutdown is a web server's shutdown.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Optional, Sequence

from .. import registry
from ..exceptions import WorkerRefused

if TYPE_CHECKING:
    from ..controller import MetaMPController


def check_servable(controller: "MetaMPController") -> None:
    """Raise :class:`WorkerRefused` unless a worker process can run ``controller``'s tasks for others."""
    if controller.role != registry.SERVER:
        raise WorkerRefused(f"Controller {controller.name} is a client in this process, so it cannot run "
                            f"tasks: start the worker as `flask mpc worker`, which makes it a server.")
    if not controller.store.shared:
        raise WorkerRefused(f"Controller {controller.name} uses a store that lives in one process only "
                            f"({type(controller.store).__name__}): a worker can only serve a shared store "
                            f"(sqlite:///... on one machine, redis://... across hosts).")


def start(controllers: Sequence["MetaMPController"], slots: Optional[int] = None) -> None:
    """Start the runtime of each controller in this process, ``slots`` controlling threads each (None: its
    ``max_num_process``); log one line per controller. Every controller is checked before any starts.

    :raises WorkerRefused: a controller cannot be served here, or already runs with another slot count.
    """
    if not controllers:
        raise WorkerRefused("There is no controller to serve.")
    for controller in controllers:
        _bind_to_current_app(controller)
        check_servable(controller)
        running = controller.local_runtime()
        if slots is not None and running is not None and running.config.slot_count != slots:
            raise WorkerRefused(f"Controller {controller.name} already runs in this process with "
                                f"{running.config.slot_count} slot(s), not {slots}.")
    for controller in controllers:
        if slots is not None and controller.local_runtime() is None:
            controller.slots = slots
        runtime = controller.runtime
        controller.logger.info(
            "Worker %d on host %s serves controller %s: %d slot(s), at most %d task(s) across every process, "
            "store %s.", os.getpid(), runtime.host, controller.name, runtime.config.slot_count,
            controller.max_num_process, _store_name(controller))
    _name_worker()


def _name_worker() -> None:
    """Name the process ``mpc-worker:<app>`` (see :func:`~..engine.proctree.name_serving_process`)."""
    from flask import current_app, has_app_context

    from ..engine.proctree import name_serving_process

    name_serving_process(current_app.name if has_app_context() else None, worker=True)


def _bind_to_current_app(controller: "MetaMPController") -> None:
    """Give the controller the current app's ``MPC_*`` settings before its store is first looked at
    (a controller made after ``init_app`` would otherwise resolve its store without them)."""
    from flask import current_app, has_app_context

    if has_app_context() and "mpc" in current_app.extensions:
        controller.bind(current_app.extensions["mpc"].settings, current_app.instance_path)


def _store_name(controller: "MetaMPController") -> str:
    from ..http.views import public_store_name

    return public_store_name(controller.store)


def wait_for_exit() -> None:
    """Block until SIGTERM (which ends the process through ``SystemExit``) or SIGINT (which returns).

    SIGTERM gets the controllers' handler (stop claiming, then a normal exit) if nobody set one.
    """
    from ..engine.exit import exit_cleanly_on_sigterm

    exit_cleanly_on_sigterm()
    try:
        if threading.current_thread() is threading.main_thread():
            while True:
                signal.pause()
        else:  # no signal reaches this thread: wait for the process to end
            threading.Event().wait()
    except KeyboardInterrupt:
        return
