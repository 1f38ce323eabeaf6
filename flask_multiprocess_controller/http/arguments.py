"""Checking request arguments against ``execute``'s signature before anything is queued.

The check and the OpenAPI document (:mod:`.openapi`) read the same description of
``execute``: an :class:`ArgType` per annotated parameter, built once by
:class:`ArgumentSpec`. :meth:`ArgType.accepts` is what the check enforces and
:meth:`ArgType.schema` is what the document declares, so a client that follows the
document is never refused by the check, and the check refuses what the document rules out.

Annotations understood: ``int``, ``float``, ``str``, ``bool``, ``list``, ``dict``
(``list[...]``, ``dict[...]`` count as ``list``, ``dict``: their items are not checked),
``Literal[...]`` of strings, integers, booleans and None, and ``Optional``/``Union`` of
these. Any other annotation (``Any``, a class, a ``Union`` with one) leaves the argument
unchecked, and the document declares it as any JSON value.

JSON values keep their Python type: ``1`` is an integer, ``1.0`` a number that is not an
integer (JSON Schema would count ``1.0`` as an integer too; the check does not, so that
``execute`` gets the type its annotation promised). A ``bool`` is not an integer; an
integer is a fine ``float``.
"""
from __future__ import annotations

import inspect
import json
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

from ..exceptions import InvalidArguments
from ..jsonvalues import excerpt, json_problem

#: JSON Schema type of each basic annotation.
JSON_TYPES: dict[type, str] = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array",
                               dict: "object"}

_DESCRIPTIONS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
                 dict: "an object"}

#: Types a ``Literal`` value may have to be checked (and declared as a JSON Schema ``enum``).
_LITERAL_TYPES = (str, int, bool, type(None))

_NO_DEFAULT = object()


@dataclass(frozen=True)
class ArgType:
    """What one argument may be: values of some basic types, some ``Literal`` values, and/or null.

    .. versionadded:: 0.3
    """

    #: Basic types (keys of :data:`JSON_TYPES`) whose values fit.
    types: tuple[type, ...] = ()
    #: ``Literal`` values that fit (str, int or bool; null is :attr:`nullable`).
    choices: tuple[Any, ...] = ()
    #: Whether null fits.
    nullable: bool = False

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` (a decoded JSON value) fits."""
        if value is None:
            return self.nullable
        return any(_fits(value, basic) for basic in self.types) or any(_same(value, c) for c in self.choices)

    def schema(self) -> dict[str, Any]:
        """The JSON Schema (2020-12) of the values that fit."""
        names = [JSON_TYPES[basic] for basic in self.types]
        if not self.choices:
            if self.nullable:
                names.append("null")
            return {"type": names[0] if len(names) == 1 else names}
        enum = [*self.choices, *([None] if self.nullable else [])]
        if not names:
            return {"enum": enum}
        return {"anyOf": [{"type": names[0] if len(names) == 1 else names}, {"enum": enum}]}

    def describe(self) -> str:
        """The values that fit, in words, for error messages."""
        parts = [_DESCRIPTIONS[basic] for basic in self.types]
        if self.choices:
            parts.append("one of " + ", ".join(json.dumps(c) for c in self.choices))
        if self.nullable:
            parts.append("null")
        return " or ".join(parts)


def arg_type(annotation: Any) -> Optional[ArgType]:
    """The :class:`ArgType` an annotation asks for; None when it leaves the value unchecked.

    .. versionadded:: 0.3
    """
    if annotation is None or annotation is type(None):
        return ArgType(nullable=True)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return _union([arg_type(member) for member in typing.get_args(annotation)])
    if origin is typing.Literal:
        return _literal(typing.get_args(annotation))
    if origin in (list, dict):
        return ArgType(types=(origin,))
    if annotation in JSON_TYPES:
        return ArgType(types=(annotation,))
    return None


def _union(members: list[Optional[ArgType]]) -> Optional[ArgType]:
    known = [m for m in members if m is not None]
    if len(known) < len(members):
        return None  # one unchecked member leaves the whole union unchecked
    types = tuple(dict.fromkeys(t for m in known for t in m.types))
    return ArgType(types=types, choices=_distinct(c for m in known for c in m.choices),
                   nullable=any(m.nullable for m in known))


def _literal(values: tuple[Any, ...]) -> Optional[ArgType]:
    if not all(type(value) in _LITERAL_TYPES for value in values):
        return None  # an Enum member or bytes has no JSON spelling the check could compare with
    return ArgType(choices=_distinct(v for v in values if v is not None), nullable=None in values)


def _distinct(values: Iterable[Any]) -> tuple[Any, ...]:
    """``values`` without repeats, in order (``1`` and ``True`` are distinct, as :func:`_same` says)."""
    kept: list[Any] = []
    for value in values:
        if not any(_same(value, seen) for seen in kept):
            kept.append(value)
    return tuple(kept)


def _fits(value: Any, basic: type) -> bool:
    if basic is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if basic is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, basic)


def _same(value: Any, choice: Any) -> bool:
    """Whether a JSON value equals a ``Literal`` value, type included: ``True`` is not ``1``, ``1.0`` not ``1``."""
    return type(value) is type(choice) and value == choice


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


def check_values(kwargs: Mapping[str, Any], limit: int) -> None:
    """Raise :class:`InvalidArguments`, naming the argument, unless every value of ``kwargs`` is JSON that
    nests at most ``limit`` levels with the mapping itself (no NaN or Infinity, no other types).

    What the Python API, bulk submits and schedules are checked with; an HTTP body is JSON already,
    read without NaN by :mod:`.body`.
    """
    for name, value in kwargs.items():
        problem = json_problem(value, limit - 1)
        if problem is not None:
            raise InvalidArguments(f"Argument {excerpt(name)} {problem}.")


def _children(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, (dict, list))]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, (dict, list))]
    return []


@dataclass(frozen=True)
class Param:
    """One keyword argument ``execute`` takes.

    .. versionadded:: 0.3
    """

    name: str
    #: What values fit; None: any JSON value.
    type: Optional[ArgType]
    #: Whether a request must give it (it has no default).
    required: bool
    #: Its default value, when it has one that fits its type and is JSON.
    default: Any = _NO_DEFAULT

    @property
    def has_default(self) -> bool:
        return self.default is not _NO_DEFAULT


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
        #: The keyword arguments, in the signature's order.
        self.params: tuple[Param, ...] = tuple(
            _param(p, arg_type(hints[p.name]) if p.name in hints else None)
            for p in params if p.name in self.names)
        #: Whether ``execute`` takes ``**kwargs``: then any other name is accepted too, unchecked.
        self.open = any(p.kind is p.VAR_KEYWORD for p in params)
        #: Whether no request can call ``execute``: it has positional-only parameters without defaults.
        self.uncallable = any(p.kind is p.POSITIONAL_ONLY and p.default is p.empty for p in params)
        #: Whether binding can refuse what the name checks accept: only with positional-only parameters.
        self._bind = any(p.kind is p.POSITIONAL_ONLY for p in params)
        self._types = {p.name: p.type for p in self.params if p.type is not None}

    def check(self, kwargs: dict[str, Any]) -> None:
        """Raise :class:`InvalidArguments` unless ``execute(**kwargs)`` would bind and fit the annotations.

        The message names the argument at fault and what it must be, never ``execute``'s whole
        signature: its defaults are the task's business, not every client's.
        """
        if not self.open:
            unknown = [name for name in kwargs if name not in self.names]
            if unknown:
                known = ", ".join(p.name for p in self.params) or "none"
                raise InvalidArguments(f"Unknown argument {excerpt(unknown[0])}: execute() takes {known}.")
        missing = [p for p in self.params if p.required and p.name not in kwargs]
        if missing:
            what = f" ({missing[0].type.describe()})" if missing[0].type is not None else ""
            raise InvalidArguments(f"Argument '{missing[0].name}'{what} is required.")
        try:
            if self._bind:
                self._signature.bind(**kwargs)
        except TypeError as exc:  # what the checks above do not cover: positional-only parameters
            raise InvalidArguments(f"Arguments do not fit execute(): {exc}.") from None
        for name, value in kwargs.items():
            expected = self._types.get(name)
            if expected is not None and not expected.accepts(value):
                raise InvalidArguments(
                    f"Argument '{name}' must be {expected.describe()}, not {type(value).__name__} {excerpt(value)}.")

    def schema(self) -> dict[str, Any]:
        """The JSON Schema (2020-12) of the JSON objects :meth:`check` accepts.

        .. versionadded:: 0.3
        """
        if self.uncallable:
            return {"not": {}, "description": "execute has positional-only parameters without defaults."}
        properties: dict[str, Any] = {}
        for param in self.params:
            prop = param.type.schema() if param.type is not None else {}
            if param.has_default:
                prop["default"] = param.default
            properties[param.name] = prop
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        required = [p.name for p in self.params if p.required]
        if required:
            schema["required"] = required
        if self.open:
            # The resource refuses 'self' as a name, whatever else **kwargs takes.
            schema["propertyNames"] = {"not": {"const": "self"}}
        else:
            schema["additionalProperties"] = False
        return schema


def _param(parameter: inspect.Parameter, expected: Optional[ArgType]) -> Param:
    """The :class:`Param` of a keyword parameter; its default is kept (as JSON) only when it is JSON that fits."""
    if parameter.default is parameter.empty:
        return Param(parameter.name, expected, required=True)
    try:
        default = json.loads(json.dumps(parameter.default, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        return Param(parameter.name, expected, required=False)
    if expected is not None and not expected.accepts(parameter.default):
        return Param(parameter.name, expected, required=False)
    return Param(parameter.name, expected, required=False, default=default)
