"""Schedules: a controller's task queued at cron times or every N seconds, once per firing.

Declared in code, after the controller is made (in every serving process that imports the app)::

    reports.schedule("nightly", cron="0 3 * * *", kwargs={"customer": 7}, tz="Europe/Paris")
    reports.schedule("heartbeat", every=60)

How one firing becomes exactly one task, however many workers and hosts share the store:

- Each serving process declares its schedules in the store (:meth:`~.store.base.TaskStore.declare_schedules`)
  when it starts and every third of the controller's ``lease``; a schedule no serving process has
  declared for a ``lease`` is shown as inactive.
- The serving process that holds the controller's scheduler lease (a store lease named
  ``scheduler:<controller>``, for ``lease`` seconds, renewed every third of it) fires them; the others
  wait to take over when it stops renewing.
- A firing is handled by :meth:`~.store.base.TaskStore.fire`: a compare-and-set on the schedule's
  ``fired_until`` in the same atomic step as the enqueue, so even two processes that both believe they
  hold the lease queue each firing once.

Firing times: ``cron=`` in the time zone ``tz`` (croniter, the ``schedules`` extra; a sixth field
counts seconds); ``every=`` seconds at the whole multiples of ``every`` since the UNIX epoch
(``every=3600`` fires on the hour, UTC), so every process computes the same times. A schedule first
declared at some time fires only after it.

Firings the scheduler meets more than :data:`~.defaults.SCHEDULE_GRACE` seconds late were missed
while no serving process ran: ``catchup="skip"`` (the default) passes over them (with a log line),
``catchup="one"`` queues one task for them (the latest), unless a firing on time is queued anyway.
A firing that meets a full queue (``max_num_queue``) queues nothing: it is logged and counted on the
schedule (``skipped``, ``last_skipped``); there is no task, hence no task event.

A schedule may name a ``tenant``: its tasks are that tenant's, and with a ``tenant=`` hook only that
tenant's requests (and operators, whose hook answers ``ALL_TENANTS``) see the schedule. A schedule
without one is the system's: its tasks carry :data:`~.store.base.SYSTEM_TENANT`, and only requests
that may see every tenant's tasks see it.

.. versionadded:: 0.3
"""
from __future__ import annotations

import logging
import math
import threading
import time
import uuid as uuid_module
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Callable, Mapping, Optional, TypedDict
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .. import defaults
from ..events import Event
from ..exceptions import StoreError
from ..presenter import iso
from ..states import TaskStatus
from ..store import TaskStore
from ..store.base import ANY_TENANT, SYSTEM_TENANT, FireOutcome, Row, ScheduleRow


def _croniter() -> Any:
    """The ``croniter`` class, imported at the first cron schedule (it and its dependencies weigh
    megabytes a server without cron schedules need not carry); None when it is not installed."""
    try:
        from croniter import croniter
    except ImportError:  # ScheduleSpec.build says how to install it
        return None
    return croniter


#: What ``catchup=`` may say.
CATCHUP = ("skip", "one")
#: Firings handled per schedule per round at most (a long outage is caught up over several rounds).
_MAX_FIRINGS_PER_ROUND = 1000


def lease_name(controller: str) -> str:
    """The store lease whose holder fires the schedules of ``controller``."""
    return f"scheduler:{controller}"


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule as declared: when it fires and what each firing queues.

    Build it with :meth:`build`, which checks every field.
    """

    name: str
    cron: Optional[str] = None
    every: Optional[float] = None
    tz: str = "UTC"
    kwargs: dict[str, Any] = field(default_factory=dict)
    catchup: str = "skip"
    priority: int = 0
    timeout: Optional[float] = None
    #: The tenant its tasks are stamped with; None: the system's (:data:`SYSTEM_TENANT`).
    tenant: Optional[str] = None

    @classmethod
    def build(cls, name: str, *, cron: Optional[str] = None, every: Optional[float] = None, tz: str = "UTC",
              kwargs: Optional[Mapping[str, Any]] = None, catchup: str = "skip", priority: int = 0,
              timeout: Optional[float] = None, tenant: Optional[str] = None) -> "ScheduleSpec":
        """A checked schedule.

        :raises ValueError: no name, not exactly one of ``cron`` and ``every``, a bad expression,
            an unknown time zone or ``catchup``, ``every`` under 1 s.
        :raises TypeError: ``kwargs`` is not a mapping, ``priority`` not an integer, ``tenant`` not a string.
        :raises ImportError: ``cron=`` without croniter (the ``schedules`` extra).
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError("A schedule needs a name (a non-empty string), unique within its controller.")
        if (cron is None) == (every is None):
            raise ValueError(f"Schedule {name!r}: give exactly one of cron='*/5 * * * *' and every=<seconds>.")
        if cron is not None:
            _check_cron(name, cron)
        if every is not None and (isinstance(every, bool) or not isinstance(every, (int, float))
                                  or not math.isfinite(every) or every < 1):
            raise ValueError(f"Schedule {name!r}: every= is a number of seconds, at least 1, not {every!r}.")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ValueError(f"Schedule {name!r}: unknown time zone {tz!r} (an IANA name, like 'Europe/Paris').") \
                from None
        if catchup not in CATCHUP:
            raise ValueError(f"Schedule {name!r}: catchup= is 'skip' or 'one', not {catchup!r}.")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"Schedule {name!r}: kwargs= is a mapping of execute's keyword arguments.")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise TypeError(f"Schedule {name!r}: priority= is an integer, not {priority!r}.")
        if tenant is not None and not isinstance(tenant, str):
            raise TypeError(f"Schedule {name!r}: tenant= is a string, not {tenant!r}.")
        return cls(name, cron, None if every is None else float(every), tz, dict(kwargs or {}), catchup, priority,
                   timeout, tenant)

    @classmethod
    def from_json(cls, spec: Mapping[str, Any], name: str) -> "ScheduleSpec":
        """A spec as another process declared it in the store (unchecked: it is shown, not fired; fields
        this version does not know are left out)."""
        known = {key: spec[key] for key in ("cron", "every", "tz", "kwargs", "catchup", "priority", "timeout",
                                            "tenant") if key in spec}
        return cls(name, **known)

    def to_json(self) -> dict[str, Any]:
        """What the store keeps of it (its name is the key)."""
        described = asdict(self)
        del described["name"]
        return described

    @property
    def task_tenant(self) -> str:
        """The tenant its tasks are stamped with (and who may see it): its own, else :data:`SYSTEM_TENANT`."""
        return SYSTEM_TENANT if self.tenant is None else self.tenant

    def next_after(self, moment: float) -> float:
        """The first firing strictly after ``moment`` (UNIX seconds)."""
        if self.every is not None:
            return (math.floor(moment / self.every) + 1) * self.every
        return float(_croniter()(self.cron, self._local(moment)).get_next(float))

    def latest_until(self, moment: float) -> Optional[float]:
        """The last firing at or before ``moment``."""
        if self.every is not None:
            return math.floor(moment / self.every) * self.every
        before = float(_croniter()(self.cron, self._local(moment)).get_prev(float))
        at = self.next_after(before)
        return at if at <= moment else before

    def _local(self, moment: float) -> datetime:
        return datetime.fromtimestamp(moment, ZoneInfo(self.tz))


def _check_cron(name: str, cron: Any) -> None:
    croniter = _croniter()
    if croniter is None:
        raise ImportError("cron= schedules need croniter: pip install 'flask-multiprocess-controller[schedules]'.")
    if not isinstance(cron, str) or not croniter.is_valid(cron):
        raise ValueError(f"Schedule {name!r}: {cron!r} is not a cron expression (like '*/5 * * * *').")


@dataclass(frozen=True)
class Plan:
    """What the scheduler does for one schedule in one round (see :func:`plan`)."""

    #: Firings to queue a task for, oldest first.
    queue: list[float]
    #: Firings up to this time are passed over (missed while no server ran); None: none are.
    pass_over_until: Optional[float] = None


def plan(spec: ScheduleSpec, fired_until: float, now: float, grace: float = defaults.SCHEDULE_GRACE) -> Plan:
    """Which firings of ``spec`` to handle at ``now``, every firing up to ``fired_until`` being handled.

    Firings up to ``grace`` seconds late are queued; older ones were missed while no server ran:
    passed over, or with ``catchup="one"`` one task (for the latest) when no firing is on time.
    """
    recent: list[float] = []
    moment = max(fired_until, now - grace)
    while len(recent) < _MAX_FIRINGS_PER_ROUND:
        moment = spec.next_after(moment)
        if moment > now:
            break
        recent.append(moment)
    missed = spec.latest_until(now - grace) if now - grace > fired_until else None
    if missed is not None and missed <= fired_until:
        missed = None
    if missed is not None and spec.catchup == "one" and not recent:
        return Plan([missed])
    return Plan(recent, missed)


def task_row(spec: ScheduleSpec, controller: str, firing: float) -> Row:
    """The task a firing queues (``schedule`` names the schedule and the firing)."""
    return {
        "uuid": str(uuid_module.uuid4()), "controller": controller, "status": TaskStatus.QUEUED.value,
        "priority": spec.priority, "args": dict(spec.kwargs), "created_at": time.time(), "timeout": spec.timeout,
        "attempt": 0, "stop_requested": False, "schedule": {"name": spec.name, "firing": firing},
        "tenant": spec.task_tenant,
    }


class ScheduleInfo(TypedDict):
    """One schedule as ``controller.schedules()`` shows it (times in ISO 8601, UTC)."""

    name: str
    controller: str
    cron: Optional[str]
    every: Optional[float]
    tz: str
    kwargs: dict[str, Any]
    catchup: str
    #: The tenant whose tasks it queues; None: the system's.
    tenant: Optional[str]
    #: Whether a serving process declared it within the controller's ``lease``.
    active: bool
    #: When it fires next (None while inactive).
    next_firing: Optional[str]
    #: The last firing that queued a task, and that task.
    last_firing: Optional[str]
    last_task: Optional[str]
    #: Firings skipped because the queue was full, and the last one.
    skipped: int
    last_skipped: Optional[str]
    #: The serving process that declared it last, and when (None: only declared in this process).
    declared_by: Optional[str]
    declared_at: Optional[str]


def describe(states: list[ScheduleRow], local: Mapping[str, ScheduleSpec], controller: str, now: float,
             lease: float, tenant: Any = ANY_TENANT) -> list[ScheduleInfo]:
    """The schedules of a controller as stored, and those declared only here, by name.

    :param tenant: only the schedules of this tenant (:attr:`ScheduleSpec.task_tenant`); every one by default.
    """
    infos: dict[str, ScheduleInfo] = {}
    hidden: set[str] = set()
    for state in states:
        spec = ScheduleSpec.from_json(state["spec"], state["name"])
        if tenant is not ANY_TENANT and spec.task_tenant != tenant:
            hidden.add(spec.name)
            continue
        active = now - state["seen_at"] <= lease
        next_firing = _next_firing(spec, max(now, state["fired_until"])) if active else None
        infos[spec.name] = _info(spec, controller, active, next_firing, state)
    for name, spec in local.items():
        if name not in infos and name not in hidden and (tenant is ANY_TENANT or spec.task_tenant == tenant):
            infos[name] = _info(spec, controller, False, None, None)
    return [infos[name] for name in sorted(infos)]


def _next_firing(spec: ScheduleSpec, moment: float) -> Optional[float]:
    try:
        return spec.next_after(moment)
    # No croniter here, or an expression it cannot read, or a time zone this host does not know (declared by
    # another version or another host): the schedule is still shown, without a next firing.
    except (TypeError, ValueError, AttributeError, ZoneInfoNotFoundError):
        return None


def _info(spec: ScheduleSpec, controller: str, active: bool, next_firing: Optional[float],
          state: Optional[ScheduleRow]) -> ScheduleInfo:
    return ScheduleInfo(
        name=spec.name, controller=controller, cron=spec.cron, every=spec.every, tz=spec.tz, kwargs=spec.kwargs,
        catchup=spec.catchup, tenant=spec.tenant, active=active, next_firing=iso(next_firing),
        last_firing=iso(state["last_fired"]) if state else None, last_task=state["last_task"] if state else None,
        skipped=state["skipped"] if state else 0, last_skipped=iso(state["last_skipped"]) if state else None,
        declared_by=state["declared_by"] if state else None, declared_at=iso(state["seen_at"]) if state else None)


class Scheduler:
    """Declares one controller's schedules for this serving process and, while it holds the lease, fires them.

    It starts its thread with the first schedule declared, and never before: a controller with no
    schedule costs nothing.

    :param publish: called with the ``queued`` event of each task a firing queues.
    :param clock: the monotonic clock that times the lease's renewals (firings follow the store's clock).
    """

    def __init__(self, store: TaskStore, controller: str, owner: str, lease: float, max_queued: int,
                 logger: logging.Logger, publish: Callable[[Event], None],
                 clock: Callable[[], float] = time.monotonic,
                 stamp: Optional[Callable[[list[Row]], None]] = None) -> None:
        self.store = store
        #: Gives a firing's task its concurrency key and resources (see :mod:`..limits`).
        self._stamp = stamp
        self._clock = clock
        self.controller = controller
        self.owner = owner
        self.lease = lease
        self.max_queued = max_queued
        self._logger = logger
        self._publish = publish
        # Guards _specs, _thread and _renew_at (a schedule added makes the next round declare at once).
        self._lock = threading.Lock()
        self._specs: dict[str, ScheduleSpec] = {}
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        #: Whether this process held the lease at its last renewal.
        self.holder = False
        self._renew_at = 0.0
        self._failing = False

    def add(self, spec: ScheduleSpec) -> None:
        """Add (or replace) a schedule, to be declared at the next round (:meth:`run_once`)."""
        with self._lock:
            self._specs[spec.name] = spec
            self._renew_at = 0.0

    def declare(self, spec: ScheduleSpec) -> None:
        """Add (or replace) a schedule and run the rounds in a thread of their own: it is declared at once."""
        self.add(spec)
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name=f"mpc-{self.controller}-scheduler",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        """Stop firing and give the lease up, so that another process takes over at once."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()
        if self.holder:
            try:
                self.store.release_lease(lease_name(self.controller), self.owner)
            except StoreError:  # it expires by itself
                pass
            self.holder = False

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pause = self.run_once()
                if self._failing:
                    self._logger.warning("The scheduler of %s works again.", self.controller)
                    self._failing = False
            except StoreError as exc:
                if not self._failing:
                    self._logger.warning("The scheduler of %s cannot reach the store (%s); retrying.",
                                         self.controller, exc)
                    self._failing = True
                pause = defaults.STORE_RETRY_MAX
            except Exception:  # a bug must not end the thread (no schedule would fire again)
                self._logger.exception("The scheduler of %s failed.", self.controller)
                pause = defaults.STORE_RETRY_MAX
            self._wake.wait(pause)
            self._wake.clear()

    def run_once(self) -> float:
        """One round: declare and take (or keep) the lease when due, fire what is due; seconds to the next round."""
        clock = self._clock()
        with self._lock:
            specs = dict(self._specs)
            renew = clock >= self._renew_at
            if renew:
                self._renew_at = clock + self.lease / 3
            until_renewal = max(0.0, self._renew_at - clock)
        if renew:
            try:
                self.store.declare_schedules(self.controller, {n: s.to_json() for n, s in specs.items()}, self.owner)
                holder = self.store.acquire_lease(lease_name(self.controller), self.owner, self.lease)
            except StoreError:
                with self._lock:
                    self._renew_at = 0.0  # the next round tries again
                raise
            if holder != self.holder:
                self._logger.info("This process %s the schedules of %s.", "now fires" if holder else "no longer fires",
                                  self.controller)
            self.holder = holder
        if not self.holder:
            return until_renewal
        now = self.store.now()
        states = {state["name"]: state for state in self.store.schedules(self.controller)}
        next_firing = math.inf
        for name, spec in specs.items():
            state = states.get(name)
            if state is None:
                continue
            fired_until = self._fire_due(spec, state["fired_until"], now)
            next_firing = min(next_firing, spec.next_after(max(now, fired_until)))
        return min(until_renewal, max(0.0, next_firing - now) + defaults.SCHEDULE_WAKE_MARGIN)

    def _fire_due(self, spec: ScheduleSpec, fired_until: float, now: float) -> float:
        """Handle the due firings of one schedule; return its ``fired_until`` afterwards."""
        todo = plan(spec, fired_until, now, defaults.SCHEDULE_GRACE)
        if todo.pass_over_until is not None:
            if self.store.fire(self.controller, spec.name, todo.pass_over_until, None, self.max_queued).outcome \
                    is FireOutcome.MISSED:
                self._logger.warning("Schedule %s of %s: the firings up to %s were missed while no server ran, and "
                                     "are skipped (catchup=%r).", spec.name, self.controller,
                                     iso(todo.pass_over_until), spec.catchup)
            fired_until = max(fired_until, todo.pass_over_until)
        for firing in todo.queue:
            row = task_row(spec, self.controller, firing)
            if self._stamp is not None:
                self._stamp([row])
            fired = self.store.fire(self.controller, spec.name, firing, row, self.max_queued, emitter=self.owner)
            if fired.outcome is FireOutcome.QUEUED and fired.event is not None:
                self._logger.info("Schedule %s of %s queued task %s for its firing at %s.", spec.name,
                                  self.controller, row["uuid"], iso(firing))
                self._publish(fired.event)
            elif fired.outcome is FireOutcome.FULL:
                self._logger.warning("Schedule %s of %s: the firing at %s is skipped, the queue is full "
                                     "(max_num_queue=%d).", spec.name, self.controller, iso(firing), self.max_queued)
            fired_until = max(fired_until, firing)
        return fired_until
