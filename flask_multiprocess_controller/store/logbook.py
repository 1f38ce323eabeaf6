"""Each task's own log: the lines it logged and printed, kept per task and bounded, in the task store.

Every task keeps at most ``keep_bytes`` of its newest lines (the oldest go first), and a task's
lines live ``retention`` seconds after its last one (and go with the task when it is purged),
so a store cannot grow without bound however much tasks write. Lines are numbered from 1 per
task; a reader passes the last number it saw to read on (``follow``).
"""
from __future__ import annotations

import abc
import collections
import threading
import time
from typing import TYPE_CHECKING, Any, Sequence

from .. import defaults

if TYPE_CHECKING:
    from .memory import MemoryStore
    from .postgres import PostgresStore
    from .redis import RedisStore
    from .sqlite import SQLiteStore

#: A numbered log line: ``(n, text)``.
Line = tuple[int, str]


class LogBook(abc.ABC):
    """The per-task logs of one store."""

    def __init__(self, keep_bytes: int = defaults.LOG_KEEP_BYTES, retention: float = defaults.LOG_RETENTION) -> None:
        self.keep_bytes = keep_bytes
        self.retention = retention

    @abc.abstractmethod
    def append(self, uuid: str, lines: Sequence[str]) -> None:
        """Add ``lines`` to the task's log, dropping its oldest lines past ``keep_bytes``. Atomic."""

    @abc.abstractmethod
    def read(self, uuid: str, after: int = 0, limit: int = 1000) -> list[Line]:
        """The kept lines numbered above ``after``, oldest first, at most ``limit``."""

    def drop_orphans(self) -> None:
        """Forget the logs of tasks the store no longer has (after a purge). Redis's expire by themselves."""

    def _clip(self, lines: Sequence[str]) -> list[str]:
        """Lines as kept: none longer than the whole budget."""
        limit = max(1, self.keep_bytes)
        return [line if len(line) <= limit else line[:limit] for line in lines]


class MemoryLogBook(LogBook):
    """Logs in a dict of deques (the memory store's)."""

    def __init__(self, store: "MemoryStore", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._store = store
        # Guards _logs.
        self._lock = threading.Lock()
        #: uuid -> (kept lines, their size, the last number given, the time of the last line)
        self._logs: dict[str, list[Any]] = {}

    def append(self, uuid: str, lines: Sequence[str]) -> None:
        now = time.time()
        with self._lock:
            self._expire(now)
            kept, size, last, _ = self._logs.setdefault(uuid, [collections.deque(), 0, 0, now])
            for line in self._clip(lines):
                last += 1
                kept.append((last, line))
                size += len(line)
            while size > self.keep_bytes and kept:
                size -= len(kept.popleft()[1])
            self._logs[uuid] = [kept, size, last, now]

    def read(self, uuid: str, after: int = 0, limit: int = 1000) -> list[Line]:
        with self._lock:
            entry = self._logs.get(uuid)
            return [] if entry is None else [line for line in entry[0] if line[0] > after][:limit]

    def _expire(self, now: float) -> None:
        for uuid in [u for u, entry in self._logs.items() if now - entry[3] > self.retention]:
            del self._logs[uuid]

    def drop_orphans(self) -> None:
        known = self._store.uuids()
        with self._lock:
            for uuid in [u for u in self._logs if u not in known]:
                del self._logs[uuid]


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS mpc_logs (
    uuid TEXT NOT NULL,
    n INTEGER NOT NULL,
    line TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (uuid, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mpc_log_sizes (
    uuid TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    last INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS mpc_log_sizes_at ON mpc_log_sizes (at);
"""


class SQLiteLogBook(LogBook):
    """Logs in two tables of the SQLite store's file: the lines, and each task's size and last number."""

    def __init__(self, store: "SQLiteStore", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._store = store
        self._ready = False

    def _schema(self) -> None:
        if not self._ready:
            with self._store._connection() as db:
                db.executescript(_SQLITE_SCHEMA)
            self._ready = True

    def append(self, uuid: str, lines: Sequence[str]) -> None:
        self._schema()
        now = time.time()
        lines = self._clip(lines)
        with self._store._transaction() as db:
            found = db.execute("SELECT bytes, last FROM mpc_log_sizes WHERE uuid = ?", (uuid,)).fetchone()
            size, last = found if found else (0, 0)
            db.executemany("INSERT INTO mpc_logs (uuid, n, line, at) VALUES (?, ?, ?, ?)",
                           [(uuid, last + i, line, now) for i, line in enumerate(lines, 1)])
            size += sum(len(line) for line in lines)
            last += len(lines)
            if size > self.keep_bytes:
                size = self._trim(db, uuid, size)
            db.execute("INSERT INTO mpc_log_sizes (uuid, bytes, last, at) VALUES (?, ?, ?, ?) ON CONFLICT (uuid) "
                       "DO UPDATE SET bytes = excluded.bytes, last = excluded.last, at = excluded.at",
                       (uuid, size, last, now))
            self._expire(db, now)

    def _trim(self, db: Any, uuid: str, size: int) -> int:
        cut = 0
        for n, length in db.execute("SELECT n, LENGTH(line) FROM mpc_logs WHERE uuid = ? ORDER BY n", (uuid,)):
            if size <= self.keep_bytes:
                break
            size -= length
            cut = n
        db.execute("DELETE FROM mpc_logs WHERE uuid = ? AND n <= ?", (uuid, cut))
        return size

    def _expire(self, db: Any, now: float) -> None:
        stale = [uuid for (uuid,) in db.execute(
            "SELECT uuid FROM mpc_log_sizes WHERE at < ? LIMIT 100", (now - self.retention,))]
        self._drop(db, stale)

    @staticmethod
    def _drop(db: Any, uuids: list[str]) -> None:
        for uuid in uuids:
            db.execute("DELETE FROM mpc_logs WHERE uuid = ?", (uuid,))
            db.execute("DELETE FROM mpc_log_sizes WHERE uuid = ?", (uuid,))

    def read(self, uuid: str, after: int = 0, limit: int = 1000) -> list[Line]:
        self._schema()
        return [(int(n), str(line)) for n, line in self._store._query(
            "SELECT n, line FROM mpc_logs WHERE uuid = ? AND n > ? ORDER BY n LIMIT ?", (uuid, after, limit))]

    def drop_orphans(self) -> None:
        self._schema()
        with self._store._transaction() as db:
            db.execute("DELETE FROM mpc_logs WHERE uuid NOT IN (SELECT uuid FROM mpc_tasks)")
            db.execute("DELETE FROM mpc_log_sizes WHERE uuid NOT IN (SELECT uuid FROM mpc_tasks)")


class PostgresLogBook(LogBook):
    """Logs in two tables of the PostgreSQL store's schema (``logs``, ``log_sizes``), as in SQLite: the task's
    size row is locked while lines are added, so that two writers of one task number its lines in turn."""

    def __init__(self, store: "PostgresStore", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._store = store
        self._s = store.schema

    def append(self, uuid: str, lines: Sequence[str]) -> None:
        s = self._s
        lines = [line.replace("\x00", "\ufffd") for line in self._clip(lines)]  # PostgreSQL text has no NUL
        with self._store._transaction() as tx:
            now = tx.now
            tx.execute(f"INSERT INTO {s}.log_sizes (uuid, bytes, last, at) VALUES (%s, 0, 0, %s) "
                       "ON CONFLICT (uuid) DO NOTHING", (uuid, now))
            size, last = tx.execute(f"SELECT bytes, last FROM {s}.log_sizes WHERE uuid = %s FOR UPDATE",
                                    (uuid,)).fetchone()
            tx.db.cursor().executemany(f"INSERT INTO {s}.logs (uuid, n, line, at) VALUES (%s, %s, %s, %s)",
                                       [(uuid, last + i, line, now) for i, line in enumerate(lines, 1)])
            size += sum(len(line) for line in lines)
            last += len(lines)
            if size > self.keep_bytes:
                cut = 0
                for n, length in tx.execute(f"SELECT n, length(line) FROM {s}.logs WHERE uuid = %s ORDER BY n",
                                            (uuid,)).fetchall():
                    if size <= self.keep_bytes:
                        break
                    size -= length
                    cut = n
                tx.execute(f"DELETE FROM {s}.logs WHERE uuid = %s AND n <= %s", (uuid, cut))
            tx.execute(f"UPDATE {s}.log_sizes SET bytes = %s, last = %s, at = %s WHERE uuid = %s",
                       (size, last, now, uuid))
            stale = [row[0] for row in tx.execute(
                f"DELETE FROM {s}.log_sizes WHERE uuid IN (SELECT uuid FROM {s}.log_sizes WHERE at < %s LIMIT 100 "
                "FOR UPDATE SKIP LOCKED) RETURNING uuid", (now - self.retention,)).fetchall()]
            if stale:
                tx.execute(f"DELETE FROM {s}.logs WHERE uuid = ANY(%s)", (stale,))

    def read(self, uuid: str, after: int = 0, limit: int = 1000) -> list[Line]:
        return [(int(n), str(line)) for n, line in self._store._query(
            f"SELECT n, line FROM {self._s}.logs WHERE uuid = %s AND n > %s ORDER BY n LIMIT %s", (uuid, after, limit))]

    def drop_orphans(self) -> None:
        s = self._s
        with self._store._transaction() as tx:
            tx.execute(f"DELETE FROM {s}.logs l WHERE NOT EXISTS (SELECT 1 FROM {s}.tasks t WHERE t.uuid = l.uuid)")
            tx.execute(f"DELETE FROM {s}.log_sizes l WHERE NOT EXISTS "
                       f"(SELECT 1 FROM {s}.tasks t WHERE t.uuid = l.uuid)")


# KEYS: lines, meta ; ARGV: keep_bytes, retention seconds, line...
# meta is a hash {bytes, last}; each list entry is "<n>\t<line>".
_REDIS_APPEND = """
local keep = tonumber(ARGV[1])
local ttl = math.max(1, math.floor(tonumber(ARGV[2])))
local size = tonumber(redis.call('HGET', KEYS[2], 'bytes') or '0')
local last = tonumber(redis.call('HGET', KEYS[2], 'last') or '0')
for i = 3, #ARGV do
  last = last + 1
  redis.call('RPUSH', KEYS[1], last .. '\\t' .. ARGV[i])
  size = size + string.len(ARGV[i])
end
while size > keep do
  local oldest = redis.call('LPOP', KEYS[1])
  if not oldest then size = 0 break end
  local tab = string.find(oldest, '\\t', 1, true)
  size = size - (string.len(oldest) - tab)
end
redis.call('HSET', KEYS[2], 'bytes', size, 'last', last)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return last
"""


class RedisLogBook(LogBook):
    """Logs in a Redis list per task, trimmed in one script and expiring ``retention`` after the last line."""

    def __init__(self, store: "RedisStore", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._store = store
        self._append = store._redis.register_script(_REDIS_APPEND)

    def _keys(self, uuid: str) -> list[str]:
        return [self._store._key("log", uuid), self._store._key("logmeta", uuid)]

    def append(self, uuid: str, lines: Sequence[str]) -> None:
        if lines:
            with self._store.guard():
                self._append(keys=self._keys(uuid), args=[self.keep_bytes, self.retention, *self._clip(lines)])

    def read(self, uuid: str, after: int = 0, limit: int = 1000) -> list[Line]:
        with self._store.guard():
            entries = self._store._redis.lrange(self._keys(uuid)[0], 0, -1)
        found: list[Line] = []
        for entry in entries:
            text = entry.decode() if isinstance(entry, bytes) else str(entry)
            number, _, line = text.partition("\t")
            if int(number) > after:
                found.append((int(number), line))
                if len(found) >= limit:
                    break
        return found
