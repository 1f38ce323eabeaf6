"""The flask-restful resource: turns HTTP requests into calls of the controller's methods.

Mount it seed-style, ``api.add_resource(R, '/sample', resource_class_args=(c,))``, or
with an item URL as well, ``api.add_resource(R, '/sample', '/sample/<string:uuid>', ...)``.
A uuid may come from the path, the query string (``?uuid=``) or a JSON body.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from flask import request
from flask_restful import Resource

from .controller import MetaMPController
from .errors import error_response
from .exceptions import InvalidRequest, MPCError, PayloadTooLarge


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


EMPTY = object()  #: what read_json_body returns for an empty body


def read_json_body(limit: int) -> Any:
    """Return the request's JSON body (None when empty), enforcing the size limit and the content type."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"The request body has {length} bytes; the limit is {limit} bytes.")
    data = request.stream.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    if not data.strip():
        return EMPTY
    if not _is_json(request.mimetype):
        raise InvalidRequest(f"The body must be JSON sent with 'Content-Type: application/json', "
                             f"not {request.mimetype or 'no content type'!r}.")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}.") from None


class MetaMPResource(Resource):
    """A flask-restful resource bound to one controller (its only constructor argument)."""

    def __init__(self, controller: MetaMPController) -> None:
        super().__init__()
        self._controller = controller

    def dispatch_request(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().dispatch_request(*args, **kwargs)
        except MPCError as exc:
            return error_response(exc)

    def _fields(self, uuid: Optional[str]) -> dict:
        body = read_json_body(self._controller.max_content_length)
        if body is EMPTY:
            body = {}
        if not isinstance(body, dict):
            raise InvalidRequest(f"The body must be a JSON object, not {type(body).__name__}.")
        if uuid is None:
            uuid = request.args.get("uuid") or body.get("uuid")
        fields = {"uuid": uuid} if uuid is not None else {}
        return fields

    def get(self, uuid: Optional[str] = None) -> Any:
        return self._controller.handler("get")(**self._fields(uuid))

    def delete(self, uuid: Optional[str] = None) -> Any:
        return self._controller.handler("delete")(**self._fields(uuid))

    def post(self, uuid: Optional[str] = None) -> Any:
        if uuid is not None:
            raise InvalidRequest("POST goes to the collection URL, without a uuid.")
        body = read_json_body(self._controller.max_content_length)
        post = self._controller.handler("post")
        if body is EMPTY:
            return post()
        if isinstance(body, dict):
            return post(**body)
        if isinstance(body, list):
            if not body:
                raise InvalidRequest("A bulk POST needs at least one task object in its array.")
            return post(*body)
        raise InvalidRequest(f"The body must be a JSON object or an array of objects, not {type(body).__name__}.")
