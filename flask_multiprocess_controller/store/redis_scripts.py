"""The Lua scripts of the Redis store: every state change it makes is one of these.

``LIB`` is the prelude every writing script starts with (keys, the server's clock, moving a task
between the indexes of its controller, emitting its event); each script then does one change.
:data:`SCRIPTS` names them as :class:`~.redis.RedisStore` registers them. The sets of states, of
callback kinds and of the columns events leave out are written into the text from their Python
definitions, so the scripts and the rest of the package cannot disagree.
"""
from __future__ import annotations

from typing import Iterable

from ..events import CALLBACK_KINDS, EventKind
from ..states import ACTIVE, TERMINAL
from .schema import EVENT_HIDDEN, event_columns

__all__ = ["LIB", "SCRIPTS"]


def _lua_set(values: Iterable[str]) -> str:
    return "{" + ", ".join(f"['{v}'] = true" for v in sorted(values)) + "}"


def _lua_event_fields() -> str:
    """The columns each kind of event carries (:func:`.schema.event_columns`), as a Lua table."""
    return "{" + ", ".join(f"['{kind.value}'] = {{" + ", ".join(f"'{c}'" for c in event_columns(kind.value)) + "}"
                           for kind in EventKind) + "}"


# Shared by every script that writes. ARGV[1] prefix, ARGV[2] emitter ('' = none), ARGV[3] the feed's
# bounds, "<max_events> <max_event_bytes>"; a script's own arguments follow from ARGV[4].
LIB = """
local prefix, emitter = ARGV[1], ARGV[2]
local max_events, max_event_bytes = string.match(ARGV[3], '^(%d+) (%d+)$')
max_events, max_event_bytes = tonumber(max_events), tonumber(max_event_bytes)
local clock = redis.call('TIME')
local now = string.format('%.6f', tonumber(clock[1]) + tonumber(clock[2]) / 1000000)
local stream = prefix .. 'events'
-- The bytes of the events in the stream (their tasks' JSON): what max_event_bytes bounds.
local stream_bytes = prefix .. 'events:bytes'
-- The id of the newest event of a kind other than progress (what a runtime's follower waits for).
local stream_other = prefix .. 'events:other'
local EVENT_FIELDS = EVENT_FIELDS_TABLE
local ACTIVE = ACTIVE_SET
local TERMINAL = TERMINAL_SET
local CALLBACK = CALLBACK_SET
local EVENT_HIDDEN = EVENT_HIDDEN_SET

local function ckey(controller, what)
  return prefix .. 'c:' .. controller .. ':' .. what
end

-- The tenant index of a controller: key what ('all', or 's:' .. status) of the tenant tagged tag
-- ('=' .. tenant, or '~' for none). `what` comes from a fixed set, so no two (what, tag) share a key.
local function tkey(controller, tag, what)
  return prefix .. 'c:' .. controller .. ':tn:' .. what .. ':' .. tag
end

-- The tag of a tenant (a string or false).
local function tenant_tag(tenant)
  if tenant then return '=' .. tenant end
  return '~'
end

-- A task's member of its controller's queue: seq zero-padded, so equal priorities run in insertion order.
local function queue_member(seq, uuid)
  return string.format('%020d', tonumber(seq)) .. ':' .. uuid
end

-- The ready queue of one tenant (tagged tag) of a controller: as its queue 'q', score = priority.
local function rkey(controller, tag)
  return prefix .. 'c:' .. controller .. ':rq:' .. tag
end

-- Put a queued task into its controller's ready queues (on true) or take it out of them (on false): the
-- controller's 'q', its tenant's 'rq:<tag>', and 'rqt', the tenants with ready tasks scored by the priority
-- of their first one (so that a claim sees at once whether several tenants wait at the lowest priority).
local function set_ready(controller, seq, uuid, priority, tenant, on)
  local member, tag = queue_member(seq, uuid), tenant_tag(tenant)
  local rq = rkey(controller, tag)
  if on then
    redis.call('ZADD', ckey(controller, 'q'), priority, member)
    redis.call('ZADD', rq, priority, member)
  else
    redis.call('ZREM', ckey(controller, 'q'), member)
    redis.call('ZREM', rq, member)
  end
  local first = redis.call('ZRANGE', rq, 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('ZREM', ckey(controller, 'rqt'), tag)
  else
    redis.call('ZADD', ckey(controller, 'rqt'), first[2], tag)
  end
end

-- The host of an owner id 'host:pid:create_time' (hosts may contain ':'), or false (base.owner_host).
local function owner_host(owner)
  if not owner then return false end
  local host, pid, created = string.match(owner, '^(.*):([^:]*):([^:]*)$')
  if not host or host == '' or not string.match(pid, '^%d+$') or not tonumber(created) then return false end
  return host
end

-- The set of the tasks declaring resources that a process of host claimed or adopted: a superset of those
-- active there, which a claim weighing the host's capacity reads (and trims).
local function hkey(host)
  return prefix .. 'host:' .. host .. ':res'
end

-- A stream id zero-padded, so that ids sort as strings (the members of an outbox).
local function pad(id)
  local ms, n = string.match(id, '^(%d+)-(%d+)$')
  return string.rep('0', 20 - #ms) .. ms .. '-' .. string.rep('0', 20 - #n) .. n
end

-- True when the task at key is running or stopping and, unless owner is '', still owner's.
local function owned_active(key, owner)
  local status, holder = unpack(redis.call('HMGET', key, 'status', 'owner'))
  return ACTIVE[status] and (owner == '' or holder == owner)
end

-- Set the fields of a JSON flat list [field, value, ...] and delete those of a JSON list (None values).
local function set_fields(key, sets, dels)
  sets, dels = cjson.decode(sets), cjson.decode(dels)
  if #sets > 0 then redis.call('HSET', key, unpack(sets)) end
  if #dels > 0 then redis.call('HDEL', key, unpack(dels)) end
end

-- Move the task at key to status new, keeping its controller's indexes in step.
local function move(key, new)
  local uuid, controller, old, seq, priority, tenant =
    unpack(redis.call('HMGET', key, 'uuid', 'controller', 'status', 'seq', 'priority', 'tenant'))
  local tag = tenant_tag(tenant)
  redis.call('HSET', key, 'status', new)
  redis.call('ZREM', ckey(controller, 's:' .. old), uuid)
  redis.call('ZADD', ckey(controller, 's:' .. new), seq, uuid)
  redis.call('ZREM', tkey(controller, tag, 's:' .. old), uuid)
  redis.call('ZADD', tkey(controller, tag, 's:' .. new), seq, uuid)
  redis.call('HINCRBY', ckey(controller, 'n'), old, -1)
  redis.call('HINCRBY', ckey(controller, 'n'), new, 1)
  if old == 'queued' then
    set_ready(controller, seq, uuid, priority, tenant, false)
    redis.call('ZREM', ckey(controller, 'delayed'), uuid)
  end
  if new == 'queued' then
    local retry_at = redis.call('HGET', key, 'retry_at')
    if retry_at then
      redis.call('ZADD', ckey(controller, 'delayed'), retry_at, uuid)
    else
      set_ready(controller, seq, uuid, priority, tenant, true)
    end
  end
  if ACTIVE[new] then
    redis.call('SADD', ckey(controller, 'active'), uuid)
  else
    redis.call('SREM', ckey(controller, 'active'), uuid)
  end
  if TERMINAL[new] then redis.call('ZADD', ckey(controller, 'ended'), redis.call('HGET', key, 'ended_at'), uuid) end
end

-- The bytes of a feed entry's task (a flat [field, value, ...] list).
local function entry_size(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'task' then return #fields[i + 1] end
  end
  return 0
end

-- Remove the oldest events while there are more than keep_count, they take more than keep_bytes, or
-- (min_ms not nil) their id is older than min_ms; keep the bytes counted and the newest id pruned.
local function trim(keep_count, keep_bytes, min_ms)
  local count = redis.call('XLEN', stream)
  local bytes = tonumber(redis.call('GET', stream_bytes) or '0')
  local last = false
  while count > 0 do
    local batch = redis.call('XRANGE', stream, last and ('(' .. last) or '-', '+', 'COUNT', 256)
    if #batch == 0 then break end
    local done = false
    for _, entry in ipairs(batch) do
      local ms = tonumber(string.match(entry[1], '^(%d+)-'))
      if count <= keep_count and bytes <= keep_bytes and (min_ms == nil or ms >= min_ms) then
        done = true
        break
      end
      bytes, count, last = bytes - entry_size(entry[2]), count - 1, entry[1]
    end
    if done then break end
  end
  if not last then return end
  local ms, n = string.match(last, '^(%d+)-(%d+)$')
  redis.call('XTRIM', stream, 'MINID', '=', ms .. '-' .. string.format('%d', tonumber(n) + 1))
  redis.call('SET', prefix .. 'events:pruned', last)
  if count <= 0 or bytes < 0 then bytes = 0 end
  redis.call('SET', stream_bytes, bytes)
end

-- Prune the oldest events once there are 1% more than max_events (down to it) or they take more than
-- max_event_bytes (down to 1% below it), remembering the newest one pruned.
local function cap()
  if redis.call('XLEN', stream) <= max_events + math.floor(max_events / 100)
      and tonumber(redis.call('GET', stream_bytes) or '0') <= max_event_bytes then
    return
  end
  trim(max_events, max_event_bytes - math.floor(max_event_bytes / 100), nil)
end

-- The task at key as a flat [field, value, ...] list, less the fields events leave out (a saved state).
local function event_task(key)
  local all, task = redis.call('HGETALL', key), {}
  for i = 1, #all, 2 do
    if not EVENT_HIDDEN[all[i]] then
      task[#task + 1] = all[i]
      task[#task + 1] = all[i + 1]
    end
  end
  return task
end

-- What an event of kind carries of the task at key (EVENT_FIELDS: never its arguments or saved state), as a
-- flat [field, value, ...] list.
local function event_payload(kind, key)
  local names = EVENT_FIELDS[kind]
  local values, task = redis.call('HMGET', key, unpack(names)), {}
  for i, name in ipairs(names) do
    if values[i] then
      task[#task + 1] = name
      task[#task + 1] = values[i]
    end
  end
  return task
end

-- Append the event kind of the task at key to the feed (and, for callbacks, to its controller's outbox,
-- which keeps it whatever the feed's pruning). Returns {cursor, fields}.
local function emit(kind, key)
  local uuid, controller, tenant = unpack(redis.call('HMGET', key, 'uuid', 'controller', 'tenant'))
  local task = cjson.encode(event_payload(kind, key))
  local fields = {'kind', kind, 'uuid', uuid, 'controller', controller, 'at', now, 'task', task}
  if emitter ~= '' then
    fields[#fields + 1] = 'emitter'
    fields[#fields + 1] = emitter
  end
  if tenant then
    fields[#fields + 1] = 'tenant'
    fields[#fields + 1] = tenant
  end
  local id = redis.call('XADD', stream, '*', unpack(fields))
  if kind ~= 'progress' then
    -- Its ids come from the feed: only a feed deleted and made again under a clock set back can make one too
    -- small, and then the stream starts over (a write must not fail for it).
    if type(redis.pcall('XADD', stream_other, 'MAXLEN', '1', id, 'kind', kind)) == 'table' then
      redis.call('DEL', stream_other)
      redis.call('XADD', stream_other, 'MAXLEN', '1', id, 'kind', kind)
    end
  end
  if CALLBACK[kind] then
    redis.call('ZADD', ckey(controller, 'outbox'), 0, pad(id))
    redis.call('HSET', ckey(controller, 'outbox:events'), pad(id), cjson.encode(fields))
  end
  redis.call('INCRBY', stream_bytes, #task)
  cap()
  return {id, fields}
end

-- How many of the controller's tasks are queued (ready or waiting for a retry).
local function queued_count(controller)
  return redis.call('ZCARD', ckey(controller, 'q')) + redis.call('ZCARD', ckey(controller, 'delayed'))
end

-- Store a new queued task from a flat [field, value, ...] list without seq; returns its uuid and event.
local function insert_queued(controller, row)
  local seq = redis.call('INCR', prefix .. 'seq')
  local uuid, priority, batch, tenant, rerun_of
  for i = 1, #row, 2 do
    if row[i] == 'uuid' then uuid = row[i + 1] end
    if row[i] == 'priority' then priority = row[i + 1] end
    if row[i] == 'batch' then batch = row[i + 1] end
    if row[i] == 'tenant' then tenant = row[i + 1] end
    if row[i] == 'rerun_of' then rerun_of = row[i + 1] end
  end
  local key = prefix .. 't:' .. uuid
  redis.call('HSET', key, 'seq', seq, unpack(row))
  if batch then redis.call('ZADD', ckey(controller, 'b:' .. batch), seq, uuid) end
  if rerun_of then redis.call('ZADD', ckey(controller, 'r:' .. rerun_of), seq, uuid) end
  set_ready(controller, seq, uuid, priority, tenant, true)
  redis.call('ZADD', ckey(controller, 'all'), seq, uuid)
  redis.call('ZADD', ckey(controller, 's:queued'), seq, uuid)
  local tag = tenant_tag(tenant)
  redis.call('ZADD', tkey(controller, tag, 'all'), seq, uuid)
  redis.call('ZADD', tkey(controller, tag, 's:queued'), seq, uuid)
  redis.call('HINCRBY', ckey(controller, 'n'), 'queued', 1)
  return uuid, emit('queued', key)
end

-- Stop the task at key as request_stop does (finish: a running one is asked to finish); returns its event,
-- or false when nothing changed.
local function stop_one(key, finish)
  local status = redis.call('HGET', key, 'status')
  if status == 'queued' then
    redis.call('HSET', key, 'ended_at', now, 'stop_requested', '1')
    move(key, 'stopped')
    return emit('ended', key)
  elseif status == 'running' or status == 'paused' then
    redis.call('HSET', key, 'stop_requested', '1')
    redis.call('HSET', key, 'finish_requested', finish and '1' or '0')
    move(key, 'stopping')
    return emit('stopping', key)
  end
  return false
end

-- The verdict on changing the task at key: false to go on, else the answer to return.
local function unchangeable(key)
  local status = redis.call('HGET', key, 'status')
  if not status then return {'missing'} end
  if TERMINAL[status] then return {'finished', status} end
  return false
end
""".replace("ACTIVE_SET", _lua_set(s.value for s in ACTIVE)).replace(
    "TERMINAL_SET", _lua_set(s.value for s in TERMINAL)).replace("CALLBACK_SET", _lua_set(CALLBACK_KINDS))
LIB = LIB.replace(
    "EVENT_HIDDEN_SET", _lua_set(EVENT_HIDDEN)).replace("EVENT_FIELDS_TABLE", _lua_event_fields())

# ARGV from 4: max_queued, controller, rows (JSON list of flat [field, value, ...] lists, without seq),
# then the idempotency key ('' = none), its fingerprint and its life in milliseconds. Returns the events,
# -1 (queue full), or {'replay', record} when the key is recorded (nothing written).
ENQUEUE = LIB + """
local max_queued, controller, rows = tonumber(ARGV[4]), ARGV[5], cjson.decode(ARGV[6])
local idem = ''
if ARGV[7] and ARGV[7] ~= '' then
  idem = prefix .. 'idem:' .. ARGV[7]
  local recorded = redis.call('GET', idem)
  if recorded then return {'replay', recorded} end
end
if max_queued >= 0 and queued_count(controller) + #rows > max_queued then return -1 end
local events, uuids = {}, {}
for _, row in ipairs(rows) do
  local uuid, event = insert_queued(controller, row)
  events[#events + 1] = event
  uuids[#uuids + 1] = uuid
end
if idem ~= '' then
  redis.call('SET', idem, cjson.encode({uuids = uuids, fingerprint = ARGV[8]}), 'PX', tonumber(ARGV[9]))
end
return events
"""

# ARGV from 4: controller, owner, max_running, the claim's rules (JSON, see RedisStore._rules: host, plain,
# fair, key and tenant (the bounds), cap (the host's capacity), held (tags of the held tenants)). Returns the
# claimed row (flat), or nil. The rules are claimrules' (its module text is their specification).
CLAIM = LIB + """
local controller, owner = ARGV[4], ARGV[5]
local rules = cjson.decode(ARGV[7])

local function uuid_of(member)
  return string.sub(member, 22)
end

-- The uuid of the task the claim takes, or false. The plain rules take the head of the queue, as long as
-- one tenant at most has tasks at its priority (fair share weighs nothing then); else every tenant with
-- ready tasks offers its first task that may start, and the lowest priority wins, then (fair share) the
-- tenant with the fewest active tasks, then the tenant claimed least recently ('lc'), then the oldest.
local function pick()
  local head = redis.call('ZRANGE', ckey(controller, 'q'), 0, 0, 'WITHSCORES')
  if #head == 0 then return false end
  if rules.plain and (not rules.fair or redis.call('ZCOUNT', ckey(controller, 'rqt'), head[2], head[2]) <= 1) then
    return uuid_of(head[1])
  end
  -- The controller's active tasks per tenant tag (from the tenant index, when first asked) and per key.
  local per_tag, per_key = {}, {}
  local function tag_active(tag)
    local n = per_tag[tag]
    if not n then
      n = 0
      for status in pairs(ACTIVE) do n = n + redis.call('ZCARD', tkey(controller, tag, 's:' .. status)) end
      per_tag[tag] = n
    end
    return n
  end
  if rules.key then
    for _, uuid in ipairs(redis.call('SMEMBERS', ckey(controller, 'active'))) do
      local ck = redis.call('HGET', prefix .. 't:' .. uuid, 'concurrency_key')
      if ck then per_key[ck] = (per_key[ck] or 0) + 1 end
    end
  end
  -- The resources the host's active tasks (of every controller) declare, read from the tasks themselves.
  local cap, used = rules.host and rules.cap, {}
  if cap then
    local hk = hkey(rules.host)
    for _, uuid in ipairs(redis.call('SMEMBERS', hk)) do
      local status, holder, res = unpack(redis.call('HMGET', prefix .. 't:' .. uuid, 'status', 'owner', 'resources'))
      if status and ACTIVE[status] and res and owner_host(holder) == rules.host then
        for name, amount in pairs(cjson.decode(res)) do used[name] = (used[name] or 0) + (tonumber(amount) or 0) end
      else
        redis.call('SREM', hk, uuid)  -- ended, requeued or gone to another host since
      end
    end
  end
  local held = {}
  for _, tag in ipairs(rules.held or {}) do held[tag] = true end
  -- Whether a task of the tenant tagged tag may start (tasks of no tenant have no per-tenant bound).
  local function tenant_open(tag)
    if held[tag] then return false end
    return not (rules.tenant and tag ~= '~' and tag_active(tag) >= rules.tenant)
  end
  -- Whether the queued task uuid may start, its tenant's being open: its key has room, it fits the host.
  local function task_open(uuid)
    if not (rules.key or cap) then return true end
    local ck, res = unpack(redis.call('HMGET', prefix .. 't:' .. uuid, 'concurrency_key', 'resources'))
    if rules.key and ck and (per_key[ck] or 0) >= rules.key then return false end
    if cap and res then
      for name, amount in pairs(cjson.decode(res)) do
        if (used[name] or 0) + (tonumber(amount) or 0) > (tonumber(cap[name]) or 0) + 1e-9 then return false end
      end
    end
    return true
  end
  -- {priority, active tasks of its tenant and its last claim (0 without fair share; 0: never claimed), seq, uuid}
  local best = false
  local tenants = redis.call('ZRANGE', ckey(controller, 'rqt'), 0, -1, 'WITHSCORES')
  for i = 1, #tenants, 2 do
    local tag, top = tenants[i], tonumber(tenants[i + 1])
    if best and top > best[1] then break end  -- by their first tasks' priority: none after can win
    local active = rules.fair and tag_active(tag) or 0
    local last = rules.fair and tonumber(redis.call('ZSCORE', ckey(controller, 'lc'), tag) or 0) or 0
    if tenant_open(tag) and not (best and top == best[1] and (active > best[2]
        or (active == best[2] and last > best[3]))) then
      -- Read by batches growing from one task (all it takes when the first may start) to 256.
      local rq, from, size, done = rkey(controller, tag), 0, (rules.key or cap) and 4 or 1, false
      while not done do
        local batch = redis.call('ZRANGE', rq, from, from + size - 1, 'WITHSCORES')
        if #batch == 0 then break end
        for j = 1, #batch, 2 do
          local priority, seq = tonumber(batch[j + 1]), tonumber(string.sub(batch[j], 1, 20))
          if best and (priority > best[1] or (priority == best[1] and (active > best[2]
              or (active == best[2] and (last > best[3] or (last == best[3] and seq > best[4])))))) then
            done = true  -- this tenant's later tasks cannot win either
            break
          end
          local uuid = uuid_of(batch[j])
          if task_open(uuid) then
            best, done = {priority, active, last, seq, uuid}, true
            break
          end
        end
        from, size = from + size, math.min(size * 4, 256)
      end
    end
  end
  return best and best[5]
end

-- Fair share's memory: record the claim of a task of the tenant tagged tag as the controller's latest ('lc':
-- tags scored by a counter that grows with each claim recorded); nothing to write when that tenant was
-- claimed last already, so a lone tenant's claims cost one read.
local function record_claim(tag)
  local lc = ckey(controller, 'lc')
  local latest = redis.call('ZRANGE', lc, -1, -1, 'WITHSCORES')
  if #latest > 0 and latest[1] == tag then return end
  redis.call('ZADD', lc, #latest > 0 and tonumber(latest[2]) + 1 or 1, tag)
end

-- Tasks whose retry time came join the ready queue (a bounded batch per claim).
local delayed = ckey(controller, 'delayed')
for _, uuid in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)) do
  local key = prefix .. 't:' .. uuid
  redis.call('ZREM', delayed, uuid)
  redis.call('HDEL', key, 'retry_at')
  local seq, priority, tenant = unpack(redis.call('HMGET', key, 'seq', 'priority', 'tenant'))
  set_ready(controller, seq, uuid, priority, tenant, true)
end
-- A drained host claims nothing (read here, so that a task queued after the drain is never taken by it).
if rules.host and redis.call('HEXISTS', prefix .. 'drained', rules.host) == 1 then return false end
if redis.call('SCARD', ckey(controller, 'active')) >= tonumber(ARGV[6]) then return false end
local uuid = pick()
if not uuid then return false end
local key = prefix .. 't:' .. uuid
if rules.fair then record_claim(tenant_tag(redis.call('HGET', key, 'tenant'))) end
move(key, 'running')
redis.call('HSET', key, 'owner', owner, 'started_at', now)
redis.call('HINCRBY', key, 'attempt', 1)
if redis.call('HEXISTS', key, 'resources') == 1 then
  local host = owner_host(owner)
  if host then redis.call('SADD', hkey(host), uuid) end
end
return redis.call('HGETALL', key)
"""

# ARGV from 4: as CLAIM's, then pid, pid_created. Returns {row (flat), started event}, or nil.
CLAIM_STARTED = CLAIM.replace("return redis.call('HGETALL', key)\n", """
redis.call('HSET', key, 'pid', ARGV[8], 'pid_created', ARGV[9])
return {redis.call('HGETALL', key), emit('started', key)}
""")

# ARGV from 4: uuid, owner, pid, pid_created
START = LIB + """
local key = prefix .. 't:' .. ARGV[4]
if not owned_active(key, ARGV[5]) then return false end
redis.call('HSET', key, 'pid', ARGV[6], 'pid_created', ARGV[7])
return emit('started', key)
"""

# ARGV from 4: uuid, owner, fields to set (JSON flat list), fields to delete (JSON list)
PROGRESS = LIB + """
local key = prefix .. 't:' .. ARGV[4]
if not owned_active(key, ARGV[5]) then return false end
set_fields(key, ARGV[6], ARGV[7])
return emit('progress', key)
"""

# ARGV from 4: owner, then for each task: uuid, fields to set (JSON flat list), fields to delete (JSON list).
# Returns one entry per task: its progress event, or 0 when the task is not owner's active task.
PROGRESS_MANY = LIB + """
local owner = ARGV[4]
local done = {}
for i = 5, #ARGV, 3 do
  local key = prefix .. 't:' .. ARGV[i]
  if owned_active(key, owner) then
    set_fields(key, ARGV[i + 1], ARGV[i + 2])
    done[#done + 1] = emit('progress', key)
  else
    done[#done + 1] = 0
  end
end
return done
"""

# ARGV from 4: uuid, owner, state (JSON). Returns 1 when it was stored, else nil. No event.
SAVE_STATE = LIB + """
local key = prefix .. 't:' .. ARGV[4]
if not owned_active(key, ARGV[5]) then return false end
redis.call('HSET', key, 'state', ARGV[6], 'state_saved_at', now)
return 1
"""

# ARGV from 4: uuid, owner ('' = anyone's), status, fields to set, fields to delete
FINISH = LIB + """
local key = prefix .. 't:' .. ARGV[4]
if not owned_active(key, ARGV[5]) then return false end
redis.call('HSET', key, 'ended_at', now)
set_fields(key, ARGV[7], ARGV[8])
move(key, ARGV[6])
return emit('ended', key)
"""

# ARGV from 4: uuid, owner ('' = anyone's)
REQUEUE = LIB + """
local key = prefix .. 't:' .. ARGV[4]
if not owned_active(key, ARGV[5]) then return false end
redis.call('HSET', key, 'stop_requested', '0')
redis.call('HDEL', key, 'owner', 'pid', 'pid_created', 'started_at')
if ARGV[6] == '1' and tonumber(redis.call('HGET', key, 'attempt') or '0') > 0 then
  redis.call('HINCRBY', key, 'attempt', -1)
end
move(key, 'queued')
return emit('requeued', key)
"""

# ARGV from 4: uuid, owner, new owner
ADOPT = LIB + """
local key = prefix .. 't:' .. ARGV[4]
if not owned_active(key, ARGV[5]) then return false end
redis.call('HSET', key, 'owner', ARGV[6])
if redis.call('HEXISTS', key, 'resources') == 1 then
  local host = owner_host(ARGV[6])
  if host then redis.call('SADD', hkey(host), ARGV[4]) end  -- its resources now count on that host
end
return emit('adopted', key)
"""

# ARGV from 4: uuid. Returns {'missing'}, {'finished', status} or {'ok', row (flat), event or nil}.
REQUEST_STOP = LIB + """
local key = prefix .. 't:' .. ARGV[4]
local refused = unchangeable(key)
if refused then return refused end
local event = stop_one(key, ARGV[5] == '1')
return {'ok', event_task(key), event}
"""

# ARGV from 4: uuid, owner ('' = anyone's), delay seconds, fields to set, fields to delete
RETRY = LIB + """
local key = prefix .. 't:' .. ARGV[4]
if not owned_active(key, ARGV[5]) or redis.call('HGET', key, 'stop_requested') == '1' then return false end
set_fields(key, ARGV[7], ARGV[8])
redis.call('HSET', key, 'retry_at', string.format('%.6f', tonumber(now) + tonumber(ARGV[6])))
redis.call('HDEL', key, 'owner', 'pid', 'pid_created', 'started_at')
move(key, 'queued')
return emit('requeued', key)
"""

# ARGV from 4: uuid, wanted status, status needed, event kind. Returns as REQUEST_STOP, or {'invalid', status}.
TRANSITION = LIB + """
local key = prefix .. 't:' .. ARGV[4]
local refused = unchangeable(key)
if refused then return refused end
local status = redis.call('HGET', key, 'status')
if status == ARGV[5] then return {'ok', event_task(key), false} end
if status ~= ARGV[6] then return {'invalid', status} end
move(key, ARGV[5])
return {'ok', event_task(key), emit(ARGV[7], key)}
"""

# ARGV from 4: uuid, priority. Returns as TRANSITION.
REPRIORITISE = LIB + """
local key = prefix .. 't:' .. ARGV[4]
local refused = unchangeable(key)
if refused then return refused end
local status, controller, seq, uuid, tenant =
  unpack(redis.call('HMGET', key, 'status', 'controller', 'seq', 'uuid', 'tenant'))
if status ~= 'queued' then return {'invalid', status} end
redis.call('HSET', key, 'priority', ARGV[5])
if redis.call('ZSCORE', ckey(controller, 'q'), queue_member(seq, uuid)) then
  set_ready(controller, seq, uuid, ARGV[5], tenant, true)
end
return {'ok', event_task(key), emit('queued', key)}
"""

# ARGV from 4: controller, tenant tag ('' = every tenant's tasks). Returns the events written: the queued
# tasks' first. With a tag, only that tenant's index is read.
STOP_ALL = LIB + """
local controller, tag = ARGV[4], ARGV[5]
local doomed = {}
if tag ~= '' then
  for _, status in ipairs({'queued', 'running', 'paused'}) do
    for _, uuid in ipairs(redis.call('ZRANGE', tkey(controller, tag, 's:' .. status), 0, -1)) do
      doomed[#doomed + 1] = uuid
    end
  end
else
  for _, member in ipairs(redis.call('ZRANGE', ckey(controller, 'q'), 0, -1)) do
    doomed[#doomed + 1] = string.sub(member, 22)
  end
  for _, uuid in ipairs(redis.call('ZRANGE', ckey(controller, 'delayed'), 0, -1)) do doomed[#doomed + 1] = uuid end
  for _, uuid in ipairs(redis.call('SMEMBERS', ckey(controller, 'active'))) do doomed[#doomed + 1] = uuid end
end
local events = {}
for _, uuid in ipairs(doomed) do
  local event = stop_one(prefix .. 't:' .. uuid)
  if event then events[#events + 1] = event end
end
return events
"""

# ARGV from 4: controller, owner, specs (JSON list of [name, spec as JSON text]).
DECLARE = LIB + """
local controller, owner = ARGV[4], ARGV[5]
for _, pair in ipairs(cjson.decode(ARGV[6])) do
  local key = ckey(controller, 'sched:' .. pair[1])
  redis.call('HSETNX', key, 'fired_until', now)
  redis.call('HSETNX', key, 'skipped', 0)
  redis.call('HSET', key, 'spec', pair[2], 'seen_at', now, 'declared_by', owner)
  redis.call('SADD', ckey(controller, 'schedules'), pair[1])
end
return 1
"""

# ARGV from 4: controller, name, firing, max_queued, row (JSON flat list, '' = none).
# Returns {outcome} or {'queued', event}.
FIRE = LIB + """
local controller, firing = ARGV[4], ARGV[6]
local key = ckey(controller, 'sched:' .. ARGV[5])
local fired_until = redis.call('HGET', key, 'fired_until')
if not fired_until or tonumber(firing) <= tonumber(fired_until) then return {'stale'} end
redis.call('HSET', key, 'fired_until', firing)
if ARGV[8] == '' then return {'missed'} end
local max_queued = tonumber(ARGV[7])
if max_queued >= 0 and queued_count(controller) >= max_queued then
  redis.call('HINCRBY', key, 'skipped', 1)
  redis.call('HSET', key, 'last_skipped', firing)
  return {'full'}
end
local uuid, event = insert_queued(controller, cjson.decode(ARGV[8]))
redis.call('HSET', key, 'last_fired', firing, 'last_task', uuid)
return {'queued', event}
"""

# ARGV: prefix, name, owner, ttl in ms. Returns 1 when owner holds the lease afterwards.
LEASE = """
local key = ARGV[1] .. 'lease:' .. ARGV[2]
local holder = redis.call('GET', key)
if holder and holder ~= ARGV[3] then return 0 end
redis.call('SET', key, ARGV[3], 'PX', ARGV[4])
return 1
"""

# ARGV: prefix, name, owner
RELEASE = """
local key = ARGV[1] .. 'lease:' .. ARGV[2]
if redis.call('GET', key) == ARGV[3] then redis.call('DEL', key) end
return 1
"""

# ARGV from 4: controller, ended_before, batch. Returns how many tasks it deleted.
PURGE = LIB + """
local controller = ARGV[4]
local doomed = redis.call('ZRANGEBYSCORE', ckey(controller, 'ended'), '-inf', '(' .. ARGV[5],
                          'LIMIT', 0, tonumber(ARGV[6]))
for _, uuid in ipairs(doomed) do
  local key = prefix .. 't:' .. uuid
  local status, batch, tenant, rerun_of = unpack(redis.call('HMGET', key, 'status', 'batch', 'tenant', 'rerun_of'))
  if status then
    emit('purged', key)
    if batch then redis.call('ZREM', ckey(controller, 'b:' .. batch), uuid) end
    if rerun_of then redis.call('ZREM', ckey(controller, 'r:' .. rerun_of), uuid) end
    redis.call('DEL', ckey(controller, 'r:' .. uuid))
    redis.call('HINCRBY', ckey(controller, 'n'), status, -1)
    redis.call('ZREM', ckey(controller, 's:' .. status), uuid)
    local tag = tenant_tag(tenant)
    redis.call('ZREM', tkey(controller, tag, 'all'), uuid)
    redis.call('ZREM', tkey(controller, tag, 's:' .. status), uuid)
    redis.call('DEL', key)
  end
  redis.call('ZREM', ckey(controller, 'all'), uuid)
  redis.call('ZREM', ckey(controller, 'ended'), uuid)
end
return #doomed
"""

# ARGV from 4: controller, retention seconds. Prunes the events older than the retention (and beyond the
# bounds); the outbox is left alone (EXPIRE_CALLBACKS).
PRUNE = LIB + """
local cutoff = math.floor((tonumber(clock[1]) + tonumber(clock[2]) / 1000000 - tonumber(ARGV[5])) * 1000)
trim(max_events, max_event_bytes, cutoff)
return 1
"""

# ARGV from 4: controller, uuids (JSON list). Puts these tasks of the controller into its tenant index, as
# they are now (a store written before the index existed); idempotent. Returns how many it indexed.
INDEX_TENANTS = LIB + """
local controller, done = ARGV[4], 0
for _, uuid in ipairs(cjson.decode(ARGV[5])) do
  local status, seq, tenant = unpack(redis.call('HMGET', prefix .. 't:' .. uuid, 'status', 'seq', 'tenant'))
  if status then
    local tag = tenant_tag(tenant)
    redis.call('ZADD', tkey(controller, tag, 'all'), seq, uuid)
    redis.call('ZADD', tkey(controller, tag, 's:' .. status), seq, uuid)
    done = done + 1
  end
end
return done
"""

# ARGV from 4: controller, members of its ready queue 'q' (JSON list). Puts these tasks into their tenants'
# ready queues (a store written before those existed); idempotent. Returns how many it indexed.
INDEX_READY = LIB + """
local controller, done = ARGV[4], 0
for _, member in ipairs(cjson.decode(ARGV[5])) do
  local uuid = string.sub(member, 22)
  local status, seq, priority, tenant =
    unpack(redis.call('HMGET', prefix .. 't:' .. uuid, 'status', 'seq', 'priority', 'tenant'))
  if status == 'queued' and seq and queue_member(seq, uuid) == member then
    set_ready(controller, seq, uuid, priority, tenant, true)
    done = done + 1
  end
end
return done
"""

# ARGV from 4: controller, max age seconds. Drops the outbox entries older than that, counts them, and
# returns them as {member, fields (JSON)} pairs.
EXPIRE_CALLBACKS = LIB + """
local controller = ARGV[4]
local cutoff = math.floor((tonumber(clock[1]) + tonumber(clock[2]) / 1000000 - tonumber(ARGV[5])) * 1000)
if cutoff <= 0 then return {} end
local outbox, payloads = ckey(controller, 'outbox'), ckey(controller, 'outbox:events')
local upto = '(' .. pad(string.format('%d', cutoff) .. '-0')
local dropped = {}
for _, member in ipairs(redis.call('ZRANGEBYLEX', outbox, '-', upto)) do
  local payload = redis.call('HGET', payloads, member)
  if payload then dropped[#dropped + 1] = {member, payload} end
  redis.call('HDEL', payloads, member)
end
redis.call('ZREMRANGEBYLEX', outbox, '-', upto)
if #dropped > 0 then redis.call('HINCRBY', prefix .. 'callbacks_dropped', controller, #dropped) end
return dropped
"""

# ARGV: prefix, since ('' = none), limit, tenant ('' = every tenant's, 'n' = tenant None, 's:<tenant>'),
# max bytes ('' = no bound), '1' to leave progress events out. Returns {newest pruned id, latest id, entries
# after since, the cursor to resume from}: the entries are filtered here, and the cursor moves past those
# left out.
FEED = """
local stream = ARGV[1] .. 'events'
local pruned = redis.call('GET', ARGV[1] .. 'events:pruned') or '0-0'
local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
local latest = pruned
if #last > 0 then latest = last[1][1] end
local entries, cursor = {}, ARGV[2]
if ARGV[2] == '' then return {pruned, latest, entries, cursor} end
local limit, wanted, max_bytes, without_progress = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), ARGV[6] == '1'
-- A filtered read looks at up to this many entries per call; its cursor then resumes past them.
local scan_left = 10 * limit + 1000
local taken, full, start = 0, false, ARGV[2]
-- From since inclusive at first (an exclusive start fails on the largest id): since itself is skipped.
local batch = redis.call('XRANGE', stream, start, '+', 'COUNT', math.min(limit, 1000) + 1)
while #batch > 0 and not full and scan_left > 0 do
  for _, entry in ipairs(batch) do
    if entry[1] ~= ARGV[2] then
      cursor = entry[1]
      scan_left = scan_left - 1
      local keep, size, tenant, kind = true, 0, nil, nil
      for i = 1, #entry[2], 2 do
        if entry[2][i] == 'tenant' then tenant = entry[2][i + 1] end
        if entry[2][i] == 'task' then size = #entry[2][i + 1] end
        if entry[2][i] == 'kind' then kind = entry[2][i + 1] end
      end
      if without_progress and kind == 'progress' then
        keep = false
      elseif wanted == 'n' then
        keep = tenant == nil
      elseif wanted ~= '' then
        keep = tenant ~= nil and 's:' .. tenant == wanted
      end
      if keep then
        entries[#entries + 1] = entry
        taken = taken + size
        if #entries >= limit or (max_bytes and taken >= max_bytes) then
          full = true
          break
        end
      end
      if scan_left <= 0 then break end
    end
  end
  if full or scan_left <= 0 then break end
  batch = redis.call('XRANGE', stream, '(' .. cursor, '+', 'COUNT', math.min(limit, 1000))
end
return {pruned, latest, entries, cursor}
"""

# ARGV: prefix, owner
HEARTBEAT = """
local clock = redis.call('TIME')
redis.call('ZADD', ARGV[1] .. 'owners', string.format('%.6f', tonumber(clock[1]) + tonumber(clock[2]) / 1000000),
           ARGV[2])
"""

# ARGV: prefix, host. Drains the host unless it is already (its first since stays).
DRAIN = """
local clock = redis.call('TIME')
redis.call('HSETNX', ARGV[1] .. 'drained', ARGV[2],
           string.format('%.6f', tonumber(clock[1]) + tonumber(clock[2]) / 1000000))
return 1
"""

SCRIPTS = {"enqueue": ENQUEUE, "claim": CLAIM, "claim_started": CLAIM_STARTED,
            "start": START, "progress": PROGRESS, "progress_many": PROGRESS_MANY, "save_state": SAVE_STATE, "finish": FINISH,
            "requeue": REQUEUE, "adopt": ADOPT, "request_stop": REQUEST_STOP, "purge": PURGE,
            "prune": PRUNE, "expire_callbacks": EXPIRE_CALLBACKS,
            "feed": FEED, "heartbeat": HEARTBEAT, "retry": RETRY, "transition": TRANSITION,
            "reprioritise": REPRIORITISE, "stop_all": STOP_ALL, "declare": DECLARE, "fire": FIRE,
            "lease": LEASE, "release": RELEASE, "drain": DRAIN, "index_tenants": INDEX_TENANTS,
            "index_ready": INDEX_READY}
