"""What a PATCH of a task asks for: a new status (paused or running again) or a new priority.

The body is checked whole before anything changes: exactly one of ``status`` and ``priority``,
with a value that applies, else :class:`~.exceptions.InvalidRequest` (400) saying what to send.
Whether the change applies to the task as it is now is the store's call (409 otherwise).

.. versionadded:: 0.3
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..exceptions import InvalidRequest
from ..jsonvalues import excerpt
from ..states import TaskStatus

#: The priorities a task may have (what fits every store's integers).
PRIORITY_LIMIT = 2 ** 62
#: What ``{"status": ...}`` may ask for.
PATCH_STATUSES = (TaskStatus.PAUSED.value, TaskStatus.RUNNING.value)
_USAGE = 'Send {"status": "paused"}, {"status": "running"} or {"priority": <integer>}.'


@dataclass(frozen=True)
class TaskChange:
    """One change of a task: either ``status`` or ``priority`` is set."""

    status: Optional[str] = None
    priority: Optional[int] = None


def check_priority(value: Any) -> int:
    """``value`` as a priority, or :class:`InvalidRequest`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"'priority' must be an integer, not {excerpt(value)}.")
    if not -PRIORITY_LIMIT <= value <= PRIORITY_LIMIT:
        raise InvalidRequest(f"'priority' must be between {-PRIORITY_LIMIT} and {PRIORITY_LIMIT}.")
    return value


def parse_change(body: Mapping[str, Any]) -> TaskChange:
    """The change a PATCH body asks for (its ``uuid``, if any, is not part of it)."""
    keys = set(body) - {"uuid"}
    unknown = keys - {"status", "priority"}
    if unknown:
        raise InvalidRequest(f"PATCH cannot change {', '.join(sorted(excerpt(k) for k in unknown)[:5])}. {_USAGE}")
    if len(keys) != 1:
        raise InvalidRequest(f"PATCH changes one thing at a time. {_USAGE}")
    if "priority" in keys:
        return TaskChange(priority=check_priority(body["priority"]))
    status = body["status"]
    if status not in PATCH_STATUSES or not isinstance(status, str):
        raise InvalidRequest(f"'status' can be set to 'paused' or 'running', not {excerpt(status)}.")
    return TaskChange(status=status)
