"""The database store: tasks in PostgreSQL, shared by the serving processes of every host on one database.

Each change is one short transaction that also writes its event. Events get their cursors from the
``publish`` function (:mod:`.postgres_schema`), called last in a transaction under the feed's advisory
lock, so cursors follow commit order and a follower never skips an event that commits late; the
function ends with a ``NOTIFY`` that wakes followers on every host when the transaction commits.
Claims serialise the count of running tasks per controller with a transaction-scoped advisory lock
(only claims take it: ends, progress and stops never wait for it) and take the next ready task with
``FOR UPDATE SKIP LOCKED``; the claim rules (:mod:`.claimrules`) are conditions of the claiming statement,
and a claim that weighs the host's capacity also takes the host's advisory lock (after the controller's:
always in that order), so that claims of every controller on one host check and take room in one step.
The store's clock is the server's, as on Redis, so hosts whose clocks differ still agree on heartbeats,
timeouts and retries.

:meth:`PostgresStore.enqueue_in` writes new tasks in a transaction of the application's own (the
transactional enqueue): their ``queued`` events are published when that transaction commits, and a
rollback leaves nothing.

Connections are kept per process (never used across a fork); any driver error leaves a method as
:class:`StoreUnavailable` (server unreachable, restarting, a deadlock or serialisation failure) or
:class:`StoreError`, and the connection it happened on is dropped.
"""
from __future__ import annotations

import heapq
import json
import os
import select
import threading
import time
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Optional, Sequence, cast

from .. import defaults
from ..events import CALLBACK_KINDS, Changes, Event, EventKind
from ..exceptions import (
    IdempotentReplay, InvalidTransition, QueueFull, StoreError, StoreUnavailable, TaskAlreadyFinished, TaskNotFound,
)
from ..states import ACTIVE, TERMINAL, TaskStatus
from .claimrules import ClaimRules
from .base import (
    ANY_TENANT, ClaimSteps, FireOutcome, Fired, Idempotency, Row, ScheduleRow, TaskStore, _finish_fields, event_payload,
    event_task, parse_counter,
)
from .base import usage_fields
from .base import ProgressWrite
from .base import Timing
from . import pglisten
from .postgres_schema import SCHEMA_NAME, channel, migrate
from .schema import COLUMNS as _COLUMNS, EVENT_HIDDEN, Encoding, columns_encoded, event_columns

if TYPE_CHECKING:
    from .logbook import LogBook

try:
    import psycopg
except ImportError:  # PostgresStore() says how to install it
    psycopg = None  # type: ignore[assignment]

#: The schema the store's tables live in unless told otherwise (``MPC_PG_SCHEMA``).
DEFAULT_SCHEMA = "mpc"
#: The environment variable naming the schema.
SCHEMA_ENV = "MPC_PG_SCHEMA"

_JSON_COLUMNS = frozenset(columns_encoded(Encoding.JSON))
_BOOLEAN_COLUMNS = columns_encoded(Encoding.BOOLEAN)
_LISTED_COLUMNS = tuple(c for c in _COLUMNS if c not in EVENT_HIDDEN)
_INSERTED_COLUMNS = tuple(c for c in _COLUMNS if c != "seq")
_EVENT_COLUMNS = "cursor, kind, uuid, controller, at, emitter, task"
_QUEUED = TaskStatus.QUEUED.value
_ACTIVE_SQL = "(" + ", ".join(f"'{s.value}'" for s in sorted(ACTIVE)) + ")"
_TERMINAL = frozenset(s.value for s in TERMINAL)
_TERMINAL_SQL = "(" + ", ".join(f"'{s}'" for s in sorted(_TERMINAL)) + ")"
_READY_SQL = "status = 'queued' AND retry_at IS NULL"
_DELAYED_SQL = "status = 'queued' AND retry_at IS NOT NULL"
_SCHEDULE_COLUMNS = ("controller", "name", "spec", "fired_until", "last_fired", "last_task", "skipped",
                     "last_skipped", "seen_at", "declared_by")
#: The server's clock in UNIX seconds.
_CLOCK = "extract(epoch FROM clock_timestamp())::float8"
#: The server's clock when the statement began: one value wherever a statement uses it.
_STATEMENT_CLOCK = "extract(epoch FROM statement_timestamp())::float8"
_PRUNE_SCAN = 512
_PURGE_BATCH = 500
_NO_SEQ = 2 ** 63 - 1
_NOW = object()
_UNCOUNT = object()
#: Idle connections kept per process.
_MAX_IDLE_CONNECTIONS = 8
#: Connections a forked process inherited from its parent: never used, never closed (closing would end the
#: parent's session), and kept referenced so that no finaliser touches them.
_INHERITED: list[Any] = []
#: Seconds a waiting follower sleeps at most between looks when no notification comes (a safety net: the
#: listener wakes every waiter at each notification and after each reconnection, which may have missed some).
_WAIT_POLL = 5.0


def tenant_text(tenant: Optional[str]) -> Optional[str]:
    """A tenant as the ``tenant`` columns hold it: PostgreSQL text has no NUL, which the system tenant's
    marker starts with, so backslashes and NULs are escaped (``\\\\`` and ``\\0``); equal tenants stay equal."""
    return None if tenant is None else tenant.replace("\\", "\\\\").replace("\x00", "\\0")


#: A tenant column's key in ``tenant_claims`` (as :func:`.claimrules.claim_tag`, of the escaped text): never NULL.
_CLAIM_TAG = "COALESCE('=' || {col}, '~')"


def _full_groups(name: str, column: str, bound: str) -> tuple[str, str]:
    """A claim's bound on the active tasks per value of ``column`` (a concurrency key, a tenant): the CTE
    ``name`` of the values whose active tasks (the CTE ``act``) number the parameter ``bound`` or more, and
    the condition, written after a value, that it is not one of them. NULL is no group and never full; the
    condition does not hold for it, so the caller lets its tasks through."""
    cte = (f"{name} AS (SELECT {column} FROM act WHERE {column} IS NOT NULL "
           f"GROUP BY {column} HAVING count(*) >= %({bound})s)")
    return cte, f"NOT IN (SELECT {column} FROM {name})"


def _tenant_value(text: Optional[str]) -> Optional[str]:
    """The tenant of a ``tenant`` column's text (see :func:`tenant_text`)."""
    if text is None or "\\" not in text:
        return text
    parts = text.split("\\\\")
    return "\\".join(part.replace("\\0", "\x00") for part in parts)


def _encode(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS:
        return None if value is None else json.dumps(value)
    if column in _BOOLEAN_COLUMNS:
        return bool(value)
    if column == "tenant":
        return tenant_text(value)
    return value


def _decode(values: Sequence[Any], columns: Sequence[str] = _COLUMNS) -> Row:
    row: dict[str, Any] = dict(zip(columns, values))
    for column in _JSON_COLUMNS:
        if row.get(column) is not None:
            row[column] = json.loads(row[column])
    for column in _BOOLEAN_COLUMNS:
        if column in row:
            row[column] = bool(row[column])
    if row.get("tenant") is not None:
        row["tenant"] = _tenant_value(row["tenant"])
    return cast(Row, row)


def _listed(values: Sequence[Any]) -> Row:
    return _decode(values, _LISTED_COLUMNS)


def _shown(row: Row) -> Row:
    return cast(Row, event_task(row))


def _event(values: Sequence[Any]) -> Event:
    cursor, kind, uuid, controller, at, emitter, task = values
    return Event(cursor=str(cursor), kind=kind, uuid=uuid, controller=controller, at=at, emitter=emitter,
                 task=json.loads(task))


def _schedule_row(values: Sequence[Any]) -> ScheduleRow:
    state = dict(zip(_SCHEDULE_COLUMNS, values))
    state["spec"] = json.loads(state["spec"])
    return cast(ScheduleRow, state)


def _tenant_condition(tenant: Any) -> tuple[str, tuple[Any, ...]]:
    """The condition on ``tenant`` (none for any tenant) and its parameters: ``IS NULL`` for None, so that
    the tenant indexes serve both."""
    if tenant is ANY_TENANT:
        return "", ()
    if tenant is None:
        return " AND tenant IS NULL", ()
    return " AND tenant = %s", (tenant_text(tenant),)


def plain_url(url: str) -> tuple[str, Optional[str]]:
    """The libpq URL of a store URL (``postgresql+psycopg://``, SQLAlchemy's spelling, as ``postgresql://``) and
    the schema its ``schema=`` option names (an option of the store, which libpq would refuse)."""
    scheme, sep, rest = url.partition("://")
    if scheme.startswith("postgresql+") or scheme.startswith("postgres+"):
        url = "postgresql://" + rest
    base, mark, query = url.partition("?")
    if not mark:
        return url, None
    options = parse_qsl(query, keep_blank_values=True)
    schema = next((value for key, value in options if key == "schema"), None)
    kept = urlencode([(key, value) for key, value in options if key != "schema"])
    return base + ("?" + kept if kept else ""), schema


class _Tx:
    """One write transaction: its connection, the server's clock read once, and the events it will publish."""

    __slots__ = ("db", "_now", "events")

    def __init__(self, db: Any) -> None:
        self.db = db
        self._now: Optional[float] = None
        #: (event, its task as JSON, its tenant), in the order written.
        self.events: list[tuple[Event, str, Optional[str]]] = []

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any:
        return self.db.execute(sql, params)

    @property
    def now(self) -> float:
        """The server's clock, read at the first use in the transaction."""
        if self._now is None:
            self._now = float(self.execute(f"SELECT {_CLOCK}").fetchone()[0])
        return self._now

    def emit(self, kind: EventKind, row: Mapping[str, Any], emitter: Optional[str], at: float) -> Event:
        """The event of a change of ``row``; its cursor is given when the transaction publishes it."""
        task = event_payload(kind.value, row)
        event = Event(cursor="", kind=kind.value, uuid=row["uuid"], controller=row["controller"], at=at,
                      emitter=emitter, task=task)
        self.events.append((event, json.dumps(task), tenant_text(row.get("tenant"))))
        return event


class PostgresStore(ClaimSteps, TaskStore):
    """Tasks in a PostgreSQL database (``postgresql://user:password@host:port/database``), through psycopg 3.

    :param url: the database's URL (``postgresql+psycopg://`` is taken too); any libpq option may follow
        ``?``, ``sslmode=require`` say, and ``schema=`` names the schema.
    :param schema: the schema of the store's tables (created on first use); default the URL's ``schema=``, else
        ``MPC_PG_SCHEMA``, else ``mpc``. Several apps may share a database with a schema each.
    :param connect_timeout: seconds a new connection may take.
    """

    shared = True

    def __init__(self, url: str = "postgresql://127.0.0.1/postgres", schema: Optional[str] = None,
                 connect_timeout: float = 5.0) -> None:
        if psycopg is None:
            raise StoreError("The PostgreSQL store needs psycopg 3: pip install "
                             "'flask-multiprocess-controller[postgres]'.")
        self.url, url_schema = plain_url(url)
        self.schema = schema or url_schema or os.environ.get(SCHEMA_ENV) or DEFAULT_SCHEMA
        if not SCHEMA_NAME.fullmatch(self.schema):
            raise StoreError(f"The PostgreSQL store's schema must be a lower-case identifier like mpc or "
                             f"tasks_app1, not {self.schema!r}.")
        self.connect_timeout = connect_timeout
        self._channel = channel(self.schema)
        s = self.schema
        self._t = f"{s}.tasks"
        self._select = f"SELECT {', '.join(_COLUMNS)} FROM {s}.tasks"
        self._select_listed = f"SELECT {', '.join(_LISTED_COLUMNS)} FROM {s}.tasks"
        self._active_count = f"SELECT count(*) FROM {s}.tasks WHERE controller = %s AND status IN {_ACTIVE_SQL}"
        self._latest_sql = (f"SELECT (SELECT value FROM {s}.meta WHERE key = 'pruned'), "
                            f"GREATEST((SELECT value FROM {s}.meta WHERE key = 'pruned'), "
                            f"(SELECT max(cursor) FROM {s}.events))")
        # The newest cursor, and whether an event of a kind other than progress came after a cursor.
        self._news_sql = (f"SELECT GREATEST((SELECT value FROM {s}.meta WHERE key = 'pruned'), "
                          f"(SELECT max(cursor) FROM {s}.events)), "
                          f"EXISTS (SELECT 1 FROM {s}.events WHERE cursor > %s AND kind <> 'progress')")
        self._feed_state = (f"SELECT (SELECT value FROM {s}.meta WHERE key = 'pruned'), "
                            f"(SELECT value FROM {s}.meta WHERE key = 'event_bytes')")
        self._publish_sql = f"SELECT * FROM {s}.publish(%s, %s, %s, %s, %s, %s, %s, %s)"
        # Guards _idle and _idle_pid: idle connections of the process that opened them.
        self._idle_lock = threading.Lock()
        self._idle: list[Any] = []
        self._idle_pid = os.getpid()
        # Guards _generation: bumped at each commit of this object and each notification the listener gets.
        self._committed = threading.Condition()
        self._generation = 0
        # Guards _listening_pid: the process in which this store subscribed to the process's feed listener
        # (:mod:`.pglisten`), at its first waiting follower; 0 while it is not subscribed.
        self._listening_lock = threading.Lock()
        self._listening_pid = 0
        try:
            with self._connection() as db:
                migrate(db, self.schema)
                #: Names this store's tables: a transactional enqueue checks it on the application's connection.
                self.store_id = int(db.execute(f"SELECT value FROM {s}.meta WHERE key = 'store_id'").fetchone()[0])
        finally:
            self.close()  # no connection is carried into the processes the controller forks next  # no connection is carried into the processes the controller forks next

    def __repr__(self) -> str:
        return f"PostgresStore({self.public_url!r}, schema={self.schema!r})"

    @property
    def reopen_url(self) -> str:
        """A store URL that opens this store again in another process (its schema included)."""
        return f"{self.url}{'&' if '?' in self.url else '?'}schema={self.schema}"

    @property
    def public_url(self) -> str:
        """The URL without its password: what logs, errors and pages show."""
        from . import redacted_url

        return redacted_url(self.url)

    # -- connections and transactions ----------------------------------------------------------------------

    def _open(self) -> Any:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout)),
                               application_name="flask-multiprocess-controller")

    def _error(self, exc: Exception) -> StoreError:
        message = f"The PostgreSQL store at {self.public_url} failed: {exc}".replace(self.url, self.public_url)
        if isinstance(exc, psycopg.OperationalError):
            return StoreUnavailable(message, defaults.RETRY_AFTER)
        return StoreError(message)

    @staticmethod
    def _stale(conn: Any) -> bool:
        """Whether an idle connection was closed by the server (a restart, an idle timeout): it has
        something to read, which an idle connection never has."""
        if conn.closed or conn.broken:
            return True
        try:
            readable, _, _ = select.select([conn.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _take(self) -> Any:
        with self._idle_lock:
            if self._idle_pid != os.getpid():  # forked: the parent's connections are not ours to use
                _INHERITED.extend(self._idle)  # nor to close: kept, so that nothing finalises them here
                self._idle, self._idle_pid = [], os.getpid()
            while self._idle:
                conn = self._idle.pop()
                if not self._stale(conn):
                    return conn
                conn.close()
        return self._open()

    def _give_back(self, conn: Any) -> None:
        with self._idle_lock:
            keep = (self._idle_pid == os.getpid() and len(self._idle) < _MAX_IDLE_CONNECTIONS
                    and not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE)
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A connection of this process for one operation; the one place where driver errors become store
        errors (a connection that saw one is closed, not reused)."""
        conn = None
        try:
            conn = self._take()
            yield conn
        except psycopg.Error as exc:
            if conn is not None:
                conn.close()
                conn = None
            raise self._error(exc) from exc
        finally:
            if conn is not None:
                self._give_back(conn)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as db:
            return cast(list[tuple[Any, ...]], db.execute(sql, params).fetchall())

    @contextmanager
    def _transaction(self) -> Iterator[_Tx]:
        """A write transaction; its events are published (and the feed pruned) just before it commits."""
        with self._connection() as db:
            with db.transaction():
                tx = _Tx(db)
                yield tx
                self._publish(tx)
        with self._committed:
            self._generation += 1
            self._committed.notify_all()

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [_decode(values) for values in self._query(sql, params)]

    def _read_listed(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [_listed(values) for values in self._query(sql, params)]

    # -- events --------------------------------------------------------------------------------------------

    def _publish(self, tx: _Tx) -> None:
        """Give the transaction's events their cursors (taking the feed's lock, held to the commit), then prune
        the feed once it is past one of its bounds (amortised: 1% below it, so the next writes prune nothing)."""
        if not tx.events:
            return
        params = [(e["kind"], e["uuid"], e["controller"], e["at"], e["emitter"], text, tenant,
                   e["kind"] in CALLBACK_KINDS) for e, text, tenant in tx.events]
        if len(params) == 1:
            answers = [tx.execute(self._publish_sql, params[0]).fetchone()]
        else:
            cur = tx.db.cursor()
            cur.executemany(self._publish_sql, params, returning=True)
            answers = []
            while True:
                answers.append(cur.fetchone())
                if not cur.nextset():
                    break
        for (event, _, _), (cursor, _, _) in zip(tx.events, answers):
            event["cursor"] = str(cursor)
        latest, pruned, total = answers[-1]
        if latest - pruned > self.max_events + self.max_events // 100 or total > self.max_event_bytes:
            self._prune_in(tx, latest - self.max_events, self.max_event_bytes - self.max_event_bytes // 100)

    def _prune_in(self, tx: _Tx, bound: int, max_bytes: int) -> None:
        """In the caller's transaction (holding the feed's lock): delete the events up to ``bound``, then the
        oldest until the rest take at most ``max_bytes``. The outbox keeps its own copies."""
        s = self.schema
        tx.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{s}.events",))
        pruned, total = tx.execute(self._feed_state).fetchone()
        bound = max(bound, pruned)
        (freed,) = tx.execute(f"SELECT COALESCE(sum(size), 0) FROM {s}.events WHERE cursor > %s AND cursor <= %s",
                              (pruned, bound)).fetchone()
        freed = int(freed)
        while total - freed > max_bytes:
            batch = tx.execute(f"SELECT cursor, size FROM {s}.events WHERE cursor > %s ORDER BY cursor LIMIT %s",
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
        tx.execute(f"DELETE FROM {s}.events WHERE cursor > %s AND cursor <= %s", (pruned, bound))
        tx.execute(f"UPDATE {s}.meta SET value = %s WHERE key = 'pruned'", (bound,))
        tx.execute(f"UPDATE {s}.meta SET value = %s WHERE key = 'event_bytes'", (max(0, total - freed),))

    def _prune_events(self) -> None:
        """Delete the events older than the retention, or beyond the newest ``max_events`` or ``max_event_bytes``."""
        s = self.schema
        with self._transaction() as tx:
            (too_old, latest) = tx.execute(
                f"SELECT (SELECT max(cursor) FROM {s}.events WHERE at < %s), (SELECT max(cursor) FROM {s}.events)",
                (tx.now - self.event_retention,)).fetchone()
            self._prune_in(tx, max(too_old or 0, (latest or 0) - self.max_events), self.max_event_bytes)

    def _event_row(self, tx: _Tx, uuid: str, kind: EventKind) -> Row:
        columns = event_columns(kind.value)
        return _decode(tx.execute(f"SELECT {', '.join(columns)} FROM {self._t} WHERE uuid = %s",
                                  (uuid,)).fetchone(), columns)

    # -- writes --------------------------------------------------------------------------------------------

    def enqueue(self, rows: Sequence[Row], max_queued: int, emitter: Optional[str] = None,
                idempotency: Optional[Idempotency] = None) -> list[Event]:
        if not rows:
            return []
        with self._transaction() as tx:
            events = self._enqueue_in(tx, rows, max_queued, emitter, idempotency)
        for row, event in zip(rows, events):
            row["seq"] = event["task"]["seq"]
        return events

    def _enqueue_in(self, tx: _Tx, rows: Sequence[Row], max_queued: int, emitter: Optional[str],
                    idempotency: Optional[Idempotency]) -> list[Event]:
        """:meth:`enqueue` in the caller's transaction (its events published by whoever commits it)."""
        s = self.schema
        controller = rows[0]["controller"]
        now = tx.now
        if idempotency is not None:
            found = tx.execute(f"SELECT uuids, fingerprint FROM {s}.idempotency WHERE key = %s AND expires > %s",
                               (idempotency.key, now)).fetchone()
            if found is not None:
                raise IdempotentReplay(json.loads(found[0]), found[1])
        if max_queued >= 0 and self._queued_count(tx, controller) + len(rows) > max_queued:
            raise QueueFull(max_queued, defaults.RETRY_AFTER)
        events = self._insert(tx, rows, emitter, now)
        if idempotency is not None:
            tx.execute(f"INSERT INTO {s}.idempotency (key, uuids, fingerprint, expires) VALUES (%s, %s, %s, %s) "
                       "ON CONFLICT (key) DO UPDATE SET uuids = excluded.uuids, fingerprint = excluded.fingerprint, "
                       "expires = excluded.expires",
                       (idempotency.key, json.dumps([row["uuid"] for row in rows]), idempotency.fingerprint,
                        now + idempotency.ttl))
        return events

    def _queued_count(self, tx: _Tx, controller: str) -> int:
        (queued,) = tx.execute(f"SELECT count(*) FROM {self._t} WHERE controller = %s AND status = %s",
                               (controller, _QUEUED)).fetchone()
        return int(queued)

    def _insert(self, tx: _Tx, rows: Sequence[Row], emitter: Optional[str], now: float) -> list[Event]:
        sql = (f"INSERT INTO {self._t} ({', '.join(_INSERTED_COLUMNS)}) "
               f"VALUES ({', '.join(['%s'] * len(_INSERTED_COLUMNS))}) RETURNING seq")
        events = []
        for row in rows:
            values = [_encode(c, row.get(c)) for c in _INSERTED_COLUMNS]
            (seq,) = tx.execute(sql, values).fetchone()
            stored = _decode([seq, *values])
            events.append(tx.emit(EventKind.QUEUED, stored, emitter, now))
        return events

    def _claim(self, controller: str, owner: str, max_running: int, process: Optional[tuple[int, float]],
               rules: ClaimRules) -> Optional[tuple[Row, Optional[Event]]]:
        # A plain read first: idle slots look often, and a queue with nothing ready, or a controller running
        # all it may, needs no transaction and no lock.
        # A drained host claims nothing (checked again in the claim itself).
        t = self._t
        drained, host = ("", ()) if rules.host is None else (
            f" AND NOT EXISTS (SELECT 1 FROM {self.schema}.drained_hosts WHERE host = %s)", (rules.host,))
        if not self._query(f"SELECT 1 WHERE ({self._active_count}) < %s{drained} AND EXISTS (SELECT 1 FROM {t} "
                           f"WHERE controller = %s AND {_READY_SQL} UNION ALL SELECT 1 FROM {t} "
                           f"WHERE controller = %s AND {_DELAYED_SQL} AND retry_at <= {_CLOCK})",
                           (controller, max_running, *host, controller, controller)):
            return None
        with self._transaction() as tx:
            return self._claim_in(tx, controller, owner, max_running, process, rules)

    def _claim_lock(self, tx: _Tx, controller: str) -> tuple[float, int]:
        """Take the controller's claim lock (to the commit) and return the clock read after it (later than any
        claim committed before this one) and the number of its running tasks; tasks whose retry time came join
        the ready queue."""
        now, running = tx.execute(f"SELECT * FROM {self.schema}.claim_lock(%s)", (controller,)).fetchone()
        return float(now), int(running)

    def _claim_in(self, tx: _Tx, controller: str, owner: str, max_running: int,
                  process: Optional[tuple[int, float]], rules: ClaimRules) -> Optional[tuple[Row, Optional[Event]]]:
        """:meth:`_claim` in the caller's transaction: the controller's claim lock makes the count of running
        tasks and the claim one step for every claimer on every host. Two round trips hold the lock before
        the commit: the lock with the count, and the claim (a third, the host's lock, when the claim weighs
        the host's capacity: claims of every controller on one host are then one step too)."""
        now, running = self._claim_lock(tx, controller)
        tx._now = now
        if running >= max_running:
            return None
        if rules.capacity is not None and rules.host is not None:
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                       (f"{self.schema}.host:{rules.host}",))
        first, fair, params = self._claim_sql(controller, owner, now, process, rules)
        found = tx.execute(first, params).fetchone()
        if found is not None and fair is not None:
            shared, *values = found
            found = tx.execute(fair, params).fetchone() if shared else values
        if found is None or found[0] is None:
            return None
        row = _decode(found)
        event = tx.emit(EventKind.STARTED, row, owner, now) if process is not None else None
        return row, event

    def _claim_sql(self, controller: str, owner: str, now: float, process: Optional[tuple[int, float]],
                   rules: ClaimRules) -> tuple[str, Optional[str], dict[str, Any]]:
        """The statements that claim the task ``rules`` pick (see :mod:`.claimrules`), and their parameters.

        Every rule is a condition of the statements, read in their snapshot under the claim lock: the drain
        flag; the keys and tenants at their bound (counting the controller's active tasks, as the global limit
        does); the held tenants; the room left on the host (its capacity less the resources of the active tasks
        of every controller whose owner is on the host). Tasks held back are skipped, never waited for.

        Without fair share, the first statement claims the first eligible task by priority and age, as before
        any rule, and the second is None. With it, the first claims the first eligible task only if no other
        tenant has a ready task at its priority (three index probes: a queue of one tenant costs little more
        than before), and answers ``shared`` first (then the claimed row's columns, NULL when shared); when
        shared, the second claims for the tenant with the fewest active tasks (ties: the tenant claimed least
        recently, then the oldest eligible task), finding the tenants waiting at that priority with a skip scan
        of ``tasks_ready_tenant`` (a few index probes per tenant, however long the queue) and each one's oldest
        eligible task. With fair share, both record the claimed task's tenant as the controller's latest in
        ``tenant_claims`` (a write only when another tenant was claimed last: see :meth:`_record_claim`)."""
        t = self._t
        s = self.schema
        params: dict[str, Any] = {"c": controller, "owner": owner, "now": now}
        recorded = ""
        if process is not None:
            recorded = "pid = %(pid)s, pid_created = %(pid_created)s, "
            params["pid"], params["pid_created"] = process
        ctes: list[str] = []
        rows_ok: list[str] = []  # conditions on a queued row ``q``
        tenants_ok: list[str] = []  # conditions on a tenant ``{col}`` (not NULL: NULL is no tenant)
        gate = ""
        if rules.host is not None:
            params["host"] = rules.host
            gate = f" AND NOT EXISTS (SELECT 1 FROM {s}.drained_hosts WHERE host = %(host)s)"
        running = (f"act AS (SELECT tenant, concurrency_key FROM {t} WHERE controller = %(c)s "
                   f"AND status IN {_ACTIVE_SQL})")
        if rules.max_per_key is not None or rules.max_per_tenant is not None:
            ctes.append(running)
        if rules.max_per_key is not None:
            if rules.max_per_key <= 0:
                rows_ok.append("q.concurrency_key IS NULL")
            else:
                params["max_per_key"] = rules.max_per_key
                full_keys, not_full = _full_groups("full_keys", "concurrency_key", "max_per_key")
                ctes.append(full_keys)
                rows_ok.append(f"(q.concurrency_key IS NULL OR q.concurrency_key {not_full})")
        if rules.max_per_tenant is not None:
            if rules.max_per_tenant <= 0:
                tenants_ok.append("false")
            else:
                params["max_per_tenant"] = rules.max_per_tenant
                full_tenants, not_full = _full_groups("full_tenants", "tenant", "max_per_tenant")
                ctes.append(full_tenants)
                tenants_ok.append("{col} " + not_full)
        held = [tenant_text(tenant) for tenant in rules.held_tenants if tenant is not None]
        no_tenant_held = None in rules.held_tenants
        if held:
            params["held"] = held
            tenants_ok.append("{col} <> ALL(%(held)s::text[])")
        if rules.capacity is not None and rules.host is not None:
            params["capacity"] = json.dumps({name: float(amount) for name, amount in rules.capacity.items()})
            params["host_prefix"] = rules.host + ":"
            params["host_length"] = len(rules.host) + 1
            ctes.append(f"used AS (SELECT r.key AS name, sum(r.value::float8) AS amount FROM {t} u, "
                        f"jsonb_each_text(u.resources::jsonb) r WHERE u.status IN {_ACTIVE_SQL} "
                        "AND u.resources IS NOT NULL AND left(u.owner, %(host_length)s) = %(host_prefix)s "
                        "AND substr(u.owner, %(host_length)s + 1) ~ '^[^:]*:[^:]*$' GROUP BY r.key)")
            ctes.append("free AS (SELECT COALESCE(jsonb_object_agg(c.key, c.value::float8 - COALESCE(u.amount, 0)), "
                        "'{}'::jsonb) AS f FROM jsonb_each_text(%(capacity)s::jsonb) c LEFT JOIN used u "
                        "ON u.name = c.key)")
            rows_ok.append("(q.resources IS NULL OR NOT EXISTS (SELECT 1 FROM jsonb_each_text(q.resources::jsonb) r "
                           "WHERE r.value::float8 > COALESCE(((SELECT f FROM free) ->> r.key)::float8, 0) + 1e-9))")

        def tenant_ok(col: str) -> str:
            """The tenant conditions on ``col``; a task of no tenant passes them unless no tenant is held."""
            bounded = " AND ".join(condition.format(col=col) for condition in tenants_ok)
            if no_tenant_held:
                return f" AND {col} IS NOT NULL" + (f" AND {bounded}" if bounded else "")
            return f" AND ({col} IS NULL OR {bounded})" if bounded else ""

        row_ok = "".join(" AND " + condition for condition in rows_ok)
        ready = "q.controller = %(c)s AND q.status = 'queued' AND q.retry_at IS NULL"
        claimed = (f"UPDATE {t} SET status = 'running', owner = %(owner)s, started_at = %(now)s, "
                   f"attempt = attempt + 1, {recorded}stop_requested = stop_requested WHERE seq = ")
        returning = f" RETURNING {', '.join(_COLUMNS)}"
        first = (f"SELECT q.seq, q.priority, q.tenant FROM {t} q WHERE {ready}{row_ok}{tenant_ok('q.tenant')}{gate} "
                 "ORDER BY q.priority, q.seq LIMIT 1")
        with_rules = f"WITH {', '.join(ctes)} " if ctes else ""
        if not rules.fair:
            return f"{with_rules}{claimed}({first.replace('q.seq, q.priority, q.tenant', 'q.seq', 1)} FOR UPDATE " \
                   f"SKIP LOCKED){returning}", None, params
        # (The orders spell the index's columns, so that the planner walks it rather than the primary key.)
        in_index = "ORDER BY q.controller, q.priority, q.tenant"

        def probe(what: str, priority: str, tenant: str, *, eligible: bool = False) -> str:
            """One walk of ``tasks_ready_tenant``, as both statements of fair share read the queue: ``what``
            of the first ready task at ``priority`` (an SQL expression) whose tenant meets ``tenant`` (a
            condition on ``q.tenant``); when ``eligible``, of the oldest such task that the row rules let be
            claimed."""
            where = f"{ready} AND q.priority = {priority} AND {tenant}{row_ok if eligible else ''}"
            order = f"{in_index}, q.seq" if eligible else in_index
            return f"(SELECT {what} FROM {t} q WHERE {where} {order} LIMIT 1)"

        def waiting(tenant: str) -> str:
            """Whether a task of a tenant meeting ``tenant`` is ready at the candidate's priority."""
            return f"{probe('1', 'top.priority', tenant)} IS NOT NULL"

        shared = (f"{waiting('q.tenant > top.tenant')} OR {waiting('q.tenant < top.tenant')} OR "
                  f"(top.tenant IS NULL AND {waiting('q.tenant IS NOT NULL')}) OR "
                  f"(top.tenant IS NOT NULL AND {waiting('q.tenant IS NULL')})")
        alone = (f"{with_rules}{', ' if ctes else 'WITH '}candidate AS ({first} FOR UPDATE SKIP LOCKED), "
                 f"top AS (SELECT top.seq, {shared} AS shared FROM candidate top), "
                 f"claimed AS ({claimed}(SELECT seq FROM top WHERE NOT shared){returning}), "
                 f"{self._record_claim()} SELECT top.shared, claimed.* FROM top LEFT JOIN claimed ON true")
        at_top = "(SELECT priority FROM top)"
        if running not in ctes:
            ctes.insert(0, running)
        ctes.append(f"top AS ({first})")
        first_tenant = probe("q.tenant", at_top, "q.tenant IS NOT NULL")
        next_tenant = probe("q.tenant", at_top, "q.tenant > g.tenant")
        ctes.append(f"tenants(tenant) AS ({first_tenant} UNION ALL SELECT {next_tenant} FROM tenants g "
                    "WHERE g.tenant IS NOT NULL)")
        heads = (f"SELECT g.tenant, {probe('q.seq', at_top, 'q.tenant = g.tenant', eligible=True)} AS head "
                 f"FROM tenants g WHERE g.tenant IS NOT NULL{tenant_ok('g.tenant')}")
        if not no_tenant_held:
            heads += f" UNION ALL SELECT NULL, {probe('q.seq', at_top, 'q.tenant IS NULL', eligible=True)}"
        ctes.append(f"heads AS ({heads})")
        ctes.append("pick AS (SELECT h.head FROM heads h WHERE h.head IS NOT NULL ORDER BY "
                    "(SELECT count(*) FROM act a WHERE a.tenant IS NOT DISTINCT FROM h.tenant), "
                    f"COALESCE((SELECT lc.claimed FROM {s}.tenant_claims lc WHERE lc.controller = %(c)s "
                    f"AND lc.tenant = {_CLAIM_TAG.format(col='h.tenant')}), 0), h.head LIMIT 1)")
        ctes.append(f"claimed AS ({claimed}(SELECT head FROM pick) AND status = 'queued' AND retry_at IS NULL"
                    f"{returning})")
        fair = f"WITH RECURSIVE {', '.join(ctes)}, {self._record_claim()} SELECT * FROM claimed"
        return alone, fair, params

    def _record_claim(self) -> str:
        """The CTEs that record the tenant of the task claimed by the CTE ``claimed`` as the controller's latest
        (fair share's memory, read by the next claims): the tenant's counter becomes the latest's plus one, and
        nothing is written when that tenant was claimed last already (a lone tenant's claims: one index probe)."""
        s = self.schema
        tag = _CLAIM_TAG.format(col="c.tenant")
        return (f"latest AS (SELECT l.tenant, l.claimed FROM {s}.tenant_claims l WHERE l.controller = %(c)s "
                "ORDER BY l.claimed DESC LIMIT 1), "
                f"recorded AS (INSERT INTO {s}.tenant_claims (controller, tenant, claimed) SELECT %(c)s, {tag}, "
                f"COALESCE((SELECT l.claimed FROM latest l), 0) + 1 FROM claimed c WHERE {tag} IS DISTINCT FROM "
                "(SELECT l.tenant FROM latest l) ON CONFLICT (controller, tenant) DO UPDATE SET claimed = "
                "excluded.claimed)")

    def _end_and_claim(self, uuid: str, status: str, owner: str, controller: str, max_running: int,
                       process: Optional[tuple[int, float]], fields: dict[str, Any], rules: ClaimRules,
                       ) -> tuple[Optional[Event], Optional[tuple[Row, Optional[Event]]]]:
        assignments = {"ended_at": _NOW, **_finish_fields(status, fields), "status": status}
        with self._transaction() as tx:
            event = self._update_active_in(tx, EventKind.ENDED, uuid, owner, owner, assignments)
            return event, None if event is None else self._claim_in(tx, controller, owner, max_running, process,
                                                                    rules)

    def _update_active(self, kind: EventKind, uuid: str, owner: Optional[str], emitter: Optional[str],
                       assignments: dict[str, Any]) -> Optional[Event]:
        with self._transaction() as tx:
            return self._update_active_in(tx, kind, uuid, owner, emitter, assignments)

    def _update_active_in(self, tx: _Tx, kind: EventKind, uuid: str, owner: Optional[str],
                          emitter: Optional[str], assignments: dict[str, Any]) -> Optional[Event]:
        """Set columns of an active task (of ``owner``, if given) and write the event ``kind``; a value
        :data:`_NOW` is the server's clock at the change (read by the statement itself, unless the transaction
        read it already)."""
        known = tx._now
        clock, clock_args = (_STATEMENT_CLOCK, ()) if known is None else ("%s::float8", (known,))
        parts: list[str] = []
        values: list[Any] = []
        for column, value in assignments.items():
            if value is _UNCOUNT:
                parts.append(f"{column} = GREATEST(0, {column} - 1)")
            elif value is _NOW:
                parts.append(f"{column} = {clock}")
                values.extend(clock_args)
            else:
                parts.append(f"{column} = %s")
                values.append(_encode(column, value))
        fence, fenced = (" AND owner = %s", (owner,)) if owner is not None else ("", ())
        columns = event_columns(kind.value)
        found = tx.execute(f"UPDATE {self._t} SET {', '.join(parts)} WHERE uuid = %s AND status IN {_ACTIVE_SQL}"
                           f"{fence} RETURNING {clock}, {', '.join(columns)}",
                           (*values, uuid, *fenced, *clock_args)).fetchone()
        if found is None:
            return None
        tx._now = now = float(found[0])
        return tx.emit(kind, _decode(found[1:], columns), emitter, now)

    def start(self, uuid: str, owner: str, pid: int, pid_created: float) -> Optional[Event]:
        return self._update_active(EventKind.STARTED, uuid, owner, owner, {"pid": pid, "pid_created": pid_created})

    def progress(self, uuid: str, owner: str, progress: Any, percent: Optional[float],
                 usage: Optional[Mapping[str, Any]] = None) -> Optional[Event]:
        return self._update_active(EventKind.PROGRESS, uuid, owner, owner,
                                   {"progress": progress, "percent": percent, **usage_fields(usage)})

    def progress_many(self, owner: str, writes: Sequence[ProgressWrite]) -> list[Optional[Event]]:
        if not writes:
            return []
        with self._transaction() as tx:  # one transaction (one commit) for the batch
            return [self._update_active_in(tx, EventKind.PROGRESS, write.uuid, owner, owner, {
                "progress": write.progress, "percent": write.percent, **usage_fields(write.usage)})
                for write in writes]

    def save_state(self, uuid: str, owner: str, state: Any) -> bool:
        with self._transaction() as tx:
            changed: int = tx.execute(f"UPDATE {self._t} SET state = %s, state_saved_at = {_CLOCK} WHERE uuid = %s "
                                      f"AND status IN {_ACTIVE_SQL} AND owner = %s",
                                      (_encode("state", state), uuid, owner)).rowcount
            return changed > 0

    def _finish(self, uuid: str, status: str, owner: Optional[str], emitter: Optional[str],
                fields: dict[str, Any]) -> Optional[Event]:
        return self._update_active(EventKind.ENDED, uuid, owner, emitter, {"ended_at": _NOW, **fields, "status": status})

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
        with self._transaction() as tx:
            row = self._changeable(tx, uuid)
            event = self._stop_one(tx, row, emitter, finish)  # updates row
            return _shown(row), event

    def _stop_one(self, tx: _Tx, row: Row, emitter: Optional[str], finish: bool = False) -> Optional[Event]:
        """Stop a task that is not terminal (``row`` is updated)."""
        now = tx.now
        if row["status"] == _QUEUED:
            tx.execute(f"UPDATE {self._t} SET status = 'stopped', ended_at = %s, stop_requested = true "
                       "WHERE seq = %s", (now, row["seq"]))
            row.update({"status": TaskStatus.STOPPED.value, "ended_at": now, "stop_requested": True})
            return tx.emit(EventKind.ENDED, row, emitter, now)
        if row["status"] in (TaskStatus.RUNNING.value, TaskStatus.PAUSED.value):
            tx.execute(f"UPDATE {self._t} SET status = 'stopping', stop_requested = true, finish_requested = %s "
                       "WHERE seq = %s", (finish, row["seq"]))
            row.update({"status": TaskStatus.STOPPING.value, "stop_requested": True, "finish_requested": finish})
            return tx.emit(EventKind.STOPPING, row, emitter, now)
        return None

    def purge(self, controller: str, ended_before: float, emitter: Optional[str] = None) -> int:
        total = 0
        while True:
            with self._transaction() as tx:
                doomed = [_listed(found) for found in tx.execute(
                    f"DELETE FROM {self._t} WHERE seq IN (SELECT seq FROM {self._t} WHERE controller = %s "
                    f"AND status IN {_TERMINAL_SQL} AND ended_at < %s LIMIT %s FOR UPDATE SKIP LOCKED) "
                    f"RETURNING {', '.join(_LISTED_COLUMNS)}", (controller, ended_before, _PURGE_BATCH)).fetchall()]
                now = tx.now
                for row in sorted(doomed, key=lambda r: r["seq"]):
                    tx.emit(EventKind.PURGED, row, emitter, now)
            total += len(doomed)
            if len(doomed) < _PURGE_BATCH:
                break
        self._prune_events()
        with self._transaction() as tx:
            tx.execute(f"DELETE FROM {self.schema}.idempotency WHERE expires <= {_CLOCK}")
        return total

    # -- task policies -------------------------------------------------------------------------------------

    def _retry(self, uuid: str, delay: float, owner: Optional[str], emitter: Optional[str],
               fields: dict[str, Any]) -> Optional[Event]:
        fence, fenced = (" AND owner = %s", (owner,)) if owner is not None else ("", ())
        assignments = {**fields, "status": _QUEUED, "owner": None, "pid": None, "pid_created": None,
                       "started_at": None}
        clause = ", ".join(f"{c} = %s" for c in assignments)
        columns = event_columns(EventKind.REQUEUED.value)
        with self._transaction() as tx:
            now = tx.now
            found = tx.execute(
                f"UPDATE {self._t} SET {clause}, retry_at = %s WHERE uuid = %s AND status IN {_ACTIVE_SQL} "
                f"AND NOT stop_requested{fence} RETURNING {', '.join(columns)}",
                (*(_encode(c, v) for c, v in assignments.items()), now + delay, uuid, *fenced)).fetchone()
            if found is None:
                return None
            return tx.emit(EventKind.REQUEUED, _decode(found, columns), emitter, now)

    def next_retry_at(self, controller: str) -> Optional[float]:
        [(earliest,)] = self._query(f"SELECT min(retry_at) FROM {self._t} WHERE controller = %s AND {_DELAYED_SQL}",
                                    (controller,))
        return None if earliest is None else float(earliest)

    def _changeable(self, tx: _Tx, uuid: str) -> Row:
        """The task ``uuid``, locked for the caller's transaction, if it has not finished."""
        found = tx.execute(f"{self._select} WHERE uuid = %s FOR UPDATE", (uuid,)).fetchone()
        if found is None:
            raise TaskNotFound(uuid)
        row = _decode(found)
        if row["status"] in _TERMINAL:
            raise TaskAlreadyFinished(uuid, row["status"])
        return row

    def _transition(self, uuid: str, wanted: str, change: str, needs: str, kind: EventKind,
                    emitter: Optional[str]) -> tuple[Row, Optional[Event]]:
        with self._transaction() as tx:
            row = self._changeable(tx, uuid)
            if row["status"] == wanted:
                return _shown(row), None
            if row["status"] != needs:
                raise InvalidTransition(uuid, row["status"], change, needs)
            tx.execute(f"UPDATE {self._t} SET status = %s WHERE seq = %s", (wanted, row["seq"]))
            row["status"] = wanted
            return _shown(row), tx.emit(kind, row, emitter, tx.now)

    def reprioritise(self, uuid: str, priority: int, emitter: Optional[str] = None) -> tuple[Row, Event]:
        with self._transaction() as tx:
            row = self._changeable(tx, uuid)
            if row["status"] != _QUEUED:
                raise InvalidTransition(uuid, row["status"], "re-prioritised", _QUEUED)
            tx.execute(f"UPDATE {self._t} SET priority = %s WHERE seq = %s", (priority, row["seq"]))
            row["priority"] = priority
            return _shown(row), tx.emit(EventKind.QUEUED, row, emitter, tx.now)

    def stop_all(self, controller: str, emitter: Optional[str] = None, *, tenant: Any = ANY_TENANT) -> list[Event]:
        by_tenant, tenant_args = _tenant_condition(tenant)
        with self._transaction() as tx:
            rows = [_listed(found) for found in tx.execute(
                f"{self._select_listed} WHERE controller = %s{by_tenant} AND status IN ('queued', 'running', 'paused') "
                "ORDER BY status != 'queued', seq FOR UPDATE", (controller, *tenant_args)).fetchall()]
            return [event for event in (self._stop_one(tx, row, emitter) for row in rows) if event is not None]

    # -- leases and schedules --------------------------------------------------------------------------------

    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        s = self.schema
        with self._transaction() as tx:
            return tx.execute(
                f"INSERT INTO {s}.leases AS l (name, holder, expires) VALUES (%s, %s, {_CLOCK} + %s) "
                f"ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires "
                f"WHERE l.holder = excluded.holder OR l.expires <= {_CLOCK} RETURNING 1",
                (name, owner, ttl)).fetchone() is not None

    def release_lease(self, name: str, owner: str) -> None:
        with self._transaction() as tx:
            tx.execute(f"DELETE FROM {self.schema}.leases WHERE name = %s AND holder = %s", (name, owner))

    def declare_schedules(self, controller: str, specs: Mapping[str, dict[str, Any]], owner: str) -> None:
        with self._transaction() as tx:
            now = tx.now
            for name, spec in specs.items():
                tx.execute(f"INSERT INTO {self.schema}.schedules (controller, name, spec, fired_until, seen_at, "
                           "declared_by) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (controller, name) DO UPDATE "
                           "SET spec = excluded.spec, seen_at = excluded.seen_at, declared_by = excluded.declared_by",
                           (controller, name, json.dumps(spec), now, now, owner))

    def schedules(self, controller: str) -> list[ScheduleRow]:
        return [_schedule_row(values) for values in self._query(
            f"SELECT {', '.join(_SCHEDULE_COLUMNS)} FROM {self.schema}.schedules WHERE controller = %s ORDER BY name",
            (controller,))]

    def fire(self, controller: str, name: str, firing: float, row: Optional[Row], max_queued: int,
             emitter: Optional[str] = None) -> Fired:
        key = (controller, name)
        table = f"{self.schema}.schedules"
        with self._transaction() as tx:
            found = tx.execute(f"SELECT fired_until FROM {table} WHERE controller = %s AND name = %s FOR UPDATE",
                               key).fetchone()
            if found is None or firing <= found[0]:
                return Fired(FireOutcome.STALE, None)
            tx.execute(f"UPDATE {table} SET fired_until = %s WHERE controller = %s AND name = %s", (firing, *key))
            if row is None:
                return Fired(FireOutcome.MISSED, None)
            if 0 <= max_queued <= self._queued_count(tx, controller):
                tx.execute(f"UPDATE {table} SET skipped = skipped + 1, last_skipped = %s "
                           "WHERE controller = %s AND name = %s", (firing, *key))
                return Fired(FireOutcome.FULL, None)
            [event] = self._insert(tx, [row], emitter, tx.now)
            tx.execute(f"UPDATE {table} SET last_fired = %s, last_task = %s WHERE controller = %s AND name = %s",
                       (firing, row["uuid"], *key))
        row["seq"] = event["task"]["seq"]
        return Fired(FireOutcome.QUEUED, event)

    # -- the change feed and the outbox -------------------------------------------------------------------

    filters_progress = True

    def _changes(self, since: str, limit: int, tenant: Any = ANY_TENANT, max_bytes: Optional[int] = None,
                 without_progress: bool = False) -> Changes:
        after = parse_counter(since)
        s = self.schema
        kinds = " AND kind <> 'progress'" if without_progress else ""
        events: list[Event] = []
        cut = False
        with self._connection() as db:
            # One snapshot for the bounds and the events: a prune between them cannot go unnoticed.
            with db.transaction():
                db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                pruned, latest = db.execute(self._latest_sql).fetchone()
                if after is None or after < pruned or after > latest:
                    return Changes([], str(latest), True)
                by_tenant, tenant_args = _tenant_condition(tenant)
                rows = db.execute(f"SELECT {_EVENT_COLUMNS}, size FROM {s}.events WHERE cursor > %s{by_tenant}{kinds} "
                                  "ORDER BY cursor LIMIT %s", (after, *tenant_args, limit)).fetchall()
        taken = 0
        for values in rows:
            events.append(_event(values[:-1]))
            taken += values[-1]
            if len(events) >= limit or (max_bytes is not None and taken >= max_bytes):
                cut = True
                break
        if (tenant is not ANY_TENANT or without_progress) and not cut:
            return Changes(events, str(latest), False)  # every event up to the latest was looked at
        return Changes(events, events[-1]["cursor"] if events else since, False)

    def _wait_for_changes(self, since: str, timeout: float, foreign_only: bool = False,
                          without_progress: bool = False) -> Optional[str]:
        after = parse_counter(since)
        deadline = time.monotonic() + timeout
        interrupts = self._interrupts
        self._ensure_listener()
        passed: Optional[str] = None  # without progress: the cursor up to which only progress events came
        while True:
            with self._committed:
                generation = self._generation
            if after is None:
                return passed
            if not without_progress:
                if int(self.latest_cursor()) > after:
                    return passed
            else:
                with self._connection() as db:
                    latest, other = db.execute(self._news_sql, (after,)).fetchone()
                if other:
                    return passed
                if latest > after:
                    after, passed = latest, str(latest)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._interrupts != interrupts:
                return passed
            with self._committed:
                self._committed.wait_for(lambda: self._generation != generation, min(_WAIT_POLL, remaining))

    def _ensure_listener(self) -> None:
        """Subscribe to this process's listener of the feed's notifications, once."""
        with self._listening_lock:
            if self._listening_pid != os.getpid():
                self._listening_pid = os.getpid()
                pglisten.subscribe(self.url, self._channel, id(self), self._woken, self._open)

    def _wake_waits(self) -> None:
        self._woken()

    def _woken(self) -> None:
        with self._committed:
            self._generation += 1
            self._committed.notify_all()

    def latest_cursor(self) -> str:
        with self._connection() as db:
            return str(db.execute(self._latest_sql).fetchone()[1])

    def unacked(self, controller: str, limit: int = 100) -> list[Event]:
        return [_event(values) for values in self._query(
            f"SELECT {_EVENT_COLUMNS} FROM {self.schema}.outbox WHERE controller = %s ORDER BY cursor LIMIT %s",
            (controller, limit))]

    def expire_callbacks(self, controller: str, max_age: float) -> list[Event]:
        s = self.schema
        with self._transaction() as tx:
            doomed = [_event(values) for values in tx.execute(
                f"DELETE FROM {s}.outbox WHERE controller = %s AND at < %s RETURNING {_EVENT_COLUMNS}",
                (controller, tx.now - max_age)).fetchall()]
            if doomed:
                tx.execute(f"INSERT INTO {s}.meta (key, value) VALUES (%s, %s) "
                           "ON CONFLICT (key) DO UPDATE SET value = meta.value + excluded.value",
                           ("callbacks_dropped:" + controller, len(doomed)))
        return sorted(doomed, key=lambda e: int(e["cursor"]))

    def callbacks_dropped(self, controller: str) -> int:
        found = self._query(f"SELECT value FROM {self.schema}.meta WHERE key = %s", ("callbacks_dropped:" + controller,))
        return int(found[0][0]) if found else 0

    def ack(self, controller: str, cursors: Iterable[str]) -> None:
        numbers = [n for n in map(parse_counter, cursors) if n is not None]
        if numbers:
            with self._transaction() as tx:
                tx.execute(f"DELETE FROM {self.schema}.outbox WHERE controller = %s AND cursor = ANY(%s)",
                           (controller, numbers))

    # -- reads ---------------------------------------------------------------------------------------------

    def get(self, uuid: str) -> Optional[Row]:
        rows = self._read(f"{self._select} WHERE uuid = %s", (uuid,))
        return rows[0] if rows else None

    def find_by_prefix(self, prefix: str, limit: int = 10) -> list[Row]:
        # LIKE, not a range: the database's collation may not order the dash byte-wise. A prefix holds
        # hex digits and dashes only, none of LIKE's special characters.
        return self._read_listed(f"{self._select_listed} WHERE uuid LIKE %s ORDER BY seq DESC LIMIT %s",
                                 (prefix + "%", limit))

    def list_tasks(self, controller: str, statuses: Optional[Iterable[str]] = None, limit: int = 100,
                   before: Optional[int] = None, tenant: Any = ANY_TENANT) -> list[Row]:
        below = _NO_SEQ if before is None else before
        wanted = list(dict.fromkeys(statuses or ()))
        by_tenant, tenant_args = _tenant_condition(tenant)
        if not wanted:
            return self._read_listed(f"{self._select_listed} WHERE controller = %s{by_tenant} AND seq < %s "
                                     "ORDER BY seq DESC LIMIT %s", (controller, *tenant_args, below, limit))
        pages = [self._read_listed(f"{self._select_listed} WHERE controller = %s{by_tenant} AND status = %s "
                                   "AND seq < %s ORDER BY seq DESC LIMIT %s",
                                   (controller, *tenant_args, status, below, limit))
                 for status in wanted]
        return list(heapq.merge(*pages, key=lambda r: r["seq"], reverse=True))[:limit]

    def batch(self, controller: str, batch: str) -> list[Row]:
        return self._read_listed(f"{self._select_listed} WHERE batch = %s AND controller = %s ORDER BY seq",
                                 (batch, controller))

    def reruns(self, controller: str, uuid: str, limit: int = 20) -> list[str]:
        return [found for (found,) in self._query(
            f"SELECT uuid FROM {self._t} WHERE rerun_of = %s AND controller = %s ORDER BY seq DESC LIMIT %s",
            (uuid, controller, limit))]

    def counts(self, controller: str, *, tenant: Any = ANY_TENANT) -> dict[str, int]:
        by_tenant, tenant_args = _tenant_condition(tenant)
        return {str(status): int(count) for status, count in self._query(
            f"SELECT status, count(*) FROM {self._t} WHERE controller = %s{by_tenant} GROUP BY status",
            (controller, *tenant_args))}

    def ended_counts(self, controller: str, since: float, step: float = 60.0,
                     tenant: Any = ANY_TENANT) -> dict[tuple[int, str], int]:
        by_tenant, tenant_args = _tenant_condition(tenant)
        rows = self._query(
            f"SELECT floor((ended_at - %s) / %s)::bigint AS slot, status, count(*) FROM {self._t} "
            f"WHERE controller = %s AND ended_at >= %s AND status IN {_TERMINAL_SQL}{by_tenant} GROUP BY slot, status",
            (since, step, controller, since, *tenant_args))
        return {(int(slot), str(status)): int(count) for slot, status, count in rows}

    def ended_timings(self, controller: str, since: float, limit: int = defaults.METRICS_SAMPLE) -> list[Timing]:
        rows = self._query(
            f"SELECT status, created_at, started_at, ended_at, attempt FROM {self._t} WHERE controller = %s "
            f"AND ended_at >= %s AND status IN {_TERMINAL_SQL} ORDER BY ended_at DESC LIMIT %s",
            (controller, since, limit))
        return [Timing(str(status), float(created), None if started is None else float(started), float(ended),
                       int(attempt or 0)) for status, created, started, ended, attempt in rows]

    def callbacks_pending(self, controller: str) -> int:
        [(pending,)] = self._query(f"SELECT count(*) FROM {self.schema}.outbox WHERE controller = %s", (controller,))
        return int(pending)

    def position(self, row: Row) -> Optional[int]:
        if row["status"] != _QUEUED or row.get("retry_at") is not None:
            return None
        [(ahead,)] = self._query(
            f"SELECT count(*) FROM {self._t} WHERE controller = %s AND {_READY_SQL} AND (priority, seq) < (%s, %s)",
            (row["controller"], row["priority"], row["seq"]))
        return int(ahead) + 1

    def active(self, controller: str) -> list[Row]:
        return self._read(f"{self._select} WHERE controller = %s AND status IN {_ACTIVE_SQL} ORDER BY seq",
                          (controller,))

    # -- clock and heartbeats ------------------------------------------------------------------------------

    def now(self) -> float:
        return float(self._query(f"SELECT {_CLOCK}")[0][0])

    def heartbeat(self, owner: str) -> None:
        with self._transaction() as tx:
            tx.execute(f"INSERT INTO {self.schema}.owners (owner, heartbeat) VALUES (%s, {_CLOCK}) "
                       "ON CONFLICT (owner) DO UPDATE SET heartbeat = excluded.heartbeat", (owner,))

    def heartbeats(self) -> dict[str, float]:
        return {str(owner): float(beat) for owner, beat in self._query(
            f"SELECT owner, heartbeat FROM {self.schema}.owners")}

    def forget_owner(self, owner: str) -> None:
        with self._transaction() as tx:
            tx.execute(f"DELETE FROM {self.schema}.owners WHERE owner = %s", (owner,))

    def set_drained(self, host: str, drained: bool) -> None:
        table = f"{self.schema}.drained_hosts"
        with self._transaction() as tx:
            if drained:
                tx.execute(f"INSERT INTO {table} (host, since) VALUES (%s, {_CLOCK}) ON CONFLICT (host) DO NOTHING",
                           (host,))
            else:
                tx.execute(f"DELETE FROM {table} WHERE host = %s", (host,))

    def drained_hosts(self) -> dict[str, float]:
        return _drained(self._query(f"SELECT host, since FROM {self.schema}.drained_hosts"))

    def heartbeat_and_drained(self, owner: str) -> dict[str, float]:
        # One statement (autocommit: atomic on its own), one round trip.
        s = self.schema
        return _drained(self._query(
            f"WITH beat AS (INSERT INTO {s}.owners (owner, heartbeat) VALUES (%s, {_CLOCK}) "
            "ON CONFLICT (owner) DO UPDATE SET heartbeat = excluded.heartbeat) "
            f"SELECT host, since FROM {s}.drained_hosts", (owner,)))

    def close(self) -> None:
        with self._listening_lock:
            listening, self._listening_pid = self._listening_pid == os.getpid(), 0
        if listening:
            pglisten.unsubscribe(self.url, self._channel, id(self))
        with self._idle_lock:
            idle, self._idle = self._idle, []
            ours = self._idle_pid == os.getpid()
        if ours:
            for conn in idle:
                conn.close()

    def _make_logbook(self) -> "LogBook":
        from .logbook import PostgresLogBook

        return PostgresLogBook(self)

    # -- the transactional enqueue -------------------------------------------------------------------------

    def enqueue_in(self, connection: Any, rows: Sequence[Row], max_queued: int,
                   idempotency: Optional[Idempotency] = None) -> None:
        """Insert new ``queued`` tasks in the application's open transaction on ``connection``.

        The tasks and their ``queued`` events are written in that transaction: no slot and no reader sees
        them before it commits, its commit publishes the events (waking the slots of every host), and a
        rollback leaves nothing. ``connection`` is a psycopg 3 or psycopg2 connection, or a SQLAlchemy
        ``Connection`` or ``Session`` on one, to the store's database. In autocommit mode the insert is
        its own transaction. The queue bound is checked against what is committed when this runs: two
        transactions open together may each fit, and both commit.

        :raises StoreError: ``connection`` is not one of those, or not to the store's database.
        :raises QueueFull: the rows do not fit; nothing is written and the transaction may go on.
        """
        from .transactional import AppTransaction

        if not rows:
            return
        with AppTransaction(connection, self) as tx:
            now = tx.now
            self._enqueue_in(tx, rows, max_queued, None, idempotency)  # type: ignore[arg-type]
            for event, text, tenant in tx.events:
                tx.execute(f"INSERT INTO {self.schema}.pending_events (kind, uuid, controller, at, emitter, task, "
                           "tenant) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                           (event["kind"], event["uuid"], event["controller"], now, event["emitter"], text, tenant))
            for row, (event, _, _) in zip(rows, tx.events):
                row["seq"] = event["task"]["seq"]

    # -- hosts' capacities and CPU usage (see ..limits) -----------------------------------------------------

    def publish_capacity(self, host: str, capacity: Mapping[str, float]) -> None:
        with self._transaction() as tx:
            tx.execute(f"INSERT INTO {self.schema}.host_capacity (host, capacity, at) VALUES (%s, %s, {_CLOCK}) "
                       "ON CONFLICT (host) DO UPDATE SET capacity = excluded.capacity, at = excluded.at",
                       (host, json.dumps({k: float(v) for k, v in capacity.items()})))

    def capacities(self) -> dict[str, dict[str, float]]:
        return {str(host): json.loads(capacity) for host, capacity in self._query(
            f"SELECT host, capacity FROM {self.schema}.host_capacity")}

    def ended_cpu(self, controller: str, since: float) -> list[tuple[Optional[str], float, float]]:
        rows = self._query(f"SELECT tenant, ended_at, cpu_time FROM {self._t} WHERE controller = %s AND ended_at >= %s "
                           "AND cpu_time > 0", (controller, since))
        return [(tenant, float(ended), float(cpu)) for tenant, ended, cpu in rows]


def _drained(rows: Sequence[Sequence[Any]]) -> dict[str, float]:
    """Host -> since, from rows of host and since."""
    return {str(host): float(since) for host, since in rows}

