"""Upstream 0.1's answers, for clients that cannot change: a controller's ``compat="0.1"``.

With it, the controller's resource reads bodies as JSON whatever their content type
(upstream did), and its default handlers answer in upstream's shapes and codes:

- POST: 200 ``{"msg", "uuid", "requestParams", "taskCounter"}`` (the last two are
  strings: the request's parameters as Python prints them, and how many tasks this
  controller accepted in this process);
- GET: 200 ``{"msg", "progressNum", "status"}`` while the task is queued or runs,
  ``progressNum`` being the last ``upload_status`` value as a string (``"0"`` before
  the first); 200 ``{"msg", "status"}`` once it ended, with upstream's "No process
  linked to this uuid" message; 200 ``{"msg"}`` for an unknown uuid;
- DELETE: 200 ``{"msg", "status"}``, or 200 ``{"msg"}`` for an unknown uuid.

``status`` is the one key upstream did not send; old clients ignore it. Errors keep
their 4xx codes, and their body gets upstream's ``msg`` besides ``message``. Nothing
else changes: the task objects of the Python API, callbacks and other URLs stay as
they are.

Lenient content types are an opt-in because a body of any content type can be sent
by any web page, with the user's cookies, without a CORS preflight (a "simple
request"): the default resource only takes ``application/json``.
"""
from __future__ import annotations

import threading
import uuid as uuid_module
from typing import Any, Callable, Mapping, Optional, Sequence

from ..exceptions import TaskAlreadyFinished, TaskNotFound
from .responses import Reply
from ..states import TERMINAL

#: The values a controller's ``compat=`` accepts (None: this version's answers).
VERSIONS = ("0.1",)


def check_version(compat: Optional[str]) -> Optional[str]:
    """Return ``compat`` if it names a supported version, else raise ValueError."""
    if compat is not None and compat not in VERSIONS:
        raise ValueError(f"compat must be None or one of {', '.join(map(repr, VERSIONS))}, not {compat!r}.")
    return compat


class PostCounter:
    """Counts the tasks a controller accepted in this process: upstream's ``taskCounter``."""

    def __init__(self) -> None:
        # Guards _count: POSTs arrive on several request threads.
        self._lock = threading.Lock()
        self._count = 0

    def add(self, n: int = 1) -> int:
        """Count ``n`` more tasks; return the new total."""
        with self._lock:
            self._count += n
            return self._count


def _unknown(uuid: Any) -> Reply:
    return Reply({"msg": f"No process linked to this uuid {uuid}."})


def _invalid(kwargs: Mapping[str, Any]) -> Reply:
    return Reply({"msg": f"Invalid request: {dict(kwargs)}"})


def _is_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid_module.UUID(value)
    except ValueError:
        return False
    return True


def _accepted(controller_name: str, task: Mapping[str, Any], params: Mapping[str, Any], counter: int) -> dict[str, Any]:
    return {"msg": f"Internal UUID {task['uuid']} for {controller_name} task put in the queue.",
            "uuid": task["uuid"], "requestParams": str(dict(params)), "taskCounter": str(counter)}


def post_reply(controller_name: str, items: Sequence[Mapping[str, Any]], bulk: bool, reply: Reply,
               counter: PostCounter) -> Reply:
    """Upstream's answer to a POST that queued ``items`` (``reply`` is this version's answer)."""
    tasks = reply["tasks"] if bulk else [reply]
    last = counter.add(len(tasks))
    first = last - len(tasks) + 1
    shaped = [_accepted(controller_name, task, params, first + i)
              for i, (task, params) in enumerate(zip(tasks, items))]
    if bulk:
        return Reply({"msg": f"{len(shaped)} {controller_name} tasks put in the queue.", "tasks": shaped},
                     200, reply.headers)
    return Reply(shaped[0], 200, reply.headers)


def get_reply(kwargs: Mapping[str, Any], answer: Callable[[], Reply]) -> Reply:
    """Upstream's answer to a GET; ``answer`` gives this version's (it may raise TaskNotFound)."""
    uuid = kwargs.get("uuid")
    if uuid is None:
        return _invalid(kwargs)
    if not _is_uuid(uuid):
        return _unknown(uuid)
    try:
        task = answer()
    except TaskNotFound:
        return _unknown(uuid)
    if task["status"] in TERMINAL:
        return Reply({"msg": _unknown(uuid)["msg"], "status": task["status"]})
    progress = task.get("progress")
    msg = task["msg"] if task["status"] == "queued" else f"Process is running with uuid {uuid}."
    return Reply({"msg": msg, "progressNum": str(0 if progress is None else progress), "status": task["status"]})


def delete_reply(kwargs: Mapping[str, Any], answer: Callable[[], Reply]) -> Reply:
    """Upstream's answer to a DELETE; ``answer`` gives this version's (it may raise)."""
    uuid = kwargs.get("uuid")
    if uuid is None:
        return _invalid(kwargs)
    if not _is_uuid(uuid):
        return _unknown(uuid)
    try:
        task = answer()
    except TaskNotFound:
        return _unknown(uuid)
    except TaskAlreadyFinished as exc:
        return Reply({"msg": _unknown(uuid)["msg"], "status": exc.status})
    return Reply({"msg": f"Stop signal sent to this uuid {uuid}.", "status": task["status"]})


def error_body(body: dict[str, Any]) -> dict[str, Any]:
    """An error body with upstream's ``msg`` next to ``message``."""
    return {**body, "msg": body.get("message")}
