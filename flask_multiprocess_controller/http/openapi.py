"""An OpenAPI 3.1 document of every :class:`~.resource.MetaMPResource` mounted on an app.

:func:`openapi_document` walks the app's URL map, finds the views flask-restful built
for a ``MetaMPResource`` (``view.view_class``) and the controller each was given
(``resource_class_args``), and describes what each mount answers, as the README's HTTP
table says it: the request body derived from the task's ``execute`` (see
:mod:`.arguments`, whose check enforces exactly the schema declared here), the query
options, the task object, the list view, the error body and every status code.

Methods a controller's class overrides, and every method of a ``compat="0.1"``
controller, answer whatever the override returns: they are described as taking and
answering any JSON. HEAD and OPTIONS, which Flask answers itself unless overridden, are
left out, as are the methods a mount does not serve: those answer ``405`` with an
``Allow`` header.

The document is built from the app as it is when called; the extension serves it at
``<prefix>/openapi.json``.

.. versionadded:: 0.3
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from flask import Flask
from werkzeug.routing import Rule

from .. import defaults
from .arguments import ArgumentSpec
from .resource import is_artifacts_rule
from ..controller import MetaMPController
from ..presenter import TASK_KEYS
from .share import SHARED_KEYS as _SHARED_KEYS
from .resource import MetaMPResource
from ..states import ALL_STATUSES

#: The OpenAPI version of the documents built here.
OPENAPI_VERSION = "3.1.0"

#: Priorities a request may ask for (the controller refuses others with 400).
PRIORITY_RANGE = 2 ** 62

_SCHEMAS = "#/components/schemas/"
_RESPONSES = "#/components/responses/"
_PARAMETERS = "#/components/parameters/"

#: A path variable of a werkzeug rule: ``<converter(args):name>``.
_VARIABLE = re.compile(
    r"<(?:(?P<converter>[a-zA-Z_][a-zA-Z0-9_]*)(?:\((?P<args>.*?)\))?:)?(?P<name>[a-zA-Z_]\w*)>")


def openapi_document(app: Flask, title: Optional[str] = None, version: str = "1",
                     server_url: Optional[str] = None) -> dict[str, Any]:
    """Describe every ``MetaMPResource`` mounted on ``app`` as an OpenAPI 3.1 document (a JSON-ready dict).

    :param title: the document's ``info.title``; defaults to the app's name.
    :param version: the document's ``info.version``: the version of your API, not of this package.
    :param server_url: the URL the paths are relative to (``request.script_root`` when the
        app is mounted below the root of its host); omitted, clients use the document's own host.
    """
    builder = _Builder()
    for mount in find_mounts(app):
        builder.add(mount)
    builder.link()
    state = app.extensions.get("mpc")
    if state is not None:
        builder.paths.update(extension_paths(state.prefix))
        builder.tags.append({"name": "mpc", "description": "The extension's task API over every controller."})
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title or app.name, "version": version, "description": _INFO},
        "paths": builder.paths,
        "components": {"schemas": {**_common_schemas(), **builder.schemas}, "parameters": _parameters(),
                       "responses": _responses(), "headers": _headers()},
        "tags": builder.tags,
    }
    if server_url is not None:
        document["servers"] = [{"url": server_url}]
    return document


_INFO = ("Tasks run in child processes: POST queues one, GET reports its status, progress and result, "
         "DELETE stops it. Every error body is a JSON object with a human `message`. A method not listed "
         "for a path answers 405 with an `Allow` header.")


@dataclass(frozen=True)
class Mount:
    """One URL rule of a mounted ``MetaMPResource``."""

    rule: Rule
    controller: MetaMPController
    resource_class: type[MetaMPResource]

    @property
    def endpoint(self) -> str:
        return str(self.rule.endpoint)

    @property
    def is_item(self) -> bool:
        """Whether the rule carries the task's uuid in its path."""
        return "uuid" in self.rule.arguments


def find_mounts(app: Flask) -> list[Mount]:
    """The rules of ``app`` served by a ``MetaMPResource`` whose controller can be found, in URL order."""
    mounts = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, r.endpoint)):
        view = app.view_functions.get(rule.endpoint)
        resource_class = getattr(view, "view_class", None)
        if view is None or not (isinstance(resource_class, type) and issubclass(resource_class, MetaMPResource)):
            continue
        controller = controller_of(view)
        if controller is not None:
            mounts.append(Mount(rule, controller, resource_class))
    return mounts


def controller_of(view: Callable[..., Any]) -> Optional[MetaMPController]:
    """The controller a ``MetaMPResource`` view was built with, or None.

    A view that carries it as ``view.controller`` says so directly. Otherwise it is read
    from the arguments that ``View.as_view`` keeps for building the resource on each
    request (flask-restful's ``resource_class_args``/``resource_class_kwargs``), along the
    ``__wrapped__`` chain of the decorators that flask-restful and the app added.
    """
    function: Any = view
    seen = 0
    while function is not None and seen < 20:
        seen += 1
        direct = getattr(function, "controller", None)
        if isinstance(direct, MetaMPController):
            return direct
        found = _from_closure(function)
        if found is not None:
            return found
        function = getattr(function, "__wrapped__", None)
    return None


def _from_closure(function: Any) -> Optional[MetaMPController]:
    code, cells = getattr(function, "__code__", None), getattr(function, "__closure__", None)
    if code is None or not cells:
        return None
    free = dict(zip(code.co_freevars, cells))
    args = free["class_args"].cell_contents if "class_args" in free else ()
    kwargs = free["class_kwargs"].cell_contents if "class_kwargs" in free else {}
    candidates = [*(args[:1] if isinstance(args, tuple) else ()),
                  kwargs.get("controller") if isinstance(kwargs, dict) else None]
    return next((c for c in candidates if isinstance(c, MetaMPController)), None)


class _Builder:
    """Collects the paths, per-controller schemas and tags of the mounts it is given."""

    def __init__(self) -> None:
        self.paths: dict[str, Any] = {}
        self.schemas: dict[str, Any] = {}
        self.tags: list[dict[str, str]] = []
        self._operation_ids: set[str] = set()
        self._argument_refs: dict[int, str] = {}
        #: (endpoint, method, is_item) -> the operation, for :meth:`link`.
        self._operations: dict[tuple[str, str, bool], dict[str, Any]] = {}

    def add(self, mount: Mount) -> None:
        path, path_parameters = openapi_path(mount.rule)
        if is_artifacts_rule(mount.rule.rule):  # GET only: the list, or one download
            if path.endswith("/artifacts"):
                uuid = next((p for p in path_parameters if p["name"] == "uuid"), None)
                if uuid is not None:
                    self.paths.update(_artifact_paths(path[:-len("/artifacts")], uuid))
            return
        item = self.paths.setdefault(path, {})
        if path_parameters:
            item["parameters"] = path_parameters
        tag = mount.controller.name
        if all(t["name"] != tag for t in self.tags):
            self.tags.append({"name": tag, "description": _task_summary(mount.controller)})
        for method in _documented_methods(mount):
            operation = self._operation(mount, method)
            operation["tags"] = [tag]
            operation["operationId"] = self._operation_id(mount, method)
            item[method] = operation
            self._operations.setdefault((mount.endpoint, method, mount.is_item), operation)

    def link(self) -> None:
        """Link each default POST's answers to the operations that read and stop the task it queued.

        The item URL's operations when the mount has one, else the collection URL's with ``?uuid=``.
        """
        for (endpoint, method, is_item), post in self._operations.items():
            if method != "post" or is_item or "requestBody" not in post or "default" in post["responses"]:
                continue
            links = {}
            for name, verb in (("GetTask", "get"), ("StopTask", "delete")):
                target = self._operations.get((endpoint, verb, True))
                where = "path.uuid"
                if target is None or "default" in target["responses"]:
                    target, where = self._operations.get((endpoint, verb, False)), "query.uuid"
                if target is not None and "default" not in target["responses"]:
                    links[name] = {"operationId": target["operationId"],
                                   "parameters": {where: "$response.body#/uuid"}}
            if links:
                for code in ("200", "202"):
                    post["responses"][code]["links"] = links

    def _operation(self, mount: Mount, method: str) -> dict[str, Any]:
        if _is_custom(mount, method):
            return _custom_operation(mount, method)
        if method == "post":
            if mount.is_item:
                return _post_to_item()
            return _post_operation(mount, self._arguments_ref(mount.controller))
        if method == "get":
            return _get_item() if mount.is_item else _get_collection()
        if method == "patch":
            return _patch_operation(mount.is_item)
        return _delete_operation(mount.is_item)

    def _arguments_ref(self, controller: MetaMPController) -> str:
        """The ``$ref`` of a controller's request body schema, added to the components once."""
        ref = self._argument_refs.get(id(controller))
        if ref is None:
            name = _component_name(f"{controller.name}.Arguments", self.schemas)
            self.schemas[name] = _arguments_schema(controller)
            ref = self._argument_refs[id(controller)] = _SCHEMAS + name
        return ref

    def _operation_id(self, mount: Mount, method: str) -> str:
        base = _safe(f"{mount.controller.name}.{method}{'.item' if mount.is_item else ''}")
        candidate, n = base, 1
        while candidate in self._operation_ids:
            n += 1
            candidate = f"{base}.{n}"
        self._operation_ids.add(candidate)
        return candidate


def openapi_path(rule: Rule) -> tuple[str, list[dict[str, Any]]]:
    """The OpenAPI path template of a werkzeug rule and its path parameters.

    ``/t/<string:uuid>`` becomes ``/t/{uuid}``, with a ``uuid`` path parameter.
    """
    parameters = []
    for match in _VARIABLE.finditer(rule.rule):
        name = match["name"]
        parameters.append({"name": name, "in": "path", "required": True,
                           "schema": _converter_schema(name, match["converter"] or "default", match["args"])})
    return _VARIABLE.sub(lambda m: "{" + m["name"] + "}", rule.rule), parameters


def _converter_schema(name: str, converter: str, args: Optional[str]) -> dict[str, Any]:
    if name == "uuid":
        return {"type": "string", "format": "uuid", "description": "A task's uuid (a malformed one gets 400)."}
    if converter == "int":
        return {"type": "integer", **({} if args and "signed=True" in args else {"minimum": 0})}
    if converter == "float":
        return {"type": "number", **({} if args and "signed=True" in args else {"minimum": 0})}
    if converter == "path":
        return {"type": "string", "minLength": 1}
    if converter == "any" and args:
        return {"enum": [a.strip().strip("'\"") for a in args.split(",") if a.strip()]}
    return {"type": "string", "minLength": 1, "pattern": "^[^/]+$"}


def _documented_methods(mount: Mount) -> Iterator[str]:
    """The lower-case methods to describe: what the mount routes, less Flask's own HEAD and OPTIONS."""
    served = {m.lower() for m in mount.controller.served_methods()}
    for method in ("get", "post", "put", "patch", "delete", "trace", "head", "options"):
        if method not in served and not _resource_overrides(mount, method):
            continue
        if method in ("head", "options") and not (mount.controller.overrides(method)
                                                  or _resource_overrides(mount, method)):
            continue
        yield method


def _resource_overrides(mount: Mount, method: str) -> bool:
    return getattr(mount.resource_class, method) is not getattr(MetaMPResource, method)


def _is_custom(mount: Mount, method: str) -> bool:
    """Whether ``method`` answers what user code returns rather than the package's default answer."""
    controller = mount.controller
    return (controller.compat is not None or controller.target_task is None or controller.overrides(method)
            or _resource_overrides(mount, method) or method not in ("get", "post", "delete", "patch"))


# -- operations ------------------------------------------------------------------------------------


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": kind + name}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*names: str) -> dict[str, Any]:
    codes = {"BadRequest": "400", "Forbidden": "403", "NotFound": "404", "Conflict": "409",
             "PayloadTooLarge": "413", "QueueFull": "429", "Unavailable": "503", "MethodNotAllowed": "405",
             "KeyReused": "422"}
    return {codes[name]: _ref(_RESPONSES, name) for name in names}


def _task_response(description: str, schema: dict[str, Any], location: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": _json(schema)}
    if location:
        response["headers"] = {"Location": _ref("#/components/headers/", "Location")}
    return response


def _post_operation(mount: Mount, arguments_ref: str) -> dict[str, Any]:
    controller = mount.controller
    one_or_many = {"anyOf": [_ref(_SCHEMAS, "Task"), _ref(_SCHEMAS, "TaskBatch")]}
    return {
        "summary": f"Queue {_task_name(controller)} tasks",
        "description": ("A JSON object of keyword arguments for `execute` queues one task (an empty body: no "
                        "arguments); a JSON array of such objects queues one task each, all or none. Arguments "
                        "are checked against `execute`'s signature before anything is queued."),
        "parameters": [_ref(_PARAMETERS, "priority"), _ref(_PARAMETERS, "timeout"), _ref(_PARAMETERS, "wait"),
                       _ref(_PARAMETERS, "share"), _ref(_PARAMETERS, "idempotencyKey"),
                       _ref(_PARAMETERS, "traceparent")],
        "requestBody": {"required": False, "content": _json({"oneOf": [
            {"$ref": arguments_ref},
            {"type": "array", "items": {"$ref": arguments_ref}, "minItems": 1, "maxItems": controller.max_bulk},
        ]})},
        "responses": {
            "200": _task_response("With `?wait=`: every task (of an array body: the whole batch) ended within "
                                  "the wait. With an `Idempotency-Key` used before (within the controller's "
                                  "`idempotency_ttl`, with the same body and options): the task(s) that request "
                                  "made, and nothing queued now (after `?wait=`, as a GET would).",
                                  one_or_many, location=True),
            "202": _task_response("Queued: the task object (`Location` names its URL), or "
                                  "`{\"tasks\": [...], \"batch\": id}` for an array body, in its order.",
                                  one_or_many, location=True),
            **_errors("BadRequest", "PayloadTooLarge", "QueueFull", "Unavailable", "KeyReused"),
            "409": _error("The tasks an `Idempotency-Key` made have been purged since; nothing was queued."),
        },
    }


def _post_to_item() -> dict[str, Any]:
    return {"summary": "Not here: POST goes to the collection URL",
            "description": "Tasks are queued by a POST to the collection URL, without a uuid: this is refused.",
            "responses": _errors("BadRequest")}


def _get_item() -> dict[str, Any]:
    return {
        "summary": "A task",
        "description": "With `?wait=S`, answers as soon as the task has ended, or after S seconds.",
        "parameters": [_ref(_PARAMETERS, "wait")],
        "responses": {"200": _task_response("The task object.", _ref(_SCHEMAS, "Task")),
                      **_errors("BadRequest", "NotFound", "Unavailable")},
    }


def _get_collection() -> dict[str, Any]:
    return {
        "summary": "The controller's tasks, or one task",
        "description": ("Without `uuid`: the list view, newest first. With `?uuid=`: that task, as its item URL "
                        "answers (`?wait=` long-polls it). With `?batch=`: the tasks of that bulk POST, 200 "
                        "once all have ended, else 202 (`?wait=` long-polls the whole batch)."),
        "parameters": [_ref(_PARAMETERS, "uuid"), _ref(_PARAMETERS, "batch"), _ref(_PARAMETERS, "wait"),
                       _ref(_PARAMETERS, "status"), _ref(_PARAMETERS, "limit")],
        "responses": {
            "200": _task_response("The list view, the task named by `?uuid=`, or the batch named by `?batch=` "
                                  "with every task ended.",
                                  {"anyOf": [_ref(_SCHEMAS, "TaskList"), _ref(_SCHEMAS, "Task"),
                                             _ref(_SCHEMAS, "BatchState")]}),
            "202": _task_response("`?batch=`: some of its tasks have not ended (yet, or within the wait).",
                                  _ref(_SCHEMAS, "BatchState")),
            **_errors("BadRequest", "NotFound", "Unavailable"),
        },
    }


#: The ``?finish=`` of a DELETE of one task.
_FINISH_PARAMETER = {"name": "finish", "in": "query", "schema": {"enum": ["true", "false", "1", "0"]},
                     "description": "`true`: the running task is asked to finish now and return its best answer so "
                                    "far, kept as its `result` (it ends `stopped` with `stopped_with_result`). Not "
                                    "with `all`."}


def _delete_operation(is_item: bool) -> dict[str, Any]:
    if is_item:
        return {
            "summary": "Stop a task",
            "description": ("A running task is asked to stop (202, `stopping`); a queued one is stopped at once "
                            "and never starts (200, `stopped`). `?finish=true`: asked to finish now instead, "
                            "returning its best answer so far."),
            "parameters": [_FINISH_PARAMETER],
            "responses": {
                "200": _task_response("The task was queued: now `stopped`.", _ref(_SCHEMAS, "Task")),
                "202": _task_response("The task runs: now `stopping`.", _ref(_SCHEMAS, "Task")),
                **_errors("BadRequest", "Forbidden", "NotFound", "Conflict", "Unavailable"),
            },
        }
    return {
        "summary": "Stop a task, or every task",
        "description": ("`?uuid=`: a running task is asked to stop (202, `stopping`); a queued one is stopped at "
                        "once and never starts (200, `stopped`). `?all=true`: every queued task is stopped and "
                        "every running one asked to stop (202 with the counts). Neither: 400."),
        "parameters": [{**_required_uuid(), "required": False},
                       {"name": "all", "in": "query", "schema": {"enum": ["true", "false", "1", "0"]},
                        "description": "`true` stops every queued and running task of the controller."},
                       _FINISH_PARAMETER],
        "responses": {
            "200": _task_response("The task was queued: now `stopped`.", _ref(_SCHEMAS, "Task")),
            "202": _task_response("The task runs: now `stopping`; or, with `?all=true`, the counts.",
                                  {"anyOf": [_ref(_SCHEMAS, "Task"), _ref(_SCHEMAS, "StopAll")]}),
            **_errors("BadRequest", "Forbidden", "NotFound", "Conflict", "Unavailable"),
        },
    }


def _patch_operation(is_item: bool) -> dict[str, Any]:
    body = {"oneOf": [
        {"type": "object", "properties": {"status": {"enum": ["paused", "running"]}}, "required": ["status"],
         "additionalProperties": False},
        {"type": "object", "properties": {"priority": {"type": "integer", "minimum": -PRIORITY_RANGE,
                                                       "maximum": PRIORITY_RANGE}}, "required": ["priority"],
         "additionalProperties": False},
    ]}
    return {
        "summary": "Pause, resume or re-prioritise a task",
        "description": ("`{\"status\": \"paused\"}` suspends a running task's whole process tree, "
                        "`{\"status\": \"running\"}` resumes it; `{\"priority\": n}` moves a queued task."),
        "parameters": [] if is_item else [_required_uuid()],
        "requestBody": {"required": True, "content": _json(body)},
        "responses": {
            "200": _task_response("The task object after the change.", _ref(_SCHEMAS, "Task")),
            **_errors("BadRequest", "Forbidden", "NotFound", "Conflict", "PayloadTooLarge", "Unavailable"),
        },
    }


def extension_paths(prefix: str) -> dict[str, Any]:
    """The extension's URLs under ``prefix``: the task API over every controller (as the dashboard reads it),
    the health endpoint, the task log (JSON, or a stream), the event stream and the schedules.

    The dashboard page and this document itself are left out: they are no operations of the API.
    """
    controller = {"name": "controller", "in": "query", "schema": {"type": "string"},
                  "description": "Only this controller's tasks (its name)."}
    item: dict[str, Any] = {"parameters": [{"name": "uuid", "in": "path", "required": True,
                                            "schema": {"type": "string"}}]}
    get_item = {"summary": "Any controller's task", "responses": {
        "200": _task_response("The task object.", _ref(_SCHEMAS, "Task")),
        **_errors("BadRequest", "NotFound", "Unavailable")}}
    item.update(get=get_item, delete=_delete_operation(True), patch=_patch_operation(True))
    before = {"name": "before", "in": "query",
              "schema": {"type": "integer", "minimum": 1, "maximum": defaults.MAX_QUERY_INT},
              "description": "The `next` cursor of the previous page: only older tasks."}
    by_prefix = {"name": "uuid_prefix", "in": "query", "schema": {"type": "string", "pattern": _PREFIX_PATTERN},
                 "description": ("Only the tasks whose uuid begins with these 8 or more hex digits (the short id "
                                 "the dashboard shows), newest first, on one page: how a client finds the one "
                                 "task a short id names. Not with `before`.")}
    listing = {"summary": "Every controller's tasks, newest first",
               "parameters": [controller, _ref(_PARAMETERS, "status"), _ref(_PARAMETERS, "limit"), before,
                              by_prefix],
               "responses": {"200": _task_response("A page of tasks, and the cursor of the next one (null: last).", {
                   "type": "object", "required": ["tasks", "next"], "properties": {
                       "tasks": {"type": "array", "items": _ref(_SCHEMAS, "Task")},
                       "next": _nullable("integer")}}),
                   **_errors("BadRequest", "Unavailable")}}
    stop_all = {"summary": "Stop every queued and running task of one controller",
                "parameters": [{**controller, "required": True, "description": "The controller's name."},
                               {"name": "all", "in": "query", "required": True, "schema": {"enum": ["true", "1"]},
                                "description": "Must be `true`: a DELETE of the list stops every task."}],
                "responses": {"202": _task_response("Queued tasks stopped, and running ones asked to stop.",
                                                    _ref(_SCHEMAS, "StopAll")),
                              **_errors("BadRequest", "Forbidden", "Unavailable")}}
    counts = {"type": "array", "items": {"type": "integer", "minimum": 0}}
    stats = {"summary": "Tasks ended per minute and outcome (the dashboard's chart)",
             "parameters": [controller, {"name": "minutes", "in": "query", "description": "Minutes back from now.",
                                         "schema": {"type": "integer", "minimum": 1, "maximum": 1440, "default": 60}}],
             "responses": {"200": _task_response("One count per minute, oldest first, for each terminal status.", {
                 "type": "object", "required": ["since", "now", "step", "minutes", "counts"], "properties": {
                     "since": {"type": "string", "format": "date-time"}, "step": {"type": "integer"},
                     "now": {"type": "string", "format": "date-time", "description": "The store's clock."},
                     "minutes": {"type": "integer"},
                     "counts": {"type": "object", "additionalProperties": counts}}}),
                 **_errors("BadRequest", "Unavailable")}}
    rerun = {"summary": "Run an ended task again",
             "description": ("Queues a new task of the same controller with the same arguments, priority, timeout "
                             "and tenant; its `rerun_of` names this task, whose `reruns` then name it. Any ended "
                             "task may be run again (succeeded included). No body is read."),
             "responses": {"202": _task_response("The new task.", _ref(_SCHEMAS, "Task"), location=True),
                           "409": _error("The task has not ended yet: only an ended task can be run again."),
                           **_errors("BadRequest", "Forbidden", "NotFound", "QueueFull", "Unavailable")}}
    operations: dict[str, dict[str, Any]] = {f"{prefix}/api/tasks": {"get": listing, "delete": stop_all},
                                             f"{prefix}/api/tasks/{{uuid}}": item,
                                             f"{prefix}/api/tasks/{{uuid}}/rerun": {
                                                 "parameters": item["parameters"], "post": rerun},
                                             f"{prefix}/api/stats": {"get": stats},
                                             f"{prefix}/api/hosts/{{host}}/drain": _drain_operations()}
    operations.update(_monitoring_paths(prefix))
    operations.update(_share_paths(prefix))
    for path, entry in operations.items():
        for method, operation in entry.items():
            if method != "parameters":
                operation["tags"] = ["mpc"]
                operation["operationId"] = _safe(f"mpc{path[len(prefix):]}.{method}")
    return operations


def _share_paths(prefix: str) -> dict[str, Any]:
    """``<prefix>/share/{uuid}`` (JSON, or the page), its ``/events`` and ``/artifacts/{name}``: open with a share
    link's token, without the extension's ``decorator=``."""
    parameters = [{"name": "uuid", "in": "path", "required": True, "schema": {"type": "string"}},
                  {"name": "token", "in": "query", "schema": {"type": "string"},
                   "description": "The share link's token (else as `Authorization: Bearer <token>`)."}]
    refusals = {"401": _error("No token, or an expired one: ask for a new link.", "WWW-Authenticate"),
                "403": _error("An altered token, or another task's: nothing is shown."),
                **_errors("BadRequest", "NotFound")}
    task = {"summary": "One task, through its share link",
            "description": ("The task as a share link shows it: status, progress, result, error (no traceback) and "
                            "files; never its arguments. A browser (`Accept` preferring `text/html`) gets a small "
                            "page that follows it live instead."),
            "responses": {"200": {"description": "The task.", "content": {
                **_json(_ref(_SCHEMAS, "SharedTask")), "text/html": {"schema": {"type": "string"}}}}, **refusals}}
    events = {"summary": "One task's changes, through its share link",
              "description": ("Server-Sent Events: `task` (the whole view) first, then each change of the task "
                              "(`progress`, `started`, `ended`, ...: the keys it changed), until it ended."),
              "responses": {"200": _event_stream("The task's events."), **refusals,
                            "503": _error("Too many streams.", "Retry-After")}}
    artifact = {"summary": "A file of one task, through its share link",
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The file.",
                                      "content": {"application/octet-stream": {"schema": {"type": "string"}}}},
                              **refusals}}
    return {f"{prefix}/share/{{uuid}}": {"parameters": parameters, "get": task},
            f"{prefix}/share/{{uuid}}/events": {"parameters": parameters, "get": events},
            f"{prefix}/share/{{uuid}}/artifacts/{{name}}": {"parameters": parameters, "get": artifact}}


#: A uuid prefix as ``?uuid_prefix=`` takes it: 8 to 31 hex digits, dashes where a uuid has them, or none.
_PREFIX_PATTERN = ("^(?:[0-9a-fA-F]{8,31}|[0-9a-fA-F]{8}-[0-9a-fA-F]{0,4}(?:-[0-9a-fA-F]{0,4}"
                   "(?:-[0-9a-fA-F]{0,4}(?:-[0-9a-fA-F]{0,11})?)?)?)$")


#: One Server-Sent Event: its name, its data (JSON text), its id (what ``Last-Event-ID`` resumes after).
_SSE_EVENT = {"type": "object", "properties": {"event": {"type": "string"}, "data": {"type": "string"},
                                               "id": {"type": "string"}, "retry": {"type": "integer"}}}


def _event_stream(description: str) -> dict[str, Any]:
    """A 200 answer of Server-Sent Events (``text/event-stream``), open until ``MPC_MAX_WAIT`` at most."""
    return {"description": description, "content": {"text/event-stream": {"schema": _SSE_EVENT}}}


def _monitoring_paths(prefix: str) -> dict[str, Any]:
    """``<prefix>/health``, ``<prefix>/api/tasks/{uuid}/logs``, ``<prefix>/events``, ``<prefix>/api/schedules`` and
    ``<prefix>/metrics``."""
    entry = {"type": "object", "additionalProperties": True, "properties": {
        "max_num_process": {"type": "integer"}, "store": {"type": "string"},
        "running": {"type": "integer", "minimum": 0}, "queued": {"type": "integer", "minimum": 0},
        "paused": {"type": "integer", "minimum": 0}, "callbacks_dropped": {"type": "integer", "minimum": 0},
        "status": {"const": "unavailable"}, "message": {"type": "string"}}}
    health_body = {"type": "object", "required": ["status", "controllers", "drained_hosts"], "properties": {
        "status": {"enum": ["ok", "unavailable"]},
        "controllers": {"type": "object", "additionalProperties": entry,
                        "description": "Each controller's limit, store and task counts (the request's tenant's)."},
        "drained_hosts": {"type": "array"},
        "this_process": {"type": "object", "description": "When the answering process serves: its host and "
                                                          "whether that host is drained."}}}
    health = {"summary": "Whether every controller can reach its store, with task counts", "responses": {
        "200": _task_response("Every controller's store answers.", health_body),
        "503": {"description": "A controller's store does not answer (its entry says why).",
                "headers": {"Retry-After": _ref("#/components/headers/", "Retry-After")},
                "content": _json(health_body)}}}
    lines = {"type": "object", "required": ["lines", "next"], "properties": {
        "lines": {"type": "array", "items": {"type": "object", "required": ["n", "line"], "properties": {
            "n": {"type": "integer", "minimum": 1}, "line": {"type": "string"}}}},
        "next": {"type": "integer", "minimum": 0, "description": "The `after` of the next read."}}}
    logs = {"summary": "A task's kept log lines (what it logged and printed)",
            "parameters": [{"name": "after", "in": "query", "description": "Only lines after this number.",
                            "schema": {"type": "integer", "minimum": 0, "maximum": defaults.MAX_QUERY_INT}},
                           {"name": "follow", "in": "query", "schema": {"type": "string"},
                            "description": ("`1`: a stream of `line` events as they come, and an `end` event "
                                            "once the task ended and its last line was sent.")}],
            "responses": {"200": {"description": "The lines (JSON), or with `?follow=1` their stream.",
                                  "content": {**_json(lines), "text/event-stream": {"schema": _SSE_EVENT}}},
                          **_errors("BadRequest", "NotFound", "Unavailable")}}
    events = {"summary": "Task events of every controller, live (Server-Sent Events)",
              "description": ("Each state change of a task as an event named after it, carrying the task object; "
                              "`Last-Event-ID` (or `?last_event_id=`) replays what was missed."),
              "parameters": [{"name": "controller", "in": "query", "schema": {"type": "string"},
                              "description": "Only this controller's events (its name)."},
                             {"name": "last_event_id", "in": "query", "schema": {"type": "string"},
                              "description": "Resume after this event (as the `Last-Event-ID` header)."},
                             {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
                              "description": "Resume after this event."}],
              "responses": {"200": _event_stream("The events, until `MPC_MAX_WAIT` seconds passed."),
                            **_errors("BadRequest", "Unavailable")}}
    schedule = {"type": "object", "required": ["name", "controller"], "additionalProperties": True, "properties": {
        "name": {"type": "string"}, "controller": {"type": "string"}, "cron": _nullable("string"),
        "every": _nullable("number"), "active": {"type": "boolean",
                                                 "description": "Whether a live server still declares it."},
        "next_firing": _nullable("string", format="date-time")}}
    schedules = {"summary": "Every controller's schedules and their next firing", "responses": {
        "200": _task_response("The schedules, by controller and name.", {
            "type": "object", "required": ["schedules"],
            "properties": {"schedules": {"type": "array", "items": schedule}}}),
        **_errors("Unavailable")}}
    metrics = {"summary": "Task, queue and store figures in the Prometheus text format",
               "description": ("Read from the store at each scrape, so every worker and host answers the same "
                               "(see the metrics page of the documentation); 404 without prometheus-client."),
               "responses": {"200": {"description": "The metrics (OpenMetrics when the scraper asks for it).",
                                     "content": {"text/plain": {"schema": {"type": "string"}},
                                                 "application/openmetrics-text": {"schema": {"type": "string"}}}},
                             **_errors("NotFound")}}
    uuid = {"name": "uuid", "in": "path", "required": True, "schema": {"type": "string"}}
    return {f"{prefix}/health": {"get": health},
            f"{prefix}/api/tasks/{{uuid}}/logs": {"parameters": [uuid], "get": logs},
            **_artifact_paths(f"{prefix}/api/tasks/{{uuid}}", uuid),
            f"{prefix}/events": {"get": events},
            f"{prefix}/api/schedules": {"get": schedules},
            f"{prefix}/api/usage": {"get": _usage_operation()},
            f"{prefix}/metrics": {"get": metrics}}


def _artifact_paths(item: str, uuid: dict[str, Any]) -> dict[str, Any]:
    """``<item>/artifacts`` and ``<item>/artifacts/{name}``: a task's artifacts, listed and downloaded."""
    listing = {"summary": "The files the task saved, as kept now", "responses": {
        "200": _task_response("The task's artifacts.", {
            "type": "object", "required": ["uuid", "artifacts"], "properties": {
                "uuid": {"type": "string", "format": "uuid"},
                "artifacts": {"type": "array", "items": {"type": "object"}}}}),
        **_errors("BadRequest", "NotFound", "Unavailable")}}
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "One plain file name (no path, no leading dot)."}
    download = {"summary": "One artifact, as an attachment (range requests answered)",
                "parameters": [{"name": "Range", "in": "header", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The file.", "content": {"*/*": {"schema": {
                                  "type": "string", "format": "binary"}}}},
                              "206": {"description": "The range asked for."},
                              **_errors("BadRequest", "NotFound", "Unavailable")}}
    return {f"{item}/artifacts": {"parameters": [uuid], "get": listing},
            f"{item}/artifacts/{{name}}": {"parameters": [uuid, name], "get": download}}


def _usage_operation() -> dict[str, Any]:
    """``GET <prefix>/api/usage``: each controller's tenant quota usage."""
    tenant = {"type": "object", "required": ["tenant", "cpu_seconds", "quota", "window", "over", "retry_after"],
              "properties": {
                  "tenant": _nullable("string"), "cpu_seconds": {"type": "number", "minimum": 0},
                  "quota": {"type": "number"}, "window": {"type": "number"}, "over": {"type": "boolean"},
                  "retry_after": _nullable("integer", minimum=1,
                                           description="Seconds until the tenant is under its quota again.")}}
    controller = {"type": "object", "required": ["controller", "quota", "window", "tenants"], "properties": {
        "controller": {"type": "string"}, "quota": _nullable("number", description="CPU seconds per window."),
        "window": _nullable("number", description="Seconds."), "tenants": {"type": "array", "items": tenant}}}
    return {"summary": "Each controller's CPU usage per tenant against its tenant_quota",
            "description": ("CPU seconds of each tenant's tasks (their process trees) that ended within the "
                            "controller's quota window, plus those running; the request's tenant only when the "
                            "controller has a `tenant=` hook."),
            "responses": {"200": _task_response("The usage, per controller.", {
                "type": "object", "required": ["usage"],
                "properties": {"usage": {"type": "array", "items": controller}}}),
                **_errors("Unavailable")}}


def _drain_operations() -> dict[str, Any]:
    """``GET``/``POST``/``DELETE <prefix>/api/hosts/{host}/drain``: read, drain or undrain a host."""
    state = {"type": "object", "required": ["host", "drained", "since"], "properties": {
        "host": {"type": "string"}, "drained": {"type": "boolean"},
        "since": {**_nullable("string"), "format": "date-time",
                  "description": "When the host was drained (the store's clock); null when it is not."}}}

    def operation(summary: str) -> dict[str, Any]:
        answer = _task_response("The host's drain state.", state)
        return {"summary": summary,
                "responses": {"200": answer, **_errors("BadRequest", "NotFound", "Unavailable")}}

    # A URL path segment cannot begin with '/' and Flask's path converter takes no line break: such an id
    # matches no URL (a plain 404), so the document does not offer it.
    host = {"name": "host", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": "^[^/\n][^\n]*$"},
            "description": "The host's id as its servers name it (MPC_HOST_ID); it may contain '/'."}
    return {"parameters": [host], "get": operation("Whether a host is drained, and since when"),
            "post": operation("Drain a host: its serving processes claim no new task; running ones go on"),
            "delete": operation("Undrain a host: its serving processes claim tasks again")}


def _required_uuid() -> dict[str, Any]:
    return {"name": "uuid", "in": "query", "required": True, "description": "The task's uuid.",
            "schema": {"type": "string", "format": "uuid"}}


def _custom_operation(mount: Mount, method: str) -> dict[str, Any]:
    owner = type(mount.controller).__name__
    operation: dict[str, Any] = {
        "summary": f"Answered by {owner}.{method}()",
        "description": (f"`{owner}.{method}()` is the application's own: it takes the JSON body's keys (and the "
                        f"path values) as keywords and answers what it returns."),
        "responses": {"default": {"description": "What the handler returns.", "content": _json({})},
                      **_errors("MethodNotAllowed")},
    }
    if method in ("post", "put", "patch", "delete"):
        operation["requestBody"] = {"required": False, "content": _json({"type": ["object", "array"]})}
    return operation


# -- the request body ------------------------------------------------------------------------------


def _arguments_schema(controller: MetaMPController) -> dict[str, Any]:
    """The JSON object of keyword arguments the controller's task takes, with the docstring's text."""
    if controller.target_task is None:
        return {"type": "object"}
    spec = ArgumentSpec(controller.target_task.execute)  # built as the controller builds the one it checks with
    schema = spec.schema()
    text, params = _parse_doc(_execute_doc(controller))
    if text:
        schema["description"] = text
    for name, prop in schema.get("properties", {}).items():
        if name in params:
            prop["description"] = params[name]
    # A body's 'priority' still sets the task's priority (seed compatibility), but the document offers only
    # the query option: the arguments' schema holds the task's arguments and nothing else.
    return schema


def _execute_doc(controller: MetaMPController) -> str:
    """The docstring of the task's ``execute``, else of its class (not an inherited one)."""
    task = controller.target_task
    if task is None:
        return ""
    execute = task.__dict__.get("execute")
    doc = getattr(execute, "__doc__", None) or task.__dict__.get("__doc__") or ""
    return inspect.cleandoc(doc) if doc else ""


_PARAM_LINE = re.compile(r"^:param\s+(?:[^:]*\s)?(?P<name>\w+):\s*(?P<text>.*)$")


#: A reST role (``:class:`~pkg.Name```, ``:meth:`text <target>```) or an inline literal (````x````).
_REST_ROLE = re.compile(r":[a-z][\w:+-]*:`(?P<body>[^`]+)`")
_REST_LITERAL = re.compile(r"``(?P<body>[^`]+)``")


def plain_markup(text: str) -> str:
    """``text`` with the reST markup of docstrings made the Markdown of OpenAPI descriptions: a role gives its
    target as code (``:class:`~pkg.Name``` gives `` `Name` ``, a titled one its title), a literal single
    backticks."""

    def role(match: re.Match[str]) -> str:
        body = match["body"].strip()
        titled = re.fullmatch(r"(?P<title>.+?)\s*<[^<>]+>", body)
        if titled:
            return f"`{titled['title']}`"
        if body.startswith("~"):
            body = body[1:].rsplit(".", 1)[-1]
        return f"`{body.lstrip('.!')}`"

    return _REST_LITERAL.sub(lambda m: f"`{m['body']}`", _REST_ROLE.sub(role, text))


def _parse_doc(doc: str) -> tuple[str, dict[str, str]]:
    """Split a docstring into its prose and its ``:param name: text`` fields (continued lines joined), their
    reST markup made Markdown (:func:`plain_markup`)."""
    prose: list[str] = []
    params: dict[str, str] = {}
    current: Optional[str] = None
    for line in doc.splitlines():
        match = _PARAM_LINE.match(line.strip())
        if match:
            current = match["name"]
            params[current] = match["text"]
        elif line.strip().startswith(":"):
            current = None  # another field (:returns:, :raises ...:) ends the parameter's text
        elif current is not None and line.startswith((" ", "\t")) and line.strip():
            params[current] += " " + line.strip()
        else:
            current = None
            prose.append(line)
    return plain_markup("\n".join(prose).strip()), {name: plain_markup(text) for name, text in params.items()}


def _task_summary(controller: MetaMPController) -> str:
    text, _ = _parse_doc(_execute_doc(controller))
    return text.split("\n\n")[0] or f"Tasks of controller {controller.name}."


def _task_name(controller: MetaMPController) -> str:
    task = controller.target_task
    return getattr(task, "task_name", None) or (task.__name__ if task is not None else controller.name)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _component_name(name: str, taken: dict[str, Any]) -> str:
    base = candidate = _safe(name)
    n = 1
    while candidate in taken:
        n += 1
        candidate = f"{base}{n}"
    return candidate


# -- components ------------------------------------------------------------------------------------


def _nullable(json_type: str, **more: Any) -> dict[str, Any]:
    return {"type": [json_type, "null"], **more}


def _common_schemas() -> dict[str, Any]:
    task_properties: dict[str, Any] = {
        "uuid": {"type": "string", "format": "uuid"},
        "status": _ref(_SCHEMAS, "TaskStatus"),
        "msg": {"type": "string", "description": "A human sentence about the task."},
        "progress": {"description": "The last value the task uploaded (any JSON), or null."},
        "percent": _nullable("number", description="How far `track()` got, 0 to 100."),
        "result": {"description": "What `execute` returned (any JSON); null until the task succeeded, or until it "
                                  "ended `stopped` with `stopped_with_result`."},
        "error": {"anyOf": [_ref(_SCHEMAS, "TaskError"), {"type": "null"}]},
        "args": _nullable("object", description="The keyword arguments (null in a list view when too large)."),
        "priority": {"type": "integer", "description": "Lower runs first."},
        "position": _nullable("integer", minimum=1, description="1-based place in the queue while queued."),
        "waiting_on": {"enum": ["slot", "paused", "retry_at", "schedule", "drained", "quota", "resources", "key",
                                "tenant", None],
                       "description": "While queued, what the task waits for: `retry_at` (its retry time), "
                                      "`schedule` (a set start time), `drained` (every serving host is drained), "
                                      "`quota` (its tenant used its CPU quota of the window), `resources` (no "
                                      "serving host has room for what it declares now), `key` (`max_per_key` "
                                      "tasks of its `concurrency_key` run), `tenant` (`max_per_tenant` tasks of "
                                      "its tenant run), "
                                      "`paused` (every place is held by a paused task), `slot` (a free place, "
                                      "behind the tasks ahead of it); the first that holds. Null when not queued."},
        "waiting_for": _nullable("string", description="While the task waits on a limit, its detail: the resources "
                                                       "short on every host (`memory`, `cpus, gpu`) for `resources`, "
                                                       "the key for `key`, the tenant for `tenant` and `quota`; "
                                                       "else null."),
        "eta": _nullable("string", format="date-time",
                         description="While queued, when the task is estimated to start: from its place in the "
                                     "queue and the median run time of the controller's recent successes (its "
                                     "`retry_at` while it waits for it). Null when unknown or not queued."),
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": _nullable("string", format="date-time"),
        "ended_at": _nullable("string", format="date-time"),
        "pid": _nullable("integer"),
        "host": _nullable("string", description="The host (its `MPC_HOST_ID`) of the serving process that runs the "
                                                "task, or ran its last attempt; null before it first started."),
        "exit_code": _nullable("integer", description="Negative: killed by that signal."),
        "memory_peak": _nullable("integer", minimum=0, description="Bytes of RSS of the task's process tree."),
        "cpu_time": _nullable("number", minimum=0, description="Seconds of CPU of the task's process tree."),
        "timeout": _nullable("number", description="Seconds the task may run."),
        "attempt": {"type": "integer", "minimum": 0},
        "controller": {"type": "string"},
        "retry_at": _nullable("string", format="date-time",
                              description="While a failed attempt waits for its retry: when it may run again."),
        "errors": _nullable("array", items=_ref(_SCHEMAS, "TaskError"),
                            description="The error of every attempt that ended with one, oldest first (null in a "
                                        "list view when too large)."),
        "schedule": _nullable("object", description="The schedule firing that queued the task: its `name` and "
                                                    "`firing` (ISO 8601); null when it was not a schedule's."),
        "batch": _nullable("string", pattern="^[0-9a-f]{32}$",
                           description="The id of the bulk POST that queued the task; null for a single POST."),
        "state_saved_at": _nullable(
            "string", format="date-time",
            description="When the task last saved its state with `save_state()` (an attempt after the first "
                        "resumes from it); null when it never did. The state itself is never shown."),
        "traceparent": _nullable(
            "string", pattern="^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
            description="The W3C trace context of the trace the task belongs to (from the POST's `traceparent` "
                        "header, or the caller's OpenTelemetry span); its trace id is the second part. Null "
                        "when it was queued outside any trace."),
        "rerun_of": _nullable("string", format="uuid", description="The ended task this one runs again, else null."),
        "concurrency_key": _nullable(
            "string", description="The key whose running tasks the controller's `max_per_key` bounds; null when the "
                                  "task has none."),
        "resources": _nullable(
            "object", additionalProperties={"type": "number"},
            description="What the task needs of a host to start: `memory` in bytes, `cpus`, and custom names; "
                        "null when its class declares nothing."),
        "stopped_with_result": {"type": "boolean",
                                "description": "True when the task was asked to finish now (`DELETE ?finish=true`) "
                                               "and returned its best answer so far: it is `stopped`, with that "
                                               "`result`."},
        "reruns": _nullable("array", items={"type": "string", "format": "uuid"},
                            description="The tasks queued to run this one again, newest first (at most "
                                        f"{defaults.RERUNS_SHOWN}); null in list views and events, which do not "
                                        "read them."),
        "artifacts": _nullable(
            "array", items={"type": "object", "required": ["name", "size", "content_type", "sha256"], "properties": {
                "name": {"type": "string"}, "size": {"type": "integer", "minimum": 0},
                "content_type": {"type": "string"}, "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}},
            description="The files the task saved (`save_artifact()`, `artifact_dir`) as its last attempt left "
                        "them; null before an attempt ended or when it saved none. `GET <item>/artifacts` lists "
                        "them at any time, `GET <item>/artifacts/<name>` downloads one."),
        "truncated": {"type": "array", "items": {"enum": ["args", "progress", "result", "errors"]},
                      "description": "In a list view: the values shown as null because they are too large."},
        "share_url": {"type": "string", "description": "In the answer of a POST with `?share=<seconds>` only: the "
                                                       "task's signed, read-only share link."},
    }
    return {
        "TaskStatus": {"enum": list(ALL_STATUSES)},
        "TaskError": {"type": "object", "required": ["type", "message"], "properties": {
            "type": {"type": "string"}, "message": {"type": "string"},
            "traceback": _nullable("string", description="Shown only when the controller exposes tracebacks.")}},
        "Task": {"type": "object", "required": list(TASK_KEYS), "properties": task_properties},
        "TaskBatch": {"type": "object", "required": ["tasks", "batch"],
                      "properties": {"tasks": {"type": "array", "items": _ref(_SCHEMAS, "Task")},
                                     "batch": {"type": "string", "pattern": "^[0-9a-f]{32}$",
                                               "description": "The batch id: `GET ?batch=<id>` waits for them all."}}},
        "BatchState": {
            "type": "object", "required": ["batch", "total", "ended", "tasks"], "properties": {
                "batch": {"type": "string"}, "total": {"type": "integer", "minimum": 1},
                "ended": {"type": "integer", "minimum": 0},
                "tasks": {"type": "array", "items": _ref(_SCHEMAS, "Task"),
                          "description": "In input order, values clipped as in the list view."}}},
        "TaskList": {
            "type": "object", "required": ["tasks", "running", "queued", "max_num_process"], "properties": {
                "tasks": {"type": "array", "items": _ref(_SCHEMAS, "Task"), "description": "Newest first."},
                "running": {"type": "integer", "minimum": 0}, "queued": {"type": "integer", "minimum": 0},
                "max_num_process": {"type": "integer", "minimum": 1}}},
        "StopAll": {"type": "object", "required": ["stopped", "stopping"], "properties": {
            "stopped": {"type": "integer", "minimum": 0, "description": "Queued tasks now stopped."},
            "stopping": {"type": "integer", "minimum": 0, "description": "Running tasks asked to stop."}}},
        "Error": {"type": "object", "required": ["message"], "properties": {"message": {"type": "string"}}},
        "SharedTask": {"type": "object", "required": ["uuid", "status"], "properties": {
            key: task_properties.get(key, {}) for key in _SHARED_KEYS}},
    }


def _parameters() -> dict[str, Any]:
    return {
        "wait": {"name": "wait", "in": "query", "schema": {"type": "number", "minimum": 0},
                 "description": ("Seconds to wait for the task(s) to end before answering; a wait longer than "
                                 "the controller's `max_wait` is shortened to it.")},
        "priority": {"name": "priority", "in": "query",
                     "schema": {"type": "integer", "minimum": -PRIORITY_RANGE, "maximum": PRIORITY_RANGE},
                     "description": "Lower runs first; FIFO among equals. Default 0."},
        "timeout": {"name": "timeout", "in": "query",
                    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": defaults.MAX_SECONDS},
                    "description": "Seconds the task may run; it can only lower the controller's timeout."},
        "batch": {"name": "batch", "in": "query", "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                  "description": ("A batch id (a bulk POST's `batch`): the state of its tasks; with `?wait=S`, "
                                  "answers as soon as all of them have ended, or after S seconds.")},
        "uuid": {"name": "uuid", "in": "query", "description": "A task's uuid (empty: none).",
                 "schema": {"type": "string", "anyOf": [{"format": "uuid"}, {"maxLength": 0}]}},
        "status": {"name": "status", "in": "query", "style": "form", "explode": False,
                   "schema": {"type": "array", "items": _ref(_SCHEMAS, "TaskStatus")},
                   "description": "Only tasks in these states (comma-separated)."},
        "idempotencyKey": {
            "name": "Idempotency-Key", "in": "header",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
            "description": ("Makes the POST safe to send again: the same key (from the same tenant) within the "
                            "controller's `idempotency_ttl` answers 200 with the task(s) the first request made "
                            "and queues nothing; with another body or other options, 422.")},
        "traceparent": {
            "name": "traceparent", "in": "header", "schema": {"type": "string"},
            "description": ("A W3C trace context: kept with the task(s), carried by their log lines and callbacks "
                            "(and the parent of their spans when the server traces with OpenTelemetry). An invalid "
                            "value is ignored, as the W3C recommendation says.")},
        "share": {"name": "share", "in": "query",
                  "schema": {"type": "integer", "minimum": 1, "maximum": defaults.MAX_SHARE_TTL},
                  "description": ("Seconds of validity of a share link: each task object answered then has a "
                                  "`share_url`. Needs the app's `SECRET_KEY` (else 400, and nothing is queued).")},
        "limit": {"name": "limit", "in": "query",
                  "schema": {"type": "integer", "minimum": 1, "maximum": defaults.MAX_LIST_LIMIT,
                             "default": defaults.LIST_LIMIT},
                  "description": "The most tasks to list."},
    }


def _error(description: str, *headers: str) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": _json(_ref(_SCHEMAS, "Error"))}
    if headers:
        response["headers"] = {name: _ref("#/components/headers/", name) for name in headers}
    return response


def _responses() -> dict[str, Any]:
    return {
        "BadRequest": _error("Invalid JSON, a body that is not a JSON object (or array of them), arguments "
                             "`execute` does not take, a bad query option or a malformed uuid."),
        "Forbidden": _error("The controller's `can_change` hook refused this request the change (pause, "
                            "resume, new priority, stop or rerun; for a stop-all, of one of the tasks): nothing was "
                            "changed."),
        "NotFound": _error("No task with this uuid (or batch with this id) belongs to this controller."),
        "Conflict": _error("The task has already ended."),
        "PayloadTooLarge": _error("The body is larger than the controller's `max_content_length`, or holds more "
                                  "tasks than its `max_bulk`."),
        "QueueFull": _error("The queue is full, or the tenant used its CPU quota of the window (`tenant_quota`): "
                            "nothing was queued; retry after `Retry-After` seconds.", "Retry-After"),
        "Unavailable": _error("The task store is unreachable (retry after `Retry-After` seconds) or the "
                              "controller has shut down.", "Retry-After"),
        "MethodNotAllowed": _error("The controller does not serve this method.", "Allow"),
        "KeyReused": _error("The `Idempotency-Key` was used with another body or other query options, or the "
                            "task declares more resources than any serving host's capacity (the message names the "
                            "largest seen); nothing was queued."),
    }


def _headers() -> dict[str, Any]:
    return {
        "WWW-Authenticate": {"description": "How to authenticate: a share link's token.", "schema": {"type": "string"}},
        "Location": {"description": "The URL that GETs the task.", "schema": {"type": "string"}},
        "Retry-After": {"description": "Seconds to wait before retrying.",
                        "schema": {"type": "integer", "minimum": 0}},
        "Allow": {"description": "The methods the URL serves.", "schema": {"type": "string"}},
    }
