"""Server-Sent Events of task events: one feed reader per store and process, fanned out to every client;
and the limits every stream of the extension keeps (the event stream, log follows).

Each connected client gets the events its request may see (its controllers, its tenant), each as
``id: <cursor>``, ``event: <kind>``, ``data: <the task object>``. A client that reconnects with
``Last-Event-ID`` first gets what it missed from the store's durable feed (one read, filtered by
tenant in the store and bounded in bytes: when more is left, the stream ends after it and the
client comes back at once for the rest), then the live events; a cursor older than the feed keeps
gets a ``reset`` event (re-read the current state). Idle clients cost nothing: they wait on their
own queue, fed by the one reader thread, and a comment line every ``HEARTBEAT`` seconds keeps
proxies from closing the stream.

No client holds a worker thread beyond a bound, whether or not it reads: each write to its socket
may block ``MPC_STREAM_SEND_TIMEOUT`` seconds at most, never past the stream's end; the stream ends
after ``MPC_MAX_WAIT`` (the long-lived-response cap), or as soon as more than ``MPC_STREAM_BUFFER``
bytes of events wait for the client, and EventSource reconnects with ``Last-Event-ID``. A process
serves ``MPC_MAX_STREAMS`` streams at once; more are answered 503 (:class:`~..exceptions.TooManyStreams`).

WSGI gives an application no write timeout, so :func:`paced` sets one on the client's socket when
the server exposes it (gunicorn's ``gunicorn.socket``, werkzeug's ``werkzeug.socket``) before each
piece it hands to the server. Elsewhere the deadline and the byte budget still end the stream, but
a write already blocked waits for the server's own timeouts.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional

from .. import defaults
from ..events import Event
from ..engine.retrier import GaveUp, Retrier
from ..exceptions import TooManyStreams
from ..store import TaskStore
from ..store.base import ANY_TENANT

if TYPE_CHECKING:
    from flask import Flask

    from ..controller import MetaMPController

#: Seconds between two comment lines on an idle stream.
HEARTBEAT = 10.0
#: Events one replay reads at most (besides its bytes, ``MPC_STREAM_BUFFER``).
REPLAY_LIMIT = 1000
#: Seconds the last write of a stream may block (the one started just before its end, and the end of the
#: response the server writes after it): a stream ends within about that of ``MPC_MAX_WAIT``.
LAST_WRITE = 0.5

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """The stream settings of an app (see :func:`stream_config`)."""

    #: Streams one process serves at once (``MPC_MAX_STREAMS``).
    max_streams: int
    #: Seconds one write to a client may block (``MPC_STREAM_SEND_TIMEOUT``).
    send_timeout: float
    #: Bytes of events that may wait for one client, and that one replay reads (``MPC_STREAM_BUFFER``).
    buffer: int


def stream_config(config: Mapping[str, Any]) -> StreamConfig:
    """The stream settings of an app's ``config``, checked.

    ``MPC_MAX_STREAMS`` unset (or None) falls back on the ``MPC_MAX_STREAMS`` environment variable,
    then on :data:`~..defaults.MAX_STREAMS`.

    :raises ValueError: a setting that is not a positive number, naming it.
    """
    max_streams = config.get("MPC_MAX_STREAMS")
    if max_streams is None:
        max_streams = os.environ.get(defaults.MAX_STREAMS_ENV) or defaults.MAX_STREAMS
    return StreamConfig(
        max_streams=int(_positive("MPC_MAX_STREAMS", max_streams, int)),
        send_timeout=_positive("MPC_STREAM_SEND_TIMEOUT",
                               config.get("MPC_STREAM_SEND_TIMEOUT", defaults.STREAM_SEND_TIMEOUT), float),
        buffer=int(_positive("MPC_STREAM_BUFFER",
                             config.get("MPC_STREAM_BUFFER", defaults.STREAM_BUFFER), int)))


def _positive(name: str, value: Any, kind: Callable[[Any], Any]) -> Any:
    try:
        if isinstance(value, bool):
            raise ValueError
        converted = kind(value)
        if not converted > 0:  # NaN fails too
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a positive {kind.__name__}, not {value!r}.") from None
    return converted


class StreamSlot:
    """One stream's place in its app's count; :meth:`release` gives it back (once, however often called)."""

    def __init__(self, slots: "StreamSlots") -> None:
        self._slots: Optional[StreamSlots] = slots

    def release(self) -> None:
        """Give the place back (the stream ended, or its response was closed before it began)."""
        with _slots_lock:
            slots, self._slots = self._slots, None
            if slots is not None:
                slots.taken -= 1


class StreamSlots:
    """The streams an app serves in this process right now."""

    def __init__(self) -> None:
        self.taken = 0

    def take(self, limit: int) -> StreamSlot:
        """A place for one more stream.

        :raises TooManyStreams: ``limit`` streams are served already.
        """
        with _slots_lock:
            if self.taken >= limit:
                raise TooManyStreams(limit, defaults.RETRY_AFTER)
            self.taken += 1
        return StreamSlot(self)


_slots_lock = threading.Lock()
_slots_by_app: "weakref.WeakKeyDictionary[Flask, StreamSlots]" = weakref.WeakKeyDictionary()


def stream_slots(app: "Flask") -> StreamSlots:
    """The stream count of ``app`` in this process."""
    with _slots_lock:
        slots = _slots_by_app.get(app)
        if slots is None:
            slots = _slots_by_app[app] = StreamSlots()
        return slots


def paced(lines: Iterator[str], sock: Any, deadline: float, send_timeout: float,
          on_end: Callable[[], None]) -> Iterator[str]:
    """``lines`` as the server should write them to the client's socket ``sock``, until ``deadline``.

    Before each piece goes to the server, the socket's timeout is set so that writing it blocks
    ``send_timeout`` seconds at most and not past ``deadline`` (:data:`LAST_WRITE` at least): a
    client that stops reading makes the server's write fail, and the server drops the connection,
    instead of holding the thread. ``sock`` None (a server that does not expose it, a test
    client): only the deadline applies. ``on_end`` runs when the stream ends, however it ends.
    """
    settimeout = getattr(sock, "settimeout", None)
    try:
        for piece in lines:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if settimeout is not None:
                try:
                    settimeout(max(LAST_WRITE, min(send_timeout, left)))
                except OSError:  # the connection is gone already
                    return
            yield piece
    finally:
        try:
            if settimeout is not None:  # what the server writes after the last piece: the end of the response
                settimeout(min(send_timeout, LAST_WRITE))
        except OSError:
            pass
        close = getattr(lines, "close", None)
        if close is not None:
            close()
        on_end()


#: What :meth:`ClientQueue.get` returns once more than its budget of events waited: the stream ends.
OVERFLOW: Any = object()
#: What :meth:`ClientQueue.get` returns when nothing came in time.
EMPTY: Any = object()


class ClientQueue:
    """The events waiting for one stream client, bounded in bytes.

    An event that would take the waiting bytes past the budget empties the queue and marks it
    overflowed (one event alone may exceed it, so that a large event does not end every stream):
    the client has fallen behind, its stream ends, and it resumes from the store with ``Last-Event-ID``.
    """

    def __init__(self, budget: int, wants: Optional[Callable[[Event], bool]] = None) -> None:
        self.budget = budget
        #: Which events the client may see at all (the others are never queued).
        self.wants = wants
        self._items: collections.deque[tuple[Optional[Event], int]] = collections.deque()
        self._cursors: set[str] = set()
        #: Bytes of JSON of the events waiting.
        self.waiting = 0
        self.overflowed = False
        self._ready = threading.Condition()

    def put(self, event: Event, size: int) -> None:
        """Queue ``event``, of ``size`` bytes of JSON (or overflow)."""
        with self._ready:
            if self.overflowed:
                return
            if self._items and self.waiting + size > self.budget:
                self._items.clear()
                self._cursors.clear()
                self.waiting = 0
                self.overflowed = True
            else:
                self._items.append((event, size))
                self._cursors.add(event["cursor"])
                self.waiting += size
            self._ready.notify()

    def reset(self) -> None:
        """Events were lost: drop what waits and tell the client to re-read (a None)."""
        with self._ready:
            if not self.overflowed:
                self._items.clear()
                self._cursors.clear()
                self._items.append((None, 0))
                self.waiting = 0
                self._ready.notify()

    def get(self, timeout: float) -> Any:
        """The next event, None (events were lost: re-read), :data:`OVERFLOW`, or :data:`EMPTY` after
        ``timeout`` seconds."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._items or self.overflowed, max(0.0, timeout)):
                return EMPTY
            if self.overflowed:
                return OVERFLOW
            return self._pop()

    def skip_to(self, cursor: str) -> bool:
        """When the event ``cursor`` waits here: drop every event before it (a replay sent them) and return
        True."""
        with self._ready:
            if cursor not in self._cursors:
                return False
            while not (self._items[0][0] is not None and self._items[0][0]["cursor"] == cursor):
                self._pop()
            return True

    def _pop(self) -> Optional[Event]:
        event, size = self._items.popleft()
        self.waiting -= size
        if event is not None:
            self._cursors.discard(event["cursor"])
        return event


class Broadcaster:
    """Reads one store's change feed on one thread and hands each event to every subscribed queue."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        # Guards _queues, _thread and cursor.
        self._lock = threading.Lock()
        self._queues: set[ClientQueue] = set()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        #: The feed cursor the reader has reached.
        self.cursor: Optional[str] = None

    def subscribe(self, budget: int = defaults.STREAM_BUFFER,
                  wants: Optional[Callable[[Event], bool]] = None) -> ClientQueue:
        """A queue that receives every event (that ``wants`` accepts) from now on, ``budget`` bytes at
        most."""
        mine = ClientQueue(budget, wants)
        with self._lock:
            self._queues.add(mine)
            if self._thread is None:
                self.cursor = self.store.latest_cursor()
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._read, args=(self._stop,), name="mpc-sse", daemon=True)
                self._thread.start()
        return mine

    def unsubscribe(self, mine: ClientQueue) -> None:
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
                changes = retrier.call("reading the change feed", lambda: self.store.changes(
                    cursor, defaults.FEED_WAIT, max_bytes=defaults.FEED_READ_BYTES))
            except GaveUp:
                return
            with self._lock:
                self.cursor = changes.cursor
                queues = list(self._queues)
            if changes.reset:
                for mine in queues:
                    mine.reset()
                continue
            for event in changes.events:
                size: Optional[int] = None
                for mine in queues:
                    if mine.wants is None or mine.wants(event):
                        if size is None:  # measured once, for every client that wants it
                            size = len(json.dumps(event, default=str))
                        mine.put(event, size)


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
           last_id: Optional[str], deadline: float, *, buffer: int = defaults.STREAM_BUFFER,
           tenants: Optional[Mapping[str, Any]] = None, only: Optional[str] = None) -> Iterator[str]:
    """The SSE stream of the controllers' events (all sharing the first one's store), ended at ``deadline``
    (``time.monotonic()``), or once more than ``buffer`` bytes of events wait for the client.

    :param view: the task object a client may see of an event, or None to leave it out.
    :param tenants: the tenant each controller's events are filtered by (:data:`ANY_TENANT`: none);
        applied before events are queued for the client, and in the store for a replay.
    :param only: the uuid of the one task whose events the client follows (a share link); its other events
        are never queued for it.
    """
    by_name = {c.name: c for c in controllers}
    tenants = dict(tenants) if tenants is not None else {name: ANY_TENANT for name in by_name}
    store = controllers[0].store
    hub = broadcaster_for(store)
    mine = hub.subscribe(buffer, _wanted_by(tenants, only))
    try:
        yield "retry: 1000\n\n"
        replayed: set[str] = set()
        if last_id:
            tenant = _common(tenants.values())
            yield from _replay(store, mine, last_id, deadline, tenant, replayed, by_name, view)
        next_beat = time.monotonic() + HEARTBEAT
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            live = mine.get(timeout=min(deadline, next_beat) - now)
            if live is EMPTY:
                if time.monotonic() >= next_beat:
                    yield ": keep-alive\n\n"
                    next_beat = time.monotonic() + HEARTBEAT
            elif live is OVERFLOW:  # the client fell behind: it resumes from the store with Last-Event-ID
                return
            elif live is None:
                yield message("reset", {})
            elif live["cursor"] not in replayed:
                yield from _one(live, by_name, view)
    finally:
        hub.unsubscribe(mine)


def _replay(store: TaskStore, mine: ClientQueue, last_id: str, deadline: float, tenant: Any,
            replayed: set[str], by_name: dict[str, "MetaMPController"],
            view: Callable[["MetaMPController", Event], Optional[dict[str, Any]]]) -> Iterator[str]:
    """What the client missed after ``last_id``, read from the store until it meets the live events.

    Each read is filtered by ``tenant`` in the store and takes the client's budget of bytes at most
    (``mine.budget``); the replay ends at an event the client's queue holds already (the live events
    go on from there), when the store has nothing more, at ``deadline``, or when the queue overflowed.
    ``replayed`` receives the cursors of the last reads, which the live events must not repeat.
    """
    cursor = last_id
    previous: set[str] = set()
    while time.monotonic() < deadline and not mine.overflowed:
        changes = store.changes(cursor, 0.0, limit=REPLAY_LIMIT, tenant=tenant, max_bytes=mine.budget)
        if changes.reset:
            yield message("reset", {})
            return
        # Only the newest reads may hold events the feed reader has not queued yet: older ones are forgotten.
        # An event counts as replayed once it is handled here, never before: those from the one the queue
        # holds on are the live events' to send.
        replayed.clear()
        replayed.update(previous)
        previous = set()
        shown = cursor
        for event in changes.events:
            if mine.skip_to(event["cursor"]):
                return  # this event and the ones after it wait in the client's queue
            previous.add(event["cursor"])
            replayed.add(event["cursor"])
            for piece in _one(event, by_name, view):
                shown = event["cursor"]
                yield piece
        if changes.cursor == cursor:
            return
        if changes.cursor != shown:
            # The read went past events of other tenants: the client resumes after them (an id-only
            # message sets EventSource's Last-Event-ID and dispatches nothing).
            yield f"id: {changes.cursor}\n\n"
        cursor = changes.cursor


def _wanted_by(tenants: Mapping[str, Any], only: Optional[str] = None) -> Callable[[Event], bool]:
    """Whether a client following the controllers (by name) of ``tenants`` (and task ``only``, if given) may see
    an event at all."""

    def wants(event: Event) -> bool:
        if only is not None and event["uuid"] != only:
            return False
        tenant = tenants.get(event["controller"], _NOBODY)
        if tenant is _NOBODY:
            return False
        return tenant is ANY_TENANT or (event.get("task") or {}).get("tenant") == tenant

    return wants


_NOBODY: Any = object()


def _common(tenants: Any) -> Any:
    """The one tenant all of ``tenants`` are, else :data:`ANY_TENANT` (each event is then filtered after
    the read)."""
    values = list(tenants)
    first = values[0] if values else ANY_TENANT
    return first if all(v is first or (v is not ANY_TENANT and first is not ANY_TENANT and v == first)
                        for v in values) else ANY_TENANT


def _one(event: Event, by_name: dict[str, "MetaMPController"],
         view: Callable[["MetaMPController", Event], Optional[dict[str, Any]]]) -> Iterator[str]:
    controller = by_name.get(event["controller"])
    if controller is None:
        return
    data = view(controller, event)
    if data is not None:
        yield message(event["kind"], data, event["cursor"])
