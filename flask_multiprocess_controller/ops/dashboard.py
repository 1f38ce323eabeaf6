"""The live dashboard: one HTML page, its script and style sheet, and the per-minute counts its chart shows.

The page is plain HTML, CSS and JavaScript shipped as package data (``static/``): no CDN and
no build step, so it works offline and from a wheel. It reads the extension's own JSON API with
URLs relative to ``<prefix>/`` (so any ``MPC_URL_PREFIX`` and any ``SCRIPT_NAME`` work), follows
``<prefix>/events`` with an EventSource, and builds its DOM with ``textContent`` only: whatever a
task or a client wrote is shown as text. Every dashboard response carries a Content-Security-Policy
that allows scripts and styles from the app's own origin only (no inline script, no ``eval``).

The views are wrapped like every extension view (the ``decorator=``, then the tenant hook for data).

.. versionadded:: 0.3
"""
from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any, Callable

from flask import Blueprint, Response, jsonify, request
from flask.typing import ResponseReturnValue

from ..exceptions import InvalidRequest
from ..http.handlers import int_option
from ..presenter import iso
from ..states import TERMINAL

if TYPE_CHECKING:
    from ..extension import MultiprocessController

#: The policy of every dashboard response: the page's own script and style sheet, JSON and event
#: streams from the same origin, images from itself or ``data:`` URLs, nothing else.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")

#: The files the dashboard serves, with their content types.
STATIC_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}

#: Minutes the chart may cover at most (a day).
MAX_CHART_MINUTES = 24 * 60
#: Minutes the chart covers unless ``?minutes=`` says otherwise.
CHART_MINUTES = 60
_STEP = 60.0

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


def add_dashboard(blueprint: Blueprint, extension: "MultiprocessController", wrap: Wrap) -> None:
    """Add the dashboard's URLs to the extension's blueprint: ``/``, its two files and ``/api/stats``."""
    blueprint.add_url_rule("/", "dashboard", wrap(_page))
    for name in STATIC_FILES:
        blueprint.add_url_rule(f"/{name}", f"dashboard_{name.replace('.', '_')}", wrap(_static(name)))
    blueprint.add_url_rule("/api/stats", "stats", wrap(_stats(extension)))


def _package_file(name: str) -> bytes:
    return resources.files("flask_multiprocess_controller").joinpath("static").joinpath(name).read_bytes()


def _secured(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-cache"
    return response


def _page() -> ResponseReturnValue:
    return _secured(Response(_package_file("index.html"), mimetype="text/html"))


def _static(name: str) -> Callable[[], ResponseReturnValue]:
    def static() -> ResponseReturnValue:
        return _secured(Response(_package_file(name), content_type=STATIC_FILES[name]))

    return static


def _stats(extension: "MultiprocessController") -> Callable[[], ResponseReturnValue]:
    def stats() -> ResponseReturnValue:
        wanted = request.args.get("controller")
        controllers = [c for c in extension.controllers() if wanted in (None, "", c.name)]
        if wanted and not controllers:
            raise InvalidRequest(f"No controller is called {wanted[:80]!r}.")
        minutes = _minutes()
        now = max((c.store.now() for c in controllers), default=0.0)
        since = (now // _STEP + 1 - minutes) * _STEP  # whole minutes, the current one last
        counts: dict[str, list[int]] = {status: [0] * minutes for status in sorted(TERMINAL)}
        for controller in controllers:
            found = controller.store.ended_counts(controller.name, since, _STEP, tenant=controller.tenant_filter())
            for (slot, status), n in found.items():
                if 0 <= slot < minutes and status in counts:
                    counts[status][slot] += n
        return jsonify({"since": iso(since), "now": iso(now), "step": int(_STEP), "minutes": minutes,
                        "counts": counts})

    return stats


def _minutes() -> int:
    return int(int_option("minutes", CHART_MINUTES, 1, MAX_CHART_MINUTES))
