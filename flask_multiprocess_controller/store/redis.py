"""The scale-out store: tasks in Redis, shared by the serving processes of several hosts.

Every operation that must be atomic (bounded insert, claim under the global limit,
compare-and-set finish, stop requests, requeue, purge) is one Lua script, so it runs
as a single step on the server whatever the number of hosts.

Keys, all under ``prefix`` (default ``mpc:``):

- ``seq`` — counter giving each task its insertion order;
- ``t:<uuid>`` — hash: the task's columns as strings (absent = None);
- ``c:<controller>:q`` — sorted set of queued tasks, score = priority, member =
  ``<seq zero-padded>:<uuid>`` so that equal priorities run in insertion order;
- ``c:<controller>:active`` — set of the uuids ``running`` or ``stopping``;
- ``c:<controller>:all`` — sorted set of every task by ``seq`` (the list view);
- ``c:<controller>:ended`` — sorted set of finished tasks by ``ended_at`` (purges);
- ``c:<controller>:n`` — hash: number of tasks in each status;
- ``owners`` — sorted set of serving processes by their last heartbeat.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Optional, Sequence

from .. import defaults
from ..exceptions import QueueFull, StoreError, TaskAlreadyFinished, TaskNotFound
from ..states import TERMINAL, TaskStatus
from .base import COLUMNS as _COLUMNS, MUTABLE_FIELDS, Row, TaskStore

_INT = {"seq", "priority", "pid", "exit_code", "memory_peak", "attempt"}
_FLOAT = {"percent", "created_at", "started_at", "ended_at", "pid_created", "timeout", "cpu_time"}
_JSON = {"args", "progress", "result", "error"}
_TERMINAL = sorted(s.value for s in TERMINAL)

# KEYS: seq, q, all, n ; ARGV: prefix, max_queued, rows-json (list of flat [field, value, ...] lists)
_ENQUEUE = """
local rows = cjson.decode(ARGV[3])
local max_queued = tonumber(ARGV[2])
if max_queued >= 0 and redis.call('ZCARD', KEYS[2]) + #rows > max_queued then
  return -1
end
local seqs = {}
for _, row in ipairs(rows) do
  local seq = redis.call('INCR', KEYS[1])
  seqs[#seqs + 1] = seq
  local uuid, priority
  for i = 1, #row, 2 do
    if row[i] == 'uuid' then uuid = row[i + 1] end
    if row[i] == 'priority' then priority = tonumber(row[i + 1]) end
  end
  local key = ARGV[1] .. 't:' .. uuid
  redis.call('HSET', key, 'seq', seq, unpack(row))
  redis.call('ZADD', KEYS[2], priority, string.format('%020d', seq) .. ':' .. uuid)
  redis.call('ZADD', KEYS[3], seq, uuid)
  redis.call('HINCRBY', KEYS[4], 'queued', 1)
end
return seqs
"""

# KEYS: q, active, n ; ARGV: prefix, owner, max_running, now
_CLAIM = """
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[3]) then return false end
local first = redis.call('ZRANGE', KEYS[1], 0, 0)
if #first == 0 then return false end
redis.call('ZREM', KEYS[1], first[1])
local uuid = string.sub(first[1], 22)
local key = ARGV[1] .. 't:' .. uuid
redis.call('HSET', key, 'status', 'running', 'owner', ARGV[2], 'started_at', ARGV[4])
redis.call('HINCRBY', key, 'attempt', 1)
redis.call('SADD', KEYS[2], uuid)
redis.call('HINCRBY', KEYS[3], 'queued', -1)
redis.call('HINCRBY', KEYS[3], 'running', 1)
return redis.call('HGETALL', key)
"""

# The fence shared by the writes of a claimed task: active, and still ARGV[1]'s ('' = anyone's).
_FENCE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' and status ~= 'stopping' then return 0 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
"""

# KEYS: task ; ARGV: owner, fields-json (flat list to set), dels-json (fields to delete)
_UPDATE = _FENCE + """
local sets = cjson.decode(ARGV[2])
local dels = cjson.decode(ARGV[3])
if #sets > 0 then redis.call('HSET', KEYS[1], unpack(sets)) end
if #dels > 0 then redis.call('HDEL', KEYS[1], unpack(dels)) end
return 1
"""

# KEYS: task, active, n, ended ; ARGV: owner, fields-json, dels-json, uuid, ended_at, status
_FINISH = _FENCE + """
local sets = cjson.decode(ARGV[2])
local dels = cjson.decode(ARGV[3])
if #sets > 0 then redis.call('HSET', KEYS[1], unpack(sets)) end
if #dels > 0 then redis.call('HDEL', KEYS[1], unpack(dels)) end
redis.call('HSET', KEYS[1], 'status', ARGV[6])
redis.call('SREM', KEYS[2], ARGV[4])
redis.call('HINCRBY', KEYS[3], status, -1)
redis.call('HINCRBY', KEYS[3], ARGV[6], 1)
redis.call('ZADD', KEYS[4], tonumber(ARGV[5]), ARGV[4])
return 1
"""

# KEYS: task, q, active, n ; ARGV: owner, uuid
_REQUEUE = _FENCE + """
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local priority = tonumber(redis.call('HGET', KEYS[1], 'priority'))
redis.call('HSET', KEYS[1], 'status', 'queued', 'stop_requested', '0')
redis.call('HDEL', KEYS[1], 'owner', 'pid', 'pid_created', 'started_at')
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[2], priority, string.format('%020d', seq) .. ':' .. ARGV[2])
redis.call('HINCRBY', KEYS[4], status, -1)
redis.call('HINCRBY', KEYS[4], 'queued', 1)
return 1
"""

# KEYS: task ; ARGV: prefix, uuid, now
_REQUEST_STOP = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
local controller = redis.call('HGET', KEYS[1], 'controller')
local base = ARGV[1] .. 'c:' .. controller .. ':'
if status == 'queued' then
  local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
  redis.call('ZREM', base .. 'q', string.format('%020d', seq) .. ':' .. ARGV[2])
  redis.call('HSET', KEYS[1], 'status', 'stopped', 'ended_at', ARGV[3], 'stop_requested', '1')
  redis.call('HINCRBY', base .. 'n', 'queued', -1)
  redis.call('HINCRBY', base .. 'n', 'stopped', 1)
  redis.call('ZADD', base .. 'ended', tonumber(ARGV[3]), ARGV[2])
elseif status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'stopping', 'stop_requested', '1')
  redis.call('HINCRBY', base .. 'n', 'running', -1)
  redis.call('HINCRBY', base .. 'n', 'stopping', 1)
elseif status ~= 'stopping' then
  return {'finished', status}
end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: ended, all, n ; ARGV: prefix, before, batch
_PURGE = """
local doomed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, uuid in ipairs(doomed) do
  local key = ARGV[1] .. 't:' .. uuid
  local status = redis.call('HGET', key, 'status')
  if status then redis.call('HINCRBY', KEYS[3], status, -1) end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[2], uuid)
  redis.call('ZREM', KEYS[1], uuid)
end
return #doomed
"""


def _encode(column: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    if column in _JSON:
        return json.dumps(value)
    if column == "stop_requested":
        return "1" if value else "0"
    if column in _FLOAT:
        return repr(float(value))
    return str(value)


def _decode(flat: Sequence[Any]) -> Row:
    raw = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
    row: Row = {}
    for column in _COLUMNS:
        value = raw.get(column)
        if value is None:
            row[column] = False if column == "stop_requested" else None
        elif column in _INT:
            row[column] = int(value)
        elif column in _FLOAT:
            row[column] = float(value)
        elif column in _JSON:
            row[column] = json.loads(value)
        elif column == "stop_requested":
            row[column] = value == "1"
        else:
            row[column] = value
    return row


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _split(fields: dict) -> tuple[list[str], list[str]]:
    """Fields to set (flat list) and fields to delete (set to None)."""
    sets: list[str] = []
    dels: list[str] = []
    for column, value in fields.items():
        encoded = _encode(column, value)
        if encoded is None:
            dels.append(column)
        else:
            sets += [column, encoded]
    return sets, dels


class RedisStore(TaskStore):
    """Tasks in Redis (``redis://host:port/db``), through the ``redis`` client package.

    :param url: the server's URL.
    :param prefix: prepended to every key, so several apps can share one database.
    """

    shared = True

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "mpc:") -> None:
        try:
            import redis
        except ImportError:
            raise StoreError("The Redis store needs the redis package: pip install "
                             "'flask-multiprocess-controller[redis]'.") from None
        self.url = url
        self.prefix = prefix
        self._redis = redis.Redis.from_url(url)
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            raise StoreError(f"Cannot reach the Redis store at {url}: {exc}") from exc
        self._scripts = {name: self._redis.register_script(source) for name, source in (
            ("enqueue", _ENQUEUE), ("claim", _CLAIM), ("update", _UPDATE), ("finish", _FINISH),
            ("requeue", _REQUEUE), ("request_stop", _REQUEST_STOP), ("purge", _PURGE))}

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _c(self, controller: str, what: str) -> str:
        return self._key("c", controller, what)

    def enqueue(self, rows: Sequence[Row], max_queued: int) -> None:
        if not rows:
            return
        controller = rows[0]["controller"]
        flat_rows = []
        for row in rows:
            flat: list[str] = []
            for column in _COLUMNS:
                if column == "seq":
                    continue
                encoded = _encode(column, row.get(column))
                if encoded is not None:
                    flat += [column, encoded]
            flat_rows.append(flat)
        done = self._scripts["enqueue"](
            keys=[self._key("seq"), self._c(controller, "q"), self._c(controller, "all"), self._c(controller, "n")],
            args=[self.prefix, max_queued, json.dumps(flat_rows)])
        if done == -1:
            raise QueueFull(max_queued, defaults.RETRY_AFTER)
        for row, seq in zip(rows, done):
            row["seq"] = int(seq)

    def claim(self, controller: str, owner: str, max_running: int, now: float) -> Optional[Row]:
        flat = self._scripts["claim"](
            keys=[self._c(controller, "q"), self._c(controller, "active"), self._c(controller, "n")],
            args=[self.prefix, owner, max_running, repr(now)])
        return _decode(flat) if flat else None

    def get(self, uuid: str) -> Optional[Row]:
        flat = self._redis.hgetall(self._key("t", uuid))
        if not flat:
            return None
        return _decode([x for pair in flat.items() for x in pair])

    def _get_many(self, uuids: Sequence[Any]) -> list[Row]:
        pipe = self._redis.pipeline(transaction=False)
        for uuid in uuids:
            pipe.hgetall(self._key("t", _text(uuid)))
        rows = []
        for flat in pipe.execute():
            if flat:
                rows.append(_decode([x for pair in flat.items() for x in pair]))
        return rows

    def list_tasks(self, controller: str, statuses: Optional[Iterable[str]] = None, limit: int = 100) -> list[Row]:
        wanted = set(statuses) if statuses else None
        found: list[Row] = []
        start = 0
        page = max(limit, 100) if wanted else limit
        while len(found) < limit:
            uuids = self._redis.zrevrange(self._c(controller, "all"), start, start + page - 1)
            if not uuids:
                break
            start += page
            found += [r for r in self._get_many(uuids) if wanted is None or r["status"] in wanted]
        return found[:limit]

    def counts(self, controller: str) -> dict[str, int]:
        raw = self._redis.hgetall(self._c(controller, "n"))
        return {_text(k): int(v) for k, v in raw.items() if int(v)}

    def position(self, row: Row) -> Optional[int]:
        if row["status"] != TaskStatus.QUEUED.value:
            return None
        rank = self._redis.zrank(self._c(row["controller"], "q"), f"{row['seq']:020d}:{row['uuid']}")
        return None if rank is None else int(rank) + 1  # type: ignore[arg-type]

    def update(self, uuid: str, owner: Optional[str] = None, **fields: Any) -> bool:
        unknown = set(fields) - MUTABLE_FIELDS
        if unknown:
            raise ValueError(f"not mutable: {sorted(unknown)}")
        if not fields:
            return False
        sets, dels = _split(fields)
        done = self._scripts["update"](keys=[self._key("t", uuid)],
                                       args=[owner or "", json.dumps(sets), json.dumps(dels)])
        return done == 1

    def finish(self, uuid: str, status: str, owner: Optional[str] = None, **fields: Any) -> bool:
        unknown = set(fields) - MUTABLE_FIELDS
        if unknown or status not in _TERMINAL:
            raise ValueError(f"bad finish: {status} {sorted(unknown)}")
        controller = self._redis.hget(self._key("t", uuid), "controller")
        if controller is None:
            return False
        controller = _text(controller)
        ended_at = fields.get("ended_at") or 0.0
        sets, dels = _split(fields)
        done = self._scripts["finish"](
            keys=[self._key("t", uuid), self._c(controller, "active"), self._c(controller, "n"),
                  self._c(controller, "ended")],
            args=[owner or "", json.dumps(sets), json.dumps(dels), uuid, repr(float(ended_at)), status])
        return done == 1

    def requeue(self, uuid: str, owner: Optional[str] = None) -> bool:
        controller = self._redis.hget(self._key("t", uuid), "controller")
        if controller is None:
            return False
        controller = _text(controller)
        done = self._scripts["requeue"](
            keys=[self._key("t", uuid), self._c(controller, "q"), self._c(controller, "active"),
                  self._c(controller, "n")],
            args=[owner or "", uuid])
        return done == 1

    def request_stop(self, uuid: str, now: float) -> Row:
        answer = self._scripts["request_stop"](keys=[self._key("t", uuid)], args=[self.prefix, uuid, repr(now)])
        verdict = _text(answer[0])
        if verdict == "missing":
            raise TaskNotFound(uuid)
        if verdict == "finished":
            raise TaskAlreadyFinished(uuid, _text(answer[1]))
        return _decode(answer[1])

    def stop_requests(self, uuids: Iterable[str]) -> set[str]:
        wanted = list(uuids)
        if not wanted:
            return set()
        pipe = self._redis.pipeline(transaction=False)
        for uuid in wanted:
            pipe.hget(self._key("t", uuid), "stop_requested")
        return {u for u, flag in zip(wanted, pipe.execute()) if _text(flag) == "1"}

    def active(self, controller: str) -> list[Row]:
        return self._get_many(sorted(self._redis.smembers(self._c(controller, "active"))))

    def purge(self, controller: str, ended_before: float) -> int:
        total = 0
        while True:
            done = self._scripts["purge"](
                keys=[self._c(controller, "ended"), self._c(controller, "all"), self._c(controller, "n")],
                args=[self.prefix, repr(ended_before), 500])
            total += int(done)
            if done < 500:
                return total

    def heartbeat(self, owner: str, now: float) -> None:
        self._redis.zadd(self._key("owners"), {owner: now})

    def heartbeats(self) -> dict[str, float]:
        pairs = self._redis.zrange(self._key("owners"), 0, -1, withscores=True)
        return {_text(owner): float(beat) for owner, beat in pairs}  # type: ignore[str-unpack]

    def forget_owner(self, owner: str) -> None:
        self._redis.zrem(self._key("owners"), owner)

    def close(self) -> None:
        self._redis.close()
