"""The keeper: the thread that heartbeats for a serving process, settles the tasks of dead ones and purges."""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from .. import defaults
from ..exceptions import StoreError

if TYPE_CHECKING:
    from .runtime import Runtime


class Keeper(threading.Thread):
    """Heartbeats for this serving process, settles the tasks of dead ones, purges old tasks."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(name=f"mpc-{runtime.config.name}-keeper", daemon=True)
        self.runtime = runtime
        self._stop_event = threading.Event()
        self._failing: Optional[str] = None

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()

    def run(self) -> None:
        rt = self.runtime
        next_reconcile = time.monotonic() + defaults.RECONCILE_INTERVAL
        next_purge = time.monotonic() + defaults.PURGE_INTERVAL
        while not self._stop_event.wait(defaults.HEARTBEAT_INTERVAL):
            now = time.monotonic()
            drained: dict[str, float] = {}
            # The heartbeat and the drain flags in one store call (one round trip where the store can).
            if not self._attempt("heartbeat", lambda: drained.update(rt.store.heartbeat_and_drained(rt.owner))):
                continue  # the store is down: the other chores would fail the same way
            self._attempt("drain flag", lambda: rt.refresh_host_drained(drained))
            if rt.config.tenant_quota is not None:
                self._attempt("quotas", rt.refresh_quotas)
            if now >= next_reconcile and self._attempt("reconcile", rt.reconcile):
                next_reconcile = now + defaults.RECONCILE_INTERVAL
            if now >= next_purge and self._attempt("purge", rt.purge):
                next_purge = now + defaults.PURGE_INTERVAL

    def _attempt(self, what: str, chore: Any) -> bool:
        """Run one chore; a store failure is logged once per outage, not once per round."""
        rt = self.runtime
        try:
            chore()
        except StoreError as exc:
            if self._failing is None:
                rt.logger.warning("Store housekeeping (%s) failed: %s; retrying every %g s.", what, exc,
                                  defaults.HEARTBEAT_INTERVAL)
                self._failing = what
            return False
        except Exception:  # a bug in a chore must not end the keeper either
            rt.logger.exception("Store housekeeping (%s) failed.", what)
            return False
        if self._failing is not None:
            rt.logger.warning("Store housekeeping works again.")
            self._failing = None
        return True
