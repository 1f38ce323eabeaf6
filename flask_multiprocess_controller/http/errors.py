"""The one place where the package's exceptions become HTTP responses."""
from __future__ import annotations

from typing import Any

from .. import defaults
from ..exceptions import ChangeNotAllowed
from ..exceptions import (
    BatchNotFound, ControllerClosed, HostNotFound, InvalidRequest, InvalidTransition, MethodNotServed,
    MPCError, PayloadTooLarge,
    QueueFull,
    StoreError, TaskAlreadyFinished, TaskNotFound, TooManyStreams,
)
from ..exceptions import IdempotencyKeyReused, IdempotentTasksPurged
from ..exceptions import MetricsUnavailable
from ..exceptions import TaskStillActive
from ..exceptions import ArtifactNotFound, ArtifactTooLarge, TooManyArtifacts
from ..exceptions import ShareDenied, ShareLinkExpired, ShareTokenMissing
from ..exceptions import QuotaExceeded, ResourcesUnavailable

#: HTTP status of each exception class (the first match along the MRO wins).
HTTP_STATUS: dict[type, int] = {
    InvalidRequest: 400,
    TaskNotFound: 404,
    ArtifactNotFound: 404,
    ArtifactTooLarge: 413,
    TooManyArtifacts: 409,
    BatchNotFound: 404,
    HostNotFound: 404,
    MetricsUnavailable: 404,
    ChangeNotAllowed: 403,
    ShareTokenMissing: 401,
    ShareLinkExpired: 401,
    ShareDenied: 403,
    MethodNotServed: 405,
    TaskAlreadyFinished: 409,
    InvalidTransition: 409,
    TaskStillActive: 409,
    PayloadTooLarge: 413,
    IdempotencyKeyReused: 422,
    IdempotentTasksPurged: 409,
    QueueFull: 429,
    ResourcesUnavailable: 422,
    QuotaExceeded: 429,
    ControllerClosed: 503,
    TooManyStreams: 503,
    StoreError: 503,
    MPCError: 500,
}


def error_response(exc: MPCError) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Return ``(body, status, headers)`` for ``exc``: a JSON object with a human ``message``."""
    status = next(HTTP_STATUS[k] for k in type(exc).__mro__ if k in HTTP_STATUS)
    headers = {}
    if isinstance(exc, (QueueFull, StoreError, TooManyStreams, QuotaExceeded)):
        headers["Retry-After"] = str(getattr(exc, "retry_after", defaults.RETRY_AFTER))
    if isinstance(exc, MethodNotServed):
        headers["Allow"] = ", ".join(exc.allowed)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="share link"'
    return {"message": exc.message}, status, headers
