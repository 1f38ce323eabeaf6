"""Server-Sent Events of task events: one feed reader per store and process, fanned out to every client.

Each connected client gets the events its request may see (its controllers, its tenant), each as
``id: <cursor>``, ``event: <kind>``, ``data: <the task object>``. A client that reconnects with
``Last-Event-ID`` first gets what it missed from the store's durable feed, then the live events;
a cursor older than the feed keeps gets a ``reset`` event (re-read the current state). Idle
clients cost nothing: they wait on their own queue, fed by the one reader thread, and a comment
line every ``HEARTBEAT`` seconds keeps proxies from closing the stream. The stream ends itself
after ``max_wait`` seconds (the long-lived-response cap), and EventSource reconnects.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from .. import defaults
from ..events import Event
from ..engine.retrier import GaveUp, Retrier
from ..store import TaskStore

if TYPE_CHECKING:
    from ..controller import MetaMPController

#: Seconds between two comment lines on an idle stream.
HEARTBEAT = 10.0
#: Events one slow client may have waiting; past it the client is told to re-read (a ``reset``).
CLIENT_BACKLOG = 1000

_logger = logging.getLogger(__name__)


class Broadcaster:
    """Reads one store's change feed on one thread and hands each event to every subscribed queue."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        # Guards _queues, _thread and cursor.
        self._lock = threading.Lock()
        self._queues: set["queue.Queue[Optional[Event]]"] = set()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        #: The feed cursor the reader has reached.
        self.cursor: Optional[str] = None

    def subscribe(self) -> "queue.Queue[Optional[Event]]":
        """A queue that receives every event from now on (None: events were lost, re-read)."""
        mine: "queue.Queue[Optional[Event]]" = queue.Queue(CLIENT_BACKLOG)
        with self._lock:
            self._queues.add(mine)
            if self._thread is None:
                self.cursor = self.store.latest_cursor()
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._read, args=(self._stop,), name="mpc-sse", daemon=True)
                self._thread.start()
        return mine

    def unsubscribe(self, mine: "queue.Queue[Optional[Event]]") -> None:
        """Stop sending to ``mine``; the reader thread ends with its last client."""
        with self._lock:
            self._queues.discard(mine)
            thread = None
            if not self._queues and self._thread is not None:
                thread, self._thread = self._thread, None
                self._stop.set()
        if thread is not None:
            thread.join()

    def _read(self, stop: threading.Event) -> None:
        retrier = Retrier(_logger, stop)
        while not stop.is_set():
            cursor = self.cursor
            try:
                changes = retrier.call("reading the change feed", lambda: self.store.changes(cursor, defaults.FEED_WAIT))
            except GaveUp:
                return
            with self._lock:
                self.cursor = changes.cursor
                queues = list(self._queues)
            for mine in queues:
                for item in ([None] if changes.reset else changes.events):
                    try:
                        mine.put_nowait(item)
                    except queue.Full:  # a client too slow to keep up re-reads the state
                        _clear(mine)
                        mine.put_nowait(None)
                        break


def _clear(mine: "queue.Queue[Any]") -> None:
    while True:
        try:
            mine.get_nowait()
        except queue.Empty:
            return


#: Broadcasters by store identity, shared by every request of the process.
_broadcasters: dict[int, Broadcaster] = {}
_broadcasters_lock = threading.Lock()


def broadcaster_for(store: TaskStore) -> Broadcaster:
    """The process's broadcaster of ``store``."""
    with _broadcasters_lock:
        found = _broadcasters.get(id(store))
        if found is None or found.store is not store:
            found = _broadcasters[id(store)] = Broadcaster(store)
        return found


def message(kind: str, data: Any, event_id: Optional[str] = None) -> str:
    """One SSE message."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n"


def stream(controllers: list["MetaMPController"], view: Callable[["MetaMPController", Event], Optional[dict[str, Any]]],
           last_id: Optional[str], max_wait: float) -> Iterator[str]:
    """The SSE stream of the controllers' events (all sharing the first one's store), ended after ``max_wait``.

    :param view: the task object a client may see of an event, or None to leave it out.
    """
    by_name = {c.name: c for c in controllers}
    store = controllers[0].store
    hub = broadcaster_for(store)
    mine = hub.subscribe()
    deadline = time.monotonic() + max_wait
    try:
        yield "retry: 1000\n\n"
        sent: set[str] = set()
        if last_id:
            changes = store.changes(last_id, 0.0, limit=CLIENT_BACKLOG)
            if changes.reset:
                yield message("reset", {})
            for event in changes.events:
                sent.add(event["cursor"])
                yield from _one(event, by_name, view)
        next_beat = time.monotonic() + HEARTBEAT
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            try:
                live = mine.get(timeout=max(0.0, min(deadline, next_beat) - now))
            except queue.Empty:
                yield ": keep-alive\n\n"
                next_beat = time.monotonic() + HEARTBEAT
                continue
            if live is None:
                yield message("reset", {})
            elif live["cursor"] not in sent:
                yield from _one(live, by_name, view)
    finally:
        hub.unsubscribe(mine)


def _one(event: Event, by_name: dict[str, "MetaMPController"],
         view: Callable[["MetaMPController", Event], Optional[dict[str, Any]]]) -> Iterator[str]:
    controller = by_name.get(event["controller"])
    if controller is None:
        return
    data = view(controller, event)
    if data is not None:
        yield message(event["kind"], data, event["cursor"])
