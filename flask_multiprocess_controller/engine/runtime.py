"""The moving parts of a controller in one serving process.

Data flow::

    submit ─▶ store (queued + event) ─▶ wake the slots
    slot thread (one per process slot, so one controlling thread per child process):
        claim the next task from the store (atomic, honours max_num_process across processes)
        ─▶ fork server forks a task process (or the slot's warm one is reused)
        ─▶ Supervisor relays progress/logs, enforces stop/timeout/memory, classifies the end
        ─▶ store (terminal state + event), claim the next task
    every store write returns its event ─▶ EventHub ─▶ waiters, running tasks, callbacks
    other processes' events ─▶ the store's change feed ─▶ EventHub (one follower thread)

Nothing here sleeps on the dispatch path: a submit wakes an idle slot at once, a slot
that finishes a task claims the next one itself, and work queued (or slots freed) by
other processes arrives as events. A store outage is waited out by every thread here:
none dies of it, and an outcome reached meanwhile is recorded once the store is back.
"""
from __future__ import annotations

import collections
import functools
import signal
import threading
import time
from contextlib import contextmanager
from multiprocessing.connection import wait as wait_ready
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, cast


from ..artifacts import ArtifactStorage, sweep
from .. import defaults
from .adoption import AdoptedRun, AdoptionListener, Link, Offer, adoptable
from .callbacks import CallbackSender
from .child import prepare_fork_server, run_child
from .config import RuntimeConfig
from ..events import Event, EventKind
from ..exceptions import StoreError
from .forkserver import ChildProcess, ForkServer
from .handover import HandoverConfig, handover_directory, held_key, live_adopters, reopen_url
from .hub import EventHub
from .flusher import ProgressFlusher
from .owners import held_for_adoption, host_id, owner_alive, owner_host, owner_id
from .keeper import Keeper
from .logs import LogListener, MetaMPLoggerConfigurator, log_task_ended, log_task_started, traceback_suffix
from .pausing import follow_pause_event
from .retrier import GaveUp, Retrier
from ..presenter import hide_error_text, hide_traceback, present
from .proctree import kill_process_tree, proven_task_process
from .protocol import Exit, clip_error, error_record
from .schedules import Scheduler, ScheduleSpec
from .side import TaskSide
from .slots import Claim, Slot
from ..states import ACTIVE, TaskStatus
from ..store import TaskStore
from ..store.base import Row
from ..store.claimrules import ClaimRules
from ..store.base import Idempotency
from ..exceptions import IdempotentReplay
from .supervisor import Outcome, StopReason, Supervisor, TaskRun, requested_stop
from ..task import MetaMPTask
from .. import tracing
from .waiters import Countdown, Ended, Waiters


def task_fork_server(task_cls: type[MetaMPTask], configurator: type[MetaMPLoggerConfigurator],
                     max_tasks: int) -> ForkServer:
    """Fork the fork server of a controller: each of its task processes runs :func:`~.child.run_child`,
    on what :func:`~.child.prepare_fork_server` set up in the server once."""
    main = functools.partial(run_child, task_cls=task_cls, configurator=configurator, max_tasks=max_tasks)
    return ForkServer(main, prepare=functools.partial(prepare_fork_server, configurator))


#: Outbox entries read per batch when a controller without a ``callback_url`` clears its old ones.
_OUTBOX_BATCH = 1000


def callback_body(event: Event, expose_tracebacks: bool = False, expose_errors: bool = True,
                  read: Optional[Callable[[str], Optional[Row]]] = None) -> dict[str, Any]:
    """The JSON body of a callback delivery: the event, its cursor and the task object (shown as HTTP
    clients see it: see ``expose_tracebacks`` and ``expose_errors``).

    A ``started`` or ``ended`` event carries the whole task but its arguments (events never carry them:
    see :func:`~..store.base.event_payload`); ``read`` (the store's ``get``) gives them, so the task object
    is the whole task as the change left it. A task purged meanwhile shows its arguments as null.
    ``trace_id`` is the id of the trace the task belongs to (null: none; see :mod:`...tracing`).
    """
    stored = read(event["uuid"]) if read is not None else None
    task = present(cast(Row, {"args": stored.get("args") if stored else None, **event["task"]}))
    if not expose_errors:
        hide_error_text(task)
    elif not expose_tracebacks:
        hide_traceback(task)
    return {"event": event["kind"], "uuid": event["uuid"], "cursor": event["cursor"], "msg": task["msg"],
            "trace_id": tracing.trace_id(task.get("traceparent")), "task": task}


def _shutdown_end(event: Event) -> bool:
    """Whether the event is the end of a task that its server's shutdown stopped."""
    error = event["task"].get("error") or {}
    return bool(error.get("type") == "Shutdown")


class Runtime(TaskSide):
    """Fork server, slot threads, event hub, log listener and the running tasks of one controller.

    :param clock: the monotonic clock of the holds on claims (and of the scheduler's lease renewals).
    """

    def __init__(self, config: RuntimeConfig, store: TaskStore, callback_url: Optional[str],
                 fork_server: ForkServer, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.config = config
        self._clock = clock
        self.store = store
        self.logger = config.logger
        #: The parent of every task process; forked with the controller, before threads existed.
        self.fork_server = fork_server
        self.host = host_id()
        #: This serving process in the store: the owner of the tasks it runs, the emitter of its events.
        self.owner: str = owner_id(self.host)
        self.logs = LogListener(self.logger)
        # Guards _generation and closing; slots wait on it for work.
        self._work = threading.Condition()
        self._generation = 0
        self.closing = False
        #: True once the process is going away: no more claims (see stop_claiming).
        self.draining = False
        #: True while this host is drained in the store (see :meth:`refresh_host_drained`): no claims,
        #: running tasks go on. Read by the keeper every heartbeat.
        self.host_drained = False
        #: Monotonic time before which no task is claimed (a sibling is shutting down).
        self._hold_claims_until = 0.0
        #: The store's clock when this process began to shut down (None before).
        self._shutdown_began: Optional[float] = None
        #: This host's capacity, resource name -> amount, that claims count declared resources against
        #: (None: tasks are claimed whatever they declare).
        self.capacity: Optional[Mapping[str, float]] = None
        #: Tenants whose tasks are not claimed now (over their quota).
        self.held_tenants: frozenset[Optional[str]] = frozenset()
        #: Store-clock times at which siblings recently stopped tasks because they were shutting down.
        self._sibling_shutdowns: collections.deque[float] = collections.deque(maxlen=16)
        #: Set when background threads must stop waiting for an unreachable store.
        self._give_up = threading.Event()
        # Guards _runs: the tasks running in this process, by uuid.
        self._runs_lock = threading.Lock()
        self._runs: dict[str, TaskRun] = {}
        #: Notified when a run is unregistered (a shutdown may wait for the last one).
        self._runs_changed = threading.Condition(self._runs_lock)
        #: Claims made (or being made) whose task is not registered in _runs yet; guarded by _runs_lock.
        self._open_claims = 0
        #: Cursors of ``ended`` events whose place under max_num_process the slot that wrote them took
        #: on at once (it claimed its next task in the same write, or found none queued): no idle slot
        #: need be woken for them.
        self._places_kept: set[str] = set()
        #: Tasks of this process that no slot ran at the last reconciliation (uuid -> attempt).
        self._unattended: dict[str, Any] = {}
        self._waiters = Waiters()
        self.events = EventHub(store, config.name, self.logger, on_reset=self._feed_reset)
        self.events.subscribe(self._on_event)
        #: Writes the progress of this process's running tasks together, once per ``progress_flush`` seconds.
        self.progress = ProgressFlusher(store, self.owner, config.progress_flush, self.events.publish, self.logger,
                                        name=f"mpc-{config.name}-progress")
        self.events.subscribe(self._log_event, local_only=True)
        self._callbacks: Optional[CallbackSender] = None
        if callback_url:
            body = functools.partial(callback_body, expose_tracebacks=config.expose_tracebacks,
                                     expose_errors=config.expose_errors, read=store.get)
            self._callbacks = CallbackSender(callback_url, self.logger, body, self._ack)
            self.events.subscribe(self._callbacks.offer, local_only=True)
        self._slots = [Slot(self, i) for i in range(config.slot_count)]
        self._keeper = Keeper(self)
        #: Fires the controller's schedules while this process holds their lease (no thread until one is declared).
        self.scheduler = Scheduler(store, config.name, self.owner, config.lease, config.max_num_queue, self.logger,
                                   self.events.publish, clock=clock, stamp=config.stamp)
        #: How this process's tasks are handed over when it ends (None: they are stopped; see .handover).
        self.handover: Optional[HandoverConfig] = None
        self._listener: Optional[AdoptionListener] = None
        #: Controlling threads of adopted tasks; guarded by _runs_lock.
        self._adopted: list[AdoptedRun] = []

    def start(self) -> None:
        self.logs.start()
        retrier = Retrier(self.logger, self._give_up)
        retrier.call("recording the heartbeat", lambda: self.store.heartbeat(self.owner), give_up_at_stop=False)
        retrier.call("reading whether this host is drained", self.refresh_host_drained, give_up_at_stop=False)
        capacity = self.capacity
        if capacity is not None:
            retrier.call("publishing this host's capacity", lambda: self.store.publish_capacity(self.host, capacity),
                         give_up_at_stop=False)
        if self.config.tenant_quota is not None:
            retrier.call("reading the tenants' quota usage", self.refresh_quotas, give_up_at_stop=False)
        self.events.start()
        self._offer_adoption()
        retrier.call("settling the tasks of dead processes", self.reconcile, give_up_at_stop=False)
        retrier.call("purging old tasks", self.purge, give_up_at_stop=False)
        self._keeper.start()
        for slot in self._slots:
            slot.start()

    def _offer_adoption(self) -> None:
        """Arm the hand-over: tasks outlive this process, and tasks of ended processes are adopted here."""
        c = self.config
        if c.handover_window <= 0 or not self.store.shared:
            return
        url = reopen_url(self.store)
        directory = handover_directory(self.host, c.name, url) if url else None
        if url is None or directory is None:
            return
        self.handover = HandoverConfig(
            directory=directory, owner=self.owner, window=c.handover_window, store_url=url, controller=c.name,
            supervision=c.supervision, restartable=c.restartable)
        self.fork_server.arm_handover(self.handover)
        self._listener = AdoptionListener(self, directory)
        self._listener.start()

    # -- what the controller asks of the runtime ------------------------------------------

    def submit(self, rows: Sequence[Row], max_queued: int, idempotency: Optional[Idempotency] = None) -> None:
        """Queue new task rows (all or none) and wake the slots."""
        if idempotency is None:
            self.written_all(lambda: self.store.enqueue(rows, max_queued, emitter=self.owner))  # each wakes a slot
        else:
            try:
                self.written_all(lambda: self.store.enqueue(rows, max_queued, emitter=self.owner,
                                                            idempotency=idempotency))
            except IdempotentReplay:
                # The first submission's answer may have been lost here, its events never published: the
                # slots look at the queue rather than wait for an event that will not come.
                self.notify_work()
                raise

    @contextmanager
    def watch(self, uuid: str) -> Iterator[Ended]:
        """An event set when ``uuid`` ends (or everything must be re-read) while the block runs."""
        with self._waiters.watch(uuid) as ended:
            yield ended

    @contextmanager
    def watch_all(self, uuids: Sequence[str]) -> Iterator[Countdown]:
        """A countdown of ``uuids`` ending (see :class:`~.waiters.Countdown`) while the block runs."""
        with self._waiters.watch_all(uuids) as countdown:
            yield countdown

    def declare_schedule(self, spec: ScheduleSpec) -> None:
        self.scheduler.declare(spec)

    def local_run(self, uuid: str) -> Optional[TaskRun]:
        """The run of ``uuid`` in this process, if it runs here (its progress is the freshest)."""
        with self._runs_lock:
            return self._runs.get(uuid)

    # -- events -----------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        kind, uuid = event["kind"], event["uuid"]
        if kind == EventKind.ENDED and _shutdown_end(event) and event["emitter"] != self.owner:
            # A sibling is shutting down, and this process is probably next (gunicorn signals its
            # workers one after the other, and a worker may handle its signal late): hold off claims
            # for a moment, so no queued task is started only to be cut short.
            self._hold_claims_until = self._clock() + defaults.SIBLING_SHUTDOWN_HOLD
            self._sibling_shutdowns.append(event["at"])
        if kind in (EventKind.QUEUED, EventKind.REQUEUED) or (
                kind == EventKind.ENDED and event["cursor"] not in self._places_kept):
            # One task was queued, or one place under max_num_process came free: one idle slot
            # claims it (waking every idle slot would only make the others claim nothing).
            self.notify_work(1)
        self._places_kept.discard(event["cursor"])
        if kind == EventKind.ENDED:
            self._waiters.wake(uuid, event["task"])
        run = self.local_run(uuid)
        if run is None or event["task"].get("attempt") != run.attempt:
            return  # not about the run of this process (an earlier attempt's event, read late)
        if kind == EventKind.STOPPING or (kind == EventKind.STARTED and event["task"].get("stop_requested")):
            run.request_stop(requested_stop(event["task"]))
        elif kind in (EventKind.ENDED, EventKind.REQUEUED) and event["emitter"] != self.owner:
            run.abandon()
        elif kind in (EventKind.STARTED, EventKind.PAUSED, EventKind.RESUMED):
            follow_pause_event(run, event, lambda: self._stored_status(uuid))

    def _stored_status(self, uuid: str) -> Optional[str]:
        """The task's status in the store now (None when it cannot be read: the event's word stands)."""
        try:
            row = self.store.get(uuid)
        except StoreError:
            return None
        return None if row is None else row["status"]

    def _log_event(self, event: Event) -> None:
        """The controller's INFO lines about each task, from the process that made the change."""
        task = event["task"]
        if event["kind"] == EventKind.STARTED:
            log_task_started(self.logger, event["uuid"], task.get("pid"))
        elif event["kind"] == EventKind.ENDED:
            log_task_ended(self.logger, event["uuid"], task["status"], task.get("error"))

    def _feed_reset(self) -> None:
        """Events were lost: wake every waiter to re-read, and look at the running tasks again."""
        self._waiters.wake_all()
        self.notify_work()
        with self._runs_lock:
            runs = list(self._runs.values())
        for run in runs:
            row = self.store.get(run.uuid)
            if (row is None or row["status"] not in ACTIVE or row.get("owner") != self.owner
                    or row.get("attempt") != run.attempt):
                run.abandon()
            elif row.get("stop_requested"):
                run.request_stop(requested_stop(row))
            else:
                run.request_pause(row["status"] == TaskStatus.PAUSED)

    def _ack(self, event: Event) -> None:
        self.store.ack(self.config.name, [event["cursor"]])

    # -- work -----------------------------------------------------------------

    def stop_claiming(self) -> None:
        """Claim no more tasks (the process is going away); running ones go on until :meth:`shutdown`.

        Only sets a flag, so a signal handler may call it.
        """
        self.draining = True

    def refresh_host_drained(self, drained_hosts: Optional[Mapping[str, float]] = None) -> None:
        """Read whether this host is drained (from ``drained_hosts`` when the caller read them already); once it is
        not any more, the idle slots claim at once."""
        drained = self.host in (self.store.drained_hosts() if drained_hosts is None else drained_hosts)
        was, self.host_drained = self.host_drained, drained
        if drained != was:
            self.logger.warning("Host %s is %s: this process %s.", self.host,
                                "drained" if drained else "undrained",
                                "claims no new task; running ones go on" if drained else "claims tasks again")
        if was and not drained:
            self.notify_work()

    def refresh_quotas(self) -> None:
        """Read which tenants are over their CPU quota (their tasks are not claimed); once one is not any more,
        the idle slots claim at once. Read by the keeper every heartbeat when the controller has a quota."""
        from ..limits import quota_usage

        quota = self.config.tenant_quota
        if quota is None:
            return
        now = self.store.now()
        usage = quota_usage(self.store.ended_cpu(self.config.name, now - quota.window),
                            self.store.active(self.config.name), quota, now)
        held = frozenset(tenant for tenant, used in usage.items() if used.over)
        released = self.held_tenants - held
        self.held_tenants = held
        if released:
            self.notify_work()

    def notify_work(self, slots: Optional[int] = None) -> None:
        """Wake idle slots (``slots`` of them, else all): tasks were queued, or places came free.

        A slot that is claiming rather than waiting meanwhile sees the change too (it claims again).
        """
        with self._work:
            self._generation += 1
            if slots is None:
                self._work.notify_all()
            else:
                self._work.notify(slots)

    def next_task(self, retrier: Retrier, child: Optional[ChildProcess] = None) -> Optional[Claim]:
        """Claim the next task for a slot, waiting while there is none; None when closing.

        :param child: the slot's task process when it has one already (a reused one): it is
            recorded with the claim, in the same write, and the claim carries the ``started`` event.
        """
        while True:
            with self._work:
                if self.closing or self.draining:
                    return None
                if self.host_drained:  # refresh_host_drained wakes the slots once the host is undrained
                    self._work.wait()
                    continue
                held = self._hold_claims_until - self._clock()
                if held > 0:
                    self._work.wait(held)
                    continue
                generation = self._generation
            self._open_claim()
            try:
                claim = retrier.call("claiming a task", lambda: self._claim(child))
            except GaveUp:
                self.close_claim()
                return None
            if claim is not None and self._going_away():  # claimed as the process began to go away: give back
                self.give_back(claim, retrier)
                self.close_claim()
                return None
            if claim is not None:
                return claim  # the slot closes the claim once it has registered the run
            self.close_claim()
            idle_for = self._idle_wait()
            with self._work:
                if self._generation == generation and not self.closing:
                    self._work.wait(idle_for)

    def claim_rules(self) -> ClaimRules:
        """What this process's claims honour beyond ``max_num_process`` (see :mod:`..store.claimrules`)."""
        c = self.config
        return ClaimRules(host=self.host, max_per_key=c.max_per_key, max_per_tenant=c.max_per_tenant,
                          fair=c.fair_share, capacity=self.capacity, held_tenants=self.held_tenants)

    def _claim(self, child: Optional[ChildProcess]) -> Optional[Claim]:
        c = self.config
        if child is None:
            row = self.store.claim(c.name, self.owner, c.max_num_process, self.claim_rules())
            return None if row is None else Claim(row, None)
        claimed = self.store.claim_started(c.name, self.owner, c.max_num_process, child.pid,
                                           child.create_time or 0.0, self.claim_rules())
        return None if claimed is None else Claim(*claimed)

    def _idle_wait(self) -> Optional[float]:
        """Seconds an idle slot may sleep: until the earliest retry of a failed attempt comes due at most.

        The time coming is no event, so this is the one wake-up that must be timed. A shared store
        is looked at again every ``IDLE_RECHECK`` seconds anyway (a missed event costs no more).
        """
        idle = defaults.IDLE_RECHECK if self.store.shared else None
        try:
            retry_at = self.store.next_retry_at(self.config.name)
            if retry_at is None:
                return idle
            due_in = max(0.0, retry_at - self.store.now()) + defaults.RETRY_WAKE_MARGIN
        except StoreError:  # the claim that follows meets the outage, and waits it out
            return defaults.STORE_RETRY_MIN
        return due_in if idle is None else min(idle, due_in)

    def may_claim(self) -> bool:
        """Whether a slot may claim a task now (not closing or going away, host not drained, no hold)."""
        return (not (self.closing or self.draining or self.host_drained)
                and self._clock() >= self._hold_claims_until)

    def adopt(self, claim: Claim, retrier: Retrier) -> Optional[Claim]:
        """A task claimed together with the end of the slot's last one: run it, or give it back when
        the process began to go away meanwhile."""
        if self.closing or self._going_away():
            self.give_back(claim, retrier)
            self.close_claim()
            return None
        return claim

    def _going_away(self) -> bool:
        return self.draining

    def give_back(self, claim: Claim, retrier: Retrier) -> None:
        """Return a task this process claimed but will not run to the queue.

        A claim that recorded its process wrote a ``started`` event, left for the supervisor to publish: it
        is published here first, so that every subscriber sees the task start, then go back to the queue.
        """
        self.events.publish(claim.started)
        try:
            self.written(lambda: self.store.requeue(claim.row["uuid"], owner=self.owner, emitter=self.owner,
                                                    uncount=True), retrier, "returning a task to the queue")
        except GaveUp:
            pass  # the next start settles it (requeued if restartable, else lost)

    def purge(self) -> None:
        """Delete the controller's tasks that ended longer than ``retention`` ago."""
        ended_before = self.store.now() - self.config.retention
        purged = self.store.purge(self.config.name, ended_before, emitter=self.owner)
        if purged:
            self.store.logs.drop_orphans()  # a task's log goes with the task
            self._sweep_artifacts()  # and its files
            self.logger.info("Purged %d tasks that ended more than %g s ago.", purged, self.config.retention)
        self.expire_callbacks()

    def _sweep_artifacts(self) -> None:
        """Delete the artifacts of the tasks just purged (see :func:`..artifacts.sweep`)."""
        if not self.config.limits.artifacts_url:
            return
        try:
            sweep(ArtifactStorage(self.config.limits.artifacts_url), self.store)
        except OSError as exc:  # the next purge tries again
            self.logger.warning("Cannot delete the artifacts of purged tasks: %s", exc)

    def expire_callbacks(self) -> None:
        """Drop the callbacks still undelivered ``callback_max_age`` after their event: each one is logged,
        and counted in the store (``/mpc/health`` shows the count).

        Without a ``callback_url`` there is nobody to deliver to: the outbox entries older than the
        store's event retention are acknowledged instead, uncounted.
        """
        c = self.config
        if self._callbacks is None:
            cutoff = self.store.now() - self.store.event_retention
            while True:
                batch = self.store.unacked(c.name, _OUTBOX_BATCH)
                old = [event["cursor"] for event in batch if event["at"] < cutoff]
                if old:
                    self.store.ack(c.name, old)
                if len(old) < _OUTBOX_BATCH:
                    return
        for event in self.store.expire_callbacks(c.name, c.callback_max_age):
            self.logger.warning("The %s callback of task %s (cursor %s) was not delivered within %g s "
                                "(callback_max_age): it is dropped.", event["kind"], event["uuid"], event["cursor"],
                                c.callback_max_age)

    def reconcile(self) -> None:
        """Settle the active tasks of serving processes that died: ``lost``, or queued again (restartable,
        or with a saved state).

        Their leftover task processes on this host are killed first, but only a process
        that proves to be the task's own (see :func:`~.proctree.proven_task_process`):
        a row of the store is never enough. Callbacks those processes did not deliver
        are delivered from here.
        """
        c = self.config
        now = self.store.now()
        beats = self.store.heartbeats()
        active = self.store.active(c.name)
        self._recover_unattended(active)
        for row in active:
            owner = row.get("owner")
            if owner == self.owner or owner_alive(owner, self.host, beats, now, c.lease):
                continue
            if owner_host(owner) == self.host:
                if self.handover is not None and now - beats.get(owner or "", -defaults.LEASE) < defaults.HOLD_GRACE:
                    continue  # it died a moment ago: its fork server may be about to hold (and beat for) its tasks
                leftover = proven_task_process(row.get("pid"), row.get("pid_created"), row["uuid"])
                if leftover is not None and held_for_adoption(leftover):
                    continue  # its fork server hands it over, or settles it (see .handover)
                if leftover is not None:
                    kill_process_tree(leftover)
            self._settle_orphan(row, owner)
        self._deliver_orphaned_callbacks(beats, now)
        self._forget_dead_owners(beats, now)

    def _recover_unattended(self, active: list[Row]) -> None:
        """Give back the tasks the store says this process runs while no slot of it runs them.

        A claim can be written without its answer arriving (the connection broke after the
        store ran it; the claim asked again found the queue empty): the task would stay
        ``running`` under a live owner for ever. Such a task is returned to the queue once two
        reconciliations in a row saw it so, with no claim of this process under way meanwhile.
        """
        with self._runs_lock:
            claiming = self._open_claims > 0
            here = set(self._runs)
        seen, self._unattended = self._unattended, {}
        if claiming:
            return
        for row in active:
            uuid = row["uuid"]
            if row.get("owner") != self.owner or uuid in here:
                continue
            if seen.get(uuid) != row.get("attempt"):
                self._unattended[uuid] = row.get("attempt")
                continue
            self.written(lambda: self.store.requeue(uuid, owner=self.owner, emitter=self.owner, uncount=True),
                         before_publish=lambda _: self.logger.warning(
                             "Task %s was claimed by this process but never started (the claim's answer was lost); "
                             "it is queued again.", uuid))

    def _settle_orphan(self, row: Row, owner: Optional[str]) -> None:
        """``lost``, or queued again when the task class is restartable or the task saved a state (unless a
        stop of it was asked for: a task a client stopped is not brought back by the loss of its server)."""
        uuid = row["uuid"]
        resumable = row.get("state_saved_at") is not None and not row.get("stop_requested")
        if self.config.restartable or resumable:
            requeued = self.written(lambda: self.store.requeue(uuid, owner=owner, emitter=self.owner),
                                    before_publish=lambda _: self.logger.warning(
                                        "Task %s was cut off when its server (%s) died; queued again.", uuid, owner))
            if requeued is not None:
                return
        error = error_record("Lost", f"The serving process that ran this task ({owner}) died.")
        self.written(lambda: self.store.finish(uuid, TaskStatus.LOST.value, owner=owner, emitter=self.owner,
                                               error=error, errors=[*(row.get("errors") or []), error]),
                     before_publish=lambda _: self.logger.warning(
                         "Task %s was lost with the process that ran it (%s).", uuid, owner))

    def _deliver_orphaned_callbacks(self, beats: dict[str, float], now: float) -> None:
        if self._callbacks is None:
            return
        for event in self.store.unacked(self.config.name):
            emitter = event["emitter"]
            if emitter == self.owner or now - event["at"] < defaults.CALLBACK_ORPHAN_AGE:
                continue
            if emitter is None or not owner_alive(emitter, self.host, beats, now, self.config.lease):
                self._callbacks.offer(event)

    def _forget_dead_owners(self, beats: dict[str, float], now: float) -> None:
        """Drop the heartbeats of serving processes that are gone, so the table does not grow with crashes."""
        for owner, beat in beats.items():
            if owner != self.owner and now - beat > self.config.lease and not owner_alive(
                    owner, self.host, beats, now, self.config.lease):
                self.store.forget_owner(owner)

    # -- adoption (see .adoption) ------------------------------------------------

    @property
    def give_up_event(self) -> threading.Event:
        """Set when background threads must stop waiting for an unreachable store."""
        return self._give_up

    def new_supervisor(self, wake_fd: int, retrier: Retrier) -> Supervisor:
        """A supervisor for one controlling thread whose wake-ups arrive on ``wake_fd``."""
        return Supervisor(self.config.supervision, self.store, self.owner, self.logs, wake_fd, self.events.publish,
                          self.logger, retrier, self.progress)

    def take_over(self, owner: str, offers: Sequence[Offer], link: Link) -> Optional[list[int]]:
        """Take over the offered task processes of serving process ``owner``; the pids taken (None: refused).

        A process is taken only when the store says it runs an active task of ``owner`` (same pid,
        same create time); the store then records this process as the owner, in one write each.
        """
        if self.closing:
            return None
        c = self.config
        try:
            rows = {row.get("pid"): row for row in self.store.active(c.name) if row.get("owner") == owner}
        except StoreError as exc:
            self.logger.warning("Cannot take over the tasks of %s now: %s", owner, exc)
            return None
        accepted: list[int] = []
        for offer in offers:
            row = rows.get(offer.pid)
            if row is None or not adoptable(offer, row, c.fresh_process):
                continue
            uuid = row["uuid"]
            # The run is started before the adoption is published: its subscribers find it running here.
            if self.written(lambda: self._adopt(uuid, owner),
                            before_publish=lambda adopted: self._run_adopted(adopted, offer, link)) is None:
                continue
            self.logger.info("Task %s (pid %d) was adopted from %s, which ended.", uuid, offer.pid, owner)
            accepted.append(offer.pid)
        return accepted

    def register_adopted(self, run: TaskRun) -> None:
        """Note an adopted task as running here."""
        with self._runs_lock:
            self._runs[run.uuid] = run

    def adopted_run_ended(self, runner: AdoptedRun) -> None:
        with self._runs_lock:
            if runner in self._adopted:
                self._adopted.remove(runner)

    @staticmethod
    def retire(child: ChildProcess) -> None:
        """End a task process between tasks (a reused one): ask it to exit, kill it if it does not."""
        if not child.exited:
            child.send(Exit())
            if not wait_ready([child.exit_fd], 2.0):
                child.signal_tree(signal.SIGKILL)
                wait_ready([child.exit_fd], 2.0)
            child.read_exit()

    # -- running tasks ----------------------------------------------------------

    def register(self, run: TaskRun) -> None:
        """Note a claimed task as running here; this closes its claim (see :meth:`_open_claim`)."""
        with self._runs_lock:
            self._runs[run.uuid] = run
            self._open_claims -= 1

    def _adopt(self, uuid: str, owner: str) -> Optional[Event]:
        """Record this process as the owner of ``uuid`` (None: the store refused, or could not be reached)."""
        try:
            return self.store.adopt(uuid, owner, self.owner)
        except StoreError:
            return None

    def _run_adopted(self, adopted: Event, offer: Offer, link: Link) -> None:
        """Supervise the adopted task process from this process (see :class:`~.adoption.AdoptedRun`)."""
        link.add()
        runner = AdoptedRun(self, cast(Row, adopted["task"]), offer.child(link.signal_group), link)
        with self._runs_lock:
            self._adopted.append(runner)
        runner.start()

    def _open_claim(self) -> None:
        """A slot begins a claim: until it registers the task (or finds none), the task may be
        this process's in the store without a run here, and :meth:`_recover_unattended` waits."""
        with self._runs_lock:
            self._open_claims += 1

    def close_claim(self) -> None:
        """A claim ended without a task to register (none was claimed, or it was given back)."""
        with self._runs_lock:
            self._open_claims -= 1

    def unregister(self, run: TaskRun) -> None:
        with self._runs_lock:
            self._runs.pop(run.uuid, None)
            self._runs_changed.notify_all()

    def record(self, run: TaskRun, outcome: Outcome, retrier: Retrier,
               child: Optional[ChildProcess] = None, claim_next: bool = True) -> Optional[Claim]:
        """Store a task's outcome (or requeue it); an outage is waited out, so nothing is lost.

        The slot is free once this is recorded: a plain end claims the slot's next task in the same
        write (unless no claim may be made now). Returns the task claimed so, if any.

        :param child: the slot's task process, when it stays for the next task (a reused one): the
            claim records it, as :meth:`next_task` would.
        """
        claimed: Optional[Claim] = None
        if run.abandoned:
            self.logger.warning("Task %s was settled elsewhere while this process was unresponsive; its run "
                                "here was killed and is not recorded.", run.uuid)
            return None
        c = self.config
        tracing.record_run(c.name, run.uuid, run.traceparent, run.attempt, run.created_at, run.claimed_at,
                           outcome.fields.get("ended_at"), outcome.status.value, outcome.fields.get("error"))
        try:
            if (run.stop_reason is StopReason.SHUTDOWN and outcome.status is TaskStatus.STOPPED
                    and self._claimed_amid_shutdown(run)):
                if self.written(lambda: self.store.requeue(run.uuid, owner=self.owner, emitter=self.owner,
                                                           uncount=True), retrier, "returning a task to the queue",
                                before_publish=lambda _: self.logger.info(
                                    "Task %s was claimed as the server began to shut down; it is queued again.",
                                    run.uuid)) is not None:
                    return None
            if (run.stop_reason is StopReason.SHUTDOWN and (c.restartable or run.has_state)
                    and outcome.status is not TaskStatus.SUCCEEDED):
                if self.written(lambda: self.store.requeue(run.uuid, owner=self.owner, emitter=self.owner),
                                retrier, "requeueing a task", before_publish=lambda _: self.logger.info(
                                    "Task %s will run again after the restart.", run.uuid)) is not None:
                    return None
            if self._retry(run, outcome, retrier):
                return None
            fields = dict(outcome.fields)
            if fields.get("error") is not None:
                fields["errors"] = [*run.errors, fields["error"]]
            claim_next = claim_next and self.may_claim()
            if claim_next:
                self._open_claim()
                try:
                    event, claimed = retrier.call("recording a task's end",
                                                  lambda: self._finish_and_claim(run, outcome, child, fields))
                finally:
                    if claimed is None:
                        self.close_claim()
            else:
                event = retrier.call("recording a task's end", lambda: self.store.finish(
                    run.uuid, outcome.status.value, owner=self.owner, emitter=self.owner, **fields))
        except GaveUp:
            self.logger.error("Task %s ended %s while the store was unreachable, and this process is shutting "
                              "down: its end is not recorded (the next start settles it).", run.uuid,
                              outcome.status.value)
            return None
        if event is None:
            self.logger.warning("Task %s had already been settled elsewhere; its outcome %s is dropped.",
                                run.uuid, outcome.status.value)
            return None
        # Published here rather than through written(): the write's event comes with the claim made in
        # the same write, and the claim is closed (when it found nothing) before the end is published.
        if claim_next:  # the claim in the same write took the place (or found nothing queued)
            self._places_kept.add(event["cursor"])  # before publishing: _on_event reads it
        self.events.publish(event)
        return claimed

    def _finish_and_claim(self, run: TaskRun, outcome: Outcome, child: Optional[ChildProcess],
                          fields: dict[str, Any]) -> tuple[Optional[Event], Optional[Claim]]:
        c = self.config
        if child is None:
            event, row = self.store.finish_and_claim(run.uuid, outcome.status.value, self.owner, c.name,
                                                     c.max_num_process, self.claim_rules(), **fields)
            return event, None if row is None else Claim(row, None)
        event, claimed = self.store.finish_and_claim_started(
            run.uuid, outcome.status.value, self.owner, c.name, c.max_num_process, child.pid,
            child.create_time or 0.0, self.claim_rules(), **fields)
        return event, None if claimed is None else Claim(*claimed)

    def _claimed_amid_shutdown(self, run: TaskRun) -> bool:
        """Whether ``run`` was claimed just after a sibling began to shut down (this process had not
        been told yet): such a task is given back rather than recorded as stopped by the shutdown.

        "Just after" reaches a whole hold past the hold the sibling's end began: a slot that hold kept
        from claiming claims the moment it lapses, which is a hold after this process *read* the end,
        so later than a hold after the end was written (by the feed's delay and the claim's own time).
        However late this process handles its own signal, a task it claimed after a sibling's shutdown and before
        its own, when the two are one shutdown (:data:`~..defaults.SIBLING_SHUTDOWN_SPAN` apart at most), is
        given back too.
        """
        claimed = run.claimed_at
        if claimed is None:
            return False
        self.events.catch_up()  # what the siblings did may not have been read yet
        window = 2 * defaults.SIBLING_SHUTDOWN_HOLD
        began = self._shutdown_began
        return any(0.0 <= claimed - at <= window or (
            began is not None and at <= claimed <= began and began - at <= defaults.SIBLING_SHUTDOWN_SPAN)
            for at in list(self._sibling_shutdowns)) or self._sibling_shutdown_stored(claimed, window)

    def _sibling_shutdown_stored(self, claimed: float, window: float) -> bool:
        """Whether the store shows a task of this controller that another serving process's shutdown stopped
        at most ``window`` seconds before ``claimed``: the feed may not have brought that end to this process
        before the claim and its own shutdown (both a moment apart under load)."""
        try:
            rows = self.store.list_tasks(self.config.name, statuses=[TaskStatus.STOPPED.value], limit=50)
        except StoreError:
            return False
        for row in rows:
            error, ended = row.get("error") or {}, row.get("ended_at")
            if (error.get("type") == "Shutdown" and row.get("owner") != self.owner and ended is not None
                    and 0.0 <= claimed - ended <= window):
                return True
        return False

    def _retry(self, run: TaskRun, outcome: Outcome, retrier: Retrier) -> bool:
        """Queue the task again if its class retries this end (see :mod:`.retries`); True when it was."""
        policy = self.config.retry_policy
        error = outcome.fields.get("error")
        stopped = run.stop_reason in (StopReason.REQUESTED, StopReason.FINISH, StopReason.SHUTDOWN,
                                      StopReason.PAUSE_EXPIRED)
        delay = policy.next_delay(outcome.status.value, error, outcome.retry_match, stopped, len(run.errors))
        if delay is None:
            return False
        fields = {"errors": [*run.errors, error], "progress": outcome.fields.get("progress"),
                  "percent": outcome.fields.get("percent")}
        retried = self.written(
            lambda: self.store.retry(run.uuid, delay, owner=self.owner, emitter=self.owner, **fields), retrier,
            "queueing a retry", before_publish=lambda _: self.logger.warning(
                "Task %s %s on attempt %s (%s: %s); retry %d of %d in %.1f s.%s", run.uuid, outcome.status.value,
                run.attempt, (error or {}).get("type"), (error or {}).get("message"), len(run.errors) + 1,
                policy.max_retries, delay, traceback_suffix(error)))
        return retried is not None  # None: stopped or settled elsewhere meanwhile (its end is recorded as usual)

    def fail(self, uuid: str, exc: BaseException, retrier: Retrier) -> None:
        """Record that the controlling thread itself failed to run task ``uuid``."""
        error = clip_error(error_record("ControllerError", f"The controller failed to run the task: {exc}"),
                           self.config.limits.message_bytes)
        try:
            self.written(lambda: self.store.finish(uuid, TaskStatus.FAILED.value, owner=self.owner,
                                                   emitter=self.owner, error=error), retrier, "recording a task's failure")
        except GaveUp:
            pass

    def _let_running_tasks_finish(self, hand_over: bool) -> None:
        """``shutdown_wait``: claim nothing more, and give the running tasks that long to end on their own."""
        wait = self.config.shutdown_wait
        if wait <= 0 or not self._no_successor_expected(hand_over):
            return
        self.stop_claiming()
        deadline = time.monotonic() + wait
        with self._runs_lock:
            if self._runs:
                self.logger.warning("Shutting down: waiting up to %g s for %d running task(s) to finish.",
                                    wait, len(self._runs))
            while self._runs and self._runs_changed.wait(max(0.0, deadline - time.monotonic())):
                pass

    def _no_successor_expected(self, hand_over: bool) -> bool:
        """Whether no sibling process is expected to take over this one's running tasks (then they are
        given ``shutdown_wait`` to finish here): with the hand-over, one is when another serving process
        of the controller on this host listens for adoptions."""
        if not hand_over or self.handover is None:
            return True
        return not live_adopters(self.handover.directory)

    # -- shutdown -------------------------------------------------------------

    def shutdown(self, timeout: Optional[float] = None, hand_over: bool = False) -> bool:
        """Stop taking tasks, stop or hand over the running ones and release everything.

        An unreachable store is waited for at most until the running tasks had the time
        to stop (``stop_grace`` plus the kill escalation, or ``timeout``).

        :param hand_over: leave the running tasks to the fork server for another serving process
            to adopt (see :mod:`.handover`) when the hand-over is armed; else they are stopped.
        :returns: whether the tasks were handed over.
        """
        try:
            self._shutdown_began = self.store.now()
        except StoreError:
            self._shutdown_began = time.time()
        if self._listener is not None:
            self._listener.stop()  # adopt nothing more
        self._let_running_tasks_finish(hand_over)
        with self._work:
            self.closing = True
            self._work.notify_all()
        with self._runs_lock:
            runs = list(self._runs.values())
        hand_over = hand_over and self.handover is not None
        if hand_over and runs:
            with self._runs_lock:
                links = {id(runner.link): runner.link for runner in self._adopted}
            try:  # so that no reconciliation elsewhere settles them in the moment before their holders beat
                for holder in {self.fork_server.pid, *(link.holder for link in links.values())}:
                    self.store.heartbeat(held_key(self.owner, holder))
            except StoreError:
                pass
            self.logger.warning("Shutting down: %d running task(s) go on, for another serving process of the app "
                                "on this host to adopt within %g s.", len(runs), self.config.handover_window)
            self.fork_server.release_tasks()  # before the runs stop watching: no end may go unread
            for link in links.values():
                link.release()
            for run in runs:
                run.release()
        elif runs:
            self.logger.warning("Shutting down: stopping %d running task(s); those that ignore the stop are "
                                "killed after %g s.", len(runs), self.config.stop_grace)
        for run in runs if not hand_over else ():
            run.request_stop(StopReason.SHUTDOWN)
        self.scheduler.stop()
        for slot in self._slots:
            slot.wake()
        grace = self.config.stop_grace + defaults.KILL_AFTER_TERM + defaults.SHUTDOWN_MARGIN
        deadline = time.monotonic() + (grace if timeout is None else timeout)
        for slot in self._slots:
            if slot.is_alive():
                slot.join(max(0.0, deadline - time.monotonic()))
        with self._runs_lock:
            adopted = list(self._adopted)
        for runner in adopted:
            runner.join(max(0.0, deadline - time.monotonic()))
        self._give_up.set()
        for slot in self._slots:
            slot.wake()
            if slot.is_alive():
                slot.join()
        for runner in adopted:
            runner.wake()
            runner.join()
        self.progress.close()  # the slots ended: nothing more is marked
        self._keeper.stop()
        self.events.stop()
        if self._callbacks is not None:
            self._callbacks.close()
        try:
            self.store.forget_owner(self.owner)
        except StoreError:  # the lease covers it
            self.logger.warning("Could not remove this process's heartbeat from the store.")
        self.logs.stop()
        self._waiters.wake_all()
        return hand_over
