"""The task base class, and the helpers a running task calls."""
from __future__ import annotations

import abc
import logging
import math
from typing import Any, ClassVar, Iterable, Iterator, Optional, Protocol, TypeVar

from .exceptions import AbortException, FinishRequested, NotInTask

T = TypeVar("T")


class TaskChannel(Protocol):
    """How a task talks to its controlling thread (implemented in the child process)."""

    def publish(self, value: Any) -> None: ...

    def publish_percent(self, percent: float) -> None: ...

    def stop_requested(self) -> bool: ...

    def save_state(self, value: Any) -> bool: ...

    # Optional: ``finish_requested() -> bool``, True once the stop asked for is a finish (see MetaMPTask.finishing).


#: The task running in this process, if any (a task process runs one at a time).
_current: Optional["MetaMPTask"] = None


class MetaMPTask(abc.ABC):
    """Subclass this and implement :meth:`execute`; it runs in a child process.

    Subclass keywords: ``task_name=`` (defaults to the class name) and ``logger=``
    (defaults to ``logging.getLogger(<class name>)``). Set ``restartable = True``
    on a subclass whose runs may safely be started again from the beginning when
    the process that ran them died.

    A task may save where it got to with :meth:`save_state`; a later attempt finds it in
    :attr:`state` and resumes from there.

    Retries (see :mod:`.retries`): ``max_retries`` failed attempts are run again after
    ``retry_backoff`` seconds, doubling (with jitter) up to ``retry_backoff_max``, when the
    failure matches ``retry_on`` (None: any exception ``execute`` raises).

    .. versionchanged:: 0.3
        ``max_retries``, ``retry_backoff``, ``retry_backoff_max``, ``retry_on``; ``save_state()``,
        ``state``.
    """

    #: The task's name, for logs and messages.
    task_name: ClassVar[str] = "MetaMPTask"
    #: The logger of this task class; in the child it writes through the controller's process.
    logger: ClassVar[logging.Logger] = logging.getLogger("MetaMPTask")
    #: True when a run that was cut off may be started again from the beginning.
    restartable: ClassVar[bool] = False
    #: How many times a failed attempt is run again (0: never).
    max_retries: ClassVar[int] = 0
    #: Seconds before the first retry; each further one waits twice as long, with jitter.
    retry_backoff: ClassVar[float] = 1.0
    #: The longest pause before a retry, in seconds.
    retry_backoff_max: ClassVar[float] = 600.0
    #: Exception types (a class or a tuple) whose failures are retried; None: any exception ``execute``
    #: raises. Crashes, timeouts and the memory limit are retried only when named here (``ProcessDied``,
    #: ``TaskTimeout``, ``MemoryLimitExceeded``).
    retry_on: ClassVar[Optional[Any]] = None
    #: How many tasks of this class this process has started, this one included (upstream 0.1's
    #: counter; 1 in a fresh task process). ``self.task_id`` is the task's unique name.
    counter: ClassVar[int] = 0
    #: What one task of this class needs of a host to start, resource name -> amount: ``memory`` (bytes, or a
    #: string with a unit such as ``"6GiB"``), ``cpus``, and custom names (``"gpu": 1``). A serving process
    #: claims the task only while its host's running tasks leave room for it (see :mod:`.limits`); None:
    #: nothing declared. Checked when the class is made.
    resources: ClassVar[Optional[dict[str, Any]]] = None
    #: :attr:`resources` as numbers (memory in bytes), parsed when the class is made.
    declared_resources: ClassVar[Optional[dict[str, float]]] = None

    def __init_subclass__(cls, task_name: Optional[str] = None, logger: Optional[logging.Logger] = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if task_name is not None or "task_name" not in cls.__dict__:
            cls.task_name = task_name or cls.__name__
        if logger is not None:
            cls.logger = logger
        elif "logger" not in cls.__dict__:
            cls.logger = logging.getLogger(cls.__name__)
        if "resources" in cls.__dict__:
            from .limits import parse_resources

            cls.declared_resources = parse_resources(cls.__dict__["resources"], f"{cls.__name__}.resources")

    def __init__(self, task_id: str, channel: TaskChannel, context: Optional[dict[str, Any]] = None,
                 state: Any = None) -> None:
        #: The uuid of the task being run.
        self.task_id = task_id
        #: Where to resume from: what an earlier attempt of this task saved with :meth:`save_state` (after
        #: its server was lost or shut down, or before a retry), then what this attempt saved; None when
        #: nothing was saved.
        self.state: Any = state
        type(self).counter += 1
        #: Controller-level values (secrets, settings) that are never exposed over HTTP.
        self.context: dict[str, Any] = dict(context or {})
        self._channel = channel
        if type(self).upload_status is MetaMPTask.upload_status:
            # Progress may be reported in a task's innermost loop: skip one call level there.
            self.upload_status = channel.publish  # type: ignore[method-assign,assignment]

    @abc.abstractmethod
    def execute(self, *args: Any, **kwargs: Any) -> Any:
        """Do the work. Keyword arguments come from the request; the return value
        (JSON-serialisable) becomes the task's ``result``."""

    def upload_status(self, status: Any) -> None:
        """Publish ``status`` (any JSON value) as the task's ``progress``.

        It never waits for the store: the controlling thread keeps the last value and
        writes it at a bounded rate. A value whose JSON is over the controller's
        ``max_progress_size``, or that holds NaN or Infinity, is refused with a warning in the
        log (the previous progress stays).

        :raises TypeError: the value is not JSON-serialisable.
        :raises ValueError: it nests lists and objects more than 100 levels deep (nothing is published).

        .. versionchanged:: 0.3
            A value nested too deep raises ValueError here, in the task.
        """
        self._channel.publish(status)

    def save_state(self, value: Any) -> bool:
        """Save ``value`` (any JSON value) durably with the task: a later attempt of it starts with it
        in :attr:`state`.

        A later attempt is one after a retry (see :mod:`.retries`), or after the server running the
        task was lost or shut down: a task that saved state is queued again then, as a
        ``restartable`` one would be, instead of ending ``lost`` or ``stopped``. Each call replaces
        the value saved before, in one store write; call it every so often, not in a tight loop.

        The call waits until the serving process says the store holds the value, so that when it
        returns True the value survives a crash of anything. It never waits long: after 30 s without
        an answer, or when the value could not be stored (the task is no longer this server's, or
        the store failed), a warning is logged and it returns False, leaving the task to go on. A stop
        requested meanwhile is kept for the next :meth:`checkpoint`. :attr:`state` becomes ``value``
        either way.

        :raises StateTooLarge: the value's JSON is over the controller's ``max_state_size`` (nothing
            is saved; the task may catch it and go on).
        :raises TypeError: the value is not JSON-serialisable.
        :raises ValueError: it holds NaN or Infinity, which JSON has no words for, or nests more than 100
            levels deep.

        .. versionadded:: 0.3
        """
        stored = self._channel.save_state(value)
        self.state = value
        return stored

    @property
    def artifact_dir(self) -> str:
        """A private scratch directory of this attempt, made at the first use: files left in it when
        :meth:`execute` ends (returns, raises or stops) are saved as artifacts under their file names
        (subdirectories are not), then it is removed.

        :raises NotInTask: outside a task process.

        .. versionadded:: 0.4
        """
        return str(self._artifact_writer().directory)

    def save_artifact(self, name: str, data_or_path: Any, content_type: Optional[str] = None) -> dict[str, Any]:
        """Save a file this task produced as its artifact ``name`` (replacing one of that name), and return
        its record ``{"name", "size", "content_type", "sha256"}``.

        ``data_or_path`` is the content (``bytes``; encode text first), the path of a file (``str`` or
        ``os.PathLike``, copied), or a binary file object (read to its end). ``content_type`` defaults to
        what the name's extension says, else ``application/octet-stream``. The artifact is complete once
        this returns: ``GET <item>/artifacts`` lists it from then on, from any serving process that reaches
        the same artifacts directory, and it is deleted with the task.

        :raises InvalidArtifactName: ``name`` is not one plain file name (a path, ``..``, a leading dot...).
        :raises ArtifactTooLarge: the content is over the controller's ``max_artifact_size`` (nothing saved).
        :raises TooManyArtifacts: the task holds ``max_artifacts`` others already (nothing saved).
        :raises NotInTask: outside a task process.

        .. versionadded:: 0.4
        """
        return dict(self._artifact_writer().save(name, data_or_path, content_type))

    def _artifact_writer(self) -> Any:
        writer = getattr(self, "_artifacts", None)
        if writer is None:
            raise NotInTask("Artifacts are saved from inside MetaMPTask.execute(), in a task process.")
        return writer

    @property
    def finishing(self) -> bool:
        """True once the task was asked to *finish now* (``DELETE <item>?finish=true``, the dashboard's "Finish
        now", ``flask mpc stop --finish``, ``Client.finish``).

        A task that can give a useful answer before its end (a solver's incumbent, a count so far) looks at
        it, or catches :class:`FinishRequested` from :meth:`checkpoint`, and returns that answer: it is kept
        as the task's ``result`` and the task ends ``stopped`` with ``stopped_with_result: true``. The
        ``stop_grace`` escalation applies as for any stop.

        .. versionadded:: 0.3
        """
        if not self._channel.stop_requested():
            return False
        asked = getattr(self._channel, "finish_requested", None)
        return bool(asked()) if asked is not None else False

    def checkpoint(self) -> None:
        """Raise :class:`AbortException` if a stop of this task has been requested: :class:`FinishRequested`
        (a subclass) when the stop asked for is a finish (see :attr:`finishing`)."""
        if self._channel.stop_requested():
            if self.finishing:
                raise FinishRequested(f"Task {self.task_name} ({self.task_id}) was asked to finish now.")
            raise AbortException(f"Task {self.task_name} ({self.task_id}) was asked to stop.")

    #: Seed name of :meth:`checkpoint`.
    set_checkpoint = checkpoint

    def track(self, iterable: Iterable[T], total: Optional[int] = None) -> Iterator[T]:
        """Yield the items of ``iterable``, publishing the task's ``percent`` as it goes.

        ``total`` defaults to ``len(iterable)``. Each step also calls
        :meth:`checkpoint`, so a tracked loop stops promptly when asked to. ``percent`` reaches 100
        only when the loop ends: a ``total`` smaller than the items holds it at 99 meanwhile.
        """
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        last = -1
        for done, item in enumerate(iterable):
            self.checkpoint()
            if total:
                whole = min(99, math.floor(100 * done / total))
                if whole != last:
                    last = whole
                    self._channel.publish_percent(float(whole))
            yield item
        self._channel.publish_percent(100.0)


def _set_current(task: Optional[MetaMPTask]) -> None:
    global _current
    _current = task


def current_task() -> MetaMPTask:
    """Return the task running in this process.

    :raises NotInTask: when called outside a task's ``execute``.
    """
    if _current is None:
        raise NotInTask("No task is running in this process: call this from inside MetaMPTask.execute().")
    return _current


def upload_status(status: Any) -> None:
    """Publish the running task's progress, from any function it calls."""
    current_task().upload_status(status)


def set_checkpoint() -> None:
    """Raise :class:`AbortException` if the running task was asked to stop."""
    current_task().checkpoint()


__all__ = ["MetaMPTask", "AbortException", "FinishRequested", "upload_status", "set_checkpoint", "current_task"]
