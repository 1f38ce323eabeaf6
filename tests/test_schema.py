"""The task's fields are declared once (store/schema.py); these tests check every place that cannot
derive them from there: the typed view ``Row``, the SQLite table as created, the Redis encodings,
the presenter's task object and the OpenAPI task schema.

A test failing here names the field and the place it is still missing from.
"""
from __future__ import annotations

import json
import sqlite3
import typing
import uuid as uuid_module
from typing import Any, Optional

import pytest
import redis
from flask import Flask

from flask_multiprocess_controller.http.openapi import openapi_document
from flask_multiprocess_controller.presenter import TASK_KEYS, TaskObject, present, present_change
from flask_multiprocess_controller.store import MemoryStore, SQLiteStore
from flask_multiprocess_controller.store.base import Row
from flask_multiprocess_controller.store.redis import RedisStore
from flask_multiprocess_controller.store.schema import (
    ADDED, COLUMNS, EVENT_HIDDEN, FIELDS, Encoding, Field, MUTABLE_FIELDS, Shown,
)

#: Keys of the task object that no stored field gives: the presenter computes them (or the controller reads them).
PRESENTED_ONLY = {"msg", "position", "waiting_on", "waiting_for", "eta", "host", "reruns"}
#: Keys the list view adds to a task object (presenter.clip).
LIST_ONLY = {"truncated"}

#: The Python type of a non-null value of each encoding (None: any JSON value).
ENCODED_TYPES: dict[Encoding, Any] = {Encoding.REAL: float, Encoding.INTEGER: int, Encoding.TEXT: str,
                                      Encoding.BOOLEAN: bool}
#: The JSON Schema type of a value of each Python type.
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def expected_annotation(field: Field) -> Any:
    """What ``Row`` should annotate the field with."""
    if field.type is Any or not field.nullable:
        return field.type
    return Optional[field.type]


def sample(field: Field, n: int = 1) -> Any:
    """A value of the field that is not None (``n`` varies it)."""
    if field.encoding is Encoding.JSON:
        origin = typing.get_origin(field.type) or field.type
        if origin is list:
            return [{"type": "E", "message": f"m{n}", "traceback": None}]
        return {"key": [n, "x", None], "n": n / 4}
    if field.encoding is Encoding.BOOLEAN:
        return True
    if field.encoding is Encoding.REAL:
        return 1_700_000_000.25 + n
    if field.encoding is Encoding.INTEGER:
        return 40 + n
    return f"{field.name}-{n}"


def full_row(n: int = 1) -> dict[str, Any]:
    """A queued task with every field but ``seq`` set to a value that is not None."""
    row = {field.name: sample(field, n) for field in FIELDS if field.name != "seq"}
    row.update(uuid=str(uuid_module.uuid4()), controller="schema", status="queued", priority=n)
    row.update({field.name: False for field in FIELDS if field.encoding is Encoding.BOOLEAN})
    return row


# -- the schema itself ---------------------------------------------------------------------------------


def test_fields_are_consistent() -> None:
    assert len(set(COLUMNS)) == len(COLUMNS), "a field is declared twice"
    for field in FIELDS:
        wanted = ENCODED_TYPES.get(field.encoding)
        if wanted is not None:
            assert field.type is wanted, f"{field.name}: {field.encoding} encodes a {wanted.__name__}"
        if field.type is Any:
            assert field.nullable, f"{field.name}: any JSON value includes null"
        if field.added:
            assert field.nullable or field.default is not None, (
                f"{field.name}: ALTER TABLE can add a NOT NULL column only with a default")
        if field.hidden:
            assert field.shown is Shown.NO, f"{field.name}: a field events leave out is never shown"
        if field.shown is Shown.TIME:
            assert field.encoding is Encoding.REAL, f"{field.name}: a time is a UNIX time"
    assert EVENT_HIDDEN == {"state"}
    assert {"uuid", "controller", "status", "seq", "args", "created_at"} <= set(COLUMNS) - MUTABLE_FIELDS


def test_row_annotates_every_field() -> None:
    hints = typing.get_type_hints(Row)
    assert tuple(hints) == COLUMNS, "Row's keys differ from store/schema.py's FIELDS (names or order)"
    for field in FIELDS:
        assert hints[field.name] == expected_annotation(field), (
            f"Row.{field.name} is {hints[field.name]}, the schema says {expected_annotation(field)}")


# -- SQLite --------------------------------------------------------------------------------------------

_SQL_TYPES = {Encoding.JSON: "TEXT", Encoding.REAL: "REAL", Encoding.INTEGER: "INTEGER", Encoding.TEXT: "TEXT",
              Encoding.BOOLEAN: "INTEGER"}


def _table_info(path: str) -> dict[str, tuple[str, int, Optional[str], int]]:
    with sqlite3.connect(path) as db:
        return {name: (kind, notnull, default, pk)
                for _, name, kind, notnull, default, pk in db.execute("PRAGMA table_info(mpc_tasks)")}


def test_sqlite_table_as_created(tmp_path) -> None:
    path = str(tmp_path / "schema.sqlite3")
    store = SQLiteStore(path)
    try:
        store.list_tasks("schema")  # the first use creates the tables
    finally:
        store.close()
    info = _table_info(path)
    assert tuple(info) == COLUMNS, "mpc_tasks's columns differ from the schema's fields"
    for field in FIELDS:
        kind, notnull, default, pk = info[field.name]
        assert kind == _SQL_TYPES[field.encoding], field.name
        assert bool(pk) == field.primary_key, field.name
        assert bool(notnull) == (not field.nullable and not field.primary_key), field.name
        assert default == (None if field.default is None else str(field.default)), field.name
    with sqlite3.connect(path) as db:
        unique = {db.execute(f"PRAGMA index_info({name!r})").fetchone()[2]
                  for _, name, is_unique, *_ in db.execute("PRAGMA index_list(mpc_tasks)") if is_unique}
        table_sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'mpc_tasks'").fetchone()[0]
    assert unique == {field.name for field in FIELDS if field.unique}
    assert "AUTOINCREMENT" in table_sql


def test_sqlite_file_of_the_first_release_gets_the_added_columns(tmp_path) -> None:
    path = str(tmp_path / "old.sqlite3")
    first = [field for field in FIELDS if not field.added]
    with sqlite3.connect(path) as db:
        columns = ", ".join(f"{field.name} {_SQL_TYPES[field.encoding]}" for field in first)
        db.execute(f"CREATE TABLE mpc_tasks ({columns})")
    store = SQLiteStore(path)
    try:
        store.list_tasks("schema")
    finally:
        store.close()
    info = _table_info(path)
    assert tuple(info) == COLUMNS
    for field in ADDED:
        assert info[field.name][0] == _SQL_TYPES[field.encoding], field.name


# -- every store keeps every field ---------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def any_store(request, tmp_path, redis_server):
    if request.param == "memory":
        made: Any = MemoryStore()
    elif request.param == "sqlite":
        made = SQLiteStore(str(tmp_path / "roundtrip.sqlite3"))
    elif request.param == "postgres":
        from flask_multiprocess_controller.store.postgres import PostgresStore

        made = PostgresStore(request.getfixturevalue("postgres_server").url(),
                             schema=f"schema_{uuid_module.uuid4().hex[:12]}")
    else:
        made = RedisStore(redis_server, prefix=f"schema-{uuid_module.uuid4().hex}:")
    yield made
    made.close()


def test_every_field_round_trips(any_store) -> None:
    row = full_row()
    any_store.enqueue([row], -1)
    got = any_store.get(row["uuid"])
    for field in FIELDS:
        if field.name == "seq":
            assert isinstance(got["seq"], int)
            continue
        assert got[field.name] == row[field.name], f"{field.name} did not come back as it was written"
        assert type(got[field.name]) is type(row[field.name]), field.name
    listed = next(task for task in any_store.list_tasks("schema") if task["uuid"] == row["uuid"])
    assert EVENT_HIDDEN.isdisjoint(key for key, value in listed.items() if value is not None), (
        "a list view shows a field the schema hides")


def test_redis_encodes_each_field_as_declared(redis_server) -> None:
    prefix = f"schema-{uuid_module.uuid4().hex}:"
    store = RedisStore(redis_server, prefix=prefix)
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    try:
        row = full_row()
        store.enqueue([row], -1)
        raw = client.hgetall(f"{prefix}t:{row['uuid']}")
        stopped = {**full_row(2), **{field.name: True for field in FIELDS if field.encoding is Encoding.BOOLEAN}}
        store.enqueue([stopped], -1)
        raw_true = client.hgetall(f"{prefix}t:{stopped['uuid']}")
    finally:
        client.close()
        store.close()
    assert set(raw) == set(COLUMNS), "the task's hash holds other fields than the schema's"
    for field in FIELDS:
        text = raw[field.name]
        if field.encoding is Encoding.JSON:
            assert json.loads(text) == row[field.name], field.name
        elif field.encoding is Encoding.REAL:
            assert text == repr(float(row[field.name])), field.name
        elif field.encoding is Encoding.INTEGER:
            assert text == str(int(text)), field.name
            if field.name != "seq":
                assert int(text) == row[field.name], field.name
        elif field.encoding is Encoding.BOOLEAN:
            assert (text, raw_true[field.name]) == ("0", "1"), field.name
        else:
            assert text == row[field.name], field.name


# -- the task object -------------------------------------------------------------------------------------


def shown(kind: Optional[Shown] = None) -> set[str]:
    return {field.name for field in FIELDS if field.shown is not Shown.NO and (kind is None or field.shown is kind)}


def test_presenter_shows_the_shown_fields() -> None:
    keys = set(TASK_KEYS)
    assert len(keys) == len(TASK_KEYS)
    assert shown() - keys == set(), "presenter.TASK_KEYS misses these fields"
    assert keys - shown() - PRESENTED_ONLY == set(), "presenter.TASK_KEYS shows fields the schema does not show"
    assert tuple(typing.get_type_hints(TaskObject)) == (*TASK_KEYS, *LIST_ONLY), (
        "presenter.TaskObject's keys differ from TASK_KEYS")


def test_presenter_shows_each_field_as_declared() -> None:
    row = full_row()
    row["seq"] = 1
    task = present(row, position=1)  # type: ignore[arg-type]
    for name in shown(Shown.TIME):
        assert isinstance(task[name], str) and task[name].endswith("+00:00"), f"{name} is not shown as ISO 8601"
    for name in shown(Shown.VALUE) - {"schedule"}:
        assert task[name] == row[name], f"{name} is not shown as stored"
    assert task["schedule"]["key"] == row["schedule"]["key"]


def test_the_task_object_shows_the_host_of_its_owner_never_the_owner() -> None:
    row = full_row()
    row.update(seq=1, status="running", owner="rack-1/node:7:4242:1700000000.125")
    task = present(row)  # type: ignore[arg-type]
    assert task["host"] == "rack-1/node:7" and "owner" not in task
    assert present({**row, "owner": None})["host"] is None  # type: ignore[typeddict-item]
    assert present_change({"uuid": row["uuid"], "status": "running", "owner": row["owner"]})["host"] == "rack-1/node:7"
    assert "host" not in present_change({"uuid": row["uuid"], "status": "running", "percent": 5.0}), (
        "an event without the owner (progress) leaves the host the page shows as it is")


def _json_types(schema: dict[str, Any], schemas: dict[str, Any]) -> Optional[set[str]]:
    """The JSON types a property schema allows (None: any)."""
    if "$ref" in schema:
        return _json_types(schemas[schema["$ref"].rpartition("/")[2]], schemas)
    if "anyOf" in schema:
        found: set[str] = set()
        for option in schema["anyOf"]:
            types = _json_types(option, schemas)
            if types is None:
                return None
            found |= types
        return found
    if "enum" in schema:
        return {JSON_TYPES[type(value)] if value is not None else "null" for value in schema["enum"]}
    if "type" not in schema:
        return None
    return set(schema["type"]) if isinstance(schema["type"], list) else {schema["type"]}


def test_openapi_task_schema_describes_every_shown_field() -> None:
    schemas = openapi_document(Flask(__name__))["components"]["schemas"]
    task = schemas["Task"]
    properties = task["properties"]
    assert list(task["required"]) == list(TASK_KEYS)
    missing = (set(TASK_KEYS) | LIST_ONLY) - set(properties)
    assert not missing, f"the OpenAPI Task schema (openapi.py) has no property for {sorted(missing)}"
    for field in FIELDS:
        if field.shown is Shown.NO:
            assert field.name not in properties, f"the OpenAPI Task schema describes hidden field {field.name}"
            continue
        prop = properties[field.name]
        types = _json_types(prop, schemas)
        if field.shown is Shown.TIME:
            assert prop.get("format") == "date-time", field.name
            wanted: Optional[str] = "string"
        else:
            origin = typing.get_origin(field.type) or field.type
            wanted = None if field.type is Any else JSON_TYPES[origin]
        if types is None or wanted is None:
            continue
        assert wanted in types, f"the OpenAPI Task schema gives {field.name} the types {types}, not {wanted}"
        if field.nullable:
            assert "null" in types, f"the OpenAPI Task schema does not let {field.name} be null"
