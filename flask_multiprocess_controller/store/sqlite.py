"""The default store: one SQLite file on the local disk, shared by the processes of one machine.

Connections come from a small pool of this process (never carried across a fork); the
database runs in WAL mode with a busy timeout, and every write is one short transaction
that also appends its event to ``mpc_events`` (and, for callback kinds, ``mpc_outbox``).
Claims and bounded inserts run under ``BEGIN IMMEDIATE`` so that the controller's limits
hold across every process using the file. The store's clock is this machine's clock.

Any error of the driver leaves a method as :class:`StoreUnavailable` (locked past the busy
timeout, unwritable, I/O) or :class:`StoreError`; the connection it happened on is dropped,
so the store works again once the cause is gone.
"""
from __future__ import annotations

import collections
import heapq
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Optional, Sequence, cast

from .. import defaults
from ..events import CALLBACK_KINDS, Changes, Event, EventKind
from ..exceptions import (
    InvalidTransition, QueueFull, StoreError, StoreUnavailable, TaskAlreadyFinished, TaskNotFound,
)
from ..exceptions import IdempotentReplay
from ..states import ACTIVE, TERMINAL, TaskStatus
from .claimrules import ClaimRules, claim_tag, fits, host_usage
from .base import (
    ANY_TENANT, ClaimSteps, _finish_fields, FireOutcome, Fired, Row, ScheduleRow, TaskStore, event_payload, event_task,
    owner_host, parse_counter,
)
from .base import Idempotency
from .base import usage_fields
from .base import ProgressWrite
from .base import Timing
from . import filewatch
from .feedsignal import FeedSignal
from .filewatch import FileWatch
from .groupcommit import GroupCommit
from .sqlite_schema import SCHEMA, add_missing_columns, upgrade_feed
from .schema import COLUMNS as _COLUMNS, EVENT_HIDDEN, Encoding, columns_encoded, event_columns

if TYPE_CHECKING:
    from .logbook import LogBook

#: Columns stored as JSON text.
_JSON_COLUMNS = columns_encoded(Encoding.JSON)
#: Columns stored as 0 or 1.
_BOOLEAN_COLUMNS = columns_encoded(Encoding.BOOLEAN)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM mpc_tasks"
#: Lists read tasks without their saved state, which may be large and is shown nowhere (see ``event_task``).
_LISTED_COLUMNS = tuple(c for c in _COLUMNS if c not in EVENT_HIDDEN)
_SELECT_LISTED = f"SELECT {', '.join(_LISTED_COLUMNS)} FROM mpc_tasks"
_EVENT_COLUMNS = "cursor, kind, uuid, controller, at, emitter, task"
_QUEUED = TaskStatus.QUEUED.value
_ACTIVE_SQL = "(" + ", ".join(f"'{s.value}'" for s in sorted(ACTIVE)) + ")"
#: How many tasks of a controller (the parameter) are active: what max_num_process bounds.
_ACTIVE_COUNT = f"SELECT COUNT(*) FROM mpc_tasks WHERE controller = ? AND status IN {_ACTIVE_SQL}"
_TERMINAL = frozenset(s.value for s in TERMINAL)
_TERMINAL_SQL = "(" + ", ".join(f"'{s}'" for s in sorted(_TERMINAL)) + ")"
#: The queued tasks a claim may take: the partial index ``mpc_tasks_ready`` (named, since without
#: statistics SQLite would rather walk the wider ``mpc_tasks_queue``, delayed tasks included).
_READY_SQL = "status = 'queued' AND retry_at IS NULL"
_READY_TASKS = "mpc_tasks INDEXED BY mpc_tasks_ready"
#: The queued tasks waiting for a retry (the partial index ``mpc_tasks_delayed``).
_DELAYED_SQL = "status = 'queued' AND retry_at IS NOT NULL"
_SELECT_READY = f"SELECT {', '.join(_COLUMNS)} FROM {_READY_TASKS}"
#: The ready queue by priority and tenant (the partial index ``mpc_tasks_ready_tenant``), for fair share.
_READY_TENANT = "mpc_tasks INDEXED BY mpc_tasks_ready_tenant"
#: The declared resources of every controller's active tasks (the partial index ``mpc_tasks_active_resources``).
_ACTIVE_RESOURCES = (f"SELECT owner, resources FROM mpc_tasks INDEXED BY mpc_tasks_active_resources "
                     f"WHERE resources IS NOT NULL AND status IN {_ACTIVE_SQL}")
#: Whether the lowest priority of a controller's ready queue holds one tenant's tasks only (or none): then a
#: claim without bounds takes the oldest, as fair share would (three index seeks, however long the queue).
_ONE_TENANT_FIRST = (
    f"SELECT (SELECT tenant FROM {_READY_TENANT} WHERE controller = ?1 AND {_READY_SQL} AND priority = r.priority "
    f"ORDER BY tenant LIMIT 1) IS (SELECT tenant FROM {_READY_TENANT} WHERE controller = ?1 AND {_READY_SQL} "
    f"AND priority = r.priority ORDER BY tenant DESC LIMIT 1) FROM (SELECT priority FROM {_READY_TASKS} "
    f"WHERE controller = ?1 AND {_READY_SQL} ORDER BY priority, seq LIMIT 1) r")
#: The tenant claimed last for a controller, and its counter (the index ``mpc_tenant_claims_latest``).
_LATEST_CLAIM = "SELECT tenant, claimed FROM mpc_tenant_claims WHERE controller = ? ORDER BY claimed DESC LIMIT 1"
#: One tenant's last claim for a controller (NULL: never claimed).
_LAST_CLAIM = "SELECT claimed FROM mpc_tenant_claims WHERE controller = ? AND tenant = ?"
#: The tasks of one tenant: named indexes (without statistics SQLite may prefer the controller's own,
#: and walk every tenant's tasks). ``tenant IS ?`` matches None too.
_TENANT_TASKS = "mpc_tasks INDEXED BY mpc_tasks_tenant"
_TENANT_STATUS_TASKS = "mpc_tasks INDEXED BY mpc_tasks_tenant_status"
_SCHEDULE_COLUMNS = ("controller", "name", "spec", "fired_until", "last_fired", "last_task", "skipped",
                     "last_skipped", "seen_at", "declared_by")
#: The newest cursor written (AUTOINCREMENT's high-water mark: it survives the pruning of every event).
_LATEST_SQL = "SELECT seq FROM sqlite_sequence WHERE name = 'mpc_events'"
#: Records a serving process's heartbeat (owner, time).
_HEARTBEAT_SQL = ("INSERT INTO mpc_owners (owner, heartbeat) VALUES (?, ?) "
                  "ON CONFLICT (owner) DO UPDATE SET heartbeat = excluded.heartbeat")
#: The drained hosts and since when.
_DRAINED_SQL = "SELECT host, since FROM mpc_drained_hosts"
#: The newest cursor, and whether an event of a kind other than ``progress`` came after a cursor.
_NEWS_SQL = (f"SELECT ({_LATEST_SQL}), EXISTS (SELECT 1 FROM mpc_events WHERE cursor > ? AND kind != 'progress')")
#: Every event with a cursor up to this one was pruned.
_PRUNED_SQL = "SELECT value FROM mpc_meta WHERE key = 'pruned'"
#: The newest cursor pruned and the bytes of the events kept (what ``max_event_bytes`` bounds).
#: What a progress write reads back for its event (as the store holds it: JSON decoded as any reader gets it).
#: What a progress write reads back for its event: the event's columns but the progress it wrote (all stored as
#: they are shown: no decoding).
_PROGRESS_RETURNED = tuple(c for c in event_columns(EventKind.PROGRESS.value) if c != "progress")
assert not set(_PROGRESS_RETURNED) & (set(_JSON_COLUMNS) | set(_BOOLEAN_COLUMNS))
_PROGRESS_RETURNING = ", ".join(_PROGRESS_RETURNED)
#: Events written by one INSERT at most (8 values each, well within SQLite's bound on a statement's values).
_EVENTS_PER_INSERT = 200
_FEED_STATE_SQL = ("SELECT (SELECT value FROM mpc_meta WHERE key = 'pruned'), "
                   "(SELECT value FROM mpc_meta WHERE key = 'event_bytes')")
#: Events a byte-bound pruning reads per statement while it looks for where to cut.
_PRUNE_SCAN = 512
#: Tasks a purge deletes per transaction, so that other writers do not wait long.
_PURGE_BATCH = 500
_NO_SEQ = 2 ** 63 - 1
#: Stands for the store's clock at the change, read once the write lock is held.
_NOW = object()
#: An assignment that takes one off a counter (a claim given back does not count as an attempt).
_UNCOUNT = object()


def _encode(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS:
        return None if value is None else json.dumps(value)
    if column in _BOOLEAN_COLUMNS:
        return int(bool(value))
    return value


def _decode(values: Sequence[Any], columns: Sequence[str] = _COLUMNS) -> Row:
    row: Row = dict(zip(columns, values))  # type: ignore[assignment]
    for column in _JSON_COLUMNS:
        if row.get(column) is not None:
            row[column] = json.loads(row[column])  # type: ignore[literal-required]
    for column in _BOOLEAN_COLUMNS:
        if column in row:
            row[column] = bool(row[column])  # type: ignore[literal-required]
    return row


def _choose(db: sqlite3.Connection, controller: str, rules: ClaimRules) -> Optional[int]:
    """The ``seq`` of the ready task a claim with ``rules`` takes (see :mod:`.claimrules`), or None, read in the
    claim's transaction.

    The bounds count the controller's active tasks (as many as it runs: few); the host's usage sums the
    resources of the active tasks that declare some (a partial index holds just those). Keys at their bound
    and tenants held or at theirs are left out in the query; a task that does not fit is skipped, the next
    one read. With fair share, each tenant waiting at the lowest priority value (found by skipping through the
    index of the ready queue by tenant, one seek per tenant) offers its first eligible task, and the tenant
    with the fewest active tasks wins (ties: the tenant claimed least recently, then the older task).
    """
    active = db.execute(f"SELECT tenant, concurrency_key FROM mpc_tasks WHERE controller = ? AND status IN "
                        f"{_ACTIVE_SQL}", (controller,)).fetchall()
    per_tenant = collections.Counter(tenant for tenant, _ in active)
    per_key = collections.Counter(key for _, key in active if key is not None)
    clauses, params = [], []
    if rules.max_per_key is not None:
        full_keys = [key for key, count in per_key.items() if count >= rules.max_per_key]
        if full_keys:
            clauses.append(f"(concurrency_key IS NULL OR concurrency_key NOT IN ({', '.join('?' * len(full_keys))}))")
            params.extend(full_keys)
    excluded = set(rules.held_tenants)
    if rules.max_per_tenant is not None:
        excluded.update(tenant for tenant, count in per_tenant.items()
                        if tenant is not None and count >= rules.max_per_tenant)
    capacity = None if rules.host is None else rules.capacity  # no host: no capacity to count against
    used: dict[str, float] = {}
    if capacity is not None:
        used = host_usage({"resources": json.loads(resources)} for owner, resources in db.execute(_ACTIVE_RESOURCES)
                          if owner and owner_host(owner) == rules.host)

    def first_fit(sql: str, args: Sequence[Any]) -> Optional[int]:
        """The seq of the first task ``sql`` reads (seq, resources) that fits the host."""
        cursor = db.execute(sql, args)
        try:
            for seq, resources in cursor:
                if capacity is None or fits(None if resources is None else json.loads(resources), used, capacity):
                    return int(seq)
            return None
        finally:
            cursor.close()

    keys = "".join(f" AND {clause}" for clause in clauses)
    if not rules.fair:
        named = sorted(tenant for tenant in excluded if tenant is not None)
        not_in = f"tenant NOT IN ({', '.join('?' * len(named))})"  # false for a NULL tenant too
        tenants = (f" AND {not_in}" if None in excluded and named else " AND tenant IS NOT NULL" if None in excluded
                   else f" AND (tenant IS NULL OR {not_in})" if named else "")
        return first_fit(f"SELECT seq, resources FROM {_READY_TASKS} WHERE controller = ? AND {_READY_SQL}{tenants}"
                         f"{keys} ORDER BY priority, seq", [controller, *named, *params])
    priority: Optional[int] = None
    while True:
        after = "" if priority is None else " AND priority > ?"
        found = db.execute(f"SELECT priority FROM {_READY_TASKS} WHERE controller = ? AND {_READY_SQL}{after} "
                           "ORDER BY priority, seq LIMIT 1", [controller, *([] if priority is None else [priority])]
                           ).fetchone()
        if found is None:
            return None
        priority = int(found[0])
        best: Optional[tuple[int, int, int]] = None
        for tenant in _tenants_at(db, controller, priority):
            if tenant in excluded or (best is not None and per_tenant[tenant] > best[0]):
                continue
            seq = first_fit(f"SELECT seq, resources FROM {_READY_TENANT} WHERE controller = ? AND {_READY_SQL} "
                            f"AND priority = ? AND tenant IS ?{keys} ORDER BY seq", [controller, priority, tenant, *params])
            if seq is None:
                continue
            last = db.execute(_LAST_CLAIM, (controller, claim_tag(tenant))).fetchone()
            candidate = (per_tenant[tenant], 0 if last is None else int(last[0]), seq)  # never claimed: first
            if best is None or candidate < best:
                best = candidate
        if best is not None:
            return best[2]


def _record_claim(db: sqlite3.Connection, controller: str, tenant: Optional[str]) -> None:
    """Record a fair claim of ``tenant``'s task as the controller's latest (in the claim's transaction); nothing
    to write when that tenant was claimed last already, so a lone tenant's claims cost one index seek."""
    tag = claim_tag(tenant)
    latest = db.execute(_LATEST_CLAIM, (controller,)).fetchone()
    if latest is not None and latest[0] == tag:
        return
    db.execute("INSERT INTO mpc_tenant_claims (controller, tenant, claimed) VALUES (?, ?, ?) "
               "ON CONFLICT (controller, tenant) DO UPDATE SET claimed = excluded.claimed",
               (controller, tag, 1 if latest is None else int(latest[1]) + 1))


def _tenants_at(db: sqlite3.Connection, controller: str, priority: int) -> list[Optional[str]]:
    """The tenants with ready tasks of the controller at ``priority``: one index seek per tenant (None first)."""
    sql = f"SELECT tenant FROM {_READY_TENANT} WHERE controller = ? AND {_READY_SQL} AND priority = ?"
    found: list[Optional[str]] = []
    if db.execute(f"{sql} AND tenant IS NULL LIMIT 1", (controller, priority)).fetchone():
        found.append(None)
    row = db.execute(f"{sql} AND tenant IS NOT NULL ORDER BY tenant LIMIT 1", (controller, priority)).fetchone()
    while row is not None:
        found.append(row[0])
        row = db.execute(f"{sql} AND tenant > ? ORDER BY tenant LIMIT 1", (controller, priority, row[0])).fetchone()
    return found


def _listed(values: Sequence[Any]) -> Row:
    """A row read with :data:`_SELECT_LISTED`: without its saved state."""
    return _decode(values, _LISTED_COLUMNS)


def _shown(row: Row) -> Row:
    """``row`` as the writes that answer with a task give it: less its saved state, as its event shows it."""
    return cast(Row, event_task(row))


def _event(values: Sequence[Any]) -> Event:
    cursor, kind, uuid, controller, at, emitter, task = values
    return Event(cursor=str(cursor), kind=kind, uuid=uuid, controller=controller, at=at, emitter=emitter,
                 task=json.loads(task))


def _schedule_row(values: Sequence[Any]) -> ScheduleRow:
    state = dict(zip(_SCHEDULE_COLUMNS, values))
    state["spec"] = json.loads(state["spec"])
    return cast(ScheduleRow, state)


def _tenant_clause(tenant: Any, indexed: str) -> tuple[str, str, tuple[Any, ...]]:
    """The table to read (``indexed``, a tenant index, for one tenant), the tenant condition and its parameters."""
    if tenant is ANY_TENANT:
        return "mpc_tasks", "", ()
    return indexed, " AND tenant IS ?", (tenant,)


class _News:
    """What a wait of the change feed looks for: an event after ``after`` (without ``progress``: one of another
    kind, moving :attr:`cursor` past the progress events it finds meanwhile)."""

    def __init__(self, store: "SQLiteStore", after: Optional[int], without_progress: bool) -> None:
        self._store = store
        self._after = after
        self._without_progress = without_progress
        #: The cursor up to which the wait found only progress events (None: it moved nothing).
        self.cursor: Optional[str] = None

    def came(self) -> bool:
        """Whether what the wait looks for is in the feed now."""
        if self._after is None:
            return True
        if not self._without_progress:
            return int(self._store.latest_cursor()) > self._after
        with self._store._snapshot() as db:
            latest, other = db.execute(_NEWS_SQL, (self._after,)).fetchone()
        if other:
            return True
        if latest is not None and latest > self._after:  # only progress since: looked at, and passed
            self._after = latest
            self.cursor = str(latest)
        return False


def _drained(rows: Sequence[Sequence[Any]]) -> dict[str, float]:
    """Host -> since, from rows of :data:`_DRAINED_SQL`."""
    return {str(host): float(since) for host, since in rows}


def _latest(db: sqlite3.Connection) -> int:
    found = db.execute(_LATEST_SQL).fetchone()
    return found[0] if found else 0


#: Connections a store keeps open for reuse, per process (more are opened while more threads need one).
_MAX_IDLE_CONNECTIONS = 16

#: One write lock per database file and process: threads of one process take turns here instead of
#: in SQLite's busy handler, which sleeps for milliseconds between retries.
_write_locks: dict[str, threading.Lock] = {}
_write_locks_guard = threading.Lock()  # guards _write_locks


def _write_lock(path: str) -> threading.Lock:
    with _write_locks_guard:
        return _write_locks.setdefault(path, threading.Lock())


def _forget_write_locks() -> None:
    # A lock held by another thread at fork time would never be released in the child.
    global _write_locks_guard
    _write_locks.clear()
    _write_locks_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_write_locks)


class SQLiteStore(ClaimSteps, TaskStore):
    """Tasks in a SQLite database file.

    :param path: the database file; relative paths are relative to the working
        directory of the process that creates the store.
    :param busy_timeout: seconds a write waits for another process's lock.
    :param mode: permissions of the database file (and its ``-wal``/``-shm`` files) when this
        store creates it; tasks hold arguments and results, so only the owner by default.
    """

    shared = True

    def __init__(self, path: str = defaults.DEFAULT_SQLITE_PATH, busy_timeout: float = 30.0,
                 mode: int = 0o600) -> None:
        if not 0 <= mode <= 0o777:
            raise StoreError(f"The SQLite store's file mode must be between 0o000 and 0o777, not {mode:#o}.")
        self.path = os.path.abspath(path)
        self.busy_timeout = busy_timeout
        self.mode = mode
        # Guards _idle and _idle_pid: idle connections of the process that opened them (a forked
        # child never uses its parent's); each operation takes one and gives it back, so a server
        # that starts a thread per request does not open, and leave behind, a connection per request.
        self._idle_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._idle_pid = os.getpid()
        self._schema_ready = False
        # Guards _generation, which counts this object's commits: a waiting ``changes()`` wakes
        # on it at once, and polls for the commits of other objects and processes.
        self._committed = threading.Condition()
        self._generation = 0
        # Guards _watches and _watches_tried: this process's watches of the database's files, and of the signal
        # file of the events followers act on (see _file_watch).
        self._watch_lock = threading.Lock()
        self._watches: dict[bool, FileWatch] = {}
        self._watches_tried: set[bool] = set()
        #: The signal file written after commits that made events a follower acts on (see .feedsignal).
        self._signal = FeedSignal(self.path, mode)
        #: When a follower's wait (``foreign_only``) last returned (monotonic clock).
        self._followed_at = 0.0
        #: The writes of a task's life that slots make together (claims, starts, progress, ends) share commits.
        self._group = GroupCommit(self._transaction, self._error)
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            created = self._create_file()
            with self._connection():
                if created:  # SQLite gives -wal and -shm the file's mode; make sure of it
                    for suffix in ("", "-wal", "-shm"):
                        if os.path.exists(self.path + suffix):
                            os.chmod(self.path + suffix, mode)
            # Keep no connection open: the controller forks its fork server right after,
            # and a SQLite connection must not cross a fork.
            self.close()
        except OSError as exc:
            raise StoreError(f"Cannot open the SQLite store at {self.path}: {exc}") from exc

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    def _create_file(self) -> bool:
        """Create the empty database file with ``mode``, unless it exists; return whether it was created.

        ``O_EXCL`` with an explicit ``fchmod`` instead of a umask: the umask is the whole process's,
        and other threads may create files meanwhile.
        """
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.mode)
        except FileExistsError:
            return False
        try:
            os.fchmod(fd, self.mode)
        finally:
            os.close(fd)
        return True

    # -- connections and transactions ----------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            if not self._schema_ready:  # the first connection creates the tables; later ones need not
                conn.executescript(SCHEMA)
                add_missing_columns(conn)
                upgrade_feed(conn)
                self._schema_ready = True
        except BaseException:
            conn.close()
            raise
        return conn

    def _error(self, exc: sqlite3.Error) -> StoreError:
        """The store error that a driver error becomes: locked, unwritable or I/O errors may pass."""
        message = f"The SQLite store at {self.path} failed: {exc}"
        if isinstance(exc, sqlite3.OperationalError):
            return StoreUnavailable(message, defaults.RETRY_AFTER)
        return StoreError(message)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A connection of this process for one operation (which must leave no statement open).

        The one place where driver errors become store errors; a connection that saw one is
        closed, not reused, since it may be left inside a transaction.
        """
        with self._idle_lock:
            if self._idle_pid != os.getpid():  # forked: the parent's connections are not ours to use
                self._idle, self._idle_pid = [], os.getpid()
            conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = self._open()
            yield conn
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
                conn = None
            raise self._error(exc) from exc
        finally:
            if conn is not None:
                with self._idle_lock:
                    keep = self._idle_pid == os.getpid() and len(self._idle) < _MAX_IDLE_CONNECTIONS
                    if keep:
                        self._idle.append(conn)
                if not keep:
                    conn.close()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as db:
            return db.execute(sql, params).fetchall()

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: its statements all see the same committed state."""
        with self._connection() as db:
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; only other processes' writers can make it wait in SQLite."""
        with self._connection() as db, _write_lock(self.path):
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                self._signal.settle(committed=False)
                db.execute("ROLLBACK")
                raise
            try:
                db.execute("COMMIT")
            except BaseException:
                self._signal.settle(committed=False)
                raise
        self._signal.settle(committed=True)
        with self._committed:
            self._generation += 1
            self._committed.notify_all()

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [_decode(values) for values in self._query(sql, params)]

    def _read_listed(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """:meth:`_read` of a query on :data:`_SELECT_LISTED`."""
        return [_listed(values) for values in self._query(sql, params)]

    # -- events --------------------------------------------------------------------------------------------

    def _emit(self, db: sqlite3.Connection, kind: EventKind, row: Row, emitter: Optional[str], at: float) -> Event:
        """Append the event of a change of ``row`` (and its outbox entry) in the caller's transaction,
        pruning the oldest events once the feed is past one of its bounds."""
        return self._emit_many(db, kind, [row], emitter, at)[0]

    def _emit_many(self, db: sqlite3.Connection, kind: EventKind, rows: Sequence[Row], emitter: Optional[str],
                   at: float, progress_texts: Optional[Sequence[Optional[str]]] = None) -> list[Event]:
        """:meth:`_emit` for several rows changed alike: one insert per :data:`_EVENTS_PER_INSERT` events, and the
        feed's byte count and bounds looked at once. ``progress_texts``: the JSON of each row's ``progress``,
        made already (a progress write's), put in the event's text as it is instead of encoded again."""
        events: list[Event] = []
        added = 0
        cursor = 0
        if kind is not EventKind.PROGRESS and rows:
            self._signal.owe()
        for start in range(0, len(rows), _EVENTS_PER_INSERT):
            chunk = rows[start:start + _EVENTS_PER_INSERT]
            tasks: list[tuple[dict[str, Any], str]] = []
            values: list[Any] = []
            for i, row in enumerate(chunk, start):
                task = event_payload(kind.value, row)
                if progress_texts is not None:
                    rest = json.dumps({k: v for k, v in task.items() if k != "progress"})
                    progress = progress_texts[i]
                    text = f'{rest[:-1]}, "progress": {"null" if progress is None else progress}}}'
                else:
                    text = json.dumps(task)
                added += len(text)
                tasks.append((task, text))
                values += (kind.value, row["uuid"], row["controller"], at, emitter, text, row.get("tenant"), len(text))
            cursors = sorted(found for (found,) in db.execute(
                "INSERT INTO mpc_events (kind, uuid, controller, at, emitter, task, tenant, size) VALUES "
                + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk)) + " RETURNING cursor", values).fetchall())
            # One statement inserts its rows in order, each with the next cursor (AUTOINCREMENT).
            for row, (task, text), cursor in zip(chunk, tasks, cursors):
                if kind.value in CALLBACK_KINDS:  # a copy: the outbox keeps it whatever the feed's pruning
                    db.execute("INSERT INTO mpc_outbox (cursor, controller, kind, uuid, at, emitter, task) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (cursor, row["controller"], kind.value, row["uuid"], at, emitter, text))
                events.append(Event(cursor=str(cursor), kind=kind.value, uuid=row["uuid"],
                                    controller=row["controller"], at=at, emitter=emitter, task=task))
        if not events:
            return events
        db.execute("INSERT INTO mpc_meta (key, value) VALUES ('event_bytes', ?) "
                   "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value", (added,))
        pruned, total = db.execute(_FEED_STATE_SQL).fetchone()
        # Amortised: past a bound, prune 1% below it, so that the next writes prune nothing.
        if (cursor - (pruned or 0) > self.max_events + self.max_events // 100
                or (total or 0) > self.max_event_bytes):
            self._prune_in(db, cursor - self.max_events, self.max_event_bytes - self.max_event_bytes // 100)
        return events

    @staticmethod
    def _row(db: sqlite3.Connection, uuid: str) -> Row:
        return _decode(db.execute(f"{_SELECT} WHERE uuid = ?", (uuid,)).fetchone())

    @staticmethod
    def _event_row(db: sqlite3.Connection, uuid: str, kind: EventKind) -> Row:
        """The columns of task ``uuid`` that its event of ``kind`` carries (not its arguments, say)."""
        columns = event_columns(kind.value)
        return _decode(db.execute(f"SELECT {', '.join(columns)} FROM mpc_tasks WHERE uuid = ?", (uuid,)).fetchone(),
                       columns)

    def _prune_in(self, db: sqlite3.Connection, bound: int, max_bytes: int) -> None:
        """In the caller's transaction: delete the events with a cursor up to ``bound``, then the oldest
        until the rest take at most ``max_bytes``. The outbox keeps its own copies (see ``expire_callbacks``)."""
        pruned, total = db.execute(_FEED_STATE_SQL).fetchone()
        pruned, total = pruned or 0, total or 0
        bound = max(bound, pruned)
        (freed,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM mpc_events WHERE cursor > ? AND cursor <= ?",
                              (pruned, bound)).fetchone()
        while total - freed > max_bytes:
            batch = db.execute("SELECT cursor, size FROM mpc_events WHERE cursor > ? ORDER BY cursor LIMIT ?",
                               (bound, _PRUNE_SCAN)).fetchall()
            if not batch:
                break
            for cursor, size in batch:
                if total - freed <= max_bytes:
                    break
                freed += size
                bound = cursor
        if bound <= pruned:
            return
        db.execute("DELETE FROM mpc_events WHERE cursor > ? AND cursor <= ?", (pruned, bound))
        db.execute("INSERT OR REPLACE INTO mpc_meta (key, value) VALUES ('pruned', ?)", (bound,))
        db.execute("INSERT OR REPLACE INTO mpc_meta (key, value) VALUES ('event_bytes', ?)", (max(0, total - freed),))

    def _prune_events(self) -> None:
        """Delete the events older than the retention, or beyond the newest ``max_events`` or ``max_event_bytes``."""
        with self._transaction() as db:
            (too_old,) = db.execute("SELECT MAX(cursor) FROM mpc_events WHERE at < ?",
                                    (time.time() - self.event_retention,)).fetchone()
            self._prune_in(db, max(too_old or 0, _latest(db) - self.max_events), self.max_event_bytes)

    # -- writes --------------------------------------------------------------------------------------------

    def enqueue(self, rows: Sequence[Row], max_queued: int, emitter: Optional[str] = None,
                idempotency: Optional[Idempotency] = None) -> list[Event]:
        if not rows:
            return []
        controller = rows[0]["controller"]
        with self._transaction() as db:
            now = time.time()
            if idempotency is not None:
                self._check_idempotency(db, idempotency, now)
            if max_queued >= 0 and self._queued_count(db, controller) + len(rows) > max_queued:
                raise QueueFull(max_queued, defaults.RETRY_AFTER)
            events = self._insert(db, rows, emitter, now)
            if idempotency is not None:
                db.execute("INSERT OR REPLACE INTO mpc_idempotency (key, uuids, fingerprint, expires) "
                           "VALUES (?, ?, ?, ?)", (idempotency.key, json.dumps([row["uuid"] for row in rows]),
                                                   idempotency.fingerprint, now + idempotency.ttl))
        for row, event in zip(rows, events):
            row["seq"] = event["task"]["seq"]
        return events

    @staticmethod
    def _check_idempotency(db: sqlite3.Connection, idempotency: Idempotency, now: float) -> None:
        """Raise :class:`IdempotentReplay` when the key is recorded and not expired (in the caller's transaction)."""
        found = db.execute("SELECT uuids, fingerprint FROM mpc_idempotency WHERE key = ? AND expires > ?",
                           (idempotency.key, now)).fetchone()
        if found is not None:
            raise IdempotentReplay(json.loads(found[0]), found[1])

    @staticmethod
    def _queued_count(db: sqlite3.Connection, controller: str) -> int:
        (queued,) = db.execute(
            "SELECT COUNT(*) FROM mpc_tasks WHERE controller = ? AND status = ?", (controller, _QUEUED)).fetchone()
        return int(queued)

    def _insert(self, db: sqlite3.Connection, rows: Sequence[Row], emitter: Optional[str], now: float) -> list[Event]:
        """Insert new queued tasks in the caller's transaction; return their ``queued`` events."""
        columns = [c for c in _COLUMNS if c != "seq"]
        sql = f"INSERT INTO mpc_tasks ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        events = []
        for row in rows:
            values = [_encode(c, row.get(c)) for c in columns]
            seq = db.execute(sql, values).lastrowid
            stored = _decode([seq, *values])  # what a read would return, without the read
            events.append(self._emit(db, EventKind.QUEUED, stored, emitter, now))
        return events

    def _claim(self, controller: str, owner: str, max_running: int, process: Optional[tuple[int, float]],
               rules: ClaimRules) -> Optional[tuple[Row, Optional[Event]]]:
        """Claim the next task in one transaction; with ``process`` (pid, create time), record it and
        write the ``started`` event in the same transaction."""
        # A plain read first: idle slots look often, and a queue with nothing ready, or a controller
        # running all it may (slots of other processes compete for its places), needs no write lock.
        if not self._query(f"SELECT 1 WHERE ({_ACTIVE_COUNT}) < ? AND EXISTS (SELECT 1 FROM {_READY_TASKS} "
                           f"WHERE controller = ? AND {_READY_SQL} UNION ALL SELECT 1 FROM mpc_tasks "
                           f"WHERE controller = ? AND {_DELAYED_SQL} AND retry_at <= ?) "
                           "AND NOT EXISTS (SELECT 1 FROM mpc_drained_hosts WHERE host = ?)",
                           (controller, max_running, controller, controller, time.time(), rules.host)):
            return None
        return self._group.run(lambda db: self._claim_in(db, controller, owner, max_running, process, rules))

    def _claim_in(self, db: sqlite3.Connection, controller: str, owner: str, max_running: int,
                  process: Optional[tuple[int, float]], rules: ClaimRules) -> Optional[tuple[Row, Optional[Event]]]:
        """:meth:`_claim` in the caller's write transaction."""
        now = time.time()  # inside the lock: later than any change committed before this claim
        db.execute(f"UPDATE mpc_tasks SET retry_at = NULL WHERE controller = ? AND {_DELAYED_SQL} "
                   "AND retry_at <= ?", (controller, now))  # their retry time came: into the ready queue
        (running,) = db.execute(_ACTIVE_COUNT, (controller,)).fetchone()
        if running >= max_running:
            return None
        if rules.host is not None and db.execute("SELECT 1 FROM mpc_drained_hosts WHERE host = ?",
                                                 (rules.host,)).fetchone():
            return None  # read here, in the claim's transaction: a drain is never missed
        if rules.plain and (not rules.fair or (db.execute(_ONE_TENANT_FIRST, (controller,)).fetchone() or (1,))[0]):
            found = db.execute(
                f"{_SELECT_READY} WHERE controller = ? AND {_READY_SQL} "
                "ORDER BY priority, seq LIMIT 1", (controller,),
            ).fetchone()
        else:
            seq = _choose(db, controller, rules)
            found = None if seq is None else db.execute(f"{_SELECT} WHERE seq = ?", (seq,)).fetchone()
        if found is None:
            return None
        row = _decode(found)
        if rules.fair:
            _record_claim(db, controller, row.get("tenant"))
        pid, pid_created = process if process is not None else (row["pid"], row["pid_created"])
        db.execute(
            "UPDATE mpc_tasks SET status = 'running', owner = ?, started_at = ?, attempt = attempt + 1, "
            "pid = ?, pid_created = ? WHERE seq = ?",
            (owner, now, pid, pid_created, row["seq"]),
        )
        row.update({"status": TaskStatus.RUNNING.value, "owner": owner, "started_at": now,
                    "attempt": row["attempt"] + 1, "pid": pid, "pid_created": pid_created})
        event = self._emit(db, EventKind.STARTED, row, owner, now) if process is not None else None
        return row, event

    def _end_and_claim(self, uuid: str, status: str, owner: str, controller: str, max_running: int,
                       process: Optional[tuple[int, float]], fields: dict[str, Any], rules: ClaimRules,
                       ) -> tuple[Optional[Event], Optional[tuple[Row, Optional[Event]]]]:
        """Finish a task and claim the next in one transaction (see :meth:`_claim_in` for ``process``)."""
        assignments = {"ended_at": _NOW, **_finish_fields(status, fields), "status": status}

        def end_and_claim(db: sqlite3.Connection) -> tuple[Optional[Event], Optional[tuple[Row, Optional[Event]]]]:
            event = self._update_active_in(db, EventKind.ENDED, uuid, owner, owner, assignments)
            return event, None if event is None else self._claim_in(db, controller, owner, max_running, process,
                                                                    rules)

        return self._group.run(end_and_claim)

    def _update_active(self, kind: EventKind, uuid: str, owner: Optional[str], emitter: Optional[str],
                       assignments: dict[str, Any]) -> Optional[Event]:
        """Set columns of an active task (of ``owner``, if given) and write the event ``kind``.

        A value :data:`_NOW` is the store's clock at the change.
        """
        return self._group.run(lambda db: self._update_active_in(db, kind, uuid, owner, emitter, assignments))

    def _update_active_in(self, db: sqlite3.Connection, kind: EventKind, uuid: str, owner: Optional[str],
                          emitter: Optional[str], assignments: dict[str, Any]) -> Optional[Event]:
        """:meth:`_update_active` in the caller's write transaction."""
        clause = ", ".join(f"{c} = MAX(0, {c} - 1)" if v is _UNCOUNT else f"{c} = ?" for c, v in assignments.items())
        fence, fenced = (" AND owner = ?", (owner,)) if owner is not None else ("", ())
        now = time.time()
        values = [now if v is _NOW else _encode(c, v) for c, v in assignments.items() if v is not _UNCOUNT]
        changed = db.execute(f"UPDATE mpc_tasks SET {clause} WHERE uuid = ? AND status IN {_ACTIVE_SQL}{fence}",
                             (*values, uuid, *fenced)).rowcount
        if not changed:
            return None
        return self._emit(db, kind, self._event_row(db, uuid, kind), emitter, now)

    def start(self, uuid: str, owner: str, pid: int, pid_created: float) -> Optional[Event]:
        return self._update_active(EventKind.STARTED, uuid, owner, owner, {"pid": pid, "pid_created": pid_created})

    def progress(self, uuid: str, owner: str, progress: Any, percent: Optional[float],
                 usage: Optional[Mapping[str, Any]] = None) -> Optional[Event]:
        return self.progress_many(owner, [ProgressWrite(uuid, progress, percent, usage)])[0]

    def progress_many(self, owner: str, writes: Sequence[ProgressWrite]) -> list[Optional[Event]]:
        if not writes:
            return []
        return self._group.run(lambda db: self._progress_in(db, owner, writes))  # one transaction for the batch

    def _progress_in(self, db: sqlite3.Connection, owner: str, writes: Sequence[ProgressWrite]) -> list[Optional[Event]]:
        """The progress writes of a batch in the caller's transaction: one statement per task, which answers with
        what its event carries besides the progress written (no second read, no decoding), then the events, the
        feed's byte count and bounds at once. Each value is encoded once, for the row and its event."""
        now = time.time()
        rows: list[Row] = []
        texts: list[Optional[str]] = []
        written: list[bool] = []
        for write in writes:
            text = None if write.progress is None else json.dumps(write.progress)
            assignments = {"progress": text, "percent": write.percent, **usage_fields(write.usage)}
            clause = ", ".join(f"{column} = ?" for column in assignments)
            found = db.execute(
                f"UPDATE mpc_tasks SET {clause} WHERE uuid = ? AND status IN {_ACTIVE_SQL} AND owner = ? "
                f"RETURNING {_PROGRESS_RETURNING}", (*assignments.values(), write.uuid, owner)).fetchone()
            written.append(found is not None)
            if found is not None:
                row: Row = dict(zip(_PROGRESS_RETURNED, found))  # type: ignore[assignment]
                row["progress"] = write.progress
                rows.append(row)
                texts.append(text)
        events = iter(self._emit_many(db, EventKind.PROGRESS, rows, owner, now, texts))
        return [next(events) if done else None for done in written]

    def save_state(self, uuid: str, owner: str, state: Any) -> bool:
        text = _encode("state", state)

        def save(db: sqlite3.Connection) -> bool:
            return bool(db.execute(
                f"UPDATE mpc_tasks SET state = ?, state_saved_at = ? WHERE uuid = ? "
                f"AND status IN {_ACTIVE_SQL} AND owner = ?", (text, time.time(), uuid, owner)).rowcount)

        return self._group.run(save)

    def _finish(self, uuid: str, status: str, owner: Optional[str], emitter: Optional[str],
                fields: dict[str, Any]) -> Optional[Event]:
        return self._update_active(EventKind.ENDED, uuid, owner, emitter,
                                   {"ended_at": _NOW, **fields, "status": status})

    def requeue(self, uuid: str, owner: Optional[str] = None, emitter: Optional[str] = None,
                uncount: bool = False) -> Optional[Event]:
        assignments: dict[str, Any] = {"status": _QUEUED, "owner": None, "pid": None, "pid_created": None,
                                       "started_at": None, "stop_requested": False}
        if uncount:
            assignments["attempt"] = _UNCOUNT
        return self._update_active(EventKind.REQUEUED, uuid, owner, owner if emitter is None else emitter,
                                   assignments)

    def adopt(self, uuid: str, owner: str, new_owner: str) -> Optional[Event]:
        return self._update_active(EventKind.ADOPTED, uuid, owner, new_owner, {"owner": new_owner})

    def request_stop(self, uuid: str, emitter: Optional[str] = None, *,
                     finish: bool = False) -> tuple[Row, Optional[Event]]:
        with self._transaction() as db:
            found = db.execute(f"{_SELECT} WHERE uuid = ?", (uuid,)).fetchone()
            if found is None:
                raise TaskNotFound(uuid)
            row = _decode(found)
            status = row["status"]
            if status in _TERMINAL:
                raise TaskAlreadyFinished(uuid, status)
            event = self._stop_one(db, row, emitter, time.time(), finish)  # updates row
            return _shown(row), event

    def _stop_one(self, db: sqlite3.Connection, row: Row, emitter: Optional[str], now: float,
                  finish: bool = False) -> Optional[Event]:
        """Stop a task that is not terminal (``row`` is updated): what :meth:`request_stop` and
        :meth:`stop_all` do to each."""
        if row["status"] == _QUEUED:
            db.execute("UPDATE mpc_tasks SET status = 'stopped', ended_at = ?, stop_requested = 1 "
                       "WHERE seq = ?", (now, row["seq"]))
            row.update({"status": TaskStatus.STOPPED.value, "ended_at": now, "stop_requested": True})
            return self._emit(db, EventKind.ENDED, row, emitter, now)
        if row["status"] in (TaskStatus.RUNNING.value, TaskStatus.PAUSED.value):
            db.execute("UPDATE mpc_tasks SET status = 'stopping', stop_requested = 1, finish_requested = ? "
                       "WHERE seq = ?", (1 if finish else 0, row["seq"]))
            row.update({"status": TaskStatus.STOPPING.value, "stop_requested": True, "finish_requested": finish})
            return self._emit(db, EventKind.STOPPING, row, emitter, now)
        return None

    def purge(self, controller: str, ended_before: float, emitter: Optional[str] = None) -> int:
        total = 0
        while True:
            with self._transaction() as db:
                doomed = [_listed(found) for found in db.execute(
                    f"{_SELECT_LISTED} WHERE controller = ? AND status IN {_TERMINAL_SQL} AND ended_at < ? "
                    "LIMIT ?",
                    (controller, ended_before, _PURGE_BATCH))]
                now = time.time()
                for row in doomed:
                    db.execute("DELETE FROM mpc_tasks WHERE seq = ?", (row["seq"],))
                    self._emit(db, EventKind.PURGED, row, emitter, now)
            total += len(doomed)
            if len(doomed) < _PURGE_BATCH:
                break
        self._prune_events()
        with self._transaction() as db:
            db.execute("DELETE FROM mpc_idempotency WHERE expires <= ?", (time.time(),))
        return total

    # -- task policies -------------------------------------------------------------------------------------

    def _retry(self, uuid: str, delay: float, owner: Optional[str], emitter: Optional[str],
               fields: dict[str, Any]) -> Optional[Event]:
        fence, fenced = (" AND owner = ?", (owner,)) if owner is not None else ("", ())
        assignments = {**fields, "status": _QUEUED, "owner": None, "pid": None, "pid_created": None,
                       "started_at": None}
        clause = ", ".join(f"{c} = ?" for c in assignments)
        with self._transaction() as db:
            now = time.time()
            changed = db.execute(
                f"UPDATE mpc_tasks SET {clause}, retry_at = ? WHERE uuid = ? AND status IN {_ACTIVE_SQL} "
                f"AND stop_requested = 0{fence}",
                (*(_encode(c, v) for c, v in assignments.items()), now + delay, uuid, *fenced)).rowcount
            if not changed:
                return None
            return self._emit(db, EventKind.REQUEUED, self._event_row(db, uuid, EventKind.REQUEUED), emitter, now)

    def next_retry_at(self, controller: str) -> Optional[float]:
        [(earliest,)] = self._query(f"SELECT MIN(retry_at) FROM mpc_tasks WHERE controller = ? AND {_DELAYED_SQL}",
                                    (controller,))
        return None if earliest is None else float(earliest)

    def _changeable(self, db: sqlite3.Connection, uuid: str) -> Row:
        """The task ``uuid`` read in the caller's transaction, if it has not finished."""
        found = db.execute(f"{_SELECT} WHERE uuid = ?", (uuid,)).fetchone()
        if found is None:
            raise TaskNotFound(uuid)
        row = _decode(found)
        if row["status"] in _TERMINAL:
            raise TaskAlreadyFinished(uuid, row["status"])
        return row

    def _transition(self, uuid: str, wanted: str, change: str, needs: str, kind: EventKind,
                    emitter: Optional[str]) -> tuple[Row, Optional[Event]]:
        """Move a task from ``needs`` to ``wanted`` (no change if it is ``wanted`` already)."""
        with self._transaction() as db:
            row = self._changeable(db, uuid)
            if row["status"] == wanted:
                return _shown(row), None
            if row["status"] != needs:
                raise InvalidTransition(uuid, row["status"], change, needs)
            db.execute("UPDATE mpc_tasks SET status = ? WHERE seq = ?", (wanted, row["seq"]))
            row["status"] = wanted
            return _shown(row), self._emit(db, kind, row, emitter, time.time())

    def reprioritise(self, uuid: str, priority: int, emitter: Optional[str] = None) -> tuple[Row, Event]:
        with self._transaction() as db:
            row = self._changeable(db, uuid)
            if row["status"] != _QUEUED:
                raise InvalidTransition(uuid, row["status"], "re-prioritised", _QUEUED)
            db.execute("UPDATE mpc_tasks SET priority = ? WHERE seq = ?", (priority, row["seq"]))
            row["priority"] = priority
            return _shown(row), self._emit(db, EventKind.QUEUED, row, emitter, time.time())

    def stop_all(self, controller: str, emitter: Optional[str] = None, *, tenant: Any = ANY_TENANT) -> list[Event]:
        table, by_tenant, tenant_args = _tenant_clause(tenant, _TENANT_STATUS_TASKS)
        with self._transaction() as db:
            now = time.time()
            rows = [_listed(found) for found in db.execute(
                f"SELECT {', '.join(_LISTED_COLUMNS)} FROM {table} WHERE controller = ?{by_tenant} "
                "AND status IN ('queued', 'running', 'paused') ORDER BY status != 'queued', seq",
                (controller, *tenant_args))]
            return [event for event in (self._stop_one(db, row, emitter, now) for row in rows) if event is not None]

    # -- leases and schedules --------------------------------------------------------------------------------

    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        with self._transaction() as db:
            now = time.time()
            found = db.execute("SELECT holder, expires FROM mpc_leases WHERE name = ?", (name,)).fetchone()
            if found is not None and found[0] != owner and found[1] > now:
                return False
            db.execute("INSERT INTO mpc_leases (name, holder, expires) VALUES (?, ?, ?) ON CONFLICT (name) "
                       "DO UPDATE SET holder = excluded.holder, expires = excluded.expires", (name, owner, now + ttl))
            return True

    def release_lease(self, name: str, owner: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM mpc_leases WHERE name = ? AND holder = ?", (name, owner))

    def declare_schedules(self, controller: str, specs: Mapping[str, dict[str, Any]], owner: str) -> None:
        with self._transaction() as db:
            now = time.time()
            db.executemany(
                "INSERT INTO mpc_schedules (controller, name, spec, fired_until, seen_at, declared_by) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (controller, name) DO UPDATE SET spec = excluded.spec, "
                "seen_at = excluded.seen_at, declared_by = excluded.declared_by",
                [(controller, name, json.dumps(spec), now, now, owner) for name, spec in specs.items()])

    def schedules(self, controller: str) -> list[ScheduleRow]:
        return [_schedule_row(values) for values in self._query(
            f"SELECT {', '.join(_SCHEDULE_COLUMNS)} FROM mpc_schedules WHERE controller = ? ORDER BY name",
            (controller,))]

    def fire(self, controller: str, name: str, firing: float, row: Optional[Row], max_queued: int,
             emitter: Optional[str] = None) -> Fired:
        key = (controller, name)
        with self._transaction() as db:
            found = db.execute("SELECT fired_until FROM mpc_schedules WHERE controller = ? AND name = ?",
                               key).fetchone()
            if found is None or firing <= found[0]:
                return Fired(FireOutcome.STALE, None)
            db.execute("UPDATE mpc_schedules SET fired_until = ? WHERE controller = ? AND name = ?", (firing, *key))
            if row is None:
                return Fired(FireOutcome.MISSED, None)
            if 0 <= max_queued <= self._queued_count(db, controller):
                db.execute("UPDATE mpc_schedules SET skipped = skipped + 1, last_skipped = ? "
                           "WHERE controller = ? AND name = ?", (firing, *key))
                return Fired(FireOutcome.FULL, None)
            [event] = self._insert(db, [row], emitter, time.time())
            db.execute("UPDATE mpc_schedules SET last_fired = ?, last_task = ? WHERE controller = ? AND name = ?",
                       (firing, row["uuid"], *key))
        row["seq"] = event["task"]["seq"]
        return Fired(FireOutcome.QUEUED, event)

    # -- the change feed and the outbox -------------------------------------------------------------------

    filters_progress = True

    def _changes(self, since: str, limit: int, tenant: Any = ANY_TENANT, max_bytes: Optional[int] = None,
                 without_progress: bool = False) -> Changes:
        after = parse_counter(since)
        kinds = " AND kind != 'progress'" if without_progress else ""
        events: list[Event] = []
        with self._snapshot() as db:
            latest = _latest(db)
            pruned = db.execute(_PRUNED_SQL).fetchone()
            if after is None or after < (pruned[0] if pruned else 0) or after > latest:
                return Changes([], str(latest), True)
            if tenant is ANY_TENANT:
                rows = db.execute(f"SELECT {_EVENT_COLUMNS}, size FROM mpc_events WHERE cursor > ?{kinds} "
                                  "ORDER BY cursor LIMIT ?", (after, limit))
            else:  # the index of one tenant's events: what the others wrote costs nothing
                rows = db.execute(f"SELECT {_EVENT_COLUMNS}, size FROM mpc_events INDEXED BY mpc_events_tenant "
                                  f"WHERE tenant IS ? AND cursor > ?{kinds} ORDER BY cursor LIMIT ?",
                                  (tenant, after, limit))
            taken, cut = 0, False
            try:
                for values in rows:  # decoded one at a time: a byte bound stops the reading too
                    events.append(_event(values[:-1]))
                    taken += values[-1]
                    if len(events) >= limit or (max_bytes is not None and taken >= max_bytes):
                        cut = True
                        break
            finally:
                rows.close()
        if (tenant is not ANY_TENANT or without_progress) and not cut:
            return Changes(events, str(latest), False)  # every event up to the latest was looked at
        return Changes(events, events[-1]["cursor"] if events else since, False)

    def _file_watch(self, signal: bool = False) -> Optional[FileWatch]:
        """This process's watch of the database's files (made at the first wait), or with ``signal`` of the signal
        file of the events a follower acts on (see :mod:`.feedsignal`); None: polling (every
        ``FEED_POLL_INTERVAL``), where the kernel cannot tell of changes or ``MPC_SQLITE_FILE_WATCH=0`` says so."""
        if os.environ.get("MPC_SQLITE_FILE_WATCH") == "0":
            return None
        with self._watch_lock:
            found = self._watches.get(signal)
            if found is not None and (found.pid != os.getpid() or found.broken):
                if found.pid == os.getpid():
                    found.close()
                del self._watches[signal]
                self._watches_tried.discard(signal)
                found = None
            if found is None and signal not in self._watches_tried:
                self._watches_tried.add(signal)  # once per process: without inotify, the store polls
                if signal:
                    found = filewatch.watch_file(self._signal.path) if self._signal.ensure() else None
                else:
                    found = filewatch.watch(self.path)
                if found is not None:
                    self._watches[signal] = found
        if found is None and signal:  # no signal file to watch: the database's files tell of every commit
            return self._file_watch()
        return found

    def _wake_waits(self) -> None:
        with self._committed:
            self._generation += 1
            self._committed.notify_all()
        for found in list(self._watches.values()):  # no lock: it guards only making them
            if found.pid == os.getpid():
                found.wake()

    def _wait_for_changes(self, since: str, timeout: float, foreign_only: bool = False,
                          without_progress: bool = False) -> Optional[str]:
        after = parse_counter(since)
        deadline = time.monotonic() + timeout
        news = _News(self, after, without_progress)
        # Without progress, the signal file tells of the events looked for: other commits wake no one.
        found = self._file_watch(signal=without_progress)
        if found is not None:
            self._wait_watching(found, news, deadline, foreign_only)
            return news.cursor
        interrupts = self._interrupts
        if foreign_only:
            # Other processes' commits are seen by looking, every poll interval; this process's
            # own commits need not wake the caller, so a burst of them costs one look per interval.
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._interrupts != interrupts:
                    return news.cursor
                time.sleep(min(defaults.FEED_POLL_INTERVAL, remaining))
                if news.came():
                    return news.cursor
        while True:
            with self._committed:
                generation = self._generation
            if news.came():
                return news.cursor
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._interrupts != interrupts:
                return news.cursor
            with self._committed:
                self._committed.wait_for(lambda: self._generation != generation,
                                         min(defaults.FEED_POLL_INTERVAL, remaining))

    def _wait_watching(self, found: FileWatch, news: "_News", deadline: float, foreign_only: bool) -> None:
        """:meth:`_wait_for_changes` asleep until a commit of any process changes the database's files.

        A follower (``foreign_only``) looks at most once per ``FEED_POLL_INTERVAL`` during a burst of
        commits, as when it polled, but at once after a quiet spell; the watch is checked by a look
        every ``FEED_FALLBACK_POLL`` seconds anyway.
        """
        interrupts = self._interrupts
        if foreign_only:
            pause = self._followed_at + defaults.FEED_POLL_INTERVAL - time.monotonic()
            if pause > 0:
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        try:
            while self._interrupts == interrupts:
                seen = found.generation
                if news.came():
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0 or found.broken:
                    return
                found.wait(seen, min(defaults.FEED_FALLBACK_POLL, remaining), time.monotonic)
        finally:
            if foreign_only:
                self._followed_at = time.monotonic()

    def latest_cursor(self) -> str:
        with self._connection() as db:
            return str(_latest(db))

    def unacked(self, controller: str, limit: int = 100) -> list[Event]:
        return [_event(values) for values in self._query(
            f"SELECT {_EVENT_COLUMNS} FROM mpc_outbox WHERE controller = ? ORDER BY cursor LIMIT ?",
            (controller, limit))]

    def expire_callbacks(self, controller: str, max_age: float) -> list[Event]:
        with self._transaction() as db:
            doomed = [_event(values) for values in db.execute(
                f"SELECT {_EVENT_COLUMNS} FROM mpc_outbox WHERE controller = ? AND at < ? ORDER BY cursor",
                (controller, time.time() - max_age))]
            if doomed:
                db.executemany("DELETE FROM mpc_outbox WHERE cursor = ?", [(int(e["cursor"]),) for e in doomed])
                db.execute("INSERT INTO mpc_meta (key, value) VALUES (?, ?) "
                           "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
                           ("callbacks_dropped:" + controller, len(doomed)))
        return doomed

    def callbacks_dropped(self, controller: str) -> int:
        found = self._query("SELECT value FROM mpc_meta WHERE key = ?", ("callbacks_dropped:" + controller,))
        return int(found[0][0]) if found else 0

    def ack(self, controller: str, cursors: Iterable[str]) -> None:
        numbers = [(controller, n) for n in map(parse_counter, cursors) if n is not None]
        if numbers:
            with self._transaction() as db:
                db.executemany("DELETE FROM mpc_outbox WHERE controller = ? AND cursor = ?", numbers)

    # -- reads ---------------------------------------------------------------------------------------------

    def get(self, uuid: str) -> Optional[Row]:
        rows = self._read(f"{_SELECT} WHERE uuid = ?", (uuid,))
        return rows[0] if rows else None

    def find_by_prefix(self, prefix: str, limit: int = 10) -> list[Row]:
        # A range of the primary key: every uuid that begins with the prefix sorts from it up to the
        # prefix followed by "g", past every hex digit and the dash (BINARY collation).
        return self._read_listed(f"{_SELECT_LISTED} WHERE uuid >= ? AND uuid < ? ORDER BY seq DESC LIMIT ?",
                                 (prefix, prefix + "g", limit))

    def list_tasks(self, controller: str, statuses: Optional[Iterable[str]] = None, limit: int = 100,
                   before: Optional[int] = None, tenant: Any = ANY_TENANT) -> list[Row]:
        below = _NO_SEQ if before is None else before
        wanted = list(dict.fromkeys(statuses or ()))
        columns = ", ".join(_LISTED_COLUMNS)
        if not wanted:
            table, by_tenant, tenant_args = _tenant_clause(tenant, _TENANT_TASKS)
            return self._read_listed(f"SELECT {columns} FROM {table} WHERE controller = ?{by_tenant} AND seq < ? "
                                     "ORDER BY seq DESC LIMIT ?", (controller, *tenant_args, below, limit))
        # One index range per status (each at most ``limit`` rows), merged: O(limit) per status,
        # however many older tasks of other statuses (or of other tenants) there are.
        table, by_tenant, tenant_args = _tenant_clause(tenant, _TENANT_STATUS_TASKS)
        pages = [self._read_listed(f"SELECT {columns} FROM {table} WHERE controller = ?{by_tenant} AND status = ? "
                                   "AND seq < ? ORDER BY seq DESC LIMIT ?",
                                   (controller, *tenant_args, status, below, limit))
                 for status in wanted]
        return list(heapq.merge(*pages, key=lambda r: r["seq"], reverse=True))[:limit]

    def batch(self, controller: str, batch: str) -> list[Row]:
        return self._read_listed(f"{_SELECT_LISTED} WHERE batch = ? AND controller = ? ORDER BY seq",
                                 (batch, controller))

    def reruns(self, controller: str, uuid: str, limit: int = 20) -> list[str]:
        return [found for (found,) in self._query(
            "SELECT uuid FROM mpc_tasks WHERE rerun_of = ? AND controller = ? ORDER BY seq DESC LIMIT ?",
            (uuid, controller, limit))]

    def counts(self, controller: str, *, tenant: Any = ANY_TENANT) -> dict[str, int]:
        table, by_tenant, tenant_args = _tenant_clause(tenant, _TENANT_STATUS_TASKS)
        return dict(self._query(
            f"SELECT status, COUNT(*) FROM {table} WHERE controller = ?{by_tenant} GROUP BY status",
            (controller, *tenant_args)))

    def ended_counts(self, controller: str, since: float, step: float = 60.0,
                     tenant: Any = ANY_TENANT) -> dict[tuple[int, str], int]:
        by_tenant, tenant_args = ("", ()) if tenant is ANY_TENANT else (" AND tenant IS ?", (tenant,))
        rows = self._query(
            f"SELECT CAST((ended_at - ?) / ? AS INTEGER) AS slot, status, COUNT(*) FROM mpc_tasks "
            f"WHERE controller = ? AND ended_at >= ? AND status IN {_TERMINAL_SQL}{by_tenant} GROUP BY slot, status",
            (since, step, controller, since, *tenant_args))
        return {(int(slot), str(status)): int(count) for slot, status, count in rows}

    def ended_timings(self, controller: str, since: float, limit: int = defaults.METRICS_SAMPLE) -> list[Timing]:
        rows = self._query(
            f"SELECT status, created_at, started_at, ended_at, attempt FROM mpc_tasks WHERE controller = ? "
            f"AND ended_at >= ? AND status IN {_TERMINAL_SQL} ORDER BY ended_at DESC LIMIT ?", (controller, since, limit))
        return [Timing(str(status), float(created), None if started is None else float(started), float(ended),
                       int(attempt or 0)) for status, created, started, ended, attempt in rows]

    def callbacks_pending(self, controller: str) -> int:
        [(pending,)] = self._query("SELECT COUNT(*) FROM mpc_outbox WHERE controller = ?", (controller,))
        return int(pending)

    def position(self, row: Row) -> Optional[int]:
        if row["status"] != _QUEUED or row.get("retry_at") is not None:
            return None
        [(ahead,)] = self._query(
            f"SELECT COUNT(*) FROM {_READY_TASKS} WHERE controller = ? AND {_READY_SQL} AND (priority, seq) < (?, ?)",
            (row["controller"], row["priority"], row["seq"]),
        )
        return int(ahead) + 1

    def active(self, controller: str) -> list[Row]:
        return self._read(f"{_SELECT} WHERE controller = ? AND status IN {_ACTIVE_SQL}", (controller,))

    # -- clock and heartbeats ------------------------------------------------------------------------------

    def now(self) -> float:
        return time.time()

    def heartbeat(self, owner: str) -> None:
        with self._transaction() as db:
            db.execute(_HEARTBEAT_SQL, (owner, time.time()))

    def heartbeats(self) -> dict[str, float]:
        return dict(self._query("SELECT owner, heartbeat FROM mpc_owners"))

    def forget_owner(self, owner: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM mpc_owners WHERE owner = ?", (owner,))

    def set_drained(self, host: str, drained: bool) -> None:
        with self._transaction() as db:
            if drained:
                db.execute("INSERT INTO mpc_drained_hosts (host, since) VALUES (?, ?) "
                           "ON CONFLICT (host) DO NOTHING", (host, time.time()))
            else:
                db.execute("DELETE FROM mpc_drained_hosts WHERE host = ?", (host,))

    def drained_hosts(self) -> dict[str, float]:
        return _drained(self._query(_DRAINED_SQL))

    def heartbeat_and_drained(self, owner: str) -> dict[str, float]:
        with self._transaction() as db:  # one transaction
            db.execute(_HEARTBEAT_SQL, (owner, time.time()))
            rows = db.execute(_DRAINED_SQL).fetchall()
        return _drained(rows)

    def close(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
            ours = self._idle_pid == os.getpid()
        if ours:
            for conn in idle:
                conn.close()
        with self._watch_lock:
            watches, self._watches, self._watches_tried = list(self._watches.values()), {}, set()
        for found in watches:
            if found.pid == os.getpid():
                found.close()
        self._signal.close()

    def _make_logbook(self) -> "LogBook":
        from .logbook import SQLiteLogBook

        return SQLiteLogBook(self)

    # -- hosts' capacities and CPU usage (see ..limits) -----------------------------------------------------

    def publish_capacity(self, host: str, capacity: Mapping[str, float]) -> None:
        with self._transaction() as db:  # kept in mpc_meta: one entry per host, no table of its own
            db.execute("INSERT OR REPLACE INTO mpc_meta (key, value) VALUES (?, ?)",
                       ("capacity:" + host, json.dumps({k: float(v) for k, v in capacity.items()})))

    def capacities(self) -> dict[str, dict[str, float]]:
        rows = self._query("SELECT key, value FROM mpc_meta WHERE key >= 'capacity:' AND key < 'capacity;'")
        return {str(key)[len("capacity:"):]: json.loads(value) for key, value in rows}

    def ended_cpu(self, controller: str, since: float) -> list[tuple[Optional[str], float, float]]:
        rows = self._query("SELECT tenant, ended_at, cpu_time FROM mpc_tasks WHERE controller = ? AND ended_at >= ? "
                           "AND cpu_time > 0", (controller, since))
        return [(tenant, float(ended), float(cpu)) for tenant, ended, cpu in rows]
