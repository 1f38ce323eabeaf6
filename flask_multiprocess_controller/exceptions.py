"""The package's exceptions.

Every error a caller can cause is an :class:`MPCError` subclass; the resource maps
them to HTTP status codes in one place (:mod:`.errors`).
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Iterable, Optional


class AbortException(BaseException):
    """Raised by ``checkpoint()`` inside a task once a stop was requested.

    It derives from :class:`BaseException` so that a task's own
    ``except Exception`` blocks do not swallow the stop.
    """


class FinishRequested(AbortException):
    """Raised by ``checkpoint()`` once the task was asked to *finish now* (``DELETE ?finish=true``).

    A task that catches it returns its best answer so far: that value becomes the task's ``result``, and
    the task ends ``stopped`` with ``stopped_with_result: true``. A task that does not catch it stops as
    for any stop (it is an :class:`AbortException`), without a result.

    .. versionadded:: 0.3
    """


class MPCError(Exception):
    """Base class of the package's errors."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        #: A sentence for humans, sent as the ``message`` of an HTTP error body.
        self.message = message


class InvalidRequest(MPCError):
    """The request is malformed: bad JSON, a bad option, a bad uuid."""


class InvalidArguments(InvalidRequest):
    """The keyword arguments do not fit the task's ``execute`` signature."""


class PayloadTooLarge(MPCError):
    """The request body is larger than the controller accepts."""


class TaskNotFound(MPCError):
    """No task with this uuid belongs to this controller."""

    def __init__(self, uuid: str) -> None:
        super().__init__(f"No task with uuid {uuid} is known to this controller.")
        self.uuid = uuid


class TaskPrefixNotFound(TaskNotFound):
    """No task visible here has a uuid that begins with this prefix.

    .. versionadded:: 0.3
    """

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self.message = f"No task's uuid begins with {prefix}."


class AmbiguousTaskPrefix(InvalidRequest):
    """A uuid prefix names several tasks: the operator must give more of it (``candidates`` are some of them).

    .. versionadded:: 0.3
    """

    def __init__(self, prefix: str, candidates: list[tuple[str, str, str]], more: bool) -> None:
        listed = "; ".join(f"{uuid} ({controller}, {status})" for uuid, controller, status in candidates)
        super().__init__(f"{prefix} begins the uuid of {'more than ' if more else ''}{len(candidates)} tasks: "
                         f"{listed}. Give more of the uuid.")
        #: ``(uuid, controller, status)`` of the tasks found, newest first.
        self.candidates = candidates


class BatchNotFound(MPCError):
    """No task of this controller (visible to the request) was queued with this batch id."""

    def __init__(self, batch: str) -> None:
        super().__init__(f"No batch with id {batch} is known to this controller.")
        self.batch = batch


class HostNotFound(MPCError):
    """No serving process of this host ever heartbeat in the store, and the host is not drained.

    .. versionadded:: 0.3
    """

    def __init__(self, host: str) -> None:
        super().__init__(f"No serving process of host {host!r} is known to the store (none has a heartbeat "
                         f"there) and the host is not drained.")
        self.host = host


class WorkerRefused(MPCError):
    """``flask mpc worker`` cannot serve a controller: a client in the process, or a store of one process.

    .. versionadded:: 0.3
    """


class TaskAlreadyFinished(MPCError):
    """The task has already reached a terminal state."""

    def __init__(self, uuid: str, status: str) -> None:
        super().__init__(f"Task {uuid} has already finished with status '{status}'.")
        self.uuid = uuid
        self.status = status


class InvalidTransition(MPCError):
    """The task is not in a state the requested change applies to (409).

    Pausing applies to a ``running`` task, resuming to a ``paused`` one, re-prioritising
    to a ``queued`` one; a finished task raises :class:`TaskAlreadyFinished` instead.

    .. versionadded:: 0.3
    """

    def __init__(self, uuid: str, status: str, change: str, needs: str) -> None:
        super().__init__(f"Task {uuid} is {status}: only a {needs} task can be {change}.")
        self.uuid = uuid
        #: The task's status when the change was refused.
        self.status = status


class TaskStillActive(MPCError):
    """A task that has not ended cannot be run again (409): wait for its end, or stop it first.

    .. versionadded:: 0.3
    """

    def __init__(self, uuid: str, status: str) -> None:
        super().__init__(f"Task {uuid} is {status}: only an ended task (succeeded, failed, stopped, timed_out or "
                         f"lost) can be run again.")
        self.uuid = uuid
        #: The task's status when the rerun was refused.
        self.status = status


class ChangeNotAllowed(MPCError):
    """The controller's ``can_change`` hook refused the request this change of a task (403).

    Raised for a pause, a resume, a new priority, a stop (one task, or stop-all) or a rerun that the hook
    answered falsy for; nothing was changed.

    .. versionadded:: 0.3
    """

    def __init__(self, uuid: Optional[str], action: str, message: Optional[str] = None) -> None:
        what = f"task {uuid}" if uuid else "these tasks"
        super().__init__(message or f"This request may not {_ACTION_VERBS.get(action, action)} {what}.")
        self.uuid = uuid
        #: The action refused: ``"pause"``, ``"resume"``, ``"priority"``, ``"stop"`` or ``"rerun"``.
        self.action = action


#: How each ``can_change`` action reads in a refusal.
_ACTION_VERBS = {"pause": "pause", "resume": "resume", "priority": "re-prioritise", "stop": "stop",
                 "rerun": "run again"}


class QueueFull(MPCError):
    """Accepting the tasks would put more than ``max_num_queue`` tasks in the queue."""

    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(f"The queue is full ({limit} tasks waiting); retry in {retry_after} s.")
        self.limit = limit
        self.retry_after = retry_after


class TooManyStreams(MPCError):
    """This process already serves ``MPC_MAX_STREAMS`` streams (the event stream, log follows).

    Answered with 503 and a ``Retry-After``: a stream holds a worker thread for up to ``MPC_MAX_WAIT``,
    so the cap keeps streams from taking every thread of the process.
    """

    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(f"This server already serves {limit} streams (MPC_MAX_STREAMS); "
                         f"retry in {retry_after} s.")
        self.limit = limit
        self.retry_after = retry_after


class MethodNotServed(MPCError):
    """The controller does not serve this HTTP method: its class does not override the handler.

    Answered with 405 and an ``Allow`` header listing the methods it does serve.

    .. versionadded:: 0.3
    """

    def __init__(self, message: str, allowed: Iterable[str]) -> None:
        super().__init__(message)
        #: Upper-case names of the HTTP methods the controller serves.
        self.allowed = tuple(allowed)


class NoTargetTask(MethodNotServed):
    """The controller was made with ``target_task=None``: it runs no tasks.

    Such a controller only answers the HTTP methods its class overrides (upstream
    0.1's pattern for endpoints that answer locally, a callback receiver say).

    .. versionadded:: 0.3
    """


class ControllerClosed(MPCError):
    """The controller has been shut down and accepts no more work."""


class StoreError(MPCError):
    """The task store is misconfigured or unusable.

    Every one made in a process is counted, by class, for ``<prefix>/metrics`` (:func:`store_errors_seen`).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        _count_store_error(type(self).__name__)


#: StoreError instances made in this process, by class name (reset in a forked child: its own count).
_store_errors: dict[str, int] = {}
_store_errors_lock = threading.Lock()
#: Called with the class name of every StoreError made (``<prefix>/metrics`` adds one in multiprocess mode).
store_error_hooks: list[Callable[[str], None]] = []


def _count_store_error(kind: str) -> None:
    with _store_errors_lock:
        _store_errors[kind] = _store_errors.get(kind, 0) + 1
    for hook in store_error_hooks:
        try:
            hook(kind)
        except Exception:  # counting must never hide the error being raised
            pass


def _forget_store_errors() -> None:
    global _store_errors_lock
    _store_errors_lock = threading.Lock()  # another thread may have held it at the fork
    _store_errors.clear()


os.register_at_fork(after_in_child=_forget_store_errors)


def store_errors_seen() -> dict[str, int]:
    """How many store errors this process has met since it started (or was forked), by class name
    (``StoreUnavailable``: the store was down or locked; ``StoreError``: it failed otherwise)."""
    with _store_errors_lock:
        return dict(_store_errors)


class StoreUnavailable(StoreError):
    """The task store is down or locked right now; the same call may succeed later.

    :param retry_after: seconds a caller (or an HTTP client, as ``Retry-After``) should wait.
    """

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class MetricsUnavailable(MPCError):
    """``<prefix>/metrics`` was asked for, but prometheus-client is not installed in the serving process.

    .. versionadded:: 0.4
    """

    def __init__(self) -> None:
        super().__init__("Metrics need prometheus-client, which is not installed: "
                         "pip install 'flask-multiprocess-controller[metrics]'.")


class NotInTask(MPCError):
    """A task-side helper was called outside a running task."""


class StateTooLarge(MPCError):
    """Raised inside a task by ``save_state()`` when the value's JSON is over the controller's
    ``max_state_size``; nothing is saved, and the task may catch it and go on.

    .. versionadded:: 0.3
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"save_state() was given {size} bytes of JSON, over the controller's max_state_size "
                         f"of {limit} bytes; nothing was saved.")
        #: Bytes of JSON the value took, and the most allowed.
        self.size = size
        self.limit = limit


class InvalidArtifactName(InvalidRequest):
    """An artifact name that could lead out of its task's directory, or that no file system takes: a path
    (``/``, ``\\``), ``.`` or ``..``, a leading dot, a control character, or more than 255 bytes.

    .. versionadded:: 0.4
    """


class ArtifactNotFound(MPCError):
    """The task has no artifact of that name.

    .. versionadded:: 0.4
    """

    def __init__(self, uuid: str, name: str) -> None:
        super().__init__(f"Task {uuid} has no artifact named {name[:200]!r}.")
        self.uuid = uuid
        self.name = name


class ArtifactTooLarge(MPCError):
    """Raised inside a task by ``save_artifact()`` when the file is over the controller's
    ``max_artifact_size``; nothing is saved, and the task may catch it and go on.

    .. versionadded:: 0.4
    """

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(f"Artifact {name!r} is over the controller's max_artifact_size of {limit} bytes; "
                         f"nothing was saved.")
        self.limit = limit


class TooManyArtifacts(MPCError):
    """Raised inside a task by ``save_artifact()`` when the task holds ``max_artifacts`` artifacts already
    (saving again under a name it holds replaces that one and is allowed).

    .. versionadded:: 0.4
    """

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(f"Artifact {name!r} was not saved: the task holds the controller's max_artifacts of "
                         f"{limit} already.")
        self.limit = limit


class TaskFailure(MPCError):
    """Base of the ways a task can fail outside ``execute``; name them in a task's ``retry_on``.

    They are never raised: a task that failed this way has an ``error`` whose ``type`` is the
    class's name, and a task class whose ``retry_on`` names the class (or a base of it, such as
    this one) runs again after such a failure.

    .. versionadded:: 0.3
    """


class ProcessDied(TaskFailure):
    """The task process crashed (a segfault, ``os._exit``, a signal from outside) before returning."""


class TaskTimeout(TaskFailure):
    """The task ran longer than its timeout and was stopped (status ``timed_out``)."""


class MemoryLimitExceeded(TaskFailure):
    """The task's process tree used more memory than ``max_memory`` and was killed."""


class IdempotencyKeyReused(MPCError):
    """An ``Idempotency-Key`` came again within ``idempotency_ttl`` with another body or other query
    options than the request that first used it (422); nothing was queued.

    .. versionadded:: 0.3
    """


class IdempotentTasksPurged(MPCError):
    """An ``Idempotency-Key`` came again within ``idempotency_ttl``, but the tasks it made have been purged
    since (the controller's ``retention`` is shorter than the key's life); nothing was queued (409).

    .. versionadded:: 0.3
    """


class IdempotentReplay(Exception):
    """Raised by a store's ``enqueue`` when the idempotency key it was given is already recorded (and not
    expired): nothing was written. The controller turns it into the answer of the first submission, or
    :class:`IdempotencyKeyReused`; it never reaches a caller.

    .. versionadded:: 0.3
    """

    def __init__(self, uuids: Iterable[str], fingerprint: str) -> None:
        self.uuids = list(uuids)
        self.fingerprint = fingerprint
        super().__init__(f"already submitted as {', '.join(self.uuids)}")


class ShareDenied(MPCError):
    """A share link's token does not open this task: it was altered, or it is another task's (403).

    .. versionadded:: 0.3
    """


class ShareTokenMissing(ShareDenied):
    """A share URL was requested without its ``token`` (401)."""


class ShareLinkExpired(ShareDenied):
    """A share link's validity has passed: the app must make a new one (401)."""


class ShareLinksUnavailable(InvalidRequest):
    """Share links cannot be made or checked here: the app has no ``SECRET_KEY`` (they are signed with it), or
    the extension (which serves them) is not initialised in the app (400: a request for a link is one this
    server cannot answer, whatever it is sent again with)."""


class ResourcesUnavailable(MPCError):
    """A task declares more resources (``memory``, ``cpus``, custom names) than any serving host's capacity
    offers, even with nothing else running: it could never start, so it is refused at submit (422).

    .. versionadded:: 0.4
    """

    def __init__(self, message: str, needed: dict[str, float], largest: dict[str, float]) -> None:
        super().__init__(message)
        #: What the task declares, and the largest capacity of each of those resources among the live hosts.
        self.needed = needed
        self.largest = largest


class QuotaExceeded(MPCError):
    """The tenant's tasks used their CPU quota (``tenant_quota``) of the window: no new task is accepted for
    it until enough of that usage leaves the window (429 with ``Retry-After``).

    .. versionadded:: 0.4
    """

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
