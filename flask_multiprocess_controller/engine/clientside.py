"""What a client-only process does in place of a runtime: everything through the store.

A process with ``MPC_ROLE=client`` (``flask mpc``, a cron job, a script that only submits)
queues, reads and stops tasks, and waits for them, but never runs one: it starts no fork
server and no controlling thread. Serving processes sharing the store see its changes as
events and act on them (they run what it queued and stop what it stopped); its waits follow
the store's change feed, on one thread started at the first wait.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

from ..events import Event, EventKind
from .hub import EventHub
from .side import TaskSide
from ..store import TaskStore
from ..store.base import Idempotency, Row
from .waiters import Countdown, Ended, Waiters


class ClientSide(TaskSide):
    """The client-only counterpart of :class:`~.runtime.Runtime` for one controller."""

    def __init__(self, store: TaskStore, controller: str, logger: logging.Logger) -> None:
        super().__init__()
        self.store = store
        self._waiters = Waiters()
        self._hub = EventHub(store, controller, logger, on_reset=self._waiters.wake_all)
        self._hub.subscribe(self._on_event)
        #: A client records its changes without an owner: no serving process of its own made them.
        self.owner: Optional[str] = None
        #: Its own writes' events, dispatched here (a client's waits see them at once).
        self.events = self._hub
        # Guards _following.
        self._lock = threading.Lock()
        self._following = False

    def submit(self, rows: Sequence[Row], max_queued: int, idempotency: Optional[Idempotency] = None) -> None:
        """Queue task rows (all or none); a serving process picks them up from the change feed."""
        if idempotency is None:
            self.store.enqueue(rows, max_queued)
        else:
            self.store.enqueue(rows, max_queued, idempotency=idempotency)

    @contextmanager
    def watch(self, uuid: str) -> Iterator[Ended]:
        """An event set when ``uuid`` ends, fed by the store's change feed."""
        with self._lock:
            if not self._following:
                self._hub.start()
                self._following = True
        with self._waiters.watch(uuid) as ended:
            yield ended

    @contextmanager
    def watch_all(self, uuids: Sequence[str]) -> Iterator[Countdown]:
        """A countdown of ``uuids`` ending, fed by the store's change feed."""
        with self._lock:
            if not self._following:
                self._hub.start()
                self._following = True
        with self._waiters.watch_all(uuids) as countdown:
            yield countdown

    def local_run(self, uuid: str) -> Optional[object]:
        """Nothing runs here."""
        return None

    def _on_event(self, event: Event) -> None:
        if event["kind"] == EventKind.ENDED:
            self._waiters.wake(event["uuid"], event["task"])

    def shutdown(self, timeout: Optional[float] = None, hand_over: bool = False) -> bool:
        """Stop following the feed (a client runs no task: there is nothing to hand over)."""
        self._hub.stop()
        self._waiters.wake_all()
        return False
