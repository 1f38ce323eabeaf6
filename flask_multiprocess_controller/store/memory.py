"""An in-process store: fast, for tests and throwaway use; nothing survives the process."""
from __future__ import annotations

import collections
import copy
import heapq
import itertools
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, cast

from .. import defaults
from ..events import CALLBACK_KINDS, Changes, Event, EventKind
from ..exceptions import InvalidTransition, QueueFull, TaskAlreadyFinished, TaskNotFound
from ..exceptions import IdempotentReplay
from ..states import ACTIVE, TERMINAL, TaskStatus
from .claimrules import NO_RULES, ClaimRules, fits, host_usage
from .base import (
    ANY_TENANT, _finish_fields, FireOutcome, Fired, Row, ScheduleRow, TaskStore, encoded_size, event_payload,
    event_task, owner_host, parse_counter,
)
from .base import Idempotency
from .base import usage_fields
from .base import ProgressWrite
from .base import Timing, timing_of
from .schema import COLUMNS, Encoding, columns_encoded

if TYPE_CHECKING:
    from .logbook import LogBook

_QUEUED = TaskStatus.QUEUED.value
_ACTIVE = frozenset(s.value for s in ACTIVE)
_TERMINAL = frozenset(s.value for s in TERMINAL)
#: What a boolean field not given holds (as SQLite, PostgreSQL and Redis read it back): False.
_UNSET_BOOLEANS = dict.fromkeys(columns_encoded(Encoding.BOOLEAN), False)


def _shown(row: Row) -> Row:
    """A copy of ``row`` as lists and the writes that answer with a task give it: less its saved state."""
    return cast(Row, copy.deepcopy(event_task(row)))


class MemoryStore(TaskStore):
    """Tasks in a dict, guarded by one lock; queues as heaps with lazy deletion; events in a list.

    :param clock: the store's clock (:meth:`now`), UNIX seconds; tests pass a fake one to step
        leases, retries and schedules through time without waiting.
    """

    shared = False

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # Guards every attribute below; notified whenever an event is appended (wakes ``changes``).
        self._lock = threading.Condition(threading.Lock())
        self._rows: dict[str, Row] = {}
        #: The tenant index: each (controller, tenant)'s tasks by uuid, in ``seq`` order (insertion order).
        self._tenants: dict[tuple[str, Optional[str]], dict[str, Row]] = {}
        self._queues: dict[str, list[tuple[int, int, str]]] = {}
        self._seq = itertools.count(1)
        self._heartbeats: dict[str, float] = {}
        #: The feed, oldest first; cursors are consecutive integers.
        self._events: list[Event] = []
        #: The size of each event of the feed (:func:`encoded_size` of its task), in the same order.
        self._sizes: list[int] = []
        #: The sum of ``_sizes``: what ``max_event_bytes`` bounds.
        self._event_bytes = 0
        self._last_cursor = 0
        #: Every event with a cursor up to this one was pruned.
        self._pruned = 0
        #: Unacknowledged callback events per controller, by cursor (insertion order = cursor order).
        self._outbox: dict[str, dict[int, Event]] = {}
        #: Callbacks dropped undelivered for their age, per controller.
        self._dropped: dict[str, int] = {}
        #: Tasks waiting for their ``retry_at`` per controller: heaps of (retry_at, uuid), lazily deleted.
        self._delayed: dict[str, list[tuple[float, str]]] = {}
        #: Leases by name: (holder, expiry time).
        self._leases: dict[str, tuple[str, float]] = {}
        #: Schedule states by (controller, name).
        self._schedules: dict[tuple[str, str], ScheduleRow] = {}
        #: Drained hosts -> since when.
        self._drained: dict[str, float] = {}
        #: Idempotency records: scoped key -> (the uuids it made, fingerprint, expiry time).
        self._idempotency: dict[str, tuple[list[str], str, float]] = {}
        #: Fair share's memory: per controller, each tenant's last claim (a counter that grows with every claim
        #: recorded), so that tenants tied on their active tasks take turns.
        self._last_claims: dict[str, dict[Optional[str], int]] = {}
        self._claim_counter = itertools.count(1)

    # -- helpers (called with the lock held) --------------------------------------------------------------

    def _emit(self, kind: EventKind, row: Row, emitter: Optional[str], at: float) -> Event:
        """Append the event of a change of ``row`` to the feed (and the outbox); return a copy."""
        self._last_cursor += 1
        event = Event(cursor=str(self._last_cursor), kind=kind.value, uuid=row["uuid"],
                      controller=row["controller"], at=at, emitter=emitter,
                      task=copy.deepcopy(event_payload(kind.value, row)))
        size = encoded_size(event["task"])
        self._events.append(event)
        self._sizes.append(size)
        self._event_bytes += size
        if event["kind"] in CALLBACK_KINDS:
            self._outbox.setdefault(row["controller"], {})[self._last_cursor] = event
        # Amortised: past a bound, prune 1% below it, so that the next writes prune nothing.
        if self._event_bytes > self.max_event_bytes or len(self._events) > self.max_events + self.max_events // 100:
            self._prune_to(self._last_cursor - self.max_events, self.max_event_bytes - self.max_event_bytes // 100)
        self._lock.notify_all()
        return copy.deepcopy(event)

    def _of(self, controller: str, tenant: Any) -> Iterable[Row]:
        """The stored rows of the controller's tasks; of one tenant's only (from the tenant index) unless ANY_TENANT."""
        if tenant is ANY_TENANT:
            return [r for r in self._rows.values() if r["controller"] == controller]
        return list(self._tenants.get((controller, tenant), {}).values())

    def _unindex_tenant(self, row: Row) -> None:
        """Take a deleted task out of the tenant index (an emptied tenant's entry goes too)."""
        key = (row["controller"], row.get("tenant"))
        tasks = self._tenants.get(key)
        if tasks is not None:
            tasks.pop(row["uuid"], None)
            if not tasks:
                del self._tenants[key]

    def _owned_active(self, uuid: str, owner: Optional[str]) -> Optional[Row]:
        row = self._rows.get(uuid)
        if row is None or row["status"] not in _ACTIVE or (owner is not None and row["owner"] != owner):
            return None
        return row

    def _prune_events(self, now: float) -> None:
        """Drop the events older than the retention, beyond the newest ``max_events`` or ``max_event_bytes``."""
        cutoff = now - self.event_retention
        too_old = next((i for i, e in enumerate(self._events) if e["at"] >= cutoff), len(self._events))
        self._prune_to(max(self._pruned + too_old, self._last_cursor - self.max_events), self.max_event_bytes)

    def _prune_to(self, bound: int, max_bytes: int) -> None:
        """Drop the events with a cursor up to ``bound``, and then the oldest until the rest fit
        ``max_bytes``. The outbox keeps its own entries (see :meth:`expire_callbacks`)."""
        drop = max(0, bound - self._pruned)  # self._events[i] has the cursor self._pruned + 1 + i
        excess = self._event_bytes - sum(self._sizes[:drop]) - max_bytes
        while excess > 0 and drop < len(self._sizes):
            excess -= self._sizes[drop]
            drop += 1
        if drop == 0:
            return
        self._event_bytes -= sum(self._sizes[:drop])
        del self._events[:drop]
        del self._sizes[:drop]
        self._pruned += drop

    # -- writes --------------------------------------------------------------------------------------------

    def enqueue(self, rows: Sequence[Row], max_queued: int, emitter: Optional[str] = None,
                idempotency: Optional[Idempotency] = None) -> list[Event]:
        if not rows:
            return []
        with self._lock:
            controller = rows[0]["controller"]
            now = self._clock()
            if idempotency is not None:
                found = self._idempotency.get(idempotency.key)
                if found is not None and found[2] > now:
                    raise IdempotentReplay(found[0], found[1])
            if max_queued >= 0 and self._queued_count(controller) + len(rows) > max_queued:
                raise QueueFull(max_queued, defaults.RETRY_AFTER)
            events = [self._insert(given, emitter, now) for given in rows]
            if idempotency is not None:
                self._idempotency[idempotency.key] = (
                    [row["uuid"] for row in rows], idempotency.fingerprint, now + idempotency.ttl)
            return events

    def _insert(self, given: Row, emitter: Optional[str], now: float) -> Event:
        """Store a new queued task (writing its ``seq`` into ``given``); return its ``queued`` event."""
        row: Row = {**dict.fromkeys(COLUMNS), **_UNSET_BOOLEANS,  # type: ignore[typeddict-item]
                    **copy.deepcopy(given)}
        row["seq"] = given["seq"] = next(self._seq)
        self._rows[row["uuid"]] = row
        self._tenants.setdefault((row["controller"], row.get("tenant")), {})[row["uuid"]] = row
        self._push_ready(row)
        return self._emit(EventKind.QUEUED, row, emitter, now)

    def _push_ready(self, row: Row) -> None:
        heapq.heappush(self._queues.setdefault(row["controller"], []), (row["priority"], row["seq"], row["uuid"]))

    def _queued_count(self, controller: str) -> int:
        return sum(1 for r in self._rows.values() if r["controller"] == controller and r["status"] == _QUEUED)

    def _promote_due(self, controller: str, now: float) -> None:
        """Move the controller's tasks whose ``retry_at`` has come into the ready queue."""
        delayed = self._delayed.get(controller, [])
        while delayed and delayed[0][0] <= now:
            retry_at, uuid = heapq.heappop(delayed)
            row = self._rows.get(uuid)
            if row is not None and row["status"] == _QUEUED and row["retry_at"] == retry_at:
                row["retry_at"] = None
                self._push_ready(row)

    def claim(self, controller: str, owner: str, max_running: int, rules: ClaimRules = NO_RULES) -> Optional[Row]:
        with self._lock:
            row = self._claim(controller, owner, max_running, rules)
            return None if row is None else copy.deepcopy(row)

    def claim_started(self, controller: str, owner: str, max_running: int, pid: int,
                      pid_created: float, rules: ClaimRules = NO_RULES) -> Optional[tuple[Row, Event]]:
        with self._lock:
            return self._claim_started(controller, owner, max_running, pid, pid_created, rules)

    def finish_and_claim(self, uuid: str, status: str, owner: str, controller: str, max_running: int,
                         rules: ClaimRules = NO_RULES, **fields: Any) -> tuple[Optional[Event], Optional[Row]]:
        fields = _finish_fields(status, fields)
        with self._lock:
            event = self._finish_locked(uuid, status, owner, owner, fields)
            row = None if event is None else self._claim(controller, owner, max_running, rules)
            return event, None if row is None else copy.deepcopy(row)

    def finish_and_claim_started(self, uuid: str, status: str, owner: str, controller: str, max_running: int,
                                 pid: int, pid_created: float, rules: ClaimRules = NO_RULES,
                                 **fields: Any) -> tuple[Optional[Event], Optional[tuple[Row, Event]]]:
        fields = _finish_fields(status, fields)
        with self._lock:
            event = self._finish_locked(uuid, status, owner, owner, fields)
            return event, None if event is None else self._claim_started(controller, owner, max_running, pid,
                                                                         pid_created, rules)

    def _claim_started(self, controller: str, owner: str, max_running: int, pid: int,
                       pid_created: float, rules: ClaimRules) -> Optional[tuple[Row, Event]]:
        """:meth:`claim_started` under the lock."""
        row = self._claim(controller, owner, max_running, rules)
        if row is None:
            return None
        row.update({"pid": pid, "pid_created": pid_created})
        return copy.deepcopy(row), self._emit(EventKind.STARTED, row, owner, self._clock())

    def _claim(self, controller: str, owner: str, max_running: int, rules: ClaimRules) -> Optional[Row]:
        """:meth:`claim` under the lock: the stored row itself (callers copy it)."""
        mine = [r for r in self._rows.values() if r["controller"] == controller and r["status"] in _ACTIVE]
        if len(mine) >= max_running:
            return None
        if rules.host is not None and rules.host in self._drained:
            return None
        self._promote_due(controller, self._clock())
        queue = self._queues.get(controller, [])
        while queue and not self._ready_entry(queue[0]):
            heapq.heappop(queue)  # stale entries off the top: the top is the oldest ready task, if any
        if not queue:
            return None
        if rules.plain and (not rules.fair or sum(1 for of, _ in self._tenants if of == controller) == 1):
            row = self._rows[heapq.heappop(queue)[2]]  # the oldest, as fair share would with one tenant
        else:
            chosen = self._choose(controller, queue, mine, rules)
            if chosen is None:
                return None
            if chosen == queue[0]:
                heapq.heappop(queue)
            else:
                queue.remove(chosen)
                heapq.heapify(queue)
            row = self._rows[chosen[2]]
        if rules.fair:
            self._last_claims.setdefault(controller, {})[row.get("tenant")] = next(self._claim_counter)
        row.update({"status": TaskStatus.RUNNING.value, "owner": owner, "started_at": self._clock(),
                    "attempt": row["attempt"] + 1})
        return row

    def _ready_entry(self, entry: tuple[int, int, str]) -> bool:
        """Whether a queue entry stands for a ready task: stale once its task left the queue, moved to another
        priority or waits for a retry."""
        row = self._rows.get(entry[2])
        return (row is not None and row["status"] == _QUEUED and row["priority"] == entry[0]
                and row["retry_at"] is None)

    def _choose(self, controller: str, queue: list[tuple[int, int, str]], mine: list[Row],
                rules: ClaimRules) -> Optional[tuple[int, int, str]]:
        """The queue entry of the task ``rules`` let a claim take (see :mod:`.claimrules`), or None; ``mine`` are
        the controller's active tasks.

        Reads the queue in order (a copy of the heap, popped lazily) and stops at the first eligible task,
        or with fair share once every tenant that may be claimed offered its first one (or the priority changed).
        """
        per_tenant = collections.Counter(r.get("tenant") for r in mine)
        per_key = collections.Counter(r.get("concurrency_key") for r in mine)
        capacity = None if rules.host is None else rules.capacity  # no host: no capacity to count against
        used: dict[str, float] = {}
        if capacity is not None:
            used = host_usage(r for r in self._rows.values() if r["status"] in _ACTIVE and r.get("resources")
                              and owner_host(r.get("owner") or "") == rules.host)

        def eligible(row: Row) -> bool:
            tenant, key = row.get("tenant"), row.get("concurrency_key")
            return (tenant not in rules.held_tenants
                    and (key is None or rules.max_per_key is None or per_key[key] < rules.max_per_key)
                    and (tenant is None or rules.max_per_tenant is None or per_tenant[tenant] < rules.max_per_tenant)
                    and fits(row.get("resources"), used, capacity))

        def in_order() -> Iterator[tuple[int, int, str]]:
            entries = list(queue)
            while entries:
                entry = heapq.heappop(entries)
                if self._ready_entry(entry):
                    yield entry

        wanted = {tenant for of, tenant in self._tenants if of == controller} - set(rules.held_tenants)
        if rules.max_per_tenant is not None:
            wanted -= {tenant for tenant, n in per_tenant.items() if tenant is not None and n >= rules.max_per_tenant}
        # The first eligible task of each tenant, at the lowest priority value that has one.
        firsts: dict[Optional[str], tuple[int, int, str]] = {}
        for entry in in_order():
            if firsts and (entry[0] != next(iter(firsts.values()))[0] or len(firsts) >= len(wanted)):
                break
            row = self._rows[entry[2]]
            if row.get("tenant") in firsts or not eligible(row):
                continue
            if not rules.fair:
                return entry
            firsts[row.get("tenant")] = entry
        if not firsts:
            return None
        last = self._last_claims.get(controller, {})  # never claimed: 0, first
        return min(firsts.items(), key=lambda item: (per_tenant[item[0]], last.get(item[0], 0), item[1]))[1]

    def start(self, uuid: str, owner: str, pid: int, pid_created: float) -> Optional[Event]:
        with self._lock:
            row = self._owned_active(uuid, owner)
            if row is None:
                return None
            row.update({"pid": pid, "pid_created": pid_created})
            return self._emit(EventKind.STARTED, row, owner, self._clock())

    def progress(self, uuid: str, owner: str, progress: Any, percent: Optional[float],
                 usage: Optional[Mapping[str, Any]] = None) -> Optional[Event]:
        with self._lock:
            return self._progress_locked(uuid, owner, progress, percent, usage)

    def progress_many(self, owner: str, writes: Sequence[ProgressWrite]) -> list[Optional[Event]]:
        with self._lock:  # one hold of the lock: the batch is one step
            return [self._progress_locked(write.uuid, owner, write.progress, write.percent, write.usage)
                    for write in writes]

    def _progress_locked(self, uuid: str, owner: str, progress: Any, percent: Optional[float],
                         usage: Optional[Mapping[str, Any]]) -> Optional[Event]:
        row = self._owned_active(uuid, owner)
        if row is None:
            return None
        row.update({"progress": copy.deepcopy(progress), "percent": percent})
        row.update(usage_fields(usage))  # type: ignore[typeddict-item]
        return self._emit(EventKind.PROGRESS, row, owner, self._clock())

    def save_state(self, uuid: str, owner: str, state: Any) -> bool:
        with self._lock:
            row = self._owned_active(uuid, owner)
            if row is None:
                return False
            row.update({"state": copy.deepcopy(state), "state_saved_at": self._clock()})
            return True

    def _finish(self, uuid: str, status: str, owner: Optional[str], emitter: Optional[str],
                fields: dict[str, Any]) -> Optional[Event]:
        with self._lock:
            return self._finish_locked(uuid, status, owner, emitter, fields)

    def _finish_locked(self, uuid: str, status: str, owner: Optional[str], emitter: Optional[str],
                       fields: dict[str, Any]) -> Optional[Event]:
        row = self._owned_active(uuid, owner)
        if row is None:
            return None
        now = self._clock()
        row.update({"ended_at": now, **copy.deepcopy(fields), "status": status})  # type: ignore[typeddict-item]
        return self._emit(EventKind.ENDED, row, emitter, now)

    def requeue(self, uuid: str, owner: Optional[str] = None, emitter: Optional[str] = None,
                uncount: bool = False) -> Optional[Event]:
        with self._lock:
            row = self._owned_active(uuid, owner)
            if row is None:
                return None
            if uncount:
                row["attempt"] = max(0, row["attempt"] - 1)
            row.update({"status": _QUEUED, "owner": None, "pid": None, "pid_created": None, "started_at": None,
                        "stop_requested": False})
            heapq.heappush(self._queues.setdefault(row["controller"], []), (row["priority"], row["seq"], uuid))
            return self._emit(EventKind.REQUEUED, row, owner if emitter is None else emitter, self._clock())

    def adopt(self, uuid: str, owner: str, new_owner: str) -> Optional[Event]:
        with self._lock:
            row = self._owned_active(uuid, owner)
            if row is None:
                return None
            row["owner"] = new_owner
            return self._emit(EventKind.ADOPTED, row, new_owner, self._clock())

    def request_stop(self, uuid: str, emitter: Optional[str] = None, *,
                     finish: bool = False) -> tuple[Row, Optional[Event]]:
        with self._lock:
            row = self._rows.get(uuid)
            if row is None:
                raise TaskNotFound(uuid)
            if row["status"] in _TERMINAL:
                raise TaskAlreadyFinished(uuid, row["status"])
            event = self._stop_one(row, emitter, self._clock(), finish)
            return _shown(row), event

    def _stop_one(self, row: Row, emitter: Optional[str], now: float, finish: bool = False) -> Optional[Event]:
        """Stop a task that is not terminal: what :meth:`request_stop` and :meth:`stop_all` do to each."""
        if row["status"] == _QUEUED:
            row.update({"status": TaskStatus.STOPPED.value, "ended_at": now, "stop_requested": True})
            return self._emit(EventKind.ENDED, row, emitter, now)
        if row["status"] in (TaskStatus.RUNNING.value, TaskStatus.PAUSED.value):
            row.update({"status": TaskStatus.STOPPING.value, "stop_requested": True, "finish_requested": finish})
            return self._emit(EventKind.STOPPING, row, emitter, now)
        return None

    def purge(self, controller: str, ended_before: float, emitter: Optional[str] = None) -> int:
        with self._lock:
            now = self._clock()
            doomed = [r for r in self._rows.values()
                      if r["controller"] == controller and r["status"] in _TERMINAL
                      and r["ended_at"] is not None and r["ended_at"] < ended_before]
            for row in doomed:
                del self._rows[row["uuid"]]
                self._unindex_tenant(row)
                self._emit(EventKind.PURGED, row, emitter, now)
            self._prune_events(now)
            for key in [k for k, (_, _, expires) in self._idempotency.items() if expires <= now]:
                del self._idempotency[key]
            return len(doomed)

    # -- task policies -------------------------------------------------------------------------------------

    def _retry(self, uuid: str, delay: float, owner: Optional[str], emitter: Optional[str],
               fields: dict[str, Any]) -> Optional[Event]:
        with self._lock:
            row = self._owned_active(uuid, owner)
            if row is None or row["stop_requested"]:
                return None
            now = self._clock()
            row.update({**copy.deepcopy(fields), "status": _QUEUED, "owner": None,  # type: ignore[typeddict-item]
                        "pid": None, "pid_created": None, "started_at": None, "retry_at": now + delay})
            heapq.heappush(self._delayed.setdefault(row["controller"], []), (now + delay, uuid))
            return self._emit(EventKind.REQUEUED, row, emitter, now)

    def next_retry_at(self, controller: str) -> Optional[float]:
        with self._lock:
            delayed = self._delayed.get(controller, [])
            while delayed:
                retry_at, uuid = delayed[0]
                row = self._rows.get(uuid)
                if row is not None and row["status"] == _QUEUED and row["retry_at"] == retry_at:
                    return retry_at
                heapq.heappop(delayed)  # stale: stopped or promoted meanwhile
            return None

    def _transition(self, uuid: str, wanted: str, change: str, needs: str, kind: EventKind,
                    emitter: Optional[str]) -> tuple[Row, Optional[Event]]:
        """Move a task from ``needs`` to ``wanted`` (no change if it is ``wanted`` already)."""
        with self._lock:
            row = self._rows.get(uuid)
            if row is None:
                raise TaskNotFound(uuid)
            status = row["status"]
            if status in _TERMINAL:
                raise TaskAlreadyFinished(uuid, status)
            if status == wanted:
                return _shown(row), None
            if status != needs:
                raise InvalidTransition(uuid, status, change, needs)
            row["status"] = wanted
            return _shown(row), self._emit(kind, row, emitter, self._clock())

    def reprioritise(self, uuid: str, priority: int, emitter: Optional[str] = None) -> tuple[Row, Event]:
        with self._lock:
            row = self._rows.get(uuid)
            if row is None:
                raise TaskNotFound(uuid)
            if row["status"] in _TERMINAL:
                raise TaskAlreadyFinished(uuid, row["status"])
            if row["status"] != _QUEUED:
                raise InvalidTransition(uuid, row["status"], "re-prioritised", _QUEUED)
            row["priority"] = priority
            if row["retry_at"] is None:
                self._push_ready(row)  # the entry at the old priority is now stale
            return _shown(row), self._emit(EventKind.QUEUED, row, emitter, self._clock())

    def stop_all(self, controller: str, emitter: Optional[str] = None, *, tenant: Any = ANY_TENANT) -> list[Event]:
        with self._lock:
            now = self._clock()
            mine = sorted(self._of(controller, tenant), key=lambda r: r["seq"])
            events = []
            for row in [r for r in mine if r["status"] == _QUEUED] + [r for r in mine if r["status"] != _QUEUED]:
                if row["status"] not in _TERMINAL:
                    event = self._stop_one(row, emitter, now)
                    if event is not None:
                        events.append(event)
            return events

    # -- leases and schedules --------------------------------------------------------------------------------

    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        with self._lock:
            now = self._clock()
            holder = self._leases.get(name)
            if holder is not None and holder[0] != owner and holder[1] > now:
                return False
            self._leases[name] = (owner, now + ttl)
            return True

    def release_lease(self, name: str, owner: str) -> None:
        with self._lock:
            if self._leases.get(name, ("", 0.0))[0] == owner:
                del self._leases[name]

    def declare_schedules(self, controller: str, specs: Mapping[str, dict[str, Any]], owner: str) -> None:
        with self._lock:
            now = self._clock()
            for name, spec in specs.items():
                state = self._schedules.setdefault((controller, name), ScheduleRow(
                    controller=controller, name=name, spec={}, fired_until=now, last_fired=None, last_task=None,
                    skipped=0, last_skipped=None, seen_at=now, declared_by=owner))
                state.update({"spec": copy.deepcopy(dict(spec)), "seen_at": now, "declared_by": owner})

    def schedules(self, controller: str) -> list[ScheduleRow]:
        with self._lock:
            return [copy.deepcopy(state) for (ctl, name), state in sorted(self._schedules.items())
                    if ctl == controller]

    def fire(self, controller: str, name: str, firing: float, row: Optional[Row], max_queued: int,
             emitter: Optional[str] = None) -> Fired:
        with self._lock:
            state = self._schedules.get((controller, name))
            if state is None or firing <= state["fired_until"]:
                return Fired(FireOutcome.STALE, None)
            state["fired_until"] = firing
            if row is None:
                return Fired(FireOutcome.MISSED, None)
            if 0 <= max_queued <= self._queued_count(controller):
                state.update({"skipped": state["skipped"] + 1, "last_skipped": firing})
                return Fired(FireOutcome.FULL, None)
            event = self._insert(row, emitter, self._clock())
            state.update({"last_fired": firing, "last_task": row["uuid"]})
            return Fired(FireOutcome.QUEUED, event)

    # -- the change feed and the outbox -------------------------------------------------------------------

    def _changes(self, since: str, limit: int, tenant: Any = ANY_TENANT, max_bytes: Optional[int] = None) -> Changes:
        after = parse_counter(since)
        with self._lock:
            if after is None or after < self._pruned or after > self._last_cursor:
                return Changes([], str(self._last_cursor), True)
            # Cursors are consecutive: the event after ``after`` sits at a known index.
            start = after - self._pruned
            found: list[Event] = []
            taken = 0
            cursor = since
            for index in range(start, len(self._events)):
                event = self._events[index]
                cursor = event["cursor"]
                if tenant is not ANY_TENANT and event["task"].get("tenant") != tenant:
                    continue
                found.append(event)
                taken += self._sizes[index]
                if len(found) >= limit or (max_bytes is not None and taken >= max_bytes):
                    break
            events = copy.deepcopy(found)
        # Filtered out or not, every event up to ``cursor`` was looked at.
        return Changes(events, cursor, False)

    def _wait_for_changes(self, since: str, timeout: float, foreign_only: bool = False) -> None:
        after = parse_counter(since)
        interrupts = self._interrupts
        with self._lock:
            self._lock.wait_for(lambda: after is None or self._last_cursor > after or self._interrupts != interrupts,
                                timeout)

    def _wake_waits(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def latest_cursor(self) -> str:
        with self._lock:
            return str(self._last_cursor)

    def unacked(self, controller: str, limit: int = 100) -> list[Event]:
        with self._lock:
            return copy.deepcopy(list(itertools.islice(self._outbox.get(controller, {}).values(), limit)))

    def ack(self, controller: str, cursors: Iterable[str]) -> None:
        with self._lock:
            entries = self._outbox.get(controller, {})
            for cursor in cursors:
                number = parse_counter(cursor)
                if number is not None:
                    entries.pop(number, None)

    def expire_callbacks(self, controller: str, max_age: float) -> list[Event]:
        with self._lock:
            cutoff = self._clock() - max_age
            entries = self._outbox.get(controller, {})
            doomed = [cursor for cursor, event in entries.items() if event["at"] < cutoff]
            dropped = [entries.pop(cursor) for cursor in doomed]
            self._dropped[controller] = self._dropped.get(controller, 0) + len(dropped)
            return dropped

    def callbacks_dropped(self, controller: str) -> int:
        with self._lock:
            return self._dropped.get(controller, 0)

    # -- reads ---------------------------------------------------------------------------------------------

    def get(self, uuid: str) -> Optional[Row]:
        with self._lock:
            row = self._rows.get(uuid)
            return None if row is None else copy.deepcopy(row)

    def find_by_prefix(self, prefix: str, limit: int = 10) -> list[Row]:
        with self._lock:
            rows = [r for uuid, r in self._rows.items() if uuid.startswith(prefix)]
            rows.sort(key=lambda r: r["seq"], reverse=True)
            return [_shown(r) for r in rows[:limit]]

    def list_tasks(self, controller: str, statuses: Optional[Iterable[str]] = None, limit: int = 100,
                   before: Optional[int] = None, tenant: Any = ANY_TENANT) -> list[Row]:
        wanted = set(statuses or ()) or None
        with self._lock:
            rows = [r for r in self._of(controller, tenant)
                    if (wanted is None or r["status"] in wanted) and (before is None or r["seq"] < before)]
            rows.sort(key=lambda r: r["seq"], reverse=True)
            return [_shown(r) for r in rows[:limit]]

    def reruns(self, controller: str, uuid: str, limit: int = 20) -> list[str]:
        with self._lock:  # a scan, as batch(): the memory store is for tests and throwaway use
            rows = [r for r in self._rows.values() if r.get("rerun_of") == uuid and r["controller"] == controller]
            rows.sort(key=lambda r: r["seq"], reverse=True)
            return [r["uuid"] for r in rows[:limit]]

    def batch(self, controller: str, batch: str) -> list[Row]:
        with self._lock:
            rows = [r for r in self._rows.values()
                    if r["controller"] == controller and r.get("batch") == batch]
            rows.sort(key=lambda r: r["seq"])
            return [_shown(r) for r in rows]

    def counts(self, controller: str, *, tenant: Any = ANY_TENANT) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._lock:
            for r in self._of(controller, tenant):
                counts[r["status"]] = counts.get(r["status"], 0) + 1
        return counts

    def ended_counts(self, controller: str, since: float, step: float = 60.0,
                     tenant: Any = ANY_TENANT) -> dict[tuple[int, str], int]:
        found: dict[tuple[int, str], int] = {}
        with self._lock:
            for r in self._rows.values():
                ended = r.get("ended_at")
                if (r["controller"] == controller and ended is not None and ended >= since
                        and (tenant is ANY_TENANT or r.get("tenant") == tenant)):
                    key = (int((ended - since) // step), r["status"])
                    found[key] = found.get(key, 0) + 1
        return found

    def ended_timings(self, controller: str, since: float, limit: int = defaults.METRICS_SAMPLE) -> list[Timing]:
        with self._lock:
            found = [timing for timing in map(timing_of, self._of(controller, ANY_TENANT))
                     if timing is not None and timing.ended_at >= since]
        found.sort(key=lambda timing: timing.ended_at, reverse=True)
        return found[:limit]

    def callbacks_pending(self, controller: str) -> int:
        with self._lock:
            return len(self._outbox.get(controller, {}))

    def position(self, row: Row) -> Optional[int]:
        if row["status"] != _QUEUED or row.get("retry_at") is not None:
            return None
        key = (row["priority"], row["seq"])
        with self._lock:
            ahead = sum(1 for r in self._rows.values()
                        if r["controller"] == row["controller"] and r["status"] == _QUEUED
                        and r["retry_at"] is None and (r["priority"], r["seq"]) < key)
        return ahead + 1

    def active(self, controller: str) -> list[Row]:
        with self._lock:
            return [copy.deepcopy(r) for r in self._rows.values()
                    if r["controller"] == controller and r["status"] in _ACTIVE]

    # -- clock and heartbeats ------------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    def heartbeat(self, owner: str) -> None:
        with self._lock:
            self._heartbeats[owner] = self._clock()

    def heartbeats(self) -> dict[str, float]:
        with self._lock:
            return dict(self._heartbeats)

    def forget_owner(self, owner: str) -> None:
        with self._lock:
            self._heartbeats.pop(owner, None)

    def set_drained(self, host: str, drained: bool) -> None:
        with self._lock:
            if drained:
                self._drained.setdefault(host, self._clock())
            else:
                self._drained.pop(host, None)

    def drained_hosts(self) -> dict[str, float]:
        with self._lock:
            return dict(self._drained)

    def uuids(self) -> set[str]:
        """The uuids of every task kept (for the log book's clean-up)."""
        with self._lock:
            return set(self._rows)

    def _make_logbook(self) -> "LogBook":
        from .logbook import MemoryLogBook

        return MemoryLogBook(self)

    # -- hosts' capacities and CPU usage (see ..limits) -----------------------------------------------------

    def publish_capacity(self, host: str, capacity: Mapping[str, float]) -> None:
        with self._lock:
            self.__dict__.setdefault("_capacities", {})[host] = {k: float(v) for k, v in capacity.items()}

    def capacities(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {host: dict(capacity) for host, capacity in self.__dict__.get("_capacities", {}).items()}

    def ended_cpu(self, controller: str, since: float) -> list[tuple[Optional[str], float, float]]:
        with self._lock:
            found = [(r.get("tenant"), r.get("ended_at"), r.get("cpu_time")) for r in self._of(controller, ANY_TENANT)]
        return [(tenant, float(ended), float(cpu)) for tenant, ended, cpu in found
                if ended is not None and ended >= since and cpu]
