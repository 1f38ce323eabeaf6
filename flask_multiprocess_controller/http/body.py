"""The one reader of request bodies: every URL that takes a JSON body reads it here.

The resource's methods (:mod:`.resource`) and the extension's API (:mod:`.views`) read bodies
with :func:`read_json_body`, so each is held to the same limits: at most ``max_content_length``
bytes (else 413, read no further than the limit), JSON only (no ``NaN`` or ``Infinity``, which
Python's parser would take), and nested at most :data:`~.defaults.MAX_ARGS_DEPTH` + 1 levels (else
400). No error message quotes the body: a 30 MB body gets a sentence back, not itself.

.. versionadded:: 0.3
"""
from __future__ import annotations

import json
from typing import Any

from flask import request

from .. import defaults
from ..exceptions import InvalidRequest, PayloadTooLarge
from ..jsonvalues import json_problem

#: What :func:`read_json_body` returns for an empty body.
EMPTY = object()

#: Levels a request body may nest: a bulk body is one level deeper than the arguments it carries.
MAX_BODY_DEPTH = defaults.MAX_ARGS_DEPTH + 1


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def read_json_body(limit: int, any_content_type: bool = False) -> Any:
    """Return the request's JSON body (:data:`EMPTY` when empty), enforcing the size limit and the content type.

    :param limit: bytes the body may hold (the controller's ``max_content_length``).
    :param any_content_type: parse the body as JSON whatever its content type says
        (upstream 0.1 did; see :mod:`.compat` for why it is not the default).
    :raises PayloadTooLarge: the body is over ``limit`` bytes (413).
    :raises InvalidRequest: it is not JSON, holds NaN or Infinity, or nests too deep (400).
    """
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"The request body has {length} bytes; the limit is {limit} bytes.")
    if length == 0 or (length is None and not request.headers.get("Transfer-Encoding")):
        # No Content-Length (or 0) and no Transfer-Encoding: the request has no body (RFC 9112, 6.3); a
        # GET or DELETE, mostly, whose empty input stream is not worth setting up and reading.
        return EMPTY
    data = request.stream.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    if not data.strip():
        return EMPTY
    if not any_content_type and not _is_json(request.mimetype):
        raise InvalidRequest(f"The body must be JSON sent with 'Content-Type: application/json', "
                             f"not {request.mimetype[:80] or 'no content type'!r}.")
    try:
        body = json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidRequest(f"The body nests deeper than {MAX_BODY_DEPTH} levels.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        # The parser's messages say where, never what: they quote no part of the body.
        raise InvalidRequest(f"The body is not valid JSON: {str(exc)[:200]}.") from None
    problem = json_problem(body, MAX_BODY_DEPTH)
    if problem is not None:
        raise InvalidRequest(f"The body {problem}.")
    return body


def _refuse_constant(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity`` are not JSON, though Python's parser takes them."""
    raise ValueError(f"{name} is not a JSON value")
