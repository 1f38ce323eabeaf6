"""Fakes for steppable unit tests: a clock that moves only when told, and a change feed of prepared batches."""
from __future__ import annotations

import collections
from typing import Any, Iterable, Optional

from flask_multiprocess_controller.events import Changes, Event


class FakeClock:
    """A clock (UNIX or monotonic seconds) that stands still until :meth:`advance` or :meth:`set`."""

    def __init__(self, start: float = 1_700_000_040.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, moment: float) -> None:
        self.now = moment


def event(cursor: str, kind: str, uuid: str = "task-1", controller: str = "ctl", emitter: Optional[str] = "other",
          at: float = 1_700_000_040.0, **task: Any) -> Event:
    """An event as a store's feed gives it; ``task`` holds the row's fields (status, attempt, ...)."""
    return Event(cursor=cursor, kind=kind, uuid=uuid, controller=controller, at=at, emitter=emitter,
                 task={"uuid": uuid, "controller": controller, **task})


class FeedStore:
    """A shared store that is only a change feed: each ``changes()`` returns the next prepared batch
    (then nothing new), and every call is recorded."""

    shared = True

    def __init__(self, batches: Iterable[Changes] = (), latest: str = "10") -> None:
        self.batches: collections.deque[Changes] = collections.deque(batches)
        self.latest = latest
        #: ``(since, timeout, foreign_only)`` of every ``changes()`` call.
        self.calls: list[tuple[Optional[str], float, bool]] = []
        #: Raised by the next ``changes()`` call, when set.
        self.fail_with: Optional[Exception] = None

    def latest_cursor(self) -> str:
        return self.latest

    def changes(self, since: Optional[str], timeout: float = 0.0, *, limit: int = 1000,
                foreign_only: bool = False, without_progress: bool = False) -> Changes:
        self.calls.append((since, timeout, foreign_only))
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            raise exc
        if self.batches:
            return self.batches.popleft()
        return Changes([], since or self.latest, False)
