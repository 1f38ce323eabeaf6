"""Threads waiting for particular tasks to end, woken one task at a time.

A task that ends wakes only the threads waiting for it, so many concurrent waiters do not all
re-read the store on every ending (the cost grew with waiters times endings).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class Waiters:
    """Events by task uuid; :meth:`watch` registers one before the caller reads the task, so an
    ending between that read and the wait is never missed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, list[threading.Event]] = {}

    @contextmanager
    def watch(self, uuid: str) -> Iterator[threading.Event]:
        """An event set when ``uuid`` ends (or :meth:`wake_all` is called) while the block runs."""
        event = threading.Event()
        with self._lock:
            self._events.setdefault(uuid, []).append(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._events.get(uuid)
                if events is not None:
                    try:
                        events.remove(event)
                    except ValueError:
                        pass
                    if not events:
                        del self._events[uuid]

    def wake(self, uuid: str) -> None:
        """Wake the threads waiting for ``uuid``."""
        with self._lock:
            events = list(self._events.get(uuid, ()))
        for event in events:
            event.set()

    def wake_all(self) -> None:
        """Wake every waiting thread (tasks settled in bulk, or the controller closing)."""
        with self._lock:
            events = [event for events in self._events.values() for event in events]
        for event in events:
            event.set()
