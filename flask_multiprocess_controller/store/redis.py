"""The scale-out store: tasks in Redis, shared by the serving processes of several hosts.

Every state change is one Lua script (they live in :mod:`.redis_scripts`): the change, the
indexes that follow from it, its event (``XADD`` to the feed) and, for callback kinds, its outbox
entry happen as a single step on the server, whatever the number of hosts. The store's clock is the server's (``TIME``).

Keys, all under ``prefix`` (default ``mpc:``; scripts derive them from it, so the store needs
one Redis server, not a Cluster):

- ``seq`` — counter giving each task its insertion order;
- ``t:<uuid>`` — hash: the task's columns as strings (absent = None);
- ``c:<controller>:q`` — sorted set of queued tasks ready to run, score = priority, member =
  ``<seq zero-padded>:<uuid>`` so that equal priorities run in insertion order;
- ``c:<controller>:rq:<tag>`` — one tenant's part of ``q`` (``<tag>`` as in the tenant index below), and
  ``c:<controller>:rqt`` — sorted set of the tags of the tenants with ready tasks, score = the priority of
  their first one: what fair share and the claim rules read (see :mod:`.claimrules`); ``ready:indexed`` — set
  once the key space's older queued tasks were put into them (see :meth:`RedisStore._index_ready`);
- ``c:<controller>:lc`` — sorted set: fair share's memory, the tags of the tenants claimed, score = a counter
  that grows with each claim recorded (the tenant claimed least recently wins a tie; made by the first claim);
- ``c:<controller>:delayed`` — sorted set of queued tasks waiting for their retry, score =
  ``retry_at``, member = uuid (a claim moves the due ones into ``q``);
- ``c:<controller>:active`` — set of the uuids ``running`` or ``stopping``;
- ``c:<controller>:all`` — sorted set of every task by ``seq`` (the list view);
- ``c:<controller>:s:<status>`` — sorted set of the tasks in ``status`` by ``seq`` (filtered lists);
- ``c:<controller>:ended`` — sorted set of finished tasks by ``ended_at`` (purges);
- ``c:<controller>:n`` — hash: number of tasks in each status;
- ``c:<controller>:tn:all:<tag>`` and ``c:<controller>:tn:s:<status>:<tag>`` — the tenant index: sorted
  sets of one tenant's tasks by ``seq`` (all of them, and those in ``status``), where ``<tag>`` is
  ``=<tenant>``, or ``~`` for tenant None; ``tenants:indexed`` — set once the key space's older tasks
  were put into it (see :meth:`RedisStore._index_tenants`);
- ``c:<controller>:outbox`` — sorted set of unacknowledged callback events, all scored 0 so that
  members (zero-padded stream ids) sort by id; ``c:<controller>:outbox:events`` — hash: member to event;
- ``events`` — stream: the change feed (each entry also has its task's ``tenant``, so reads filter by
  tenant on the server); ``events:pruned`` — id of the newest event pruned from it; ``events:bytes`` — the
  bytes of the tasks of the events in it (what ``max_event_bytes`` bounds); ``events:other`` — stream of
  one entry: the id (as in ``events``) of the newest event that is not ``progress``, what a runtime's
  follower blocks on;
- ``callbacks_dropped`` — hash: controller -> callbacks dropped undelivered for their age;
- ``owners`` — sorted set of serving processes by their last heartbeat;
- ``drained`` — hash: drained host -> since when (server clock);
- ``host:<host>:res`` — set of the uuids of tasks declaring ``resources`` that a process of ``<host>`` claimed
  or adopted (of every controller): a superset of those active there, trimmed by the claims that weigh the
  host's capacity, which read the tasks' own status, owner and resources;
- ``lease:<name>`` — string: the holder of a lease, expiring with it;
- ``idem:<key>`` — string: the record of an idempotency key (JSON ``{"uuids", "fingerprint"}``),
  expiring with it;
- ``c:<controller>:schedules`` — set of the controller's schedule names; ``c:<controller>:sched:<name>``
  — hash: one schedule's state (:class:`~.base.ScheduleRow`; ``spec`` as JSON).
"""
from __future__ import annotations

import contextlib
import functools
import heapq
import json
import os
import re
import uuid as uuid_module
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar, cast

from .. import defaults
from ..events import Changes, Event, EventKind
from ..exceptions import (
    InvalidTransition, QueueFull, StoreError, StoreUnavailable, TaskAlreadyFinished, TaskNotFound,
)
from ..exceptions import IdempotentReplay
from ..states import TaskStatus
from .claimrules import NO_RULES, ClaimRules
from .base import (
    ANY_TENANT, FireOutcome, Fired, Row, ScheduleRow, TaskStore,
    event_task,
)
from .base import Idempotency
from .base import usage_fields
from .base import ProgressWrite
from .base import Timing, timing_of
from .redis_scripts import SCRIPTS
from .schema import COLUMNS as _COLUMNS, EVENT_HIDDEN, Encoding, columns_encoded, event_columns

if TYPE_CHECKING:
    from .logbook import LogBook

try:
    import redis
except ImportError:  # RedisStore() says how to install it
    redis = None  # type: ignore[assignment]

#: Columns by encoding (:data:`.schema.FIELDS`): each a string in the task's hash, absent when None.
_INT = frozenset(columns_encoded(Encoding.INTEGER))
_FLOAT = frozenset(columns_encoded(Encoding.REAL))
_JSON = frozenset(columns_encoded(Encoding.JSON))
#: Stored as "1" or "0"; absent reads as False.
_BOOLEAN = frozenset(columns_encoded(Encoding.BOOLEAN))
#: The columns lists read (not the saved state, see ``event_task``); the uuid first.
_LISTED_COLUMNS = ("uuid", *(c for c in _COLUMNS if c != "uuid" and c not in EVENT_HIDDEN))

#: Seconds one ``XREAD BLOCK`` of a waiting ``changes()`` lasts at most (it waits in several if longer).
_FEED_BLOCK_MAX = 10.0
#: Seconds a wake stream (see ``_wake_key``) outlives its last wake.
_WAKE_TTL = 60
#: Tasks one purge script deletes, so that the server is never busy for long.
_PURGE_BATCH = 500
#: Ended tasks read per round trip by ``ended_counts``.
_STATS_BATCH = 1000
#: The columns :meth:`RedisStore.ended_timings` reads of each task.
_TIMING_COLUMNS = ("status", "created_at", "started_at", "ended_at", "attempt")
#: Tasks the one-time filling of the tenant index handles per script.
_INDEX_BATCH = 500
#: Queued tasks the one-time filling of the tenants' ready queues handles per script.
_READY_BATCH = 500
_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
#: Characters a ``SCAN MATCH`` pattern gives a meaning to (escaped in a literal prefix).
_GLOB_SPECIAL = re.compile(r"[\\*?\[\]]")


def _encode(column: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    if column in _JSON:
        return json.dumps(value)
    if column in _BOOLEAN:
        return "1" if value else "0"
    if column in _FLOAT:
        return repr(float(value))
    return str(value)


def _flat_fields(pairs: Iterable[tuple[Any, Any]]) -> list[Any]:
    """A hash's (field, value) pairs as the flat list :func:`_decode` reads, without the fields it lacks (None)."""
    return [x for pair in pairs if pair[1] is not None for x in pair]


def _decode(flat: Sequence[Any], columns: Sequence[str] = _COLUMNS) -> Row:
    raw = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
    row: dict[str, Any] = {}
    for column in columns:
        value = raw.get(column)
        if value is None:
            row[column] = False if column in _BOOLEAN else None
        elif column in _INT:
            row[column] = int(value)
        elif column in _FLOAT:
            row[column] = float(value)
        elif column in _JSON:
            row[column] = json.loads(value)
        elif column in _BOOLEAN:
            row[column] = value == "1"
        else:
            row[column] = value
    return cast(Row, row)


def _event(cursor: Any, flat: Sequence[Any]) -> Event:
    """The event of a feed entry (or an outbox entry): its id and its flat list of fields."""
    fields = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
    return Event(cursor=_text(cursor), kind=fields["kind"], uuid=fields["uuid"], controller=fields["controller"],
                 at=float(fields["at"]), emitter=fields.get("emitter"),
                 task=cast(dict[str, Any], _decode(json.loads(fields["task"]), event_columns(fields["kind"]))))


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _flat_row(row: Row) -> list[str]:
    """A new row as the flat ``[field, value, ...]`` list the scripts insert (no ``seq``, no None values)."""
    flat: list[str] = []
    for column in _COLUMNS:
        encoded = None if column == "seq" else _encode(column, row.get(column))
        if encoded is not None:
            flat += [column, encoded]
    return flat


def _tag(tenant: Optional[str]) -> str:
    """A tenant's tag in the keys of the tenant index (the Lua ``tenant_tag``)."""
    return "~" if tenant is None else "=" + tenant


def _rules(rules: ClaimRules) -> str:
    """A claim's rules as the claim scripts read them (JSON): ``host``, ``plain``, ``fair``, and unless plain
    ``key`` and ``tenant`` (the bounds), ``cap`` (the capacity) and ``held`` (the held tenants' tags)."""
    spec: dict[str, Any] = {"plain": rules.plain, "fair": rules.fair}
    if rules.host is not None:
        spec["host"] = rules.host
    if rules.max_per_key is not None:
        spec["key"] = int(rules.max_per_key)
    if rules.max_per_tenant is not None:
        spec["tenant"] = int(rules.max_per_tenant)
    if rules.capacity is not None:
        spec["cap"] = {str(name): float(amount) for name, amount in rules.capacity.items()}
    if rules.held_tenants:
        spec["held"] = sorted(_tag(tenant) for tenant in rules.held_tenants)
    return json.dumps(spec)


def _changed(uuid: str, answer: Any, change: str, needs: str) -> tuple[Row, Optional[Event]]:
    """The row and event of a script that changes one task by its uuid, or the error it reported."""
    verdict = _text(answer[0])
    if verdict == "missing":
        raise TaskNotFound(uuid)
    if verdict == "finished":
        raise TaskAlreadyFinished(uuid, _text(answer[1]))
    if verdict == "invalid":
        raise InvalidTransition(uuid, _text(answer[1]), change, needs)
    return cast(Row, event_task(_decode(answer[1]))), _event(*answer[2]) if answer[2] else None


_SCHEDULE_FLOATS = ("fired_until", "last_fired", "last_skipped", "seen_at")


def _schedule_row(controller: str, name: str, raw: dict[Any, Any]) -> ScheduleRow:
    """A schedule's state from its hash."""
    fields = {_text(k): _text(v) for k, v in raw.items()}
    state: dict[str, Any] = {"controller": controller, "name": name, "spec": json.loads(fields.get("spec") or "{}"),
                             "skipped": int(fields.get("skipped") or 0), "last_task": fields.get("last_task"),
                             "declared_by": fields.get("declared_by")}
    for column in _SCHEDULE_FLOATS:
        state[column] = float(fields[column]) if fields.get(column) is not None else None
    return cast(ScheduleRow, state)


def _split(fields: dict[str, Any]) -> tuple[str, str]:
    """Fields to set (JSON flat list) and fields to delete, the ones set to None (JSON list)."""
    sets: list[str] = []
    dels: list[str] = []
    for column, value in fields.items():
        encoded = _encode(column, value)
        if encoded is None:
            dels.append(column)
        else:
            sets += [column, encoded]
    return json.dumps(sets), json.dumps(dels)


def _stream_id(cursor: str) -> Optional[tuple[int, int]]:
    """A cursor as a comparable stream id, or None when it is not a valid one."""
    found = _STREAM_ID.fullmatch(cursor) if isinstance(cursor, str) else None
    if found is None:
        return None
    ms, n = int(found[1]), int(found[2])
    return (ms, n) if ms < 2 ** 64 and n < 2 ** 64 else None


def _server_id(value: Any) -> tuple[int, int]:
    """A stream id the server returned, as a comparable pair."""
    ms, n = _text(value).split("-")
    return int(ms), int(n)


def _pad(cursor: str) -> Optional[str]:
    """The outbox member of a cursor (the Lua ``pad``), or None when it is not a valid one."""
    parsed = _stream_id(cursor)
    return None if parsed is None else f"{parsed[0]:020d}-{parsed[1]:020d}"


def _unpad(member: Any) -> str:
    """The cursor of an outbox member."""
    return "%d-%d" % _server_id(member)


def _store_error(url: str, exc: Exception) -> StoreError:
    """The store error a driver error becomes: StoreUnavailable when the server cannot be reached. The URL is
    shown without its password."""
    from . import redacted_url

    url = redacted_url(url)
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return StoreUnavailable(f"The Redis store at {url} is unreachable: {exc}", defaults.RETRY_AFTER)
    return StoreError(f"The Redis store at {url} failed: {exc}")


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _guarded(method: _Method) -> _Method:
    """Let a driver error leave a store method only as a :class:`StoreError`, chained from it."""

    @functools.wraps(method)
    def guarded(self: RedisStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as exc:
            raise _store_error(self.url, exc) from exc

    return cast(_Method, guarded)


class RedisStore(TaskStore):
    """Tasks in Redis (``redis://host:port/db``), through the ``redis`` client package.

    :param url: the server's URL.
    :param prefix: prepended to every key, so several apps can share one database.
    """

    shared = True

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "mpc:") -> None:
        if redis is None:
            raise StoreError("The Redis store needs the redis package: pip install "
                             "'flask-multiprocess-controller[redis]'.")
        self.url = url
        self.prefix = prefix
        self._redis = redis.Redis.from_url(url)
        # Waiting ``changes()`` calls block on connections of their own, which need a socket
        # timeout above the longest block; the client's pools are thread-safe.
        self._feed = redis.Redis.from_url(url, socket_timeout=_FEED_BLOCK_MAX + 5.0)
        self._wake_pid = 0
        self._wake_name = ""
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            self.close()
            raise _store_error(url, exc) from exc
        # Script objects load themselves again on NOSCRIPT (a restarted server).
        self._scripts = {name: self._redis.register_script(source) for name, source in SCRIPTS.items()}
        try:
            self._index_tenants()
            self._index_ready()
        except redis.RedisError as exc:
            self.close()
            raise _store_error(url, exc) from exc

    def _index_tenants(self) -> None:
        """Put the tasks of a key space written before the tenant index existed into it, once.

        A key space where no task was ever queued (no ``seq``) is only marked. Otherwise every
        controller's tasks (found by their ``c:<controller>:all`` sets) are indexed, in batches;
        the script is idempotent, so two processes starting together may both run it.
        """
        marker = self._key("tenants:indexed")
        if self._redis.exists(marker):
            return
        if self._redis.exists(self._key("seq")):
            head, tail = self._key("c:"), ":all"
            pattern = _GLOB_SPECIAL.sub(r"\\\g<0>", head) + "*" + tail
            for raw in self._redis.scan_iter(match=pattern, count=1000, _type="zset"):
                key = _text(raw)
                controller = key[len(head):-len(tail)]
                if ":tn:" in controller:
                    continue  # a tenant's own set, not a controller's
                total = self._redis.zcard(key)
                for start in range(0, total, _INDEX_BATCH):
                    uuids = [_text(u) for u in self._redis.zrange(key, start, start + _INDEX_BATCH - 1)]
                    self._write("index_tenants", None, controller, json.dumps(uuids))
        self._redis.set(marker, "1")

    def _index_ready(self) -> None:
        """Put the ready tasks of a key space written before the tenants' ready queues existed into them, once.

        As :meth:`_index_tenants`: every controller's ``q`` is read in batches by a script that is idempotent.
        """
        marker = self._key("ready:indexed")
        if self._redis.exists(marker):
            return
        if self._redis.exists(self._key("seq")):
            head, tail = self._key("c:"), ":q"
            pattern = _GLOB_SPECIAL.sub(r"\\\g<0>", head) + "*" + tail
            for raw in self._redis.scan_iter(match=pattern, count=1000, _type="zset"):
                key = _text(raw)
                controller = key[len(head):-len(tail)]
                if ":tn:" in controller or ":rq:" in controller:
                    continue  # a tenant's own set, not a controller's queue
                total = self._redis.zcard(key)
                for start in range(0, total, _READY_BATCH):
                    members = [_text(m) for m in self._redis.zrange(key, start, start + _READY_BATCH - 1)]
                    self._write("index_ready", None, controller, json.dumps(members))
        self._redis.set(marker, "1")

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _c(self, controller: str, what: str) -> str:
        return self._key("c", controller, what)

    def _write(self, script: str, emitter: Optional[str], *args: Any) -> Any:
        """Run a writing script with the arguments every one of them takes first."""
        bounds = f"{max(1, int(self.max_events))} {max(1, int(self.max_event_bytes))}"
        return self._scripts[script](args=[self.prefix, emitter or "", bounds, *args])

    def _read_rows(self, uuids: Sequence[Any], *, with_state: bool) -> list[Row]:
        """The rows of ``uuids`` still stored, in their order, read in one round trip (a pipeline).

        Without ``with_state`` only :data:`_LISTED_COLUMNS` are read, and the rows are as lists show them
        (:func:`event_task`): the saved state is large and shown nowhere. A purged task has no row.
        """
        pipe = self._redis.pipeline(transaction=False)
        for uuid in uuids:
            key = self._key("t", _text(uuid))
            if with_state:
                pipe.hgetall(key)
            else:
                pipe.hmget(key, _LISTED_COLUMNS)
        rows = []
        for answer in pipe.execute():
            if with_state:
                if answer:  # {} once the task was purged
                    rows.append(_decode(_flat_fields(answer.items())))
            elif answer[0] is not None:  # uuid: None once the task was purged
                row = _decode(_flat_fields(zip(_LISTED_COLUMNS, answer)))
                rows.append(cast(Row, event_task(row)))
        return rows

    # -- writes --------------------------------------------------------------------------------------------

    @_guarded
    def enqueue(self, rows: Sequence[Row], max_queued: int, emitter: Optional[str] = None,
                idempotency: Optional[Idempotency] = None) -> list[Event]:
        if not rows:
            return []
        flat_rows = [_flat_row(row) for row in rows]
        key = ("", "", 0) if idempotency is None else (
            idempotency.key, idempotency.fingerprint, max(1, int(idempotency.ttl * 1000)))
        done = self._write("enqueue", emitter, max_queued, rows[0]["controller"], json.dumps(flat_rows), *key)
        if done == -1:
            raise QueueFull(max_queued, defaults.RETRY_AFTER)
        if done and _text(done[0]) == "replay":
            record = json.loads(_text(done[1]))
            raise IdempotentReplay(record["uuids"], record["fingerprint"])
        events = [_event(cursor, fields) for cursor, fields in done]
        for row, event in zip(rows, events):
            row["seq"] = event["task"]["seq"]
        return events

    @_guarded
    def claim(self, controller: str, owner: str, max_running: int, rules: ClaimRules = NO_RULES) -> Optional[Row]:
        flat = self._write("claim", None, controller, owner, max_running, _rules(rules))
        return _decode(flat) if flat else None

    @_guarded
    def claim_started(self, controller: str, owner: str, max_running: int, pid: int,
                      pid_created: float, rules: ClaimRules = NO_RULES) -> Optional[tuple[Row, Event]]:
        done = self._write("claim_started", owner, controller, owner, max_running, _rules(rules),
                           _encode("pid", pid), _encode("pid_created", pid_created))
        if not done:
            return None
        flat, event = done
        return _decode(flat), _event(*event)

    @_guarded
    def start(self, uuid: str, owner: str, pid: int, pid_created: float) -> Optional[Event]:
        done = self._write("start", owner, uuid, owner, _encode("pid", pid), _encode("pid_created", pid_created))
        return _event(*done) if done else None

    @_guarded
    def progress(self, uuid: str, owner: str, progress: Any, percent: Optional[float],
                 usage: Optional[Mapping[str, Any]] = None) -> Optional[Event]:
        done = self._write("progress", owner, uuid, owner,
                           *_split({"progress": progress, "percent": percent, **usage_fields(usage)}))
        return _event(*done) if done else None

    @_guarded
    def progress_many(self, owner: str, writes: Sequence[ProgressWrite]) -> list[Optional[Event]]:
        if not writes:
            return []
        args: list[Any] = [owner]
        for write in writes:
            args += [write.uuid, *_split({"progress": write.progress, "percent": write.percent,
                                          **usage_fields(write.usage)})]
        done = self._write("progress_many", owner, *args)  # one script: one round trip, applied at once
        return [_event(*one) if one else None for one in done]

    @_guarded
    def save_state(self, uuid: str, owner: str, state: Any) -> bool:
        return bool(self._write("save_state", owner, uuid, owner, json.dumps(state)))

    @_guarded
    def _finish(self, uuid: str, status: str, owner: Optional[str], emitter: Optional[str],
                fields: dict[str, Any]) -> Optional[Event]:
        done = self._write("finish", emitter, uuid, owner or "", status, *_split(fields))
        return _event(*done) if done else None

    @_guarded
    def requeue(self, uuid: str, owner: Optional[str] = None, emitter: Optional[str] = None,
                uncount: bool = False) -> Optional[Event]:
        done = self._write("requeue", owner if emitter is None else emitter, uuid, owner or "", "1" if uncount else "0")
        return _event(*done) if done else None

    @_guarded
    def adopt(self, uuid: str, owner: str, new_owner: str) -> Optional[Event]:
        done = self._write("adopt", new_owner, uuid, owner, new_owner)
        return _event(*done) if done else None

    @_guarded
    def request_stop(self, uuid: str, emitter: Optional[str] = None, *,
                     finish: bool = False) -> tuple[Row, Optional[Event]]:
        return _changed(uuid, self._write("request_stop", emitter, uuid, "1" if finish else "0"), "stopped", "")

    @_guarded
    def purge(self, controller: str, ended_before: float, emitter: Optional[str] = None) -> int:
        total = 0
        while True:
            done = int(self._write("purge", emitter, controller, repr(float(ended_before)), _PURGE_BATCH))
            total += done
            if done < _PURGE_BATCH:
                break
        self._write("prune", emitter, controller, repr(float(self.event_retention)))
        return total

    # -- task policies -------------------------------------------------------------------------------------

    @_guarded
    def _retry(self, uuid: str, delay: float, owner: Optional[str], emitter: Optional[str],
               fields: dict[str, Any]) -> Optional[Event]:
        done = self._write("retry", emitter, uuid, owner or "", repr(delay), *_split(fields))
        return _event(*done) if done else None

    @_guarded
    def next_retry_at(self, controller: str) -> Optional[float]:
        first = self._redis.zrange(self._c(controller, "delayed"), 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    @_guarded
    def _transition(self, uuid: str, wanted: str, change: str, needs: str, kind: EventKind,
                    emitter: Optional[str]) -> tuple[Row, Optional[Event]]:
        return _changed(uuid, self._write("transition", emitter, uuid, wanted, needs, kind.value), change, needs)

    @_guarded
    def reprioritise(self, uuid: str, priority: int, emitter: Optional[str] = None) -> tuple[Row, Event]:
        row, event = _changed(uuid, self._write("reprioritise", emitter, uuid, str(int(priority))),
                              "re-prioritised", TaskStatus.QUEUED.value)
        return row, cast(Event, event)  # the script always writes one when it changes the task

    @_guarded
    def stop_all(self, controller: str, emitter: Optional[str] = None, *, tenant: Any = ANY_TENANT) -> list[Event]:
        tag = "" if tenant is ANY_TENANT else _tag(tenant)
        return [_event(*done) for done in self._write("stop_all", emitter, controller, tag)]

    # -- leases and schedules --------------------------------------------------------------------------------

    @_guarded
    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        return bool(self._scripts["lease"](args=[self.prefix, name, owner, max(1, int(ttl * 1000))]))

    @_guarded
    def release_lease(self, name: str, owner: str) -> None:
        self._scripts["release"](args=[self.prefix, name, owner])

    @_guarded
    def declare_schedules(self, controller: str, specs: Mapping[str, dict[str, Any]], owner: str) -> None:
        pairs = [[name, json.dumps(spec)] for name, spec in specs.items()]
        if pairs:
            self._write("declare", owner, controller, owner, json.dumps(pairs))

    @_guarded
    def schedules(self, controller: str) -> list[ScheduleRow]:
        names = sorted(_text(name) for name in self._redis.smembers(self._c(controller, "schedules")))
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self._c(controller, f"sched:{name}"))
        return [_schedule_row(controller, name, raw) for name, raw in zip(names, pipe.execute()) if raw]

    @_guarded
    def fire(self, controller: str, name: str, firing: float, row: Optional[Row], max_queued: int,
             emitter: Optional[str] = None) -> Fired:
        flat = "" if row is None else json.dumps(_flat_row(row))
        answer = self._write("fire", emitter, controller, name, repr(float(firing)), max_queued, flat)
        outcome = FireOutcome(_text(answer[0]))
        if outcome is not FireOutcome.QUEUED:
            return Fired(outcome, None)
        event = _event(*answer[1])
        if row is not None:  # always: a firing without a row is never queued
            row["seq"] = event["task"]["seq"]
        return Fired(outcome, event)

    # -- the change feed and the outbox -------------------------------------------------------------------

    filters_progress = True

    @_guarded
    def _changes(self, since: str, limit: int, tenant: Any = ANY_TENANT, max_bytes: Optional[int] = None,
                 without_progress: bool = False) -> Changes:
        after = _stream_id(since)
        wanted = "" if tenant is ANY_TENANT else "n" if tenant is None else f"s:{tenant}"
        canonical = "" if after is None else "%d-%d" % after  # what the script compares entry ids with
        pruned, latest, entries, cursor = self._scripts["feed"](
            args=[self.prefix, canonical, limit, wanted, "" if max_bytes is None else max_bytes,
                  "1" if without_progress else ""])
        if after is None or after < _server_id(pruned) or after > _server_id(latest):
            return Changes([], _text(latest), True)
        events = [_event(entry_id, fields) for entry_id, fields in entries]
        cursor = _text(cursor)
        return Changes(events, since if cursor == canonical else cursor, False)

    @_guarded
    def _wait_for_changes(self, since: str, timeout: float, foreign_only: bool = False,
                          without_progress: bool = False) -> Optional[str]:
        block = max(1, int(min(timeout, _FEED_BLOCK_MAX) * 1000))
        # Without progress, the stream that holds the id of the newest event of another kind (the same id as
        # in the feed): its entry after ``since`` is one such event after it. The wake stream of this process
        # ends the block when interrupt_waits() adds to it.
        feed = self._key("events:other" if without_progress else "events")
        self._feed.xread({feed: since, self._wake_key(): "$"}, count=1, block=block)
        return None

    def _wake_key(self) -> str:
        """This process's wake stream for this store object: one entry ends the blocked reads of the feed."""
        if self._wake_pid != os.getpid():
            self._wake_pid, self._wake_name = os.getpid(), self._key("wake", uuid_module.uuid4().hex)
        return self._wake_name

    @_guarded
    def _wake_waits(self) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self._wake_key(), {"wake": "1"}, maxlen=1, approximate=False)
        pipe.expire(self._wake_key(), _WAKE_TTL)
        pipe.execute()

    @_guarded
    def latest_cursor(self) -> str:
        return str(_text(self._scripts["feed"](args=[self.prefix, "", 0, "", ""])[1]))

    @_guarded
    def unacked(self, controller: str, limit: int = 100) -> list[Event]:
        members: list[Any] = list(self._redis.zrange(self._c(controller, "outbox"), 0, limit - 1)) if limit > 0 else []
        if not members:
            return []
        payloads = self._redis.hmget(self._c(controller, "outbox:events"), members)
        # An entry acknowledged between the two reads has no payload any more.
        return [_event(_unpad(member), json.loads(payload))
                for member, payload in zip(members, payloads) if payload is not None]

    @_guarded
    def ack(self, controller: str, cursors: Iterable[str]) -> None:
        members = [m for m in map(_pad, cursors) if m is not None]
        if members:
            pipe = self._redis.pipeline(transaction=True)
            pipe.zrem(self._c(controller, "outbox"), *members)
            pipe.hdel(self._c(controller, "outbox:events"), *members)
            pipe.execute()

    @_guarded
    def expire_callbacks(self, controller: str, max_age: float) -> list[Event]:
        dropped = self._write("expire_callbacks", None, controller, repr(float(max_age)))
        return [_event(_unpad(member), json.loads(payload)) for member, payload in dropped]

    @_guarded
    def callbacks_dropped(self, controller: str) -> int:
        return int(self._redis.hget(self._key("callbacks_dropped"), controller) or 0)

    # -- reads ---------------------------------------------------------------------------------------------

    @_guarded
    def get(self, uuid: str) -> Optional[Row]:
        flat = self._redis.hgetall(self._key("t", uuid))
        if not flat:
            return None
        return _decode([x for pair in flat.items() for x in pair])

    def _index(self, controller: str, tenant: Any, what: str) -> str:
        """The key of the controller's set ``what`` (``all`` or ``s:<status>``), or of one tenant's."""
        if tenant is ANY_TENANT:
            return self._c(controller, what)
        return self._c(controller, f"tn:{what}:{_tag(tenant)}")

    @_guarded
    def find_by_prefix(self, prefix: str, limit: int = 10) -> list[Row]:
        # A scan of the task hashes' keys: O(key space), for an operator's rare look-up; few uuids match.
        head = self._key("t", "")
        pattern = _GLOB_SPECIAL.sub(r"\\\g<0>", head + prefix) + "*"
        uuids = []
        for raw in self._redis.scan_iter(match=pattern, count=1000, _type="hash"):
            key = _text(raw)
            if len(key) == len(head) + 36:  # a task's own hash, not a longer key that shares the start
                uuids.append(key[len(head):])
        rows = self._read_rows(uuids, with_state=False)
        rows.sort(key=lambda r: r["seq"], reverse=True)
        return rows[:limit]

    @_guarded
    def list_tasks(self, controller: str, statuses: Optional[Iterable[str]] = None, limit: int = 100,
                   before: Optional[int] = None, tenant: Any = ANY_TENANT) -> list[Row]:
        top = "+inf" if before is None else f"({before}"
        wanted = list(dict.fromkeys(statuses or ()))
        if not wanted:
            uuids = self._redis.zrevrangebyscore(self._index(controller, tenant, "all"), top, "-inf", start=0,
                                                 num=limit)
            return self._read_rows(uuids, with_state=False)
        # The newest ``limit`` of each wanted status, merged: O(limit) per status.
        pipe = self._redis.pipeline(transaction=True)
        for status in wanted:
            pipe.zrevrangebyscore(self._index(controller, tenant, f"s:{status}"), top, "-inf", start=0, num=limit,
                                  withscores=True)
        merged = heapq.merge(*pipe.execute(), key=lambda pair: pair[1], reverse=True)
        uuids = [uuid for uuid, _ in merged][:limit]
        # A task may have changed status since: keep to the filter.
        return [row for row in self._read_rows(uuids, with_state=False) if row["status"] in wanted]

    @_guarded
    def batch(self, controller: str, batch: str) -> list[Row]:
        # A sorted set per batch (by seq), written with the tasks and trimmed by purges.
        return self._read_rows(self._redis.zrange(self._c(controller, "b:" + batch), 0, -1), with_state=False)

    @_guarded
    def reruns(self, controller: str, uuid: str, limit: int = 20) -> list[str]:
        # A sorted set per rerun task (by seq), written with its reruns and trimmed by purges.
        return [_text(found) for found in self._redis.zrevrange(self._c(controller, "r:" + uuid), 0, limit - 1)]

    @_guarded
    def counts(self, controller: str, *, tenant: Any = ANY_TENANT) -> dict[str, int]:
        if tenant is ANY_TENANT:
            raw = self._redis.hgetall(self._c(controller, "n"))
            return {_text(k): int(v) for k, v in raw.items() if int(v)}
        # One ZCARD (O(1)) per status of the tenant's index.
        pipe = self._redis.pipeline(transaction=True)
        for status in TaskStatus:
            pipe.zcard(self._index(controller, tenant, f"s:{status.value}"))
        return {status.value: int(n) for status, n in zip(TaskStatus, pipe.execute()) if n}

    @_guarded
    def ended_counts(self, controller: str, since: float, step: float = 60.0,
                     tenant: Any = ANY_TENANT) -> dict[tuple[int, str], int]:
        ended: list[tuple[Any, float]] = list(self._redis.zrangebyscore(  # type: ignore[arg-type]
            self._c(controller, "ended"), repr(float(since)), "+inf", withscores=True))
        found: dict[tuple[int, str], int] = {}
        for start in range(0, len(ended), _STATS_BATCH):
            batch = ended[start:start + _STATS_BATCH]
            pipe = self._redis.pipeline(transaction=False)
            for uuid, _ in batch:
                pipe.hmget(self._key("t", _text(uuid)), "status", "tenant")
            for (_, at), (status, owner) in zip(batch, pipe.execute()):
                if status is None or (tenant is not ANY_TENANT and _text(owner) != tenant):
                    continue  # purged meanwhile, or another tenant's
                key = (int((float(at) - since) // step), _text(status))
                found[key] = found.get(key, 0) + 1
        return found

    @_guarded
    def ended_timings(self, controller: str, since: float, limit: int = defaults.METRICS_SAMPLE) -> list[Timing]:
        uuids: list[Any] = list(self._redis.zrevrangebyscore(
            self._c(controller, "ended"), "+inf", repr(float(since)), start=0, num=limit))
        found: list[Timing] = []
        for start in range(0, len(uuids), _STATS_BATCH):
            pipe = self._redis.pipeline(transaction=False)
            for uuid in uuids[start:start + _STATS_BATCH]:
                pipe.hmget(self._key("t", _text(uuid)), _TIMING_COLUMNS)
            for values in pipe.execute():
                timing = timing_of({column: _text(value) for column, value in zip(_TIMING_COLUMNS, values)})
                if timing is not None:  # None: purged meanwhile
                    found.append(timing)
        return found

    @_guarded
    def callbacks_pending(self, controller: str) -> int:
        return int(self._redis.zcard(self._c(controller, "outbox")))

    @_guarded
    def position(self, row: Row) -> Optional[int]:
        if row["status"] != TaskStatus.QUEUED.value:
            return None
        rank = self._redis.zrank(self._c(row["controller"], "q"), f"{row['seq']:020d}:{row['uuid']}")
        return None if rank is None else int(rank) + 1  # type: ignore[arg-type]

    @_guarded
    def active(self, controller: str) -> list[Row]:
        return self._read_rows(sorted(self._redis.smembers(self._c(controller, "active"))), with_state=True)

    # -- clock and heartbeats ------------------------------------------------------------------------------

    @_guarded
    def now(self) -> float:
        seconds, microseconds = self._redis.time()
        return seconds + microseconds / 1e6

    @_guarded
    def heartbeat(self, owner: str) -> None:
        self._scripts["heartbeat"](args=[self.prefix, owner])

    @_guarded
    def heartbeats(self) -> dict[str, float]:
        pairs = self._redis.zrange(self._key("owners"), 0, -1, withscores=True)
        return {_text(owner): float(beat) for owner, beat in pairs}  # type: ignore[str-unpack]

    @_guarded
    def forget_owner(self, owner: str) -> None:
        self._redis.zrem(self._key("owners"), owner)

    @_guarded
    def set_drained(self, host: str, drained: bool) -> None:
        if drained:
            self._scripts["drain"](args=[self.prefix, host])
        else:
            self._redis.hdel(self._key("drained"), host)

    @_guarded
    def drained_hosts(self) -> dict[str, float]:
        drained = self._redis.hgetall(self._key("drained"))
        return {_text(host): float(since) for host, since in drained.items()}

    @_guarded
    def heartbeat_and_drained(self, owner: str) -> dict[str, float]:
        pipe = self._redis.pipeline(transaction=False)  # one round trip
        self._scripts["heartbeat"](args=[self.prefix, owner], client=pipe)
        pipe.hgetall(self._key("drained"))
        drained = pipe.execute()[-1]
        return {_text(host): float(since) for host, since in drained.items()}

    def close(self) -> None:
        self._redis.close()
        self._feed.close()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Let a driver error raised in the block leave it only as a :class:`StoreError`."""
        try:
            yield
        except redis.RedisError as exc:
            raise _store_error(self.url, exc) from exc

    def _make_logbook(self) -> "LogBook":
        from .logbook import RedisLogBook

        return RedisLogBook(self)

    # -- hosts' capacities and CPU usage (see ..limits) -----------------------------------------------------

    @_guarded
    def publish_capacity(self, host: str, capacity: Mapping[str, float]) -> None:
        self._redis.hset(self._key("capacity"), host, json.dumps({k: float(v) for k, v in capacity.items()}))

    @_guarded
    def capacities(self) -> dict[str, dict[str, float]]:
        found = self._redis.hgetall(self._key("capacity"))
        return {_text(host): json.loads(_text(value)) for host, value in found.items()}

    @_guarded
    def ended_cpu(self, controller: str, since: float) -> list[tuple[Optional[str], float, float]]:
        uuids: list[Any] = list(self._redis.zrangebyscore(self._c(controller, "ended"), repr(float(since)), "+inf"))
        found: list[tuple[Optional[str], float, float]] = []
        for start in range(0, len(uuids), _STATS_BATCH):
            pipe = self._redis.pipeline(transaction=False)
            for uuid in uuids[start:start + _STATS_BATCH]:
                pipe.hmget(self._key("t", _text(uuid)), ("tenant", "ended_at", "cpu_time"))
            for tenant, ended, cpu in pipe.execute():
                if ended is not None and cpu is not None and float(_text(cpu)) > 0:
                    found.append((None if tenant is None else _text(tenant), float(_text(ended)), float(_text(cpu))))
        return found
