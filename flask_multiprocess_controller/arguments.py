"""Checking request arguments against ``execute``'s signature before anything is queued."""
from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Optional

from .exceptions import InvalidArguments

_BASIC = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
          dict: "an object"}


def _basic_type(annotation: Any) -> tuple[Optional[type], bool]:
    """Return (the basic type an annotation asks for, whether null is allowed); (None, _) if not basic."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(members) < len(typing.get_args(annotation))
        if len(members) == 1:
            basic, _ = _basic_type(members[0])
            return basic, nullable
        return None, nullable
    if origin in (list, dict):
        return origin, False
    if annotation in _BASIC:
        return annotation, False
    return None, False


def _fits(value: Any, basic: type) -> bool:
    if basic is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if basic is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, basic)


def check_depth(value: Any, limit: int) -> None:
    """Raise :class:`InvalidArguments` if ``value`` nests lists and objects deeper than ``limit`` levels.

    Deep nesting costs every reader a recursion per level (JSON encoders, SQLite's JSON
    handling), so it is refused before anything is stored.
    """
    level = [value]
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            raise InvalidArguments(f"Arguments nest deeper than {limit} levels.")
        level = [child for item in level for child in _children(item)]


def _children(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, (dict, list))]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, (dict, list))]
    return []


class ArgumentSpec:
    """What keyword arguments a task's ``execute`` accepts."""

    def __init__(self, execute: Callable[..., Any]) -> None:
        signature = inspect.signature(execute)
        params = list(signature.parameters.values())[1:]  # drop self
        self._signature = signature.replace(parameters=params)
        self.names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        try:
            hints = typing.get_type_hints(execute)
        except Exception:  # unresolvable annotations: check names only
            hints = {}
        self._types = {}
        for name in self.names:
            if name in hints:
                basic, nullable = _basic_type(hints[name])
                if basic is not None:
                    self._types[name] = (basic, nullable)

    def check(self, kwargs: dict[str, Any]) -> None:
        """Raise :class:`InvalidArguments` unless ``execute(**kwargs)`` would bind and fit the basic annotations."""
        try:
            self._signature.bind(**kwargs)
        except TypeError as exc:
            raise InvalidArguments(f"Arguments do not fit execute{self._signature}: {exc}.") from None
        for name, value in kwargs.items():
            if name in self._types:
                basic, nullable = self._types[name]
                if value is None and nullable:
                    continue
                if not _fits(value, basic):
                    raise InvalidArguments(
                        f"Argument '{name}' must be {_BASIC[basic]}, not {type(value).__name__} {value!r:.60}.")
