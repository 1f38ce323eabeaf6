"""The task store contract.

The store is the single source of truth for tasks: every process that serves the
app reads and writes tasks through it, and the limits of a controller
(``max_num_process``, ``max_num_queue``) are enforced by its atomic operations, so
they hold across processes that share it.

A task is a plain ``dict`` (a *row*) with these keys:

``uuid``, ``controller``, ``status`` (a :class:`~..states.TaskStatus` value),
``priority`` (int, lower runs first), ``seq`` (int, insertion order, FIFO among
equal priorities), ``args`` (dict), ``progress`` (JSON value or None),
``percent`` (float or None), ``result`` (JSON value or None), ``error`` (dict or
None), ``created_at``, ``started_at``, ``ended_at`` (UNIX seconds or None),
``pid``, ``pid_created`` (the child's create time, to recognise a recycled pid),
``exit_code``, ``owner`` (the serving process running it), ``stop_requested``
(bool), ``timeout`` (seconds or None), ``memory_peak`` (bytes or None),
``cpu_time`` (seconds or None), ``attempt`` (int).
"""
from __future__ import annotations

import abc
from typing import Any, Iterable, Optional, Sequence

Row = dict  # a task row, see the module docstring

#: Every key of a row, in storage order.
COLUMNS = (
    "seq", "uuid", "controller", "status", "priority", "args", "progress", "percent", "result", "error",
    "created_at", "started_at", "ended_at", "pid", "pid_created", "exit_code", "owner", "stop_requested",
    "timeout", "memory_peak", "cpu_time", "attempt",
)

#: Columns a caller may set with :meth:`TaskStore.update` and :meth:`TaskStore.finish`.
MUTABLE_FIELDS = frozenset(
    {
        "progress", "percent", "result", "error", "started_at", "ended_at", "pid", "pid_created",
        "exit_code", "memory_peak", "cpu_time",
    }
)


class TaskStore(abc.ABC):
    """Where tasks live. Implementations must be safe to call from many threads."""

    #: True when several processes (or hosts) may share one store.
    shared: bool = False

    @abc.abstractmethod
    def enqueue(self, rows: Sequence[Row], max_queued: int) -> None:
        """Insert new ``queued`` tasks, all or none.

        :param rows: complete rows without ``seq``; the ``seq`` assigned here is written into each
            of them, so the caller has the stored rows without reading them back.
        :param max_queued: the most tasks of the controller that may be queued
            afterwards; ``-1`` for no bound.
        :raises QueueFull: when the rows do not fit; nothing is inserted then.
        Atomic: the count and the insert happen in one transaction.
        """

    @abc.abstractmethod
    def claim(self, controller: str, owner: str, max_running: int, now: float) -> Optional[Row]:
        """Move the next queued task to ``running`` and return it, or return None.

        The next task is the one with the lowest ``(priority, seq)``. Nothing is
        claimed when the controller already has ``max_running`` tasks ``running``
        or ``stopping``. Atomic: two callers never claim the same task, and the
        limit holds across every process sharing the store.
        """

    @abc.abstractmethod
    def get(self, uuid: str) -> Optional[Row]:
        """Return the task with this uuid, or None."""

    @abc.abstractmethod
    def list_tasks(self, controller: str, statuses: Optional[Iterable[str]] = None, limit: int = 100) -> list[Row]:
        """Return the controller's tasks, newest first, optionally only in ``statuses``."""

    @abc.abstractmethod
    def counts(self, controller: str) -> dict[str, int]:
        """Return how many of the controller's tasks are in each status (absent = 0)."""

    @abc.abstractmethod
    def position(self, row: Row) -> Optional[int]:
        """Return the 1-based place of a queued task in its controller's queue, else None."""

    # ``owner`` fences the three writes below: when given, the write only applies while
    # the task is still claimed by that serving process. A process that was paused past
    # its lease (its tasks settled elsewhere, perhaps claimed again) can then never
    # overwrite or finish a run that is no longer its own.

    @abc.abstractmethod
    def update(self, uuid: str, owner: Optional[str] = None, **fields: Any) -> bool:
        """Set :data:`MUTABLE_FIELDS` of a task that is still ``running`` or ``stopping``.

        Returns False, changing nothing, when the task is not active (or not ``owner``'s).
        """

    @abc.abstractmethod
    def finish(self, uuid: str, status: str, owner: Optional[str] = None, **fields: Any) -> bool:
        """Move a ``running``/``stopping`` task (of ``owner``, if given) to a terminal ``status``.

        Returns False, changing nothing, when the task is not active any more
        (another process reconciled it first). Atomic compare-and-set.
        """

    @abc.abstractmethod
    def requeue(self, uuid: str, owner: Optional[str] = None) -> bool:
        """Put an active task (of ``owner``, if given) back in the queue at its old place."""

    @abc.abstractmethod
    def request_stop(self, uuid: str, now: float) -> Row:
        """Ask a task to stop and return the task afterwards.

        A queued task becomes ``stopped`` at once; a running one ``stopping`` with
        ``stop_requested`` set; a ``stopping`` one is returned unchanged.

        :raises TaskNotFound: unknown uuid.
        :raises TaskAlreadyFinished: the task is in a terminal state.
        Atomic: a task claimed concurrently is either stopped before it starts or
        marked ``stopping``.
        """

    @abc.abstractmethod
    def stop_requests(self, uuids: Iterable[str]) -> set[str]:
        """Return those of ``uuids`` whose stop has been requested."""

    @abc.abstractmethod
    def active(self, controller: str) -> list[Row]:
        """Return the controller's ``running`` and ``stopping`` tasks (for reconciliation)."""

    @abc.abstractmethod
    def purge(self, controller: str, ended_before: float) -> int:
        """Delete the controller's finished tasks that ended before ``ended_before``; return how many."""

    @abc.abstractmethod
    def heartbeat(self, owner: str, now: float) -> None:
        """Record that the serving process ``owner`` is alive at ``now``."""

    @abc.abstractmethod
    def heartbeats(self) -> dict[str, float]:
        """Return the last heartbeat of every serving process that has not said goodbye."""

    @abc.abstractmethod
    def forget_owner(self, owner: str) -> None:
        """Drop ``owner``'s heartbeat (it shut down cleanly)."""

    def close(self) -> None:
        """Release connections held by this process."""
