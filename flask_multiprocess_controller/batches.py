"""Batches: the tasks of one bulk submission, named by one id and waited for together.

A bulk POST (a JSON array) or :meth:`~.controller.MetaMPController.submit_many` stores every
task it queues with a new batch id; ``GET <collection>?batch=<id>&wait=S`` (or
:meth:`~.controller.MetaMPController.wait_batch`) answers once all of them have ended. The id
travels instead of a list of uuids, which would not fit a request line (gunicorn reads at most
4 KiB of one).
"""
from __future__ import annotations

import re
import uuid as uuid_module
from typing import Any, NamedTuple, TypedDict

from .exceptions import InvalidRequest
from .presenter import TaskObject

_BATCH_ID = re.compile(r"[0-9a-f]{32}")


class Batch(NamedTuple):
    """What a bulk submission returns: the batch id and its tasks' objects, in input order."""

    id: str
    tasks: list[TaskObject]

    @property
    def uuids(self) -> list[str]:
        """The tasks' uuids, in input order."""
        return [task["uuid"] for task in self.tasks]


class BatchView(TypedDict):
    """The state of a batch: how many of its tasks there are, how many have ended, and the tasks."""

    batch: str
    total: int
    ended: int
    #: In input order.
    tasks: list[TaskObject]


def new_batch_id() -> str:
    """A fresh batch id: 32 lowercase hex digits (a uuid4)."""
    return uuid_module.uuid4().hex


def parse_batch_id(value: Any) -> str:
    """The canonical form of a batch id (lowercase hex, a uuid's dashes dropped); else :class:`InvalidRequest`."""
    if isinstance(value, str):
        text = value.strip().lower().replace("-", "")
        if _BATCH_ID.fullmatch(text):
            return text
    shown = value[:80] if isinstance(value, str) else type(value).__name__
    raise InvalidRequest(f"{shown!r} is not a batch id (32 hexadecimal digits, as a bulk POST answers).")
