"""Task rows for a submission: each item checked against ``execute``'s signature, stamped and numbered."""
from __future__ import annotations

import math
import time
import uuid as uuid_module
from typing import Any, Mapping, Optional, Sequence

from . import defaults
from .exceptions import InvalidRequest
from .http.arguments import ArgumentSpec, check_values
from .jsonvalues import excerpt
from .states import TaskStatus
from .store.base import Row


def new_rows(spec: ArgumentSpec, controller: str, items: Sequence[Mapping[str, Any]], priority: int,
             timeout: Optional[float], tenant: Optional[str], batch: Optional[str]) -> list[Row]:
    """The queued rows of ``items`` (keyword arguments of ``execute``), all checked before any is made.

    A ``priority`` key in an item is taken as that task's priority unless ``execute`` has a parameter
    of that name (seed compatibility).

    :raises InvalidRequest: an item is not a mapping, or its priority is not an integer in range.
    :raises InvalidArguments: an item does not fit ``execute``, or a value is not JSON (NaN and Infinity
        included) or nests too deep.
    """
    now = time.time()
    rows: list[Row] = []
    for item in items:
        if not isinstance(item, Mapping):
            raise InvalidRequest(f"Each task must be a JSON object of keyword arguments, not {type(item).__name__}.")
        args = dict(item)
        task_priority = priority
        if "priority" in args and "priority" not in spec.names:
            task_priority = args.pop("priority")
            if not isinstance(task_priority, int) or isinstance(task_priority, bool):
                raise InvalidRequest(f"'priority' must be an integer, not {excerpt(task_priority)}.")
        if not -(2 ** 62) <= task_priority <= 2 ** 62:
            raise InvalidRequest(f"'priority' must be between {-(2 ** 62)} and {2 ** 62}.")
        check_values(args, defaults.MAX_ARGS_DEPTH)
        spec.check(args)
        rows.append({
            "tenant": tenant,
            "uuid": str(uuid_module.uuid4()), "controller": controller, "status": TaskStatus.QUEUED.value,
            "priority": task_priority, "args": args, "created_at": now, "timeout": timeout,
            "attempt": 0, "stop_requested": False, "batch": batch,
        })
    return rows


def effective_timeout(limit: Optional[float], requested: Optional[float]) -> Optional[float]:
    """The timeout of a task: the one requested, which may only lower the controller's ``limit``."""
    if requested is None:
        return limit
    if (isinstance(requested, bool) or not isinstance(requested, (int, float)) or not math.isfinite(requested)
            or not 0 < requested <= defaults.MAX_SECONDS):
        raise InvalidRequest(f"'timeout' must be a positive number of seconds, at most {defaults.MAX_SECONDS:g}.")
    return requested if limit is None else min(requested, limit)
