"""How a serving process ends: signals and the exit hook that shut its controllers down.

SIGTERM (a gunicorn graceful stop, a ``systemctl stop``, a dev server told to stop) makes the process exit
normally, so that its controllers are shut down by the exit hook: their running tasks are handed over (see
:mod:`.handover`). Ctrl-C (SIGINT), or gunicorn's quick stop (SIGQUIT), marks the exit as one that stops
the running tasks instead: a developer who presses Ctrl-C expects the tasks to end with the server.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable

from .handover import HANDOVER_ON_SIGINT_ENV

if TYPE_CHECKING:
    from ..controller import MetaMPController

#: Set when the process got Ctrl-C (SIGINT) or a quick-exit signal: its exit stops the running tasks
#: rather than handing them over (a developer who presses Ctrl-C expects the tasks to end with the server).
_stop_tasks_at_exit = False


def _stop_tasks_when_interrupted(previous: Any) -> Callable[[int, Any], None]:
    """A handler for SIGINT or SIGQUIT that marks the exit as one that stops tasks, then does what ``previous`` did."""
    def handler(signum: int, frame: Any) -> None:
        global _stop_tasks_at_exit
        if os.environ.get(HANDOVER_ON_SIGINT_ENV, "").lower() not in ("1", "true", "yes"):
            _stop_tasks_at_exit = True
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    handler._mpc = True  # type: ignore[attr-defined]
    return handler


def stop_claiming_everywhere() -> None:
    """Tell every runtime of the process to claim no more tasks (flags only: safe in a signal handler)."""
    for controller in list(LIVE):
        runtime = controller.local_runtime()
        if runtime is not None:
            runtime.stop_claiming()


def _raise_system_exit(signum: int, frame: object) -> None:
    stop_claiming_everywhere()
    # Once: a second SIGTERM (a supervisor repeating itself) must not cut the graceful shutdown short.
    signal.signal(signal.SIGTERM, lambda *_: None)
    raise SystemExit(128 + signum)


def exit_cleanly_on_sigterm() -> None:
    """On SIGTERM, stop claiming tasks at once, and end the process through a normal exit.

    By default SIGTERM kills a Python process without running ``atexit``: the dev
    server would leave its running tasks unrecorded. Like the default SIGINT handler
    (which raises KeyboardInterrupt), the handler installed where nobody set one unwinds
    the main thread. A handler set before (a gunicorn worker's, which exits normally
    too, but only after its accept loop notices) is kept and called after the runtimes
    stopped claiming: a worker that is going away must not take a queued task that a
    sibling's stopping task just made room for.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGQUIT):
        before = signal.getsignal(signum)
        if (callable(before) or signum == signal.SIGINT and before == signal.SIG_DFL) and not getattr(
                before, "_mpc", False):
            signal.signal(signum, _stop_tasks_when_interrupted(before))
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_system_exit)
    elif callable(previous) and previous is not _raise_system_exit and not getattr(previous, "_mpc", False):
        def chained(signum: int, frame: Any) -> None:
            stop_claiming_everywhere()
            previous(signum, frame)

        chained._mpc = True  # type: ignore[attr-defined]
        signal.signal(signal.SIGTERM, chained)


#: Controllers not yet shut down, to be shut down when the interpreter exits.
LIVE: "weakref.WeakSet[MetaMPController]" = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    """At the exit of the process: hand the running tasks over (see :mod:`.handover`), unless Ctrl-C ended it."""
    for controller in list(LIVE):
        try:
            controller.shutdown(hand_over=not _stop_tasks_at_exit)
        except Exception:  # at exit, one failure must not keep the others running
            logging.getLogger(__name__).exception("Shutting down controller %s failed.", controller.name)
