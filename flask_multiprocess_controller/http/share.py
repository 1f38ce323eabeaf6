"""Share links: a signed, expiring, read-only URL of one task, for the people an app serves.

``controller.share_url(uuid, ttl=3600)`` (or ``POST <resource>?share=<seconds>``, whose answer then
carries a ``share_url``) gives ``<prefix>/share/<uuid>?token=<token>``. The token is signed with the
app's ``SECRET_KEY`` (itsdangerous, keys in ``SECRET_KEY_FALLBACKS`` still open the links they signed)
and names the one task and the time the link expires. The link shows that task only:

- ``GET <prefix>/share/<uuid>?token=...``: its status, progress, result, error and files as JSON, or,
  to a browser (``Accept`` preferring ``text/html``), a small page that follows them live;
- ``GET <prefix>/share/<uuid>/events?token=...``: Server-Sent Events: first a ``task`` event with the
  task as the link shows it, then each change of it (``progress``, ``started``, ``ended``...), merged
  into it; the stream ends with the task (and at ``MPC_MAX_WAIT``, or when the link expires);
- ``GET <prefix>/share/<uuid>/artifacts/<name>?token=...``: a file the task produced.

The token may also come as ``Authorization: Bearer <token>``. No token: 401; an expired one: 401; an
altered one, or another task's: 403, and the store is not read. What a link shows is a narrow view of
the task object (:data:`SHARED_KEYS`): never its arguments, process, host, tenant or tracebacks, and the
exception text only when the controller's ``expose_errors`` allows it.

These URLs are not wrapped in the extension's ``decorator=`` nor filtered by the ``tenant=`` hook: the
token is their authority, so that people without an account of the app can follow the task they were
given. The page and ``<prefix>/mpc-progress.js`` (the ``<mpc-progress>`` element it is built with, for
an app's own pages too) and ``<prefix>/share.css`` carry the dashboard's Content-Security-Policy, but may
be framed by the app's own origin (``frame-ancestors 'self'``).

.. versionadded:: 0.3
"""
from __future__ import annotations

import functools
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional

from flask import Blueprint, Flask, Response, current_app, has_app_context, has_request_context, jsonify, request
from flask import url_for
from flask.typing import ResponseReturnValue
from itsdangerous import BadSignature, URLSafeSerializer
from werkzeug.routing import BuildError

from .. import defaults
from ..artifacts import artifact_response
from ..exceptions import (InvalidRequest, MPCError, ShareDenied, ShareLinkExpired, ShareLinksUnavailable,
                          ShareTokenMissing, TaskNotFound)
from ..presenter import present_change
from ..states import TERMINAL
from ..store.base import ANY_TENANT, Row
from .errors import error_response
from .handlers import parse_uuid, query_number

if TYPE_CHECKING:
    from ..controller import MetaMPController
    from ..events import Event
    from ..extension import MultiprocessController

#: What a share link's signature is salted with: a token made for anything else never opens it.
SALT = "flask-multiprocess-controller.share"

#: The keys of the task object a share link shows (those the task has: ``stopped_with_result`` and
#: ``artifacts`` where the server keeps them).
SHARED_KEYS = ("uuid", "status", "progress", "percent", "result", "error", "position", "eta", "created_at",
               "started_at", "ended_at", "stopped_with_result", "artifacts")

#: The dashboard's policy, but the page may be framed by the app's own pages.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'self'")

#: The public files of share links, with their content types (they hold no data).
STATIC_FILES = {
    "mpc-progress.js": "text/javascript; charset=utf-8",
    "share.css": "text/css; charset=utf-8",
}

#: Event names that end a share link's stream: its task ended, or is gone.
_FINAL_EVENTS = frozenset({"ended", "purged"})


# -- tokens ----------------------------------------------------------------------------------------------


def _serializer(app: Flask) -> URLSafeSerializer:
    """The signer of ``app``'s share links.

    :raises ShareLinksUnavailable: the app has no ``SECRET_KEY``.
    """
    key = app.config.get("SECRET_KEY")
    if not key:
        raise ShareLinksUnavailable("Share links are signed with the app's SECRET_KEY, which is not set: set "
                                    "app.config['SECRET_KEY'] to a long random value (the same in every "
                                    "serving process and host).")
    fallbacks = [k for k in app.config.get("SECRET_KEY_FALLBACKS") or [] if k]
    return URLSafeSerializer([*fallbacks, key], salt=SALT)  # signs with the last, opens with any


def make_token(app: Flask, uuid: str, ttl: float) -> str:
    """A token that opens task ``uuid``'s share link for ``ttl`` seconds from now."""
    return str(_serializer(app).dumps([uuid, int(math.ceil(time.time() + ttl))]))


def check_token(app: Flask, uuid: str, token: Optional[str]) -> float:
    """Check that ``token`` opens task ``uuid``'s share link now; return when it expires (UNIX time).

    :raises ShareTokenMissing: no token.
    :raises ShareDenied: the token was altered, or is another task's.
    :raises ShareLinkExpired: the token is this task's but has expired.
    """
    if not token:
        raise ShareTokenMissing("This link needs its token (?token=...): ask for a new link.")
    try:
        payload = _serializer(app).loads(token)
    except BadSignature:
        raise ShareDenied("This link's token is not valid.") from None
    if (not isinstance(payload, list) or len(payload) != 2 or not isinstance(payload[0], str)
            or not isinstance(payload[1], int)):
        raise ShareDenied("This link's token is not valid.")
    if payload[0] != uuid:
        raise ShareDenied("This link's token is for another task.")
    if payload[1] <= time.time():
        raise ShareLinkExpired("This link has expired: ask for a new one.")
    return float(payload[1])


def _app() -> Flask:
    """The current app, which must have the extension (it serves share links).

    :raises ShareLinksUnavailable: no app context, or an app without the extension.
    """
    if not has_app_context():
        raise ShareLinksUnavailable("Share links are made inside the app: call share_url() in a request, or "
                                    "within `with app.app_context():`.")
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    if "mpc" not in app.extensions:
        raise ShareLinksUnavailable("Share links are served by the MultiprocessController extension: "
                                    "initialise it in this app (MultiprocessController(app)).")
    return app


def check_ttl(ttl: Any) -> int:
    """A link's validity in whole seconds, 1 to :data:`~..defaults.MAX_SHARE_TTL`.

    :raises InvalidRequest: anything else.
    """
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 1 <= ttl <= defaults.MAX_SHARE_TTL:
        raise InvalidRequest(f"A share link lasts 1 to {defaults.MAX_SHARE_TTL} seconds, not {ttl!r}.")
    return int(math.ceil(ttl))


def signed_url(uuid: str, ttl: float) -> str:
    """The share link of task ``uuid`` for ``ttl`` seconds (no check that the task exists).

    Absolute in a request (or with ``SERVER_NAME`` set), else the path from the app's root.
    """
    app = _app()
    token = make_token(app, uuid, ttl)
    try:
        return url_for("mpc.share", uuid=uuid, token=token,
                       _external=has_request_context() or bool(app.config.get("SERVER_NAME")))
    except (RuntimeError, BuildError):  # outside a request, without SERVER_NAME
        return f"{app.extensions['mpc'].prefix}/share/{uuid}?token={token}"


def share_url(controller: "MetaMPController", uuid: str, ttl: float = defaults.SHARE_TTL) -> str:
    """What :meth:`~..controller.MetaMPController.share_url` returns: see there."""
    ttl = check_ttl(ttl)
    app = _app()
    _serializer(app)  # no key: say so before reading the store
    row = controller._row(uuid)  # a task of this controller, that the request (if any) may see
    return signed_url(row["uuid"], ttl)


def share_option(options: Mapping[str, str]) -> Optional[int]:
    """The ``?share=<seconds>`` of a POST, checked (and the app able to sign links) before anything is queued."""
    ttl = query_number("share", options.get("share"), int, minimum=1, maximum=defaults.MAX_SHARE_TTL)
    if ttl is not None:
        _serializer(_app())
    return ttl


def add_share_urls(reply: dict[str, Any], ttl: int) -> None:
    """Give the task object(s) of a POST's answer their ``share_url``."""
    listed = reply.get("tasks")
    tasks = listed if isinstance(listed, list) else [reply]
    for task in tasks:
        if isinstance(task, dict) and isinstance(task.get("uuid"), str):
            task["share_url"] = signed_url(task["uuid"], ttl)


# -- what a link shows -----------------------------------------------------------------------------------


def shared_view(task: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``task`` (a task object as clients see it, or part of one) that a share link shows."""
    view = {key: task[key] for key in SHARED_KEYS if key in task}
    error = view.get("error")
    if isinstance(error, dict):
        view["error"] = {"type": error.get("type"), "message": error.get("message")}
    return view


def _opened(extension: "MultiprocessController", uuid: str) -> tuple["MetaMPController", Row, float]:
    """The controller and row of the task the request's token opens, and when the token expires.

    The token is checked before the store is read; the request's tenant is not asked (the token is the
    authority).
    """
    uuid = parse_uuid(uuid)
    expires = check_token(current_app, uuid, _request_token())
    for controller in extension.controllers():
        row = controller.store.get(uuid)
        if row is not None and row["controller"] == controller.name:
            return controller, row, expires
    raise TaskNotFound(uuid)


def _request_token() -> Optional[str]:
    token = request.args.get("token")
    if not token:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else None
    return token or None


# -- the views -------------------------------------------------------------------------------------------


def add_share_routes(blueprint: Blueprint, extension: "MultiprocessController") -> None:
    """Add the share links' URLs to the extension's blueprint (not wrapped in its ``decorator=``)."""
    blueprint.add_url_rule("/share/<uuid>", "share", _answering(_task(extension)))
    blueprint.add_url_rule("/share/<uuid>/events", "share_events", _answering(_events(extension)))
    blueprint.add_url_rule("/share/<uuid>/artifacts/<name>", "share_artifact", _answering(_artifact(extension)))
    for name in STATIC_FILES:
        blueprint.add_url_rule(f"/{name}", f"share_{name.replace('.', '_').replace('-', '_')}", _static(name))


def _secured(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"  # the token stays in the link
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _answering(view: Callable[..., ResponseReturnValue]) -> Callable[..., Response]:
    """Errors as JSON ``message`` answers; every answer secured (see :func:`_secured`)."""

    @functools.wraps(view)
    def answering(*args: Any, **kwargs: Any) -> Response:
        try:
            answer = current_app.make_response(view(*args, **kwargs))
        except MPCError as exc:
            body, status, headers = error_response(exc)
            answer = current_app.make_response((jsonify(body), status, headers))
        return _secured(answer)

    return answering


def _package_file(name: str) -> bytes:
    from ..ops.dashboard import _package_file as read

    return read(name)


def _static(name: str) -> Callable[[], ResponseReturnValue]:
    def static() -> ResponseReturnValue:
        answer = _secured(Response(_package_file(name), content_type=STATIC_FILES[name]))
        answer.headers["Cache-Control"] = "no-cache"
        return answer

    return static


def _task(extension: "MultiprocessController") -> Callable[[str], ResponseReturnValue]:
    def task(uuid: str) -> ResponseReturnValue:
        controller, row, _ = _opened(extension, uuid)
        wants = request.accept_mimetypes.best_match(["application/json", "text/html"])
        if wants == "text/html":
            answer = Response(_package_file("share.html"), mimetype="text/html")
        else:
            answer = jsonify(shared_view(controller.client_view(row)))
        answer.vary.add("Accept")
        return answer

    return task


def _events(extension: "MultiprocessController") -> Callable[[str], ResponseReturnValue]:
    def events(uuid: str) -> ResponseReturnValue:
        from .views import _stream

        controller, row, expires = _opened(extension, uuid)
        until = time.monotonic() + max(0.0, expires - time.time())
        return _stream(lambda deadline, config: follow(controller, row["uuid"], min(deadline, until),
                                                       config.buffer))

    return events


def follow(controller: "MetaMPController", uuid: str, deadline: float, buffer: int) -> Iterator[str]:
    """The SSE stream of one task as a share link shows it: ``task`` (the whole view) first, then its
    changes, until it ended (or is gone) or ``deadline`` (``time.monotonic()``).

    A reconnection gets the whole view again rather than a replay of what it missed: it only ever needs
    the task's current state.
    """
    from .sse import message, stream

    def view(owner: "MetaMPController", event: "Event") -> Optional[dict[str, Any]]:
        if event["kind"] == "purged":
            return {"uuid": event["uuid"], "status": "purged"}
        return shared_view(owner.client_view_of(present_change(event["task"])))

    lines = stream([controller], view, None, deadline, buffer=buffer, tenants={controller.name: ANY_TENANT},
                   only=uuid)
    try:
        for piece in lines:
            yield piece
            if piece.startswith("retry:"):  # subscribed: what happens from now on is queued for the client
                row = controller.store.get(uuid)
                if row is None:
                    yield message("purged", {"uuid": uuid, "status": "purged"})
                    return
                yield message("task", shared_view(controller.client_view(row)))
                if row["status"] in TERMINAL:
                    return
            elif _event_name(piece) in _FINAL_EVENTS:
                return
    finally:
        close = getattr(lines, "close", None)
        if close is not None:
            close()


def _event_name(piece: str) -> Optional[str]:
    for line in piece.split("\n", 3)[:3]:
        if line.startswith("event: "):
            return line[len("event: "):]
    return None


def _artifact(extension: "MultiprocessController") -> Callable[[str, str], ResponseReturnValue]:
    def artifact(uuid: str, name: str) -> ResponseReturnValue:
        controller, row, _ = _opened(extension, uuid)
        return serve_shared_artifact(controller, row, name)

    return artifact


def serve_shared_artifact(controller: "MetaMPController", row: Row, name: str) -> ResponseReturnValue:
    """The file ``name`` of the task ``row`` (whose share token was checked), served as the task API serves it
    (:func:`~..artifacts.artifact_response`: an attachment, ranges answered)."""
    return artifact_response(controller, row, name)
