"""Callback delivery: a JSON POST to ``callback_url`` for each ``started`` and ``ended`` event.

The store keeps every such event in an outbox until it is acknowledged, in the same step
as the state change: the process that wrote the event delivers it (exactly once in normal
operation), and the events of a process that died before delivering are delivered by a
survivor or by the next start (at least once across a crash). Each delivery carries the
event's cursor in an ``Idempotency-Key`` header (and as ``cursor`` in the body), so a
receiver can drop repeats. A task queued in a trace (see :mod:`..tracing`) sends its ``traceparent``
header, and the body's ``trace_id`` names the trace.

Deliveries run on one thread of their own, in order, with retries and backoff, so a slow
or dead receiver never holds up dispatch or a controlling thread. The queue is bounded,
and shutdown waits for at most one attempt: what is not delivered then stays in the
outbox for the next start.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any, Callable, Optional

from .. import defaults
from .. import tracing
from ..events import CALLBACK_KINDS, Event
from ..exceptions import StoreError

#: Builds the body of a delivery from an event (the controller presents the task object).
BodyMaker = Callable[[Event], dict[str, Any]]


class CallbackSender:
    """Posts a controller's ``started``/``ended`` events to one URL and acknowledges them in the store.

    :param ack: called with each delivered event (removes it from the store's outbox).
    """

    def __init__(self, url: str, logger: logging.Logger, body: BodyMaker, ack: Callable[[Event], None],
                 attempts: int = defaults.CALLBACK_ATTEMPTS, backoff: float = defaults.CALLBACK_BACKOFF,
                 timeout: float = defaults.CALLBACK_TIMEOUT, capacity: int = defaults.CALLBACK_QUEUE) -> None:
        self.url = url
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self._logger = logger
        self._body = body
        self._ack = ack
        self._queue: "queue.Queue[Optional[Event]]" = queue.Queue(capacity)
        # Guards _thread creation and _closing.
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._closing = threading.Event()
        #: Cursors queued or being delivered, so a recovery sweep does not queue them twice.
        self._pending: set[str] = set()
        self.dropped = 0

    def offer(self, event: Event) -> None:
        """Queue the delivery of ``event`` if it is one callbacks are sent for; returns at once."""
        if event["kind"] not in CALLBACK_KINDS:
            return
        with self._lock:
            if self._closing.is_set() or event["cursor"] in self._pending:
                return
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                self.dropped += 1
                self._logger.error("Callback queue full (%d waiting): the %s callback of task %s stays in the "
                                   "store's outbox for the next start.", self._queue.maxsize, event["kind"],
                                   event["uuid"])
                return
            self._pending.add(event["cursor"])
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mpc-callback", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                if self._deliver(event):
                    self._acknowledge(event)
            except Exception:  # one broken delivery must not end the thread (it stays in the outbox)
                self._logger.exception("Delivering the %s callback of task %s failed.", event["kind"], event["uuid"])
            finally:
                with self._lock:
                    self._pending.discard(event["cursor"])

    def _acknowledge(self, event: Event) -> None:
        try:
            self._ack(event)
        except StoreError as exc:  # delivered again later: the receiver drops it by its key
            self._logger.warning("Could not acknowledge the %s callback of task %s: %s", event["kind"],
                                 event["uuid"], exc)

    def _deliver(self, event: Event) -> bool:
        import urllib.error  # imported here: only a controller with a callback_url needs an HTTP client
        import urllib.request

        data = json.dumps(self._body(event)).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": event["cursor"]}
        traceparent = event["task"].get("traceparent")
        if traceparent:  # the receiver's work joins the trace the task was queued in
            headers[tracing.HEADER] = traceparent
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            if self._closing.is_set() and attempt > 1:
                break
            request = urllib.request.Request(self.url, data=data, method="POST", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    if response.status < 300:
                        return True
            except (urllib.error.URLError, OSError, ValueError) as exc:
                self._logger.warning("Callback %s for task %s failed (attempt %d/%d): %s",
                                     event["kind"], event["uuid"], attempt, self.attempts, exc)
            if attempt < self.attempts and self._closing.wait(delay):
                break
            delay *= 2
        self._logger.error("Callback %s for task %s to %s was not delivered; it stays in the store's outbox.",
                           event["kind"], event["uuid"], self.url)
        return False

    def close(self) -> None:
        """Stop retrying; wait for the attempt under way (at most ``timeout`` s) and end the thread.

        Deliveries still queued are not attempted: they stay in the store's outbox.
        """
        with self._lock:
            self._closing.set()
            thread, self._thread = self._thread, None
        if thread is None:
            return
        left = 0
        while True:  # empty the queue so the sentinel is taken next
            try:
                if self._queue.get_nowait() is not None:
                    left += 1
            except queue.Empty:
                break
        self._queue.put(None)
        thread.join()
        if left:
            self._logger.warning("%d callback(s) not delivered at shutdown stay in the store's outbox.", left)
