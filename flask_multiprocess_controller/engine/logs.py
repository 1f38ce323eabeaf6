"""Process-safe logging: task processes log through a queue to the serving process's handlers.

In a task process, a :class:`logging.handlers.QueueHandler` is the only handler; its
"queue" sends each prepared record over the task's channel. The controlling thread
puts the records it receives on a queue that a :class:`logging.handlers.QueueListener`
drains in the serving process, handing each record to the logger of the same name
there, so the app's own logging configuration decides where it goes.
"""
from __future__ import annotations

import abc
import logging
import logging.handlers
import queue
import threading
import time
from typing import Any, Callable, Mapping, Optional

from ..ops import console

from .. import defaults
from .. import tracing
from .protocol import LogRecordMessage


class MetaMPLoggerConfigurator(abc.ABC):
    """Configures logging on both sides of the process boundary.

    Pass a subclass as the controller's ``log_configurator=``: its
    :meth:`listener_log_setup` runs once in the serving process before the first
    task starts; :meth:`worker_log_setup` runs in each task process (the default one
    runs once in the fork server instead, and every task process inherits what it did).
    """

    @staticmethod
    @abc.abstractmethod
    def listener_log_setup() -> None:
        """Set up the serving process's handlers and formats."""

    @staticmethod
    def worker_log_setup(queue: Any) -> None:
        """Make every logger of the task process write to ``queue`` through a QueueHandler only.

        Only override this if you know what you are doing: any other handler in a task
        process would write from several processes at once.
        """
        root = logging.getLogger()
        for logger in [root, *logging.Logger.manager.loggerDict.values()]:
            if isinstance(logger, logging.Logger):
                for handler in list(logger.handlers):
                    logger.removeHandler(handler)
                logger.propagate = True
        root.addHandler(logging.handlers.QueueHandler(queue))


class DefaultMPLoggerConfigurator(MetaMPLoggerConfigurator):
    """Logs everything from INFO up to standard error, with process and thread names.

    Its handler is added to the root logger once per process, however many
    controllers name this configurator.
    """

    @staticmethod
    def listener_log_setup() -> None:
        root = logging.getLogger()
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        if any(isinstance(h, _DefaultStderrHandler) for h in root.handlers):
            return
        handler = _DefaultStderrHandler()
        handler.setFormatter(logging.Formatter(
            "[%(asctime)s][%(processName)s:%(process)d][%(threadName)s][%(levelname)s][%(name)s] %(message)s"))
        root.addHandler(handler)


class _DefaultStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :class:`DefaultMPLoggerConfigurator` adds, recognisable so it is added once."""


def logger_levels() -> dict[str, int]:
    """The levels set on the serving process's loggers, to mirror in a task process.

    A task process is forked from a snapshot taken when the controller was created;
    levels set since then (``logging.basicConfig`` under the ``__main__`` guard, say)
    are sent with each task so that the child logs what the server would. While the
    serving process has no handler for INFO records, the child's root logs at INFO,
    so that the console fallback (:mod:`.console`) sees the task's records.
    """
    levels = {"": console.child_root_level()}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def apply_logger_levels(levels: dict[str, int]) -> None:
    """Set the levels sent by :func:`logger_levels` in this (task) process."""
    for name, level in levels.items():
        logger = logging.getLogger(name or None)
        if logger.level != level:  # most are inherited as they are; setLevel would clear every logger's cache
            logger.setLevel(level)


class ChannelQueue:
    """The child side of the log queue: ``put_nowait`` sends a record to the serving process."""

    def __init__(self, send: Callable[[object], None]) -> None:
        self._send = send

    def put_nowait(self, record: logging.LogRecord) -> None:
        self._send(LogRecordMessage(record))


class _HandToNamedLogger(logging.Handler):
    """Hands a record from a task process to the serving process's logger of the same name.

    The record of a task that belongs to a trace carries ``trace_id`` (32 hex digits) and
    ``traceparent`` attributes, for the app's formats and filters; with ``opentelemetry-api``
    installed it is handled with that trace as the current context, so OpenTelemetry's logging
    handler links it to the trace too.
    """

    def handle(self, record: logging.LogRecord) -> bool:
        with tracing.attached(getattr(record, "traceparent", None)):
            console.handle(logging.getLogger(record.name), record)
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() does the work
        self.handle(record)


class _StoppableListener(logging.handlers.QueueListener):
    """A QueueListener whose stop waits a bounded time: a handler stuck on a slow stream must not
    hold a shutdown."""

    def start(self) -> None:
        # A daemon thread: a process that exits must not wait for a backlog of task log records.
        # (QueueListener's own start() makes the same thread with its _monitor loop, but not as a daemon.)
        self._thread = threading.Thread(target=self._monitor, name="mpc-log-relay",  # type: ignore[attr-defined]
                                        daemon=True)
        self._thread.start()

    def stop_within(self, timeout: float) -> bool:
        """Ask the thread to end after the records already queued; False if it is still busy."""
        thread = self._thread
        if thread is None:
            return True
        self.enqueue_sentinel()
        thread.join(timeout)
        self._thread = None
        return not thread.is_alive()


class LogListener:
    """The serving side: a bounded queue fed by controlling threads, drained by a QueueListener.

    When the handlers cannot keep up (a task logging in a tight loop to a slow stream),
    records are dropped rather than held: the serving process's memory stays bounded,
    the drops are counted and logged, and shutdown never waits for a backlog.
    """

    def __init__(self, logger: logging.Logger, capacity: int = defaults.LOG_QUEUE_SIZE) -> None:
        self._logger = logger
        self.queue: "queue.Queue[Any]" = queue.Queue(capacity)
        self._listener = _StoppableListener(self.queue, _HandToNamedLogger())
        self._started = False
        # Guards dropped and _reported.
        self._lock = threading.Lock()
        #: Records dropped because the queue was full.
        self.dropped = 0
        self._reported = 0

    def start(self) -> None:
        if not self._started:
            self._listener.start()
            self._started = True

    def put(self, record: logging.LogRecord) -> None:
        """Queue a record of a task process, or count it as dropped when the queue is full."""
        try:
            self.queue.put_nowait(record)
            return
        except queue.Full:
            pass
        with self._lock:
            self.dropped += 1
            first = self.dropped == self._reported + 1
        if first:
            self._logger.warning("Task log records arrive faster than the log handlers write them: dropping "
                                 "records while %d wait (the count is logged at shutdown).", self.queue.maxsize)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop relaying: what is still queued after ``timeout`` seconds is dropped."""
        if not self._started:
            return
        self._started = False
        while True:  # make room for the listener's sentinel: the backlog is dropped, not waited for
            try:
                self.queue.get_nowait()
                with self._lock:
                    self.dropped += 1
            except queue.Empty:
                break
        if not self._listener.stop_within(timeout):
            self._logger.warning("A log handler is still busy after %g s; not waiting for it.", timeout)
        with self._lock:
            dropped, self._reported = self.dropped, self.dropped
        if dropped:
            self._logger.warning("%d task log record(s) were dropped because the log handlers could not keep up.",
                                 dropped)


# -- the controller's lines about each task ------------------------------------------------------------

def log_task_started(logger: logging.Logger, uuid: str, pid: Optional[int]) -> None:
    """Log at INFO that task ``uuid`` started in process ``pid``."""
    console.console_aware(logger).info("Task %s started in process %s.", uuid, pid)


def log_task_ended(logger: logging.Logger, uuid: str, status: str, error: Optional[dict[str, Any]] = None) -> None:
    """Log how task ``uuid`` ended: its state, and its error if it has one.

    At INFO, but at WARNING with the traceback when the task raised an exception: clients see the
    traceback only if the controller exposes it, so the server's log is where an operator finds it.
    A task that stopped at a checkpoint is "aborted by signal", upstream 0.1's words.
    """
    log = console.console_aware(logger)
    if status == "stopped" and not error:
        log.info("Task %s aborted by signal: it stopped at a checkpoint.", uuid)
    elif error and error.get("traceback"):
        log.warning("Task %s ended %s: %s: %s%s", uuid, status, error.get("type"), error.get("message"),
                    traceback_suffix(error))
    elif error:
        log.info("Task %s ended %s: %s: %s", uuid, status, error.get("type"), error.get("message"))
    else:
        log.info("Task %s ended %s.", uuid, status)


def traceback_suffix(error: Optional[Mapping[str, Any]]) -> str:
    """The traceback of ``error`` on lines of its own, to end a log message with; empty when it has none."""
    tb = (error or {}).get("traceback")
    return "\n" + str(tb).rstrip("\n") if tb else ""


def traceback_lines(error: Optional[Mapping[str, Any]], when: float, name: str) -> list[str]:
    """Lines of a task's kept log that show the exception it raised (``error``) with its traceback; none
    when the error has no traceback (a crash, a timeout: the package's own errors)."""
    tb = (error or {}).get("traceback")
    if not tb or error is None:
        return []
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))
    return [f"{stamp} ERROR {name}: The task raised {error.get('type')}: {error.get('message')}",
            *str(tb).rstrip("\n").splitlines()]
