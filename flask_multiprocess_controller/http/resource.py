"""The flask-restful resource: turns HTTP requests into calls of the controller's methods.

Mount it seed-style, ``api.add_resource(R, '/sample', resource_class_args=(c,))``, or
with an item URL as well, ``api.add_resource(R, '/sample', '/sample/<string:uuid>', ...)``.

Every HTTP method Flask serves reaches the controller's method of the same name, with
the JSON body's keys and the path values as keywords; for every method but POST a
``uuid`` is also taken from the query string (``?uuid=``). A JSON array body of a
POST, PUT or PATCH is passed as positional arguments (the default POST queues one task
per item). The URL routes only the methods the controller serves (see
:meth:`MetaMPController.served_methods`), so Flask answers the others with 405 and an
``Allow`` header, answers OPTIONS itself, and HEAD runs GET without sending the body,
unless the controller overrides ``head`` or ``options``.
"""
from __future__ import annotations

from typing import Any

from flask import current_app, request
from flask_restful import Resource

from .body import EMPTY, read_json_body
from .compat import error_body
from ..controller import MetaMPController
from .handlers import HTTP_METHODS
from .errors import error_response
from ..exceptions import InvalidRequest, MethodNotServed, MPCError
from .responses import Reply, restful_result


#: Methods whose JSON array body is passed as positional arguments.
_ARRAY_BODY_METHODS = frozenset({"post", "put", "patch"})


def is_artifacts_rule(rule: str) -> bool:
    """Whether URL rule ``rule`` is an artifacts URL of a resource (see :meth:`MetaMPResource.urls`)."""
    return rule.endswith("/<string:uuid>/artifacts") or rule.endswith("/<uuid>/artifacts") or "/artifacts/<" in rule


def _artifacts_route() -> bool:
    """Whether the request came through an artifacts URL of a resource."""
    return request.url_rule is not None and is_artifacts_rule(request.url_rule.rule)


class MetaMPResource(Resource):  # type: ignore[misc]  # flask-restful is untyped
    """A flask-restful resource bound to one controller (its only constructor argument)."""

    def __init__(self, controller: MetaMPController) -> None:
        super().__init__()
        self._controller = controller

    @classmethod
    def as_view(cls, name: str, *class_args: Any, **class_kwargs: Any) -> Any:
        """The view function of one mount: it routes exactly the methods its controller serves.

        Methods this class itself overrides are routed too. OPTIONS is left to Flask
        unless overridden, so that its ``Allow`` header lists what the URL serves.
        """
        view = super().as_view(name, *class_args, **class_kwargs)
        controller = class_args[0] if class_args else class_kwargs.get("controller")
        if isinstance(controller, MetaMPController):
            controller.mounted()
            own = {m for m in HTTP_METHODS if getattr(cls, m) is not getattr(MetaMPResource, m)}
            routed = set(controller.served_methods()) | {m.upper() for m in own}
            if not (controller.overrides("options") or "options" in own):
                routed.discard("OPTIONS")
            view.methods = routed
        return view

    def dispatch_request(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if _artifacts_route() and request.method not in ("GET", "HEAD", "OPTIONS"):
                # An artifacts URL only reads: a DELETE there must not stop the task.
                raise MethodNotServed(f"{request.path} only answers GET (and HEAD).", ["GET", "HEAD", "OPTIONS"])
            return super().dispatch_request(*args, **kwargs)
        except MPCError as exc:
            body, status, headers = error_response(exc)
            return (error_body(body) if self._controller.compat else body), status, headers

    def _call(self, method: str, path: dict[str, Any]) -> Any:
        """Call the controller's ``method`` with the body and path values; return what flask-restful takes."""
        controller = self._controller
        body = read_json_body(controller.max_content_length, any_content_type=controller.compat is not None)
        if body is EMPTY:
            body = {}
        if isinstance(body, list) and method in _ARRAY_BODY_METHODS:
            if not body:
                raise InvalidRequest(f"A JSON array sent with {method.upper()} needs at least one item.")
            args, fields = body, {}
        elif isinstance(body, dict):
            args, fields = [], dict(body)
        else:
            kinds = "a JSON object or an array of objects" if method in _ARRAY_BODY_METHODS else "a JSON object"
            raise InvalidRequest(f"The body must be {kinds}, not {type(body).__name__}.")
        fields.update(path)
        if "self" in fields or any(isinstance(item, dict) and "self" in item for item in args):
            raise InvalidRequest("'self' cannot be the name of an argument.")
        if method != "post" and path.get("uuid") is None:
            uuid = request.args.get("uuid") or fields.get("uuid")
            if uuid is not None:
                fields["uuid"] = uuid
        return restful_result(controller.handler(method)(*args, **fields))

    @classmethod
    def urls(cls, collection: str) -> tuple[str, ...]:
        """The URLs to mount a resource at for ``collection`` (``"/sample"``): the collection, the item
        (``/sample/<string:uuid>``), and its artifacts (``.../artifacts``, ``.../artifacts/<path:name>``)::

            api.add_resource(R, *R.urls("/sample"), resource_class_args=(controller,))

        .. versionadded:: 0.4
        """
        base = collection.rstrip("/")
        item = f"{base}/<string:uuid>"
        return (collection, item, f"{item}/artifacts", f"{item}/artifacts/<path:name>")

    def get(self, **path: Any) -> Any:
        if _artifacts_route() and path.get("uuid") is not None:
            return self._artifacts(path)
        return self._call("get", path)

    def _artifacts(self, path: dict[str, Any]) -> Any:
        """``GET <item>/artifacts`` (the list) or ``GET <item>/artifacts/<name>`` (a download): the controller's
        :meth:`~..controller.MetaMPController.artifacts`, behind its ``decorator``."""
        answer = self._controller.handler("artifacts")(path["uuid"], path.get("name"))
        return restful_result(Reply(answer)) if isinstance(answer, dict) else answer

    def post(self, **path: Any) -> Any:
        if path.get("uuid") is not None and not self._controller.overrides("post"):
            raise InvalidRequest("POST goes to the collection URL, without a uuid.")
        return self._call("post", path)

    def put(self, **path: Any) -> Any:
        return self._call("put", path)

    def patch(self, **path: Any) -> Any:
        return self._call("patch", path)

    def delete(self, **path: Any) -> Any:
        return self._call("delete", path)

    def head(self, **path: Any) -> Any:
        if self._controller.overrides("head"):
            return self._call("head", path)
        return self.get(**path)  # Flask's habit: GET's answer, whose body the server does not send

    def options(self, **path: Any) -> Any:
        if self._controller.overrides("options"):
            return self._call("options", path)
        return current_app.make_default_options_response()

    def trace(self, **path: Any) -> Any:
        return self._call("trace", path)
