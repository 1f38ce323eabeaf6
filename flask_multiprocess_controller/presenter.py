"""The task object: how a stored task is shown to HTTP and Python callers."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Mapping, Optional, TypedDict, cast

from .engine.protocol import OWN_ERROR_TYPES
from .states import TaskStatus
from .store.base import Row, owner_host
from .waiting import QueueState, shown as waiting_shown


class TaskObject(TypedDict, total=False):
    """The task object of the HTTP contract (DESIGN.md §3), as HTTP answers and the Python API give it."""

    uuid: str
    status: str
    #: A human sentence.
    msg: str
    progress: Any
    percent: Optional[float]
    result: Any
    error: Optional[dict[str, Any]]
    args: dict[str, Any]
    priority: int
    #: 1-based place in the queue while queued, else None.
    position: Optional[int]
    #: While queued: what the task waits for (``slot``, ``paused``, ``retry_at``, ``schedule``, ``drained``,
    #: ``quota``, ``resources``, ``key``, ``tenant``;
    #: see :mod:`.waiting`), else None.
    waiting_on: Optional[str]
    #: While it waits on a limit: the resources short (``resources``), the key (``key``), the tenant
    #: (``tenant``, ``quota``); else None.
    waiting_for: Optional[str]
    #: While queued: when it is estimated to start (ISO 8601), None when nothing can tell.
    eta: Optional[str]
    #: ISO 8601 in UTC.
    created_at: Optional[str]
    started_at: Optional[str]
    ended_at: Optional[str]
    pid: Optional[int]
    #: The host (``MPC_HOST_ID``, else the host name) of the serving process that runs the task, or ran its
    #: last attempt; None before it first started and while it is queued again.
    host: Optional[str]
    exit_code: Optional[int]
    memory_peak: Optional[int]
    cpu_time: Optional[float]
    timeout: Optional[float]
    attempt: int
    controller: str
    #: While a failed attempt waits for its retry: when it may run again (ISO 8601), else None.
    retry_at: Optional[str]
    #: The error of every attempt that ended with one, oldest first.
    errors: list[dict[str, Any]]
    #: The schedule firing that queued the task, ``{"name", "firing"}`` (ISO 8601), else None.
    schedule: Optional[dict[str, Any]]
    #: The id of the bulk POST (or :meth:`~.controller.MetaMPController.submit_many`) that queued the
    #: task, shared by every task of it; None for a task queued alone.
    batch: Optional[str]
    #: When the task last saved its state (ISO 8601), else None. The state itself is never shown.
    state_saved_at: Optional[str]
    #: The W3C ``traceparent`` of the trace the task belongs to (its trace id is characters 3 to 35), else None.
    traceparent: Optional[str]
    #: The uuid of the ended task this one runs again, else None.
    rerun_of: Optional[str]
    #: The uuids of the tasks queued to run this one again, newest first (at most
    #: :data:`~.defaults.RERUNS_SHOWN`); None where they are not read: list views and events.
    reruns: Optional[list[str]]
    #: The key whose running tasks ``max_per_key`` bounds, else None.
    concurrency_key: Optional[str]
    #: What the task needs of a host (memory in bytes, cpus, custom names), else None.
    resources: Optional[dict[str, Any]]
    #: The task's artifacts, ``{"name", "size", "content_type", "sha256"}`` each, as its last attempt left them
    #: (see :mod:`.artifacts`); None before an attempt ended, or when it saved none.
    artifacts: Optional[list[dict[str, Any]]]
    #: True when the task was asked to finish now and returned its best answer so far: it is ``stopped`` with
    #: that ``result``.
    stopped_with_result: bool
    #: In list views only: the values shown as null because they were too large.
    truncated: list[str]


#: Keys of the task object, in the order they are shown.
TASK_KEYS = (
    "uuid", "status", "msg", "progress", "percent", "result", "error", "args", "priority", "position",
    "waiting_on", "waiting_for", "eta", "created_at", "started_at", "ended_at", "pid", "host", "exit_code", "memory_peak",
    "cpu_time", "timeout",
    "attempt", "controller", "retry_at", "errors", "schedule", "batch", "state_saved_at",
    "traceparent",
    "rerun_of", "reruns", "concurrency_key", "resources", "artifacts", "stopped_with_result",
)


def iso(ts: Optional[float]) -> Optional[str]:
    """ISO 8601 in UTC for a UNIX time, or None."""
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


def _msg(row: Row, position: Optional[int]) -> str:
    uuid, status = row["uuid"], row["status"]
    error = row.get("error") or {}
    if status == TaskStatus.QUEUED and row.get("retry_at") is not None:
        return (f"Task {uuid} failed on attempt {row.get('attempt')} and runs again from "
                f"{iso(row.get('retry_at'))}.")
    if status == TaskStatus.QUEUED:
        return f"Task {uuid} is queued at position {position}."
    if status == TaskStatus.RUNNING:
        return f"Task {uuid} is running in process {row.get('pid')}."
    if status == TaskStatus.STOPPING:
        return f"Task {uuid} is stopping."
    if status == TaskStatus.PAUSED:
        return f"Task {uuid} is paused in process {row.get('pid')}."
    if status == TaskStatus.SUCCEEDED:
        return f"Task {uuid} succeeded."
    if status == TaskStatus.STOPPED and row.get("stopped_with_result"):
        return f"Task {uuid} was asked to finish and returned its result so far."
    if status == TaskStatus.STOPPED and row.get("started_at") is None:
        return f"Task {uuid} was stopped before it started."
    if status == TaskStatus.STOPPED:
        return f"Task {uuid} was stopped."
    return _ended_msg(uuid, status, error.get("message", ""))


def _ended_msg(uuid: str, status: str, message: str) -> str:
    """The ``msg`` of a task that ended with an error (failed, timed out, lost): the error's message."""
    if status == TaskStatus.TIMED_OUT:
        return f"Task {uuid} timed out: {message}".rstrip(": ")
    return f"Task {uuid} {status}: {message}".rstrip(": ")


def present(row: Row, position: Optional[int] = None, live: Optional[Any] = None,
            reruns: Optional[list[str]] = None, queue: Optional[QueueState] = None) -> TaskObject:
    """Build the task object of a stored row.

    :param position: the row's place in the queue, when it is queued.
    :param live: the in-process run of the task, whose progress and usage may be fresher than the store's.
    :param reruns: the uuids of the task's reruns (see :meth:`~.store.base.TaskStore.reruns`); None when
        they were not read (list views).
    :param queue: what the controller's queued tasks wait behind: gives a queued task's ``waiting_on`` and
        ``eta`` (None leaves them null).
    """
    stored = cast(dict[str, Any], row)
    view: dict[str, Any] = {key: stored.get(key) for key in TASK_KEYS}
    if view["error"] is not None:
        view["error"] = dict(view["error"])  # callers may hide the traceback without touching the row
    for key in ("created_at", "started_at", "ended_at", "retry_at", "state_saved_at"):
        view[key] = iso(stored.get(key))
    view["errors"] = [dict(error) for error in view["errors"] or []]
    if view["schedule"] is not None:
        view["schedule"] = {**view["schedule"], "firing": iso(view["schedule"].get("firing"))}
    if live is not None:
        view["progress"], view["percent"] = live.progress, live.percent
        usage = getattr(live, "usage", None)  # this process samples the task's tree: fresher than the store
        if usage is not None:
            view.update(usage.figures())
    view["position"] = position if row["status"] == TaskStatus.QUEUED else None
    waiting = waiting_shown(row, view["position"], queue)
    view["waiting_on"], view["eta"] = waiting["waiting_on"], iso(waiting["eta"])
    view["waiting_for"] = waiting["waiting_for"]
    view["host"] = _host(stored)
    view["msg"] = _msg(row, position)
    view["reruns"] = None if reruns is None else list(reruns)
    view["stopped_with_result"] = bool(stored.get("stopped_with_result"))
    return cast(TaskObject, view)


def _host(row: Mapping[str, Any]) -> Optional[str]:
    """The host part of the row's ``owner`` (the serving process that claimed it, whose id stays hidden)."""
    owner = row.get("owner")
    return owner_host(owner) if isinstance(owner, str) and owner else None


def present_change(task: Mapping[str, Any]) -> TaskObject:
    """The task object of an event's task: only the keys the event carries (see
    :func:`~.store.base.event_payload`), shown as :func:`present` shows them, with its ``msg`` and ``position``.

    A ``progress`` event gives ``progress`` and ``percent`` (with the task's uuid, status, attempt, pid and
    controller), an end the whole task object but its ``args``: a live view merges it into what it has.
    ``host`` comes with the events that carry the owner (a start, an adoption, an end, a requeue).
    """
    whole = cast(dict[str, Any], present(cast(Row, task)))
    return cast(TaskObject, {key: value for key, value in whole.items()
                             if key in task or key in ("msg", "position")
                             or (key == "host" and "owner" in task)})


def hide_traceback(task: TaskObject) -> TaskObject:
    """The task object without its errors' tracebacks (kept in the store and the logs)."""
    error = task.get("error")
    if error and error.get("traceback") is not None:
        task["error"] = {**error, "traceback": None}
    if any(e.get("traceback") is not None for e in task.get("errors") or []):
        task["errors"] = [{**e, "traceback": None} for e in task["errors"]]
    return task


def hidden_message(kind: str) -> str:
    """What clients read instead of an exception's message when the controller's ``expose_errors`` is off."""
    return f"The task raised {kind}; its message is kept in the server's logs."


def hide_error_text(task: TaskObject) -> TaskObject:
    """The task object without its exception text: each error keeps its ``type``, its message becomes a
    sentence and its traceback null, and ``msg`` follows. Errors the package made itself (a timeout, a
    crash) keep their messages: they hold no exception text."""
    def hidden(error: dict[str, Any]) -> dict[str, Any]:
        if error.get("type") in OWN_ERROR_TYPES:
            return {**error, "traceback": None}
        return {**error, "message": hidden_message(str(error.get("type"))), "traceback": None}

    error = task.get("error")
    if error:
        shown = task["error"] = hidden(error)
        if task.get("status") in (TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.LOST):
            task["msg"] = _ended_msg(task["uuid"], task["status"], shown["message"])
    if task.get("errors"):
        task["errors"] = [hidden(e) for e in task["errors"]]
    return task


#: The values the list view shows only up to a size (the item URL gives them whole).
_CLIPPED = ("args", "progress", "result", "errors")


def clip(task: TaskObject, limit: int) -> TaskObject:
    """Null out ``args``, ``progress``, ``result`` and ``errors`` larger than ``limit`` bytes of JSON, naming
    them in ``truncated``: a list view stays small whatever its tasks carry."""
    values = cast(dict[str, Any], task)
    truncated = [key for key in _CLIPPED if values.get(key) is not None and len(json.dumps(values[key])) > limit]
    for key in truncated:
        values[key] = None
    if truncated:
        task["truncated"] = truncated
    return task


class ListView(TypedDict):
    """What a list request answers: the newest tasks and the controller's counts."""

    tasks: list[TaskObject]
    running: int
    queued: int
    max_num_process: int
