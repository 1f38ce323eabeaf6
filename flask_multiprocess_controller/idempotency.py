"""Submissions that may be sent twice: the ``Idempotency-Key`` of a POST, and the Python API behind it.

A client whose POST got no answer (the connection broke, a proxy timed out, a gateway said 502) cannot
know whether the task was queued. Sending the same request again with the same key is safe: the store
records the key with the tasks it made, in the same atomic step as the insert (see
:meth:`~.store.base.TaskStore.enqueue`), so a repeat within ``idempotency_ttl`` finds them and makes
none, whichever serving process or host each of the two requests reached.

A key is scoped to its controller and to the tenant the tasks are stamped with, so two controllers (or
two tenants) may use the same key without meeting. What was submitted (the arguments, and the ``priority``
and ``timeout`` options; not ``wait``, which changes only how long the answer takes) is kept as a digest:
the same key with something else is a client's mistake, answered 422.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, NamedTuple, Optional, Sequence

from .exceptions import InvalidRequest
from .store.base import Row

#: The HTTP header that carries the key.
HEADER = "Idempotency-Key"
#: Characters a key may have at most.
MAX_KEY_LENGTH = 255


class Submitted(NamedTuple):
    """What :meth:`~.controller.MetaMPController.enqueue_once` did."""

    #: The tasks of the submission, in input order: queued now, or by the first submission with the key.
    rows: list[Row]
    #: True when the key had been used already and nothing was queued now.
    replayed: bool


def check_key(key: Any) -> str:
    """The key as given, when it is 1 to :data:`MAX_KEY_LENGTH` printable ASCII characters; else
    :class:`InvalidRequest` (400)."""
    if not isinstance(key, str):
        raise InvalidRequest(f"An {HEADER} must be a string, not {type(key).__name__}.")
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise InvalidRequest(f"An {HEADER} must have 1 to {MAX_KEY_LENGTH} characters, not {len(key)}.")
    if not all(" " <= char <= "~" for char in key):
        raise InvalidRequest(f"An {HEADER} may only hold printable ASCII characters, not {key[:40]!r}.")
    return key


def scoped_key(controller: str, tenant: Optional[str], key: str) -> str:
    """The store's name of ``key`` sent to ``controller`` by ``tenant``: a digest of fixed length, so that
    keys of different scopes never collide and every store can index it."""
    return hashlib.sha256(json.dumps([controller, tenant, key]).encode()).hexdigest()


def fingerprint(items: Sequence[Mapping[str, Any]], bulk: bool, priority: int, timeout: Optional[float]) -> str:
    """A digest of a submission: its items (keyword arguments, in key order), whether it was a bulk one,
    and its ``priority`` and ``timeout`` options."""
    submitted = {"items": [dict(item) for item in items], "bulk": bool(bulk), "priority": priority,
                 "timeout": timeout}
    text = json.dumps(submitted, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()
