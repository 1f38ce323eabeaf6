"""The default store: one SQLite file on the local disk, shared by the processes of one machine.

Connections are opened lazily, one per thread and process (never carried across a
fork); the database runs in WAL mode with a busy timeout, and every write is one
short transaction. Claims and bounded inserts run under ``BEGIN IMMEDIATE`` so that
the controller's limits hold across every process using the file.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional, Sequence

from .. import defaults
from ..exceptions import QueueFull, StoreError, TaskAlreadyFinished, TaskNotFound
from ..states import ACTIVE, TERMINAL, TaskStatus
from .base import COLUMNS as _COLUMNS, MUTABLE_FIELDS, Row, TaskStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mpc_tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL UNIQUE,
    controller TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    args TEXT NOT NULL,
    progress TEXT,
    percent REAL,
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    pid INTEGER,
    pid_created REAL,
    exit_code INTEGER,
    owner TEXT,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    timeout REAL,
    memory_peak INTEGER,
    cpu_time REAL,
    attempt INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS mpc_tasks_queue ON mpc_tasks (controller, status, priority, seq);
CREATE INDEX IF NOT EXISTS mpc_tasks_newest ON mpc_tasks (controller, seq);
CREATE INDEX IF NOT EXISTS mpc_tasks_ended ON mpc_tasks (controller, ended_at);
CREATE TABLE IF NOT EXISTS mpc_owners (
    owner TEXT PRIMARY KEY,
    heartbeat REAL NOT NULL
);
"""

#: Columns stored as JSON text.
_JSON_COLUMNS = ("args", "progress", "result", "error")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM mpc_tasks"
_QUEUED = TaskStatus.QUEUED.value
_ACTIVE_SQL = "('running', 'stopping')"
_TERMINAL_SQL = "(" + ", ".join(f"'{s.value}'" for s in sorted(TERMINAL)) + ")"
assert {s.value for s in ACTIVE} == {"running", "stopping"}


def _encode(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS:
        return None if value is None else json.dumps(value)
    if column == "stop_requested":
        return int(bool(value))
    return value


def _decode(values: Sequence[Any]) -> Row:
    row = dict(zip(_COLUMNS, values))
    for column in _JSON_COLUMNS:
        if row[column] is not None:
            row[column] = json.loads(row[column])
    row["stop_requested"] = bool(row["stop_requested"])
    return row


#: Connections a store keeps open for reuse, per process (more are opened while more threads need one).
_MAX_IDLE_CONNECTIONS = 16

#: One write lock per database file and process: threads of one process take turns here instead of
#: in SQLite's busy handler, which sleeps for milliseconds between retries.
_write_locks: dict[str, threading.Lock] = {}
_write_locks_guard = threading.Lock()


def _write_lock(path: str) -> threading.Lock:
    with _write_locks_guard:
        return _write_locks.setdefault(path, threading.Lock())


def _forget_write_locks() -> None:
    # A lock held by another thread at fork time would never be released in the child.
    global _write_locks_guard
    _write_locks.clear()
    _write_locks_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_write_locks)


class SQLiteStore(TaskStore):
    """Tasks in a SQLite database file.

    :param path: the database file; relative paths are relative to the working
        directory of the process that creates the store.
    :param busy_timeout: seconds a write waits for another process's lock.
    """

    shared = True

    def __init__(self, path: str = defaults.DEFAULT_SQLITE_PATH, busy_timeout: float = 30.0) -> None:
        self.path = os.path.abspath(path)
        self.busy_timeout = busy_timeout
        # Idle connections of the process that opened them (a forked child never uses its
        # parent's); each operation takes one and gives it back, so a server that starts a
        # thread per request does not open, and leave behind, a connection per request.
        self._idle: list[sqlite3.Connection] = []
        self._idle_pid = os.getpid()
        self._idle_lock = threading.Lock()
        self._schema_ready = False
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, exist_ok=True)
            with self._connection():
                pass
            # Keep no connection open: the controller forks its fork server right after,
            # and a SQLite connection must not cross a fork.
            self.close()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"Cannot open the SQLite store at {self.path}: {exc}") from exc

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        if not self._schema_ready:  # the first connection creates the tables; later ones need not
            conn.executescript(_SCHEMA)
            self._schema_ready = True
        return conn

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A connection of this process for one operation (which must leave no statement open)."""
        with self._idle_lock:
            if self._idle_pid != os.getpid():  # forked: the parent's connections are not ours to use
                self._idle, self._idle_pid = [], os.getpid()
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._open()
        try:
            yield conn
        finally:
            with self._idle_lock:
                keep = self._idle_pid == os.getpid() and len(self._idle) < _MAX_IDLE_CONNECTIONS
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._connection() as db:
            return db.execute(sql, params).fetchall()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; only other processes' writers can make it wait in SQLite."""
        with self._connection() as db, _write_lock(self.path):
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [_decode(values) for values in self._query(sql, params)]

    def enqueue(self, rows: Sequence[Row], max_queued: int) -> None:
        if not rows:
            return
        controller = rows[0]["controller"]
        columns = [c for c in _COLUMNS if c != "seq"]
        sql = f"INSERT INTO mpc_tasks ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        with self._transaction() as db:
            if max_queued >= 0:
                (queued,) = db.execute(
                    "SELECT COUNT(*) FROM mpc_tasks WHERE controller = ? AND status = ?", (controller, _QUEUED)
                ).fetchone()
                if queued + len(rows) > max_queued:
                    raise QueueFull(max_queued, defaults.RETRY_AFTER)
            for row in rows:
                row["seq"] = db.execute(sql, [_encode(c, row.get(c)) for c in columns]).lastrowid

    def claim(self, controller: str, owner: str, max_running: int, now: float) -> Optional[Row]:
        # A plain read first: idle slots look often, and an empty queue needs no write lock.
        if not self._query("SELECT 1 FROM mpc_tasks WHERE controller = ? AND status = ? LIMIT 1",
                           (controller, _QUEUED)):
            return None
        with self._transaction() as db:
            (running,) = db.execute(
                f"SELECT COUNT(*) FROM mpc_tasks WHERE controller = ? AND status IN {_ACTIVE_SQL}", (controller,)
            ).fetchone()
            if running >= max_running:
                return None
            found = db.execute(
                f"{_SELECT} WHERE controller = ? AND status = ? ORDER BY priority, seq LIMIT 1",
                (controller, _QUEUED),
            ).fetchone()
            if found is None:
                return None
            row = _decode(found)
            db.execute(
                "UPDATE mpc_tasks SET status = 'running', owner = ?, started_at = ?, attempt = attempt + 1 "
                "WHERE seq = ?",
                (owner, now, row["seq"]),
            )
        row.update(status=TaskStatus.RUNNING.value, owner=owner, started_at=now, attempt=row["attempt"] + 1)
        return row

    def get(self, uuid: str) -> Optional[Row]:
        rows = self._read(f"{_SELECT} WHERE uuid = ?", (uuid,))
        return rows[0] if rows else None

    def list_tasks(self, controller: str, statuses: Optional[Iterable[str]] = None, limit: int = 100) -> list[Row]:
        if statuses:
            wanted = list(statuses)
            marks = ", ".join("?" * len(wanted))
            return self._read(
                f"{_SELECT} WHERE controller = ? AND status IN ({marks}) ORDER BY seq DESC LIMIT ?",
                (controller, *wanted, limit),
            )
        return self._read(f"{_SELECT} WHERE controller = ? ORDER BY seq DESC LIMIT ?", (controller, limit))

    def counts(self, controller: str) -> dict[str, int]:
        return dict(self._query(
            "SELECT status, COUNT(*) FROM mpc_tasks WHERE controller = ? GROUP BY status", (controller,)))

    def position(self, row: Row) -> Optional[int]:
        if row["status"] != _QUEUED:
            return None
        [(ahead,)] = self._query(
            "SELECT COUNT(*) FROM mpc_tasks WHERE controller = ? AND status = ? "
            "AND (priority < ? OR (priority = ? AND seq < ?))",
            (row["controller"], _QUEUED, row["priority"], row["priority"], row["seq"]),
        )
        return ahead + 1

    def _set_clause(self, fields: dict[str, Any]) -> tuple[str, list[Any]]:
        unknown = set(fields) - MUTABLE_FIELDS
        if unknown:
            raise ValueError(f"not mutable: {sorted(unknown)}")
        return ", ".join(f"{c} = ?" for c in fields), [_encode(c, v) for c, v in fields.items()]

    @staticmethod
    def _fence(owner: Optional[str]) -> tuple[str, tuple]:
        return (" AND owner = ?", (owner,)) if owner is not None else ("", ())

    def update(self, uuid: str, owner: Optional[str] = None, **fields: Any) -> bool:
        if not fields:
            return False
        clause, values = self._set_clause(fields)
        fence, fenced = self._fence(owner)
        with self._transaction() as db:
            cursor = db.execute(f"UPDATE mpc_tasks SET {clause} WHERE uuid = ? AND status IN {_ACTIVE_SQL}{fence}",
                                (*values, uuid, *fenced))
            return cursor.rowcount == 1

    def finish(self, uuid: str, status: str, owner: Optional[str] = None, **fields: Any) -> bool:
        if status not in {s.value for s in TERMINAL}:
            raise ValueError(f"not a terminal status: {status}")
        clause, values = self._set_clause(fields)
        clause = f"status = ?, {clause}" if clause else "status = ?"
        fence, fenced = self._fence(owner)
        with self._transaction() as db:
            cursor = db.execute(f"UPDATE mpc_tasks SET {clause} WHERE uuid = ? AND status IN {_ACTIVE_SQL}{fence}",
                                (status, *values, uuid, *fenced))
            return cursor.rowcount == 1

    def requeue(self, uuid: str, owner: Optional[str] = None) -> bool:
        fence, fenced = self._fence(owner)
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE mpc_tasks SET status = 'queued', owner = NULL, pid = NULL, pid_created = NULL, "
                f"started_at = NULL, stop_requested = 0 WHERE uuid = ? AND status IN {_ACTIVE_SQL}{fence}",
                (uuid, *fenced),
            )
            return cursor.rowcount == 1

    def request_stop(self, uuid: str, now: float) -> Row:
        with self._transaction() as db:
            found = db.execute(f"{_SELECT} WHERE uuid = ?", (uuid,)).fetchone()
            if found is None:
                raise TaskNotFound(uuid)
            row = _decode(found)
            status = row["status"]
            if status in {s.value for s in TERMINAL}:
                raise TaskAlreadyFinished(uuid, status)
            if status == _QUEUED:
                db.execute("UPDATE mpc_tasks SET status = 'stopped', ended_at = ?, stop_requested = 1 "
                           "WHERE seq = ?", (now, row["seq"]))
                row.update(status=TaskStatus.STOPPED.value, ended_at=now, stop_requested=True)
            elif status == TaskStatus.RUNNING.value:
                db.execute("UPDATE mpc_tasks SET status = 'stopping', stop_requested = 1 WHERE seq = ?",
                           (row["seq"],))
                row.update(status=TaskStatus.STOPPING.value, stop_requested=True)
        return row

    def stop_requests(self, uuids: Iterable[str]) -> set[str]:
        wanted = list(uuids)
        if not wanted:
            return set()
        marks = ", ".join("?" * len(wanted))
        return {uuid for (uuid,) in self._query(
            f"SELECT uuid FROM mpc_tasks WHERE uuid IN ({marks}) AND stop_requested = 1", wanted)}

    def active(self, controller: str) -> list[Row]:
        return self._read(f"{_SELECT} WHERE controller = ? AND status IN {_ACTIVE_SQL}", (controller,))

    def purge(self, controller: str, ended_before: float) -> int:
        with self._transaction() as db:
            cursor = db.execute(
                f"DELETE FROM mpc_tasks WHERE controller = ? AND status IN {_TERMINAL_SQL} AND ended_at < ?",
                (controller, ended_before),
            )
            return cursor.rowcount

    def heartbeat(self, owner: str, now: float) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO mpc_owners (owner, heartbeat) VALUES (?, ?) "
                       "ON CONFLICT (owner) DO UPDATE SET heartbeat = excluded.heartbeat", (owner, now))

    def heartbeats(self) -> dict[str, float]:
        return dict(self._query("SELECT owner, heartbeat FROM mpc_owners"))

    def forget_owner(self, owner: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM mpc_owners WHERE owner = ?", (owner,))

    def close(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
            ours = self._idle_pid == os.getpid()
        if ours:
            for conn in idle:
                conn.close()
