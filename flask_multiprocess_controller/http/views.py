"""The extension's URLs under ``MPC_URL_PREFIX``: the health endpoint and the task API of every controller.

Every view is wrapped in the extension's ``decorator=``; every answer is JSON, errors with a
``message`` (mapped in :mod:`.errors`); a controller's ``tenant=`` hook limits what a request sees.
"""
from __future__ import annotations

import functools
import heapq
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context, url_for
from flask.typing import ResponseReturnValue

from .. import defaults
from .body import EMPTY, read_json_body
from .errors import error_response
from .handlers import (apply_patch, find_owner, finish_option, int_option, statuses_option, stop_all_option,
                       tasks_by_prefix, uuid_prefix)
from ..exceptions import InvalidRequest, MPCError, StoreError
from ..presenter import TaskObject, clip, present_change
from ..states import TERMINAL
from ..store.base import ANY_TENANT
from ..store import TaskStore

if TYPE_CHECKING:
    from ..controller import MetaMPController
    from ..extension import MultiprocessController
    from .sse import StreamConfig


#: Seconds between two reads of a followed task's log.
_LOG_FOLLOW_INTERVAL = 0.25


def make_blueprint(extension: "MultiprocessController") -> Blueprint:
    """The blueprint of the extension's views (registered by ``init_app`` under the prefix)."""
    blueprint = Blueprint("mpc", __name__)
    wrap = _wrapper(extension)
    blueprint.add_url_rule("/health", "health", wrap(_health(extension)))
    blueprint.add_url_rule("/api/tasks", "tasks", wrap(_task_list(extension)), methods=["GET", "DELETE"])
    blueprint.add_url_rule("/api/tasks/<uuid>", "task", wrap(_task_item(extension)),
                           methods=["GET", "DELETE", "PATCH"])
    blueprint.add_url_rule("/api/tasks/<uuid>/logs", "logs", wrap(_task_logs(extension)))
    blueprint.add_url_rule("/api/tasks/<uuid>/artifacts", "artifacts", wrap(_task_artifacts(extension)))
    # The path converter takes "a/b" and "../x" too, so that they are refused with a 400 that says why.
    blueprint.add_url_rule("/api/tasks/<uuid>/artifacts/<path:name>", "artifact", wrap(_task_artifacts(extension)))
    blueprint.add_url_rule("/api/tasks/<uuid>/rerun", "rerun", wrap(_task_rerun(extension)), methods=["POST"])
    blueprint.add_url_rule("/api/schedules", "schedules", wrap(_schedules(extension)))
    blueprint.add_url_rule("/api/usage", "usage", wrap(_usage(extension)))
    # Host ids contain "/" (see runtime.host_id): the path converter takes them whole.
    blueprint.add_url_rule("/api/hosts/<path:host>/drain", "host_drain", wrap(_host_drain(extension)),
                           methods=["GET", "POST", "DELETE"])
    blueprint.add_url_rule("/events", "events", wrap(_events(extension)))
    blueprint.add_url_rule("/openapi.json", "openapi", wrap(_openapi))
    from .share import add_share_routes

    add_share_routes(blueprint, extension)  # not wrapped: a share link's token is its authority
    from ..ops.dashboard import add_dashboard

    add_dashboard(blueprint, extension, wrap)
    from ..ops.metrics import add_metrics

    add_metrics(blueprint, extension, wrap)
    return blueprint


def _max_wait() -> float:
    """The long-lived-response cap of this app (``MPC_MAX_WAIT``)."""
    return float(current_app.config.get("MPC_MAX_WAIT", defaults.MAX_WAIT))


def _stream(make: Callable[[float, "StreamConfig"], Iterator[str]]) -> Response:
    """A Server-Sent Events answer of the lines ``make(deadline, config)`` gives, within the stream limits.

    The stream takes one of the app's ``MPC_MAX_STREAMS`` places (503 when none is free) until it ends
    or its response is closed, ends at ``MPC_MAX_WAIT`` from now (``deadline``, ``time.monotonic()``),
    and each of its writes may block ``MPC_STREAM_SEND_TIMEOUT`` seconds at most (see :func:`.sse.paced`).
    """
    from .sse import paced, stream_config, stream_slots

    config = stream_config(current_app.config)
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    slot = stream_slots(app).take(config.max_streams)
    try:
        deadline = time.monotonic() + _max_wait()
        sock = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
        lines = paced(make(deadline, config), sock, deadline, config.send_timeout, slot.release)
        response = Response(stream_with_context(lines), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    except BaseException:
        slot.release()
        raise
    response.call_on_close(slot.release)  # also when the stream never began
    return response


def _openapi() -> ResponseReturnValue:
    from .openapi import openapi_document

    return jsonify(openapi_document(current_app, server_url=request.script_root or None))


def _schedules(extension: "MultiprocessController") -> Callable[[], ResponseReturnValue]:
    def schedules() -> ResponseReturnValue:
        found = [info for controller in extension.controllers() for info in controller.schedules()]
        return jsonify({"schedules": found})

    return schedules


def _usage(extension: "MultiprocessController") -> Callable[[], ResponseReturnValue]:
    """``GET <prefix>/api/usage``: each controller's CPU usage per tenant against its ``tenant_quota`` (the
    request's tenant only, under a ``tenant=`` hook)."""
    def usage() -> ResponseReturnValue:
        return jsonify({"usage": [controller.usage() for controller in extension.controllers()
                                  if controller.target_task is not None]})

    return usage


def _events(extension: "MultiprocessController") -> Callable[[], ResponseReturnValue]:
    def events() -> ResponseReturnValue:
        from .sse import stream

        wanted = request.args.get("controller")
        controllers = [c for c in extension.controllers() if wanted in (None, "", c.name)]
        if not controllers:
            raise InvalidRequest(f"No controller is called {wanted!r}." if wanted else "No controller to follow.")
        tenants = {c.name: c.tenant_filter() for c in controllers}  # evaluated now, in the request

        def view(controller: "MetaMPController", event: Any) -> Optional[dict[str, Any]]:
            task = event["task"]
            wanted_tenant = tenants[controller.name]
            if wanted_tenant is not ANY_TENANT and task.get("tenant") != wanted_tenant:
                return None
            if event["kind"] == "purged":
                return {"uuid": event["uuid"], "controller": controller.name}
            return dict(controller.client_view_of(present_change(task)))

        last_id = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
        return _stream(lambda deadline, config: stream(controllers, view, last_id, deadline,
                                                       buffer=config.buffer, tenants=tenants))

    return events


def _task_logs(extension: "MultiprocessController") -> Callable[[str], ResponseReturnValue]:
    def logs(uuid: str) -> ResponseReturnValue:
        controller = find_owner(extension.controllers(), uuid)
        after = int_option("after", 0, 0, defaults.MAX_QUERY_INT)
        book = controller.store.logs
        if request.args.get("follow") not in (None, "", "0", "false"):
            return _stream(lambda deadline, config: _follow_log(controller, uuid, after, deadline))
        lines = book.read(uuid, after)
        return jsonify({"lines": [{"n": n, "line": line} for n, line in lines],
                        "next": lines[-1][0] if lines else after})

    return logs


def _task_artifacts(extension: "MultiprocessController") -> Callable[..., ResponseReturnValue]:
    def artifacts(uuid: str, name: Optional[str] = None) -> ResponseReturnValue:
        controller = find_owner(extension.controllers(), uuid)
        answer = controller.artifacts(uuid, name)
        return jsonify(answer) if isinstance(answer, dict) else answer

    return artifacts


def _follow_log(controller: "MetaMPController", uuid: str, after: int, deadline: float) -> Iterator[str]:
    """New log lines as SSE ``line`` events, until the task ended and its last line was sent, or ``deadline``
    (``time.monotonic()``) passed: looked at before every line, so a task that logs without pause does
    not keep the stream open."""
    from .sse import message

    yield "retry: 1000\n\n"
    while time.monotonic() < deadline:
        lines = controller.store.logs.read(uuid, after)
        for n, line in lines:
            if time.monotonic() >= deadline:
                return
            yield message("line", {"n": n, "line": line}, str(n))
            after = n
        if not lines:
            row = controller.store.get(uuid)
            if row is None or row["status"] in TERMINAL:
                yield message("end", {"status": row["status"] if row else None})
                return
            time.sleep(max(0.0, min(_LOG_FOLLOW_INTERVAL, deadline - time.monotonic())))


def _wrapper(extension: "MultiprocessController") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Map package errors to JSON answers, then apply the extension's decorator."""

    def wrap(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def answering(*args: Any, **kwargs: Any) -> ResponseReturnValue:
            try:
                return view(*args, **kwargs)  # type: ignore[no-any-return]
            except MPCError as exc:
                body, status, headers = error_response(exc)
                return jsonify(body), status, headers

        return extension.decorator(answering) if extension.decorator else answering

    return wrap


def public_store_name(store: TaskStore) -> str:
    """How a store is shown to operators: its URL without any password."""
    from ..store import redacted_url

    url = getattr(store, "url", None)
    if not isinstance(url, str):
        path = getattr(store, "path", None)
        return f"sqlite:///{path}" if isinstance(path, str) else type(store).__name__
    return redacted_url(url)


def _host_drain(extension: "MultiprocessController") -> Callable[[str], ResponseReturnValue]:
    """``POST <prefix>/api/hosts/<host>/drain`` drains the host, ``DELETE`` undrains it, ``GET`` reads it:
    200 with its state."""

    def host_drain(host: str) -> ResponseReturnValue:
        from ..engine.drain import drain_state, set_host_drained

        if request.method == "GET":
            return jsonify(drain_state(extension.controllers(), host))
        return jsonify(set_host_drained(extension.controllers(), host, request.method == "POST"))

    return host_drain


def _drained_hosts(extension: "MultiprocessController") -> list[Any]:
    """The drained hosts health shows (none when the stores cannot say: the controllers' entries tell why)."""
    from ..engine.drain import drained_hosts

    try:
        return list(drained_hosts(extension.controllers()))
    except StoreError:
        return []


def _health(extension: "MultiprocessController") -> Callable[[], ResponseReturnValue]:
    """``GET <prefix>/health``. A controller's task counts follow its ``tenant=`` hook: a tenant's
    request counts that tenant's tasks only; the rest (limits, store, hosts) is no tenant's data."""

    def health() -> ResponseReturnValue:
        report: dict[str, Any] = {}
        ok = True
        for controller in extension.controllers():
            entry: dict[str, Any] = {"max_num_process": controller.max_num_process,
                                     "max_memory": controller.max_memory}
            try:
                store = controller.store
                entry["store"] = public_store_name(store)
                counts = store.counts(controller.name, tenant=controller.tenant_filter())
                entry.update(running=counts.get("running", 0) + counts.get("stopping", 0),
                             queued=counts.get("queued", 0), paused=counts.get("paused", 0))
                entry["callbacks_dropped"] = store.callbacks_dropped(controller.name)
            except StoreError as exc:
                ok = False
                entry.update(status="unavailable", message=exc.message)
            report[controller.name] = entry
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "controllers": report,
                                "drained_hosts": _drained_hosts(extension)}
        runtime = next(filter(None, (c.local_runtime() for c in extension.controllers())), None)
        if runtime is not None:  # this process serves: on which host, and whether it claims (not if drained)
            body["this_process"] = {"host": runtime.host, "host_drained": runtime.host_drained}
        if ok:
            return jsonify(body), 200
        return jsonify(body), 503, {"Retry-After": str(defaults.RETRY_AFTER)}

    return health


def _task_list(extension: "MultiprocessController") -> Callable[[], ResponseReturnValue]:
    def tasks() -> ResponseReturnValue:
        if request.method == "DELETE":
            return _stop_all(extension)
        wanted = request.args.get("controller")
        controllers = [c for c in extension.controllers() if wanted in (None, "", c.name)]
        if wanted and not controllers:
            raise InvalidRequest(f"No controller is called {wanted!r}.")
        statuses = statuses_option(request.args.get("status"))
        limit = int_option("limit", defaults.LIST_LIMIT, 1, defaults.MAX_LIST_LIMIT)
        before = int_option("before", None, 1, defaults.MAX_QUERY_INT)
        if request.args.get("uuid_prefix") is not None:
            if before is not None:
                raise InvalidRequest("?uuid_prefix= lists the few tasks it names, on one page: drop ?before=.")
            return jsonify(list_by_prefix(controllers, uuid_prefix(request.args["uuid_prefix"]), statuses, limit))
        return jsonify(list_all(controllers, statuses, limit, before))

    return tasks


def _stop_all(extension: "MultiprocessController") -> ResponseReturnValue:
    """``DELETE <prefix>/api/tasks?controller=NAME&all=true``: the resource's stop-all, for one named controller."""
    name = request.args.get("controller")
    if not stop_all_option(request.args):
        raise InvalidRequest("DELETE of the task list stops every task of one controller: "
                             "send ?controller=<name>&all=true.")
    controller = next((c for c in extension.controllers() if name and c.name == name), None)
    if controller is None:
        known = ", ".join(c.name for c in extension.controllers()) or "none"
        raise InvalidRequest(f"Name the controller to stop with ?controller= (known: {known})."
                             if not name else f"No controller is called {name[:80]!r} (known: {known}).")
    return jsonify(controller.stop_all()), 202


def list_all(controllers: list["MetaMPController"], statuses: list[str], limit: int,
             before: Optional[int]) -> dict[str, Any]:
    """The newest tasks of several controllers, merged newest first, with the cursor of the next page.

    Each controller's store returns at most ``limit`` tasks older than ``before`` (a ``seq``),
    so a page costs O(``limit``) per controller. Controllers sharing a store (the usual case)
    share its ``seq`` order; across different stores the order is each store's own.
    """
    pages = []
    for controller in controllers:
        rows = controller.store.list_tasks(controller.name, statuses or None, limit, before,
                                           tenant=controller.tenant_filter())
        pages.append([(row["seq"], controller, row) for row in rows])
    merged = list(heapq.merge(*pages, key=lambda item: item[0], reverse=True))[:limit]
    found: list[TaskObject] = [clip(controller.client_view(row), defaults.LIST_VALUE_SIZE)
                               for _, controller, row in merged]
    next_cursor = merged[-1][0] if len(merged) == limit else None
    return {"tasks": found, "next": next_cursor}


def list_by_prefix(controllers: list["MetaMPController"], prefix: str, statuses: list[str],
                   limit: int) -> dict[str, Any]:
    """The tasks whose uuid begins with ``prefix`` (see :func:`.handlers.tasks_by_prefix`), newest first, as
    :func:`list_all` shows them (no next page): how a client finds the task an 8-digit id names."""
    found = [(controller, row) for controller, row in tasks_by_prefix(controllers, prefix, limit)
             if not statuses or row["status"] in statuses]
    return {"tasks": [clip(controller.client_view(row), defaults.LIST_VALUE_SIZE) for controller, row in found],
            "next": None}


def _task_rerun(extension: "MultiprocessController") -> Callable[[str], ResponseReturnValue]:
    """``POST <prefix>/api/tasks/<uuid>/rerun``: queue an ended task again (see
    :meth:`~..controller.MetaMPController.rerun`). 202 with the new task object and a ``Location`` to its URL here;
    404 for a task the request may not see, 409 while the task has not ended, 403 when ``can_change`` refuses.
    A body, if any, is not read: the new task takes the first one's arguments."""

    def rerun(uuid: str) -> ResponseReturnValue:
        controller = find_owner(extension.controllers(), uuid)
        task = controller.client_view_of(controller.rerun(uuid))
        return jsonify(task), 202, {"Location": url_for("mpc.task", uuid=task["uuid"])}

    return rerun


def _task_item(extension: "MultiprocessController") -> Callable[[str], ResponseReturnValue]:
    def task(uuid: str) -> ResponseReturnValue:
        controller = find_owner(extension.controllers(), uuid)
        if request.method == "DELETE":
            stopped = controller.client_view_of(controller.stop(uuid, finish=finish_option(request.args)))
            return jsonify(stopped), (200 if stopped["status"] == "stopped" else 202)
        if request.method == "PATCH":
            body = read_json_body(controller.max_content_length)
            return jsonify(controller.client_view_of(apply_patch(controller, uuid, {} if body is EMPTY else body)))
        return jsonify(controller.client_view_of(controller.status(uuid)))

    return task
