"""Callback delivery: a JSON POST to ``callback_url`` when a task starts and when it ends.

Deliveries run on a small thread pool of their own, with retries and backoff, so a
slow or dead receiver never holds up dispatch or a controlling thread.
"""
from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from . import defaults


class CallbackSender:
    """Posts task events to one URL."""

    def __init__(self, url: str, logger: logging.Logger, attempts: int = defaults.CALLBACK_ATTEMPTS,
                 backoff: float = defaults.CALLBACK_BACKOFF, timeout: float = defaults.CALLBACK_TIMEOUT) -> None:
        self.url = url
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self._logger = logger
        # Guards _pool creation and _closing.
        self._lock = threading.Lock()
        self._pool: Optional[ThreadPoolExecutor] = None
        self._closing = threading.Event()

    def send(self, event: str, task: dict) -> None:
        """Queue one delivery of ``{"event", "uuid", "msg", "task"}``; returns at once."""
        body = {"event": event, "uuid": task["uuid"], "msg": task.get("msg"), "task": task}
        with self._lock:
            if self._closing.is_set():
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mpc-callback")
            self._pool.submit(self._deliver, body)

    def _deliver(self, body: dict) -> None:
        data = json.dumps(body).encode()
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            request = urllib.request.Request(self.url, data=data, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    if response.status < 300:
                        return
            except (urllib.error.URLError, OSError, ValueError) as exc:
                self._logger.warning("Callback %s for task %s failed (attempt %d/%d): %s",
                                     body["event"], body["uuid"], attempt, self.attempts, exc)
            if attempt < self.attempts and self._closing.wait(delay):
                break
            delay *= 2
        self._logger.error("Callback %s for task %s to %s was not delivered.", body["event"], body["uuid"], self.url)

    def close(self) -> None:
        """Deliver what is under way (no more retries) and stop the pool."""
        with self._lock:
            self._closing.set()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
