"""What a controller asks of its process: the typed interface between the controller and what runs tasks.

A serving process has a :class:`~.runtime.Runtime` for each controller; a client-only process
(``MPC_ROLE=client``) has a :class:`~.clientside.ClientSide`. Both are a :class:`TaskSide`: every action
the controller takes on tasks (submit, stop, pause, resume, re-prioritise, stop all, watch) is one method
here, and each store write and the publication of its event to this process's subscribers (waiters, the
running tasks, callbacks) happen together in :meth:`TaskSide.published`, :meth:`TaskSide.written` or
:meth:`TaskSide.written_all`, not at each call site; the runtime's own writes (claims given back, ends,
retries, requeues, adoptions) go through the same methods.
"""
from __future__ import annotations

import abc
import os
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from ..events import Event
from ..store import TaskStore
from ..store.base import ANY_TENANT, Idempotency, Row
from .waiters import Countdown, Ended

if TYPE_CHECKING:
    from .hub import EventHub
    from .retrier import Retrier
    from .schedules import ScheduleSpec


class TaskSide(abc.ABC):
    """The part of a process that runs (or only submits) one controller's tasks."""

    store: TaskStore
    #: This process in the store (None: a client, whose writes have no owner).
    owner: Optional[str]
    #: The event hub this process's writes are published to.
    events: "EventHub"
    #: True once the side is going away (waits end early).
    closing: bool = False

    def __init__(self) -> None:
        #: The process this side belongs to: a forked copy of a controller makes a side of its own.
        self.pid = os.getpid()

    def published(self, written: tuple[Row, Optional[Event]]) -> Row:
        """Publish the event of a store write made for this process; return the written row."""
        row, event = written
        self.events.publish(event)
        return row

    def written(self, write: Callable[[], Optional[Event]], retrier: Optional["Retrier"] = None,
                doing: str = "", before_publish: Optional[Callable[[Event], None]] = None) -> Optional[Event]:
        """Make a store write that returns its event (None: it changed nothing), publish that event, return it.

        With ``retrier``, the write is retried (as ``doing``) while the store is unreachable, and the event is
        published once, after the write succeeded; :class:`~.retrier.GaveUp` passes through with nothing
        published. ``before_publish`` runs first with the event: for what the subscribers must find already
        recorded when they see it.
        """
        event = write() if retrier is None else retrier.call(doing, write)
        if event is not None:
            if before_publish is not None:
                before_publish(event)
            self.events.publish(event)
        return event

    def written_all(self, write: Callable[[], list[Event]]) -> list[Event]:
        """Make a store write that returns several events, publish them in order, and return them."""
        events = write()
        self.events.publish_all(events)
        return events

    # -- the controller's actions -----------------------------------------------------------

    @abc.abstractmethod
    def submit(self, rows: Sequence[Row], max_queued: int, idempotency: Optional[Idempotency] = None) -> None:
        """Queue new task rows (all or none); with ``idempotency``, as :meth:`TaskStore.enqueue` says (it may
        raise :class:`~..exceptions.IdempotentReplay`, having queued nothing)."""

    def stop(self, uuid: str, finish: bool = False) -> Row:
        """Ask task ``uuid`` to stop (with ``finish``: to finish now, returning its answer so far), wherever it
        runs; return its row afterwards."""
        if finish:
            return self.published(self.store.request_stop(uuid, emitter=self.owner, finish=True))
        return self.published(self.store.request_stop(uuid, emitter=self.owner))

    def pause(self, uuid: str) -> Row:
        """Mark a running task paused (the process that runs it suspends its tree)."""
        return self.published(self.store.pause(uuid, emitter=self.owner))

    def resume(self, uuid: str) -> Row:
        """Mark a paused task running again."""
        return self.published(self.store.resume(uuid, emitter=self.owner))

    def reprioritise(self, uuid: str, priority: int) -> Row:
        """Give a queued task a new priority."""
        return self.published(self.store.reprioritise(uuid, priority, emitter=self.owner))

    def stop_all(self, controller: str, tenant: Any = ANY_TENANT) -> list[Event]:
        """Stop every queued, running and paused task of ``controller`` (of ``tenant``'s only, if given);
        the events written."""
        return self.written_all(lambda: self.store.stop_all(controller, emitter=self.owner, tenant=tenant))

    @abc.abstractmethod
    def watch(self, uuid: str) -> AbstractContextManager[Ended]:
        """An event set when ``uuid`` ends while the block runs."""

    @abc.abstractmethod
    def watch_all(self, uuids: Sequence[str]) -> AbstractContextManager[Countdown]:
        """A countdown of ``uuids`` ending while the block runs."""

    @abc.abstractmethod
    def local_run(self, uuid: str) -> Any:
        """The run of ``uuid`` in this process, if it runs here (its progress is the freshest)."""

    def declare_schedule(self, spec: "ScheduleSpec") -> None:
        """Fire ``spec`` from this process while it holds the schedules' lease (a client fires nothing)."""

    @abc.abstractmethod
    def shutdown(self, timeout: Optional[float] = None, hand_over: bool = False) -> bool:
        """Release everything; True when running tasks were handed over rather than stopped."""
