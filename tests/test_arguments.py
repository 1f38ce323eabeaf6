"""The argument check and the request schema come from one description of ``execute``: the check
accepts exactly the JSON objects the schema declares valid (integral floats aside, see below).
"""
from __future__ import annotations

import itertools
from typing import Any, Literal, Optional, Union

import jsonschema
import pytest

from flask_multiprocess_controller import InvalidArguments, MetaMPTask
from flask_multiprocess_controller.http.arguments import ArgType, ArgumentSpec, arg_type


class Solve(MetaMPTask):
    def execute(self, size: int, method: Literal["fast", "exact"] = "fast", tolerance: Optional[float] = None,
                name: str = "", verbose: bool = False, seeds: list = [], options: dict = {},  # noqa: B006
                anything: Any = None, either: Union[int, str] = 0, mode: Optional[Literal[1, 2]] = None,
                flag: Literal[True, "auto"] = "auto", count: Union[int, Literal["all"]] = "all") -> dict:
        return {}


class Open(MetaMPTask):
    def execute(self, n: int = 0, **rest: Any) -> None:
        return None


class PositionalOnly(MetaMPTask):
    def execute(self, a: int, /, b: int = 0) -> None:
        return None


class Untyped(MetaMPTask):
    def execute(self, a, b=1, *, c: "Unresolvable" = None) -> None:  # noqa: F821 - unresolvable on purpose
        return None


#: JSON values of every kind (1.0 aside: see test_integral_floats_are_not_integers).
VALUES = [None, True, False, 0, 1, 2, -7, 2.5, "", "fast", "exact", "x", [], [1], {}, {"a": 1}]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("task", [Solve, Open, Untyped, PositionalOnly])
def test_the_check_accepts_exactly_what_the_schema_declares(task):
    spec = ArgumentSpec(task.execute)
    validator = jsonschema.Draft202012Validator(spec.schema())
    names = sorted(p.name for p in spec.params) + ["unknown"]
    bodies = [{}]
    for name, value in itertools.product(names, VALUES):
        bodies.append({name: value})
        bodies.append({"size": 3, name: value})
    for body in bodies:
        try:
            spec.check(dict(body))
            accepted = True
        except InvalidArguments:
            accepted = False
        assert accepted == validator.is_valid(body), (task.__name__, body, accepted)


@pytest.mark.timeout(30)
def test_integral_floats_are_not_integers():
    """JSON Schema counts 1.0 as an integer; the check does not, so that ``execute`` gets an ``int``."""
    spec = ArgumentSpec(Solve.execute)
    with pytest.raises(InvalidArguments, match="must be an integer"):
        spec.check({"size": 1.0})


@pytest.mark.timeout(30)
def test_literal_over_http(make_client):
    client, _ = make_client(Solve)
    bad = client.post("/tasks", json={"size": 2, "method": "slow"})
    assert bad.status_code == 400
    assert "'method' must be one of \"fast\", \"exact\"" in bad.get_json()["message"]
    assert client.post("/tasks", json={"size": 2, "method": "exact", "mode": 2}).status_code == 202
    assert client.post("/tasks", json={"size": 2, "mode": True}).status_code == 400


@pytest.mark.timeout(30)
@pytest.mark.parametrize("annotation, schema", [
    (int, {"type": "integer"}),
    (Optional[str], {"type": ["string", "null"]}),
    (Union[int, float, None], {"type": ["integer", "number", "null"]}),
    (Literal["a", "b"], {"enum": ["a", "b"]}),
    (Optional[Literal["a"]], {"enum": ["a", None]}),
    (Literal[1, True], {"enum": [1, True]}),
    (Union[int, Literal["all"]], {"anyOf": [{"type": "integer"}, {"enum": ["all"]}]}),
    (list[int], {"type": "array"}),
    (dict[str, Any], {"type": "object"}),
    (None, {"type": "null"}),
])
def test_annotation_schemas(annotation, schema):
    described = arg_type(annotation)
    assert isinstance(described, ArgType)
    assert described.schema() == schema


@pytest.mark.timeout(30)
@pytest.mark.parametrize("annotation", [Any, object, Union[int, Any], Literal[b"x"], "Unresolved"])
def test_other_annotations_leave_the_value_unchecked(annotation):
    assert arg_type(annotation) is None


@pytest.mark.timeout(30)
def test_defaults_that_do_not_fit_are_left_out_of_the_schema():
    class Odd(MetaMPTask):
        def execute(self, a: int = None, b: float = float("nan"), c: tuple = (1, 2)) -> None:  # noqa: RUF013
            return None

    props = ArgumentSpec(Odd.execute).schema()["properties"]
    assert props == {"a": {"type": "integer"}, "b": {"type": "number"}, "c": {"default": [1, 2]}}
