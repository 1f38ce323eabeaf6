"""What a controller's HTTP handler returns: a JSON object that knows its status and headers.

The default handlers answer ``202`` with a ``Location`` header, ``200`` or ``409``
and so on; an override that calls ``super().post(**kwargs)`` and adds a key
(``reply["extra"] = ...``, upstream 0.1's idiom) must keep those. A :class:`Reply`
is a plain ``dict`` to such code and carries the status and headers along; the
resource turns it into the ``(body, status, headers)`` triple flask-restful takes.
Anything else an override returns goes to flask-restful as it is, so a plain dict
answers ``200`` and a ``(body, status, headers)`` tuple keeps working.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional


class Reply(dict):  # type: ignore[type-arg]
    """A JSON object answered with :attr:`status` and :attr:`headers`.

    It is a ``dict`` in every other respect; copying it with ``dict(reply)`` gives a
    plain dict, which answers ``200`` without the headers.

    .. versionadded:: 0.3
    """

    def __init__(self, body: Optional[Mapping[str, Any]] = None, status: int = 200,
                 headers: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(body or {})
        #: The HTTP status the resource answers with.
        self.status = status
        #: Headers sent with the answer (``Location``, say); change them in place.
        self.headers: dict[str, str] = dict(headers or {})

    def __repr__(self) -> str:
        return f"Reply({dict.__repr__(self)}, status={self.status}, headers={self.headers})"


def restful_result(result: Any) -> Any:
    """What the resource hands to flask-restful for a handler's ``result``."""
    if isinstance(result, Reply):
        return result, result.status, result.headers
    return result
