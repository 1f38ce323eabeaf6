"""Threads waiting for particular tasks to end, woken one task at a time.

A task that ends wakes only the threads waiting for it, so many concurrent waiters do not all
re-read the store on every ending (the cost grew with waiters times endings). A thread waiting
for a whole batch is woken once, when the last of its tasks ends, not at each ending.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional, Protocol


class _Watcher(Protocol):
    def set(self) -> None: ...


class Ended(threading.Event):
    """Set when a watched task ends; :attr:`task` is then its row as the ending wrote it (None when
    woken for another reason: the caller re-reads the store)."""

    def __init__(self) -> None:
        super().__init__()
        self.task: Optional[dict[str, Any]] = None


class Countdown:
    """Waits for a set of tasks to end: :attr:`done` is set once every one of them has ended
    (or when everything must be re-read, :meth:`Waiters.wake_all`)."""

    def __init__(self, uuids: Iterable[str]) -> None:
        # Guards _pending and _ended.
        self._lock = threading.Lock()
        self._pending = set(uuids)
        #: Every uuid reported ended: an ending reported before a re-read is not waited for again.
        self._ended: set[str] = set()
        self.done = threading.Event()

    def ended(self, uuid: str) -> None:
        """``uuid`` has ended."""
        with self._lock:
            self._ended.add(uuid)
            self._pending.discard(uuid)
            if not self._pending:
                self.done.set()

    def still_pending(self, uuids: Iterable[str]) -> None:
        """A read found these tasks not ended yet: wait for them (those reported ended meanwhile excepted)."""
        with self._lock:
            self._pending = set(uuids) - self._ended
            if not self._pending:
                self.done.set()


class _Member:
    """One task of a :class:`Countdown`, as :class:`Waiters` holds it."""

    def __init__(self, countdown: Countdown, uuid: str) -> None:
        self.countdown = countdown
        self.uuid = uuid

    def set(self) -> None:
        self.countdown.ended(self.uuid)


class Waiters:
    """Events by task uuid; :meth:`watch` registers one before the caller reads the task, so an
    ending between that read and the wait is never missed."""

    def __init__(self) -> None:
        # Guards _events.
        self._lock = threading.Lock()
        self._events: dict[str, list[_Watcher]] = {}

    def _add(self, uuid: str, watcher: _Watcher) -> None:
        with self._lock:
            self._events.setdefault(uuid, []).append(watcher)

    def _remove(self, uuid: str, watcher: _Watcher) -> None:
        with self._lock:
            events = self._events.get(uuid)
            if events is not None:
                try:
                    events.remove(watcher)
                except ValueError:
                    pass
                if not events:
                    del self._events[uuid]

    @contextmanager
    def watch(self, uuid: str) -> Iterator[Ended]:
        """An event set when ``uuid`` ends (or :meth:`wake_all` is called) while the block runs."""
        event = Ended()
        self._add(uuid, event)
        try:
            yield event
        finally:
            self._remove(uuid, event)

    @contextmanager
    def watch_all(self, uuids: Iterable[str]) -> Iterator[Countdown]:
        """A :class:`Countdown` of ``uuids``, registered before the caller reads the tasks."""
        wanted = list(dict.fromkeys(uuids))
        countdown = Countdown(wanted)
        members = [_Member(countdown, uuid) for uuid in wanted]
        for member in members:
            self._add(member.uuid, member)
        try:
            yield countdown
        finally:
            for member in members:
                self._remove(member.uuid, member)

    def wake(self, uuid: str, task: Optional[dict[str, Any]] = None) -> None:
        """Wake the threads waiting for ``uuid``; ``task`` is its row as its ``ended`` event carries it
        (the whole task but its arguments, which never change: a waiter has them from its own read)."""
        with self._lock:
            events = list(self._events.get(uuid, ()))
        for event in events:
            if isinstance(event, Ended):
                event.task = task
            event.set()

    def wake_all(self) -> None:
        """Wake every waiting thread (tasks settled in bulk, or the controller closing)."""
        with self._lock:
            events = [event for events in self._events.values() for event in events]
        for event in events:
            if isinstance(event, Ended):
                event.task = None  # re-read: the row may have changed since
            (event.countdown.done if isinstance(event, _Member) else event).set()
