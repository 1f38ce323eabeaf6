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
from typing import Any, Callable, Optional

from . import console


class MetaMPLoggerConfigurator(abc.ABC):
    """Configures logging on both sides of the process boundary.

    Pass a subclass as the controller's ``log_configurator=``: its
    :meth:`listener_log_setup` runs once in the serving process before the first
    task starts; :meth:`worker_log_setup` runs in each task process.
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
        logging.getLogger(name or None).setLevel(level)


class ChannelQueue:
    """The child side of the log queue: ``put_nowait`` sends a record to the serving process."""

    def __init__(self, send: Callable[[object], None]) -> None:
        self._send = send

    def put_nowait(self, record: logging.LogRecord) -> None:
        self._send(("log", record))

    put = put_nowait


class _HandToNamedLogger(logging.Handler):
    """Hands a record from a task process to the serving process's logger of the same name."""

    def handle(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        console.handle(logging.getLogger(record.name), record)
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() does the work
        self.handle(record)


class LogListener:
    """The serving side: a queue fed by controlling threads, drained by a QueueListener."""

    def __init__(self) -> None:
        self.queue: "queue.SimpleQueue[logging.LogRecord]" = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(self.queue, _HandToNamedLogger())
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._listener.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._listener.stop()
            self._started = False


# -- the controller's lines about each task ------------------------------------------------------------

def log_task_started(logger: logging.Logger, uuid: str, pid: Optional[int]) -> None:
    """Log at INFO that task ``uuid`` started in process ``pid``."""
    console.console_aware(logger).info("Task %s started in process %s.", uuid, pid)


def log_task_ended(logger: logging.Logger, uuid: str, status: str, error: Optional[dict[str, Any]] = None) -> None:
    """Log at INFO how task ``uuid`` ended: its state, and its error if it has one.

    A task that stopped at a checkpoint is "aborted by signal", upstream 0.1's words.
    """
    log = console.console_aware(logger)
    if status == "stopped" and not error:
        log.info("Task %s aborted by signal: it stopped at a checkpoint.", uuid)
    elif error:
        log.info("Task %s ended %s: %s: %s", uuid, status, error.get("type"), error.get("message"))
    else:
        log.info("Task %s ended %s.", uuid, status)
