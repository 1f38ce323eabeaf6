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
#: Seconds between two writes of a running task's log lines to the store (and of its progress, for a
#: supervisor without a progress flusher).
PROGRESS_INTERVAL = 0.25
#: Seconds between two writes of the progress of a serving process's running tasks (all of them in one write):
#: ``MPC_PROGRESS_FLUSH``. GET, the event streams and the dashboard see a progress call within about this.
PROGRESS_FLUSH = 0.2
#: The environment variable of the progress flush interval (the app's ``MPC_PROGRESS_FLUSH`` wins).
PROGRESS_FLUSH_ENV = "MPC_PROGRESS_FLUSH"
#: Seconds between two progress messages a task process sends at least: the latest value wins meanwhile
#: (it sends them at the flush interval, ``PROGRESS_FLUSH``, when that is longer).
PUBLISH_INTERVAL = 0.05
#: Seconds between two samples of a running task's process tree (memory, CPU).
SAMPLE_INTERVAL = 0.5
#: Seconds between two samples of a task that has run ``SAMPLE_WARMUP`` seconds, without a memory limit: the
#: live figures of a long task need not be fresher, and each sample reads a few /proc files per process.
SAMPLE_INTERVAL_LATER = 2.0
#: Seconds a task runs before its tree is sampled every ``SAMPLE_INTERVAL_LATER`` seconds.
SAMPLE_WARMUP = 5.0
#: Seconds between two samples when a memory limit is set (all along: the limit is enforced from them).
SAMPLE_INTERVAL_WITH_MEMORY_LIMIT = 0.1
#: Seconds between two writes of a running task's memory and CPU figures to the store when the task writes
#: no progress (they ride with each progress write otherwise).
USAGE_WRITE_INTERVAL = 5.0
#: How many of a controller's newest successes the median run time behind a queued task's ``eta`` is taken from.
ETA_SAMPLE = 50
#: Seconds a controller keeps what its queued tasks wait behind (places held, drained hosts, the median run
#: time) before reading it again: the ``waiting_on`` and ``eta`` of many task objects cost a few queries.
QUEUE_STATE_TTL = 2.0
#: Seconds within which a serving process has reacted to work or a stop request made elsewhere. Nothing
#: polls at this rate any more (the change feed wakes idle slots and running tasks at once); it remains the
#: bound that waits for "nothing else happens" use.
STORE_POLL_INTERVAL = 0.5
#: Seconds between two looks of a blocked ``changes()`` at a SQLite store for other processes' writes.
FEED_POLL_INTERVAL = 0.02
#: Seconds task events (and callback outbox entries) are kept before ``purge()`` prunes them (24 h).
EVENT_RETENTION = 24 * 3600.0
#: The most task events a store keeps; older ones are pruned first.
EVENT_STREAM_MAXLEN = 100_000
#: The most bytes of task events a store keeps (64 MiB of their tasks' JSON); older ones are pruned first.
MAX_EVENT_BYTES = 64 * 1024 * 1024
#: Seconds an undelivered callback stays in the store's outbox (7 days); then it is dropped, logged and
#: counted in ``/mpc/health`` (``callbacks_dropped``).
CALLBACK_MAX_AGE = 7 * 24 * 3600.0
#: Seconds between two heartbeats of a serving process in the store.
HEARTBEAT_INTERVAL = 1.0
#: Seconds without a heartbeat after which a serving process on another host counts as dead.
LEASE = 10.0
#: Seconds between two reconciliations of the tasks of dead serving processes.
RECONCILE_INTERVAL = 2.0
#: Environment variable naming this host in the store (default: the host name).
HOST_ID_ENV = "MPC_HOST_ID"
#: Seconds a ``?wait=`` (or any long-lived response) holds a request open at most: below gunicorn's
#: default worker timeout of 30 s, so a long-poll never gets a sync worker killed.
MAX_WAIT = 25.0
#: Bytes of JSON a task's result may take (1 MiB); over it the task fails with ``ResultTooLarge``.
MAX_RESULT_SIZE = 1024 * 1024
#: Bytes of JSON a task's saved state may take (1 MiB); over it ``save_state()`` raises ``StateTooLarge``.
MAX_STATE_SIZE = 1024 * 1024
#: Seconds ``save_state()`` waits for the serving process to say the state is stored; then the task goes on.
STATE_ACK_TIMEOUT = 30.0
#: Bytes of JSON one progress value may take (64 KiB); a larger one is refused in the task.
MAX_PROGRESS_SIZE = 64 * 1024
#: Bytes of JSON the list view shows of a task's ``args``, ``progress`` and ``result`` each (4 KiB);
#: a larger value is shown as null and named in the item's ``truncated``.
LIST_VALUE_SIZE = 4 * 1024
#: Task objects one bulk POST may hold; over it, 413.
MAX_BULK = 1000
#: Levels a task's keyword arguments may nest at most (a request body: one more, for a bulk body's array).
MAX_ARGS_DEPTH = 100
#: Levels a task's progress value, saved state or result may nest at most: a deeper progress value or state
#: raises ValueError in the task, a deeper result fails it (``ResultNotSerializable``).
MAX_VALUE_DEPTH = 100
#: Bytes (UTF-8) of an exception's message a task's ``error`` keeps (4 KiB); a longer one is clipped.
MAX_MESSAGE_SIZE = 4 * 1024
#: Bytes of an error's traceback text that are kept (64 KiB): its head and its tail, the middle clipped.
MAX_TRACEBACK_SIZE = 64 * 1024
#: The largest integer a query option may be (cursors, limits): what every store's integers hold.
MAX_QUERY_INT = 2 ** 63 - 1
#: The most seconds a timeout may be (about 31 years): a longer one is refused, not stored.
MAX_SECONDS = 1e9
#: Log records waiting for the serving process's handlers at most; past it records are dropped (counted).
LOG_QUEUE_SIZE = 10_000
#: Tasks a list view returns when ``?limit=`` is not given, and at most.
LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
#: Reruns of a task its task object names at most (``reruns``, newest first).
RERUNS_SHOWN = 20
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
#: Seconds a background thread waits before retrying a store that failed, at first and at most.
STORE_RETRY_MIN = 0.1
STORE_RETRY_MAX = 5.0
#: Seconds a change-feed reader blocks per read (it looks at its stop flag in between).
FEED_WAIT = 0.25
#: Seconds one read of a runtime's change-feed follower blocks when nothing happens: it sleeps until
#: another process writes an event (its stop interrupts the read), so an idle serving process costs nothing.
FEED_FOLLOW_WAIT = 60.0
#: Seconds between two looks at a SQLite store that a blocked ``changes()`` makes even though the file
#: watch (inotify) said nothing changed: a safety net; without a file watch it looks every
#: ``FEED_POLL_INTERVAL``.
FEED_FALLBACK_POLL = 1.0
#: Seconds an unacknowledged callback of a dead serving process waits before a survivor delivers it.
CALLBACK_ORPHAN_AGE = 2.0
#: Callback deliveries waiting at most; past it new ones are dropped (and stay unacknowledged).
CALLBACK_QUEUE = 10_000
#: Seconds an idle controlling thread waits before it looks at a shared store again even though no
#: event said so (events wake it at once; this only bounds the cost of an event that was missed).
IDLE_RECHECK = 60.0
#: Seconds an idle slot sleeps past the earliest ``retry_at``, so that the claim it wakes for finds it due.
RETRY_WAKE_MARGIN = 0.01
#: Seconds late a schedule's firing may be and still queue its task; older ones were missed while no
#: serving process ran (``catchup=`` decides). Above the default lease, so a failover loses no firing.
SCHEDULE_GRACE = 30.0
#: Seconds the scheduler wakes after a firing's time, so that the store's clock has passed it.
SCHEDULE_WAKE_MARGIN = 0.01
#: Seconds a shutdown waits, beyond a task's stop escalation, for outcomes to be recorded.
SHUTDOWN_MARGIN = 3.0
#: URL prefix of the extension's views (health, task API).
URL_PREFIX = "/mpc"
#: Bytes of its newest log lines each task keeps (256 KiB).
LOG_KEEP_BYTES = 256 * 1024
#: Seconds a task's log lines are kept after its last line (a day), whatever the task's retention.
LOG_RETENTION = 24 * 3600.0
#: Seconds a serving process claims nothing after a sibling stopped a task because it is shutting down.
SIBLING_SHUTDOWN_HOLD = 2.0
#: Seconds after a sibling's shutdown within which this process's own shutdown counts as the same one (gunicorn
#: signals its workers at once; one may handle its signal late): a task it claimed between the two is given back.
SIBLING_SHUTDOWN_SPAN = 10.0
#: Seconds running tasks whose serving process ended wait for another of the app's serving processes on
#: the same host to adopt them, before they are stopped (or queued again) as a shutdown would (see handover.py).
HANDOVER_WINDOW = 60.0
#: Seconds a task may stay paused; then it is resumed (or stopped, as ``pause_expiry`` says); 0 or None:
#: no limit.
MAX_PAUSE = 3600.0
#: What happens to a task paused for ``max_pause``: ``"resume"`` it, or ``"stop"`` it (graceful stop).
PAUSE_EXPIRY = "resume"
#: The values ``pause_expiry`` may take.
PAUSE_EXPIRIES = ("resume", "stop")
#: Seconds before the supervising process tries again to end a pause it could not write (store outage).
PAUSE_EXPIRY_RETRY = 5.0
#: Seconds a shutting-down serving process lets its running tasks finish on their own before it stops
#: them (0: stop them at once); also the ``MPC_SHUTDOWN_WAIT`` environment variable.
SHUTDOWN_WAIT = 0.0
SHUTDOWN_WAIT_ENV = "MPC_SHUTDOWN_WAIT"
#: Seconds after a serving process's last heartbeat during which the tasks it ran on this host are not
#: settled yet: its fork server, which noticed its end at once, holds them and beats for them by then.
HOLD_GRACE = 2.0
#: Seconds the store keeps an ``Idempotency-Key`` with the tasks it made (24 h): a POST sent again with
#: the key within it answers with those tasks and queues none.
IDEMPOTENCY_TTL = 24 * 3600.0
#: Times ``flask mpc submit`` tries again a submission whose store write got no answer, with the same key.
SUBMIT_ATTEMPTS = 4
#: Streams (the event stream, log follows) one process serves at once; past it, 503. Also the
#: ``MPC_MAX_STREAMS`` environment variable.
MAX_STREAMS = 32
MAX_STREAMS_ENV = "MPC_MAX_STREAMS"
#: Seconds one write to a stream's client may block (a client that stops reading); then the stream ends.
STREAM_SEND_TIMEOUT = 5.0
#: Bytes of events one stream's client may have waiting (1 MiB), and the most one replay reads; past it
#: the stream ends and the client resumes with ``Last-Event-ID``.
STREAM_BUFFER = 1024 * 1024
#: Bytes of events the stream's feed reader takes from the store per read (at least one event).
FEED_READ_BYTES = 1024 * 1024
#: Seconds of ended tasks ``<prefix>/metrics`` describes in its wait-time and run-time histograms and its
#: counts of recently ended tasks (15 min); also the ``MPC_METRICS_WINDOW`` setting.
METRICS_WINDOW = 900.0
#: The most ended tasks of one controller one scrape of ``<prefix>/metrics`` reads for its histograms.
METRICS_SAMPLE = 10_000
#: The upper bounds (seconds) of the buckets of the wait-time and run-time histograms.
METRICS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                   4 * 3600.0, 12 * 3600.0)
#: The directory, under the app's instance folder, that keeps the files tasks save (``MPC_ARTIFACTS_URL``).
ARTIFACTS_DIR = "mpc-artifacts"
#: Bytes one artifact may take (1 GiB); over it ``save_artifact()`` raises ``ArtifactTooLarge``.
MAX_ARTIFACT_SIZE = 1024 ** 3
#: Artifacts one task may keep; more make ``save_artifact()`` raise ``TooManyArtifacts``.
MAX_ARTIFACTS = 100
#: Seconds a share link (``controller.share_url``, ``POST ...?share=``) is valid unless told otherwise (1 h).
SHARE_TTL = 3600
#: The longest validity a share link may be given (30 days).
MAX_SHARE_TTL = 30 * 24 * 3600
#: Environment variable that overrides or adds to a host's detected capacity (``memory=16GiB,cpus=4,gpu=1``).
RESOURCES_ENV = "MPC_RESOURCES"
#: Characters a task's ``concurrency_key`` may have at most.
MAX_CONCURRENCY_KEY = 255
#: Seconds a process keeps what it read of the hosts' capacities and the tenants' quota usage, for the checks
#: made at submit.
LIMITS_TTL = 1.0
