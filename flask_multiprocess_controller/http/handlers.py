"""The HTTP layer: the default handlers of a controller's HTTP methods, and all request parsing.

A controller's ``post``, ``get``, ``delete`` and ``patch`` (what :class:`~.resource.MetaMPResource`
calls, and what a subclass may override and call with ``super()``) answer through the functions here;
the extension's API (:mod:`.views`), the dashboard's API and the ``flask mpc`` commands parse what they
are given with the same functions. The controller itself never reads the request.
"""
from __future__ import annotations

import functools
import logging
import math
import re
import uuid as uuid_module
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

from flask import has_request_context, request, url_for
from werkzeug.routing import BuildError

from .. import defaults
from ..exceptions import AmbiguousTaskPrefix, InvalidRequest, TaskNotFound, TaskPrefixNotFound
from ..presenter import TaskObject, clip
from ..store.base import Row
from ..states import ALL_STATUSES, TERMINAL, TaskStatus
from . import compat as compat_module
from .. import idempotency
from .patching import check_priority, parse_change
from .responses import Reply

if TYPE_CHECKING:
    from ..controller import MetaMPController

#: HTTP methods a controller may serve, in the order an ``Allow`` header lists them.
HTTP_METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")
#: Handlers whose default works on the controller's tasks: served when it has a ``target_task``.
TASK_HANDLERS = frozenset({"get", "post", "delete", "patch"})

Handler = Callable[..., Any]


def log_call(logger: logging.Logger, name: str) -> Callable[[Handler], Handler]:
    """The default ``decorator=``: log each call of an HTTP method at DEBUG."""

    def wrap(method: Handler) -> Handler:
        @functools.wraps(method)
        def logged(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = method(self, *args, **kwargs)
            logger.debug("%s.%s(%s) -> %s", name, method.__name__, kwargs or list(args), result)
            return result

        return logged

    return wrap


# -- parsing -------------------------------------------------------------------------------------------


def in_request() -> bool:
    """Whether a request is being served (tenant hooks and locations only apply then)."""
    return has_request_context()


def query_options() -> Mapping[str, str]:
    """The query string of the request being served (empty outside a request)."""
    return request.args if has_request_context() else {}


def query_number(name: str, raw: Optional[str], kind: type = float, minimum: float = 0.0,
                 maximum: Optional[float] = None) -> Optional[Any]:
    """Query option ``name`` as a number of ``kind`` within bounds; None when absent; else :class:`InvalidRequest`.

    Every number is bounded: an integer without a ``maximum`` at :data:`~.defaults.MAX_QUERY_INT` (what
    every store's integers hold: a cursor of 2^64 is a 400, not a store error), a float at any finite value.
    """
    if raw is None or raw == "":
        return None
    if kind is int and maximum is None:
        maximum = defaults.MAX_QUERY_INT
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidRequest(f"Query option '{name}' must be {'an integer' if kind is int else 'a number'}, "
                             f"not {raw[:40]!r}.") from None
    if kind is float and not math.isfinite(value):
        raise InvalidRequest(f"Query option '{name}' must be a finite number, not {raw[:40]!r}.")
    if maximum is not None and not minimum <= value <= maximum:
        low, high = (f"{minimum:d}", f"{maximum:d}") if kind is int else (f"{minimum:g}", f"{maximum:g}")
        raise InvalidRequest(f"Query option '{name}' must be between {low} and {high}, not {raw[:40]}.")
    if value < minimum:
        raise InvalidRequest(f"Query option '{name}' must be at least {minimum:g}, not {raw[:40]!r}.")
    return value


def int_option(name: str, default: Optional[int], minimum: int, maximum: Optional[int]) -> Any:
    """Integer query option ``name`` of the request being served (``default`` when absent)."""
    value = query_number(name, query_options().get(name), int, minimum, maximum)
    return default if value is None else value


def statuses_option(raw: Optional[str]) -> list[str]:
    """A ``?status=a,b`` filter: the statuses named (none: every status); unknown ones are refused."""
    statuses = [s for s in (raw or "").split(",") if s]
    unknown = [s for s in statuses if s not in ALL_STATUSES]
    if unknown:
        raise InvalidRequest(f"Unknown status {unknown[0][:40]!r}: use one of {', '.join(ALL_STATUSES)}.")
    return statuses


#: A uuid in its canonical form (what :func:`parse_uuid` returns), as clients mostly send it.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def parse_uuid(value: Any) -> str:
    """Return the canonical form of a task uuid, or raise :class:`InvalidRequest`."""
    if not isinstance(value, str):
        raise InvalidRequest(f"A task uuid must be a string, not {type(value).__name__}.")
    if _CANONICAL_UUID.fullmatch(value):  # already canonical: no UUID object to make and print
        return value
    try:
        return str(uuid_module.UUID(value))
    except ValueError:
        raise InvalidRequest(f"{value[:80]!r} is not a valid task uuid.") from None


#: Hex digits a uuid prefix needs at least: the 8 the dashboard and the CLI's tables show.
MIN_PREFIX_DIGITS = 8
#: Tasks an ambiguous prefix lists at most.
PREFIX_CANDIDATES = 5


def uuid_prefix(value: Any) -> str:
    """The canonical form of a uuid prefix of 8 to 31 hex digits, dashes where a uuid has them
    (``ABCD1234ef`` and ``abcd1234-ef`` give ``abcd1234-ef``), or :class:`InvalidRequest`."""
    text = value.strip().lower() if isinstance(value, str) else ""
    digits = text.replace("-", "")
    canonical = "-".join(digits[a:b] for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)) if digits[a:b])
    if (not MIN_PREFIX_DIGITS <= len(digits) < 32 or any(c not in "0123456789abcdef" for c in digits)
            or not (text == digits or canonical.startswith(text.rstrip("-")))):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise InvalidRequest(f"{shown!r} is not a valid task uuid, nor the start of one: give the uuid, or at "
                             f"least its first {MIN_PREFIX_DIGITS} hex digits.")
    return canonical


def tasks_by_prefix(controllers: Iterable["MetaMPController"], prefix: str,
                    limit: int) -> list[tuple["MetaMPController", Row]]:
    """The tasks of ``controllers`` (visible, in a request, to its tenant) whose uuid begins with ``prefix``
    (canonical, see :func:`uuid_prefix`), newest first, at most ``limit``: ``(controller, row)`` pairs.

    Each distinct store is asked once (:meth:`~..store.base.TaskStore.find_by_prefix`).
    """
    by_name = {c.name: c for c in controllers}
    found: list[tuple["MetaMPController", Row]] = []
    asked: list[Any] = []
    for controller in by_name.values():
        store = controller.store
        if any(store is seen for seen in asked):
            continue
        asked.append(store)
        try:
            rows = store.find_by_prefix(prefix, limit + 20)  # room for other apps' and tenants' tasks
        except NotImplementedError as exc:
            raise InvalidRequest(f"{exc} Give the whole uuid.") from None
        for row in rows:
            owner = by_name.get(row["controller"])
            if owner is not None and owner.store is store and owner.visible(row):
                found.append((owner, row))
    found.sort(key=lambda pair: pair[1]["seq"], reverse=True)
    return found[:limit]


def resolve_task(controllers: Iterable["MetaMPController"], reference: str) -> tuple["MetaMPController", str]:
    """The controller and uuid of the task ``reference`` names: its uuid, or a prefix of 8 or more hex
    digits that begins the uuid of exactly one task (of ``controllers``, visible to the request's tenant).

    :raises InvalidRequest: ``reference`` is neither a uuid nor such a prefix.
    :raises TaskNotFound: no such task (:class:`~..exceptions.TaskPrefixNotFound` for a prefix).
    :raises AmbiguousTaskPrefix: the prefix begins the uuid of several tasks (some are listed).
    """
    controllers = list(controllers)
    try:
        uuid = parse_uuid(reference)
    except InvalidRequest:
        pass
    else:
        return find_owner(controllers, uuid), uuid
    prefix = uuid_prefix(reference)
    found = tasks_by_prefix(controllers, prefix, PREFIX_CANDIDATES + 1)
    if not found:
        raise TaskPrefixNotFound(prefix)
    if len(found) > 1:
        raise AmbiguousTaskPrefix(prefix, [(row["uuid"], controller.name, row["status"])
                                           for controller, row in found[:PREFIX_CANDIDATES]],
                                  more=len(found) > PREFIX_CANDIDATES)
    controller, row = found[0]
    return controller, str(row["uuid"])


def stop_all_option(options: Mapping[str, str]) -> bool:
    """The ``?all=`` of a DELETE: ``true`` (or ``1``) stops every task; ``false``, ``0`` or none, one."""
    return _flag_option(options, "all")


def finish_option(options: Mapping[str, str]) -> bool:
    """The ``?finish=`` of a DELETE: ``true`` (or ``1``) asks the task to finish now, returning its answer so
    far; ``false``, ``0`` or none, a plain stop."""
    return _flag_option(options, "finish")


def _flag_option(options: Mapping[str, str], name: str) -> bool:
    raw = options.get(name)
    if raw is None or raw.lower() in ("false", "0"):
        return False
    if raw.lower() in ("true", "1"):
        return True
    raise InvalidRequest(f"Query option {name!r} must be true or false, not {raw[:40]!r}.")


def wait_option(controller: "MetaMPController", options: Mapping[str, str]) -> Optional[float]:
    """The ``?wait=`` of a request, clamped to the controller's ``max_wait`` (a longer wait is not refused)."""
    wait = query_number("wait", options.get("wait"))
    return None if wait is None else min(wait, controller.max_wait)


def location(uuid: str) -> str:
    """The URL that GETs task ``uuid`` through the resource being served ("" outside a request)."""
    if not has_request_context() or request.endpoint is None:
        return ""
    try:
        return url_for(request.endpoint, uuid=uuid)
    except BuildError:
        return f"{request.path}?uuid={uuid}"


def find_owner(controllers: Iterable["MetaMPController"], uuid: str) -> "MetaMPController":
    """The controller whose task ``uuid`` is (and, in a request, visible to its tenant).

    :raises TaskNotFound: none of ``controllers`` has it, or the request's tenant may not see it.
    """
    uuid = parse_uuid(uuid)
    for controller in controllers:
        row = controller.store.get(uuid)
        if row is not None and row["controller"] == controller.name and controller.visible(row):
            return controller
    raise TaskNotFound(uuid)


# -- the default handlers ---------------------------------------------------------------------------


def post(controller: "MetaMPController", *args: Mapping[str, Any], **kwargs: Any) -> Reply:
    """Queue a task (keyword arguments) or several (positional mappings, all or none)."""
    controller.require_task("post")
    from .share import add_share_urls, share_option

    share = share_option(query_options())  # checked before anything is queued
    reply = _answer_post(controller, *args, **kwargs)
    if share is not None:
        add_share_urls(reply, share)
    if controller.compat:
        items = list(args) if args else [kwargs]
        return compat_module.post_reply(controller.name, items, bool(args), reply, controller.posts)
    return reply


def get(controller: "MetaMPController", **kwargs: Any) -> Reply:
    """One task (when a ``uuid`` is given) or the list view."""
    controller.require_task("get")
    if controller.compat:
        return compat_module.get_reply(kwargs, lambda: _answer_get(controller, **kwargs))
    return _answer_get(controller, **kwargs)


def delete(controller: "MetaMPController", **kwargs: Any) -> Reply:
    """Stop task ``uuid``, or with ``?all=true`` every task of the controller."""
    controller.require_task("delete")
    if controller.compat and not (kwargs.get("uuid") is None and "all" in query_options()):
        return compat_module.delete_reply(kwargs, lambda: _answer_delete(controller, **kwargs))
    return _answer_delete(controller, **kwargs)


def patch(controller: "MetaMPController", *args: Any, **kwargs: Any) -> Reply:
    """Pause, resume or re-prioritise task ``uuid`` as the body says."""
    controller.require_task("patch")
    if args:
        raise InvalidRequest("PATCH takes one JSON object, not an array.")
    if kwargs.get("uuid") is None:
        raise InvalidRequest("PATCH needs the uuid of a task: in the path, as ?uuid=, or in a JSON body.")
    return Reply(controller.client_view_of(apply_patch(controller, parse_uuid(kwargs["uuid"]), kwargs)))


def apply_patch(controller: "MetaMPController", uuid: str, body: Any) -> TaskObject:
    """The change a PATCH body asks for, applied to task ``uuid`` (the resource's PATCH and the API's)."""
    if not isinstance(body, Mapping):
        raise InvalidRequest('PATCH takes a JSON object: {"status": "paused"}, {"status": "running"} '
                             'or {"priority": <integer>}.')
    change = parse_change(body)
    if change.priority is not None:
        return controller.reprioritise(uuid, change.priority)
    if change.status == TaskStatus.PAUSED:
        return controller.pause(uuid)
    return controller.resume(uuid)


def idempotency_key() -> Optional[str]:
    """The ``Idempotency-Key`` header of the request being served (None when absent or outside a request)."""
    return request.headers.get(idempotency.HEADER) if has_request_context() else None


def _answer_post(controller: "MetaMPController", *args: Mapping[str, Any], **kwargs: Any) -> Reply:
    options = query_options()
    priority = check_priority(query_number("priority", options.get("priority"), int, minimum=-(2 ** 62)) or 0)
    timeout = query_number("timeout", options.get("timeout"), maximum=defaults.MAX_SECONDS)
    wait = wait_option(controller, options)
    if args and kwargs:
        raise InvalidRequest("Send either one JSON object or a JSON array of objects.")
    key = idempotency_key()
    if key is not None:
        return _answer_keyed_post(controller, key, list(args) if args else [kwargs], bool(args), priority, timeout,
                                  wait)
    if args:
        return _answer_bulk_post(controller, list(args), priority, timeout, wait)
    if wait is None:
        task, status = controller.enqueue([kwargs], priority=priority, timeout=timeout)[0], 202
    else:  # the wait reads the task anyway: no queue position is computed for it first
        task = controller.wait(controller.enqueue_rows([kwargs], priority, timeout, None)[0]["uuid"], wait)
        status = 200 if task["status"] in TERMINAL else 202
    task = controller.client_view_of(task)
    return Reply(task, status, {"Location": location(task["uuid"])})


def _answer_keyed_post(controller: "MetaMPController", key: str, items: list[Mapping[str, Any]], bulk: bool,
                       priority: int, timeout: Optional[float], wait: Optional[float]) -> Reply:
    """A POST with an ``Idempotency-Key``: 202 as any POST the first time; the same key again, 200 with what
    it made (after waiting as a GET ``?wait=`` would), and nothing queued (see :mod:`..idempotency`)."""
    submitted = controller.enqueue_once(key, items, priority=priority, timeout=timeout, bulk=bulk)
    rows = submitted.rows
    if bulk:
        batch = rows[0].get("batch")
        if wait is not None and batch is not None:
            view = controller.wait_batch(batch, wait)
            tasks, ended = view["tasks"], view["ended"] == view["total"]
        else:
            tasks = controller.submitted_tasks(submitted)
            ended = all(task["status"] in TERMINAL for task in tasks)
        status = 200 if submitted.replayed or (wait is not None and ended) else 202
        return Reply({"tasks": [controller.client_view_of(t) for t in tasks], "batch": batch}, status)
    uuid = rows[0]["uuid"]
    task = (controller.wait(uuid, wait) if wait is not None
            else controller.submitted_tasks(submitted)[0])
    status = 200 if submitted.replayed or task["status"] in TERMINAL else 202
    task = controller.client_view_of(task)
    return Reply(task, status, {"Location": location(task["uuid"])})


def _answer_bulk_post(controller: "MetaMPController", items: list[Mapping[str, Any]], priority: int,
                      timeout: Optional[float], wait: Optional[float]) -> Reply:
    """A bulk POST: ``{"tasks": [...], "batch": id}``; with ``?wait=``, 200 once the whole batch ended."""
    batch = controller.submit_many(items, priority=priority, timeout=timeout)
    tasks, status = batch.tasks, 202
    if wait is not None:
        view = controller.wait_batch(batch.id, wait)
        tasks = view["tasks"]
        if view["ended"] == view["total"]:
            status = 200
    return Reply({"tasks": [controller.client_view_of(t) for t in tasks], "batch": batch.id}, status)


def _answer_get(controller: "MetaMPController", **kwargs: Any) -> Reply:
    options = query_options()
    wait = wait_option(controller, options)
    if options.get("batch") is not None:
        return _answer_batch_get(controller, options["batch"], kwargs.get("uuid"), wait)
    if kwargs.get("uuid") is None:
        statuses = [s for s in (options.get("status") or "").split(",") if s]
        limit = query_number("limit", options.get("limit"), int, minimum=1, maximum=defaults.MAX_LIST_LIMIT)
        listing = controller.tasks(statuses, defaults.LIST_LIMIT if limit is None else limit)
        listing["tasks"] = [controller.client_view_of(t) for t in listing["tasks"]]
        return Reply(listing)
    uuid = parse_uuid(kwargs["uuid"])
    return Reply(controller.client_view_of(controller.wait(uuid, wait) if wait is not None
                                           else controller.status(uuid)))


def _answer_batch_get(controller: "MetaMPController", batch: str, uuid: Optional[str],
                      wait: Optional[float]) -> Reply:
    """``?batch=<id>``: 200 once every task of the batch ended, else 202; tasks clipped as in a list view."""
    if uuid is not None:
        raise InvalidRequest("A GET names one task (a uuid) or one batch (?batch=), not both.")
    view = controller.wait_batch(batch, 0.0 if wait is None else wait)
    view["tasks"] = [clip(controller.client_view_of(t), defaults.LIST_VALUE_SIZE) for t in view["tasks"]]
    return Reply(dict(view), 200 if view["ended"] == view["total"] else 202)


def _answer_delete(controller: "MetaMPController", **kwargs: Any) -> Reply:
    options = query_options()
    every = stop_all_option(options)
    finish = finish_option(options)
    if every and finish:
        raise InvalidRequest("?finish=true asks one task (a uuid) to finish now; it does not go with ?all=true.")
    if kwargs.get("uuid") is None and every:
        return Reply(controller.stop_all(), 202)
    if every:
        raise InvalidRequest("DELETE stops one task (a uuid) or all of them (?all=true), not both.")
    if kwargs.get("uuid") is None:
        raise InvalidRequest("DELETE needs the uuid of a task (in the path, as ?uuid=, or in a JSON body), "
                             "or ?all=true to stop every task of the controller.")
    task = controller.client_view_of(controller.stop(parse_uuid(kwargs["uuid"]), finish=finish))
    return Reply(task, 200 if task["status"] == TaskStatus.STOPPED else 202)
