"""One path for a controller's task events in one serving process.

Events of writes made by this process are handed to the subscribers at once, in the
writing thread; events written by other processes or hosts arrive through the store's
change feed, which one follower thread per runtime reads (blocking, so a waiter on
another host wakes within milliseconds and no request thread polls the store). Waiters,
running tasks (stop requests, ownership) and callbacks subscribe here. None of them acts on another
process's ``progress`` events, the most frequent by far: the follower does not read them (live views
read the feed themselves, see :mod:`..http.sse`).
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Optional

from .. import defaults
from ..events import Changes, Event
from ..exceptions import StoreError
from .retrier import GaveUp, Retrier
from ..store import TaskStore

Subscriber = Callable[[Event], None]

#: Cursors of events this process dispatched itself, remembered so the feed does not repeat them.
_RECENT = 4096
#: Seconds between two interruptions of the follower's wait while it is being stopped.
_STOP_LOOK = 0.05


class EventHub:
    """Dispatches the task events of one controller to this process's subscribers.

    :param on_reset: called when the feed lost events (pruned before they were read):
        whoever relies on events must re-read the current state.
    """

    def __init__(self, store: TaskStore, controller: str, logger: logging.Logger,
                 on_reset: Callable[[], None]) -> None:
        self.store = store
        self.controller = controller
        self._logger = logger
        self._on_reset = on_reset
        self._subscribers: list[Subscriber] = []
        self._local_subscribers: list[Subscriber] = []
        # Guards _recent and _recent_order.
        self._recent_lock = threading.Lock()
        self._recent: set[str] = set()
        self._recent_order: collections.deque[str] = collections.deque()
        self._stop = threading.Event()
        self._retrier = Retrier(logger, self._stop)
        self._thread: Optional[threading.Thread] = None
        #: Whether this hub follows the feed (a shared store, started and not stopped).
        self._following = False
        # Guards _cursor and the reading of the feed from it (the follower, or catch_up()).
        self._reading = threading.Lock()
        self._cursor: Optional[str] = None

    def subscribe(self, subscriber: Subscriber, local_only: bool = False) -> None:
        """Call ``subscriber`` with every event of the controller from now on (before :meth:`start`).

        :param local_only: only the events this runtime wrote itself (those it must act on alone,
            such as delivering callbacks).
        """
        (self._local_subscribers if local_only else self._subscribers).append(subscriber)

    def start(self, thread: bool = True) -> None:
        """Follow the store's feed from its current end (only a shared store has other writers).

        :param thread: read the feed in a follower thread; False: only when :meth:`step` (or
            :meth:`catch_up`) is called, so that a caller can drive the hub one read at a time.
        """
        if not self.store.shared:
            return
        self._cursor = self._retrier.call("reading the change feed", self.store.latest_cursor,
                                          give_up_at_stop=False)
        self._following = True
        if not thread:
            return
        self._thread = threading.Thread(target=self._follow, name=f"mpc-{self.controller}-events", daemon=True)
        self._thread.start()

    def publish(self, event: Optional[Event]) -> None:
        """Dispatch an event this process has just written (None: the write changed nothing)."""
        if event is None:
            return
        if self._following:
            with self._recent_lock:
                self._recent.add(event["cursor"])
                self._recent_order.append(event["cursor"])
                while len(self._recent_order) > _RECENT:
                    self._recent.discard(self._recent_order.popleft())
        self._dispatch(event, self._subscribers + self._local_subscribers)

    def publish_all(self, events: list[Event]) -> None:
        """:meth:`publish` each of ``events`` in order."""
        for event in events:
            self.publish(event)

    def _seen_here(self, cursor: str) -> bool:
        with self._recent_lock:
            return cursor in self._recent

    def _dispatch(self, event: Event, subscribers: list[Subscriber]) -> None:
        for subscriber in subscribers:
            try:
                subscriber(event)
            except Exception:  # one consumer's failure must not starve the others
                self._logger.exception("Handling task event %s of %s failed.", event["kind"], event["uuid"])

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self.step(defaults.FEED_FOLLOW_WAIT)
            except GaveUp:
                return

    def step(self, wait: float) -> None:
        """One read of the follower: wait up to ``wait`` seconds (> 0) for other processes' events, riding out
        a store outage, and dispatch them (and a reset) in this thread.

        :raises GaveUp: the hub was stopped while the store was failing.
        """
        self._read(wait)

    def catch_up(self) -> None:
        """Read and dispatch, in this thread, the events of other processes written so far."""
        if not self._following:
            return
        try:
            self._read(0.0)
        except StoreError:  # the follower catches up once the store is back
            pass

    def _read(self, wait: float) -> None:
        if wait > 0:
            # The wait holds no lock, so that catch_up() reads at once. When it read meanwhile, what was
            # found here is dropped: the next read starts where catch_up() got (and finds the rest at once).
            cursor = self._cursor
            changes = self._retrier.call("reading the change feed",
                                         lambda: self.store.changes(cursor, wait, foreign_only=True,
                                                                    without_progress=True))
            with self._reading:
                if self._cursor == cursor:
                    self._take(changes)
            return
        with self._reading:
            self._take(self.store.changes(self._cursor, 0.0, without_progress=True))

    def _take(self, changes: Changes) -> None:
        """Move past ``changes`` and dispatch them (the caller holds ``_reading``)."""
        self._cursor = changes.cursor
        if changes.reset:
            self._logger.warning("Task events were pruned before this process read them; "
                                 "re-reading the current state.")
            self._on_reset()
        for event in changes.events:
            if event["controller"] == self.controller and not self._seen_here(event["cursor"]):
                self._dispatch(event, self._subscribers)

    def lag(self, own: Optional[str] = None) -> Optional[float]:
        """Seconds this process's follower is behind the store's change feed, for ``<prefix>/metrics``.

        The age (store clock) of the oldest event after the follower's cursor that another process wrote (of
        the kinds it reads: not ``progress``)
        (``own``: this process's emitter id, whose events it dispatched already); 0 when it has read them
        all; None when it follows no feed (a store of one process, or not started) or its next read finds the
        events after its cursor pruned (it then re-reads the current state). One read of at most
        100 events: when all of them are this process's own, the oldest one's age is given.

        :raises StoreError: the store could not be read.
        """
        cursor = self._cursor
        if not self._following or cursor is None:
            return None
        changes = self.store.changes(cursor, 0.0, limit=100, without_progress=True)
        if changes.reset:  # events were pruned before the follower read them: it re-reads the state next
            return None
        if not changes.events:
            return 0.0
        foreign = [event for event in changes.events if own is None or event["emitter"] != own]
        if not foreign and len(changes.events) < 100:
            return 0.0
        oldest = (foreign or changes.events)[0]
        return max(0.0, self.store.now() - oldest["at"])

    def stop(self) -> None:
        """Stop following the feed: the follower's wait is interrupted, and the thread joined."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():  # again, in case the follower was not waiting yet
                try:
                    self.store.interrupt_waits()
                except StoreError:  # the store is down: the follower gives up at its next retry
                    pass
                self._thread.join(_STOP_LOOK)
            self._thread = None
        self._following = False
