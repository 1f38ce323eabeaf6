"""Checks of JSON values made by callers: how deep they nest, whether they hold NaN or Infinity, and
whether they are JSON at all; and short excerpts of such values for error messages.

One walk, shared by every way in: HTTP bodies (:mod:`.http.body`), the Python API and schedules
(:mod:`.submission`), and a task's ``upload_status()`` (:mod:`.engine.child`). The walk is iterative,
so a value nested far deeper than Python's recursion limit is refused instead of crashing whatever
reads it next (a JSON encoder, pickle, SQLite's JSON functions).

.. versionadded:: 0.3
"""
from __future__ import annotations

import math
from typing import Any, Optional

#: Types a JSON scalar may have.
_SCALARS = (str, int, bool, type(None))
#: Types of the keys JSON encoders accept (they are written as strings).
_KEYS = (str, int, float, bool, type(None))


def excerpt(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters: what an error message may quote of a caller's value.

    A message never echoes a whole body: a 30 MB string would come back in the 400 otherwise.
    """
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + "…"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def json_problem(value: Any, max_depth: int) -> Optional[str]:
    """What makes ``value`` unfit to store as JSON, as the end of a sentence; None when it is fit.

    Unfit: lists and objects nested more than ``max_depth`` levels (a scalar is level 0, ``[1]`` level 1),
    NaN or Infinity (JSON has no words for them; Python's encoder would write them anyway), and values
    of other types than str, int, float, bool, None, list, tuple and dict (or dict keys JSON cannot name).
    """
    level = [value]
    depth = 0
    while level:
        below: list[Any] = []
        containers = False
        for item in level:
            if isinstance(item, float):
                if not math.isfinite(item):
                    return f"holds {item!r}, which is not a JSON number"
            elif isinstance(item, dict):
                if not all(isinstance(key, _KEYS) for key in item):
                    return "has an object key that is not a string"
                containers = True
                below.extend(item.values())
            elif isinstance(item, (list, tuple)):
                containers = True
                below.extend(item)
            elif not isinstance(item, _SCALARS):
                return f"holds a {type(item).__name__}, which is not a JSON value"
        if containers:
            depth += 1
            if depth > max_depth:
                return f"nests deeper than {max_depth} levels"
        level = [item for item in below if not isinstance(item, _SCALARS)]
    return None


def too_deep(value: Any, max_depth: int) -> bool:
    """Whether lists and objects (tuples too) in ``value`` nest more than ``max_depth`` levels (a scalar is
    level 0), looked at level by level: any depth is safe to ask about."""
    level = [value]
    depth = 0
    while level:
        below = [child for item in level if isinstance(item, (dict, list, tuple))
                 for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, (dict, list, tuple))]
        if any(isinstance(item, (dict, list, tuple)) for item in level):
            depth += 1
            if depth > max_depth:
                return True
        level = below
    return False
