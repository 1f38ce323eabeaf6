"""The fields of a stored task, declared once.

Each :class:`Field` says what one column of a task is: its name, the Python type of its value,
whether it may be None, how the stores encode it (:class:`Encoding`), whether events and list
views leave it out, whether :meth:`~.base.TaskStore.finish` may set it, and how the task object
shows it. The stores derive from :data:`FIELDS` what they need (the column order, the SQLite
table and the columns added to it since its first release, the Redis encodings, the columns an
event leaves out), so a field is added here once.

What cannot be derived (the typed view :class:`~.base.Row`, the task object of
:mod:`..presenter`, the OpenAPI task schema) is checked against :data:`FIELDS` by the tests
(``tests/test_schema.py``), which name the place a new field is still missing from.
"""
from __future__ import annotations

import functools

import enum
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    "Encoding", "Shown", "Field", "FIELDS", "COLUMNS", "EVENT_HIDDEN", "MUTABLE_FIELDS", "ADDED",
    "columns_encoded", "EVENT_BASE", "EVENT_EXCLUDED", "WHOLE_EVENT_KINDS", "EVENT_TOUCHED", "event_columns",
]


class Encoding(str, enum.Enum):
    """How a store writes a field's value (None is always absent: SQL NULL, a missing hash field)."""

    #: ``json.dumps`` text: any JSON value.
    JSON = "json"
    #: A float (SQLite ``REAL``; Redis ``repr(float)``).
    REAL = "real"
    #: An int (SQLite ``INTEGER``; Redis decimal text).
    INTEGER = "integer"
    #: A str as it is.
    TEXT = "text"
    #: A bool (SQLite ``INTEGER`` 0/1; Redis ``"0"``/``"1"``, absent meaning False).
    BOOLEAN = "boolean"

    def __str__(self) -> str:
        return self.value


class Shown(str, enum.Enum):
    """How the task object (:func:`..presenter.present`) shows a field."""

    #: Not at all: internal to the stores and the serving processes.
    NO = "no"
    #: As stored.
    VALUE = "value"
    #: A UNIX time shown as ISO 8601 in UTC.
    TIME = "time"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Field:
    """One column of a stored task."""

    name: str
    #: The Python type of a value that is not None, as :class:`~.base.Row` annotates it (``Any``: any JSON value).
    type: Any
    #: Whether the value may be None (always so for ``Any``).
    nullable: bool
    encoding: Encoding
    shown: Shown = Shown.VALUE
    #: Events and list views leave it out (it may be large and is shown nowhere).
    hidden: bool = False
    #: :meth:`~.base.TaskStore.finish` (and the other writes taking ``fields``) may set it.
    mutable: bool = False
    #: The value SQLite fills in when an insert gives none.
    default: Optional[int] = None
    #: The insertion order: SQLite's ``INTEGER PRIMARY KEY AUTOINCREMENT``.
    primary_key: bool = False
    #: No two tasks share a value.
    unique: bool = False
    #: Added after the store's first release: an older SQLite file gets the column by ``ALTER TABLE``.
    added: bool = False


_J, _R, _I, _T, _B = Encoding.JSON, Encoding.REAL, Encoding.INTEGER, Encoding.TEXT, Encoding.BOOLEAN
_NO, _TIME = Shown.NO, Shown.TIME

#: Every field of a task, in storage order.
FIELDS: tuple[Field, ...] = (
    Field("seq", int, False, _I, shown=_NO, primary_key=True),
    Field("uuid", str, False, _T, unique=True),
    Field("controller", str, False, _T),
    Field("status", str, False, _T),
    Field("priority", int, False, _I, default=0),
    Field("args", dict[str, Any], False, _J),
    Field("progress", Any, True, _J, mutable=True),
    Field("percent", float, True, _R, mutable=True),
    Field("result", Any, True, _J, mutable=True),
    Field("error", dict[str, Any], True, _J, mutable=True),
    Field("created_at", float, False, _R, shown=_TIME),
    Field("started_at", float, True, _R, shown=_TIME, mutable=True),
    Field("ended_at", float, True, _R, shown=_TIME, mutable=True),
    Field("pid", int, True, _I, mutable=True),
    Field("pid_created", float, True, _R, shown=_NO, mutable=True),
    Field("exit_code", int, True, _I, mutable=True),
    Field("owner", str, True, _T, shown=_NO),
    Field("stop_requested", bool, False, _B, shown=_NO, default=0),
    Field("timeout", float, True, _R),
    Field("memory_peak", int, True, _I, mutable=True),
    Field("cpu_time", float, True, _R, mutable=True),
    Field("attempt", int, False, _I, default=0),
    Field("retry_at", float, True, _R, shown=_TIME, added=True),
    Field("errors", list[dict[str, Any]], True, _J, mutable=True, added=True),
    Field("schedule", dict[str, Any], True, _J, added=True),
    Field("tenant", str, True, _T, shown=_NO, added=True),
    Field("batch", str, True, _T, added=True),
    Field("state", Any, True, _J, shown=_NO, hidden=True, added=True),
    Field("state_saved_at", float, True, _R, shown=_TIME, added=True),
    Field("traceparent", str, True, _T, added=True),
    Field("rerun_of", str, True, _T, added=True),
    Field("concurrency_key", str, True, _T, added=True),
    Field("resources", dict[str, Any], True, _J, added=True),
    Field("artifacts", list[dict[str, Any]], True, _J, mutable=True, added=True),
    Field("finish_requested", bool, False, _B, shown=_NO, default=0, added=True),
    Field("stopped_with_result", bool, False, _B, mutable=True, default=0, added=True),
)

#: Every key of a row, in storage order.
COLUMNS: tuple[str, ...] = tuple(field.name for field in FIELDS)

#: Columns of a row that events and list views leave out (a saved state may be large; events are many and
#: copied widely).
EVENT_HIDDEN: frozenset[str] = frozenset(field.name for field in FIELDS if field.hidden)

#: What the task of every event carries, whatever the change: which task, where it stands, which attempt.
EVENT_BASE: tuple[str, ...] = ("seq", "uuid", "controller", "status", "tenant", "attempt", "pid")

#: Columns no event carries: the task's unbounded inputs (its arguments, its saved state). Events are
#: many (a progress write each) and copied widely; whoever needs these reads the task.
EVENT_EXCLUDED: frozenset[str] = frozenset({"args"}) | EVENT_HIDDEN

#: Kinds whose task is the whole row less :data:`EVENT_EXCLUDED`: written once or twice per attempt, and
#: small once the inputs are left out (a result and an error are clipped before they are stored).
WHOLE_EVENT_KINDS: frozenset[str] = frozenset({"queued", "started", "adopted", "ended"})

#: What the task of each other kind carries besides :data:`EVENT_BASE`: what its change touched.
EVENT_TOUCHED: dict[str, tuple[str, ...]] = {
    "progress": ("progress", "percent", "state_saved_at", "memory_peak", "cpu_time"),
    "stopping": ("stop_requested", "finish_requested"),
    "paused": (),
    "resumed": (),
    "requeued": ("priority", "owner", "started_at", "stop_requested", "retry_at", "errors"),
    "purged": (),
}


@functools.lru_cache(maxsize=None)
def event_columns(kind: str) -> tuple[str, ...]:
    """The columns of a task that an event of ``kind`` carries, in storage order (computed once per kind: every
    event written asks)."""
    if kind in WHOLE_EVENT_KINDS:
        return tuple(c for c in COLUMNS if c not in EVENT_EXCLUDED)
    wanted = set(EVENT_BASE) | set(EVENT_TOUCHED[kind])
    return tuple(c for c in COLUMNS if c in wanted)


#: Columns a caller may set with :meth:`~.base.TaskStore.finish`.
MUTABLE_FIELDS: frozenset[str] = frozenset(field.name for field in FIELDS if field.mutable)

#: The fields added after the first release, in storage order.
ADDED: tuple[Field, ...] = tuple(field for field in FIELDS if field.added)


def columns_encoded(encoding: Encoding) -> tuple[str, ...]:
    """The columns a store writes with ``encoding``, in storage order."""
    return tuple(field.name for field in FIELDS if field.encoding is encoding)
