"""Named defaults, each with its unit."""
from __future__ import annotations

#: Seconds between a stop request and SIGTERM to a task's process tree.
STOP_GRACE = 10.0
#: Seconds between SIGTERM and SIGKILL when a tree must be killed.
KILL_AFTER_TERM = 2.0
#: Seconds a finished task stays readable before it is purged (7 days).
RETENTION = 7 * 24 * 3600.0
#: Seconds between purges of expired tasks.
PURGE_INTERVAL = 3600.0
#: Bytes a request body may hold (1 MiB).
MAX_CONTENT_LENGTH = 1024 * 1024
#: Seconds between two writes of a running task's progress to the store.
PROGRESS_INTERVAL = 0.25
#: Seconds between two samples of a running task's process tree (memory, CPU).
SAMPLE_INTERVAL = 0.5
#: Seconds between two samples when a memory limit is set.
SAMPLE_INTERVAL_WITH_MEMORY_LIMIT = 0.1
#: Seconds between two looks at the store for work or stop requests made elsewhere.
STORE_POLL_INTERVAL = 0.5
#: Seconds between two looks of a blocked ``changes()`` at a SQLite store for other processes' writes.
FEED_POLL_INTERVAL = 0.02
#: Seconds task events (and callback outbox entries) are kept before ``purge()`` prunes them (24 h).
EVENT_RETENTION = 24 * 3600.0
#: The most task events a store keeps; older ones are pruned first.
EVENT_STREAM_MAXLEN = 100_000
#: Seconds between two heartbeats of a serving process in the store.
HEARTBEAT_INTERVAL = 1.0
#: Seconds without a heartbeat after which a serving process on another host counts as dead.
LEASE = 10.0
#: Seconds between two reconciliations of the tasks of dead serving processes.
RECONCILE_INTERVAL = 2.0
#: Environment variable naming this host in the store (default: the host name).
HOST_ID_ENV = "MPC_HOST_ID"
#: Seconds a ``?wait=`` may hold a request open at most.
MAX_WAIT = 3600.0
#: Tasks a list view returns when ``?limit=`` is not given, and at most.
LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
#: Seconds a client is told to wait (``Retry-After``) when the queue is full.
RETRY_AFTER = 1
#: Callback delivery: attempts, seconds before the first retry (doubling), seconds per attempt.
CALLBACK_ATTEMPTS = 4
CALLBACK_BACKOFF = 0.5
CALLBACK_TIMEOUT = 5.0
#: File of the default SQLite store, relative to the working directory.
DEFAULT_SQLITE_PATH = "mpc-tasks.sqlite3"
#: Environment variable naming the store.
STORE_URL_ENV = "MPC_STORE_URL"
