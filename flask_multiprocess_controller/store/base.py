"""The task store contract (version 2).

The store is the single source of truth for tasks: every process that serves the
app reads and writes tasks through it, and the limits of a controller
(``max_num_process``, ``max_num_queue``) are enforced by its atomic operations, so
they hold across processes that share it.

Every write that changes a task's state also writes the task's :class:`~..events.Event`
in the same atomic step and returns it, so the store's change feed (:meth:`TaskStore.changes`)
never misses a change and never shows one that did not happen. Events of the kinds in
:data:`~..events.CALLBACK_KINDS` are also kept in a per-controller outbox until acknowledged,
so that callbacks survive a crash (at least once).

Times written by the store (``started_at``, a default ``ended_at``, heartbeats, ``Event.at``)
come from the store's own clock (:meth:`TaskStore.now`), so leases and orderings do not depend
on the clocks of the hosts that share it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import abc
import re
import time
from typing import Any, Iterable, Optional, Sequence, TypedDict

from .. import defaults
from ..events import Changes, Event
from ..states import TERMINAL


if TYPE_CHECKING:
    from .logbook import LogBook


class Row(TypedDict, total=False):
    """A task as the store keeps it."""

    #: Insertion order (FIFO among equal priorities); assigned by :meth:`TaskStore.enqueue`.
    seq: int
    uuid: str
    controller: str
    #: A :class:`~..states.TaskStatus` value.
    status: str
    #: Lower runs first.
    priority: int
    args: dict[str, Any]
    #: Any JSON value, or None.
    progress: Any
    percent: Optional[float]
    #: Any JSON value, or None.
    result: Any
    error: Optional[dict[str, Any]]
    #: UNIX seconds.
    created_at: float
    started_at: Optional[float]
    ended_at: Optional[float]
    pid: Optional[int]
    #: The child's create time, to recognise a recycled pid.
    pid_created: Optional[float]
    exit_code: Optional[int]
    #: The serving process running the task.
    owner: Optional[str]
    stop_requested: bool
    #: Seconds, or None.
    timeout: Optional[float]
    #: Bytes, or None.
    memory_peak: Optional[int]
    #: Seconds, or None.
    cpu_time: Optional[float]
    attempt: int
    #: Who may see the task, when the controller has a ``tenant=`` hook (None: nobody in particular).
    tenant: Optional[str]


class _AnyTenant:
    """The default of ``list_tasks(tenant=...)``: tasks of every tenant."""

    def __repr__(self) -> str:
        return "ANY_TENANT"


#: List the tasks of every tenant (the default), as opposed to those of tenant None.
ANY_TENANT: Any = _AnyTenant()

#: Every key of a row, in storage order.
COLUMNS = tuple(Row.__annotations__)

#: Columns a caller may set with :meth:`TaskStore.finish`.
MUTABLE_FIELDS = frozenset(
    {
        "progress", "percent", "result", "error", "started_at", "ended_at", "pid", "pid_created",
        "exit_code", "memory_peak", "cpu_time",
    }
)

_TERMINAL = frozenset(s.value for s in TERMINAL)
_COUNTER = re.compile(r"[0-9]{1,18}")


def parse_counter(cursor: str) -> Optional[int]:
    """The integer of a decimal cursor (memory, SQLite), or None when it is not one of ours."""
    return int(cursor) if isinstance(cursor, str) and _COUNTER.fullmatch(cursor) else None


class TaskStore(abc.ABC):
    """Where tasks live. Implementations must be safe to call from many threads.

    ``emitter`` (the owner id of the calling serving process, or None for a client-only
    process) is recorded in the events a write produces.
    """

    #: True when several processes (or hosts) may share one store.
    shared: bool = False
    #: Seconds events (and outbox entries) are kept; :meth:`purge` prunes older ones.
    event_retention: float = defaults.EVENT_RETENTION
    #: The most events kept; :meth:`purge` (Redis: every write) prunes the oldest beyond it.
    max_events: int = defaults.EVENT_STREAM_MAXLEN

    # -- writes that change a task's state: each returns the event(s) it wrote ----------------------

    @abc.abstractmethod
    def enqueue(self, rows: Sequence[Row], max_queued: int, emitter: Optional[str] = None) -> list[Event]:
        """Insert new ``queued`` tasks, all or none; return their ``queued`` events in input order.

        :param rows: complete rows without ``seq``; the ``seq`` assigned here is written into each
            of them, so the caller has the stored rows without reading them back.
        :param max_queued: the most tasks of the controller that may be queued
            afterwards; ``-1`` for no bound.
        :raises QueueFull: when the rows do not fit; nothing is inserted then.
        Atomic: the count and the insert happen in one step. Linear in ``len(rows)``.
        """

    @abc.abstractmethod
    def claim(self, controller: str, owner: str, max_running: int) -> Optional[Row]:
        """Move the next queued task to ``running`` and return it, or return None.

        The next task is the one with the lowest ``(priority, seq)``. Nothing is
        claimed when the controller already has ``max_running`` tasks ``running``
        or ``stopping``. Atomic: two callers never claim the same task, and the
        limit holds across every process sharing the store. ``started_at`` is the
        store's clock inside that atomic step, so it is never earlier than a change
        committed before the claim; ``attempt`` grows by one. No event: the
        ``started`` event comes with the pid (:meth:`start`).
        """

    # ``owner`` fences the writes of a claimed task below: when given, the write only applies
    # while the task is still claimed by that serving process. A process that was paused past
    # its lease (its tasks settled elsewhere, perhaps claimed again) can then never overwrite
    # or finish a run that is no longer its own. They return None, writing nothing, when the
    # task is not active (``running``/``stopping``) or not ``owner``'s.

    @abc.abstractmethod
    def start(self, uuid: str, owner: str, pid: int, pid_created: float) -> Optional[Event]:
        """Record the process of an active task of ``owner``; event ``started``."""

    @abc.abstractmethod
    def progress(self, uuid: str, owner: str, progress: Any, percent: Optional[float]) -> Optional[Event]:
        """Set the progress of an active task of ``owner``; event ``progress``."""

    def finish(self, uuid: str, status: str, owner: Optional[str] = None, emitter: Optional[str] = None,
               **fields: Any) -> Optional[Event]:
        """Move an active task (of ``owner``, if given) to a terminal ``status``; event ``ended``.

        :param fields: :data:`MUTABLE_FIELDS` to set with it. Without ``ended_at`` (or with
            ``ended_at=None``) the store's clock at the change is used.
        :param emitter: defaults to ``owner``.
        :raises ValueError: an unknown field or a status that is not terminal (nothing written).
        Atomic compare-and-set: of two finishers, one gets the event, the other None.
        """
        unknown = set(fields) - MUTABLE_FIELDS
        if unknown:
            raise ValueError(f"finish() cannot set {sorted(unknown)}: only {sorted(MUTABLE_FIELDS)}")
        if status not in _TERMINAL:
            raise ValueError(f"finish() needs a terminal status ({sorted(_TERMINAL)}), not {status!r}")
        if "ended_at" in fields and fields["ended_at"] is None:
            del fields["ended_at"]  # a finished task always has an end time
        return self._finish(uuid, status, owner, owner if emitter is None else emitter, fields)

    @abc.abstractmethod
    def _finish(self, uuid: str, status: str, owner: Optional[str], emitter: Optional[str],
                fields: dict[str, Any]) -> Optional[Event]:
        """:meth:`finish` with checked arguments."""

    @abc.abstractmethod
    def requeue(self, uuid: str, owner: Optional[str] = None, emitter: Optional[str] = None,
                uncount: bool = False) -> Optional[Event]:
        """Put an active task (of ``owner``, if given) back in the queue at its old place; event ``requeued``.

        Its owner, pid, ``started_at`` and stop request are cleared. ``emitter`` defaults to ``owner``.
        :param uncount: the claim is taken back as if it never happened (``attempt`` goes down by one):
            for a task the claiming process gives back without running it.
        """

    @abc.abstractmethod
    def request_stop(self, uuid: str, emitter: Optional[str] = None) -> tuple[Row, Optional[Event]]:
        """Ask a task to stop; return the task afterwards and the event written.

        A queued task becomes ``stopped`` at once (``ended_at`` = the store's clock, event
        ``ended``); a running one ``stopping`` with ``stop_requested`` set (event ``stopping``);
        a ``stopping`` one is returned unchanged, with no event.

        :raises TaskNotFound: unknown uuid.
        :raises TaskAlreadyFinished: the task is in a terminal state.
        Atomic: a task claimed concurrently is either stopped before it starts or
        marked ``stopping``.
        """

    @abc.abstractmethod
    def purge(self, controller: str, ended_before: float, emitter: Optional[str] = None) -> int:
        """Delete the controller's finished tasks that ended before ``ended_before``; return how many.

        Writes a ``purged`` event per task (its row as it was). Also prunes the events (and outbox
        entries) older than :attr:`event_retention` or beyond the newest :attr:`max_events`.
        """

    # -- the change feed --------------------------------------------------------------------------------

    def changes(self, since: Optional[str], timeout: float = 0.0, *, limit: int = 1000) -> Changes:
        """Return the events after the cursor ``since``, oldest first, at most ``limit``.

        When there are none, wait up to ``timeout`` seconds for one. ``since=None`` means
        "from now": no events, and the latest cursor to resume from. ``reset`` is True (with
        the latest cursor and no events) when events after ``since`` were pruned, or when
        ``since`` is not a cursor of this store: the caller must re-read the current state.
        """
        if since is None:
            return Changes([], self.latest_cursor(), False)
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            found = self._changes(since, max(1, limit))
            remaining = deadline - time.monotonic()
            if found.events or found.reset or remaining <= 0:
                return found
            self._wait_for_changes(since, remaining)

    @abc.abstractmethod
    def _changes(self, since: str, limit: int) -> Changes:
        """:meth:`changes` without waiting."""

    @abc.abstractmethod
    def _wait_for_changes(self, since: str, timeout: float) -> None:
        """Return once there may be events after ``since`` (a valid cursor), or after ``timeout`` seconds."""

    @abc.abstractmethod
    def latest_cursor(self) -> str:
        """The cursor of the newest event ever written (what ``changes(None)`` returns)."""

    # -- the callback outbox ----------------------------------------------------------------------------

    @abc.abstractmethod
    def unacked(self, controller: str, limit: int = 100) -> list[Event]:
        """The controller's callback events not acknowledged yet, oldest first."""

    @abc.abstractmethod
    def ack(self, controller: str, cursors: Iterable[str]) -> None:
        """Remove these events from the controller's outbox (unknown cursors are ignored)."""

    # -- reads ------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def get(self, uuid: str) -> Optional[Row]:
        """Return the task with this uuid, or None."""

    @abc.abstractmethod
    def list_tasks(self, controller: str, statuses: Optional[Iterable[str]] = None, limit: int = 100,
                   before: Optional[int] = None, tenant: Any = ANY_TENANT) -> list[Row]:
        """Return the controller's tasks, newest first (by ``seq``), optionally only in ``statuses``.

        :param before: a ``seq``: only older tasks (paging). Costs O(``limit``) on every store
            (with a ``tenant``, in proportion to the tasks skipped on Redis).
        :param tenant: only the tasks stamped with this tenant (None included); every tenant's by default.
        """

    @abc.abstractmethod
    def counts(self, controller: str) -> dict[str, int]:
        """Return how many of the controller's tasks are in each status (absent = 0)."""

    @abc.abstractmethod
    def position(self, row: Row) -> Optional[int]:
        """Return the 1-based place of a queued task in its controller's queue, else None."""

    @abc.abstractmethod
    def active(self, controller: str) -> list[Row]:
        """Return the controller's ``running`` and ``stopping`` tasks (for reconciliation)."""

    # -- the store clock and the serving processes ------------------------------------------------------

    @abc.abstractmethod
    def now(self) -> float:
        """The store's clock, in UNIX seconds."""

    @abc.abstractmethod
    def heartbeat(self, owner: str) -> None:
        """Record that the serving process ``owner`` is alive, at the store's :meth:`now`."""

    @abc.abstractmethod
    def heartbeats(self) -> dict[str, float]:
        """Return the last heartbeat (store clock) of every serving process that has not said goodbye."""

    @abc.abstractmethod
    def forget_owner(self, owner: str) -> None:
        """Drop ``owner``'s heartbeat (it shut down cleanly)."""

    @property
    def logs(self) -> "LogBook":
        """The per-task logs kept in this store (see :mod:`.logbook`)."""
        book = self.__dict__.get("_logbook")
        if book is None:
            book = self.__dict__["_logbook"] = self._make_logbook()
        return book

    @abc.abstractmethod
    def _make_logbook(self) -> "LogBook":
        """This store's :class:`~.logbook.LogBook`."""

    def close(self) -> None:
        """Release connections held by this process."""
