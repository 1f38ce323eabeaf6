"""The task store contract (version 3).

The store is the single source of truth for tasks: every process that serves the
app reads and writes tasks through it, and the limits of a controller
(``max_num_process``, ``max_num_queue``) are enforced by its atomic operations, so
they hold across processes that share it.

Every write that changes a task's state also writes the task's :class:`~..events.Event`
(what the change touched, never the task's arguments or saved state, see :func:`event_payload`) in the
same atomic step and returns it, so the store's change feed (:meth:`TaskStore.changes`)
never misses a change and never shows one that did not happen. The feed is bounded by count
(:attr:`TaskStore.max_events`) and by bytes (:attr:`TaskStore.max_event_bytes`) as it is written, and by
age (:attr:`TaskStore.event_retention`) at each purge. Events of the kinds in
:data:`~..events.CALLBACK_KINDS` are also kept in a per-controller outbox of their own until acknowledged
or older than the controller's ``callback_max_age`` (:meth:`TaskStore.expire_callbacks`), whatever the
feed's pruning, so that callbacks survive a crash (at least once).

Times written by the store (``started_at``, a default ``ended_at``, heartbeats, ``Event.at``)
come from the store's own clock (:meth:`TaskStore.now`), so leases and orderings do not depend
on the clocks of the hosts that share it.

Version 3 adds the task policies: retries that wait out of the ready queue until their
``retry_at`` (:meth:`TaskStore.retry`), pause and resume (:meth:`TaskStore.pause`), moving a
queued task (:meth:`TaskStore.reprioritise`), stopping everything (:meth:`TaskStore.stop_all`),
leases (:meth:`TaskStore.acquire_lease`) and the state of schedules (:meth:`TaskStore.fire`).

The dashboard's chart reads :meth:`TaskStore.ended_counts`: ended tasks per time slot and status.

Hosts can be drained (:meth:`TaskStore.set_drained`): the store keeps which hosts are, and since
when; the serving processes of a drained host read it and claim no new task.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import abc
import json
import re
import time
import enum
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence, TypedDict

from .. import defaults
from ..events import Changes, Event, EventKind
from ..states import TERMINAL
# Kept importable from here, where they were first defined.
from .schema import COLUMNS as COLUMNS, EVENT_HIDDEN as EVENT_HIDDEN, MUTABLE_FIELDS as MUTABLE_FIELDS
from .claimrules import NO_RULES, ClaimRules
from .schema import event_columns


if TYPE_CHECKING:
    from .logbook import LogBook


class Row(TypedDict, total=False):
    """A task as the store keeps it: the typed view of :data:`.schema.FIELDS` (``tests/test_schema.py``
    checks that the two agree)."""

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
    #: While a failed attempt waits for its retry: when it may run again (store clock); else None.
    retry_at: Optional[float]
    #: The error of every attempt that ended with one, oldest first; None before the first.
    errors: Optional[list[dict[str, Any]]]
    #: The schedule firing that queued the task, ``{"name", "firing"}`` (UNIX seconds); else None.
    schedule: Optional[dict[str, Any]]
    #: Who may see the task, when the controller has a ``tenant=`` hook: the hook's answer when a request
    #: queued it (None: nobody in particular), :data:`SYSTEM_TENANT` when no request did.
    tenant: Optional[str]
    #: The id of the bulk submission the task came with (every task of one bulk shares it); else None.
    batch: Optional[str]
    #: The last value the task saved with ``save_state()`` (any JSON value), kept across attempts; else None.
    #: Never in events (it may be large): see :func:`event_task`.
    state: Any
    #: When ``state`` was last saved (store clock), else None.
    state_saved_at: Optional[float]
    #: The W3C ``traceparent`` of the trace the task was queued in (see :mod:`..tracing`), else None.
    traceparent: Optional[str]
    #: The uuid of the ended task this one runs again (see :meth:`TaskStore.reruns`); else None.
    rerun_of: Optional[str]
    #: The key whose running tasks the controller's ``max_per_key`` bounds (see :class:`.claimrules.ClaimRules`);
    #: None: no key, bounded by nothing but the global limit.
    concurrency_key: Optional[str]
    #: What the task declared it needs of a host, resource name -> amount (memory in bytes, cpus, custom
    #: names), counted against the capacity of the host that claims it; None: nothing declared.
    resources: Optional[dict[str, Any]]
    #: The task's artifacts when its last attempt ended, ``{"name", "size", "content_type", "sha256"}`` each
    #: (see :mod:`..artifacts`); None when it never saved one.
    artifacts: Optional[list[dict[str, Any]]]
    #: The stop asked for is a finish: the task is to return its best answer so far (see ``FinishRequested``).
    finish_requested: bool
    #: The task was asked to finish and returned: it ended ``stopped`` with that ``result``.
    stopped_with_result: bool


class _AnyTenant:
    """The default of ``list_tasks(tenant=...)``: tasks of every tenant."""

    def __repr__(self) -> str:
        return "ANY_TENANT"


#: List the tasks of every tenant (the default), as opposed to those of tenant None. A controller's
#: ``tenant=`` hook returns it (as ``ALL_TENANTS``) for a request that may see every tenant's tasks.
ANY_TENANT: Any = _AnyTenant()

#: The tenant of the tasks no request made: submitted through the Python API or the CLI outside a
#: request, or queued by a schedule that names no tenant. No hook answer is ever equal to it (see
#: :func:`hook_tenant`), so a request whose hook returns None (or any tenant) does not see them.
SYSTEM_TENANT = "\x00system"


def hook_tenant(value: Any) -> Any:
    """What a ``tenant=`` hook's answer stands for: :data:`ANY_TENANT`, None, or a tenant string.

    Any other value is made a string with ``str()``; a string starting with NUL gets one more NUL
    in front, so that no answer (a name taken from a request, say) can be :data:`SYSTEM_TENANT`.
    """
    if value is ANY_TENANT or value is None:
        return value
    text = str(value)
    return "\x00" + text if text.startswith("\x00") else text


_TERMINAL = frozenset(s.value for s in TERMINAL)
_COUNTER = re.compile(r"[0-9]{1,18}")


class ScheduleRow(TypedDict):
    """The state of one schedule of a controller, as the store keeps it (see :mod:`..schedules`)."""

    controller: str
    name: str
    #: What the serving processes declare (JSON), opaque to the store.
    spec: dict[str, Any]
    #: Every firing up to this time (store clock) was handled: queued, skipped or missed.
    fired_until: float
    #: The time of the last firing that queued a task, and that task's uuid.
    last_fired: Optional[float]
    last_task: Optional[str]
    #: Firings skipped because the queue was full, and the time of the last one.
    skipped: int
    last_skipped: Optional[float]
    #: When a serving process last declared the schedule (store clock), and which one.
    seen_at: float
    declared_by: Optional[str]


class Timing(NamedTuple):
    """The times of one ended task, as :meth:`TaskStore.ended_timings` reads them (store clock, UNIX seconds).

    .. versionadded:: 0.4
    """

    status: str
    created_at: float
    #: When its last attempt started; None for a task stopped before it ever ran.
    started_at: Optional[float]
    ended_at: float
    #: Attempts made (0 for a task stopped in the queue); more than 1 means it was retried.
    attempt: int


class FireOutcome(str, enum.Enum):
    """What :meth:`TaskStore.fire` did with a firing."""

    #: A task was queued for it.
    QUEUED = "queued"
    #: The queue was full: no task, counted in the schedule's ``skipped``.
    FULL = "full"
    #: Passed over on purpose (a firing missed while no server ran): no task.
    MISSED = "missed"
    #: Not later than the schedule's ``fired_until`` (another process handled it), or the schedule
    #: was never declared: nothing written.
    STALE = "stale"

    def __str__(self) -> str:
        return self.value


class Fired(NamedTuple):
    """What :meth:`TaskStore.fire` returns."""

    outcome: FireOutcome
    #: The ``queued`` event of the task, for :attr:`FireOutcome.QUEUED`.
    event: Optional[Event]


class Idempotency(NamedTuple):
    """What :meth:`TaskStore.enqueue` records with the tasks it inserts, so that a submission sent again
    (its answer was lost) finds them instead of making new ones (see :mod:`..idempotency`).

    .. versionadded:: 0.3
    """

    #: The key, already scoped to its controller and tenant (a hex digest: see ``idempotency.scoped_key``).
    key: str
    #: A digest of what was submitted (arguments and options), to tell a repeat from a reuse of the key.
    fingerprint: str
    #: Seconds the store keeps the record (its clock); an expired record is as good as none.
    ttl: float


def check_fields(method: str, fields: Mapping[str, Any]) -> None:
    """Raise ValueError when ``fields`` holds a column a caller may not set (see :data:`MUTABLE_FIELDS`)."""
    unknown = set(fields) - MUTABLE_FIELDS
    if unknown:
        raise ValueError(f"{method}() cannot set {sorted(unknown)}: only {sorted(MUTABLE_FIELDS)}")


#: The figures of a running task's process tree that a progress write may carry (see :meth:`TaskStore.progress`).
USAGE_FIELDS = ("memory_peak", "cpu_time")


class ProgressWrite(NamedTuple):
    """One task's progress in a :meth:`TaskStore.progress_many` batch (the arguments of :meth:`TaskStore.progress`)."""

    uuid: str
    progress: Any
    percent: Optional[float]
    usage: Optional[Mapping[str, Any]] = None


def usage_fields(usage: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The columns a progress write sets from ``usage``: the known figures only (a None keeps the stored one)."""
    if not usage:
        return {}
    return {key: usage[key] for key in USAGE_FIELDS if usage.get(key) is not None}


def _finish_fields(status: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The checked fields of a finish: ValueError for an unknown field or a status that is not terminal."""
    check_fields("finish", fields)
    if status not in _TERMINAL:
        raise ValueError(f"finish() needs a terminal status ({sorted(_TERMINAL)}), not {status!r}")
    if "ended_at" in fields and fields["ended_at"] is None:
        del fields["ended_at"]  # a finished task always has an end time
    return fields


def event_task(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row as lists and the writes that answer with a task give it: without the columns of
    :data:`EVENT_HIDDEN` (a saved state, large and shown nowhere). Events carry less: :func:`event_payload`."""
    return {key: value for key, value in row.items() if key not in EVENT_HIDDEN}


def event_payload(kind: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """The task of an event of ``kind`` about ``row``: what the change touched (:func:`.schema.event_columns`).

    Every event has the task's ``seq``, ``uuid``, ``controller``, ``status``, ``tenant``, ``attempt`` and
    ``pid``; a ``progress`` event its ``progress`` and ``percent``; ``queued``, ``started``, ``adopted`` and
    ``ended`` events the whole row. None has ``args`` or the saved ``state``: events are many, and
    whoever needs the arguments reads the task (:meth:`TaskStore.get`).
    """
    return {column: row.get(column) for column in event_columns(kind)}


def encoded_size(task: Mapping[str, Any]) -> int:
    """The bytes an event's task takes encoded (its JSON text): what the feed's byte bound counts."""
    return len(json.dumps(task))


def check_feed_read(limit: int, max_bytes: Optional[int]) -> None:
    """Refuse a ``changes()`` batch bound that is not a positive integer (ValueError)."""
    for name, value in (("limit", limit), ("max_bytes", max_bytes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"changes() needs a positive integer {name}, not {value!r}.")


def timing_of(row: Mapping[str, Any]) -> Optional[Timing]:
    """The :class:`Timing` of an ended task's row (None when it has not ended)."""
    if row.get("ended_at") is None or row.get("status") not in _TERMINAL:
        return None
    started = row.get("started_at")
    return Timing(str(row["status"]), float(row["created_at"]), None if started is None else float(started),
                  float(row["ended_at"]), int(row.get("attempt") or 0))


def owner_host(owner: str) -> Optional[str]:
    """The host of a serving process's owner id ``host:pid:create_time`` (hosts may contain ``:``),
    or None when ``owner`` is not of that shape."""
    rest, _, created = owner.rpartition(":")
    host, _, pid = rest.rpartition(":")
    try:
        int(pid)
        float(created)
    except ValueError:
        return None
    return host or None


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
    #: The most events kept; every write prunes the oldest beyond it (amortised: a store may keep up to
    #: 1% more for a moment).
    max_events: int = defaults.EVENT_STREAM_MAXLEN
    #: The most bytes of events kept (their tasks' JSON, see :func:`encoded_size`); every write prunes the
    #: oldest beyond it. Outbox entries are not counted: they have a retention of their own.
    max_event_bytes: int = defaults.MAX_EVENT_BYTES

    # -- writes that change a task's state: each returns the event(s) it wrote ----------------------

    @abc.abstractmethod
    def enqueue(self, rows: Sequence[Row], max_queued: int, emitter: Optional[str] = None,
                idempotency: Optional[Idempotency] = None) -> list[Event]:
        """Insert new ``queued`` tasks, all or none; return their ``queued`` events in input order.

        :param rows: complete rows without ``seq``; the ``seq`` assigned here is written into each
            of them, so the caller has the stored rows without reading them back.
        :param max_queued: the most tasks of the controller that may be queued
            afterwards; ``-1`` for no bound.
        :param idempotency: when given, and a record of its ``key`` is kept and not expired, nothing is
            inserted and :class:`~..exceptions.IdempotentReplay` is raised with the uuids and fingerprint
            it recorded (before the queue bound is looked at: a repeat never answers ``QueueFull``);
            else the record (key -> the rows' uuids, fingerprint, expiry = the store's clock + ``ttl``)
            is written with the rows. :meth:`purge` deletes expired records.
        :raises QueueFull: when the rows do not fit; nothing is inserted then.
        Atomic: the look-up of the key, the count and the insert happen in one step, so of two
        submissions with one key, whichever processes and hosts make them, one inserts. Linear in
        ``len(rows)``.
        """

    @abc.abstractmethod
    def claim(self, controller: str, owner: str, max_running: int, rules: ClaimRules = NO_RULES) -> Optional[Row]:
        """Move the next queued task to ``running`` and return it, or return None.

        The next task is the one with the lowest ``(priority, seq)`` among the queued tasks that
        wait for no ``retry_at`` (a claim first moves those whose ``retry_at`` has come into the
        ready queue, clearing it; the others cost it nothing). Nothing is
        claimed when the controller already has ``max_running`` tasks ``running``
        or ``stopping``. Atomic: two callers never claim the same task, and the
        limit holds across every process sharing the store. ``started_at`` is the
        store's clock inside that atomic step, so it is never earlier than a change
        committed before the claim; ``attempt`` grows by one. No event: the
        ``started`` event comes with the pid (:meth:`start`).

        ``rules`` (:class:`~.claimrules.ClaimRules`) narrow which tasks may be claimed (drained host, per-key and
        per-tenant bounds, held tenants, the host's capacity) and order them (fair share between tenants), in
        the same atomic step.
        """

    def claim_started(self, controller: str, owner: str, max_running: int, pid: int,
                      pid_created: float, rules: ClaimRules = NO_RULES) -> Optional[tuple[Row, Event]]:
        """:meth:`claim` and :meth:`start` in one step, for a serving process whose task process is
        already there (a reused one): return the claimed task with its process recorded and the
        ``started`` event, or None when nothing was claimed.

        The backends of this package make one transaction of it; this default makes two (a
        task settled elsewhere between them gives None, as :meth:`start` would).
        """
        row = self.claim(controller, owner, max_running, rules)
        if row is None:
            return None
        event = self.start(row["uuid"], owner, pid, pid_created)
        if event is None:
            return None
        row.update({"pid": pid, "pid_created": pid_created})
        return row, event

    # ``owner`` fences the writes of a claimed task below: when given, the write only applies
    # while the task is still claimed by that serving process. A process that was paused past
    # its lease (its tasks settled elsewhere, perhaps claimed again) can then never overwrite
    # or finish a run that is no longer its own. They return None, writing nothing, when the
    # task is not active (``running``/``stopping``) or not ``owner``'s.

    @abc.abstractmethod
    def start(self, uuid: str, owner: str, pid: int, pid_created: float) -> Optional[Event]:
        """Record the process of an active task of ``owner``; event ``started``."""

    @abc.abstractmethod
    def progress(self, uuid: str, owner: str, progress: Any, percent: Optional[float],
                 usage: Optional[Mapping[str, Any]] = None) -> Optional[Event]:
        """Set the progress of an active task of ``owner``; event ``progress``.

        :param usage: what the task's process tree used so far (``memory_peak``, ``cpu_time``), written in
            the same step; None (or a key left out) keeps the stored figure.
        """

    def progress_many(self, owner: str, writes: Sequence[ProgressWrite]) -> list[Optional[Event]]:
        """:meth:`progress` of several active tasks of ``owner`` at once: the event of each write, in order
        (None where the task is no longer ``owner``'s active task, as :meth:`progress` says).

        What a serving process's progress flusher calls once per flush interval with the latest progress of
        each of its running tasks that reported some since, so that many busy tasks cost one store round
        trip, not one each. This default makes one :meth:`progress` call per task; the stores override it
        with one transaction (or one script) for the whole batch.

        .. versionadded:: 0.4
        """
        return [self.progress(write.uuid, owner, write.progress, write.percent, write.usage) for write in writes]

    @abc.abstractmethod
    def save_state(self, uuid: str, owner: str, state: Any) -> bool:
        """Store ``state`` (any JSON value) as the saved state of an active task of ``owner``.

        Sets ``state`` and ``state_saved_at`` (the store's clock) in one atomic compare-and-set, like
        :meth:`progress`; returns False, writing nothing, when the task is not active or not
        ``owner``'s. The state stays with the task through :meth:`requeue` and :meth:`retry`, so the
        next attempt's claim returns it. No event is written: the value is left out of events anyway
        (:data:`EVENT_HIDDEN`), and the task's next event (progress, end) carries ``state_saved_at``.
        The caller bounds its size (the controller's ``max_state_size``).

        .. versionadded:: 0.3
        """

    def finish(self, uuid: str, status: str, owner: Optional[str] = None, emitter: Optional[str] = None,
               **fields: Any) -> Optional[Event]:
        """Move an active task (of ``owner``, if given) to a terminal ``status``; event ``ended``.

        :param fields: :data:`MUTABLE_FIELDS` to set with it. Without ``ended_at`` (or with
            ``ended_at=None``) the store's clock at the change is used.
        :param emitter: defaults to ``owner``.
        :raises ValueError: an unknown field or a status that is not terminal (nothing written).
        Atomic compare-and-set: of two finishers, one gets the event, the other None.
        """
        fields = _finish_fields(status, fields)
        return self._finish(uuid, status, owner, owner if emitter is None else emitter, fields)

    def finish_and_claim(self, uuid: str, status: str, owner: str, controller: str, max_running: int,
                         rules: ClaimRules = NO_RULES, **fields: Any) -> tuple[Optional[Event], Optional[Row]]:
        """:meth:`finish` a task of ``owner``, then :meth:`claim` the next task of ``controller`` for ``owner``.

        For a serving process whose slot is free again once the task ended (a fresh process per
        task): one write instead of two. Returns the ``ended`` event (None when the finish wrote
        nothing: then nothing is claimed either) and the claimed task (or None). The backends of
        this package make one transaction of it (Redis: two scripts); this default makes two.
        """
        event = self.finish(uuid, status, owner=owner, **fields)
        if event is None:
            return None, None
        return event, self.claim(controller, owner, max_running, rules)

    def finish_and_claim_started(self, uuid: str, status: str, owner: str, controller: str, max_running: int,
                                 pid: int, pid_created: float, rules: ClaimRules = NO_RULES,
                                 **fields: Any) -> tuple[Optional[Event], Optional[tuple[Row, Event]]]:
        """:meth:`finish` a task of ``owner``, then :meth:`claim_started` the next task for the same process.

        For a serving process whose task process is still there once the task ended (a reused
        one): one write instead of two. Returns the ``ended`` event (None when the finish wrote
        nothing: then nothing is claimed either) and what :meth:`claim_started` returns. The
        backends of this package make one transaction of it (Redis: two scripts); this default
        makes two.
        """
        event = self.finish(uuid, status, owner=owner, **fields)
        if event is None:
            return None, None
        return event, self.claim_started(controller, owner, max_running, pid, pid_created, rules)

    @abc.abstractmethod
    def _finish(self, uuid: str, status: str, owner: Optional[str], emitter: Optional[str],
                fields: dict[str, Any]) -> Optional[Event]:
        """:meth:`finish` with checked arguments."""

    @abc.abstractmethod
    def requeue(self, uuid: str, owner: Optional[str] = None, emitter: Optional[str] = None,
                uncount: bool = False) -> Optional[Event]:
        """Put an active task (of ``owner``, if given) back in the queue at its old place; event ``requeued``.

        Its owner, pid, ``started_at`` and stop request are cleared; its saved ``state`` stays. ``emitter``
        defaults to ``owner``.
        :param uncount: the claim is taken back as if it never happened (``attempt`` goes down by one):
            for a task the claiming process gives back without running it.
        """

    @abc.abstractmethod
    def adopt(self, uuid: str, owner: str, new_owner: str) -> Optional[Event]:
        """Make ``new_owner`` the owner of an active task of ``owner``; event ``adopted``, emitted by ``new_owner``.

        What a serving process writes when it takes over a running task whose process outlived its
        serving process (see :mod:`..handover`). Everything else of the task stays as it is. None
        (nothing written) when the task is not active or not ``owner``'s.
        """

    @abc.abstractmethod
    def request_stop(self, uuid: str, emitter: Optional[str] = None, *,
                     finish: bool = False) -> tuple[Row, Optional[Event]]:
        """Ask a task to stop; return the task afterwards and the event written.

        Like :meth:`pause`, :meth:`resume` and :meth:`reprioritise`, it answers with the task as its
        event shows it: without its saved ``state`` (see :func:`event_task`).

        A queued task becomes ``stopped`` at once (``ended_at`` = the store's clock, event
        ``ended``); a running or paused one ``stopping`` with ``stop_requested`` set (event
        ``stopping``); a ``stopping`` one is returned unchanged, with no event.

        With ``finish``, a running or paused task is asked to finish now instead: ``finish_requested`` is set
        with ``stop_requested`` (the ``stopping`` event carries both), and the process running it has the task
        return its best answer so far. A queued task is stopped as without it (it has no answer yet).

        :raises TaskNotFound: unknown uuid.
        :raises TaskAlreadyFinished: the task is in a terminal state.
        Atomic: a task claimed concurrently is either stopped before it starts or
        marked ``stopping``.
        """

    @abc.abstractmethod
    def purge(self, controller: str, ended_before: float, emitter: Optional[str] = None) -> int:
        """Delete the controller's finished tasks that ended before ``ended_before``; return how many.

        Writes a ``purged`` event per task. Also prunes the events older than :attr:`event_retention`
        (or beyond :attr:`max_events` and :attr:`max_event_bytes`, which every write prunes already) and the
        expired idempotency records (see :meth:`enqueue`; Redis expires them by itself); the outbox is left
        alone (see :meth:`expire_callbacks`).
        """

    # -- task policies ----------------------------------------------------------------------------------

    def retry(self, uuid: str, delay: float, owner: Optional[str] = None, emitter: Optional[str] = None,
              **fields: Any) -> Optional[Event]:
        """Queue an active task (of ``owner``, if given) again for another attempt; event ``requeued``.

        The task becomes ``queued`` with ``retry_at`` = the store's clock plus ``delay`` seconds;
        its ``attempt`` and saved ``state`` are kept (the next claim counts on), its owner, pid,
        ``started_at`` and stop request are cleared, and ``fields`` (:data:`MUTABLE_FIELDS`: ``errors``,
        say) are set.
        Until ``retry_at`` it stays out of the ready queue: claims skip it at no cost and its
        :meth:`position` is None. No queue bound applies. ``emitter`` defaults to ``owner``.

        Returns None, writing nothing, when the task is not active, not ``owner``'s, or a stop
        of it was requested (a stopped task never runs again).
        :raises ValueError: an unknown field (nothing written).
        """
        check_fields("retry", fields)
        return self._retry(uuid, max(0.0, float(delay)), owner, owner if emitter is None else emitter, fields)

    @abc.abstractmethod
    def _retry(self, uuid: str, delay: float, owner: Optional[str], emitter: Optional[str],
               fields: dict[str, Any]) -> Optional[Event]:
        """:meth:`retry` with checked arguments."""

    @abc.abstractmethod
    def next_retry_at(self, controller: str) -> Optional[float]:
        """The earliest ``retry_at`` of the controller's queued tasks that wait for one, or None.

        Idle slots sleep until then (nothing else would wake them: the time coming is no event).
        """

    def pause(self, uuid: str, emitter: Optional[str] = None) -> tuple[Row, Optional[Event]]:
        """Mark a running task ``paused``; return it afterwards and the event ``paused``.

        The serving process that runs it suspends its process tree when it sees the event. A
        task already paused is returned unchanged, with no event.

        :raises TaskNotFound: unknown uuid.
        :raises TaskAlreadyFinished: the task is in a terminal state.
        :raises InvalidTransition: the task is ``queued`` or ``stopping``.
        """
        return self._transition(uuid, "paused", "paused", "running", EventKind.PAUSED, emitter)

    def resume(self, uuid: str, emitter: Optional[str] = None) -> tuple[Row, Optional[Event]]:
        """Mark a paused task ``running`` again; return it afterwards and the event ``resumed``.

        A task already running is returned unchanged, with no event.

        :raises TaskNotFound: unknown uuid.
        :raises TaskAlreadyFinished: the task is in a terminal state.
        :raises InvalidTransition: the task is ``queued`` or ``stopping``.
        """
        return self._transition(uuid, "running", "resumed", "paused", EventKind.RESUMED, emitter)

    @abc.abstractmethod
    def _transition(self, uuid: str, wanted: str, change: str, needs: str, kind: EventKind,
                    emitter: Optional[str]) -> tuple[Row, Optional[Event]]:
        """Move a task from status ``needs`` to ``wanted`` and write the event ``kind``, atomically.

        A task in ``wanted`` already is returned unchanged, with no event; other statuses raise as
        :meth:`pause` says (``change`` names the change in their message).
        """

    @abc.abstractmethod
    def reprioritise(self, uuid: str, priority: int, emitter: Optional[str] = None) -> tuple[Row, Event]:
        """Give a queued task a new ``priority``, which moves it in the queue at once.

        Returns the task afterwards and a ``queued`` event (it is queued anew at its new place,
        keeping its ``seq`` among tasks of that priority).

        :raises TaskNotFound: unknown uuid.
        :raises TaskAlreadyFinished: the task is in a terminal state.
        :raises InvalidTransition: the task is no longer queued.
        """

    @abc.abstractmethod
    def stop_all(self, controller: str, emitter: Optional[str] = None, *, tenant: Any = ANY_TENANT) -> list[Event]:
        """Stop every queued, running and paused task of the controller; return the events written.

        As :meth:`request_stop` for each, in one atomic step, so that no queued task starts
        meanwhile: queued ones end ``stopped`` (events ``ended``, first), running and paused ones
        become ``stopping`` (events ``stopping``); tasks already stopping are left as they are.

        :param tenant: only the tasks stamped with this tenant (None included), read from the
            store's tenant index: the cost follows that tenant's tasks, not the controller's.
        """

    # -- leases and schedules --------------------------------------------------------------------------

    @abc.abstractmethod
    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the lease ``name`` for ``owner`` until ``ttl`` seconds from now (store clock).

        Returns True when ``owner`` holds it afterwards: it was free, expired or already
        ``owner``'s. Atomic: two callers never both get a free lease.
        """

    @abc.abstractmethod
    def release_lease(self, name: str, owner: str) -> None:
        """Give up the lease ``name`` if ``owner`` holds it (a clean shutdown: others need not wait)."""

    @abc.abstractmethod
    def declare_schedules(self, controller: str, specs: Mapping[str, dict[str, Any]], owner: str) -> None:
        """Record that the serving process ``owner`` declares these schedules (by name) now.

        Each one's ``spec`` is replaced, ``seen_at`` set to the store's clock and ``declared_by`` to
        ``owner``; a schedule new to the store starts with ``fired_until`` = that clock, so it
        fires only after it was first declared.
        """

    @abc.abstractmethod
    def schedules(self, controller: str) -> list[ScheduleRow]:
        """Every schedule of the controller the store knows, by name (declared now or in the past)."""

    @abc.abstractmethod
    def fire(self, controller: str, name: str, firing: float, row: Optional[Row], max_queued: int,
             emitter: Optional[str] = None) -> Fired:
        """Handle the firing at time ``firing`` of the schedule ``name``: queue ``row`` for it, once.

        Atomic compare-and-set on the schedule's ``fired_until``: only a firing later than it is
        handled, and ``fired_until`` becomes ``firing`` in the same step as the enqueue, so a
        firing is queued exactly once whichever processes and hosts try it. Then:

        - ``row`` None: the firing is passed over on purpose (:attr:`FireOutcome.MISSED`);
        - the controller has ``max_queued`` tasks queued (-1: no bound): no task, the
          schedule's ``skipped`` grows and ``last_skipped`` = ``firing`` (:attr:`FireOutcome.FULL`);
        - else ``row`` is inserted as :meth:`enqueue` does (``seq`` written into it), and
          ``last_fired``/``last_task`` record it (:attr:`FireOutcome.QUEUED`, with its event).
        """

    # -- the change feed --------------------------------------------------------------------------------

    def changes(self, since: Optional[str], timeout: float = 0.0, *, limit: int = 1000,
                foreign_only: bool = False, tenant: Any = ANY_TENANT, max_bytes: Optional[int] = None,
                without_progress: bool = False) -> Changes:
        """Return the events after the cursor ``since``, oldest first, at most ``limit``.

        When there are none, wait up to ``timeout`` seconds for one. ``since=None`` means
        "from now": no events, and the latest cursor to resume from. ``reset`` is True (with
        the latest cursor and no events) when events after ``since`` were pruned, or when
        ``since`` is not a cursor of this store: the caller must re-read the current state.

        ``foreign_only`` says the caller already has this process's own events (a runtime's
        follower, which dispatched them when they were written): a store may then wait for other
        processes' writes only, so that a burst of local writes does not wake the reader once per
        write on the threads that serve them. The events returned still include local ones.

        ``tenant`` keeps only the events of that tenant's tasks (None included), filtered in the store
        before the events are decoded; the cursor returned then moves past the events left out too,
        so a reader of a quiet tenant does not read the others' events again. ``max_bytes`` ends the
        batch once the events in it take that many bytes (:func:`encoded_size` of their tasks), with
        at least one event, so that a reader always progresses.

        ``without_progress`` leaves out the ``progress`` events, for a reader that acts on none (a runtime's
        follower: running tasks report progress many times a second, and every serving process would read
        them all). The cursor returned moves past them too; a store that can (:attr:`filters_progress`)
        leaves them out in its read and sleeps through writes that made only progress events.

        :raises ValueError: ``limit`` or ``max_bytes`` is not a positive integer.
        """
        check_feed_read(limit, max_bytes)
        if since is None:
            return Changes([], self.latest_cursor(), False)
        deadline = time.monotonic() + max(0.0, timeout)
        interrupts = self._interrupts
        cursor = since
        native = without_progress and self.filters_progress
        while True:
            if native:
                found = self._changes(cursor, limit, tenant, max_bytes, without_progress=True)  # type: ignore[call-arg]
            else:
                found = self._changes(cursor, limit, tenant, max_bytes)
                if without_progress and found.events:
                    kept = [event for event in found.events if event["kind"] != EventKind.PROGRESS.value]
                    if len(kept) != len(found.events):
                        found = Changes(kept, found.cursor, found.reset)
            remaining = deadline - time.monotonic()
            if found.events or found.reset or remaining <= 0 or self._interrupts != interrupts:
                return found
            cursor = found.cursor  # past the events another tenant's filter left out
            if native:
                cursor = self._wait_for_changes(  # type: ignore[call-arg]
                    cursor, remaining, foreign_only, without_progress=True) or cursor
            else:
                self._wait_for_changes(cursor, remaining, foreign_only)

    #: Whether :meth:`_changes` and :meth:`_wait_for_changes` take ``without_progress`` (see :meth:`changes`):
    #: the read leaves ``progress`` events out, and the wait returns only for others, answering the cursor it
    #: got past meanwhile (None: the one given).
    filters_progress: bool = False

    #: How many times :meth:`interrupt_waits` was called on this store object.
    _interrupts: int = 0

    def interrupt_waits(self) -> None:
        """Make every :meth:`changes` of this process blocked on this store return now, with what it found.

        A reader that waits long (a runtime's follower sleeps until something happens) is told to stop
        this way: it sets its own stop flag, then interrupts. Other waiting readers return early too,
        with no events, and wait again.
        """
        self._interrupts += 1
        self._wake_waits()

    def _wake_waits(self) -> None:
        """Wake the waits of :meth:`_wait_for_changes` blocked now, so that they see the interruption
        (each store blocks its own way; a wait that is short anyway need not be woken)."""

    @abc.abstractmethod
    def _changes(self, since: str, limit: int, tenant: Any = ANY_TENANT, max_bytes: Optional[int] = None) -> Changes:
        """:meth:`changes` without waiting (checked bounds)."""

    @abc.abstractmethod
    def _wait_for_changes(self, since: str, timeout: float, foreign_only: bool = False) -> Optional[str]:
        """Return once there may be events after ``since`` (a valid cursor), or after ``timeout`` seconds.

        With ``foreign_only``, waking for this process's own writes is optional (see :meth:`changes`).
        A wait that may block long must also return once :meth:`interrupt_waits` is called. A store that
        :attr:`filters_progress` also takes ``without_progress`` and answers the cursor it got past meanwhile
        (None: the one given); others answer None.
        """

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

    @abc.abstractmethod
    def expire_callbacks(self, controller: str, max_age: float) -> list[Event]:
        """Drop the controller's outbox entries older than ``max_age`` seconds (store clock); return them.

        The only way an unacknowledged callback leaves the outbox besides :meth:`ack`: the feed's
        pruning never touches it. Each one dropped is added to :meth:`callbacks_dropped`, in the
        same step, so that every process sees the count.

        .. versionadded:: 0.4
        """

    @abc.abstractmethod
    def callbacks_dropped(self, controller: str) -> int:
        """How many of the controller's callbacks :meth:`expire_callbacks` dropped undelivered, ever."""

    # -- reads ------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def get(self, uuid: str) -> Optional[Row]:
        """Return the task with this uuid, or None."""

    def find_by_prefix(self, prefix: str, limit: int = 10) -> list[Row]:
        """Return at most ``limit`` tasks of any controller whose uuid begins with ``prefix``, newest first.

        ``prefix`` is the start of a uuid in its canonical form (lower-case hex digits and dashes in
        their places, as :func:`~..http.handlers.uuid_prefix` makes it), so that an operator can name
        a task by the first 8 or more hex digits the dashboard shows. Like :meth:`list_tasks`, the rows
        come without their saved ``state``. Every built-in store answers it (SQLite with a range of its
        primary key; PostgreSQL and Redis by a scan, as an operator's look-up is rare); a store that
        does not raises :class:`NotImplementedError`, and a full uuid is then needed.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot look tasks up by a prefix of their uuid.")

    @abc.abstractmethod
    def list_tasks(self, controller: str, statuses: Optional[Iterable[str]] = None, limit: int = 100,
                   before: Optional[int] = None, tenant: Any = ANY_TENANT) -> list[Row]:
        """Return the controller's tasks, newest first (by ``seq``), optionally only in ``statuses``.

        Like :meth:`batch`, it gives the rows without their saved ``state`` (large, and shown nowhere:
        see :func:`event_task`); :meth:`get` has it.

        :param before: a ``seq``: only older tasks (paging). Costs O(``limit``) on every store.
        :param tenant: only the tasks stamped with this tenant (None included); every tenant's by default.
            Read from the store's tenant index (SQLite: an index on ``(controller, tenant, ...)``;
            Redis: sorted sets per controller and tenant; memory: a dict per controller and tenant),
            so other tenants' tasks are never read.
        """

    @abc.abstractmethod
    def batch(self, controller: str, batch: str) -> list[Row]:
        """Return the controller's tasks stored with the ``batch`` id, in input order (by ``seq``).

        An unknown batch (or one whose tasks were all purged) gives an empty list. Costs
        O(size of the batch) on every store.
        """

    @abc.abstractmethod
    def reruns(self, controller: str, uuid: str, limit: int = 20) -> list[str]:
        """Return the uuids of the controller's tasks queued to run task ``uuid`` again (their ``rerun_of``),
        newest first, at most ``limit``.

        Read from the store's index of reruns (SQL: a partial index on ``rerun_of``; Redis: a sorted set per
        task, written with the rerun and trimmed by purges), so the cost follows the reruns found. A task never
        rerun gives an empty list, and so may one that was purged (Redis drops its set with it).

        .. versionadded:: 0.3
        """

    @abc.abstractmethod
    def counts(self, controller: str, *, tenant: Any = ANY_TENANT) -> dict[str, int]:
        """Return how many of the controller's tasks are in each status (absent = 0).

        :param tenant: only the tasks stamped with this tenant (None included), counted from the
            tenant index; every tenant's by default.
        """

    @abc.abstractmethod
    def ended_counts(self, controller: str, since: float, step: float = 60.0,
                     tenant: Any = ANY_TENANT) -> dict[tuple[int, str], int]:
        """Count the controller's tasks that ended at or after ``since``, per time slot and terminal status.

        The slot of a task is ``int((ended_at - since) // step)``; the answer maps
        ``(slot, status)`` to a count (absent = 0). Reads the store's index of ended tasks
        (the one purges use), so the cost follows the tasks in the window, not the table.

        :param tenant: only the tasks stamped with this tenant; every tenant's by default.

        .. versionadded:: 0.3
        """

    def ended_timings(self, controller: str, since: float, limit: int = defaults.METRICS_SAMPLE) -> list[Timing]:
        """The times of the controller's tasks that ended at or after ``since`` (store clock), latest ended first,
        at most ``limit``: what the wait-time and run-time histograms of ``<prefix>/metrics`` are made of.

        The stores of this package read the index of ended tasks (the one :meth:`ended_counts` and purges
        use) and only these five columns, so the cost follows ``limit``, not the table; this default, for
        stores of other packages, reads the newest ``limit`` tasks of each terminal status.

        .. versionadded:: 0.4
        """
        rows = self.list_tasks(controller, sorted(_TERMINAL), limit)
        found = [timing for timing in map(timing_of, rows) if timing is not None and timing.ended_at >= since]
        found.sort(key=lambda timing: timing.ended_at, reverse=True)
        return found[:limit]

    def callbacks_pending(self, controller: str) -> int:
        """How many of the controller's callback events wait in its outbox, not acknowledged yet.

        The stores of this package count the outbox (one aggregate read); this default, for stores of
        other packages, reads it.

        .. versionadded:: 0.4
        """
        return len(self.unacked(controller, limit=10 ** 9))

    @abc.abstractmethod
    def position(self, row: Row) -> Optional[int]:
        """Return the 1-based place of a queued task in its controller's queue, else None.

        The queue is the ready queue: a task waiting for its ``retry_at`` has no place yet
        (None), and the tasks that do are not counted ahead of others.
        """

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

    # -- hosts and their drain ----------------------------------------------------------------------------

    def known_hosts(self) -> dict[str, float]:
        """Every host with a serving process that heartbeats here: host -> its newest heartbeat (store clock).

        Derived from :meth:`heartbeats` (an owner id is ``host:pid:create_time``); an owner id
        of another shape names no host and is left out.
        """
        hosts: dict[str, float] = {}
        for owner, beat in self.heartbeats().items():
            host = owner_host(owner)
            if host is not None:
                hosts[host] = max(beat, hosts.get(host, beat))
        return hosts

    @abc.abstractmethod
    def set_drained(self, host: str, drained: bool) -> None:
        """Drain ``host`` (its serving processes claim no new task) or undrain it.

        Draining a host that is drained already keeps its first ``since``; undraining one that
        is not drained changes nothing. The store only keeps the flag: each serving process
        reads it (:meth:`drained_hosts`) and refrains from claiming.
        """

    @abc.abstractmethod
    def drained_hosts(self) -> dict[str, float]:
        """Every drained host -> since when (the store's clock when it was drained)."""

    def heartbeat_and_drained(self, owner: str) -> dict[str, float]:
        """:meth:`heartbeat` for ``owner``, then :meth:`drained_hosts`: what a serving process's keeper does each
        second, which a store may do in one round trip (the default makes two calls)."""
        self.heartbeat(owner)
        return self.drained_hosts()

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

    # -- hosts' capacities and CPU usage (see ..limits) -----------------------------------------------------

    def publish_capacity(self, host: str, capacity: Mapping[str, float]) -> None:
        """Record ``host``'s capacity (resource name -> amount), replacing what it published before: what a
        submit checks a task's declared resources against (see :meth:`capacities`).

        The stores of this package keep one entry per host; this default, for stores of other packages,
        keeps nothing (then no submit is refused for its resources).

        .. versionadded:: 0.4
        """

    def capacities(self) -> dict[str, dict[str, float]]:
        """Every host's published capacity: host -> resource name -> amount (see :meth:`publish_capacity`).

        .. versionadded:: 0.4
        """
        return {}

    def ended_cpu(self, controller: str, since: float) -> list[tuple[Optional[str], float, float]]:
        """``(tenant, ended_at, cpu_time)`` of the controller's tasks that ended at or after ``since`` (store clock)
        with a CPU time: what tenant quotas are measured from.

        The stores of this package read the index of ended tasks (as :meth:`ended_timings`), so the cost
        follows the tasks of the window; this default, for stores of other packages, pages through the
        controller's ended tasks.

        .. versionadded:: 0.4
        """
        found: list[tuple[Optional[str], float, float]] = []
        before: Optional[int] = None
        while True:
            rows = self.list_tasks(controller, sorted(_TERMINAL),
                                   defaults.MAX_LIST_LIMIT, before)
            for row in rows:
                ended, cpu = row.get("ended_at"), row.get("cpu_time")
                if ended is not None and ended >= since and cpu:
                    found.append((row.get("tenant"), float(ended), float(cpu)))
            if len(rows) < defaults.MAX_LIST_LIMIT:
                return found
            before = rows[-1]["seq"]


#: A claimer's task process: its pid and create time, recorded with the claim (or None: recorded by ``start``).
Process = Optional[tuple[int, float]]


class ClaimSteps:
    """The four claim methods of :class:`TaskStore`, for a store that implements two steps in one transaction
    each: ``_claim(controller, owner, max_running, process, rules)`` and ``_end_and_claim(uuid, status, owner,
    controller, max_running, process, fields, rules)``, both answering the claimed row with its ``started`` event (None without
    ``process``). Put it before :class:`TaskStore` among the bases."""

    def _claim(self, controller: str, owner: str, max_running: int, process: Process,
               rules: ClaimRules) -> Optional[tuple[Row, Optional[Event]]]:
        raise NotImplementedError

    def _end_and_claim(self, uuid: str, status: str, owner: str, controller: str, max_running: int,
                       process: Process, fields: dict[str, Any], rules: ClaimRules,
                       ) -> tuple[Optional[Event], Optional[tuple[Row, Optional[Event]]]]:
        raise NotImplementedError

    def claim(self, controller: str, owner: str, max_running: int, rules: ClaimRules = NO_RULES) -> Optional[Row]:
        claimed = self._claim(controller, owner, max_running, None, rules)
        return None if claimed is None else claimed[0]

    def claim_started(self, controller: str, owner: str, max_running: int, pid: int,
                      pid_created: float, rules: ClaimRules = NO_RULES) -> Optional[tuple[Row, Event]]:
        claimed = self._claim(controller, owner, max_running, (pid, pid_created), rules)
        if claimed is None or claimed[1] is None:
            return None
        return claimed[0], claimed[1]

    def finish_and_claim(self, uuid: str, status: str, owner: str, controller: str, max_running: int,
                         rules: ClaimRules = NO_RULES, **fields: Any) -> tuple[Optional[Event], Optional[Row]]:
        event, claimed = self._end_and_claim(uuid, status, owner, controller, max_running, None, fields, rules)
        return event, None if claimed is None else claimed[0]

    def finish_and_claim_started(self, uuid: str, status: str, owner: str, controller: str, max_running: int,
                                 pid: int, pid_created: float, rules: ClaimRules = NO_RULES,
                                 **fields: Any) -> tuple[Optional[Event], Optional[tuple[Row, Event]]]:
        event, claimed = self._end_and_claim(uuid, status, owner, controller, max_running, (pid, pid_created),
                                             fields, rules)
        if claimed is None or claimed[1] is None:
            return event, None
        return event, (claimed[0], claimed[1])
