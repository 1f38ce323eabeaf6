"""Task states: the exact strings of the HTTP contract."""
from __future__ import annotations

import enum


class TaskStatus(str, enum.Enum):
    """Where a task is in its life.

    ``queued`` → ``running`` → one of the terminal states; ``running`` →
    ``stopping`` → ``stopped`` on a stop request; ``queued`` → ``stopped`` when a
    queued task is stopped before it ever ran; ``running`` ⇄ ``paused`` when its process
    tree is suspended and resumed (a paused task keeps its slot, and can be stopped);
    a failed attempt with retries left goes back to ``queued``.

    .. versionchanged:: 0.3
        ``paused``.
    """

    QUEUED = "queued"
    RUNNING = "running"
    STOPPING = "stopping"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    TIMED_OUT = "timed_out"
    LOST = "lost"

    def __str__(self) -> str:
        return self.value


# The sets below hold members of a str Enum, so they answer for plain strings too
# (``"running" in ACTIVE``): stores and presenters test raw status strings against them.

#: States a task never leaves.
TERMINAL = frozenset(
    {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.STOPPED, TaskStatus.TIMED_OUT, TaskStatus.LOST}
)

#: States in which a task holds one of the controller's process slots.
ACTIVE = frozenset({TaskStatus.RUNNING, TaskStatus.STOPPING, TaskStatus.PAUSED})

ALL_STATUSES = tuple(s.value for s in TaskStatus)
