"""Task events: every state change of a task, as one record with a cursor in the store's change feed.

A store writes the event of a state change in the same atomic step as the change itself, so the
feed never misses a change and never shows one that did not happen. Everything that reacts to a
task's life (waiters, callbacks, same-host nudges, live views) consumes these records.
"""
from __future__ import annotations

import enum
from typing import Any, NamedTuple, Optional, TypedDict


class EventKind(str, enum.Enum):
    """The names of task events (DESIGN.md §4)."""

    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    STOPPING = "stopping"
    PAUSED = "paused"
    RESUMED = "resumed"
    REQUEUED = "requeued"
    #: A serving process took over a running task whose own serving process ended (see .handover).
    ADOPTED = "adopted"
    ENDED = "ended"
    PURGED = "purged"

    def __str__(self) -> str:
        return self.value


#: Events that are delivered to a controller's ``callback_url`` (through the store's outbox).
CALLBACK_KINDS = frozenset({EventKind.STARTED.value, EventKind.ENDED.value})


class Event(TypedDict):
    """One task event as the change feed returns it."""

    #: Opaque, monotonic within one store: pass it back as ``since`` to read what came after.
    cursor: str
    #: An :class:`EventKind` value.
    kind: str
    uuid: str
    controller: str
    #: UNIX time of the change, on the store's clock.
    at: float
    #: Owner id of the serving process that made the change (None: a client-only process).
    emitter: Optional[str]
    #: What the change touched of the task, as it is after the change: its uuid, controller, status, tenant,
    #: attempt, seq and pid always, and the columns of the change (see :func:`.store.base.event_payload`);
    #: never its arguments or saved state.
    task: dict[str, Any]


class Changes(NamedTuple):
    """What :meth:`TaskStore.changes` returns."""

    #: The events after the cursor given, oldest first.
    events: list[Event]
    #: Where to resume: the cursor of the last event returned, else the cursor given.
    cursor: str
    #: True when events after the cursor given were pruned: re-read the current state.
    reset: bool
