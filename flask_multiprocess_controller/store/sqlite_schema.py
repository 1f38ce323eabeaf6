"""The tables of the SQLite store, and how a file made by an older version is brought up to them.

``mpc_tasks`` has a column per task field of :data:`.schema.FIELDS`, declared from the field's encoding.
"""
from __future__ import annotations

import sqlite3

from ..states import ACTIVE
from .schema import ADDED, FIELDS, Encoding, Field

#: The SQLite type of each encoding.
SQL_TYPES = {Encoding.JSON: "TEXT", Encoding.REAL: "REAL", Encoding.INTEGER: "INTEGER", Encoding.TEXT: "TEXT",
              Encoding.BOOLEAN: "INTEGER"}


def declaration(field: Field) -> str:
    """The column declaration of a task field in ``mpc_tasks``."""
    parts = [SQL_TYPES[field.encoding]]
    if field.primary_key:
        parts.append("PRIMARY KEY AUTOINCREMENT")
    elif not field.nullable:
        parts.append("NOT NULL")
    if field.unique:
        parts.append("UNIQUE")
    if field.default is not None:
        parts.append(f"DEFAULT {int(field.default)}")
    return " ".join(parts)


#: The tables of the store; ``mpc_tasks`` has a column per field of :data:`.schema.FIELDS`.
#: ``mpc_tenant_claims`` is fair share's memory: each tenant's last claim for a controller (``tenant`` is
#: ``'=' || tenant``, or ``'~'`` for tasks of no tenant; ``claimed`` a counter that grows with each claim
#: recorded), so that tenants tied on their active tasks take turns. Made when missing, as every table here.
SCHEMA = """
CREATE TABLE IF NOT EXISTS mpc_tasks (
TASK_COLUMNS
);
CREATE INDEX IF NOT EXISTS mpc_tasks_queue ON mpc_tasks (controller, status, priority, seq);
CREATE INDEX IF NOT EXISTS mpc_tasks_status ON mpc_tasks (controller, status, seq);
CREATE INDEX IF NOT EXISTS mpc_tasks_newest ON mpc_tasks (controller, seq);
CREATE INDEX IF NOT EXISTS mpc_tasks_ended ON mpc_tasks (controller, ended_at);
CREATE TABLE IF NOT EXISTS mpc_owners (
    owner TEXT PRIMARY KEY,
    heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS mpc_events (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    uuid TEXT NOT NULL,
    controller TEXT NOT NULL,
    at REAL NOT NULL,
    emitter TEXT,
    task TEXT NOT NULL,
    tenant TEXT,
    size INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS mpc_events_at ON mpc_events (at);
CREATE TABLE IF NOT EXISTS mpc_outbox (
    cursor INTEGER PRIMARY KEY,
    controller TEXT NOT NULL,
    kind TEXT,
    uuid TEXT,
    at REAL,
    emitter TEXT,
    task TEXT
);
CREATE INDEX IF NOT EXISTS mpc_outbox_controller ON mpc_outbox (controller, cursor);
CREATE TABLE IF NOT EXISTS mpc_meta (
    key TEXT PRIMARY KEY,
    value
);
CREATE TABLE IF NOT EXISTS mpc_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS mpc_drained_hosts (
    host TEXT PRIMARY KEY,
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS mpc_idempotency (
    key TEXT PRIMARY KEY,
    uuids TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS mpc_idempotency_expires ON mpc_idempotency (expires);
CREATE TABLE IF NOT EXISTS mpc_schedules (
    controller TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    fired_until REAL NOT NULL,
    last_fired REAL,
    last_task TEXT,
    skipped INTEGER NOT NULL DEFAULT 0,
    last_skipped REAL,
    seen_at REAL NOT NULL,
    declared_by TEXT,
    PRIMARY KEY (controller, name)
);
CREATE TABLE IF NOT EXISTS mpc_tenant_claims (
    controller TEXT NOT NULL,
    tenant TEXT NOT NULL,
    claimed INTEGER NOT NULL,
    PRIMARY KEY (controller, tenant)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS mpc_tenant_claims_latest ON mpc_tenant_claims (controller, claimed);
""".replace("TASK_COLUMNS", ",\n".join(f"    {field.name} {declaration(field)}" for field in FIELDS))

#: Columns added to ``mpc_tasks`` after its first release, with their declarations: a file made
#: by an older version gets them (``ALTER TABLE``) when a store first opens it.
ADDED_COLUMNS = {field.name: declaration(field) for field in ADDED}

#: The statuses of the tasks that hold a slot, as SQL (the partial index of active tasks' resources matches it).
ACTIVE_SQL = "(" + ", ".join(f"'{s.value}'" for s in sorted(ACTIVE)) + ")"

#: Indexes on the added columns, made once they exist. The ready queue holds the queued tasks that
#: wait for no ``retry_at``; the delayed ones are found by time, so claims never scan past them.
#: Claims with rules also read the ready queue by tenant within a priority (fair share: the tenants that
#: wait, each one's oldest task), and the declared resources of the active tasks (a host's usage).
#: The tenant indexes serve the lists, counts and stop-all of one tenant (newest first, or by status); the
#: rerun index, the reruns of a task.
ADDED_INDEXES = """
CREATE INDEX IF NOT EXISTS mpc_tasks_ready ON mpc_tasks (controller, priority, seq)
    WHERE status = 'queued' AND retry_at IS NULL;
CREATE INDEX IF NOT EXISTS mpc_tasks_delayed ON mpc_tasks (controller, retry_at)
    WHERE status = 'queued' AND retry_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS mpc_tasks_batch ON mpc_tasks (batch, seq) WHERE batch IS NOT NULL;
CREATE INDEX IF NOT EXISTS mpc_tasks_tenant ON mpc_tasks (controller, tenant, seq);
CREATE INDEX IF NOT EXISTS mpc_tasks_tenant_status ON mpc_tasks (controller, tenant, status, seq);
CREATE INDEX IF NOT EXISTS mpc_tasks_rerun_of ON mpc_tasks (rerun_of, seq) WHERE rerun_of IS NOT NULL;
CREATE INDEX IF NOT EXISTS mpc_tasks_ready_tenant ON mpc_tasks (controller, priority, tenant, seq)
    WHERE status = 'queued' AND retry_at IS NULL;
CREATE INDEX IF NOT EXISTS mpc_tasks_active_resources ON mpc_tasks (owner)
    WHERE resources IS NOT NULL AND status IN ACTIVE_SQL;
""".replace("ACTIVE_SQL", ACTIVE_SQL)


#: Columns added to ``mpc_events`` (the task's tenant, for reads filtered by tenant; the bytes of its task,
#: for the feed's byte bound) and to ``mpc_outbox`` (a copy of the event: the outbox outlives the feed's pruning).
FEED_ADDED_COLUMNS = {
    "mpc_events": {"tenant": "TEXT", "size": "INTEGER NOT NULL DEFAULT 0"},
    "mpc_outbox": {"kind": "TEXT", "uuid": "TEXT", "at": "REAL", "emitter": "TEXT", "task": "TEXT"},
}

#: How a file whose feed lacks those columns is brought up to them: sizes, tenants and the running total of
#: bytes from the events kept, outbox entries copied from their events (those whose event is gone were lost
#: already).
_FEED_UPGRADE = """
UPDATE mpc_events SET size = length(task), tenant = json_extract(task, '$.tenant');
UPDATE mpc_outbox SET (kind, uuid, at, emitter, task) =
    (SELECT e.kind, e.uuid, e.at, e.emitter, e.task FROM mpc_events e WHERE e.cursor = mpc_outbox.cursor)
    WHERE task IS NULL;
DELETE FROM mpc_outbox WHERE task IS NULL;
"""

#: Indexes of the feed: events of one tenant in cursor order; outbox entries by age.
FEED_INDEXES = """
CREATE INDEX IF NOT EXISTS mpc_events_tenant ON mpc_events (tenant, cursor);
CREATE INDEX IF NOT EXISTS mpc_outbox_at ON mpc_outbox (controller, at);
"""


def upgrade_feed(db: sqlite3.Connection) -> None:
    """Bring the feed and the outbox of a file made by an older version up to their current columns
    (in one write transaction, so that no event is written half-way through), and count its bytes."""
    db.execute("BEGIN IMMEDIATE")
    try:
        added = False
        for table, columns in FEED_ADDED_COLUMNS.items():
            present = {info[1] for info in db.execute(f"PRAGMA table_info({table})")}
            for column, declaration in columns.items():
                if column not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
                    added = True
        if added:
            for statement in _FEED_UPGRADE.strip().split(";"):
                if statement.strip():
                    db.execute(statement)
        db.execute("INSERT INTO mpc_meta (key, value) SELECT 'event_bytes', COALESCE(SUM(size), 0) FROM mpc_events "
                   "WHERE true ON CONFLICT (key) DO NOTHING")
        for statement in FEED_INDEXES.strip().split(";"):
            if statement.strip():
                db.execute(statement)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a file made by an older version up to the current columns and indexes."""
    present = {info[1] for info in db.execute("PRAGMA table_info(mpc_tasks)")}
    for column, declaration in ADDED_COLUMNS.items():
        if column not in present:
            try:
                db.execute(f"ALTER TABLE mpc_tasks ADD COLUMN {column} {declaration}")
            except sqlite3.OperationalError as exc:  # another process added it meanwhile
                if "duplicate column" not in str(exc):
                    raise
    db.executescript(ADDED_INDEXES)
